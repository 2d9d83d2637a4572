//! The C ABI between the gateway and native plugins: the Rust mirror of
//! `include/gatehouse_plugin.h`. Not for direct use by plugin authors: the SDK wraps it.
//!
//! Versioning: a host refuses a plugin whose `abi_major` differs from its own. Within a
//! major version, tables only grow at the end, and each starts with its size, so either
//! side can tell which entries the other has. ABI 1.1 appended `gh_plugin::find_hook` and
//! `quiesce` (read only when `abi_minor >= 1`), `gh_hook::magic` and `create_for`,
//! `gh_session_init::alias` and `meta` (read when `size` covers them), the host calls from
//! `request_set_method` on, and [`GH_PLUGIN_GO_RUNTIME`]; then the analytics phase:
//! `gh_hook::on_analytics` (read when `size` covers it) and the record calls from
//! `record_get` on.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// "GATEHOUS", the first field of the declaration.
pub const GH_MAGIC: u64 = 0x4741_5445_484F_5553;
/// The ABI major version: a host refuses a plugin with another.
pub const GH_ABI_MAJOR: u16 = 1;
/// The ABI minor version: tables grow within a major version, append-only.
pub const GH_ABI_MINOR: u16 = 1;
/// The one symbol every plugin exports: a `gh_plugin`.
pub const GH_DECLARATION_SYMBOL: &str = "gatehouse_plugin";

/// Declaration flag: a panic in this plugin never unwinds into the host nor aborts the
/// process (the Rust SDK catches them; C has none). The host refuses plugins without it.
pub const GH_PLUGIN_PANIC_SAFE: u32 = 1;
/// Declaration flag (1.1): the library carries a Go runtime. Go supports one runtime per
/// process, so the host refuses a second distinct library with this flag.
pub const GH_PLUGIN_GO_RUNTIME: u32 = 2;

/// `gh_hook::magic` (1.1): "GHPHOOK1".
pub const GH_HOOK_MAGIC: u64 = 0x4748_5048_4F4F_4B31;
/// The size of a 1.0 `gh_hook` (up to `on_response`): the smallest table the host accepts.
pub const GH_HOOK_SIZE_1_0: usize = std::mem::offset_of!(gh_hook, magic);
/// The size of a 1.0 `gh_session_init` (up to `access_rights_len`).
pub const GH_SESSION_INIT_SIZE_1_0: usize = std::mem::offset_of!(gh_session_init, alias);
/// The size of a 1.0 `gh_host_api` (up to `api_spec`).
pub const GH_HOST_API_SIZE_1_0: usize = std::mem::offset_of!(gh_host_api, request_set_method);
/// The size of a 1.1 `gh_host_api` before the analytics record calls (up to
/// `set_error_status`).
pub const GH_HOST_API_SIZE_1_1_REQUEST: usize = std::mem::offset_of!(gh_host_api, record_get);
/// The size of a 1.1 `gh_hook` before `on_analytics` (up to `create_for`): such a table
/// does not handle the analytics phase.
pub const GH_HOOK_SIZE_1_1_REQUEST: usize = std::mem::offset_of!(gh_hook, on_analytics);

/// Hook flags: buffer the request (or upstream response) body before calling the hook, so
/// that `body_get` can return it. Without them bodies stream and `body_get` returns 0.
pub const GH_HOOK_REQUEST_BODY: u32 = 1;
/// See [`GH_HOOK_REQUEST_BODY`]: the upstream response's body.
pub const GH_HOOK_RESPONSE_BODY: u32 = 2;

/// What a hook returns: one of the `GH_CONTINUE` .. `GH_PANIC` constants.
pub type gh_status = i32;
/// Go on with the chain.
pub const GH_CONTINUE: gh_status = 0;
/// The hook set a response (status, headers, body); the chain stops and it is sent.
pub const GH_RESPOND: gh_status = 1;
/// The hook failed; the gateway answers 500.
pub const GH_ERROR: gh_status = 2;
/// The hook panicked and the SDK caught it; the gateway answers 500 and counts it.
pub const GH_PANIC: gh_status = 3;

/// Which message a header or body call is about.
pub type gh_target = u32;
/// The request.
pub const GH_REQUEST: gh_target = 0;
/// The response (the upstream's, or the one a request hook builds).
pub const GH_RESPONSE: gh_target = 1;

/// A log level.
pub type gh_level = u32;
/// Error level.
pub const GH_LOG_ERROR: gh_level = 1;
/// Warn level.
pub const GH_LOG_WARN: gh_level = 2;
/// Info level.
pub const GH_LOG_INFO: gh_level = 3;
/// Debug level.
pub const GH_LOG_DEBUG: gh_level = 4;

/// Borrowed bytes (UTF-8 where the field is text). What the host returns stays valid until
/// the hook returns or the same item is changed; what a plugin passes need only live for
/// the call, the host copies it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct gh_str {
    /// The first byte (anything, when `len` is 0).
    pub ptr: *const u8,
    /// The number of bytes.
    pub len: usize,
}

/// A buffer the host owns, for a plugin to write an error message into.
#[repr(C)]
#[derive(Debug)]
pub struct gh_buf {
    /// Where to write.
    pub ptr: *mut u8,
    /// How many bytes fit.
    pub cap: usize,
    /// How many bytes were written.
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
    /// [`GH_MAGIC`].
    pub magic: u64,
    /// [`GH_ABI_MAJOR`] the plugin was built for.
    pub abi_major: u16,
    /// [`GH_ABI_MINOR`] the plugin was built for: which fields it has.
    pub abi_minor: u16,
    /// `GH_PLUGIN_*` flags.
    pub flags: u32,
    /// Who built it, e.g. `gatehouse-plugin 0.1.0`; shown in errors and /config.
    pub sdk: gh_str,
    /// Runs once per load, before any hook; non-zero with `err` filled refuses the load.
    pub init: Option<unsafe extern "C" fn(host: *const gh_host_api, err: *mut gh_buf) -> i32>,
    /// 1.1 (read only when `abi_minor >= 1`): the hook named `name`, or null. The table it
    /// returns is static. The host finds a 1.1 plugin's hooks only this way.
    pub find_hook: Option<unsafe extern "C" fn(name: gh_str) -> *const gh_hook>,
    /// 1.1: called once when no loaded configuration uses the library any more (it stays
    /// mapped), so the plugin can stop its threads. May be null.
    pub quiesce: Option<unsafe extern "C" fn()>,
}

/// One hook, exported under the name ApiDefinitions use as `symbol`.
#[repr(C)]
pub struct gh_hook {
    /// `size_of::<gh_hook>()` as the plugin was built: which fields it has.
    pub size: u32,
    /// `GH_HOOK_*` flags.
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
    /// 1.1, present when `size` covers it: [`GH_HOOK_MAGIC`].
    pub magic: u64,
    /// 1.1: `create` that also receives the hook's own table, so one trampoline can serve
    /// many hooks. When set, the host calls it instead of `create`. May be null.
    pub create_for: Option<
        unsafe extern "C" fn(hook: *const gh_hook, config: gh_str, instance: *mut *mut c_void, err: *mut gh_buf) -> i32,
    >,
    /// 1.1, present when `size` covers it: for `analytics`, once per analytics record of
    /// the API, off the request path, with the record calls (`record_get` ..). Null (or a
    /// table too short to have it) if the hook has none.
    pub on_analytics: Option<unsafe extern "C" fn(instance: *mut c_void, call: *mut gh_call) -> gh_status>,
}

/// 1.1: a key and a value (session metadata).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct gh_pair {
    /// The key.
    pub key: gh_str,
    /// The value.
    pub value: gh_str,
}

/// What an `authCheck` hook hands to `session_create`.
#[repr(C)]
pub struct gh_session_init {
    /// `size_of::<gh_session_init>()` as the plugin was built: which fields it has.
    pub size: u32,
    /// Zero.
    pub _reserved: u32,
    /// Stable identity: rate limits and quotas are counted per id.
    pub id: gh_str,
    /// `rate` requests every `per_ms`; 0 for no per-session limit.
    pub rate: u64,
    /// The rate's window, in milliseconds.
    pub per_ms: u64,
    /// Requests per `quota_renewal_ms`; -1 for unlimited.
    pub quota_max: i64,
    /// The quota's window, in milliseconds.
    pub quota_renewal_ms: u64,
    /// ApiDefinition names (same namespace); none means the API being called.
    pub access_rights: *const gh_str,
    /// How many names `access_rights` holds.
    pub access_rights_len: usize,
    /// 1.1: shown in analytics and as the session id; empty means `id`.
    pub alias: gh_str,
    /// 1.1: the session's metadata, `meta_len` pairs.
    pub meta: *const gh_pair,
    /// How many pairs `meta` holds.
    pub meta_len: usize,
}

/// Callback for `headers_each`.
pub type gh_header_cb = unsafe extern "C" fn(ctx: *mut c_void, name: gh_str, value: gh_str);

/// What the host offers. Integers returned as `i32` are 1 (found / done) or 0 (absent), or
/// -1 for a call that is invalid here (bad header name, wrong phase).
///
/// A `gh_call` is valid only on the thread that received it, during that hook call; the
/// host refuses (-1, an empty view) and logs any other use, and any header change made
/// from inside a `headers_each` callback.
#[repr(C)]
pub struct gh_host_api {
    /// `size_of::<gh_host_api>()`: which calls the host has.
    pub size: u32,
    /// The host's ABI minor version.
    pub abi_minor: u32,
    /// `call` may be null (in `init` and `create`).
    pub log: unsafe extern "C" fn(call: *mut gh_call, level: gh_level, msg: gh_str),
    /// The reason logged with a GH_ERROR.
    pub set_error: unsafe extern "C" fn(call: *mut gh_call, msg: gh_str),
    /// The request method.
    pub request_method: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The request path (normalised).
    pub request_path: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The query string without `?`, empty if none.
    pub request_query: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The client's IP address, as text.
    pub client_ip: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The `index`th value of header `name` (case-insensitive).
    pub header_get: unsafe extern "C" fn(
        call: *mut gh_call,
        target: gh_target,
        name: gh_str,
        index: usize,
        out: *mut gh_str,
    ) -> i32,
    /// Calls `cb` with every header, in order; `cb` must not change headers (refused).
    pub headers_each: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, ctx: *mut c_void, cb: gh_header_cb),
    /// Replaces every value of a header.
    pub header_set: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32,
    /// Adds a value to a header.
    pub header_add: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32,
    /// Removes every value of a header.
    pub header_remove: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, name: gh_str) -> i32,
    /// 1 with the body when the hook asked for it (GH_HOOK_*_BODY) or a hook set it.
    pub body_get: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, out: *mut gh_str) -> i32,
    /// Replaces a body (the host copies it).
    pub body_set: unsafe extern "C" fn(call: *mut gh_call, target: gh_target, body: gh_str) -> i32,
    /// The response status.
    pub response_status: unsafe extern "C" fn(call: *mut gh_call) -> u16,
    /// Sets the response status.
    pub response_set_status: unsafe extern "C" fn(call: *mut gh_call, status: u16) -> i32,
    /// The session's id (the key Secret's `namespace/name`, or the id an auth hook gave).
    pub session_id: unsafe extern "C" fn(call: *mut gh_call, out: *mut gh_str) -> i32,
    /// The whole session as JSON (Tyk's `SessionState` fields where they exist).
    pub session_json: unsafe extern "C" fn(call: *mut gh_call, out: *mut gh_str) -> i32,
    /// A value of the session's metadata.
    pub session_meta_get: unsafe extern "C" fn(call: *mut gh_call, key: gh_str, out: *mut gh_str) -> i32,
    /// Sets metadata on this request's session; later hooks and analytics see it.
    pub session_meta_set: unsafe extern "C" fn(call: *mut gh_call, key: gh_str, value: gh_str) -> i32,
    /// `authCheck` only: the session the rest of the chain enforces.
    pub session_create: unsafe extern "C" fn(call: *mut gh_call, init: *const gh_session_init) -> i32,
    /// The API's `namespace/name`.
    pub api_id: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The API's `spec.name`, or `metadata.name`.
    pub api_name: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The API's `spec.listenPath`.
    pub api_listen_path: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// `spec.configData` as JSON (`null` when unset).
    pub api_config_data: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// The whole ApiDefinition spec as JSON.
    pub api_spec: unsafe extern "C" fn(call: *mut gh_call) -> gh_str,
    /// 1.1: rewrites the request method (an HTTP token). The upstream sees it; routing is
    /// not re-run. -1 if invalid or in the response phase.
    pub request_set_method: unsafe extern "C" fn(call: *mut gh_call, method: gh_str) -> i32,
    /// 1.1: rewrites the path: origin-form, starting with `/`, normalised as requests are.
    pub request_set_path: unsafe extern "C" fn(call: *mut gh_call, path: gh_str) -> i32,
    /// 1.1: rewrites the query (without `?`; empty removes it); URI characters only.
    pub request_set_query: unsafe extern "C" fn(call: *mut gh_call, query: gh_str) -> i32,
    /// 1.1: every value of a header: up to `cap` views into `out`, the total in `count`.
    pub header_values: unsafe extern "C" fn(
        call: *mut gh_call,
        target: gh_target,
        name: gh_str,
        out: *mut gh_str,
        cap: usize,
        count: *mut usize,
    ) -> i32,
    /// 1.1: replaces every value of a header at once (none removes it); all or nothing.
    pub header_replace: unsafe extern "C" fn(
        call: *mut gh_call,
        target: gh_target,
        name: gh_str,
        values: *const gh_str,
        len: usize,
    ) -> i32,
    /// 1.1: with `GH_ERROR`, the status (400-599) to answer instead of 500.
    pub set_error_status: unsafe extern "C" fn(call: *mut gh_call, status: u16) -> i32,

    // ---- 1.1, analytics phase: the record an `on_analytics` hook sees. Every call below
    // returns -1 (and is logged once per hook) outside the analytics phase; in it, the
    // request calls above (request, headers, bodies, session) return -1 / an empty view.
    // `log`, `set_error` and the `api_*` calls work in every phase.
    /// A field of the record by name (`method`, `path`, `status`, `api_id`, `key_alias`,
    /// `client_ip`, `error`, `request_body`, ...; see docs/plugins.md), as text: numbers in
    /// decimal, `true`/`false`, bodies as their bytes. 1 found, 0 absent, null or dropped.
    pub record_get: unsafe extern "C" fn(call: *mut gh_call, name: gh_str, out: *mut gh_str) -> i32,
    /// Sets (or brings back) a field: text fields take UTF-8, numeric and boolean ones
    /// their text form (`"200"`, `"true"`), bodies any bytes. -1 for an unknown field or a
    /// value of the wrong type.
    pub record_set: unsafe extern "C" fn(call: *mut gh_call, name: gh_str, value: gh_str) -> i32,
    /// Removes a field from the record (also `tags`, `meta_data`). 1 removed, 0 absent.
    pub record_drop: unsafe extern "C" fn(call: *mut gh_call, name: gh_str) -> i32,
    /// Appends a tag (UTF-8) to the record's `tags`.
    pub record_add_tag: unsafe extern "C" fn(call: *mut gh_call, tag: gh_str) -> i32,
    /// Sets a `meta_data` entry of the record (UTF-8); the key's own session is unchanged.
    pub record_set_meta: unsafe extern "C" fn(call: *mut gh_call, key: gh_str, value: gh_str) -> i32,
}

impl gh_str {
    /// A view of a static string.
    pub const fn from_static(s: &'static str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    /// A view of `b`, valid as long as `b` is.
    pub fn new(b: &[u8]) -> Self {
        Self { ptr: b.as_ptr(), len: b.len() }
    }

    /// No bytes.
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
