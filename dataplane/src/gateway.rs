//! What every request shares: the config being served, the upstream pool, the counters,
//! the analytics sink and the metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use arc_swap::ArcSwap;
use gatehouse_crds::snapshot::Snapshot;

use crate::{
    analytics::Analytics,
    body::BodyBudget,
    cli::Limits,
    limits::MemoryStore,
    metrics::Metrics,
    plugins::Loader,
    proxy::{TargetSlots, UpstreamClient},
    runtime::Runtime,
};

pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    ready: AtomicBool,
    /// Problems found in the config source (unreadable files, invalid resources); the
    /// resources concerned keep their last good version where they had one.
    source_errors: ArcSwap<Vec<String>>,
    pub client: UpstreamClient,
    /// Caps requests in flight per upstream target.
    pub target_slots: TargetSlots,
    /// Bodies buffered for plugins: per-body cap and shared budget.
    pub bodies: BodyBudget,
    pub counters: MemoryStore,
    pub analytics: Analytics,
    pub metrics: Metrics,
    pub loader: Loader,
}

impl Gateway {
    pub fn new(metrics: Metrics, analytics: Analytics, loader: Loader) -> Self {
        let empty = Runtime::build(&Snapshot::default(), &metrics, &loader, None);
        Self {
            runtime: ArcSwap::from_pointee(empty),
            ready: AtomicBool::new(false),
            source_errors: ArcSwap::from_pointee(Vec::new()),
            client: crate::proxy::client(),
            target_slots: TargetSlots::default(),
            bodies: BodyBudget::default(),
            counters: MemoryStore::default(),
            analytics,
            metrics,
            loader,
        }
    }

    /// Applies the upstream and body limits of the command line.
    pub fn with_limits(mut self, limits: &Limits) -> Self {
        self.client = crate::proxy::client_with(limits.upstream_connect_timeout);
        self.target_slots = TargetSlots::new(limits.upstream_max_connections_per_target);
        self.bodies = BodyBudget::new(limits.max_buffered_body_bytes, limits.buffered_body_budget_bytes);
        self
    }

    /// The config for a new request; the request keeps it until it ends.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new config: requests in flight finish on the old one.
    pub fn apply(&self, snapshot: &Snapshot) {
        let started = std::time::Instant::now();
        let prev = self.runtime.load();
        let rt = Runtime::build(snapshot, &self.metrics, &self.loader, Some(&prev));
        self.metrics.config_version.set(i64::try_from(rt.version).unwrap_or(i64::MAX));
        self.runtime.store(Arc::new(rt));
        self.ready.store(true, Ordering::Release);
        tracing::debug!(version = snapshot.version, took = ?started.elapsed(), "runtime built");
    }

    /// Whether a plugin file now holds other content than the one being served.
    pub fn plugins_changed(&self) -> bool {
        self.runtime
            .load()
            .plugin_files
            .iter()
            .any(|(path, served)| crate::plugins::Loader::file_hash(std::path::Path::new(path)).ok() != *served)
    }

    pub fn set_source_errors(&self, errors: Vec<String>) {
        self.source_errors.store(Arc::new(errors));
    }

    pub fn source_errors(&self) -> Arc<Vec<String>> {
        self.source_errors.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
