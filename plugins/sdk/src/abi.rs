//! The C ABI between the gateway and native plugins: the Rust mirror of
//! `include/gatehouse_plugin.h`. Not for direct use by plugin authors: the SDK wraps it.
//!
//! Versioning: a host refuses a plugin whose `abi_major` differs from its own. Within a
//! major version, tables only grow at the end, and each starts with its size, so either
//! side can tell which entries the other has.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// "GATEHOUS", the first field of the declaration.
pub const GH_MAGIC: u64 = 0x4741_5445_484F_5553;
pub const GH_ABI_MAJOR: u16 = 1;
pub const GH_ABI_MINOR: u16 = 0;
/// The one symbol every plugin exports: a `gh_plugin`.
pub const GH_DECLARATION_SYMBOL: &str = "gatehouse_plugin";

/// Declaration flag: a panic in this plugin never unwinds into the host nor aborts the
/// process (the Rust SDK catches them; C has none). The host refuses plugins without it.
pub const GH_PLUGIN_PANIC_SAFE: u32 = 1;

/// Hook flags: buffer the request (or upstream response) body before calling the hook, so
/// that `body_get` can return it. Without them bodies stream and `body_get` returns 0.
pub const GH_HOOK_REQUEST_BODY: u32 = 1;
pub const GH_HOOK_RESPONSE_BODY: u32 = 2;

pub type gh_status = i32;
/// Go on with the chain.
pub const GH_CONTINUE: gh_status = 0;
/// The hook set a response (status, headers, body); the chain stops and it is sent.
pub const GH_RESPOND: gh_status = 1;
/// The hook failed; the gateway answers 500.
pub const GH_ERROR: gh_status = 2;
/// The hook panicked and the SDK caught it; the gateway answers 500 and counts it.
pub const GH_PANIC: gh_status = 3;

pub type gh_target = u32;
pub const GH_REQUEST: gh_target = 0;
pub const GH_RESPONSE: gh_target = 1;

pub type gh_level = u32;
pub const GH_LOG_ERROR: gh_level = 1;
pub const GH_LOG_WARN: gh_level = 2;
pub const GH_LOG_INFO: gh_level = 3;
pub const GH_LOG_DEBUG: gh_level = 4;

/// Borrowed bytes (UTF-8 where the field is text). What the host returns stays valid until
/// the hook returns or the same item is changed; what a plugin passes need only live for
/// the call, the host copies it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct gh_str {
    pub ptr: *const u8,
    pub len: usize,
}

/// A buffer the host owns, for a plugin to write an error message into.
#[repr(C)]
#[derive(Debug)]
pub struct gh_buf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// Opaque: the host's state for one hook call.
#[repr(C)]
pub struct gh_call {
    _private: [u8; 0],
}

/// The declaration, exported as `gatehouse_plugin`.
#[repr(C)]
pub struct gh_plugin {
    pub magic: u64,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub flags: u32,
    /// Who built it, e.g. `gatehouse-plugin 0.1.0`; shown in errors and /config.
    pub sdk: gh_str,
    /// Runs once per load, before any hook; non-zero with `err` filled refuses the load.
    pub init: Option<unsafe extern "C" fn(host: *const gh_host_api, err: *mut gh_buf) -> i32>,
}

/// One hook, exported under the name ApiDefinitions use as `symbol`.
#[repr(C)]
pub struct gh_hook {
    pub size: u32,
    pub flags: u32,
    /// Once per ApiDefinition entry, with its `config` as JSON (`null` when unset). May be
    /// null: the hook then gets a null instance.
    pub create: Option<unsafe extern "C" fn(config: gh_str, instance: *mut *mut c_void, err: *mut gh_buf) -> i32>,
    /// When the chain that created the instance is gone. May be null.
    pub destroy: Option<unsafe extern "C" fn(instance: *mut c_void)>,
    /// For `pre`, `authCheck`, `postKeyAuth` and `post`; null if the hook has none.
    pub on_request: Option<unsafe extern "C" fn(instance: *mut c_void, call: *mut gh_call) -> gh_status>,
    /// For `response`; null if the hook has none.
    pub on_response: Option<unsafe extern "C" fn(instance: *mut c_void, call: *mut gh_call) -> gh_status>,
}

/// What an `authCheck` hook hands to `session_create`.
#[repr(C)]
pub struct gh_session_init {
    pub size: u32,
    pub _reserved: u32,
    /// Stable identity: rate limits and quotas are counted per id.
    pub id: gh_str,
    /// `rate` requests every `per_ms`; 0 for no per-session limit.
    pub rate: u64,
    pub per_ms: u64,
    /// Requests per `quota_renewal_ms`; -1 for unlimited.
    pub quota_max: i64,
    pub quota_renewal_ms: u64,
    /// ApiDefinition names (same namespace); none means the API being called.
    pub access_rights: *const gh_str,
    pub access_rights_len: usize,
}

/// Callback for `headers_each`.
pub type gh_header_cb = unsafe extern "C" fn(ctx: *mut c_void, name: gh_str, value: gh_str);

/// What the host offers. Integers returned as `i32` are 1 (found / done) or 0 (absent), or
/// -1 for a call that is invalid here (bad header name, wrong phase).
#[repr(C)]
pub struct gh_host_api {
    pub size: u32,
    pub abi_minor: u32,
    /// `call` may be null (in `init` and `create`).
    pub log: unsafe extern "C" fn(call: *mut gh_call, level: gh_level, msg: gh_str),
    /// The reason logged with a GH_ERROR.
    pub set_error: unsafe extern "C" fn(call: *mut gh_call, msg: gh_str),
    pub request_method: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    pub request_path: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    pub request_query: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    pub client_ip: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The `index`th value of header `name` (case-insensitive).
    pub header_get: unsafe extern "C" fn(
        call: *mut gh_call,
        target: gh_target,
        name: gh_str,
        index: usize,
        out: *mut gh_str,
    ) -> i32,
    pub headers_each: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, ctx: *mut c_void, cb: gh_header_cb),
    pub header_set: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32,
    pub header_add: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32,
    pub header_remove: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str) -> i32,
    /// 1 with the body when the hook asked for it (GH_HOOK_*_BODY) or a hook set it.
    pub body_get: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, out: *mut gh_str) -> i32,
    pub body_set: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, body: gh_str) -> i32,
    pub response_status: unsafe extern "C" fn(call: *mut gh_call) -> u16,
    pub response_set_status: unsafe extern "C" fn(call: *mut gh_call, status: u16) -> i32,
    /// The session's id (the key Secret's `namespace/name`, or the id an auth hook gave).
    pub session_id: unsafe extern "C" fn(call: *mut gh_call, out: *mut gh_str) -> i32,
    /// The whole session as JSON (Tyk's `SessionState` fields where they exist).
    pub session_json: unsafe extern "C" fn(call: *mut gh_call, out: *mut gh_str) -> i32,
    pub session_meta_get: unsafe extern "C" fn(call: *mut gh_call, key: gh_str, out: *mut gh_str) -> i32,
    /// Sets metadata on this request's session; later hooks and analytics see it.
    pub session_meta_set: unsafe extern "C" fn(call: *mut gh_call, key: gh_str, value: gh_str) -> i32,
    /// `authCheck` only: the session the rest of the chain enforces.
    pub session_create: unsafe extern "C" fn(call: *mut gh_call, init: *const gh_session_init) -> i32,
    pub api_id: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    pub api_name: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    pub api_listen_path: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// `spec.configData` as JSON (`null` when unset).
    pub api_config_data: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The whole ApiDefinition spec as JSON.
    pub api_spec: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
}

impl gh_str {
    pub const fn from_static(s: &'static str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    pub fn new(b: &[u8]) -> Self {
        Self { ptr: b.as_ptr(), len: b.len() }
    }

    pub const EMPTY: gh_str = gh_str { ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 };

    /// # Safety
    /// `ptr` must point to `len` readable bytes that outlive `'a`.
    #[allow(unsafe_code)]
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

// SAFETY: a declaration and hook tables are immutable statics holding pointers to static
// data and functions; sharing them between threads is what they are for.
#[allow(unsafe_code)]
unsafe impl Sync for gh_plugin {}
#[allow(unsafe_code)]
unsafe impl Sync for gh_hook {}
#[allow(unsafe_code)]
unsafe impl Sync for gh_host_api {}
#[allow(unsafe_code)]
unsafe impl Send for gh_str {}
