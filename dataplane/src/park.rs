//! Parking idle HTTP/1.1 connections: one that has had no request for a whole tick (between
//! one and two seconds) hands its hyper connection back, and with it hyper's read and write
//! buffers (8 KiB each) and its state machine, and waits for the client's next bytes as a
//! small task, like a connection that never sent a request. The next request gets a new
//! hyper connection on the same socket. A busy connection never parks, so the request path
//! pays only a counter and a flag; a connection holds buffers only while it is in use.
//!
//! What the server needs to know that hyper does not say is when hyper is idle: no request
//! being answered (`server`'s own count), no response body left to send ([`Activity`]'s
//! count of live bodies, [`Tracked`]), and nothing left in hyper's write buffer (the
//! socket was flushed after the last write). hyper closes only a connection it finds idle
//! when asked (a busy one is told to close after its response instead), so the server
//! asks and parks only if hyper is done at once; anything else ends the connection.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often idle connections are looked at; one is parked at the second tick it is seen
/// idle through.
pub const TICK: Duration = Duration::from_secs(1);

/// What one connection's parts tell the server about hyper's state: requests started,
/// response bodies still being sent, and whether the socket was flushed after the last
/// write.
#[derive(Debug)]
pub struct Activity {
    requests: AtomicU32,
    bodies: AtomicU32,
    flushed: AtomicBool,
    /// Cleared for good by a request after which hyper may end the connection on its own.
    parkable: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            requests: AtomicU32::new(0),
            bodies: AtomicU32::new(0),
            flushed: AtomicBool::new(true),
            parkable: AtomicBool::new(true),
        }
    }
}

impl Activity {
    /// A request started.
    pub fn started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests started so far.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn wrote(&self) {
        self.flushed.store(false, Ordering::Relaxed);
    }

    pub fn flushed(&self) {
        self.flushed.store(true, Ordering::Relaxed);
    }

    /// The connection is never to be parked. hyper may end a connection whose request
    /// turned keep-alive off (HTTP/1.0, `Connection: close`, `Transfer-Encoding` with
    /// `Content-Length`) as soon as it has answered, with that request's body still
    /// arriving: what follows on the socket is then no next request, and a new hyper
    /// connection must never read it as one. And after a request that asked for an upgrade
    /// (or a `CONNECT`), hyper's end of a connection is no longer an idle one.
    pub fn never_park(&self) {
        self.parkable.store(false, Ordering::Relaxed);
    }

    pub fn parkable(&self) -> bool {
        self.parkable.load(Ordering::Relaxed)
    }

    /// No response body left and nothing unflushed.
    pub fn quiet(&self) -> bool {
        self.bodies.load(Ordering::Relaxed) == 0 && self.flushed.load(Ordering::Relaxed)
    }
}

/// A response body that counts as activity on its connection until hyper drops it, which
/// it does once the body's last frame is in its write buffer (or the connection ended).
pub struct Tracked<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Tracked<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Self {
        activity.bodies.fetch_add(1, Ordering::Relaxed);
        Self { body, activity }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.activity.bodies.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The ticks of one listener on one worker: an idle connection leaves its waker for the
/// next tick, at most once per tick, so a busy connection registers once a second however
/// many requests it carries.
#[derive(Default)]
pub struct Ticks {
    epoch: AtomicU64,
    waiting: Mutex<Vec<Waker>>,
}

impl Ticks {
    /// Wakes every connection that asked, once per [`TICK`], for as long as it runs.
    pub async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            self.tick();
        }
    }

    fn tick(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        for w in waiting {
            w.wake();
        }
    }

    fn now(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    fn wake_at_next(&self, w: &Waker) {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner).push(w.clone());
    }
}

/// One connection's view of its idleness across ticks.
#[derive(Default)]
pub struct Idle {
    /// The tick at which it was first seen idle, and its request count then.
    since: Option<(u64, u32)>,
    /// The last tick it asked to be woken at.
    asked: Option<u64>,
}

impl Idle {
    /// Called after each poll of the connection that left it waiting. `quiet`: nothing in
    /// flight and nothing to write; `requests`: requests started so far. Whether the
    /// connection has been idle since before the previous tick, so it is to be parked.
    pub fn due(&mut self, ticks: &Ticks, cx: &Context<'_>, quiet: bool, requests: u32) -> bool {
        if !quiet {
            self.since = None;
            return false;
        }
        let now = ticks.now();
        match self.since {
            Some((at, seen)) if seen == requests => {
                if now >= at + 2 {
                    return true;
                }
            }
            _ => self.since = Some((now, requests)),
        }
        if self.asked != Some(now) {
            self.asked = Some(now);
            ticks.wake_at_next(cx.waker());
        }
        false
    }
}

/// The parked connections of one listener, so that a drain reaches them: each waits with
/// its waker in a shared slab (a key of its own) rather than on the stop signal's
/// `changed()`, whose future (120 B) would sit in every parked task.
#[derive(Default)]
pub struct Parked {
    inner: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    draining: bool,
    wakers: Slab<Waker>,
}

impl Parked {
    /// Wakes every connection waiting, and ends every wait from now on at once.
    pub fn drain(&self) {
        let wakers = {
            let mut inner = self.lock();
            inner.draining = true;
            std::mem::take(&mut inner.wakers)
        };
        for (_, w) in wakers {
            w.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One parked connection's place among [`Parked`]'s waiters, given up when dropped.
pub struct Waiting<'a> {
    parked: &'a Parked,
    key: Option<usize>,
}

impl<'a> Waiting<'a> {
    pub fn new(parked: &'a Parked) -> Self {
        Self { parked, key: None }
    }

    /// Whether the listener drains; if not, `cx` is woken when it starts to.
    pub fn draining(&mut self, cx: &Context<'_>) -> bool {
        let mut inner = self.parked.lock();
        if inner.draining {
            return true;
        }
        match self.key.and_then(|k| inner.wakers.get_mut(k)) {
            Some(w) => w.clone_from(cx.waker()),
            None => self.key = Some(inner.wakers.insert(cx.waker().clone())),
        }
        false
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            // Gone already if a drain took the waiters.
            self.parked.lock().wakers.try_remove(k);
        }
    }
}

/// A stream with bytes already read from it put back in front: what a parked connection
/// read while waiting, and what hyper had read past its last request, go to the next
/// reader first.
pub struct Rewind<S> {
    pub stream: S,
    front: Bytes,
}

impl<S> Rewind<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, front: Bytes::new() }
    }

    pub fn front(&self) -> &[u8] {
        &self.front
    }

    /// Puts `bytes` in front of what is there.
    pub fn put_back(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.front.is_empty() {
            self.front = bytes;
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.front.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.front);
            self.front = joined.freeze();
        }
    }

    /// Appends `bytes` after what is in front (they were read after it).
    pub fn append(&mut self, bytes: &[u8]) {
        let mut joined = BytesMut::with_capacity(self.front.len() + bytes.len());
        joined.extend_from_slice(&self.front);
        joined.extend_from_slice(bytes);
        self.front = joined.freeze();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.front.is_empty() {
            let n = self.front.len().min(buf.remaining());
            buf.put_slice(&self.front[..n]);
            self.front.advance(n);
            if self.front.is_empty() {
                // An empty view still holds its allocation.
                self.front = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::task::Wake;

    use tokio::io::AsyncReadExt;

    use super::*;

    struct Count(AtomicU32);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A waker that counts its wakes.
    fn counting() -> (Arc<Count>, Waker) {
        let woken = Arc::new(Count(AtomicU32::new(0)));
        (woken.clone(), Waker::from(woken))
    }

    #[test]
    fn a_drain_wakes_each_parked_connection_once_and_ends_every_later_wait() {
        let parked = Parked::default();
        let (woken, waker) = counting();
        let cx = Context::from_waker(&waker);
        let (mut a, mut b) = (Waiting::new(&parked), Waiting::new(&parked));
        // Polled again and again while parked: one waker each, not one per poll.
        for _ in 0..3 {
            assert!(!a.draining(&cx) && !b.draining(&cx));
        }
        assert_eq!(parked.lock().wakers.len(), 2);
        // One that unparks gives its place up.
        drop(b);
        assert_eq!(parked.lock().wakers.len(), 1);
        parked.drain();
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
        assert!(a.draining(&cx));
        // One that parks after the drain began does not wait.
        assert!(Waiting::new(&parked).draining(&cx));
        drop(a);
        assert_eq!(parked.lock().wakers.len(), 0);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_connection_parks_at_the_second_tick_it_stays_idle_through_and_asks_once_a_tick() {
        let ticks = Ticks::default();
        let (woken, waker) = counting();
        let cx = Context::from_waker(&waker);
        let mut idle = Idle::default();
        // Many polls within one tick: one waker left.
        for _ in 0..10 {
            assert!(!idle.due(&ticks, &cx, true, 1));
        }
        assert_eq!(ticks.waiting.lock().unwrap().len(), 1);
        ticks.tick();
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
        assert!(!idle.due(&ticks, &cx, true, 1), "idle for less than a whole tick");
        ticks.tick();
        assert!(idle.due(&ticks, &cx, true, 1));
    }

    #[test]
    fn a_request_or_a_body_in_between_starts_the_wait_again() {
        let ticks = Ticks::default();
        let cx = Context::from_waker(Waker::noop());
        let mut idle = Idle::default();
        assert!(!idle.due(&ticks, &cx, true, 1));
        ticks.tick();
        ticks.tick();
        // A request came and went between the polls.
        assert!(!idle.due(&ticks, &cx, true, 2));
        ticks.tick();
        assert!(!idle.due(&ticks, &cx, false, 2), "a body still being sent");
        assert!(!idle.due(&ticks, &cx, true, 2));
        ticks.tick();
        assert!(!idle.due(&ticks, &cx, true, 2));
        ticks.tick();
        assert!(idle.due(&ticks, &cx, true, 2));
    }

    #[test]
    fn activity_is_quiet_only_with_no_body_alive_and_the_socket_flushed() {
        let a = Arc::new(Activity::default());
        assert!(a.quiet());
        let body = Tracked::new(http_body_util::Empty::<Bytes>::new(), a.clone());
        assert!(!a.quiet());
        drop(body);
        assert!(a.quiet());
        a.wrote();
        assert!(!a.quiet());
        a.flushed();
        assert!(a.quiet());
    }

    #[tokio::test]
    async fn rewound_bytes_come_first_in_the_order_they_were_read() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut r = Rewind::new(server);
        r.append(b"GE");
        r.append(b"T /");
        r.put_back(Bytes::from_static(b"[hyper's]"));
        tokio::io::AsyncWriteExt::write_all(&mut client, b" HTTP/1.1").await.unwrap();
        drop(client);
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "[hyper's]GET / HTTP/1.1");
    }
}
