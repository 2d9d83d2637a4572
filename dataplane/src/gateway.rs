//! What every request shares: the config being served, the upstream pool, the counters,
//! the analytics sink and the metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use arc_swap::ArcSwap;
use gatehouse_crds::snapshot::Snapshot;
use gatehouse_plugin_host::Loader;

use crate::{
    analytics::Analytics,
    body::{BodyBudget, ProxyBody},
    cli::Limits,
    config_thread::{ConfigThread, Stopped},
    connect::Connector,
    key_id::KeyIdSecret,
    limits::Counters,
    metrics::Metrics,
    pool::Pool,
    proxy::TargetSlots,
    runtime::{Changed, Runtime},
    tls::Resolver,
};

pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    ready: AtomicBool,
    /// Problems found in the config source (unreadable files, invalid resources); the
    /// resources concerned keep their last good version where they had one.
    source_errors: ArcSwap<Vec<String>>,
    /// The pooled HTTP/1.1 connections of every `http://` target.
    pub pool: Pool<ProxyBody>,
    /// Builds the clients of `https://` upstreams with the same connect timeout.
    connector: Connector,
    /// Caps requests in flight per upstream target.
    pub target_slots: Arc<TargetSlots>,
    /// Bodies buffered for plugins: per-body cap and shared budget.
    pub bodies: BodyBudget,
    pub counters: Counters,
    pub analytics: Analytics,
    /// Shared with the config thread, which resolves per-API handles while building.
    pub metrics: Arc<Metrics>,
    pub loader: Arc<Loader>,
    key_ids: Arc<KeyIdSecret>,
    /// Where runtimes are built and plugin files checked: never on a request worker.
    config_thread: ConfigThread,
    /// What TLS handshakes take their certificate from: the current runtime's table.
    pub certificates: Arc<Resolver>,
    /// The `:port` that `spec.tls.redirectHttp` redirects add after the host; empty for 443.
    pub redirect_port: Arc<str>,
}

impl Gateway {
    pub fn new(metrics: Metrics, analytics: Analytics, loader: Loader, key_ids: KeyIdSecret) -> std::io::Result<Self> {
        let connector = Connector::default();
        let empty = Runtime::build(&Snapshot::default(), &metrics, &loader, &key_ids, &connector, None, &Changed::All);
        Ok(Self {
            runtime: ArcSwap::from_pointee(empty),
            ready: AtomicBool::new(false),
            source_errors: ArcSwap::from_pointee(Vec::new()),
            pool: connector.pool(),
            connector,
            target_slots: Arc::default(),
            bodies: BodyBudget::default(),
            counters: Counters::default(),
            analytics,
            metrics: Arc::new(metrics),
            loader: Arc::new(loader),
            key_ids: Arc::new(key_ids),
            config_thread: ConfigThread::spawn()?,
            certificates: Arc::default(),
            redirect_port: Arc::from(""),
        })
    }

    /// Counts limits in `counters` instead of this process's memory.
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }

    /// Applies the upstream and body limits of the command line.
    pub fn with_limits(mut self, limits: &Limits) -> Self {
        self.connector = Connector::new(limits.upstream_connect_timeout);
        self.pool = self.connector.pool();
        self.target_slots = Arc::new(TargetSlots::new(limits.upstream_max_connections_per_target));
        self.bodies = BodyBudget::new(limits.max_buffered_body_bytes, limits.buffered_body_budget_bytes);
        self
    }

    /// HTTP→HTTPS redirects name this port (none for 443, the https default).
    pub fn with_redirect_port(mut self, port: u16) -> Self {
        self.redirect_port = Arc::from(if port == 443 { String::new() } else { format!(":{port}") });
        self
    }

    /// The config for a new request; the request keeps it until it ends.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Builds a runtime for `snapshot` on the config thread and swaps it in: requests in
    /// flight finish on the old one. One config source calls this, one build at a time.
    pub async fn apply(&self, snapshot: Arc<Snapshot>) -> Result<(), Stopped> {
        self.apply_changed(snapshot, Changed::All).await
    }

    /// `apply` for a snapshot that differs from the one served only as `changed` says.
    pub async fn apply_changed(&self, snapshot: Arc<Snapshot>, changed: Changed) -> Result<(), Stopped> {
        let build = self.build_job(snapshot, changed);
        let rt = self.config_thread.run(build).await?;
        self.swap_in(rt);
        Ok(())
    }

    /// `apply` for a caller on a thread of its own (the standalone file watcher).
    pub fn apply_blocking(&self, snapshot: Arc<Snapshot>) -> Result<(), Stopped> {
        let build = self.build_job(snapshot, Changed::All);
        let rt = self.config_thread.run_blocking(build)?;
        self.swap_in(rt);
        Ok(())
    }

    fn build_job(
        &self,
        snapshot: Arc<Snapshot>,
        changed: Changed,
    ) -> impl FnOnce() -> (Runtime, std::time::Duration) + Send + 'static {
        let prev = self.runtime.load_full();
        let (metrics, loader, key_ids) = (self.metrics.clone(), self.loader.clone(), self.key_ids.clone());
        let (slots, pool, connector) = (self.target_slots.clone(), self.pool.clone(), self.connector);
        move || {
            let started = std::time::Instant::now();
            let rt = Runtime::build(&snapshot, &metrics, &loader, &key_ids, &connector, Some(&prev), &changed);
            // The previous runtime is released here too, not on a request worker, unless a
            // request still holds it.
            drop(prev);
            slots.prune();
            pool.prune();
            (rt, started.elapsed())
        }
    }

    fn swap_in(&self, (rt, took): (Runtime, std::time::Duration)) {
        let version = rt.version;
        self.metrics.config_version.set(i64::try_from(version).unwrap_or(i64::MAX));
        self.certificates.store(rt.certificates.clone());
        self.runtime.store(Arc::new(rt));
        self.ready.store(true, Ordering::Release);
        tracing::debug!(version, ?took, "runtime built");
    }

    /// Whether a plugin file now holds other content than the one being served. Checked on
    /// the config thread: it stats every plugin file, and hashes those whose size, mtime or
    /// inode moved.
    pub async fn plugins_changed(&self) -> Result<bool, Stopped> {
        let job = self.plugins_changed_job();
        self.config_thread.run(job).await
    }

    pub fn plugins_changed_blocking(&self) -> Result<bool, Stopped> {
        let job = self.plugins_changed_job();
        self.config_thread.run_blocking(job)
    }

    fn plugins_changed_job(&self) -> impl FnOnce() -> bool + Send + 'static {
        let rt = self.runtime.load_full();
        let loader = self.loader.clone();
        move || {
            rt.plugin_files.iter().any(|(path, served)| loader.file_hash(std::path::Path::new(path)).ok() != *served)
        }
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
