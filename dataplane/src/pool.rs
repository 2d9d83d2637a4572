//! The keep-alive pool of `http://` HTTP/1.1 upstream connections, built on hyper's
//! connection-level client (`hyper::client::conn::http1`).
//!
//! Each compiled target finds its `TargetPool` once (by authority, as `TargetSlots` does)
//! and keeps it, so a request pays no lookup and no hashing: it pops the most recently
//! used connection off a vector behind an uncontended mutex, sends in origin form with the
//! `Host` its target computed once, and puts the connection back when the response body
//! has been read to its end. A body dropped half-read takes its connection with it: what
//! is left of the response would be read as the next one's.
//!
//! Idle connections are kept per worker (`workers`): a connection's task runs on the
//! worker that made it, so a request on another worker would hand every read and write
//! across threads. A worker with none idle connects anew rather than borrow one.
//!
//! One task per pool ticks every second (`park::TICK`); a connection records the tick it
//! was put back at, so the request path reads no clock. A connection idle through a whole
//! tick is parked, as the server parks its idle clients: hyper's connection, with its read
//! and write buffers and its request channel (about 50 KiB together, measured), hands its
//! socket back and ends, and the pool keeps just the socket. The next request on it starts
//! a new hyper connection on the same socket once a peek shows the upstream neither closed
//! it nor sent anything unasked. A connection idle for `IDLE_TIMEOUT` is closed.
//!
//! Only a connection the pool parked from its idle list is ever reused that way: one whose
//! hyper connection ended for any other reason (the upstream closed it, a body was dropped
//! half-read, an error) may stop mid-message and is closed. An upgrade request (WebSocket)
//! gets a connection of its own, never pooled: hyper hands an upgraded socket to the
//! tunnel only when it drives the connection for upgrades, which cannot park.

use std::{
    collections::HashMap,
    io,
    mem::MaybeUninit,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response, Uri, uri::Authority};
use http_body::Body;
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tower_service::Service;

use crate::{egress::GuardedConnector, park, workers};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a request body must be to go on a pooled connection (the gateway's is
/// `body::ProxyBody`; generic so that `body` can hold a `Lease` without a circle).
pub trait SendBody: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<B: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static> SendBody for B {}

/// An idle connection older than this is closed (hyper-util's pool used 90 s too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Ticks an idle connection stays live: it is parked once idle through a whole tick.
const PARK_AFTER: u32 = 2;
/// Idle connections kept per target; more are closed when they come back.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// What the connector dials.
type Io = TokioIo<TcpStream>;

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the upstream failed: {0}")]
    Connect(#[source] BoxError),
    #[error("the upstream HTTP/1 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the upstream request failed: {0}")]
    Request(#[source] hyper::Error),
}

/// The pool every `http://` HTTP/1.1 target of every API shares; cheap to clone.
pub struct Pool<B>(Arc<Inner<B>>);

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct Inner<B> {
    connector: GuardedConnector,
    by_target: Mutex<HashMap<Authority, Arc<TargetPool<B>>>>,
    /// Advanced by the reaper; what idle connections are stamped with.
    tick: Arc<AtomicU32>,
    tick_every: Duration,
    /// `IDLE_TIMEOUT` in ticks.
    idle_ticks: u32,
    reaper: AtomicBool,
}

/// One target's idle connections, per worker, most recently used last.
pub struct TargetPool<B> {
    idle: Box<[PerWorker<IdleList<B>>]>,
    tick: Arc<AtomicU32>,
    /// `http://host:port` for the connector, which reads scheme, host and port from it.
    dial: Uri,
}

enum Idle<B> {
    /// hyper's connection runs in its task, buffers and all.
    Live { sender: SendRequest<B>, parking: Arc<Parking>, since: u32 },
    /// Just the socket, which hyper's connection gave back when the pool parked it.
    Parked { io: Io, since: u32 },
}

impl<B> Idle<B> {
    fn since(&self) -> u32 {
        match self {
            Self::Live { since, .. } | Self::Parked { since, .. } => *since,
        }
    }
}

/// What a pooled connection's task and the pool share: the tick the connection has been
/// idle since, set once the pool parks it (by dropping its sender).
struct Parking(AtomicU32);

/// `Parking`'s value before the pool parks the connection; a tick that would wrap to it is
/// 136 years away.
const NOT_PARKED: u32 = u32::MAX;

impl Default for Parking {
    fn default() -> Self {
        Self(AtomicU32::new(NOT_PARKED))
    }
}

/// A connection taken off an idle list.
enum Picked<B> {
    Live(SendRequest<B>, Arc<Parking>),
    Parked(Io),
}

type IdleList<B> = Mutex<Vec<Idle<B>>>;

/// One worker's share, on cache lines of its own: workers never write each other's.
#[repr(align(128))]
struct PerWorker<T>(T);

/// A connection on loan to one request, back in its pool when the response body ends
/// (where it is handed out again once hyper is done sending the request too); dropped
/// instead, it closes.
pub struct Lease<B> {
    sender: SendRequest<B>,
    pool: Arc<TargetPool<B>>,
    /// The worker whose runtime drives the connection.
    worker: usize,
    /// `None` on an upgrade request's connection, which is never pooled.
    parking: Option<Arc<Parking>>,
}

impl<B> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("target", &self.pool.dial).finish_non_exhaustive()
    }
}

impl<B: SendBody> Lease<B> {
    /// The response body reached its end: the connection can carry the next request.
    pub fn release(self) {
        if let Some(parking) = self.parking {
            self.pool.checkin(self.sender, parking, self.worker);
        }
    }
}

impl<B: SendBody> Pool<B> {
    pub fn new(connector: GuardedConnector) -> Self {
        Self::with_idle_timeout(connector, IDLE_TIMEOUT)
    }

    /// Idle connections closed after `idle`, parked after a tick of `park::TICK` (or a
    /// third of `idle`, if that is shorter).
    pub fn with_idle_timeout(connector: GuardedConnector, idle: Duration) -> Self {
        Self::with_tick(connector, idle, park::TICK.min(idle / 3))
    }

    fn with_tick(connector: GuardedConnector, idle: Duration, tick: Duration) -> Self {
        let tick = tick.max(Duration::from_millis(1));
        let idle_ticks = u32::try_from(idle.as_nanos().div_ceil(tick.as_nanos())).unwrap_or(u32::MAX - 1);
        Self(Arc::new(Inner {
            connector,
            by_target: Mutex::default(),
            tick: Arc::default(),
            tick_every: tick,
            idle_ticks: idle_ticks.max(1),
            reaper: AtomicBool::new(false),
        }))
    }

    /// The pool of `authority`'s connections; a compiled target asks once and keeps it.
    pub fn target(&self, authority: &Authority) -> Arc<TargetPool<B>> {
        let mut map = lock(&self.0.by_target);
        map.entry(authority.clone())
            .or_insert_with(|| {
                let dial = Uri::builder()
                    .scheme("http")
                    .authority(authority.clone())
                    .path_and_query("/")
                    .build()
                    .unwrap_or_default();
                let idle = (0..workers::count()).map(|_| PerWorker(Mutex::default())).collect();
                Arc::new(TargetPool { idle, tick: self.0.tick.clone(), dial })
            })
            .clone()
    }

    /// Forgets targets no compiled API and no response in flight holds, closing their
    /// idle connections.
    pub fn prune(&self) {
        lock(&self.0.by_target).retain(|_, t| Arc::strong_count(t) > 1);
    }

    /// Sends `req` (origin form, `Host` set) on an idle connection of `target`, else on a
    /// new one. A pooled connection that closed before taking the request (the upstream
    /// ended it while idle) hands the request back and the next one is tried: the request
    /// never reached the upstream, so this is not a retry of anything it saw. An
    /// `upgrade` request goes on a new connection that is never pooled. (An `async move`
    /// block, so that the request is kept once: see `Gateway::handle`.)
    #[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
    pub fn send(
        &self,
        target: &Arc<TargetPool<B>>,
        mut req: Request<B>,
        upgrade: bool,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease<B>), SendError>> + Send {
        async move {
            let worker = workers::index();
            if upgrade {
                let (mut sender, conn) =
                    http1::handshake(self.dial(target).await?).await.map_err(SendError::Handshake)?;
                // Ends when the upstream closes or the sender is dropped, or hands the socket to
                // the tunnel; an error was already the request's.
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                let resp = sender.send_request(req).await.map_err(SendError::Request)?;
                return Ok((resp, Lease { sender, pool: target.clone(), worker, parking: None }));
            }
            loop {
                let picked = std::future::poll_fn(|cx| Poll::Ready(target.checkout(cx, worker))).await;
                let (mut sender, parking) = match picked {
                    None => break,
                    Some(Picked::Live(sender, parking)) => (sender, parking),
                    Some(Picked::Parked(io)) => match target.drive(io, worker).await {
                        Ok(driven) => driven,
                        Err(_) => continue,
                    },
                };
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        return Ok((resp, Lease { sender, pool: target.clone(), worker, parking: Some(parking) }));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(back) => req = back,
                        None => return Err(SendError::Request(e.into_error())),
                    },
                }
            }
            let (mut sender, parking) = target.drive(self.dial(target).await?, worker).await?;
            let resp = sender.send_request(req).await.map_err(SendError::Request)?;
            Ok((resp, Lease { sender, pool: target.clone(), worker, parking: Some(parking) }))
        }
    }

    async fn dial(&self, target: &TargetPool<B>) -> Result<Io, SendError> {
        self.start_reaper();
        let mut connector = self.0.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(SendError::Connect)?;
        connector.call(target.dial.clone()).await.map_err(SendError::Connect)
    }

    /// One reaper per pool, started with its first connection (inside the runtime), and
    /// gone with the pool.
    fn start_reaper(&self) {
        if self.0.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Inner<B>> = Arc::downgrade(&self.0);
        let (every, idle_ticks) = (self.0.tick_every, self.0.idle_ticks);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            // After a stall, one tick, not a burst that would age every idle connection at once.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let now = inner.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                let targets: Vec<Arc<TargetPool<B>>> = lock(&inner.by_target).values().cloned().collect();
                drop(inner);
                for list in targets.iter().flat_map(|t| t.idle.iter()) {
                    lock(&list.0).retain(|i| {
                        let idle = now.wrapping_sub(i.since());
                        match i {
                            _ if idle >= idle_ticks => false,
                            Idle::Live { sender, .. } if sender.is_closed() => false,
                            // Out of the list, the sender is dropped: hyper's connection ends
                            // and its task puts the socket back.
                            Idle::Live { sender, parking, since } if idle >= PARK_AFTER && sender.is_ready() => {
                                parking.0.store(*since, Ordering::Relaxed);
                                false
                            }
                            Idle::Live { .. } => true,
                            Idle::Parked { io, .. } => clean(io, Peek::IfReadable),
                        }
                    });
                }
            }
        });
    }

    /// Idle connections of every target: live ones and parked ones.
    pub fn idle(&self) -> (usize, usize) {
        let targets: Vec<Arc<TargetPool<B>>> = lock(&self.0.by_target).values().cloned().collect();
        let mut counts = (0, 0);
        for list in targets.iter().flat_map(|t| t.idle.iter()) {
            for i in lock(&list.0).iter() {
                match i {
                    Idle::Live { .. } => counts.0 += 1,
                    Idle::Parked { .. } => counts.1 += 1,
                }
            }
        }
        counts
    }

    #[cfg(test)]
    fn idle_at(&self, authority: &Authority) -> usize {
        self.count(authority, |_| true)
    }

    #[cfg(test)]
    fn parked(&self, authority: &Authority) -> usize {
        self.count(authority, |i| matches!(i, Idle::Parked { .. }))
    }

    #[cfg(test)]
    fn count(&self, authority: &Authority, which: impl Fn(&Idle<B>) -> bool) -> usize {
        let map = lock(&self.0.by_target);
        map.get(authority).map_or(0, |t| t.idle.iter().map(|l| lock(&l.0).iter().filter(|i| which(i)).count()).sum())
    }
}

impl<B: SendBody> TargetPool<B> {
    /// The most recently used connection that can take a request now. A connection whose
    /// response ended while its request body is still going up (an upstream that answered
    /// early) is busy until the upload ends: it is put back at the far end, to be handed
    /// out once its dispatcher wants a request again, rather than waited on.
    fn checkout(&self, cx: &mut Context<'_>, worker: usize) -> Option<Picked<B>> {
        let mut idle = lock(self.list(worker));
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(i) = idle.pop() {
            match i {
                Idle::Live { mut sender, parking, since } => match sender.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        found = Some(Picked::Live(sender, parking));
                        break;
                    }
                    Poll::Ready(Err(_)) => {}
                    Poll::Pending => busy.push(Idle::Live { sender, parking, since }),
                },
                Idle::Parked { io, .. } if clean(&io, Peek::Now) => {
                    found = Some(Picked::Parked(io));
                    break;
                }
                Idle::Parked { .. } => {}
            }
        }
        if !busy.is_empty() {
            idle.splice(0..0, busy);
        }
        found
    }

    /// Starts hyper's connection on `io`, driven by a task on this worker; once the pool
    /// parks it, the task puts the socket back.
    async fn drive(self: &Arc<Self>, io: Io, worker: usize) -> Result<(SendRequest<B>, Arc<Parking>), SendError> {
        let (sender, conn) = http1::handshake(io).await.map_err(SendError::Handshake)?;
        let parking = Arc::new(Parking::default());
        let (asked, pool) = (parking.clone(), Arc::downgrade(self));
        tokio::spawn(async move {
            // Ends when the upstream closes, the sender is dropped (with a lease, or by the
            // pool to park it), or on an error, which was already the request's.
            let Ok(parts) = conn.without_shutdown().await else { return };
            let since = asked.0.load(Ordering::Relaxed);
            // Parked from the idle list, hyper's connection ended between two messages;
            // anything it read past the last one was not asked for.
            if since != NOT_PARKED
                && parts.read_buf.is_empty()
                && let Some(pool) = pool.upgrade()
            {
                pool.put_parked(parts.io, since, worker);
            }
        });
        Ok((sender, parking))
    }

    /// `worker`'s idle list; a thread that is not a worker of this pool's count uses the first.
    fn list(&self, worker: usize) -> &IdleList<B> {
        let list = self.idle.get(worker).or_else(|| self.idle.first());
        // `Pool::target` makes at least one list: `workers::count()` is never 0.
        &list.expect("a target pool has a list per worker").0
    }

    fn checkin(&self, sender: SendRequest<B>, parking: Arc<Parking>, worker: usize) {
        if sender.is_closed() {
            return;
        }
        let since = self.tick.load(Ordering::Relaxed);
        let mut idle = lock(self.list(worker));
        if idle.len() < MAX_IDLE_PER_TARGET {
            idle.push(Idle::Live { sender, parking, since });
        }
    }

    /// A parked socket goes among the idle connections by age, most recent last, so that
    /// live ones are handed out first.
    fn put_parked(&self, io: Io, since: u32, worker: usize) {
        let mut idle = lock(self.list(worker));
        if idle.len() < MAX_IDLE_PER_TARGET {
            let at = idle.partition_point(|i| i.since() <= since);
            idle.insert(at, Idle::Parked { io, since });
        }
    }
}

/// When a parked socket's peek costs a system call.
#[derive(Clone, Copy)]
enum Peek {
    /// Always: before a request goes on it, whatever the runtime has seen of the socket.
    Now,
    /// Only once the runtime has seen it readable: the reaper's sweep, once a tick.
    IfReadable,
}

/// Whether a parked socket is still open with nothing unread: an upstream may close an
/// idle connection, and what it sent unasked must never be read as the next request's
/// response.
fn clean(io: &Io, when: Peek) -> bool {
    let stream = io.inner();
    let peek = || SockRef::from(stream).peek(&mut [MaybeUninit::uninit(); 1]);
    let peeked = match when {
        Peek::Now => peek(),
        Peek::IfReadable => stream.try_io(Interest::READABLE, peek),
    };
    matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The `Host` an upstream request carries: the target's host, and its port unless it is
/// the scheme's default (as a browser would send it).
pub fn host_header(authority: &Authority, https: bool) -> HeaderValue {
    let default = if https { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(p) if p != default => authority.as_str().rsplit('@').next().unwrap_or(authority.as_str()),
        _ => authority.host(),
    };
    HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves a vector or a map that is still whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Channel, Empty, combinators::BoxBody};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::Notify,
    };

    use super::*;

    type TestBody = BoxBody<Bytes, Infallible>;
    type TestPool = Pool<TestBody>;

    /// How the loopback upstream answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `content-length: 5`, connection kept open.
        Fixed,
        /// A chunked body, connection kept open.
        Chunked,
        /// `content-length: 5`, then the upstream closes without saying so first.
        ThenClose,
        /// Headers for 1 MiB, 16 KiB of it, and then nothing until the client goes.
        Stalled,
        /// `content-length: 5` at once, then reads whatever comes, answering nothing more.
        Early,
    }

    /// A real HTTP/1.1 upstream on loopback that counts the connections it accepted and
    /// the ones it saw closed by the gateway. Told to, a connection waiting for a request
    /// closes (`hang_up`), or sends a response nobody asked for (`unasked`).
    #[derive(Clone)]
    struct Upstream {
        authority: Authority,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
        hang_up: Arc<Notify>,
        unasked: Arc<Notify>,
    }

    async fn upstream(answer: Answer) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (hang_up, unasked) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (a, c, h, u) = (accepted.clone(), closed.clone(), hang_up.clone(), unasked.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (c, h, u) = (c.clone(), h.clone(), u.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = tokio::select! {
                            n = s.read(&mut chunk) => n.unwrap_or(0),
                            () = h.notified() => 0,
                            () = u.notified() => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwrong").await;
                                continue;
                            }
                        };
                        if n == 0 {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply: &[u8] = match answer {
                                Answer::Fixed | Answer::ThenClose => {
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                                }
                                Answer::Chunked => {
                                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                }
                                Answer::Stalled => b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n",
                                Answer::Early => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                            };
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                            match answer {
                                Answer::ThenClose => return,
                                Answer::Stalled => {
                                    let _ = s.write_all(&[b'x'; 16 * 1024]).await;
                                }
                                Answer::Early => {
                                    while s.read(&mut chunk).await.is_ok_and(|n| n > 0) {}
                                    c.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Answer::Fixed | Answer::Chunked => {}
                            }
                        }
                    }
                });
            }
        });
        Upstream { authority: addr.to_string().parse().expect("authority"), accepted, closed, hang_up, unasked }
    }

    fn connector() -> GuardedConnector {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(
            crate::egress::GuardedResolver::default(),
        );
        GuardedConnector::new(connector)
    }

    /// A pool that ticks thrice per idle timeout, so that a test shorter than two thirds
    /// of it sees no connection parked.
    fn pool(idle: Duration) -> TestPool {
        Pool::with_tick(connector(), idle, idle / 3)
    }

    /// A pool that parks a connection within a tenth of a second idle.
    fn parking_pool() -> TestPool {
        Pool::with_tick(connector(), IDLE_TIMEOUT, Duration::from_millis(50))
    }

    /// Until the pool's reaper has ticked `n` more times.
    async fn ticks(pool: &TestPool, n: u32) {
        let from = pool.0.tick.load(Ordering::Relaxed);
        wait_until("the reaper ticks", || pool.0.tick.load(Ordering::Relaxed).wrapping_sub(from) >= n).await;
    }

    fn request(up: &Upstream) -> Request<TestBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, up.authority.as_str())
            .body(Empty::new().boxed())
            .expect("request")
    }

    /// Sends one request, reads the whole body and gives the connection back, as the
    /// gateway's `body::ProxyBody` does when an upstream body ends.
    async fn get(pool: &TestPool, t: &Arc<TargetPool<TestBody>>, up: &Upstream) -> String {
        let (resp, lease) = pool.send(t, request(up), false).await.expect("answered");
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        lease.release();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_whose_body_was_read_carries_the_next_request() {
        for answer in [Answer::Fixed, Answer::Chunked] {
            let up = upstream(answer).await;
            let pool = pool(IDLE_TIMEOUT);
            let t = pool.target(&up.authority);
            for _ in 0..5 {
                assert_eq!(get(&pool, &t, &up).await, "hello");
            }
            assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "one connection for five requests");
            assert_eq!(pool.idle_at(&up.authority), 1);
        }
    }

    #[tokio::test]
    async fn a_worker_reuses_only_the_connections_its_own_runtime_drives() {
        crate::workers::set_count(2);
        let up = upstream(Answer::Fixed).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        let (to_worker, go) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (done, mut from_worker) = tokio::sync::mpsc::unbounded_channel::<String>();
        let copy = up.clone();
        let worker =
            crate::workers::spawn(vec![(pool.clone(), t.clone(), copy, go)], move |i, (pool, t, up, mut go)| {
                let done = done.clone();
                async move {
                    assert_eq!((i, crate::workers::index()), (1, 1));
                    for _ in 0..2 {
                        let _ = done.send(get(&pool, &t, &up).await);
                        let _ = go.recv().await;
                    }
                }
            })
            .expect("worker 1");
        // Worker 1 made one connection; worker 0 (this thread) cannot borrow it, and makes
        // its own; worker 1 then finds its first one idle.
        assert_eq!(from_worker.recv().await.as_deref(), Some("hello"));
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        let _ = to_worker.send(());
        assert_eq!(from_worker.recv().await.as_deref(), Some("hello"));
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "worker 1 reused the connection it drives");
        assert_eq!(pool.idle_at(&up.authority), 2);
        let _ = to_worker.send(());
        worker.finish(Duration::from_secs(20)).await;
    }

    #[tokio::test]
    async fn a_lease_dropped_with_its_body_half_read_closes_the_connection() {
        let up = upstream(Answer::Stalled).await;
        let pool = parking_pool();
        let t = pool.target(&up.authority);
        let (resp, lease) = pool.send(&t, request(&up), false).await.expect("answered");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop((body, lease));
        wait_until("the upstream sees the connection closed", || up.closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(pool.idle_at(&up.authority), 0, "the rest of that response is never read as the next one");
        // hyper's connection ended with the lease; its socket is not parked either.
        ticks(&pool, 3).await;
        assert_eq!(pool.idle_at(&up.authority), 0);
    }

    #[tokio::test]
    async fn an_upstream_that_closes_idle_connections_costs_no_request() {
        let up = upstream(Answer::ThenClose).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        // Each connection is closed by the upstream right after its answer; the next request
        // finds it closed (or closing) in the pool and goes on a new one.
        for _ in 0..20 {
            assert_eq!(get(&pool, &t, &up).await, "hello");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_connection_still_sending_an_upload_answered_early_is_not_handed_out() {
        let up = upstream(Answer::Early).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        let (mut upload, body) = Channel::<Bytes, Infallible>::new(1);
        let req =
            Request::post("/").header(http::header::HOST, up.authority.as_str()).body(body.boxed()).expect("request");
        let (resp, lease) = pool.send(&t, req, false).await.expect("answered before the upload ended");
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "hello");
        lease.release();
        upload.send_data(Bytes::from_static(b"part of it")).await.expect("still uploading");
        // Handed this connection, the next request would wait for an upload that never ends.
        let next = tokio::time::timeout(Duration::from_secs(20), get(&pool, &t, &up)).await;
        assert_eq!(next.expect("not queued behind the upload"), "hello");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_at(&up.authority), 2, "the busy one waits in the pool for its upload to end");
        drop(upload);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let up = upstream(Answer::Fixed).await;
        let pool = pool(Duration::from_millis(300));
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        wait_until("the idle connection is closed", || up.closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(pool.idle_at(&up.authority), 0);
        assert_eq!(get(&pool, &t, &up).await, "hello", "a new connection serves after it");
    }

    #[tokio::test]
    async fn targets_no_api_holds_are_forgotten_with_their_connections() {
        let up = upstream(Answer::Fixed).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        pool.prune();
        assert_eq!(pool.idle_at(&up.authority), 1, "a compiled target still holds it");
        drop(t);
        pool.prune();
        wait_until("the idle connection is closed", || up.closed.load(Ordering::SeqCst) == 1).await;
    }

    #[tokio::test]
    async fn an_idle_connection_parks_and_the_next_request_goes_on_its_socket() {
        let up = upstream(Answer::Fixed).await;
        let pool = parking_pool();
        let t = pool.target(&up.authority);
        for _ in 0..3 {
            assert_eq!(get(&pool, &t, &up).await, "hello");
            wait_until("the idle connection is parked", || pool.parked(&up.authority) == 1).await;
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "one socket for the three requests");
        assert_eq!(up.closed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_parked_connection_the_upstream_closed_is_dropped() {
        let up = upstream(Answer::Fixed).await;
        let pool = parking_pool();
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        wait_until("the idle connection is parked", || pool.parked(&up.authority) == 1).await;
        up.hang_up.notify_one();
        wait_until("the upstream closed it", || up.closed.load(Ordering::SeqCst) == 1).await;
        wait_until("the pool dropped it", || pool.idle_at(&up.authority) == 0).await;
        assert_eq!(get(&pool, &t, &up).await, "hello", "a new connection serves");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_parked_connection_the_upstream_answered_unasked_is_dropped() {
        let up = upstream(Answer::Fixed).await;
        let pool = parking_pool();
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        wait_until("the idle connection is parked", || pool.parked(&up.authority) == 1).await;
        up.unasked.notify_one();
        wait_until("the pool dropped it", || pool.idle_at(&up.authority) == 0).await;
        assert_eq!(get(&pool, &t, &up).await, "hello", "the unasked answer is never read as one");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    /// The peek a parked socket gets before it carries a request is a system call of its
    /// own: it sees what came even before the runtime has.
    #[tokio::test]
    async fn a_peek_tells_a_quiet_socket_from_one_closed_or_written_to() {
        for closed in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let dialled = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
            let io = TokioIo::new(dialled);
            let (mut peer, _) = listener.accept().await.expect("accept");
            assert!(clean(&io, Peek::Now) && clean(&io, Peek::IfReadable));
            let _open = if closed {
                drop(peer);
                None
            } else {
                peer.write_all(b"x").await.expect("write");
                Some(peer)
            };
            wait_until("the peek sees it", || !clean(&io, Peek::Now)).await;
            wait_until("the runtime sees it", || !clean(&io, Peek::IfReadable)).await;
        }
    }

    #[tokio::test]
    async fn an_upgrade_request_goes_on_a_connection_of_its_own() {
        let up = upstream(Answer::Fixed).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        let (resp, lease) = pool.send(&t, request(&up), true).await.expect("answered");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "not on the idle connection");
        // The upstream answered without upgrading; the connection is still never pooled.
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "hello");
        lease.release();
        wait_until("the upgrade's connection is closed", || up.closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(pool.idle_at(&up.authority), 1);
    }

    #[test]
    fn host_names_the_port_unless_it_is_the_default() {
        let host = |a: &str, https| host_header(&a.parse().expect("authority"), https);
        assert_eq!(host("svc", false), "svc");
        assert_eq!(host("svc:80", false), "svc");
        assert_eq!(host("svc:8080", false), "svc:8080");
        assert_eq!(host("svc:443", true), "svc");
        assert_eq!(host("svc:80", true), "svc:80");
        assert_eq!(host("[::1]:8080", false), "[::1]:8080");
    }
}
