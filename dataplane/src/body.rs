//! The one body type the gateway sends either way: a streamed hyper body, or bytes the
//! gateway (or a plugin) produced. An enum rather than a boxed body: no allocation per
//! request for the common, streamed case.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{pool::Lease, slots::Slot};

#[derive(Debug)]
pub enum ProxyBody {
    Stream(Incoming),
    Full(Option<Bytes>),
    /// An upstream's body and what it holds until read to its end: a slot on its target,
    /// and the pooled connection it arrives on.
    Upstream(Incoming, Hold),
    /// A body copied into a [`Capture`] as it streams by (analytics `detailedRecording`).
    /// Boxed: only APIs that ask for it pay for its size.
    Tee(Box<Tee>),
}

/// The first bytes of a body, copied as they pass, and whether it reached its end.
#[derive(Debug, Default)]
pub struct Capture(Mutex<Captured>);

#[derive(Debug, Default)]
struct Captured {
    data: bytes::BytesMut,
    seen: u64,
    ended: bool,
}

impl Capture {
    /// What was copied so far, how many bytes passed, and whether the body ended.
    pub fn taken(&self) -> (Bytes, u64, bool) {
        // A poisoned lock only means a copy panicked half-way; what is there is still bytes.
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut c.data).freeze(), c.seen, c.ended)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A body passed through unchanged while its first `cap` bytes go to `capture`. When it
/// ends or is dropped, `then` runs once (the analytics record is sent from there).
pub struct Tee {
    inner: ProxyBody,
    capture: Arc<Capture>,
    cap: usize,
    then: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee").field("inner", &self.inner).field("capture", &self.capture).finish_non_exhaustive()
    }
}

impl Tee {
    pub fn wrap(
        inner: ProxyBody,
        capture: Arc<Capture>,
        cap: usize,
        then: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> ProxyBody {
        if inner.is_end_stream() {
            capture.lock().ended = true;
        }
        ProxyBody::Tee(Box::new(Tee { inner, capture, cap, then }))
    }

    fn copy(&self, chunk: &[u8]) {
        let mut c = self.capture.lock();
        c.seen += chunk.len() as u64;
        let room = self.cap.saturating_sub(c.data.len());
        c.data.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }

    fn end(&mut self) {
        self.capture.lock().ended = true;
        if let Some(then) = self.then.take() {
            then();
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if let Some(then) = self.then.take() {
            then();
        }
    }
}

/// What an upstream body gives back when it ends: its target's slot, and its connection to
/// the pool. Dropped before the end, the connection closes with it instead, since the rest
/// of the response would be read as the next one.
#[derive(Debug, Default)]
pub struct Hold {
    pub slot: Option<Slot>,
    pub lease: Option<Lease<ProxyBody>>,
}

impl Hold {
    fn end(&mut self) {
        self.slot = None;
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl ProxyBody {
    /// An upstream's body; one that is empty from the start (204, HEAD, `content-length: 0`)
    /// may never be polled, so it ends here.
    pub fn upstream(body: Incoming, mut hold: Hold) -> Self {
        if body.is_end_stream() {
            hold.end();
        }
        ProxyBody::Upstream(body, hold)
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Upstream(b, hold) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => hold.end(),
                    Poll::Ready(Some(Ok(_))) if b.is_end_stream() => hold.end(),
                    _ => {}
                }
                polled
            }
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Tee(t) => {
                let polled = Pin::new(&mut t.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            t.copy(d);
                        }
                        if t.inner.is_end_stream() {
                            t.end();
                        }
                    }
                    Poll::Ready(None) => t.end(),
                    Poll::Ready(Some(Err(_))) | Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(b) | ProxyBody::Upstream(b, _) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Tee(t) => t.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(b) | ProxyBody::Upstream(b, _) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Tee(t) => t.inner.size_hint(),
        }
    }
}

/// Bodies the gateway reads whole for plugins: a cap per body (413 past it) and one budget
/// of bytes shared by every request (503 past it), so memory stays bounded however many
/// clients upload at once. Bytes are reserved as they arrive and released when the
/// reservation, kept for the rest of the request, is dropped.
#[derive(Debug)]
pub struct BodyBudget {
    per_body: usize,
    capacity: usize,
    shared: Arc<Semaphore>,
}

/// What a request holds of the shared budget; dropping it gives the bytes back.
pub type Reservation = Option<OwnedSemaphorePermit>;

/// A body read whole would pass the per-body cap, or the shared budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("body over the per-request limit")]
    TooLarge,
    #[error("buffered-body budget exhausted")]
    Exhausted,
    #[error("body could not be read")]
    Read,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(16 * 1024 * 1024, 256 * 1024 * 1024)
    }
}

impl BodyBudget {
    pub fn new(per_body: usize, shared: usize) -> Self {
        let capacity = shared.min(Semaphore::MAX_PERMITS);
        Self { per_body, capacity, shared: Arc::new(Semaphore::new(capacity)) }
    }

    /// Bytes of the shared budget reserved by requests now.
    pub fn held(&self) -> usize {
        self.capacity.saturating_sub(self.shared.available_permits())
    }

    /// Reads `body` whole, reserving each chunk in the shared budget into `held`.
    pub async fn read<B>(&self, body: B, held: &mut Reservation) -> Result<Bytes, BufferError>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        use http_body_util::BodyExt;
        let mut body = body;
        // A declared length over the cap is refused before a byte is reserved.
        if body.size_hint().lower() > self.per_body as u64 {
            linger(&mut body).await;
            return Err(BufferError::TooLarge);
        }
        let mut first: Option<Bytes> = None;
        let mut rest: Option<bytes::BytesMut> = None;
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return Err(BufferError::Read) };
            let Ok(chunk) = frame.into_data() else { continue };
            if chunk.is_empty() {
                continue;
            }
            len += chunk.len();
            if len > self.per_body {
                *held = None;
                linger(&mut body).await;
                return Err(BufferError::TooLarge);
            }
            if let Err(e) = self.reserve(chunk.len(), held) {
                // Given back before lingering: a refused body must not crowd out others.
                *held = None;
                linger(&mut body).await;
                return Err(e);
            }
            // One chunk (the common case for small bodies) is kept as it came, without a copy.
            if let Some(buf) = &mut rest {
                buf.extend_from_slice(&chunk);
            } else if let Some(f) = first.take() {
                // Sized by what arrived, not by what the client announced: memory follows
                // the reservation (at most twice it, as the buffer grows).
                let mut buf = bytes::BytesMut::with_capacity(len * 2);
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
                rest = Some(buf);
            } else {
                first = Some(chunk);
            }
        }
        Ok(match (first, rest) {
            (_, Some(buf)) => buf.freeze(),
            (Some(f), None) => f,
            (None, None) => Bytes::new(),
        })
    }

    fn reserve(&self, n: usize, held: &mut Reservation) -> Result<(), BufferError> {
        let n = u32::try_from(n).map_err(|_| BufferError::Exhausted)?;
        let permit = self.shared.clone().try_acquire_many_owned(n).map_err(|_| BufferError::Exhausted)?;
        match held {
            Some(h) => h.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

/// After a body is refused, read and drop up to this much more of it, for at most
/// `LINGER_TIME`: a connection closed with an upload unread is reset, and the client would
/// see the reset instead of the answer. Past either bound the connection is closed anyway.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);

async fn linger<B>(body: &mut B)
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    if body.size_hint().lower() > LINGER_BYTES as u64 {
        return;
    }
    let drain = async {
        let mut left = LINGER_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                left = left.saturating_sub(d.len());
                if left == 0 {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> ProxyBody {
        ProxyBody::from(Bytes::from(vec![b'a'; n]))
    }

    #[tokio::test]
    async fn reservations_share_the_budget_and_come_back_when_dropped() {
        let budget = BodyBudget::new(100, 150);
        let mut first = None;
        assert_eq!(budget.read(body(100), &mut first).await.map(|b| b.len()), Ok(100));
        assert_eq!(budget.held(), 100);
        let mut second = None;
        assert_eq!(budget.read(body(60), &mut second).await, Err(BufferError::Exhausted));
        assert!(second.is_none(), "a refused body holds nothing");
        drop(first);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.read(body(60), &mut second).await.map(|b| b.len()), Ok(60));
    }

    #[tokio::test]
    async fn a_body_over_the_per_body_cap_is_refused_before_any_reservation() {
        let budget = BodyBudget::new(100, 1000);
        let mut held = None;
        assert_eq!(budget.read(body(101), &mut held).await, Err(BufferError::TooLarge));
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.read(ProxyBody::empty(), &mut held).await, Ok(Bytes::new()));
    }

    #[tokio::test]
    async fn a_refused_body_gives_its_bytes_back_before_lingering() {
        let budget = Arc::new(BodyBudget::new(1000, 100));
        // A buffer of one: each send returns only once the reader took the frame before it.
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
        let reader = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut held = None;
                let r = budget.read(body, &mut held).await;
                (r, held.is_none())
            })
        };
        for _ in 0..4 {
            tx.send_data(Bytes::from(vec![b'a'; 60])).await.expect("the reader takes it");
        }
        // The reader took the second frame (refused) and then a third while lingering.
        assert!(!reader.is_finished());
        assert_eq!(budget.held(), 0, "nothing is held while the refused body is drained");
        drop(tx);
        assert_eq!(reader.await.expect("reader"), (Err(BufferError::Exhausted), true));
    }
}
