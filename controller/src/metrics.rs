//! The controller's Prometheus metrics.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Resource changes compiled, by kind.
    pub changes: IntCounterVec,
    pub watch_errors: IntCounter,
    pub config_version: IntGauge,
    /// Dataplanes that acknowledged within the last heartbeats.
    pub dataplanes: IntGauge,
    /// Open config streams on this replica.
    pub streams: IntGauge,
    /// From a watch event to its delta being published to the streams.
    pub push_seconds: Histogram,
    /// Size of each delta as streamed (JSON bytes).
    pub delta_bytes: Histogram,
    /// Status writes, by result.
    pub status_writes: IntCounterVec,
    pub refused_clients: IntCounter,
    /// TokenReviews sent to the API server (cached verdicts and rate-limited tokens are not).
    pub token_reviews: IntCounter,
    pub leader: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |n: &str, h: &str, l: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(n, h), l));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |n: &str, h: &str| {
            let g = must(IntGauge::new(n, h));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let changes =
            counter_vec("gatehouse_controller_changes_total", "Resource changes compiled, by kind", &["kind"]);
        let status_writes =
            counter_vec("gatehouse_controller_status_writes_total", "Status writes, by result", &["result"]);
        let watch_errors = must(IntCounter::new("gatehouse_controller_watch_errors_total", "Watch errors (retried)"));
        must(registry.register(Box::new(watch_errors.clone())));
        let refused_clients = must(IntCounter::new(
            "gatehouse_controller_refused_clients_total",
            "Config clients refused by authentication",
        ));
        must(registry.register(Box::new(refused_clients.clone())));
        let token_reviews = must(IntCounter::new(
            "gatehouse_controller_token_reviews_total",
            "TokenReviews sent to the API server for tokens not seen in the last minute",
        ));
        must(registry.register(Box::new(token_reviews.clone())));
        let push_seconds = must(Histogram::with_opts(
            HistogramOpts::new("gatehouse_controller_push_seconds", "From a watch event to its delta on the streams")
                .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
        ));
        must(registry.register(Box::new(push_seconds.clone())));
        let delta_bytes = must(Histogram::with_opts(
            HistogramOpts::new("gatehouse_controller_delta_bytes", "Size of each delta streamed to dataplanes")
                .buckets(prometheus::exponential_buckets(256.0, 4.0, 10).unwrap_or_default()),
        ));
        must(registry.register(Box::new(delta_bytes.clone())));
        Self {
            changes,
            watch_errors,
            config_version: gauge("gatehouse_controller_config_version", "Version of the config being streamed"),
            dataplanes: gauge("gatehouse_controller_dataplanes", "Dataplanes acknowledging config"),
            streams: gauge("gatehouse_controller_streams", "Open config streams on this replica"),
            push_seconds,
            delta_bytes,
            status_writes,
            refused_clients,
            token_reviews,
            leader: gauge("gatehouse_controller_leader", "1 while this replica holds the lease and writes status"),
            registry,
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
