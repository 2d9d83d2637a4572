//! The plugin host: loads Plugin libraries, binds `middleware` entries to their hooks, and
//! runs a phase's hooks on a request.
//!
//! Loading is by content: a file is copied to `<plugin dir>/<sha256>.so` and opened from
//! there, so a changed file is a new library loaded beside the old one (hot reload without
//! renaming), and a file already loaded is never opened twice. Libraries are never unloaded.
//!
//! A crate of its own so that the one place that needs `unsafe` (`ffi`, the boundary with
//! plugin code) is a crate the rest of the gateway forbids it in. It sits below the
//! dataplane: hooks see the dataplane's API and session through [`HookApi`] and
//! [`SessionSlot`], analytics hooks see a record as an [`analytics::HookRecord`] the
//! dataplane builds, and the dataplane answers a failed hook ([`HookFailure`]) itself.
// `unsafe` only at the plugin boundary: `ffi` allows it, with a SAFETY comment on every
// block.
#![deny(unsafe_code)]

pub mod analytics;
mod elf;
mod ffi;
mod view;

use std::{
    cell::OnceCell,
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicBool},
};

use bytes::Bytes;
use gatehouse_crds::{FailurePolicy, KeySession, PluginRef, snapshot::Snapshot};
use gatehouse_plugin::abi::{self, gh_level, gh_target};
use http::{HeaderMap, StatusCode, request};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use quanta::Instant;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use ffi::HOST_API;
use ffi::{Instance, Library};
pub use view::{HookApi, HookSession, NewSession, SessionSlot, SessionView};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pre,
    AuthCheck,
    PostKeyAuth,
    /// `middleware.endpoints[].plugins`: after the key checks, before `post`.
    Endpoint,
    Post,
    Response,
    /// `middleware.analytics`: on each analytics record, off the request path.
    Analytics,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::AuthCheck => "authCheck",
            Phase::PostKeyAuth => "postKeyAuth",
            Phase::Endpoint => "endpoint",
            Phase::Post => "post",
            Phase::Response => "response",
            Phase::Analytics => "analytics",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a plugin, or one of its hooks, cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("no Plugin named {0} in this namespace")]
    NoSuchPlugin(String),
    #[error("cannot read the file: {0}")]
    Unreadable(String),
    #[error("the file is still being written ({0}); it is loaded once it stops changing")]
    Unstable(String),
    #[error("cannot use the plugin directory: {0}")]
    PluginDir(String),
    #[error("sha256 is {actual}, but spec.sha256 pins {expected}")]
    Sha256Mismatch { expected: String, actual: String },
    #[error("cannot copy it to the plugin directory: {0}")]
    CopyFailed(String),
    #[error("not a loadable shared object: {0}")]
    NotSharedObject(String),
    #[error("the dynamic loader refused it: {0}")]
    DlopenFailed(String),
    #[error(
        "exports no `gatehouse_plugin` declaration: not a Gatehouse plugin (build it with the gatehouse-plugin SDK or gatehouse_plugin.h)"
    )]
    NoDeclaration,
    #[error(
        "built for plugin ABI {plugin}.x by {sdk}, this gateway speaks ABI {host}.x: rebuild it against this gateway's SDK"
    )]
    AbiMajor { plugin: u16, host: u16, sdk: String },
    #[error(
        "built by {sdk} without panic unwinding (panic = \"abort\"): a panic would take the gateway down, so it is refused"
    )]
    NotPanicSafe { sdk: String },
    #[error("init failed: {0}")]
    InitFailed(String),
    #[error("symbol {0:?} not found in the library")]
    MissingSymbol(String),
    #[error("symbol {symbol:?} is not a Gatehouse hook: {why}")]
    NotAHook { symbol: String, why: String },
    #[error(
        "symbol {0:?} not found: the plugin's find_hook does not know it (a Rust plugin lists its hooks in declare_plugin!)"
    )]
    UnknownHook(String),
    #[error("declares ABI 1.{minor} (by {sdk}) but has no find_hook, which ABI 1.1 requires")]
    NoFindHook { minor: u16, sdk: String },
    #[error(
        "carries a Go runtime, but {first} already does: Go supports one runtime per process: bundle your Go plugins into one library with gatehouse-go build, and roll out a new bundle by restarting the dataplane (--dev-go-runtimes allows more while developing)"
    )]
    SecondGoRuntime { first: String },
    #[error(
        "carries a Go runtime, and this dataplane already runs {max}, the most --dev-go-runtimes allows: restart it to load a new Go bundle"
    )]
    GoRuntimesExhausted { max: usize },
    #[error("symbol {symbol:?} has no handler for the {phase} phase")]
    PhaseNotHandled { symbol: String, phase: Phase },
    #[error("the hook refused its config: {0}")]
    CreateFailed(String),
}

impl PluginError {
    /// A failure that may go away by itself (the file is being written, the copy could not
    /// be made, the plugin directory is fixed): retried on the next check, never cached for
    /// the content. (A missing file is retried when it appears.)
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unstable(_) | Self::PluginDir(_) | Self::CopyFailed(_))
    }
}

/// How long a plugin file must go unchanged (size, mtime, ctime, inode) before its content
/// is accepted: a file copied in place in chunks (scp, a slow `cp`) is read only once the
/// writer has stopped.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// Loaded libraries by content hash, and deterministic load failures by content hash, so a
/// broken file is not re-run on every config change.
pub struct Loader {
    dir: PathBuf,
    by_hash: Mutex<HashMap<String, Result<Arc<Library>, PluginError>>>,
    /// Each plugin file's content hash and what `stat` said when it was taken: a file whose
    /// size, mtime, ctime and inode are unchanged is not read and hashed again.
    hashed: Mutex<HashMap<PathBuf, (Stamp, String)>>,
    /// How many times a plugin file was read to be hashed.
    files_hashed: std::sync::atomic::AtomicU64,
    /// How many libraries carrying a Go runtime this process may open (1 but in
    /// development: Go supports one runtime per process, and none is ever freed).
    go_runtimes: usize,
}

/// What `stat` (following symlinks, as mounted ConfigMaps need) says about a file. A
/// rewrite changes mtime and ctime, a replacement (rename, `..data` swap) the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        })
    }
}

/// What loading one Plugin resource gave, for `/config` and acknowledgements.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginReport {
    pub id: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `loaded`, or why not.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdk: Option<String>,
}

/// A load that failed: why, and the content hash of what was refused when the file was
/// read whole (none when it could not be read, or was still changing).
#[derive(Debug, Clone)]
pub struct Refused {
    pub sha256: Option<String>,
    pub error: PluginError,
}

impl Stamp {
    /// How much longer to wait before a file last changed at this stamp counts as settled.
    fn settle_left(&self, settle: std::time::Duration) -> Option<std::time::Duration> {
        let at = |(s, ns): (i64, i64)| {
            let secs = u64::try_from(s).unwrap_or(0);
            std::time::UNIX_EPOCH + std::time::Duration::new(secs, u32::try_from(ns).unwrap_or(0))
        };
        let changed = at(self.mtime).max(at(self.ctime));
        match std::time::SystemTime::now().duration_since(changed) {
            Ok(ago) => settle.checked_sub(ago).filter(|left| !left.is_zero()),
            // Changed "in the future" (clock steps, network filesystems): wait the whole period.
            Err(_) => Some(settle),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Loader {
    pub fn new(dir: PathBuf) -> Self {
        // The hook clock calibrates the TSC on first use (up to 200 ms of spinning): do it
        // at start-up rather than in the first request that runs a hook.
        let _ = Instant::now();
        Self {
            dir,
            by_hash: Mutex::new(HashMap::new()),
            hashed: Mutex::new(HashMap::new()),
            files_hashed: Default::default(),
            go_runtimes: 1,
        }
    }

    /// Allows up to `n` Go runtimes in this process (`--dev-go-runtimes`), so a Go bundle
    /// can be reloaded while developing it.
    pub fn with_go_runtimes(mut self, n: usize) -> Self {
        self.go_runtimes = n.max(1);
        self
    }

    /// The hex sha256 of a file, or why it cannot be read. Read and hashed only when its
    /// `stat` changed since the last time.
    pub fn file_hash(&self, path: &Path) -> Result<String, PluginError> {
        let unreadable = |e: std::io::Error| PluginError::Unreadable(e.to_string());
        let before = Stamp::of(path).map_err(unreadable)?;
        if let Some(sha) = self.known_hash(path, &before) {
            return Ok(sha);
        }
        let bytes = std::fs::read(path).map_err(unreadable)?;
        self.files_hashed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sha = sha256_hex(&bytes);
        // Remembered only if the file did not move while being read.
        if Stamp::of(path).ok() == Some(before) {
            self.remember_hash(path, before, &sha);
        }
        Ok(sha)
    }

    fn known_hash(&self, path: &Path, now: &Stamp) -> Option<String> {
        // A poisoned lock only means another caller panicked; the map is still consistent.
        let hashed = self.hashed.lock().unwrap_or_else(|p| p.into_inner());
        hashed.get(path).filter(|(stamp, _)| stamp == now).map(|(_, sha)| sha.clone())
    }

    fn remember_hash(&self, path: &Path, stamp: Stamp, sha: &str) {
        self.hashed.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_path_buf(), (stamp, sha.to_owned()));
    }

    /// How many times a plugin file was read and hashed since start.
    pub fn files_hashed(&self) -> u64 {
        self.files_hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads the content of `path`: from memory when this content was loaded (or refused
    /// for good) before, otherwise read whole once it has settled, checked, copied into the
    /// plugin directory and opened from there. The user's file is never mapped.
    pub fn load(&self, path: &Path, pin: Option<&str>) -> Result<(Arc<Library>, String), Refused> {
        let refused = |sha: &str, error| Refused { sha256: Some(sha.to_owned()), error };
        let unreadable = |e: std::io::Error| Refused { sha256: None, error: PluginError::Unreadable(e.to_string()) };
        let stamp = Stamp::of(path).map_err(unreadable)?;
        let pinned = |sha: &str| match pin {
            Some(pin) if !pin.eq_ignore_ascii_case(sha) => Err(refused(
                sha,
                PluginError::Sha256Mismatch { expected: pin.to_ascii_lowercase(), actual: sha.to_owned() },
            )),
            _ => Ok(()),
        };
        // Content seen before, with its stat unchanged since: the answer is known.
        if let Some(sha) = self.known_hash(path, &stamp)
            && let Some(done) = self.cached(&sha)
        {
            pinned(&sha)?;
            return done.map(|l| (l, sha.clone())).map_err(|e| refused(&sha, e));
        }
        let (bytes, sha) = self.read_settled(path).map_err(|error| Refused { sha256: None, error })?;
        pinned(&sha)?;
        if let Some(done) = self.cached(&sha) {
            return done.map(|l| (l, sha.clone())).map_err(|e| refused(&sha, e));
        }
        let loaded = self.open_new(&sha, &bytes);
        match &loaded {
            Err(e) if e.is_transient() => {}
            _ => {
                self.by_hash.lock().unwrap_or_else(|p| p.into_inner()).insert(sha.clone(), loaded.clone());
            }
        }
        loaded.map(|l| (l, sha.clone())).map_err(|e| refused(&sha, e))
    }

    fn cached(&self, sha: &str) -> Option<Result<Arc<Library>, PluginError>> {
        self.by_hash.lock().unwrap_or_else(|p| p.into_inner()).get(sha).cloned()
    }

    /// Reads the whole file, and accepts the bytes only if its size, times and inode did not
    /// move while it was read nor within `SETTLE` of its last change. A file being copied
    /// in place is refused as `Unstable` (transient) until its writer has stopped.
    fn read_settled(&self, path: &Path) -> Result<(Vec<u8>, String), PluginError> {
        let unreadable = |e: std::io::Error| PluginError::Unreadable(e.to_string());
        let before = Stamp::of(path).map_err(unreadable)?;
        let bytes = std::fs::read(path).map_err(unreadable)?;
        self.files_hashed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sha = sha256_hex(&bytes);
        if Stamp::of(path).map_err(unreadable)? != before || bytes.len() as u64 != before.len {
            return Err(PluginError::Unstable("it changed while it was read".to_owned()));
        }
        if let Some(left) = before.settle_left(SETTLE) {
            // Written moments ago: a writer pausing between chunks would write again soon.
            std::thread::sleep(left);
            if Stamp::of(path).map_err(unreadable)? != before {
                return Err(PluginError::Unstable(format!("it changed again within {}ms", SETTLE.as_millis())));
            }
        }
        self.remember_hash(path, before, &sha);
        Ok((bytes, sha))
    }

    /// Checks new content, copies it in and opens the copy.
    fn open_new(&self, sha: &str, bytes: &[u8]) -> Result<Arc<Library>, PluginError> {
        let checked = elf::check(bytes).map_err(PluginError::NotSharedObject)?;
        let dir = self.private_dir()?;
        let file = copy_in(&dir, sha, bytes)?;
        Library::open(&file, checked.defined, checked.go_runtime, self.go_runtimes).map(Arc::new)
    }

    /// The plugin directory, created `0700` if missing. One that another user owns, or that
    /// group or others can write, is refused: whoever can write there chooses the code the
    /// gateway runs.
    fn private_dir(&self) -> Result<PathBuf, PluginError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let fail = |why: String| PluginError::PluginDir(format!("{}: {why}", self.dir.display()));
        if let Err(e) = std::fs::metadata(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(fail(e.to_string()));
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| fail(format!("cannot create it: {e}")))?;
        }
        let m = std::fs::metadata(&self.dir).map_err(|e| fail(e.to_string()))?;
        if !m.is_dir() {
            return Err(fail("not a directory".to_owned()));
        }
        let me = ffi::effective_uid();
        if m.uid() != me {
            return Err(fail(format!(
                "owned by uid {}, not by the gateway's uid {me}; another user could replace the libraries it loads (give it to the gateway's user, or choose another --plugin-dir)",
                m.uid()
            )));
        }
        let mode = m.mode() & 0o7777;
        if mode & 0o022 != 0 {
            let who = if mode & 0o002 != 0 { "everyone" } else { "its group" };
            return Err(fail(format!(
                "writable by {who} (mode {mode:o}); others could replace the libraries it loads (chmod go-w it, or choose another --plugin-dir)"
            )));
        }
        // Absolute, so that the name the dynamic loader keeps is the one `inside_library`
        // compares against.
        std::fs::canonicalize(&self.dir).map_err(|e| fail(e.to_string()))
    }
}

/// Writes `bytes` to `<dir>/<sha>.so` through a temporary file, fsync and rename, unless a
/// copy with that exact content is already there, then checks what is on disk: a new path
/// per content is what makes the dynamic loader treat a changed plugin as a new library,
/// and only a verified copy is ever opened.
fn copy_in(dir: &Path, sha: &str, bytes: &[u8]) -> Result<PathBuf, PluginError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let target = dir.join(format!("{sha}.so"));
    match std::fs::read(&target) {
        Ok(existing) if sha256_hex(&existing) == sha => return Ok(target),
        Ok(_) => {
            tracing::warn!(file = %target.display(), "a plugin copy does not match its content hash (truncated or replaced); writing it again");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %target.display(), error = %e, "cannot read a plugin copy; writing it again"),
    }
    let seq = TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{sha}.{}.{seq}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        // The rename itself is durable only once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(PluginError::CopyFailed(format!("{}: {e}", target.display())));
    }
    let written = std::fs::read(&target).map_err(|e| PluginError::CopyFailed(format!("{}: {e}", target.display())))?;
    if sha256_hex(&written) != sha {
        return Err(PluginError::CopyFailed(format!("{}: the copy does not match its content hash", target.display())));
    }
    Ok(target)
}

/// One `middleware` entry, bound to its plugin's hook and instance.
pub struct HookCall {
    pub plugin: Arc<str>,
    pub path: Arc<str>,
    pub symbol: Arc<str>,
    pub phase: Phase,
    instance: Instance,
    duration: Histogram,
    errors: IntCounter,
    panics: IntCounter,
    /// Set once a misuse of the host API by this hook (a `gh_call` used outside its call,
    /// a header change while iterating) has been logged, so a loop cannot flood the log.
    misuse_logged: AtomicBool,
    /// Set once a failure of this analytics hook has been logged (every one is counted).
    failure_logged: AtomicBool,
}

impl HookCall {
    /// Whether the hook reads the body of its phase (request, or response in `response`),
    /// which must then be buffered before the phase runs.
    pub fn wants_body(&self) -> bool {
        self.instance.wants_body(self.phase)
    }
}

/// The library each Plugin resource is served by, and its content hash: what the next
/// build falls back to when a Plugin's new content cannot be loaded.
#[derive(Clone, Default)]
pub struct ServedPlugins(HashMap<String, (String, Arc<Library>)>);

/// The series hook calls are counted in, registered by the dataplane with its other
/// metrics. `duration` is labelled plugin, symbol, phase, event; `failures` the same and
/// kind (`error`, `panic`). Each bound hook resolves its own handles once.
#[derive(Clone, Copy)]
pub struct HookMetrics<'a> {
    pub duration: &'a HistogramVec,
    pub failures: &'a IntCounterVec,
}

/// Loads every Plugin of a snapshot (memoised per build) and binds entries to hooks.
pub struct ChainBuilder<'a> {
    snapshot: &'a Snapshot,
    metrics: HookMetrics<'a>,
    libs: HashMap<String, Result<Arc<Library>, PluginError>>,
    pub reports: Vec<PluginReport>,
    served: ServedPlugins,
    /// Per Plugin file, the content hash last examined for good (loaded or refused for
    /// that content); none when it could not be examined, so the next check retries.
    files: Vec<(String, Option<String>)>,
    retry: bool,
}

impl<'a> ChainBuilder<'a> {
    /// Loads each Plugin. When a Plugin's file holds new content that cannot be loaded,
    /// the library `prev` served for that Plugin keeps serving (if it satisfies the
    /// Plugin's pin); a Plugin that never loaded gets its `failurePolicy`.
    pub fn new(
        snapshot: &'a Snapshot,
        loader: &'a Loader,
        metrics: HookMetrics<'a>,
        prev: Option<&ServedPlugins>,
    ) -> Self {
        let mut b = Self {
            snapshot,
            metrics,
            libs: HashMap::new(),
            reports: Vec::new(),
            served: ServedPlugins::default(),
            files: Vec::new(),
            retry: false,
        };
        for (id, p) in &snapshot.plugins {
            let pin = p.spec.sha256.as_deref();
            let (state, sha, lib) = match loader.load(Path::new(&p.spec.path), pin) {
                Ok((lib, sha)) => {
                    b.files.push((p.spec.path.clone(), Some(sha.clone())));
                    ("loaded".to_owned(), Some(sha), Ok(lib))
                }
                Err(Refused { sha256, error }) => {
                    let transient = error.is_transient();
                    b.retry |= transient;
                    b.files.push((p.spec.path.clone(), if transient { None } else { sha256.clone() }));
                    let previous = prev
                        .and_then(|s| s.0.get(id))
                        .filter(|(old, _)| pin.is_none_or(|pin| pin.eq_ignore_ascii_case(old)));
                    let refused =
                        sha256.as_deref().map_or_else(|| "new content".to_owned(), |s| format!("new content {s}"));
                    match previous {
                        Some((old, lib)) => {
                            tracing::warn!(plugin = %id, path = %p.spec.path, serving = %old, refused = sha256.as_deref().unwrap_or(""), reason = %error, "plugin file not loaded; serving its previous version");
                            (format!("serving {old}; {refused} refused: {error}"), Some(old.clone()), Ok(lib.clone()))
                        }
                        None => {
                            tracing::warn!(plugin = %id, path = %p.spec.path, refused = sha256.as_deref().unwrap_or(""), reason = %error, "plugin not loaded");
                            (error.to_string(), None, Err(error))
                        }
                    }
                }
            };
            if let (Some(sha), Ok(lib)) = (&sha, &lib) {
                b.served.0.insert(id.clone(), (sha.clone(), lib.clone()));
            }
            let sdk = lib.as_ref().ok().map(|l| l.sdk());
            b.reports.push(PluginReport { id: id.clone(), path: p.spec.path.clone(), sha256: sha, state, sdk });
            b.libs.insert(id.clone(), lib);
        }
        b
    }

    /// Per Plugin file, the content hash examined, to notice the file changing.
    pub fn checked_files(&self) -> Vec<(String, Option<String>)> {
        self.files.clone()
    }

    /// Whether some Plugin failed for a reason that may pass (a file still being written):
    /// its file should be looked at again soon even if nothing else changes.
    pub fn retry_pending(&self) -> bool {
        self.retry
    }

    /// The libraries this build serves, for the next build to fall back to.
    pub fn served(&self) -> ServedPlugins {
        self.served.clone()
    }

    /// Binds one entry of Plugin `plugin_id` (`namespace/name`) to its hook for `phase`;
    /// a failure comes with the Plugin's `failurePolicy`, for the caller to apply.
    pub fn bind(&self, plugin_id: &str, phase: Phase, r: &PluginRef) -> Result<HookCall, (FailurePolicy, PluginError)> {
        let Some(entry) = self.snapshot.plugins.get(plugin_id) else {
            return Err((FailurePolicy::Fail, PluginError::NoSuchPlugin(r.plugin.clone())));
        };
        let policy = entry.spec.failure_policy;
        let lib = match self.libs.get(plugin_id) {
            Some(Ok(lib)) => lib.clone(),
            Some(Err(e)) => return Err((policy, e.clone())),
            None => return Err((policy, PluginError::NoSuchPlugin(r.plugin.clone()))),
        };
        let hook = lib.hook(&r.symbol, phase).map_err(|e| (policy, e))?;
        let config = r.config.as_ref().map_or_else(|| "null".to_owned(), |c| c.to_string());
        let instance = Instance::create(lib, hook, &config).map_err(|e| (policy, e))?;
        let path = entry.spec.path.as_str();
        let event = format!("NativePluginMiddleware:{path}:{}", r.symbol);
        let labels = [path, r.symbol.as_str(), phase.as_str(), event.as_str()];
        let m = self.metrics;
        Ok(HookCall {
            plugin: Arc::from(plugin_id),
            path: Arc::from(path),
            symbol: Arc::from(r.symbol.as_str()),
            phase,
            instance,
            duration: m.duration.with_label_values(&labels),
            errors: m.failures.with_label_values(&[path, r.symbol.as_str(), phase.as_str(), event.as_str(), "error"]),
            panics: m.failures.with_label_values(&[path, r.symbol.as_str(), phase.as_str(), event.as_str(), "panic"]),
            misuse_logged: AtomicBool::new(false),
            failure_logged: AtomicBool::new(false),
        })
    }
}

/// The request as hooks see and change it.
pub struct RequestState {
    pub parts: request::Parts,
    /// Buffered (a hook asked) or replaced (a hook set it) body.
    pub body: Option<Bytes>,
    pub body_set: bool,
}

/// A response: the one a request hook builds, or the upstream's in response hooks.
pub struct ResponseState {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    pub body_set: bool,
}

impl Default for ResponseState {
    fn default() -> Self {
        Self { status: StatusCode::OK, headers: HeaderMap::new(), body: None, body_set: false }
    }
}

/// The host's side of one hook call; `gh_call` points at it.
pub struct CallCtx<'a> {
    req: &'a mut RequestState,
    resp: &'a mut ResponseState,
    session: &'a mut dyn SessionSlot,
    api: &'a dyn HookApi,
    hook: &'a HookCall,
    peer: SocketAddr,
    error: Option<String>,
    /// The status a failing hook asked for (`set_error_status`), instead of 500.
    error_status: Option<StatusCode>,
    // Caches filled through `&self`, so reads need no `&mut` (see `ffi::ctx_ref`).
    ip_text: OnceCell<String>,
    session_text: OnceCell<String>,
}

impl CallCtx<'_> {
    fn headers(&self, target: gh_target) -> &HeaderMap {
        if target == abi::GH_RESPONSE { &self.resp.headers } else { &self.req.parts.headers }
    }

    fn headers_mut(&mut self, target: gh_target) -> &mut HeaderMap {
        if target == abi::GH_RESPONSE { &mut self.resp.headers } else { &mut self.req.parts.headers }
    }

    fn body(&self, target: gh_target) -> Option<&[u8]> {
        if target == abi::GH_RESPONSE { self.resp.body.as_deref() } else { self.req.body.as_deref() }
    }

    fn set_body(&mut self, target: gh_target, body: Bytes) {
        if target == abi::GH_RESPONSE {
            self.resp.body = Some(body);
            self.resp.body_set = true;
        } else {
            self.req.body = Some(body);
            self.req.body_set = true;
        }
    }

    fn client_ip(&self) -> &str {
        self.ip_text.get_or_init(|| self.peer.ip().to_string())
    }

    fn session_json(&self) -> Option<&str> {
        let s = self.session.get()?;
        Some(self.session_text.get_or_init(|| session_to_json(&s).to_string()))
    }

    fn set_session_meta(&mut self, key: &str, value: &str) -> i32 {
        // Copy-on-write: the key's shared session is never changed, only this request's.
        let Some(s) = self.session.key_session_mut() else { return 0 };
        s.meta_data.insert(key.to_owned(), value.to_owned());
        self.session_text = OnceCell::new();
        1
    }

    #[allow(clippy::too_many_arguments)]
    fn create_session(
        &mut self,
        id: &str,
        alias: &str,
        rate: u64,
        per_ms: u64,
        quota_max: i64,
        renewal_ms: u64,
        rights: Vec<String>,
        meta: Vec<(String, String)>,
    ) -> i32 {
        if self.hook.phase != Phase::AuthCheck || id.is_empty() {
            return -1;
        }
        let ms = |v: u64| gatehouse_crds::Duration(std::time::Duration::from_millis(v));
        let limited = rate > 0 && per_ms > 0;
        let session = KeySession {
            rate: limited.then_some(rate),
            per: limited.then(|| ms(per_ms)),
            quota_max: if quota_max >= 0 && renewal_ms > 0 { quota_max } else { -1 },
            quota_renewal: (quota_max >= 0 && renewal_ms > 0).then(|| ms(renewal_ms)),
            access_rights: if rights.is_empty() { vec![self.api.name().to_owned()] } else { rights },
            meta_data: meta.into_iter().collect(),
            ..KeySession::default()
        };
        let namespace = self.api.namespace();
        self.session.set(NewSession { namespace, plugin: &self.hook.plugin, id, alias, session });
        self.session_text = OnceCell::new();
        1
    }
}

/// Tyk's `SessionState` field names where one exists.
fn session_to_json(s: &SessionView<'_>) -> serde_json::Value {
    let k = s.session;
    serde_json::json!({
        "id": s.alias,
        // The keyed id, as in analytics: plugins log what they see, and a plain hash of
        // the key in a log can be tested against guesses offline.
        "key_hash": s.key_id.unwrap_or_default(),
        "rate": k.rate,
        "per": k.per.map(|p| p.as_std().as_secs_f64()),
        "quota_max": k.quota_max,
        "quota_renewal_rate": k.quota_renewal.map(|p| p.as_std().as_secs_f64()),
        "access_rights": k.access_rights,
        "meta_data": k.meta_data,
        "expires": k.expires.map(|t| t.to_string()),
    })
}

/// What a phase decided.
pub enum Next {
    Continue,
    /// A hook answered; send `ResponseState` as it is.
    Respond,
}

/// Everything a phase's hooks may read or change.
pub struct Exchange<'a> {
    pub req: &'a mut RequestState,
    pub resp: &'a mut ResponseState,
    /// The request's session; an `authCheck` hook may create it, any hook change its
    /// metadata (copy-on-write).
    pub session: &'a mut dyn SessionSlot,
    pub api: &'a dyn HookApi,
    pub peer: SocketAddr,
}

/// Why a hook stopped the request with an error; the dataplane turns it into its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookFailure {
    /// The hook failed or panicked: 500.
    Failed,
    /// The hook failed with the status it chose (`set_error_status`, 4xx or 5xx).
    Refused(StatusCode),
}

impl HookFailure {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Refused(status) => status,
        }
    }
}

impl HookCall {
    /// Runs this hook, timed from `started` and counted; a failure or caught panic becomes
    /// a 500. Returns when it ended, which is when the next hook starts.
    fn run(&self, x: &mut Exchange<'_>, started: Instant) -> (Result<Next, HookFailure>, Instant) {
        let mut ctx = CallCtx {
            req: x.req,
            resp: x.resp,
            session: &mut *x.session,
            api: x.api,
            hook: self,
            peer: x.peer,
            error: None,
            error_status: None,
            ip_text: OnceCell::new(),
            session_text: OnceCell::new(),
        };
        let status = self.instance.call(self.phase, &mut ctx);
        let ended = Instant::now();
        self.duration.observe((ended - started).as_secs_f64());
        let next = match status {
            abi::GH_CONTINUE => Ok(Next::Continue),
            abi::GH_RESPOND => Ok(Next::Respond),
            other => {
                let counter = if other == abi::GH_PANIC { &self.panics } else { &self.errors };
                counter.inc();
                let reason = ctx.error.unwrap_or_else(|| format!("hook returned status {other}"));
                let answer = match ctx.error_status {
                    Some(status) if other == abi::GH_ERROR => HookFailure::Refused(status),
                    _ => HookFailure::Failed,
                };
                tracing::warn!(api = %x.api.id(), plugin = %self.path, symbol = %self.symbol, phase = %self.phase, %reason, status = answer.status().as_u16(), "plugin hook failed");
                Err(answer)
            }
        };
        (next, ended)
    }
}

/// Runs hooks in order until one answers. One clock read per hook, plus one: each hook's
/// end is the next one's start. The clock is the TSC (`quanta`), not `clock_gettime`: two
/// reads of the latter were half of a no-op hook's cost.
pub fn run_phase(hooks: &[HookCall], x: &mut Exchange<'_>) -> Result<Next, HookFailure> {
    if hooks.is_empty() {
        return Ok(Next::Continue);
    }
    let mut at = Instant::now();
    for h in hooks {
        let (next, ended) = h.run(x, at);
        at = ended;
        if let Next::Respond = next? {
            return Ok(Next::Respond);
        }
    }
    Ok(Next::Continue)
}

/// RFC 3986 `pchar` without `%` (checked apart, with its two hex digits).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// Bytes that are URI characters: `allowed` ones, or `%` and two hex digits.
fn uri_chars(s: &[u8], allowed: impl Fn(u8) -> bool) -> bool {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if !(i + 2 < s.len() && s[i + 1].is_ascii_hexdigit() && s[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if allowed(s[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// `uri` with a plugin's new path: origin-form, normalised by the same rules as incoming
/// requests, the query kept.
fn rewrite_path(uri: &http::Uri, path: &[u8]) -> Result<http::Uri, String> {
    if path.first() != Some(&b'/') {
        return Err("not origin-form: it must start with '/'".to_owned());
    }
    if !uri_chars(path, |b| b == b'/' || is_pchar(b)) {
        return Err("only URI path characters are allowed ('?' and '#' are not)".to_owned());
    }
    // Only ASCII passed the check above.
    let path = std::str::from_utf8(path).map_err(|e| e.to_string())?;
    let normal = gatehouse_path::normalise(path).map_err(|e| e.to_string())?;
    with_path_and_query(uri, &normal, uri.query())
}

/// `uri` with a plugin's new query (empty removes it).
fn rewrite_query(uri: &http::Uri, query: &[u8]) -> Result<http::Uri, String> {
    if !uri_chars(query, |b| b == b'/' || b == b'?' || is_pchar(b)) {
        return Err("only URI query characters are allowed".to_owned());
    }
    let query = std::str::from_utf8(query).map_err(|e| e.to_string())?;
    with_path_and_query(uri, uri.path(), (!query.is_empty()).then_some(query))
}

fn with_path_and_query(uri: &http::Uri, path: &str, query: Option<&str>) -> Result<http::Uri, String> {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).map_err(|e| e.to_string())?);
    http::Uri::from_parts(parts).map_err(|e| e.to_string())
}

fn log_from_hook(c: &CallCtx<'_>, level: gh_level, msg: &str) {
    log_for_hook(c.api, c.hook, level, msg);
}

fn log_for_hook(api: &dyn HookApi, hook: &HookCall, level: gh_level, msg: &str) {
    let (api, plugin, symbol, phase) = (api.id(), &*hook.path, &*hook.symbol, hook.phase.as_str());
    match level {
        abi::GH_LOG_ERROR => tracing::error!(target: "plugin", api, plugin, symbol, phase, "{msg}"),
        abi::GH_LOG_WARN => tracing::warn!(target: "plugin", api, plugin, symbol, phase, "{msg}"),
        abi::GH_LOG_INFO => tracing::info!(target: "plugin", api, plugin, symbol, phase, "{msg}"),
        _ => tracing::debug!(target: "plugin", api, plugin, symbol, phase, "{msg}"),
    }
}

fn log_from_plugin(level: gh_level, msg: &str) {
    match level {
        abi::GH_LOG_ERROR => tracing::error!(target: "plugin", "{msg}"),
        abi::GH_LOG_WARN => tracing::warn!(target: "plugin", "{msg}"),
        abi::GH_LOG_INFO => tracing::info!(target: "plugin", "{msg}"),
        _ => tracing::debug!(target: "plugin", "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_file_is_hashed_again_only_when_its_stat_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("libp.so");
        std::fs::write(&file, b"one").expect("write");
        let loader = Loader::new(dir.path().join("cache"));
        let first = loader.file_hash(&file).expect("hash");
        assert_eq!(first, hex::encode(Sha256::digest(b"one")));
        for _ in 0..5 {
            assert_eq!(loader.file_hash(&file).expect("hash"), first);
        }
        assert_eq!(loader.files_hashed(), 1, "unchanged files are not read again");

        // Replaced by rename (as a ConfigMap update or `cp` + `mv` does): a new inode.
        let tmp = dir.path().join(".libp.so.tmp");
        std::fs::write(&tmp, b"two").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        assert_eq!(loader.file_hash(&file).expect("hash"), hex::encode(Sha256::digest(b"two")));
        assert_eq!(loader.files_hashed(), 2);

        std::fs::remove_file(&file).expect("remove");
        assert!(matches!(loader.file_hash(&file), Err(PluginError::Unreadable(_))));
    }
}
