//! Accepting connections (HTTP/1.1 and HTTP/2 on one port, cleartext or over TLS with
//! ALPN), bounding what each client may hold, and draining connections on shutdown.
//!
//! Bounds, per connection unless said otherwise (the flags are in `cli::Limits`):
//! - connections at once: a semaphore the workers of one address share, taken right after
//!   `accept`, so past the cap each worker holds one new client unread and the others
//!   wait in the kernel's backlogs, while open connections are untouched;
//! - the time to the first request, the wait for each next request's head, and idle time
//!   (`Watched`, one timer per connection rather than hyper's timer per request); a TLS
//!   handshake falls within the time to the first request;
//! - header size and count (hyper: 431), HTTP/2 streams and resets (h2: GOAWAY);
//! - the drain on shutdown: past it, connections still open are dropped (a WebSocket
//!   runs on its connection's task, so the drain waits for it too).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Weak, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use prometheus::IntGauge;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};

use crate::{
    body::ProxyBody,
    cli::Limits,
    client_auth::ClientCert,
    tls::Acceptor,
    tunnel::{ConnState, UpgradeSlot},
};

/// hyper's own default; any other value makes it allocate the header array per request.
const HYPER_MAX_HEADERS: u32 = 100;

/// How a request's connection came in, for the handler.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's address as an `X-Forwarded-For` entry, formatted once per connection.
    pub forwarded_for: http::HeaderValue,
    /// Over TLS (`--tls-listen`).
    pub tls: bool,
    pub client_cert: ClientCert,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool, client_cert: ClientCert) -> Self {
        let forwarded_for = http::HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        Self { peer, forwarded_for, tls, client_cert }
    }
}

/// Serves `listener` with `handler` until `stop` turns true, then drains connections for
/// up to `limits.drain_timeout`. A connection holds one of `slots` (`--max-connections`,
/// shared by the workers serving one address) while it is open; `open` counts them. With `tls`,
/// every connection starts with a TLS handshake, on the connection's own task: it holds a
/// connection slot, and it must end within the header-read timeout, which also bounds the
/// first request (one deadline from `accept` to the first request's head).
pub async fn serve<H, F>(
    listener: std::net::TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    slots: Arc<Semaphore>,
    open: Option<IntGauge>,
    tls: Option<Acceptor>,
) where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = match listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve a listener");
            return;
        }
    };
    let builder = Arc::new(builder(&limits));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let (header_read, idle) = (limits.header_read_timeout, limits.idle_timeout);
    loop {
        // Finished connections leave the set here, so it holds only live ones.
        while conns.try_join_next().is_some() {}
        // A client first, then a slot. Workers share the cap, and each has its own backlog:
        // a worker that took a slot first would hold it while the client waiting for it
        // sits in another worker's backlog. So past the cap each worker holds at most one
        // accepted client, unread, until a slot frees (first come, first served); the rest
        // wait in the backlogs.
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
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let first_request_by = Instant::now() + header_read;
        let (handler, builder, watcher, open, tls) =
            (handler.clone(), builder.clone(), graceful.watcher(), open.clone(), tls.clone());
        let timing = Timing { first_request_by, header_read, idle };
        let mut draining = stop.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Some(g) = &open {
                g.inc();
            }
            // Nothing of hyper's (or rustls's) is made before the client's first byte: its
            // buffers and state, several KiB, would sit on every connection a client or a
            // load balancer opens ahead of use. Until then the connection is this task.
            // `peek`, not `readable`: a new socket is reported ready once before anything came.
            let mut byte = [0u8; 1];
            let first_byte = tokio::select! {
                r = tokio::time::timeout_at(first_request_by, stream.peek(&mut byte)) => matches!(r, Ok(Ok(1))),
                _ = draining.changed() => false,
            };
            if first_byte {
                Box::pin(serve_accepted(&builder, watcher, stream, peer, tls, timing, handler)).await;
            } else {
                tracing::debug!(%peer, "closed before its first byte: by the client, the header-read timeout, or draining");
            }
            if let Some(g) = &open {
                g.dec();
            }
        });
    }
    drop(listener);
    let drained = async {
        graceful.shutdown().await;
        // Upgraded connections left hyper's watch; their tasks end with the tunnel.
        while conns.join_next().await.is_some() {}
    };
    tokio::select! {
        () = drained => tracing::debug!("connections drained"),
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!(open = conns.len(), "drain timed out; closing remaining connections");
        }
    }
    conns.shutdown().await;
}

/// A connection's time limits: `Watched`'s first check falls on `first_request_by`.
#[derive(Clone, Copy)]
struct Timing {
    first_request_by: Instant,
    header_read: Duration,
    idle: Duration,
}

/// A connection whose first byte came: its TLS handshake, if it is on the TLS listener
/// (within what is left of the header-read timeout), then hyper.
async fn serve_accepted<H, F>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Acceptor>,
    timing: Timing,
    handler: H,
) where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let Some(acceptor) = tls else {
        let conn = Conn::new(peer, false, ClientCert::default());
        return serve_one(builder, watcher, stream, timing, handler, conn).await;
    };
    match tokio::time::timeout_at(timing.first_request_by, acceptor.accept(stream)).await {
        Ok(Ok((stream, cert))) => {
            serve_one(builder, watcher, stream, timing, handler, Conn::new(peer, true, cert)).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not done within the header-read timeout"),
    }
}

/// Serves one connection (plain, or TLS once the handshake is done) with hyper.
async fn serve_one<S, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    stream: S,
    timing: Timing,
    handler: H,
    conn: Conn,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let peer = conn.peer;
    let (io, busy) = Watched::new(stream, timing);
    let state = busy.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        // Held while the request is being answered, so an idle check never closes a
        // connection that waits on its upstream.
        let in_flight = busy.upgrade();
        if let Some(b) = &in_flight {
            b.requests.fetch_add(1, Ordering::Relaxed);
            // Only a request that may upgrade is told where to leave its tunnel.
            if req.version() == http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE) {
                req.extensions_mut().insert(UpgradeSlot(b.clone()));
            }
        }
        // Boxed where it is made: the request's future is large (the whole chain), and
        // hyper moves the future it gets into its own slot. Inline, every move copied all
        // of it (a quarter of the user-space instructions per proxied request, measured
        // with callgrind); boxed, hyper moves a pointer.
        let fut = Box::pin(handler(req, conn.clone()));
        async move {
            let resp = fut.await;
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        }
    });
    let c = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned();
    if let Err(e) = watcher.watch(c).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    // hyper handed an upgraded connection back: join it to its upstream here, holding
    // the connection's slot. `state` counts as a request in flight for `Watched`, whose
    // own checks stop: the tunnel has its idle timeout.
    if let Some(state) = state.upgrade()
        && let Some(tunnel) = state.take()
    {
        tunnel.run(timing.idle, peer).await;
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut h1 = b.http1();
    // `Watched` bounds the wait for a request head, with one timer per connection: hyper's
    // own timer costs an allocation, a clock read and a timer-wheel insert per request.
    h1.header_read_timeout(None)
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

/// A client connection that closes itself when it stalls, checked by one timer per
/// connection that fires once per period, so a request pays one counter increment and a
/// flag write per read or write, and no clock read:
/// - no request started within the header-read timeout of the connection opening;
/// - HTTP/1.1: a whole period (the shorter of the header-read and idle timeouts) with no
///   request in flight, none started and nothing written. Bytes read do not count: a client
///   trickling a request head is still waiting for its request to start (slowloris), so it
///   is closed between one and two periods after the previous response;
/// - HTTP/2: a whole idle period with no stream in flight, none started and no byte moving
///   either way.
///
/// hyper 1.12 has no idle timeout (HTTP/2 has none at all), and its header-read timer
/// starts only once it knows the protocol, after the first bytes.
struct Watched<S> {
    stream: S,
    timer: Pin<Box<Sleep>>,
    header_read: Duration,
    idle: Duration,
    /// Requests started (the service counts them); alive while requests are in flight
    /// (`Weak::upgrade` in the service) or a tunnel runs.
    state: Arc<ConnState>,
    /// `requests` when the timer last fired, and whether one was in flight then.
    seen: u32,
    was_in_flight: bool,
    read: bool,
    wrote: bool,
    protocol: Protocol,
    serving: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// What every HTTP/2 connection starts with (RFC 9113 3.4); no HTTP/1.1 method is `PRI`.
const H2_PREFACE_START: &[u8] = b"PRI ";

impl<S> Watched<S> {
    fn new(stream: S, timing: Timing) -> (Self, Weak<ConnState>) {
        let Timing { first_request_by, header_read, idle } = timing;
        let state = Arc::new(ConnState::default());
        let weak = Arc::downgrade(&state);
        let timer = Box::pin(tokio::time::sleep_until(first_request_by));
        let protocol = Protocol::Unknown;
        let me = Self {
            stream,
            timer,
            header_read,
            idle,
            state,
            seen: 0,
            was_in_flight: false,
            read: false,
            wrote: false,
            protocol,
            serving: false,
        };
        (me, weak)
    }

    fn period(&self) -> Duration {
        match self.protocol {
            Protocol::Http2 => self.idle,
            _ => self.header_read.min(self.idle),
        }
    }

    fn rearm(&mut self) {
        let next = Instant::now() + self.period();
        self.timer.as_mut().reset(next);
    }

    /// Polled while the connection waits to read: whether it has stalled for good.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.serving && self.state.requests.load(Ordering::Relaxed) > 0 {
            // The first request came: from now on the protocol's period applies. Once per
            // connection.
            self.serving = true;
            self.rearm();
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let in_flight = Arc::strong_count(&self.state) > 1;
            let requests = self.state.requests.load(Ordering::Relaxed);
            if requests == 0 && !in_flight {
                return Some(io::Error::new(io::ErrorKind::TimedOut, "no request within the header-read timeout"));
            }
            let moved = self.wrote || (self.protocol == Protocol::Http2 && self.read);
            if !in_flight && !self.was_in_flight && requests == self.seen && !moved {
                let why = if self.protocol == Protocol::Http2 { "idle timeout" } else { "no next request in time" };
                return Some(io::Error::new(io::ErrorKind::TimedOut, why));
            }
            (self.seen, self.was_in_flight, self.read, self.wrote) = (requests, in_flight, false, false);
            self.rearm();
        }
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    self.read = true;
                    if self.protocol == Protocol::Unknown && new.len() >= H2_PREFACE_START.len() {
                        let h2 = new.starts_with(H2_PREFACE_START);
                        self.protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
                    }
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.wrote = true;
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
            self.wrote = true;
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
