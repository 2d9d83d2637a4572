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
//! Connections idle for `IDLE_TIMEOUT` are closed by one task per pool that ticks a few
//! times per timeout; a connection records the tick it was put back at, so the request
//! path reads no clock.

use std::{
    collections::HashMap,
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
use tower_service::Service;

use crate::{egress::GuardedConnector, workers};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a request body must be to go on a pooled connection (the gateway's is
/// `body::ProxyBody`; generic so that `body` can hold a `Lease` without a circle).
pub trait SendBody: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<B: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static> SendBody for B {}

/// An idle connection older than this is closed (hyper-util's pool used 90 s too).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Ticks per idle timeout: a connection lives between 2/3 and all of it once idle.
const TICKS: u32 = 3;
/// Idle connections kept per target; more are closed when they come back.
const MAX_IDLE_PER_TARGET: usize = 1024;

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
    reaper: AtomicBool,
}

/// One target's idle connections, per worker, most recently used last.
pub struct TargetPool<B> {
    idle: Box<[PerWorker<IdleList<B>>]>,
    tick: Arc<AtomicU32>,
    /// `http://host:port` for the connector, which reads scheme, host and port from it.
    dial: Uri,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: u32,
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
}

impl<B> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("target", &self.pool.dial).finish_non_exhaustive()
    }
}

impl<B: SendBody> Lease<B> {
    /// The response body reached its end: the connection can carry the next request.
    pub fn release(self) {
        self.pool.checkin(self.sender, self.worker);
    }
}

impl<B: SendBody> Pool<B> {
    pub fn new(connector: GuardedConnector) -> Self {
        Self::with_idle_timeout(connector, IDLE_TIMEOUT)
    }

    pub fn with_idle_timeout(connector: GuardedConnector, idle: Duration) -> Self {
        Self(Arc::new(Inner {
            connector,
            by_target: Mutex::default(),
            tick: Arc::default(),
            tick_every: idle / TICKS,
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
    /// never reached the upstream, so this is not a retry of anything it saw.
    pub async fn send(
        &self,
        target: &Arc<TargetPool<B>>,
        mut req: Request<B>,
    ) -> Result<(Response<Incoming>, Lease<B>), SendError> {
        let worker = workers::index();
        loop {
            let picked = std::future::poll_fn(|cx| Poll::Ready(target.checkout(cx, worker))).await;
            let Some(mut sender) = picked else { break };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease { sender, pool: target.clone(), worker })),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(target).await?;
        let resp = sender.send_request(req).await.map_err(SendError::Request)?;
        Ok((resp, Lease { sender, pool: target.clone(), worker }))
    }

    async fn connect(&self, target: &TargetPool<B>) -> Result<SendRequest<B>, SendError> {
        self.start_reaper();
        let mut connector = self.0.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(SendError::Connect)?;
        let io = connector.call(target.dial.clone()).await.map_err(SendError::Connect)?;
        let (sender, conn) = http1::handshake(io).await.map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            // Ends when the upstream closes, the sender is dropped, or the connection is
            // upgraded (the tunnel then owns it); an error was already the request's.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// One reaper per pool, started with its first connection (inside the runtime), and
    /// gone with the pool.
    fn start_reaper(&self) {
        if self.0.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Inner<B>> = Arc::downgrade(&self.0);
        let every = self.0.tick_every;
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
                    lock(&list.0).retain(|i| now.wrapping_sub(i.since) < TICKS && !i.sender.is_closed());
                }
            }
        });
    }

    #[cfg(test)]
    pub(crate) fn idle(&self, authority: &Authority) -> usize {
        lock(&self.0.by_target).get(authority).map_or(0, |t| t.idle.iter().map(|l| lock(&l.0).len()).sum())
    }
}

impl<B: SendBody> TargetPool<B> {
    /// The most recently used connection that can take a request now. A connection whose
    /// response ended while its request body is still going up (an upstream that answered
    /// early) is busy until the upload ends: it is put back at the far end, to be handed
    /// out once its dispatcher wants a request again, rather than waited on.
    fn checkout(&self, cx: &mut Context<'_>, worker: usize) -> Option<SendRequest<B>> {
        let mut idle = lock(self.list(worker));
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut i) = idle.pop() {
            match i.sender.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    found = Some(i.sender);
                    break;
                }
                Poll::Ready(Err(_)) => {}
                Poll::Pending => busy.push(i),
            }
        }
        if !busy.is_empty() {
            idle.splice(0..0, busy);
        }
        found
    }

    /// `worker`'s idle list; a thread that is not a worker of this pool's count uses the first.
    fn list(&self, worker: usize) -> &IdleList<B> {
        let list = self.idle.get(worker).or_else(|| self.idle.first());
        // `Pool::target` makes at least one list: `workers::count()` is never 0.
        &list.expect("a target pool has a list per worker").0
    }

    fn checkin(&self, sender: SendRequest<B>, worker: usize) {
        if sender.is_closed() {
            return;
        }
        let since = self.tick.load(Ordering::Relaxed);
        let mut idle = lock(self.list(worker));
        if idle.len() < MAX_IDLE_PER_TARGET {
            idle.push(Idle { sender, since });
        }
    }
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
    /// the ones it saw closed by the gateway.
    struct Upstream {
        authority: Authority,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    async fn upstream(answer: Answer) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
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
        Upstream { authority: addr.to_string().parse().expect("authority"), accepted, closed }
    }

    fn pool(idle: Duration) -> TestPool {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(
            crate::egress::GuardedResolver::default(),
        );
        Pool::with_idle_timeout(GuardedConnector::new(connector), idle)
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
        let (resp, lease) = pool.send(t, request(up)).await.expect("answered");
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
            assert_eq!(pool.idle(&up.authority), 1);
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
        let copy =
            Upstream { authority: up.authority.clone(), accepted: up.accepted.clone(), closed: up.closed.clone() };
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
        assert_eq!(pool.idle(&up.authority), 2);
        let _ = to_worker.send(());
        worker.finish(Duration::from_secs(20)).await;
    }

    #[tokio::test]
    async fn a_lease_dropped_with_its_body_half_read_closes_the_connection() {
        let up = upstream(Answer::Stalled).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        let (resp, lease) = pool.send(&t, request(&up)).await.expect("answered");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop((body, lease));
        wait_until("the upstream sees the connection closed", || up.closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(pool.idle(&up.authority), 0, "the rest of that response is never read as the next one");
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
        let (resp, lease) = pool.send(&t, req).await.expect("answered before the upload ended");
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "hello");
        lease.release();
        upload.send_data(Bytes::from_static(b"part of it")).await.expect("still uploading");
        // Handed this connection, the next request would wait for an upload that never ends.
        let next = tokio::time::timeout(Duration::from_secs(20), get(&pool, &t, &up)).await;
        assert_eq!(next.expect("not queued behind the upload"), "hello");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle(&up.authority), 2, "the busy one waits in the pool for its upload to end");
        drop(upload);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let up = upstream(Answer::Fixed).await;
        let pool = pool(Duration::from_millis(300));
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        wait_until("the idle connection is closed", || up.closed.load(Ordering::SeqCst) == 1).await;
        assert_eq!(pool.idle(&up.authority), 0);
        assert_eq!(get(&pool, &t, &up).await, "hello", "a new connection serves after it");
    }

    #[tokio::test]
    async fn targets_no_api_holds_are_forgotten_with_their_connections() {
        let up = upstream(Answer::Fixed).await;
        let pool = pool(IDLE_TIMEOUT);
        let t = pool.target(&up.authority);
        assert_eq!(get(&pool, &t, &up).await, "hello");
        pool.prune();
        assert_eq!(pool.idle(&up.authority), 1, "a compiled target still holds it");
        drop(t);
        pool.prune();
        wait_until("the idle connection is closed", || up.closed.load(Ordering::SeqCst) == 1).await;
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
