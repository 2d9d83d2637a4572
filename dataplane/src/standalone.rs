//! Standalone mode: the config is a YAML file or a directory of them, watched for changes.
//!
//! A reload never loses what was serving: a file that cannot be read or parsed keeps the
//! resources it had, and a resource that fails validation keeps its last good version.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::Duration,
};

use anyhow::Context;
use gatehouse_crds::{
    manifest::{self, Resource, ResourceId},
    snapshot::Snapshot,
};
use notify::Watcher;
use sha2::{Digest, Sha256};

use crate::gateway::Gateway;

pub struct Standalone {
    path: PathBuf,
    /// The resources being served, with the file each came from.
    good: BTreeMap<ResourceId, (PathBuf, Resource)>,
    current: Arc<Snapshot>,
    /// When each API (`namespace/name`) without a `creationTimestamp` was first seen: its
    /// age when it claims a route, kept across reloads so that editing an API that serves
    /// never lets a newer one take its route.
    first_seen: HashMap<String, jiff::Timestamp>,
    /// SHA-256 of the file list and every file's content (or read error) at the last load:
    /// the same inputs are not parsed, counted or reported again.
    read: Option<[u8; 32]>,
}

/// Events closer together than this are one change (editors write, rename and chmod).
const SETTLE: Duration = Duration::from_millis(150);
/// How soon a plugin file that failed for a passing reason is looked at again.
const PLUGIN_RETRY: Duration = Duration::from_secs(1);

/// What one pass over the config path read.
struct Inputs {
    /// Each YAML file and its text, or why it could not be read.
    files: Vec<(PathBuf, Result<String, String>)>,
    /// Why the path itself could not be listed.
    listing: Option<String>,
    fingerprint: [u8; 32],
}

impl Standalone {
    pub fn new(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::metadata(&path).with_context(|| format!("--config {}", path.display()))?;
        Ok(Self { path, good: BTreeMap::new(), current: Arc::default(), read: None, first_seen: HashMap::new() })
    }

    fn read_inputs(&self) -> Inputs {
        let (paths, listing) = match self.files() {
            Ok(f) => (f, None),
            Err(e) => (Vec::new(), Some(format!("{}: {e:#}", self.path.display()))),
        };
        let mut h = Sha256::new();
        h.update(listing.as_deref().unwrap_or_default());
        let files: Vec<_> = paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).map_err(|e| e.to_string());
                h.update(p.as_os_str().as_encoded_bytes());
                h.update([0]);
                let (tag, body) = match &text {
                    Ok(t) => (b'+', t),
                    Err(e) => (b'-', e),
                };
                h.update([tag]);
                h.update(body);
                h.update([0]);
                (p, text)
            })
            .collect();
        Inputs { files, listing, fingerprint: h.finalize().into() }
    }

    /// Reads everything again and applies it if anything changed: a file's content, the
    /// set of files, or a plugin file. Unchanged inputs are neither parsed nor reported
    /// again, so an invalid manifest is logged once per change, not once per look.
    /// Blocking: runs on the watcher's own thread.
    pub fn reload(&mut self, gw: &Gateway) {
        let inputs = self.read_inputs();
        let plugins_changed = || gw.plugins_changed_blocking().unwrap_or(false);
        if self.read == Some(inputs.fingerprint) && gw.is_ready() {
            if plugins_changed() {
                tracing::info!("a plugin file changed; reloading it");
                let mut snapshot = (*self.current).clone();
                snapshot.version += 1;
                self.apply(gw, snapshot);
            }
            return;
        }
        self.read = Some(inputs.fingerprint);
        let mut errors = Vec::new();
        let mut next: BTreeMap<ResourceId, (PathBuf, Resource)> = BTreeMap::new();
        errors.extend(inputs.listing);
        let mut unreadable = Vec::new();
        for (file, text) in &inputs.files {
            let label = file.display().to_string();
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("{label}: {e}"));
                    unreadable.push(file.clone());
                    continue;
                }
            };
            let parsed = manifest::parse(&label, text);
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
        if snapshot == *self.current && gw.is_ready() && !plugins_changed() {
            return;
        }
        snapshot.version = self.current.version + 1;
        self.apply(gw, snapshot);
    }

    fn apply(&mut self, gw: &Gateway, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        if let Err(e) = gw.apply_blocking(snapshot.clone()) {
            tracing::error!(error = %e, "config not applied");
            return;
        }
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
    /// Reading, parsing and watching happen on a thread of their own, and runtimes are
    /// built on the gateway's config thread: no request worker ever waits on them.
    pub async fn run(self, gw: Arc<Gateway>) -> anyhow::Result<()> {
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("gatehouse-watch".to_owned()).spawn(move || {
            let _ = done.send(self.watch(&gw));
        })?;
        finished.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the config watcher thread panicked")))
    }

    fn watch(mut self, gw: &Gateway) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel::<notify::Event>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            // Opening and reading files are events too (inotify's IN_OPEN): without this
            // filter, the reload's own reads trigger the next reload, forever.
            Ok(e) if is_read(&e.kind) => {}
            Ok(e) => {
                let _ = tx.send(e);
            }
            // Overflow or a watch error: something may have changed; look again.
            Err(_) => {
                let _ = tx.send(notify::Event::new(notify::EventKind::Any));
            }
        })?;
        // Watch the directory even for a single file: editors and ConfigMap updates
        // replace files rather than write them in place. Watch before the first load, so
        // that no change falls between the two.
        let config_dir = if self.path.is_dir() { self.path.clone() } else { parent(&self.path) };
        watcher.watch(&config_dir, notify::RecursiveMode::NonRecursive)?;
        let mut watched = BTreeSet::from([config_dir]);
        self.reload(gw);
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
                self.reload(gw);
                continue;
            }
            let first = if gw.runtime().plugin_retry {
                // A plugin file was still being written (or could not be copied): look
                // again even if no further event comes.
                match rx.recv_timeout(PLUGIN_RETRY) {
                    Ok(e) => e,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.reload(gw);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            } else {
                let Ok(first) = rx.recv() else { return Ok(()) };
                first
            };
            let mut relevant = self.concerns(&first);
            // One change is often several events: wait until they settle, then look once.
            let settle_until = std::time::Instant::now() + SETTLE;
            while let Some(left) = settle_until.checked_duration_since(std::time::Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(e) => relevant |= self.concerns(&e),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            while let Ok(e) = rx.try_recv() {
                relevant |= self.concerns(&e);
            }
            if relevant {
                self.reload(gw);
            }
        }
    }

    /// Whether an event may change the config: a YAML file of the config path, the config
    /// file itself, a plugin file, or a `..`-prefixed entry (how a mounted ConfigMap swaps
    /// its content). Other files in the same directories (analytics output, editor swap
    /// files, the plugin copies) are not looked at.
    fn concerns(&self, e: &notify::Event) -> bool {
        if e.paths.is_empty() {
            return true;
        }
        e.paths.iter().any(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            *p == self.path
                || p.file_name() == self.path.file_name()
                || name.starts_with("..")
                || (yaml && !name.starts_with('.'))
                || self.current.plugins.values().any(|plugin| {
                    let plugin = Path::new(&plugin.spec.path);
                    p == plugin || plugin.file_name().is_some_and(|n| n == name)
                })
        })
    }
}

/// Events that only say a file was opened or read, never that it changed.
fn is_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => true,
        _ => false,
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
