//! Accepting connections (HTTP/1.1 and HTTP/2 cleartext on one port), bounding what each
//! client may hold, and draining connections on shutdown.
//!
//! Bounds, per connection unless said otherwise (the flags are in `cli::Limits`):
//! - connections at once: a semaphore taken before `accept`, so past the cap new clients
//!   wait in the kernel's backlog and open connections are untouched;
//! - the time to the first request and between requests (`Watched`), and hyper's own
//!   header-read timer for every HTTP/1.1 request head;
//! - header size and count (hyper: 431), HTTP/2 streams and resets (h2: GOAWAY);
//! - the drain on shutdown: past it, connections still open are dropped.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use prometheus::IntGauge;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};

use crate::{body::ProxyBody, cli::Limits};

/// hyper's own default; any other value makes it allocate the header array per request.
const HYPER_MAX_HEADERS: u32 = 100;

/// Serves `listener` with `handler` until `stop` turns true, then drains connections for
/// up to `limits.drain_timeout`. `open` counts the connections being served.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    open: Option<IntGauge>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = Arc::new(builder(&limits));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let mut conns = JoinSet::new();
    let (header_read, idle) = (limits.header_read_timeout, limits.idle_timeout);
    loop {
        // Finished connections leave the set here, so it holds only live ones.
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let (io, busy) = Watched::new(stream, header_read, idle);
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            // Held while the request is being answered, so an idle check never closes a
            // connection that waits on its upstream.
            let in_flight = busy.upgrade();
            if let Some(b) = &in_flight
                && !b.load(Ordering::Relaxed)
            {
                b.store(true, Ordering::Relaxed);
            }
            let fut = handler(req, peer);
            async move {
                let resp = fut.await;
                drop(in_flight);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
        let conn = graceful.watch(conn);
        let open = open.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Some(g) = &open {
                g.inc();
            }
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            if let Some(g) = &open {
                g.dec();
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("connections drained"),
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!(open = conns.len(), "drain timed out; closing remaining connections");
        }
    }
    conns.shutdown().await;
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut h1 = b.http1();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The head must fit the read buffer; past it hyper answers 431. The body streams
        // through in chunks of at most this size.
        .max_buf_size(limits.max_header_bytes as usize);
    if limits.max_headers != HYPER_MAX_HEADERS {
        h1.max_headers(limits.max_headers as usize);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams);
    b
}

/// A client connection that closes itself when it stalls: no first request within the
/// header-read timeout, or, later, neither a request in flight nor a byte moved during an
/// idle period. One timer per connection, re-armed once per period rather than on every
/// read, so the hot path pays one flag write per read or write.
///
/// hyper 1.12 has no idle timeout of its own (for HTTP/1.1 its header-read timer also runs
/// between keep-alive requests, which this does not replace; HTTP/2 has none at all), and
/// its header-read timer starts only once it knows the protocol, after the first bytes.
struct Watched {
    stream: TcpStream,
    timer: Pin<Box<Sleep>>,
    idle: Duration,
    /// Alive while requests are in flight (`Weak::upgrade` in the service); the flag is set
    /// once the first request arrived.
    busy: Arc<AtomicBool>,
    moved: bool,
    serving: bool,
}

impl Watched {
    fn new(stream: TcpStream, header_read: Duration, idle: Duration) -> (Self, Weak<AtomicBool>) {
        let busy = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(&busy);
        let timer = Box::pin(tokio::time::sleep(header_read));
        (Self { stream, timer, idle, busy, moved: false, serving: false }, weak)
    }

    /// Polled while the connection waits to read: whether it has stalled for good.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.serving && self.busy.load(Ordering::Relaxed) {
            // The first request came: from now on the idle period applies. Once per connection.
            self.serving = true;
            self.moved = false;
            let next = Instant::now() + self.idle;
            self.timer.as_mut().reset(next);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let in_flight = Arc::strong_count(&self.busy) > 1;
            if !self.serving {
                if !in_flight && !self.busy.load(Ordering::Relaxed) {
                    return Some(io::Error::new(io::ErrorKind::TimedOut, "no request within the header-read timeout"));
                }
                self.serving = true;
            } else if !in_flight && !self.moved {
                return Some(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
            self.moved = false;
            let next = Instant::now() + self.idle;
            self.timer.as_mut().reset(next);
        }
        None
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.moved = true;
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.moved = true;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
