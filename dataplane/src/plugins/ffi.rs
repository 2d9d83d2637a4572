//! The plugin boundary: opening shared objects, reading their declaration, calling hooks,
//! and the table of host functions hooks call back into. The only `unsafe` in the
//! dataplane lives here.
#![allow(unsafe_code)]

use std::{
    collections::HashMap,
    ffi::{CStr, c_void},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use gatehouse_plugin::abi::*;
use http::{HeaderName, HeaderValue, StatusCode};
use libloading::os::unix::{Library as DlHandle, RTLD_LOCAL, RTLD_NOW};

use super::{CallCtx, Phase, PluginError, elf::Defined};

/// The size of a `gh_hook` as ABI 1.0 defines it (six fields: size, flags, create,
/// destroy, on_request, on_response). Spelled out rather than `size_of::<gh_hook>()`,
/// which grows with later minors.
const GH_HOOK_1_0_SIZE: u64 = (std::mem::offset_of!(gh_hook, on_response) + size_of::<usize>()) as u64;

/// A loaded library. Never unloaded: `dlclose` is unsound for Rust libraries (thread-local
/// destructors, statics), so the handle is leaked on purpose.
pub struct Library {
    lib: &'static DlHandle,
    decl: &'static gh_plugin,
    /// The private copy it was opened from, as the dynamic loader names it.
    path: PathBuf,
    /// What the plugin's own `.dynsym` defines (from `elf::check`).
    defined: HashMap<String, Defined>,
}

impl Library {
    /// Opens `file` (a checked private copy whose own symbols are `defined`), checks its
    /// declaration and runs its `init`.
    pub fn open(file: &Path, defined: HashMap<String, Defined>) -> Result<Self, PluginError> {
        // Checked before `dlopen`, so the initialisers of a library that is no plugin never run.
        if !defined.get(GH_DECLARATION_SYMBOL).is_some_and(|d| d.is_data_object()) {
            return Err(PluginError::NoDeclaration);
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
        // SAFETY: a non-null address of the exported static, which lives as long as the
        // library, which is never unloaded.
        let decl = unsafe { decl.as_ref() }.ok_or(PluginError::NoDeclaration)?;
        if decl.magic != GH_MAGIC {
            return Err(PluginError::NoDeclaration);
        }
        // SAFETY: after the magic matched, the declaration is the one this ABI describes.
        let sdk = String::from_utf8_lossy(unsafe { decl.sdk.as_bytes() }).into_owned();
        if decl.abi_major != GH_ABI_MAJOR {
            return Err(PluginError::AbiMajor { plugin: decl.abi_major, host: GH_ABI_MAJOR, sdk });
        }
        if decl.flags & GH_PLUGIN_PANIC_SAFE == 0 {
            return Err(PluginError::NotPanicSafe { sdk });
        }
        if let Some(init) = decl.init {
            let mut err = ErrBuf::new();
            // SAFETY: `init` is the plugin's entry point per the checked declaration; the
            // host table is a static; `err` is a valid buffer.
            let rc = unsafe { init(&HOST_API, err.raw()) };
            if rc != 0 {
                return Err(PluginError::InitFailed(err.message()));
            }
        }
        Ok(Self { lib, decl, path, defined })
    }

    pub fn sdk(&self) -> String {
        // SAFETY: the declaration's `sdk` view points into the library's static data.
        String::from_utf8_lossy(unsafe { self.decl.sdk.as_bytes() }).into_owned()
    }

    /// The hook exported as `symbol`, checked for `phase`.
    pub fn hook(&self, symbol: &str, phase: Phase) -> Result<&'static gh_hook, PluginError> {
        let missing = || PluginError::MissingSymbol(symbol.to_owned());
        if symbol == GH_DECLARATION_SYMBOL || symbol.as_bytes().contains(&0) {
            return Err(missing());
        }
        // SAFETY: only the address is taken here; it is dereferenced below, after the
        // checks that it is a `gh_hook` the plugin itself defines.
        let hook: *const gh_hook =
            unsafe { self.lib.get::<*const gh_hook>(symbol.as_bytes()) }.map(|s| *s).map_err(|_| missing())?;
        let not_a_hook = |why: String| PluginError::NotAHook { symbol: symbol.to_owned(), why };
        // ABI 1.0: a hook is a `gh_hook` the plugin itself exports under `symbol`.
        if let Err(why) = defined_hook_object(&self.defined, symbol) {
            // Say where it did resolve: the likeliest mistake is a name from a dependency.
            let why = match inside_library(hook.cast(), &self.path) {
                Err(elsewhere) => format!("{why}; {elsewhere}"),
                Ok(()) => why,
            };
            return Err(not_a_hook(why));
        }
        inside_library(hook.cast(), &self.path).map_err(not_a_hook)?;
        // SAFETY: a non-null address of a static in a library that is never unloaded.
        let hook = unsafe { hook.as_ref() }.ok_or_else(missing)?;
        if u64::from(hook.size) < GH_HOOK_1_0_SIZE {
            return Err(PluginError::NotAHook {
                symbol: symbol.to_owned(),
                why: format!("its table says it is {} bytes", hook.size),
            });
        }
        let handles = if phase == Phase::Response { hook.on_response.is_some() } else { hook.on_request.is_some() };
        if !handles {
            return Err(PluginError::PhaseNotHandled { symbol: symbol.to_owned(), phase });
        }
        Ok(hook)
    }
}

/// Checks that `symbol` is a data object (`STT_OBJECT`) the plugin defines in its own
/// dynamic symbol table, of a 1.0 `gh_hook`'s size. `dlsym` alone would also return
/// functions and data of the libraries the plugin links (`malloc`, `environ`), which the
/// host would then call as a hook table.
fn defined_hook_object(defined: &HashMap<String, Defined>, symbol: &str) -> Result<(), String> {
    let Some(d) = defined.get(symbol) else {
        return Err("the plugin's own dynamic symbol table does not define it".to_owned());
    };
    if !d.is_data_object() {
        return Err(format!("it is a {}, not a gh_hook table", d.kind_name()));
    }
    if d.size != GH_HOOK_1_0_SIZE {
        return Err(format!("it is a {}-byte data object, not a gh_hook table ({GH_HOOK_1_0_SIZE} bytes)", d.size));
    }
    Ok(())
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

/// A hook bound to one ApiDefinition entry: the plugin's per-entry instance.
pub struct Instance {
    hook: &'static gh_hook,
    instance: *mut c_void,
    _lib: Arc<Library>,
}

// SAFETY: the ABI requires hooks to be callable from any thread, concurrently, with the
// same instance (the Rust SDK enforces `Send + Sync` on hook state; C plugins promise it).
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    pub fn create(lib: Arc<Library>, hook: &'static gh_hook, config_json: &str) -> Result<Self, PluginError> {
        let mut instance: *mut c_void = std::ptr::null_mut();
        if let Some(create) = hook.create {
            let mut err = ErrBuf::new();
            // SAFETY: the plugin's constructor per the checked hook table; `config_json`
            // outlives the call; `instance` and `err` are valid places to write.
            let rc = unsafe { create(gh_str::new(config_json.as_bytes()), &mut instance, err.raw()) };
            if rc != 0 {
                return Err(PluginError::CreateFailed(err.message()));
            }
        }
        Ok(Self { hook, instance, _lib: lib })
    }

    pub fn wants_body(&self, phase: Phase) -> bool {
        let flag = if phase == Phase::Response { GH_HOOK_RESPONSE_BODY } else { GH_HOOK_REQUEST_BODY };
        self.hook.flags & flag != 0
    }

    /// Runs the hook on `ctx`.
    pub fn call(&self, phase: Phase, ctx: &mut CallCtx<'_>) -> gh_status {
        let f = if phase == Phase::Response { self.hook.on_response } else { self.hook.on_request };
        let Some(f) = f else { return GH_CONTINUE };
        // SAFETY: `f` was checked present for this phase when the chain was built; the
        // instance is the one `create` returned; `ctx` outlives the call and is the only
        // thing the `gh_call` pointer refers to.
        unsafe { f(self.instance, (ctx as *mut CallCtx<'_>).cast::<gh_call>()) }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(destroy) = self.hook.destroy {
            // SAFETY: the chain owning this instance is gone, so no call is running; each
            // instance is destroyed once.
            unsafe { destroy(self.instance) };
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

/// # Safety
/// `call` is the `CallCtx` pointer `Instance::call` passed to the running hook.
unsafe fn ctx<'a>(call: *mut gh_call) -> Option<&'a mut CallCtx<'a>> {
    // SAFETY: per the contract: the pointer is either null or the live `CallCtx` of the
    // hook running on this thread, which no one else touches during the call.
    unsafe { call.cast::<CallCtx<'a>>().as_mut() }
}

/// # Safety
/// `s` is a view the plugin passed, readable for this call.
unsafe fn bytes<'a>(s: gh_str) -> &'a [u8] {
    // SAFETY: per the contract.
    unsafe { s.as_bytes() }
}

fn view(b: &[u8]) -> gh_str {
    gh_str::new(b)
}

fn write(out: *mut gh_str, v: gh_str) -> i32 {
    // SAFETY: plugins pass a valid place to write (the SDK always does).
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
    // SAFETY: per the ABI; null outside hooks.
    match unsafe { ctx(call) } {
        Some(c) => super::log_from_hook(c, level, &msg),
        None => super::log_from_plugin(level, &msg),
    }
}

unsafe extern "C" fn set_error(call: *mut gh_call, msg: gh_str) {
    // SAFETY: per the ABI.
    if let Some(c) = unsafe { ctx(call) } {
        c.error = Some(String::from_utf8_lossy(unsafe { bytes(msg) }).into_owned());
    }
}

unsafe extern "C" fn request_method(call: *mut gh_call) -> gh_str {
    // SAFETY: per the ABI; the view points into the request, alive for the call.
    unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.req.parts.method.as_str().as_bytes()))
}

unsafe extern "C" fn request_path(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.req.parts.uri.path().as_bytes()))
}

unsafe extern "C" fn request_query(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.req.parts.uri.query().unwrap_or("").as_bytes()))
}

unsafe extern "C" fn client_ip(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.client_ip().as_bytes()))
}

unsafe extern "C" fn header_get(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    index: usize,
    out: *mut gh_str,
) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { ctx(call) }, unsafe { bytes(name) }) else { return -1 };
    let Ok(name) = HeaderName::from_bytes(name) else { return -1 };
    match c.headers(target).get_all(name).iter().nth(index) {
        Some(v) => write(out, view(v.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn headers_each(call: *mut gh_call, target: gh_target, cb_ctx: *mut c_void, cb: gh_header_cb) {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx(call) }) else { return };
    for (k, v) in c.headers(target).iter() {
        // SAFETY: the callback is the plugin's, with its own context; the views live
        // through the callback.
        unsafe { cb(cb_ctx, view(k.as_str().as_bytes()), view(v.as_bytes())) };
    }
}

fn header_pair(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((HeaderName::from_bytes(name).ok()?, HeaderValue::from_bytes(value).ok()?))
}

unsafe extern "C" fn header_set(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name, value) = (unsafe { ctx(call) }, unsafe { bytes(name) }, unsafe { bytes(value) }) else {
        return -1;
    };
    let Some((n, v)) = header_pair(name, value) else { return -1 };
    c.headers_mut(target).insert(n, v);
    1
}

unsafe extern "C" fn header_add(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name, value) = (unsafe { ctx(call) }, unsafe { bytes(name) }, unsafe { bytes(value) }) else {
        return -1;
    };
    let Some((n, v)) = header_pair(name, value) else { return -1 };
    c.headers_mut(target).append(n, v);
    1
}

unsafe extern "C" fn header_remove(call: *mut gh_call, target: gh_target, name: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), name) = (unsafe { ctx(call) }, unsafe { bytes(name) }) else { return -1 };
    let Ok(n) = HeaderName::from_bytes(name) else { return -1 };
    c.headers_mut(target).remove(n);
    1
}

unsafe extern "C" fn body_get(call: *mut gh_call, target: gh_target, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx(call) }) else { return -1 };
    match c.body(target) {
        Some(b) => write(out, view(b)),
        None => 0,
    }
}

unsafe extern "C" fn body_set(call: *mut gh_call, target: gh_target, body: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), body) = (unsafe { ctx(call) }, unsafe { bytes(body) }) else { return -1 };
    c.set_body(target, Bytes::copy_from_slice(body));
    1
}

unsafe extern "C" fn response_status(call: *mut gh_call) -> u16 {
    // SAFETY: per the ABI.
    unsafe { ctx(call) }.map_or(0, |c| c.resp.status.as_u16())
}

unsafe extern "C" fn response_set_status(call: *mut gh_call, status: u16) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx(call) }) else { return -1 };
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
    match unsafe { ctx(call) }.and_then(|c| c.session.as_deref()) {
        Some(s) => write(out, view(s.alias.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_json(call: *mut gh_call, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let Some(c) = (unsafe { ctx(call) }) else { return -1 };
    match c.session_json() {
        Some(j) => write(out, view(j.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_meta_get(call: *mut gh_call, key: gh_str, out: *mut gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), key) = (unsafe { ctx(call) }, unsafe { bytes(key) }) else { return -1 };
    let Ok(key) = std::str::from_utf8(key) else { return 0 };
    match c.session.as_deref().and_then(|s| s.session.meta_data.get(key)) {
        Some(v) => write(out, view(v.as_bytes())),
        None => 0,
    }
}

unsafe extern "C" fn session_meta_set(call: *mut gh_call, key: gh_str, value: gh_str) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), key, value) = (unsafe { ctx(call) }, unsafe { bytes(key) }, unsafe { bytes(value) }) else {
        return -1;
    };
    let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value)) else { return -1 };
    c.set_session_meta(key, value)
}

unsafe extern "C" fn session_create(call: *mut gh_call, init: *const gh_session_init) -> i32 {
    // SAFETY: per the ABI.
    let (Some(c), Some(init)) = (unsafe { ctx(call) }, unsafe { init.as_ref() }) else { return -1 };
    if (init.size as usize) < size_of::<gh_session_init>() {
        return -1;
    }
    // SAFETY: the views in `init` are readable for this call; the rights array has
    // `access_rights_len` elements (or is null with length 0).
    let (id, rights) = unsafe {
        let rights: &[gh_str] = if init.access_rights.is_null() || init.access_rights_len == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(init.access_rights, init.access_rights_len)
        };
        (bytes(init.id), rights.iter().map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned()).collect::<Vec<_>>())
    };
    let Ok(id) = std::str::from_utf8(id) else { return -1 };
    c.create_session(id, init.rate, init.per_ms, init.quota_max, init.quota_renewal_ms, rights)
}

macro_rules! api_text {
    ($($name:ident => $field:ident),*) => {$(
        unsafe extern "C" fn $name(call: *mut gh_call) -> gh_str {
            // SAFETY: per the ABI; the text lives in the API's compiled config.
            unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.api.$field.as_bytes()))
        }
    )*};
}
api_text!(api_id => id, api_name => display_name, api_config_data => config_data_json, api_spec => spec_json);

unsafe extern "C" fn api_listen_path(call: *mut gh_call) -> gh_str {
    // SAFETY: per the ABI.
    unsafe { ctx(call) }.map_or(gh_str::EMPTY, |c| view(c.api.entry.spec.listen_path.as_bytes()))
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
};
