//! Prometheus metrics. Per-API handles are resolved when a config is built, so the request
//! path only touches atomics: no label lookup, no lock, no allocation.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
    proto::{Counter, Metric, MetricFamily, MetricType},
};

use crate::reply::GatewayError;

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream: HistogramVec,
    rejections: IntCounterVec,
    pub config_version: IntGauge,
    pub config_reloads: IntCounterVec,
    pub analytics_dropped: IntCounter,
    /// Set when metrics are rendered, from the body budget.
    pub buffered_body_bytes: IntGauge,
    /// Set when metrics are rendered, from the upstream pool: `state` is `live` (hyper's
    /// connection running, buffers held) or `parked` (the socket alone).
    pub upstream_idle: IntGaugeVec,
    pub plugin_duration: HistogramVec,
    pub plugin_failures: IntCounterVec,
    /// Handles for requests that matched no API.
    pub unrouted: ApiMetrics,
}

/// The shared counter store's series.
pub struct CounterStoreMetrics {
    pub latency: Histogram,
    pub errors: IntCounter,
    pub in_flight: IntGauge,
}

/// One API's series, resolved once per config build.
#[derive(Clone)]
pub struct ApiMetrics {
    /// By status class: 1xx..5xx.
    requests: [IntCounter; 5],
    pub duration: Histogram,
    pub upstream: Histogram,
    rejections: IntCounterVec,
    api: String,
}

impl ApiMetrics {
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests[class].inc();
    }

    /// Rejections are rare; resolving the label here keeps the config build small.
    pub fn reject(&self, e: GatewayError) {
        self.rejections.with_label_values(&[self.api.as_str(), e.reason()]).inc();
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on malformed names or duplicate registration, both fixed at compile time.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let requests = must(IntCounterVec::new(
            Opts::new("gatehouse_requests_total", "Requests answered, by API and status class"),
            &["api", "code"],
        ));
        let duration = must(HistogramVec::new(
            HistogramOpts::new("gatehouse_request_duration_seconds", "Time from request to response headers")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        ));
        let upstream = must(HistogramVec::new(
            HistogramOpts::new("gatehouse_upstream_duration_seconds", "Time the upstream took to send headers")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        ));
        let rejections = must(IntCounterVec::new(
            Opts::new("gatehouse_rejections_total", "Requests the gateway ended itself, by reason"),
            &["api", "reason"],
        ));
        let config_version = must(IntGauge::new("gatehouse_config_version", "Version of the config being served"));
        let config_reloads = must(IntCounterVec::new(
            Opts::new("gatehouse_config_reloads_total", "Config loads, by result"),
            &["result"],
        ));
        let analytics_dropped = must(IntCounter::new(
            "gatehouse_analytics_dropped_total",
            "Analytics records dropped because the sink fell behind",
        ));
        let buffered_body_bytes = must(IntGauge::new(
            "gatehouse_buffered_body_bytes",
            "Bytes of request bodies held for plugins now, out of --buffered-body-budget-bytes",
        ));
        let upstream_idle = must(IntGaugeVec::new(
            Opts::new(
                "gatehouse_upstream_connections_idle",
                "Pooled upstream connections idle now: live (buffers held) or parked (only the socket)",
            ),
            &["state"],
        ));
        let hook_labels = &["plugin", "symbol", "phase", "event"];
        let plugin_duration = must(HistogramVec::new(
            HistogramOpts::new(PLUGIN_DURATION, "Time spent in plugin hooks")
                .buckets(vec![1e-6, 5e-6, 2.5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.025, 0.1, 0.5]),
            hook_labels,
        ));
        let plugin_failures = must(IntCounterVec::new(
            Opts::new(
                "gatehouse_plugin_failures_total",
                "Plugin hook calls that failed (kind=error) or panicked (kind=panic)",
            ),
            &["plugin", "symbol", "phase", "event", "kind"],
        ));
        reg(Box::new(plugin_duration.clone()));
        reg(Box::new(plugin_failures.clone()));
        reg(Box::new(requests.clone()));
        reg(Box::new(duration.clone()));
        reg(Box::new(upstream.clone()));
        reg(Box::new(rejections.clone()));
        reg(Box::new(config_version.clone()));
        reg(Box::new(config_reloads.clone()));
        reg(Box::new(analytics_dropped.clone()));
        reg(Box::new(buffered_body_bytes.clone()));
        reg(Box::new(upstream_idle.clone()));
        Self {
            unrouted: ApiMetrics::resolve(&requests, &duration, &upstream, &rejections, ""),
            registry,
            requests,
            duration,
            upstream,
            rejections,
            config_version,
            config_reloads,
            analytics_dropped,
            buffered_body_bytes,
            upstream_idle,
            plugin_duration,
            plugin_failures,
        }
    }

    /// The shared counter store's series, registered only when one is configured: how long
    /// a limit check takes, how many failed (timed out, or Redis unreachable), and how many
    /// are waiting now.
    pub fn counter_store(&self) -> CounterStoreMetrics {
        let latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "gatehouse_counter_store_duration_seconds",
                "Time one rate-limit or quota check took in Redis",
            )
            .buckets(vec![1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
        ));
        let errors = must(IntCounter::new(
            "gatehouse_counter_store_errors_total",
            "Rate-limit and quota checks Redis did not answer in time (the failure policy applied)",
        ));
        let in_flight = must(IntGauge::new(
            "gatehouse_counter_store_checks_in_flight",
            "Rate-limit and quota checks waiting on Redis now",
        ));
        must(self.registry.register(Box::new(latency.clone())));
        must(self.registry.register(Box::new(errors.clone())));
        must(self.registry.register(Box::new(in_flight.clone())));
        CounterStoreMetrics { latency, errors, in_flight }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn for_api(&self, api: &str) -> ApiMetrics {
        ApiMetrics::resolve(&self.requests, &self.duration, &self.upstream, &self.rejections, api)
    }

    pub fn render(&self) -> Vec<u8> {
        let mut families = self.registry.gather();
        if let Some(calls) = families.iter().find(|f| f.name() == PLUGIN_DURATION).map(calls_from_durations) {
            // `gather` sorts families by name; the encoder keeps that order.
            let at = families.partition_point(|f| f.name() < PLUGIN_CALLS);
            families.insert(at, calls);
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed family.
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        buf
    }
}

const PLUGIN_DURATION: &str = "gatehouse_plugin_duration_seconds";
const PLUGIN_CALLS: &str = "gatehouse_plugin_calls_total";

/// `gatehouse_plugin_calls_total`, from the duration histogram's counts: every hook call is
/// observed there once, so a second counter per call would only cost the hot path an atomic.
fn calls_from_durations(durations: &MetricFamily) -> MetricFamily {
    let mut calls = MetricFamily::default();
    calls.set_name(PLUGIN_CALLS.to_owned());
    calls.set_help("Plugin hook calls, by plugin file, symbol and phase".to_owned());
    calls.set_field_type(MetricType::COUNTER);
    calls.set_metric(
        durations
            .get_metric()
            .iter()
            .map(|m| {
                let mut c = Counter::default();
                c.set_value(m.get_histogram().get_sample_count() as f64);
                let mut out = Metric::from_label(m.get_label().to_vec());
                out.set_counter(c);
                out
            })
            .collect(),
    );
    calls
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    fn resolve(
        requests: &IntCounterVec,
        duration: &HistogramVec,
        upstream: &HistogramVec,
        rejections: &IntCounterVec,
        api: &str,
    ) -> Self {
        let class = |c: &str| requests.with_label_values(&[api, c]);
        Self {
            requests: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: duration.with_label_values(&[api]),
            upstream: upstream.with_label_values(&[api]),
            rejections: rejections.clone(),
            api: api.to_owned(),
        }
    }
}
