//! Standalone mode: the config is a YAML file or a directory of them, watched for changes.
//!
//! A reload never loses what was serving: a file that cannot be read or parsed keeps the
//! resources it had, and a resource that fails validation keeps its last good version.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use gatehouse_crds::{
    manifest::{self, Resource, ResourceId},
    snapshot::Snapshot,
};
use notify::Watcher;
use tokio::sync::mpsc;

use crate::gateway::Gateway;

pub struct Standalone {
    path: PathBuf,
    /// The resources being served, with the file each came from.
    good: BTreeMap<ResourceId, (PathBuf, Resource)>,
    current: Snapshot,
    /// When each API (`namespace/name`) without a `creationTimestamp` was first seen: its
    /// age when it claims a route, kept across reloads so that editing an API that serves
    /// never lets a newer one take its route.
    first_seen: HashMap<String, jiff::Timestamp>,
}

/// Events closer together than this are one change (editors write, rename and chmod).
const SETTLE: Duration = Duration::from_millis(150);

impl Standalone {
    pub fn new(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::metadata(&path).with_context(|| format!("--config {}", path.display()))?;
        Ok(Self { path, good: BTreeMap::new(), current: Snapshot::default(), first_seen: HashMap::new() })
    }

    /// Reads everything again and applies it if anything changed.
    pub fn reload(&mut self, gw: &Gateway) {
        let mut errors = Vec::new();
        let mut next: BTreeMap<ResourceId, (PathBuf, Resource)> = BTreeMap::new();
        let files = match self.files() {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!("{}: {e:#}", self.path.display()));
                Vec::new()
            }
        };
        let mut unreadable = Vec::new();
        for file in &files {
            let label = file.display().to_string();
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("{label}: {e}"));
                    unreadable.push(file.clone());
                    continue;
                }
            };
            let parsed = manifest::parse(&label, &text);
            for ignored in parsed.ignored {
                tracing::debug!("{ignored}: ignored");
            }
            for (id, r) in parsed.resources {
                if let Some((other, _)) = next.get(&id) {
                    errors.push(format!("{label}: {id}: also defined in {}; keeping that one", other.display()));
                    continue;
                }
                next.insert(id, (file.clone(), r));
            }
            for rej in parsed.rejected {
                let kept = match &rej.id {
                    // Keep this resource's last good version, if it had one.
                    Some(id) => self.keep(id, &mut next),
                    // The file is unusable as a whole: keep everything it had.
                    None => {
                        unreadable.push(file.clone());
                        false
                    }
                };
                errors.push(format!("{}{}", rej.error, if kept { " (serving its last good version)" } else { "" }));
            }
        }
        for file in unreadable {
            for (id, (f, r)) in &self.good {
                if *f == file && !next.contains_key(id) {
                    next.insert(id.clone(), (f.clone(), r.clone()));
                }
            }
        }
        let (mut snapshot, compile_errors) =
            Snapshot::compile(self.current.version, next.values().map(|(_, r)| r.clone()));
        errors.extend(compile_errors.iter().map(ToString::to_string));
        self.date_apis(&mut snapshot);
        for e in &errors {
            tracing::warn!(config = %self.path.display(), "{e}");
        }
        gw.metrics.config_reloads.with_label_values(&[if errors.is_empty() { "ok" } else { "partial" }]).inc();
        gw.set_source_errors(errors);
        self.good = next;
        if snapshot == self.current && gw.is_ready() && !gw.plugins_changed() {
            return;
        }
        snapshot.version = self.current.version + 1;
        gw.apply(&snapshot);
        tracing::info!(
            version = snapshot.version,
            apis = snapshot.apis.len(),
            keys = snapshot.keys.len(),
            "config applied"
        );
        self.current = snapshot;
    }

    /// Gives each API without a `creationTimestamp` the time it was first seen; an API that
    /// goes away is forgotten, so one added again later is new again.
    fn date_apis(&mut self, snapshot: &mut Snapshot) {
        self.first_seen.retain(|id, _| snapshot.apis.contains_key(id));
        let now = jiff::Timestamp::now();
        for (id, entry) in &mut snapshot.apis {
            if entry.creation_timestamp.is_none() {
                entry.creation_timestamp = Some(*self.first_seen.entry(id.clone()).or_insert(now));
            }
        }
    }

    fn keep(&self, id: &ResourceId, next: &mut BTreeMap<ResourceId, (PathBuf, Resource)>) -> bool {
        match self.good.get(id) {
            Some(v) if !next.contains_key(id) => {
                next.insert(id.clone(), v.clone());
                true
            }
            _ => false,
        }
    }

    /// The YAML files to read: the file itself, or the directory's `*.yaml`/`*.yml`,
    /// skipping hidden entries (a mounted ConfigMap's `..data` links).
    fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let p = entry?.path();
            let hidden = p.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
            let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            if !hidden && yaml && p.is_file() {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Loads once, then reloads on every change under the path until the process ends.
    pub async fn run(mut self, gw: Arc<Gateway>) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                // A full channel already holds a pending reload.
                let _ = tx.try_send(());
            }
        })?;
        // Watch the directory even for a single file: editors and ConfigMap updates
        // replace files rather than write them in place. Watch before the first load, so
        // that no change falls between the two.
        let config_dir = if self.path.is_dir() { self.path.clone() } else { parent(&self.path) };
        watcher.watch(&config_dir, notify::RecursiveMode::NonRecursive)?;
        let mut watched = BTreeSet::from([config_dir]);
        self.reload(&gw);
        loop {
            // Plugin files change too (hot reload): watch the directories they are in.
            let mut added = false;
            for p in self.current.plugins.values() {
                let dir = parent(Path::new(&p.spec.path));
                if !watched.contains(&dir) {
                    match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            watched.insert(dir);
                            added = true;
                        }
                        Err(e) => {
                            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch plugin directory yet")
                        }
                    }
                }
            }
            if added {
                // A plugin may have changed before its directory was watched.
                self.reload(&gw);
                continue;
            }
            if rx.recv().await.is_none() {
                return Ok(());
            }
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            self.reload(&gw);
        }
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
