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
//!
//! Memory: a connection holds hyper's buffers only while it is in use. Before its first
//! byte, and (HTTP/1.1) once idle through a tick of [`crate::park`], it is a small task
//! waiting for the client's next bytes.

use std::{
    convert::Infallible,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{Arc, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response};
use hyper::{
    body::{Body as _, Incoming},
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};

use crate::{
    body::ProxyBody,
    cli::Limits,
    client_auth::ClientCert,
    park::{Activity, Idle, Parked, Rewind, Ticks, Tracked, Waiting},
    tls::Acceptor,
    tunnel::{ConnState, UpgradeSlot, has_token},
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

/// The gauges a listener keeps: connections open, and those of them parked (HTTP/1.1, no
/// request for a second or more, holding no HTTP buffers).
#[derive(Clone)]
pub struct Gauges {
    pub open: IntGauge,
    pub parked: IntGauge,
}

/// What every connection task of one listener shares.
struct Shared {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    ticks: Arc<Ticks>,
    /// Woken all at once when the listener drains.
    parked: Parked,
    gauges: Option<Gauges>,
}

/// Serves `listener` with `handler` until `stop` turns true, then drains connections for
/// up to `limits.drain_timeout`. A connection holds one of `slots` (`--max-connections`,
/// shared by the workers serving one address) while it is open; `gauges` count them. With `tls`,
/// every connection starts with a TLS handshake, on the connection's own task: it holds a
/// connection slot, and it must end within the header-read timeout, which also bounds the
/// first request (one deadline from `accept` to the first request's head).
pub async fn serve<H, F>(
    listener: std::net::TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    slots: Arc<Semaphore>,
    gauges: Option<Gauges>,
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
    let (h1, h2) = builders(&limits);
    let shared = Arc::new(Shared { h1, h2, ticks: Arc::default(), parked: Parked::default(), gauges });
    let ticking = tokio::spawn(shared.ticks.clone().run());
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
        let (handler, shared, tls) = (handler.clone(), shared.clone(), tls.clone());
        let timing = Timing { first_request_by, header_read, idle };
        let draining = stop.clone();
        conns.spawn(connection(shared, draining, stream, peer, tls, timing, handler, slot));
    }
    drop(listener);
    // Each connection sees `stop` too, a parked one through `parked`, woken here: an idle or
    // parked one closes, a busy one after its response (HTTP/2: GOAWAY, then its streams
    // finish). A WebSocket ends with its tunnel.
    shared.parked.drain();
    let drained = async { while conns.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => tracing::debug!("connections drained"),
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!(open = conns.len(), "drain timed out; closing remaining connections");
        }
    }
    conns.shutdown().await;
    ticking.abort();
}

/// A connection's time limits: `Watched`'s first check falls on `first_request_by`.
#[derive(Clone, Copy)]
struct Timing {
    first_request_by: Instant,
    header_read: Duration,
    idle: Duration,
}

/// One connection, from `accept` to its end. Each step is boxed and gone once done, and
/// the HTTP/1.1 connection that follows is boxed on its own: a task is as large as its
/// largest state for as long as it lives, and a parked connection should hold no room
/// for a first-byte wait, a TLS handshake, rustls's connection (on a plain one) or HTTP/2
/// (measured with a handler holding an `Arc`, as the gateway's: 728 + 208 + about 1,500 B
/// of futures per parked plain connection at first, 216 + 368 B now;
/// `tests::a_parked_connection_s_futures_stay_small` bounds them).
#[allow(clippy::too_many_arguments)]
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn connection<H, F>(
    shared: Arc<Shared>,
    mut draining: watch::Receiver<bool>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Acceptor>,
    timing: Timing,
    handler: H,
    slot: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send
where
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // A block, not an `async fn`: an `async fn` keeps a second copy of each argument it
    // holds across an await (the argument, then the local it is moved into).
    async move {
        let _slot = &slot;
        let _open = shared.gauges.as_ref().map(|g| Counted::new(&g.open));
        // Nothing of hyper's (or rustls's) is made before the client's first byte: its
        // buffers and state, several KiB, would sit on every connection a client or a
        // load balancer opens ahead of use.
        if !Box::pin(first_byte(&stream, timing.first_request_by, &mut draining)).await {
            tracing::debug!(%peer, "closed before its first byte: by the client, the header-read timeout, or draining");
            return;
        }
        // Made in blocks so that the steps' results are not kept beside what serves.
        let served = match tls {
            None => {
                let conn = Conn::new(peer, false, ClientCert::default());
                let Some(started) = Box::pin(start(stream, conn, handler, timing, &mut draining)).await else {
                    return;
                };
                serve_started(&shared, draining, started)
            }
            Some(acceptor) => {
                let Some((stream, cert)) = Box::pin(handshake(acceptor, stream, peer, timing)).await else {
                    return;
                };
                let conn = Conn::new(peer, true, cert);
                let Some(started) = Box::pin(start(stream, conn, handler, timing, &mut draining)).await else {
                    return;
                };
                serve_started(&shared, draining, started)
            }
        };
        served.await;
    }
}

/// Whether a first byte came before the header-read timeout (and before draining).
/// `peek`, not `readable`: a new socket is reported ready once before anything came.
async fn first_byte(stream: &tokio::net::TcpStream, by: Instant, draining: &mut watch::Receiver<bool>) -> bool {
    let mut byte = [0u8; 1];
    tokio::select! {
        r = tokio::time::timeout_at(by, stream.peek(&mut byte)) => matches!(r, Ok(Ok(1))),
        _ = draining.changed() => false,
    }
}

/// The TLS handshake, within what is left of the header-read timeout.
async fn handshake(
    acceptor: Acceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    timing: Timing,
) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, ClientCert)> {
    match tokio::time::timeout_at(timing.first_request_by, Box::pin(acceptor.accept(stream))).await {
        Ok(Ok(accepted)) => Some(accepted),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not done within the header-read timeout");
            None
        }
    }
}

/// A connection (plain, or TLS once the handshake is done) whose first bytes have told
/// its protocol.
struct Started<S, H> {
    io: Watched<S>,
    state: Weak<ConnState>,
    svc: Svc<H>,
    h2: bool,
}

/// Reads the first bytes of `stream`: HTTP/2 if they are HTTP/2's preface (prior
/// knowledge, or ALPN `h2`), HTTP/1.1 otherwise.
async fn start<S, H>(
    stream: S,
    conn: Conn,
    handler: H,
    timing: Timing,
    draining: &mut watch::Receiver<bool>,
) -> Option<Started<S, H>>
where
    S: AsyncRead + Unpin,
{
    let peer = conn.peer;
    let (mut io, state) = Watched::new(Rewind::new(stream), timing);
    let h2 = tokio::select! {
        h2 = sniff(&mut io) => match h2 {
            Ok(h2) => h2,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no request");
                return None;
            }
        },
        _ = draining.changed() => return None,
    };
    let svc = Svc { handler, conn, busy: state.clone(), activity: io.activity.clone() };
    Some(Started { io, state, svc, h2 })
}

/// Serves a started connection to its end, boxed: HTTP/2's connection and HTTP/1.1's
/// parking loop are futures of different sizes, and each connection holds only its own.
fn serve_started<'a, S, H, F>(
    shared: &'a Shared,
    draining: watch::Receiver<bool>,
    started: Started<S, H>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let Started { mut io, state, svc, h2 } = started;
    if h2 {
        io.protocol = Protocol::Http2;
        let peer = svc.conn.peer;
        let c = shared.h2.serve_connection(TokioIo::new(io), svc);
        return Box::pin(async move {
            if let Err(e) = until_drained(c, draining, |c| c.graceful_shutdown()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    io.protocol = Protocol::Http1;
    Box::pin(serve_http1(shared, draining, io, state, svc))
}

/// Polls `conn` to its end; once `draining` turns, tells it to finish (`shutdown`).
async fn until_drained<C: Future>(
    conn: C,
    mut draining: watch::Receiver<bool>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut conn = pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        _ = draining.changed() => shutdown(conn.as_mut()),
    }
    conn.await
}

/// The first bytes of a connection, read into `io`'s front until they tell HTTP/2's
/// preface from anything else: whether it is HTTP/2.
async fn sniff<S: AsyncRead + Unpin>(io: &mut Watched<S>) -> io::Result<bool> {
    loop {
        let front = io.stream.front();
        let undecided = front.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(front);
        if !undecided {
            return Ok(front.starts_with(H2_PREFACE_START));
        }
        if read_more(io).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Waits for the client's next bytes (under `Watched`'s time limits) and adds them to
/// `io`'s front; 0 at the end of the stream. The buffer lives only while bytes are there
/// to copy, so a connection waiting here holds none.
async fn read_more<S: AsyncRead + Unpin>(io: &mut Watched<S>) -> io::Result<usize> {
    poll_fn(|cx| poll_read_more(io, cx)).await
}

fn poll_read_more<S: AsyncRead + Unpin>(io: &mut Watched<S>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let mut buf = [0u8; 2048];
    let mut read = ReadBuf::new(&mut buf);
    ready!(io.poll_behind_front(cx, &mut read))?;
    io.stream.append(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

/// How hyper's HTTP/1.1 connection ended.
enum Ended {
    /// By hyper: the client closed, keep-alive ended, or an upgrade (hyper hands the
    /// socket back in every case).
    Closed,
    /// Idle, closed at the server's asking; the socket goes on.
    Parked,
    Failed(hyper::Error),
}

/// HTTP/1.1: hyper serves until the connection closes, or parks it when idle ([`park`]):
/// then this task holds just the socket, reads the client's next bytes, and starts a new
/// hyper connection with them in front.
///
/// [`park`]: crate::park
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn serve_http1<S, H, F>(
    shared: &Shared,
    mut draining: watch::Receiver<bool>,
    mut io: Watched<S>,
    state: Weak<ConnState>,
    svc: Svc<H>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // A block, not an `async fn`, for the reason `connection` gives: a parked connection
    // is mostly this future, and it keeps no copy of what `io` and `svc` hold (the time
    // limits, the peer's address).
    async move {
        loop {
            // Boxed, and gone while the connection is parked: hyper's connection and the
            // future that drives it, over a kilobyte, would otherwise stay in this task.
            let ended;
            (io, ended) = Box::pin(run_http1(shared, &mut draining, io, &state, &svc)).await;
            match ended {
                Ended::Failed(e) => {
                    tracing::debug!(peer = %svc.conn.peer, error = %e, "connection ended with an error");
                    return;
                }
                Ended::Closed => {
                    // hyper handed an upgraded connection back: join it to its upstream here,
                    // holding the connection's slot. `state` counts as a request in flight for
                    // `Watched`, whose own checks stop: the tunnel has its idle timeout.
                    if let Some(state) = state.upgrade()
                        && let Some(tunnel) = state.take()
                    {
                        let idle = io.idle;
                        Box::pin(tunnel.run(io, idle, svc.conn.peer)).await;
                        return;
                    }
                    // hyper has flushed and shut the socket down, except when a request of the
                    // connection asked for an upgrade it did not get: hyper then returns
                    // before that. Bounded: a client that reads nothing can hold a TLS
                    // close_notify up. Boxed: its timer would make every parked connection
                    // larger.
                    let _ = Box::pin(tokio::time::timeout(io.header_read, io.shutdown())).await;
                    return;
                }
                Ended::Parked => {}
            }
            let parked = shared.gauges.as_ref().map(|g| Counted::new(&g.parked));
            let mut waiting = Waiting::new(&shared.parked);
            let more =
                poll_fn(|cx| if waiting.draining(cx) { Poll::Ready(Ok(0)) } else { poll_read_more(&mut io, cx) }).await;
            drop((waiting, parked));
            match more {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(peer = %svc.conn.peer, error = %e, "parked connection closed");
                    return;
                }
            }
        }
    }
}

/// One hyper HTTP/1.1 connection on `io`, from its first request until it ends or parks:
/// the socket comes back with what hyper read past its last request put in front.
async fn run_http1<S, H, F>(
    shared: &Shared,
    draining: &mut watch::Receiver<bool>,
    io: Watched<S>,
    state: &Weak<ConnState>,
    svc: &Svc<H>,
) -> (Watched<S>, Ended)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut c = shared.h1.serve_connection(TokioIo::new(io), svc.clone());
    let ended = drive_http1(&mut c, draining, &shared.ticks, state, &svc.activity).await;
    let http1::Parts { io, read_buf, .. } = c.into_parts();
    let mut io = io.into_inner();
    io.stream.put_back(read_buf);
    (io, ended)
}

/// One on a gauge while it lives, however the task holding it ends (an abort included).
struct Counted<'a>(&'a IntGauge);

impl<'a> Counted<'a> {
    fn new(g: &'a IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Polls hyper's HTTP/1.1 connection until it ends, telling it to finish when `draining`
/// turns, and parking it once it has been idle through a tick.
async fn drive_http1<I, H, F>(
    c: &mut http1::Connection<I, Svc<H>>,
    draining: &mut watch::Receiver<bool>,
    ticks: &Ticks,
    state: &Weak<ConnState>,
    activity: &Activity,
) -> Ended
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut drain = pin!(draining.changed());
    let mut closing = false;
    let mut idle = Idle::default();
    poll_fn(|cx| {
        if !closing && drain.as_mut().poll(cx).is_ready() {
            Pin::new(&mut *c).graceful_shutdown();
            closing = true;
        }
        // Polled as a future: when hyper ends the connection it flushes what it has
        // buffered, then shuts the socket down (an upgrade ends before that, leaving the
        // socket to the tunnel).
        match Pin::new(&mut *c).poll(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Ended::Closed),
            Poll::Ready(Err(e)) => return Poll::Ready(Ended::Failed(e)),
            Poll::Pending => {}
        }
        // No request being answered (the service holds `state` while it answers one, and
        // an upgrade's slot holds it too), no body left, nothing unflushed, and no request
        // after which hyper may close on its own.
        let quiet = activity.parkable() && Weak::strong_count(state) == 1 && activity.quiet();
        if closing || !idle.due(ticks, cx, quiet, activity.requests()) {
            return Poll::Pending;
        }
        // hyper closes at once only if it is idle; one busy after all (a request body
        // still arriving for a request already answered) closes after it instead, and the
        // socket is not kept: its place in the byte stream is hyper's to know. Without
        // shutdown: the socket goes on. Nothing is left unflushed (`quiet`).
        Pin::new(&mut *c).graceful_shutdown();
        match c.poll_without_shutdown(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ended::Parked),
            Poll::Ready(Err(e)) => Poll::Ready(Ended::Failed(e)),
            Poll::Pending => {
                closing = true;
                Poll::Pending
            }
        }
    })
    .await
}

/// The service hyper calls per request: counts it, marks it in flight while it is being
/// answered, and tracks its response body.
struct Svc<H> {
    handler: H,
    conn: Conn,
    busy: Weak<ConnState>,
    activity: Arc<Activity>,
}

// Nothing of a `Svc` is ever pinned in place (hyper asks for `Unpin` to hand it back).
impl<H> Unpin for Svc<H> {}

impl<H: Clone> Clone for Svc<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            conn: self.conn.clone(),
            busy: self.busy.clone(),
            activity: self.activity.clone(),
        }
    }
}

impl<H, F> hyper::service::Service<Request<Incoming>> for Svc<H>
where
    H: Fn(Request<Incoming>, Conn) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    type Response = Response<Tracked<ProxyBody>>;
    type Error = Infallible;
    type Future = Answer<F>;

    fn call(&self, mut req: Request<Incoming>) -> Answer<F> {
        self.activity.started();
        // Held while the request is being answered, so an idle check never closes a
        // connection that waits on its upstream.
        let in_flight = self.busy.upgrade();
        let http11 = req.version() == http::Version::HTTP_11;
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        if upgrade || req.method() == http::Method::CONNECT || (!req.body().is_end_stream() && may_close_early(&req)) {
            self.activity.never_park();
        }
        // Only a request that may upgrade is told where to leave its tunnel.
        if let Some(b) = &in_flight
            && http11
            && upgrade
        {
            req.extensions_mut().insert(UpgradeSlot(b.clone()));
        }
        // Boxed where it is made: the request's future is large (the whole chain), and
        // hyper moves the future it gets into its own slot. Inline, every move copied all
        // of it (a quarter of the user-space instructions per proxied request, measured
        // with callgrind); boxed, hyper moves a pointer.
        let answer = Box::pin((self.handler)(req, self.conn.clone()));
        Answer { answer, in_flight, activity: Some(self.activity.clone()) }
    }
}

/// Whether hyper may end the connection of `req`, a request with a body still to come, as
/// soon as it has answered, with the rest of the body unread: keep-alive is off for it
/// (HTTP/1.0, `Connection: close`, or `Transfer-Encoding` beside a `Content-Length`
/// hyper has already taken out of the headers).
fn may_close_early(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    req.version() != http::Version::HTTP_11
        || h.contains_key(http::header::TRANSFER_ENCODING)
        || has_token(h, &http::header::CONNECTION, "close")
}

/// A request being answered.
pub struct Answer<F> {
    answer: Pin<Box<F>>,
    in_flight: Option<Arc<ConnState>>,
    activity: Option<Arc<Activity>>,
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Answer<F> {
    type Output = Result<Response<Tracked<ProxyBody>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = ready!(self.answer.as_mut().poll(cx));
        // The body counts before the request stops counting: never a moment with neither.
        let activity = self.activity.take().unwrap_or_default();
        let resp = resp.map(|b| Tracked::new(b, activity));
        self.in_flight = None;
        Poll::Ready(Ok(resp))
    }
}

fn builders(limits: &Limits) -> (http1::Builder, http2::Builder<TokioExecutor>) {
    let mut h1 = http1::Builder::new();
    // `Watched` bounds the wait for a request head, with one timer per connection: hyper's
    // own timer costs an allocation, a clock read and a timer-wheel insert per request.
    h1.header_read_timeout(None)
        // The head must fit the read buffer; past it hyper answers 431. The body streams
        // through in chunks of at most this size.
        .max_buf_size(limits.max_header_bytes as usize);
    if limits.max_headers != HYPER_MAX_HEADERS {
        h1.max_headers(limits.max_headers as usize);
    }
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams);
    (h1, h2)
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
    stream: Rewind<S>,
    timer: Pin<Box<Sleep>>,
    header_read: Duration,
    idle: Duration,
    /// Alive beyond this one while requests are in flight (`Weak::upgrade` in the
    /// service) or a tunnel runs.
    state: Arc<ConnState>,
    /// Requests started (the service counts them), and writes flushed (counted here).
    activity: Arc<Activity>,
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
    fn new(stream: Rewind<S>, timing: Timing) -> (Self, Weak<ConnState>) {
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
            activity: Arc::default(),
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
        if !self.serving && self.activity.requests() > 0 {
            // The first request came: from now on the protocol's period applies. Once per
            // connection.
            self.serving = true;
            self.rearm();
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let in_flight = Arc::strong_count(&self.state) > 1;
            let requests = self.activity.requests();
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

impl<S: AsyncRead + Unpin> Watched<S> {
    /// Reads from the stream behind the bytes put in front, under the same checks.
    fn poll_behind_front(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream.stream).poll_read(cx, buf);
        self.checked(cx, r, buf.filled().len() > before)
    }

    fn checked(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<()>>, got: bool) -> Poll<io::Result<()>> {
        match r {
            Poll::Pending => match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => {
                self.read |= got;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.checked(cx, r, buf.filled().len() > before)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.activity.wrote();
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
        self.activity.wrote();
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
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            self.activity.flushed();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        limits: Limits,
    }

    /// A connection's task is as large as its largest state, for as long as it lives: a
    /// parked plain HTTP/1.1 connection must not carry room for its first-byte wait, its
    /// start, rustls's connection, an HTTP/2 connection or a tunnel.
    #[tokio::test]
    async fn a_parked_connection_s_futures_stay_small() {
        let (h1, h2) = builders(&Flags::parse_from(["gatehouse"]).limits);
        let shared = Arc::new(Shared { h1, h2, ticks: Arc::default(), parked: Parked::default(), gauges: None });
        let (_stop, draining) = watch::channel(false);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = || tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let peer = listener.local_addr().unwrap();
        let timing = Timing {
            first_request_by: Instant::now(),
            header_read: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        // As the gateway's, it holds an `Arc`.
        let gateway = Arc::new(());
        let handler = move |_: Request<Incoming>, _: Conn| {
            let _gateway = gateway.clone();
            async { Response::new(ProxyBody::empty()) }
        };
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let task = connection(
            shared.clone(),
            draining.clone(),
            connect().await.unwrap(),
            peer,
            None,
            timing,
            handler.clone(),
            slot,
        );
        let (io, state) = Watched::new(Rewind::new(connect().await.unwrap()), timing);
        let conn = Conn::new(peer, false, ClientCert::default());
        let svc = Svc { handler, conn, busy: state.clone(), activity: io.activity.clone() };
        let started = Started { io, state, svc, h2: false };
        let http1 = serve_started(&shared, draining, started);
        // Measured: 216 and 368 B (720 + 192 + 1,480 B in three pieces at first; 216 and
        // 496 B while a parked connection waited on the stop signal's `changed()`). The
        // second is in jemalloc's 384 B size class, the one below 448 and 512.
        assert!(std::mem::size_of_val(&task) <= 384, "{} B", std::mem::size_of_val(&task));
        assert!(std::mem::size_of_val(&*http1) <= 384, "{} B", std::mem::size_of_val(&*http1));
    }
}
