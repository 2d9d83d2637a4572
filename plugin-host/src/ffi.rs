//! The plugin boundary: opening shared objects, reading their declaration, calling hooks,
//! and the table of host functions hooks call back into. The only `unsafe` of the gateway
//! (outside the plugin SDK) lives here.
#![allow(unsafe_code)]

use std::{
    cell::Cell,
    collections::HashMap,
    ffi::{CStr, c_void},
    mem::offset_of,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use gatehouse_plugin::abi::*;
use http::{HeaderName, HeaderValue, StatusCode};
use libloading::os::unix::{Library as DlHandle, RTLD_LOCAL, RTLD_NOW};

use super::{CallCtx, HookApi, Phase, PluginError, analytics::RecordCtx, elf::Defined};

/// A loaded library. Never unloaded: `dlclose` is unsound for Rust libraries (thread-local
/// destructors, statics), so the handle is leaked on purpose.
pub struct Library {
    lib: &'static DlHandle,
    decl: Decl,
    /// The private copy it was opened from, as the dynamic loader names it.
    path: PathBuf,
    /// What the plugin's own `.dynsym` defines (from `elf::check`).
    defined: HashMap<String, Defined>,
    /// Live instances made from this library's hooks, across every runtime: at zero, no
    /// runtime uses it, and a 1.1 plugin is told so (`quiesce`).
    uses: AtomicUsize,
}

/// The declaration's fields, copied out. A 1.0 plugin's `gh_plugin` is shorter than this
/// host's, so no reference to the whole struct is ever made: each field is read through the
/// pointer, the 1.1 ones only when `abi_minor` says they exist.
#[derive(Clone, Copy)]
struct Decl {
    abi_minor: u16,
    sdk: gh_str,
    find_hook: Option<unsafe extern "C" fn(name: gh_str) -> *const gh_hook>,
    quiesce: Option<unsafe extern "C" fn()>,
}

// SAFETY: the declaration's views and functions point into the library's static data and
// code, which live (never unloaded) and are immutable; the ABI makes them thread-safe.
unsafe impl Send for Decl {}
// SAFETY: as above.
unsafe impl Sync for Decl {}

/// The files of the libraries carrying a Go runtime (built by Go, or declaring
/// `GH_PLUGIN_GO_RUNTIME`), in load order. Never shrinks: a Go runtime is never unloaded.
static GO_RUNTIMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Counts one more Go runtime in this process, or refuses it past `max`.
fn admit_go_runtime(file: &Path, max: usize) -> Result<(), PluginError> {
    // A poisoned lock only means another load panicked; the list is still right.
    let mut go = GO_RUNTIMES.lock().unwrap_or_else(|p| p.into_inner());
    match go.first() {
        Some(first) if max <= 1 => Err(PluginError::SecondGoRuntime { first: first.clone() }),
        Some(_) if go.len() >= max => Err(PluginError::GoRuntimesExhausted { max }),
        _ => {
            go.push(file.display().to_string());
            Ok(())
        }
    }
}

impl Library {
    /// Opens `file` (a checked private copy whose own symbols are `defined`), checks its
    /// declaration and runs its `init`. `go_built`: the file was built by Go; at most
    /// `max_go` libraries carrying a Go runtime are opened in this process.
    pub fn open(
        file: &Path,
        defined: HashMap<String, Defined>,
        go_built: bool,
        max_go: usize,
    ) -> Result<Self, PluginError> {
        // Checked before `dlopen`, so the initialisers of a library that is no plugin never run.
        if !defined.get(GH_DECLARATION_SYMBOL).is_some_and(|d| d.is_data_object()) {
            return Err(PluginError::NoDeclaration);
        }
        // A Go library's runtime starts inside `dlopen`: one too many is refused before.
        if go_built {
            admit_go_runtime(file, max_go)?;
        }
        // SAFETY: loading runs the library's initialisers. That is the point of a plugin:
        // the operator chose to trust this file (and may pin its sha256). The file is a
        // complete, hash-verified private copy (see `Loader::load`). RTLD_NOW: an
        // unresolved symbol refuses the load here instead of killing the process at its
        // first call; RTLD_LOCAL: a plugin's symbols never satisfy another's.
        let lib = unsafe { DlHandle::open(Some(file), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| PluginError::DlopenFailed(dl_error_text(&e)))?;
        let lib: &'static DlHandle = Box::leak(Box::new(lib));
        let path = file.to_path_buf();
        // SAFETY: the symbol is read as a pointer to a `gh_plugin` static; its fields are
        // checked (magic first) before any is trusted.
        let decl: *const gh_plugin = unsafe { lib.get::<*const gh_plugin>(GH_DECLARATION_SYMBOL.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| PluginError::NoDeclaration)?;
        inside_library(decl.cast(), &path).map_err(|_| PluginError::NoDeclaration)?;
        if decl.is_null() {
            return Err(PluginError::NoDeclaration);
        }
        // SAFETY: a non-null address of the exported static, which lives as long as the
        // library (never unloaded). Every ABI 1.x declaration starts with the 1.0 fields;
        // they are read one by one, never as a whole struct (it may be a shorter 1.0 one).
        let (magic, abi_major, abi_minor, flags) =
            unsafe { ((*decl).magic, (*decl).abi_major, (*decl).abi_minor, (*decl).flags) };
        if magic != GH_MAGIC {
            return Err(PluginError::NoDeclaration);
        }
        // SAFETY: after the magic matched, the 1.0 fields are the ones this ABI describes.
        let (sdk_view, init) = unsafe { ((*decl).sdk, (*decl).init) };
        // SAFETY: the view points into the library's static data.
        let sdk = String::from_utf8_lossy(unsafe { sdk_view.as_bytes() }).into_owned();
        if abi_major != GH_ABI_MAJOR {
            return Err(PluginError::AbiMajor { plugin: abi_major, host: GH_ABI_MAJOR, sdk });
        }
        if flags & GH_PLUGIN_PANIC_SAFE == 0 {
            return Err(PluginError::NotPanicSafe { sdk });
        }
        let (find_hook, quiesce) = if abi_minor >= 1 {
            // SAFETY: a 1.1 declaration has these fields.
            unsafe { ((*decl).find_hook, (*decl).quiesce) }
        } else {
            (None, None)
        };
        if abi_minor >= 1 && find_hook.is_none() {
            return Err(PluginError::NoFindHook { minor: abi_minor, sdk });
        }
        if flags & GH_PLUGIN_GO_RUNTIME != 0 && !go_built {
            // A runtime the ELF file did not show (not built by Go's linker): refused
            // before `init`, so it never starts serving.
            admit_go_runtime(file, max_go)?;
        }
        if let Some(init) = init {
            let mut err = ErrBuf::new();
            // SAFETY: `init` is the plugin's entry point per the checked declaration; the
            // host table is a static; `err` is a valid buffer.
            let rc = unsafe { init(&HOST_API, err.raw()) };
            if rc != 0 {
                return Err(PluginError::InitFailed(err.message()));
            }
        }
        let decl = Decl { abi_minor, sdk: sdk_view, find_hook, quiesce };
        Ok(Self { lib, decl, path, defined, uses: AtomicUsize::new(0) })
    }

    pub fn sdk(&self) -> String {
        // SAFETY: the declaration's `sdk` view points into the library's static data.
        String::from_utf8_lossy(unsafe { self.decl.sdk.as_bytes() }).into_owned()
    }

    /// The hook named `symbol`, checked for `phase`: through the plugin's own `find_hook`
    /// for ABI 1.1 plugins, from the dynamic symbol table for 1.0 ones.
    pub fn hook(&self, symbol: &str, phase: Phase) -> Result<Hook, PluginError> {
        let missing = || PluginError::MissingSymbol(symbol.to_owned());
        if symbol == GH_DECLARATION_SYMBOL || symbol.as_bytes().contains(&0) {
            return Err(missing());
        }
        let not_a_hook = |why: String| PluginError::NotAHook { symbol: symbol.to_owned(), why };
        let (hook, object_size) = if let (true, Some(find_hook)) = (self.decl.abi_minor >= 1, self.decl.find_hook) {
            // ABI 1.1: only the plugin's own declaration names hooks.
            // SAFETY: the plugin's lookup per its checked 1.1 declaration; `symbol` is
            // readable for the call. The ABI requires a static table or null.
            let found = unsafe { find_hook(gh_str::new(symbol.as_bytes())) };
            if found.is_null() {
                return Err(PluginError::UnknownHook(symbol.to_owned()));
            }
            inside_library(found.cast(), &self.path).map_err(not_a_hook)?;
            (found, None)
        } else {
            // SAFETY: only the address is taken here; it is dereferenced below, after the
            // checks that it is a `gh_hook` the plugin itself defines.
            let found: *const gh_hook =
                unsafe { self.lib.get::<*const gh_hook>(symbol.as_bytes()) }.map(|s| *s).map_err(|_| missing())?;
            // ABI 1.0: a hook is a `gh_hook` the plugin itself exports under `symbol`.
            let size = match defined_hook_object(&self.defined, symbol) {
                Ok(size) => size,
                Err(why) => {
                    // Say where it did resolve: the likeliest mistake is a name from a dependency.
                    let why = match inside_library(found.cast(), &self.path) {
                        Err(elsewhere) => format!("{why}; {elsewhere}"),
                        Ok(()) => why,
                    };
                    return Err(not_a_hook(why));
                }
            };
            inside_library(found.cast(), &self.path).map_err(not_a_hook)?;
            if found.is_null() {
                return Err(missing());
            }
            (found, Some(size))
        };
        // SAFETY: a non-null address of a static in a library that is never unloaded, at
        // least as long as its ELF symbol says when that is known.
        let hook = unsafe { Hook::read(hook, object_size) }.map_err(not_a_hook)?;
        let handles = match phase {
            Phase::Response => hook.on_response.is_some(),
            Phase::Analytics => hook.on_analytics.is_some(),
            _ => hook.on_request.is_some(),
        };
        if !handles {
            return Err(PluginError::PhaseNotHandled { symbol: symbol.to_owned(), phase });
        }
        Ok(hook)
    }
}

/// Checks that `symbol` is a data object (`STT_OBJECT`) the plugin defines in its own
/// dynamic symbol table, at least a 1.0 `gh_hook`'s size (a 1.0 plugin built with a newer
/// header has a longer table), and returns that size. `dlsym` alone would also return
/// functions and data of the libraries the plugin links (`malloc`, `environ`), which the
/// host would then call as a hook table.
fn defined_hook_object(defined: &HashMap<String, Defined>, symbol: &str) -> Result<u64, String> {
    let Some(d) = defined.get(symbol) else {
        return Err("the plugin's own dynamic symbol table does not define it".to_owned());
    };
    if !d.is_data_object() {
        return Err(format!("it is a {}, not a gh_hook table", d.kind_name()));
    }
    let min = GH_HOOK_SIZE_1_0 as u64;
    if d.size < min {
        return Err(format!("it is a {}-byte data object, not a gh_hook table (at least {min} bytes)", d.size));
    }
    Ok(d.size)
}

/// Checks, with `dladdr`, that `addr` lies inside the library opened from `path` rather
/// than in one of its dependencies.
fn inside_library(addr: *const c_void, path: &Path) -> Result<(), String> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: `dladdr` only reads the loader's own tables and writes `info`.
    let found = unsafe { libc::dladdr(addr, &mut info) } != 0;
    if !found || info.dli_fname.is_null() {
        return Err("its address lies in no loaded library".to_owned());
    }
    // SAFETY: a non-null `dli_fname` is the NUL-terminated name the loader keeps for the
    // object, alive while it is loaded (these never unload).
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    if name.to_bytes() == path.as_os_str().as_bytes() {
        Ok(())
    } else {
        Err(format!("it resolves into {}, not into the plugin", name.to_string_lossy()))
    }
}

/// dlerror's own text (which names the missing symbol or the broken file), not a summary.
fn dl_error_text(e: &libloading::Error) -> String {
    // libloading's own message is only "dlopen failed"; dlerror's text is its source.
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

/// The effective uid of this process, which must own the plugin directory.
pub fn effective_uid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A hook table's fields, copied out once when a chain is built: a 1.0 table is shorter
/// than this host's `gh_hook`, so fields are read through the pointer as `size` allows.
#[derive(Clone, Copy)]
pub struct Hook {
    raw: *const gh_hook,
    flags: u32,
    create: Option<unsafe extern "C" fn(gh_str, *mut *mut c_void, *mut gh_buf) -> i32>,
    create_for: Option<unsafe extern "C" fn(*const gh_hook, gh_str, *mut *mut c_void, *mut gh_buf) -> i32>,
    destroy: Option<unsafe extern "C" fn(*mut c_void)>,
    on_request: Option<unsafe extern "C" fn(*mut c_void, *mut gh_call) -> gh_status>,
    on_response: Option<unsafe extern "C" fn(*mut c_void, *mut gh_call) -> gh_status>,
    on_analytics: Option<unsafe extern "C" fn(*mut c_void, *mut gh_call) -> gh_status>,
}

// SAFETY: the table is a static of a library that is never unloaded; the ABI makes its
// functions callable from any thread.
unsafe impl Send for Hook {}
// SAFETY: as above.
unsafe impl Sync for Hook {}

impl Hook {
    /// The table at `raw`, or why it is not one (too small, longer than its symbol, wrong
    /// magic).
    ///
    /// # Safety
    /// `raw` is the non-null address of a static in a library that is never unloaded, at
    /// least `size` bytes long as its first field says, or `object_size` bytes when given.
    unsafe fn read(raw: *const gh_hook, object_size: Option<u64>) -> Result<Self, String> {
        // SAFETY: per the contract; `size` is the first field of every version.
        let size = unsafe { (*raw).size } as usize;
        if size < GH_HOOK_SIZE_1_0 {
            return Err(format!("its table says it is {size} bytes"));
        }
        if let Some(object) = object_size
            && size as u64 > object
        {
            return Err(format!("its table says it is {size} bytes, but the symbol is {object} bytes"));
        }
        // SAFETY: `size` covers the 1.0 fields; each is read on its own.
        let (flags, create, destroy, on_request, on_response) =
            unsafe { ((*raw).flags, (*raw).create, (*raw).destroy, (*raw).on_request, (*raw).on_response) };
        let (mut create_for, mut on_analytics) = (None, None);
        if size >= offset_of!(gh_hook, magic) + size_of::<u64>() {
            // SAFETY: `size` covers `magic`.
            if unsafe { (*raw).magic } != GH_HOOK_MAGIC {
                return Err("its table is long enough for a magic, but it is not GH_HOOK_MAGIC".to_owned());
            }
            if size >= offset_of!(gh_hook, create_for) + size_of::<usize>() {
                // SAFETY: `size` covers `create_for`.
                create_for = unsafe { (*raw).create_for };
            }
            if size >= offset_of!(gh_hook, on_analytics) + size_of::<usize>() {
                // SAFETY: `size` covers `on_analytics`.
                on_analytics = unsafe { (*raw).on_analytics };
            }
        }
        Ok(Self { raw, flags, create, create_for, destroy, on_request, on_response, on_analytics })
    }
}

/// The hook call running on a thread: the handle the plugin got, and the context it
/// stands for. The handle is a number, unique per call, not the context's address: a
/// handle kept from an earlier call can never match a later call's, even one whose
/// context sits at the same stack address.
#[derive(Clone, Copy)]
struct Current {
    handle: usize,
    ctx: *mut c_void,
    /// What `ctx` points at: a `CallCtx` (request phases) or a `RecordCtx` (analytics).
    kind: CtxKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CtxKind {
    Exchange,
    Record,
}

const NO_CALL: Current = Current { handle: 0, ctx: std::ptr::null_mut(), kind: CtxKind::Exchange };

/// Hands each thread its own range of 2^32 handles (on 64-bit targets), so handles are
/// unique across threads without an atomic per call.
static HANDLE_RANGES: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The only call host calls on this thread accept.
    static CURRENT: Cell<Current> = const { Cell::new(NO_CALL) };
    /// This thread's handle range and the last handle it gave out.
    static LAST_HANDLE: Cell<usize> = const { Cell::new(0) };
    /// Set while `headers_each` runs a plugin callback: the headers are borrowed, so
    /// anything that would need `&mut` on the call is refused.
    static ITERATING: Cell<bool> = const { Cell::new(false) };
}

/// The low bits of a handle count calls; the high bits name the thread's range.
const HANDLE_COUNT_BITS: usize = if usize::BITS > 32 { u32::MAX as usize } else { 0xFFFF };

fn next_handle() -> usize {
    LAST_HANDLE.with(|last| {
        let mut h = last.get();
        if h == 0 {
            h = HANDLE_RANGES.fetch_add(1, Ordering::Relaxed) << HANDLE_COUNT_BITS.count_ones();
        }
        // Wraps within the thread's own range (a handle comes back only after 2^32 calls
        // on one thread) and never has a zero count, so it is never null.
        let count = (h & HANDLE_COUNT_BITS).wrapping_add(1) & HANDLE_COUNT_BITS;
        let next = (h & !HANDLE_COUNT_BITS) | count.max(1);
        last.set(next);
        next
    })
}

/// Set once a plugin used a `gh_call` on a thread running no hook has been logged.
static STRAY_LOGGED: AtomicBool = AtomicBool::new(false);

/// A hook bound to one ApiDefinition entry: the plugin's per-entry instance.
pub struct Instance {
    hook: Hook,
    instance: *mut c_void,
    lib: Arc<Library>,
}

// SAFETY: the ABI requires hooks to be callable from any thread, concurrently, with the
// same instance (the Rust SDK enforces `Send + Sync` on hook state; C plugins promise it).
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    pub fn create(lib: Arc<Library>, hook: Hook, config_json: &str) -> Result<Self, PluginError> {
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut err = ErrBuf::new();
        let config = gh_str::new(config_json.as_bytes());
        // SAFETY: the plugin's constructor per the checked hook table; `config_json`
        // outlives the call; `instance` and `err` are valid places to write; `raw` is the
        // table itself, static.
        let rc = unsafe {
            match (hook.create_for, hook.create) {
                (Some(create_for), _) => create_for(hook.raw, config, &mut instance, err.raw()),
                (None, Some(create)) => create(config, &mut instance, err.raw()),
                (None, None) => 0,
            }
        };
        if rc != 0 {
            return Err(PluginError::CreateFailed(err.message()));
        }
        lib.uses.fetch_add(1, Ordering::AcqRel);
        Ok(Self { hook, instance, lib })
    }

    pub fn wants_body(&self, phase: Phase) -> bool {
        let flag = if phase == Phase::Response { GH_HOOK_RESPONSE_BODY } else { GH_HOOK_REQUEST_BODY };
        self.hook.flags & flag != 0
    }

    /// Runs the hook on `ctx`, which is the current call on this thread until it returns.
    pub fn call(&self, phase: Phase, ctx: &mut CallCtx<'_>) -> gh_status {
        let f = if phase == Phase::Response { self.hook.on_response } else { self.hook.on_request };
        let Some(f) = f else { return GH_CONTINUE };
        let handle = next_handle();
        let prev = CURRENT.replace(Current { handle, ctx: (ctx as *mut CallCtx<'_>).cast(), kind: CtxKind::Exchange });
        // SAFETY: `f` was checked present for this phase when the chain was built; the
        // instance is the one `create` returned. The `gh_call` is an opaque handle that
        // host calls turn back into `ctx` only while it is this thread's current call, and
        // `ctx` outlives the call.
        let status = unsafe { f(self.instance, std::ptr::without_provenance_mut(handle)) };
        CURRENT.set(prev);
        status
    }

    /// Runs the hook's `on_analytics` on `ctx`, the current call on this thread until it
    /// returns.
    pub fn call_analytics(&self, ctx: &mut RecordCtx<'_>) -> gh_status {
        let Some(f) = self.hook.on_analytics else { return GH_CONTINUE };
        let handle = next_handle();
        let prev = CURRENT.replace(Current { handle, ctx: (ctx as *mut RecordCtx<'_>).cast(), kind: CtxKind::Record });
        // SAFETY: as in `call`: `f` was checked present for the analytics phase when the
        // chain was built, and host calls reach `ctx` only while it is current here.
        let status = unsafe { f(self.instance, std::ptr::without_provenance_mut(handle)) };
        CURRENT.set(prev);
        status
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(destroy) = self.hook.destroy {
            // SAFETY: the chain owning this instance is gone, so no call is running; each
            // instance is destroyed once.
            unsafe { destroy(self.instance) };
        }
        if self.lib.uses.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(quiesce) = self.lib.decl.quiesce
        {
            tracing::info!(target: "plugin", sdk = %self.lib.sdk(), "no configuration uses the plugin library any more; quiescing it");
            // SAFETY: the plugin's 1.1 entry point per its checked declaration; no
            // instance of the library is left, so none of its hooks is running.
            unsafe { quiesce() };
        }
    }
}

struct ErrBuf(Vec<u8>, gh_buf);

impl ErrBuf {
    fn new() -> Self {
        let mut v = vec![0u8; 1024];
        let raw = gh_buf { ptr: v.as_mut_ptr(), cap: v.len(), len: 0 };
        Self(v, raw)
    }
    fn raw(&mut self) -> *mut gh_buf {
        &mut self.1
    }
    fn message(&self) -> String {
        let n = self.1.len.min(self.0.len());
        let msg = String::from_utf8_lossy(&self.0[..n]).into_owned();
        if msg.is_empty() { "no reason given".to_owned() } else { msg }
    }
}

// ------------------------------------------------------------------ host API

/// Why a host call was refused, for the log.
#[derive(Clone, Copy)]
enum Misuse {
    /// The `gh_call` is not the one running on this thread (kept after its hook returned,
    /// or used from another thread).
    NotCurrent,
    /// A change to the call from inside a `headers_each` callback.
    WhileIterating,
    /// A request call from an analytics hook, or a record call from a request phase.
    WrongPhase,
}

/// Logs a refused host call: once per hook when a hook is running on this thread (it is
/// the one to blame), else once per process.
fn refuse(what: &str, why: Misuse) {
    let reason = match why {
        Misuse::NotCurrent => {
            "its gh_call is not the hook call running on this thread (kept after the hook returned, or used from another thread)"
        }
        Misuse::WhileIterating => "headers cannot change from inside a headers_each callback",
        Misuse::WrongPhase => {
            "it does not apply to this phase (the record_* calls are for analytics hooks, which cannot reach the request, its headers, bodies or session)"
        }
    };
    let current = CURRENT.get().ctx;
    if current.is_null() {
        if !STRAY_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "plugin", call = what, "refused a host call: {reason} (logged once)");
        }
        return;
    }
    // SAFETY: the current call's context, of the kind `CURRENT` says, live while its hook
    // runs on this thread; only shared access, which is all any host call holds while a
    // hook runs nested callbacks.
    let (api, hook) = match CURRENT.get().kind {
        CtxKind::Exchange => {
            // SAFETY: as above, a `CallCtx`.
            let c = unsafe { &*current.cast::<CallCtx<'_>>() };
            (c.api, c.hook)
        }
        CtxKind::Record => {
            // SAFETY: as above, a `RecordCtx`.
            let c = unsafe { &*current.cast::<RecordCtx<'_>>() };
            (c.api, c.hook)
        }
    };
    if !hook.misuse_logged.swap(true, Ordering::Relaxed) {
        let (api, plugin, symbol, phase) = (api.id(), &*hook.path, &*hook.symbol, hook.phase.as_str());
        tracing::warn!(target: "plugin", api, plugin, symbol, phase, call = what, "refused a host call: {reason} (logged once per hook)");
    }
}

/// The call's context for reading: `call` must be this thread's current call.
///
/// # Safety
/// None beyond the ABI: any pointer is checked against the current call before use.
unsafe fn ctx_ref<'a>(call: *mut gh_call, what: &str) -> Option<&'a CallCtx<'a>> {
    let current = CURRENT.get();
    if call.is_null() || call.addr() != current.handle {
        refuse(what, Misuse::NotCurrent);
        return None;
    }
    if current.kind != CtxKind::Exchange {
        refuse(what, Misuse::WrongPhase);
        return None;
    }
    // SAFETY: the `CallCtx` that `Instance::call` made current on this thread, live until
    // the hook returns. Only shared references exist while a callback runs (`ctx_mut`
    // refuses then), so this one aliases nothing mutable.
    Some(unsafe { &*current.ctx.cast::<CallCtx<'a>>() })
}

/// The call's context for changing it: as `ctx_ref`, and refused while `headers_each`
/// holds the headers borrowed.
///
/// # Safety
/// As `ctx_ref`.
unsafe fn ctx_mut<'a>(call: *mut gh_call, what: &str) -> Option<&'a mut CallCtx<'a>> {
    let current = CURRENT.get();
    if call.is_null() || call.addr() != current.handle {
        refuse(what, Misuse::NotCurrent);
        return None;
    }
    if current.kind != CtxKind::Exchange {
        refuse(what, Misuse::WrongPhase);
        return None;
    }
    if ITERATING.get() {
        refuse(what, Misuse::WhileIterating);
        return None;
    }
    // SAFETY: the current call's context, and no host call on this thread holds a borrow
    // of it (host functions return before the plugin can call again, except
    // `headers_each`, excluded above). Views the plugin holds are raw pointers the ABI
    // invalidates on change.
    Some(unsafe { &mut *current.ctx.cast::<CallCtx<'a>>() })
}

/// # Safety
/// `s` is a view the plugin passed, readable for this call.
unsafe fn bytes<'a>(s: gh_str) -> &'a [u8] {
    // SAFETY: per the contract.
    unsafe { s.as_bytes() }
}

/// # Safety
/// `p` points to `n` readable values, or `n` is 0.
unsafe fn slice<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if p.is_null() || n == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(p, n) }
}

fn view(b: &[u8]) -> gh_str {
    gh_str::new(b)
}

fn write<T>(out: *mut T, v: T) -> i32 {
    // SAFETY: plugins pass a valid place to write, or null (refused).
    match unsafe { out.as_mut() } {
        Some(o) => {
            *o = v;
            1
        }
        None => -1,
    }
}

unsafe extern "C" fn log(call: *mut gh_call, level: gh_level, msg: gh_str) {
    // SAFETY: per the ABI.
    let msg = String::from_utf8_lossy(unsafe { bytes(msg) });
    if call.is_null() {
        return super::log_from_plugin(level, &msg);
    }
    // SAFETY: checked against the current call.
    match unsafe { any_ctx(call, "log") } {
        Some(Ctx::Exchange(c)) => super::log_from_hook(c, level, &msg),
        Some(Ctx::Record(c)) => c.log(level, &msg),
        None => super::log_from_plugin(level, &msg),
    }
}

unsafe extern "C" fn set_error(call: *mut gh_call, msg: gh_str) {
    // SAFETY: the view is readable for the call.
    let msg = String::from_utf8_lossy(unsafe { bytes(msg) }).into_owned();
    // SAFETY: checked against the current call.
    match unsafe { any_ctx(call, "set_error") } {
        Some(Ctx::Record(c)) => c.error = Some(msg),
        // A request's context changes only through `ctx_mut` (it knows `headers_each`).
        // SAFETY: checked against the current call.
        Some(Ctx::Exchange(_)) => {
            if let Some(c) = unsafe { ctx_mut(call, "set_error") } {
                c.error = Some(msg);
            }
        }
        None => {}
    }
}

unsafe extern "C" fn set_error_status(call: *mut gh_call, status: u16) -> i32 {
    // An analytics hook's failure answers nobody: accepted, and without effect.
    // SAFETY: checked against the current call.
    if let Some(Ctx::Record(_)) = unsafe { any_ctx(call, "set_error_status") } {
        return 1;
    }
    // SAFETY: checked against the current call.
    let Some(c) = (unsafe { ctx_mut(call, "set_error_status") }) else { return -1 };
    match StatusCode::from_u16(status) {
        Ok(s) if s.is_client_error() || s.is_server_error() => {
            c.error_status = Some(s);
            1
        }
        _ => -1,
    }
}

unsafe extern "C" fn request_method(call: *mut gh_call) -> gh_str {
    // SAFETY: checked; the view points into the request, alive for the call.
    unsafe { ctx_ref(call, "request_method") }.map_or(gh_str::EMPTY, |c| view(c.req.parts.method.as_str().as_bytes()))
}

unsafe extern "C" fn request_path(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx_ref(call, "request_path") }.map_or(gh_str::EMPTY, |c| view(c.req.parts.uri.path().as_bytes()))
}

unsafe extern "C" fn request_query(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx_ref(call, "request_query") }
        .map_or(gh_str::EMPTY, |c| view(c.req.parts.uri.query().unwrap_or("").as_bytes()))
}

unsafe extern "C" fn client_ip(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx_ref(call, "client_ip") }.map_or(gh_str::EMPTY, |c| view(c.client_ip().as_bytes()))
}

/// Request rewrites: refused in the response phase (the request has been sent).
unsafe fn request_ctx<'a>(call: *mut gh_call, what: &str) -> Option<&'a mut CallCtx<'a>> {
    // SAFETY: per the caller's ABI contract.
    let c = unsafe { ctx_mut(call, what) }?;
    if c.hook.phase == Phase::Response {
        super::log_from_hook(c, GH_LOG_WARN, &format!("{what} refused: the request was already sent upstream"));
        return None;
    }
    Some(c)
}

unsafe extern "C" fn request_set_method(call: *mut gh_call, method: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), method) = (unsafe { request_ctx(call, "request_set_method") }, unsafe { bytes(method) }) else {
        return -1;
    };
    match http::Method::from_bytes(method) {
        Ok(m) => {
            c.req.parts.method = m;
            1
        }
        Err(_) => {
            let shown = String::from_utf8_lossy(method);
            super::log_from_hook(c, GH_LOG_WARN, &format!("request_set_method refused {shown:?}: not an HTTP token"));
            -1
        }
    }
}

unsafe extern "C" fn request_set_path(call: *mut gh_call, path: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), path) = (unsafe { request_ctx(call, "request_set_path") }, unsafe { bytes(path) }) else {
        return -1;
    };
    match super::rewrite_path(&c.req.parts.uri, path) {
        Ok(uri) => {
            c.req.parts.uri = uri;
            1
        }
        Err(why) => {
            let shown = String::from_utf8_lossy(path);
            super::log_from_hook(c, GH_LOG_WARN, &format!("request_set_path refused {shown:?}: {why}"));
            -1
        }
    }
}

unsafe extern "C" fn request_set_query(call: *mut gh_call, query: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), query) = (unsafe { request_ctx(call, "request_set_query") }, unsafe { bytes(query) }) else {
        return -1;
    };
    match super::rewrite_query(&c.req.parts.uri, query) {
        Ok(uri) => {
            c.req.parts.uri = uri;
            1
        }
        Err(why) => {
            let shown = String::from_utf8_lossy(query);
            super::log_from_hook(c, GH_LOG_WARN, &format!("request_set_query refused {shown:?}: {why}"));
            -1
        }
    }
}

unsafe extern "C" fn header_get(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    index: usize,
    out: *mut gh_str,
) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { ctx_ref(call, "header_get") }, unsafe { bytes(name) }) else { return -1 };
    let Ok(name) = HeaderName::from_bytes(name) else { return -1 };
    match c.headers(target).get_all(name).iter().nth(index) {
        Some(v) => write(out, view(v.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn header_values(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    out: *mut gh_str,
    cap: usize,
    count: *mut usize,
) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { ctx_ref(call, "header_values") }, unsafe { bytes(name) }) else { return -1 };
    let Ok(name) = HeaderName::from_bytes(name) else { return -1 };
    if out.is_null() && cap > 0 {
        return -1;
    }
    let mut n = 0usize;
    for v in c.headers(target).get_all(name) {
        if n < cap {
            // SAFETY: the plugin passes room for `cap` views at `out`.
            unsafe { out.add(n).write(view(v.as_bytes())) };
        }
        n += 1;
    }
    if write(count, n) != 1 {
        return -1;
    }
    i32::from(n > 0)
}

unsafe extern "C" fn headers_each(call: *mut gh_call, target: gh_target, cb_ctx: *mut c_void, cb: gh_header_cb) {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_ref(call, "headers_each") }) else { return };
    // Changes are refused until the loop ends: the views handed out and the iterator point
    // into the map. Restored, not cleared, for a nested `headers_each`.
    let was = ITERATING.replace(true);
    for (k, v) in c.headers(target).iter() {
        // SAFETY: the callback is the plugin's, with its own context; the views live
        // through the callback, which cannot change the headers (see `ctx_mut`).
        unsafe { cb(cb_ctx, view(k.as_str().as_bytes()), view(v.as_bytes())) };
    }
    ITERATING.set(was);
}

fn header_pair(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((HeaderName::from_bytes(name).ok()?, HeaderValue::from_bytes(value).ok()?))
}

unsafe extern "C" fn header_set(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name, value) =
        (unsafe { ctx_mut(call, "header_set") }, unsafe { bytes(name) }, unsafe { bytes(value) })
    else {
        return -1;
    };
    let Some((n, v)) = header_pair(name, value) else { return -1 };
    c.headers_mut(target).insert(n, v);
    1
}

unsafe extern "C" fn header_add(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name, value) =
        (unsafe { ctx_mut(call, "header_add") }, unsafe { bytes(name) }, unsafe { bytes(value) })
    else {
        return -1;
    };
    let Some((n, v)) = header_pair(name, value) else { return -1 };
    c.headers_mut(target).append(n, v);
    1
}

unsafe extern "C" fn header_replace(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    values: *const gh_str,
    len: usize,
) -> i32 {
    // SAFETY: per the ABI: `values` holds `len` views readable for the call.
    let (Some(c), name, values) =
        (unsafe { ctx_mut(call, "header_replace") }, unsafe { bytes(name) }, unsafe { slice(values, len) })
    else {
        return -1;
    };
    let Ok(n) = HeaderName::from_bytes(name) else { return -1 };
    // All values are checked (and copied) before any change: all or nothing.
    let mut checked = Vec::with_capacity(values.len());
    for v in values {
        // SAFETY: each view is readable for the call.
        let Ok(v) = HeaderValue::from_bytes(unsafe { bytes(*v) }) else { return -1 };
        checked.push(v);
    }
    let h = c.headers_mut(target);
    h.remove(&n);
    for v in checked {
        h.append(n.clone(), v);
    }
    1
}

unsafe extern "C" fn header_remove(call: *mut gh_call, target: gh_target, name: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { ctx_mut(call, "header_remove") }, unsafe { bytes(name) }) else { return -1 };
    let Ok(n) = HeaderName::from_bytes(name) else { return -1 };
    c.headers_mut(target).remove(n);
    1
}

unsafe extern "C" fn body_get(call: *mut gh_call, target: gh_target, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_ref(call, "body_get") }) else { return -1 };
    match c.body(target) {
        Some(b) => write(out, view(b)),
        None => 0,
    }
}

unsafe extern "C" fn body_set(call: *mut gh_call, target: gh_target, body: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), body) = (unsafe { ctx_mut(call, "body_set") }, unsafe { bytes(body) }) else { return -1 };
    c.set_body(target, Bytes::copy_from_slice(body));
    1
}

unsafe extern "C" fn response_status(call: *mut gh_call) -> u16 {
    // SAFETY: per the ABI.
    unsafe { ctx_ref(call, "response_status") }.map_or(0, |c| c.resp.status.as_u16())
}

unsafe extern "C" fn response_set_status(call: *mut gh_call, status: u16) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_mut(call, "response_set_status") }) else { return -1 };
    match StatusCode::from_u16(status) {
        Ok(s) => {
            c.resp.status = s;
            1
        }
        Err(_) => -1,
    }
}

unsafe extern "C" fn session_id(call: *mut gh_call, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_ref(call, "session_id") }) else { return -1 };
    match c.session.get() {
        Some(s) => write(out, view(s.alias.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_json(call: *mut gh_call, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_ref(call, "session_json") }) else { return -1 };
    match c.session_json() {
        Some(j) => write(out, view(j.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_meta_get(call: *mut gh_call, key: gh_str, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), key) = (unsafe { ctx_ref(call, "session_meta_get") }, unsafe { bytes(key) }) else { return -1 };
    let Ok(key) = std::str::from_utf8(key) else { return 0 };
    match c.session.get().and_then(|s| s.session.meta_data.get(key)) {
        Some(v) => write(out, view(v.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_meta_set(call: *mut gh_call, key: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), key, value) =
        (unsafe { ctx_mut(call, "session_meta_set") }, unsafe { bytes(key) }, unsafe { bytes(value) })
    else {
        return -1;
    };
    let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value)) else { return -1 };
    c.set_session_meta(key, value)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

unsafe extern "C" fn session_create(call: *mut gh_call, init: *const gh_session_init) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx_mut(call, "session_create") }) else { return -1 };
    if init.is_null() {
        return -1;
    }
    // SAFETY: a non-null `gh_session_init`, at least as long as its `size` says; the 1.0
    // fields are read one by one (a 1.0 plugin passes the shorter struct).
    let size = unsafe { (*init).size } as usize;
    if size < GH_SESSION_INIT_SIZE_1_0 {
        return -1;
    }
    // SAFETY: `size` covers the 1.0 fields; the views they hold are readable for this
    // call, the rights array has `access_rights_len` elements (or is null with length 0).
    let (id, rate, per_ms, quota_max, renewal_ms, rights) = unsafe {
        let i = &raw const *init;
        let rights = slice((*i).access_rights, (*i).access_rights_len);
        (
            bytes((*i).id),
            (*i).rate,
            (*i).per_ms,
            (*i).quota_max,
            (*i).quota_renewal_ms,
            rights.iter().map(|r| text(r.as_bytes())).collect::<Vec<_>>(),
        )
    };
    let (mut alias, mut meta) = (&[][..], Vec::new());
    if size >= size_of::<gh_session_init>() {
        // SAFETY: `size` covers the 1.1 fields; the same rules hold for their views.
        unsafe {
            alias = bytes((*init).alias);
            meta = slice((*init).meta, (*init).meta_len)
                .iter()
                .map(|p| (text(p.key.as_bytes()), text(p.value.as_bytes())))
                .collect();
        }
    }
    let (Ok(id), Ok(alias)) = (std::str::from_utf8(id), std::str::from_utf8(alias)) else { return -1 };
    c.create_session(id, alias, rate, per_ms, quota_max, renewal_ms, rights, meta)
}

macro_rules! api_text {
    ($($name:ident => $field:ident),*) => {$(
        unsafe extern "C" fn $name(call: *mut gh_call) -> gh_str {
            // SAFETY: checked; the text lives in the API's compiled config.
            unsafe { any_api(call, stringify!($name)) }.map_or(gh_str::EMPTY, |api| view(api.$field().as_bytes()))
        }
    )*};
}
api_text!(api_id => id, api_name => display_name, api_config_data => config_data_json, api_spec => spec_json);

unsafe extern "C" fn api_listen_path(call: *mut gh_call) -> gh_str {
    // SAFETY: checked.
    unsafe { any_api(call, "api_listen_path") }.map_or(gh_str::EMPTY, |api| view(api.listen_path().as_bytes()))
}

/// What hooks call back into. A static, so it outlives every plugin.
pub static HOST_API: gh_host_api = gh_host_api {
    size: size_of::<gh_host_api>() as u32,
    abi_minor: GH_ABI_MINOR as u32,
    log,
    set_error,
    request_method,
    request_path,
    request_query,
    client_ip,
    header_get,
    headers_each,
    header_set,
    header_add,
    header_remove,
    body_get,
    body_set,
    response_status,
    response_set_status,
    session_id,
    session_json,
    session_meta_get,
    session_meta_set,
    session_create,
    api_id,
    api_name,
    api_listen_path,
    api_config_data,
    api_spec,
    request_set_method,
    request_set_path,
    request_set_query,
    header_values,
    header_replace,
    set_error_status,
    record_get,
    record_set,
    record_drop,
    record_add_tag,
    record_set_meta,
};

// ------------------------------------------------------------------ analytics phase

/// The current call's context, whichever phase it is in.
enum Ctx<'a> {
    Exchange(&'a CallCtx<'a>),
    Record(&'a mut RecordCtx<'a>),
}

/// The call's context in any phase: `call` must be this thread's current call. A request
/// context is only lent shared (changes go through `ctx_mut`, which knows `headers_each`).
///
/// # Safety
/// As `ctx_ref`.
unsafe fn any_ctx<'a>(call: *mut gh_call, what: &str) -> Option<Ctx<'a>> {
    let current = CURRENT.get();
    if call.is_null() || call.addr() != current.handle {
        refuse(what, Misuse::NotCurrent);
        return None;
    }
    Some(match current.kind {
        // SAFETY: as in `ctx_ref`.
        CtxKind::Exchange => Ctx::Exchange(unsafe { &*current.ctx.cast::<CallCtx<'a>>() }),
        // SAFETY: the `RecordCtx` that `Instance::call_analytics` made current on this
        // thread, live until the hook returns. The analytics phase has no callbacks, so no
        // other borrow of it is live while a host call runs.
        CtxKind::Record => Ctx::Record(unsafe { &mut *current.ctx.cast::<RecordCtx<'a>>() }),
    })
}

/// The API of the current call, in any phase.
///
/// # Safety
/// As `ctx_ref`.
unsafe fn any_api<'a>(call: *mut gh_call, what: &str) -> Option<&'a dyn HookApi> {
    // SAFETY: per the contract.
    match unsafe { any_ctx(call, what) }? {
        Ctx::Exchange(c) => Some(c.api),
        Ctx::Record(c) => Some(c.api),
    }
}

/// The record of the current analytics call; refused (once per hook in the log) in a
/// request phase.
///
/// # Safety
/// As `ctx_ref`.
unsafe fn record_ctx<'a>(call: *mut gh_call, what: &str) -> Option<&'a mut RecordCtx<'a>> {
    // SAFETY: per the contract.
    match unsafe { any_ctx(call, what) }? {
        Ctx::Record(c) => Some(c),
        Ctx::Exchange(_) => {
            refuse(what, Misuse::WrongPhase);
            None
        }
    }
}

/// UTF-8 text a plugin passed, or the refusal logged.
fn utf8<'b>(c: &RecordCtx<'_>, what: &str, b: &'b [u8]) -> Option<&'b str> {
    let t = std::str::from_utf8(b).ok();
    if t.is_none() {
        c.refused(what, "not UTF-8");
    }
    t
}

unsafe extern "C" fn record_get(call: *mut gh_call, name: gh_str, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { record_ctx(call, "record_get") }, unsafe { bytes(name) }) else { return -1 };
    // The view points into the record, which stays put until this field changes.
    match c.rec.get(name) {
        Some(v) => write(out, view(v)),
        None => 0,
    }
}

unsafe extern "C" fn record_set(call: *mut gh_call, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name, value) =
        (unsafe { record_ctx(call, "record_set") }, unsafe { bytes(name) }, unsafe { bytes(value) })
    else {
        return -1;
    };
    match c.rec.set(name, value) {
        Ok(()) => 1,
        Err(why) => {
            c.refused("record_set", &why);
            -1
        }
    }
}

unsafe extern "C" fn record_drop(call: *mut gh_call, name: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { record_ctx(call, "record_drop") }, unsafe { bytes(name) }) else { return -1 };
    i32::from(c.rec.drop_field(name))
}

unsafe extern "C" fn record_add_tag(call: *mut gh_call, tag: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), tag) = (unsafe { record_ctx(call, "record_add_tag") }, unsafe { bytes(tag) }) else { return -1 };
    let Some(tag) = utf8(c, "record_add_tag", tag) else { return -1 };
    c.rec.add_tag(tag.to_owned());
    1
}

unsafe extern "C" fn record_set_meta(call: *mut gh_call, key: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), key, value) =
        (unsafe { record_ctx(call, "record_set_meta") }, unsafe { bytes(key) }, unsafe { bytes(value) })
    else {
        return -1;
    };
    let (Some(key), Some(value)) = (utf8(c, "record_set_meta", key), utf8(c, "record_set_meta", value)) else {
        return -1;
    };
    let (key, value) = (key.to_owned(), value.to_owned());
    c.rec.set_meta(key, value);
    1
}
