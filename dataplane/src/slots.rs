//! A counted cap on requests in flight to one upstream target, whose fast path is two
//! atomic operations.
//!
//! `tokio::sync::Semaphore` would do, but its release takes the waiter-list mutex every
//! time, waiters or not: a lock per proxied request. Here a release touches the waiters
//! only when some request is waiting, which happens only at the cap.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering::SeqCst},
};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct Slots {
    cap: u32,
    taken: AtomicU32,
    waiting: AtomicU32,
    freed: Notify,
}

/// One slot, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(Self { cap, taken: AtomicU32::new(0), waiting: AtomicU32::new(0), freed: Notify::new() })
    }

    /// A slot if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.taken.fetch_update(SeqCst, SeqCst, |n| (n < self.cap).then_some(n + 1)).ok()?;
        Some(Slot(self.clone()))
    }

    /// Waits for a slot; cancel it by dropping the future (a timeout).
    pub async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(s) = self.try_take() {
                return s;
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before counting ourselves and checking again: a release either sees
            // the count and notifies this registration, or happened before the check.
            freed.as_mut().enable();
            let _waiting = Waiting::new(&self.waiting);
            if let Some(s) = self.try_take() {
                return s;
            }
            freed.await;
        }
    }

    #[cfg(test)]
    fn taken(&self) -> u32 {
        self.taken.load(SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, SeqCst);
        if self.0.waiting.load(SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// Counts a waiter for as long as it waits, cancelled or not.
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, SeqCst);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn slots_are_capped_and_given_back_on_drop() {
        let s = Slots::new(2);
        let a = s.try_take().expect("first");
        let _b = s.try_take().expect("second");
        assert!(s.try_take().is_none(), "the cap holds");
        drop(a);
        assert!(s.try_take().is_some(), "a dropped slot is free again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_woken_by_releases_and_none_is_lost() {
        // Many tasks contend for few slots; a lost wakeup would leave one waiting forever.
        let s = Slots::new(3);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let s = s.clone();
            tasks.spawn(async move {
                for _ in 0..200 {
                    let slot = s.take().await;
                    assert!(s.taken() <= 3);
                    tokio::task::yield_now().await;
                    drop(slot);
                }
            });
        }
        let all = async {
            while let Some(r) = tasks.join_next().await {
                r.expect("task")
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all).await.expect("every waiter got its slots");
        assert_eq!(s.taken(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_keep_a_release_from_the_next() {
        let s = Slots::new(1);
        let held = s.try_take().expect("slot");
        let gave_up = tokio::time::timeout(Duration::from_millis(10), s.take()).await;
        assert!(gave_up.is_err(), "no slot while it is held");
        let next = tokio::spawn({
            let s = s.clone();
            async move { s.take().await }
        });
        tokio::task::yield_now().await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(60), next).await.expect("woken").expect("task");
    }
}
