//! Rate limits and quotas, counted in memory (per dataplane) or in Redis (shared by every
//! dataplane pointed at it: `--counters redis://...`).
//!
//! Each operation is one atomic check-and-count on one key: a map entry in memory, one
//! server-side script in Redis. `Counters` picks the store and applies the failure policy
//! when Redis cannot answer.

mod redis;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::metrics::CounterStoreMetrics;
use clap::ValueEnum;
use dashmap::DashMap;

pub use redis::{PREFIX as REDIS_PREFIX, RedisStore};

/// The outcome of counting one request against a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        remaining: u64,
    },
    /// Over the limit; the caller may retry after this long.
    Denied {
        retry_after: Duration,
    },
    /// The store could not answer and `--counters-failure open` lets the request through
    /// uncounted.
    Unchecked,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("counter store: {0}")]
pub struct StoreError(pub String);

pub trait CounterStore: Send + Sync + 'static {
    /// Counts one request against `rate` requests every `per` (a sliding window with no
    /// burst beyond `rate`), keyed by `key`.
    fn rate(&self, key: &str, rate: u64, per: Duration) -> impl Future<Output = Result<Decision, StoreError>> + Send;
    /// Counts one request against `max` requests per `renewal` window; the window starts
    /// with the first request after the previous one ended.
    fn quota(
        &self,
        key: &str,
        max: u64,
        renewal: Duration,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;
}

/// Counters in this process. The rate limit is GCRA: one timestamp per key, no timer, and
/// after `per` of silence a key is back to its full `rate`.
#[derive(Debug)]
pub struct MemoryStore {
    epoch: Instant,
    /// Theoretical arrival time (ns since `epoch`) per key.
    rates: DashMap<Arc<str>, u64>,
    quotas: DashMap<Arc<str>, QuotaWindow>,
}

#[derive(Debug, Clone, Copy)]
struct QuotaWindow {
    used: u64,
    ends: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self { epoch: Instant::now(), rates: DashMap::new(), quotas: DashMap::new() }
    }
}

impl MemoryStore {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn rate_at(&self, key: &str, rate: u64, per: Duration, now: u64) -> Decision {
        let per = per.as_nanos() as u64;
        let interval = (per / rate.max(1)).max(1);
        let decide = |tat: &mut u64| {
            let next = (*tat).max(now) + interval;
            if next - now > per {
                Decision::Denied { retry_after: Duration::from_nanos(next - per - now) }
            } else {
                *tat = next;
                Decision::Allowed { remaining: (per - (next - now)) / interval }
            }
        };
        if let Some(mut tat) = self.rates.get_mut(key) {
            return decide(&mut tat);
        }
        let mut tat = 0;
        let d = decide(&mut tat);
        // Two first requests may race here; the later insert wins, costing at most one
        // uncounted request for a brand-new key.
        self.rates.insert(Arc::from(key), tat);
        d
    }

    fn quota_at(&self, key: &str, max: u64, renewal: Duration, now: u64) -> Decision {
        let renewal = renewal.as_nanos() as u64;
        let decide = |w: &mut QuotaWindow| {
            if now >= w.ends {
                *w = QuotaWindow { used: 0, ends: now + renewal };
            }
            if w.used >= max {
                Decision::Denied { retry_after: Duration::from_nanos(w.ends - now) }
            } else {
                w.used += 1;
                Decision::Allowed { remaining: max - w.used }
            }
        };
        if let Some(mut w) = self.quotas.get_mut(key) {
            return decide(&mut w);
        }
        let mut w = QuotaWindow { used: 0, ends: 0 };
        let d = decide(&mut w);
        self.quotas.insert(Arc::from(key), w);
        d
    }
}

impl CounterStore for MemoryStore {
    async fn rate(&self, key: &str, rate: u64, per: Duration) -> Result<Decision, StoreError> {
        Ok(self.rate_at(key, rate, per, self.now()))
    }

    async fn quota(&self, key: &str, max: u64, renewal: Duration) -> Result<Decision, StoreError> {
        Ok(self.quota_at(key, max, renewal, self.now()))
    }
}

/// What a request gets when the counter store cannot answer (down, or slower than
/// `--counters-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicy {
    /// Let it through uncounted: an outage of the counter store does not become an outage
    /// of every limited API (Kong's `fault_tolerant` and Envoy's rate-limit filter default
    /// to this too).
    Open,
    /// Refuse it with 503: for quotas that must never be exceeded, such as billed ones.
    Closed,
}

/// The counter store the gateway uses.
pub enum Counters {
    Memory(MemoryStore),
    Redis(Box<Shared>),
}

/// Redis counters with their failure policy and metrics.
pub struct Shared {
    store: RedisStore,
    failure: FailurePolicy,
    metrics: CounterStoreMetrics,
    /// When the next failure may be logged (ms since `epoch`): at most one line every
    /// `LOG_EVERY`, however many requests fail.
    next_log_ms: AtomicU64,
    /// Failures since the last line.
    unlogged: AtomicU64,
    epoch: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for Counters {
    fn default() -> Self {
        Self::Memory(MemoryStore::default())
    }
}

impl Counters {
    /// Counters in the Redis at `url`.
    pub async fn redis(
        url: &str,
        timeout: Duration,
        failure: FailurePolicy,
        ca_pem: Option<&str>,
        metrics: CounterStoreMetrics,
    ) -> Result<Self, StoreError> {
        let store = RedisStore::connect(url, timeout, ca_pem).await?;
        Ok(Self::Redis(Box::new(Shared {
            store,
            failure,
            metrics,
            next_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            epoch: Instant::now(),
        })))
    }
}

impl Shared {
    async fn check(&self, check: impl Future<Output = Result<Decision, StoreError>>) -> Result<Decision, StoreError> {
        let m = &self.metrics;
        m.in_flight.inc();
        let timer = m.latency.start_timer();
        let result = check.await;
        timer.observe_duration();
        m.in_flight.dec();
        result.or_else(|e| {
            m.errors.inc();
            self.log(&e);
            match self.failure {
                FailurePolicy::Open => Ok(Decision::Unchecked),
                FailurePolicy::Closed => Err(e),
            }
        })
    }

    fn log(&self, e: &StoreError) {
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_log_ms.load(Ordering::Relaxed);
        let later = now.saturating_add(LOG_EVERY.as_secs() * 1000);
        if now < next || self.next_log_ms.compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        self.unlogged.fetch_sub(unlogged, Ordering::Relaxed);
        let action = match self.failure {
            FailurePolicy::Open => "letting limited requests through uncounted (--counters-failure open)",
            FailurePolicy::Closed => "refusing limited requests with 503 (--counters-failure closed)",
        };
        tracing::error!(error = %e, failed_checks = unlogged, "counter store unavailable; {action}; at most one such line every 10 s");
    }
}

impl CounterStore for Counters {
    async fn rate(&self, key: &str, rate: u64, per: Duration) -> Result<Decision, StoreError> {
        match self {
            Self::Memory(m) => m.rate(key, rate, per).await,
            Self::Redis(r) => r.check(r.store.rate(key, rate, per)).await,
        }
    }

    async fn quota(&self, key: &str, max: u64, renewal: Duration) -> Result<Decision, StoreError> {
        match self {
            Self::Memory(m) => m.quota(key, max, renewal).await,
            Self::Redis(r) => r.check(r.store.quota(key, max, renewal)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn rate_allows_rate_per_window_then_denies_then_recovers_after_per() {
        let m = MemoryStore::default();
        let per = Duration::from_secs(1);
        for i in 0..5 {
            assert!(matches!(m.rate_at("k", 5, per, 10 * S), Decision::Allowed { .. }), "request {i}");
        }
        let Decision::Denied { retry_after } = m.rate_at("k", 5, per, 10 * S) else { panic!("6th allowed") };
        assert_eq!(retry_after, Duration::from_millis(200));
        assert!(matches!(m.rate_at("other", 5, per, 10 * S), Decision::Allowed { .. }), "keys are independent");
        for _ in 0..5 {
            assert!(matches!(m.rate_at("k", 5, per, 11 * S), Decision::Allowed { .. }));
        }
    }

    #[test]
    fn rate_reports_remaining() {
        let m = MemoryStore::default();
        assert_eq!(m.rate_at("k", 3, Duration::from_secs(3), S), Decision::Allowed { remaining: 2 });
        assert_eq!(m.rate_at("k", 3, Duration::from_secs(3), S), Decision::Allowed { remaining: 1 });
        assert_eq!(m.rate_at("k", 3, Duration::from_secs(3), S), Decision::Allowed { remaining: 0 });
    }

    #[test]
    fn quota_counts_per_window_and_renews() {
        let m = MemoryStore::default();
        let renewal = Duration::from_secs(60);
        assert_eq!(m.quota_at("k", 2, renewal, S), Decision::Allowed { remaining: 1 });
        assert_eq!(m.quota_at("k", 2, renewal, 2 * S), Decision::Allowed { remaining: 0 });
        assert_eq!(m.quota_at("k", 2, renewal, 3 * S), Decision::Denied { retry_after: Duration::from_secs(58) });
        assert_eq!(m.quota_at("k", 2, renewal, 61 * S), Decision::Allowed { remaining: 1 });
    }
}
