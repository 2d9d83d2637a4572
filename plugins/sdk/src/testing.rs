//! A stand-in host for unit tests of plugins: run a hook against a request you describe
//! and look at what it did, without a gateway.
//!
//! ```
//! use gatehouse_plugin::{Flow, Request, testing::TestCall};
//!
//! fn add_header(req: &mut Request) -> Flow {
//!     req.add_header("Foo", "Bar");
//!     Flow::Continue
//! }
//!
//! let mut call = TestCall::new("GET", "/x");
//! assert_eq!(call.request(add_header), Flow::Continue);
//! assert_eq!(call.request_header("foo"), Some("Bar"));
//! ```
#![allow(unsafe_code)]

use std::{collections::BTreeMap, ffi::c_void};

use crate::{
    Flow,
    abi::*,
    call::{Call, Record, Request, Response},
};

/// One request (and, for response hooks, its response) as a test describes it.
#[derive(Debug, Clone, Default)]
pub struct TestCall {
    /// The request method (a hook may change it).
    pub method: String,
    /// The request path (a hook may change it).
    pub path: String,
    /// The query string without `?` (a hook may change it).
    pub query: String,
    /// The request headers, in order.
    pub request_headers: Vec<(String, String)>,
    /// The request body, as a hook that asked for it would see it.
    pub request_body: Option<Vec<u8>>,
    /// The response status (200 unless set).
    pub status: u16,
    /// The response headers, in order.
    pub response_headers: Vec<(String, String)>,
    /// The response body.
    pub response_body: Option<Vec<u8>>,
    /// `(id, metadata)` of the session, if the request has one.
    pub session: Option<(String, BTreeMap<String, String>)>,
    /// The API's `spec.name`.
    pub api_name: String,
    /// The API's `spec.configData` as JSON.
    pub api_config_data: String,
    /// The entry's `config` as JSON.
    pub config: String,
    /// Every line the hook logged.
    pub logs: Vec<String>,
    /// The message of the last `Flow::Error` or panic.
    pub error: Option<String>,
    /// The status of the last `Flow::error_status`.
    pub error_status: Option<u16>,
    /// The alias an `authCheck` hook gave the session it created.
    pub session_alias: Option<String>,
    /// For analytics hooks: the record's fields by name, as text (`None`: null).
    pub record: BTreeMap<String, Option<Vec<u8>>>,
    /// For analytics hooks: the record's tags.
    pub tags: Vec<String>,
    /// For analytics hooks: the record's `meta_data`.
    pub meta: BTreeMap<String, String>,
    scratch: String,
}

impl TestCall {
    /// A request with this method and path, status 200 for response hooks, no session.
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.to_owned(),
            path: path.to_owned(),
            status: 200,
            api_name: "test-api".to_owned(),
            api_config_data: "null".to_owned(),
            config: "null".to_owned(),
            ..Default::default()
        }
    }

    /// Gives the request a session with this id and metadata.
    pub fn with_session(mut self, id: &str, meta: &[(&str, &str)]) -> Self {
        self.session = Some((id.to_owned(), meta.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()));
        self
    }

    /// Runs a request hook the way the gateway would, panics caught included.
    pub fn request(&mut self, f: fn(&mut Request<'_>) -> Flow) -> Flow {
        let config = self.config.clone();
        self.run(|raw, host| f(&mut Request::new(Call::new(raw, host, &config))))
    }

    /// Sets a field of the record analytics hooks see.
    pub fn with_field(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.record.insert(name.to_owned(), Some(value.as_ref().to_vec()));
        self
    }

    /// A field of the record as text, after an analytics hook ran.
    pub fn field(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.record.get(name)?.as_deref()?).ok()
    }

    /// Runs an analytics hook the way the gateway would. Unlike the gateway, this stand-in
    /// accepts any field name and value.
    pub fn analytics(&mut self, f: fn(&mut Record<'_>) -> Flow) -> Flow {
        let config = self.config.clone();
        self.run(|raw, host| f(&mut Record::new(Call::new(raw, host, &config))))
    }

    /// Runs a response hook the way the gateway would.
    pub fn response(&mut self, f: fn(&mut Response<'_>) -> Flow) -> Flow {
        let config = self.config.clone();
        self.run(|raw, host| f(&mut Response::new(Call::new(raw, host, &config))))
    }

    fn run(&mut self, f: impl FnOnce(*mut gh_call, &'static gh_host_api) -> Flow) -> Flow {
        crate::rt::set_host(&TEST_HOST);
        let raw = (self as *mut TestCall).cast::<gh_call>();
        match crate::rt::run(raw, |host| f(raw, host)) {
            GH_CONTINUE => Flow::Continue,
            GH_RESPOND => Flow::Respond,
            _ => Flow::Error {
                status: self.error_status.unwrap_or(500),
                message: self.error.clone().unwrap_or_default(),
            },
        }
    }

    /// The first request header of that name (case-insensitive).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        find(&self.request_headers, name)
    }

    /// The first response header of that name (case-insensitive).
    pub fn response_header(&self, name: &str) -> Option<&str> {
        find(&self.response_headers, name)
    }
}

fn find<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// # Safety
/// `call` is the `TestCall` a `TestCall::request`/`response` passed to the hook.
unsafe fn me<'a>(call: *mut gh_call) -> &'a mut TestCall {
    // SAFETY: per the contract; the TestCall outlives the hook call it was made for.
    unsafe { &mut *call.cast::<TestCall>() }
}

fn text(s: gh_str) -> String {
    // SAFETY: hooks pass views valid for the duration of the call.
    String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
}

fn out(s: &str, o: *mut gh_str) -> i32 {
    // SAFETY: hooks pass a valid place to write.
    unsafe { *o = gh_str::new(s.as_bytes()) };
    1
}

unsafe extern "C" fn log(call: *mut gh_call, _level: gh_level, msg: gh_str) {
    if !call.is_null() {
        // SAFETY: as `me`.
        unsafe { me(call) }.logs.push(text(msg));
    }
}
unsafe extern "C" fn set_error(call: *mut gh_call, msg: gh_str) {
    // SAFETY: as `me`.
    unsafe { me(call) }.error = Some(text(msg));
}
unsafe extern "C" fn request_method(call: *mut gh_call) -> gh_str {
    // SAFETY: as `me`; the string lives in the TestCall.
    gh_str::new(unsafe { me(call) }.method.as_bytes())
}
unsafe extern "C" fn request_path(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    gh_str::new(unsafe { me(call) }.path.as_bytes())
}
unsafe extern "C" fn request_query(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    gh_str::new(unsafe { me(call) }.query.as_bytes())
}
unsafe extern "C" fn client_ip(_: *mut gh_call) -> gh_str {
    gh_str::from_static("127.0.0.1")
}
fn headers(c: &mut TestCall, target: gh_target) -> &mut Vec<(String, String)> {
    if target == GH_REQUEST { &mut c.request_headers } else { &mut c.response_headers }
}
unsafe extern "C" fn header_get(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    index: usize,
    o: *mut gh_str,
) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    let name = text(name);
    let found = headers(c, target).iter().filter(|(k, _)| k.eq_ignore_ascii_case(&name)).nth(index);
    found.map_or(0, |(_, v)| out(v, o))
}
unsafe extern "C" fn headers_each(call: *mut gh_call, target: gh_target, ctx: *mut c_void, cb: gh_header_cb) {
    // SAFETY: as `me`; the callback gets views that live through the call.
    for (k, v) in headers(unsafe { me(call) }, target).iter() {
        unsafe { cb(ctx, gh_str::new(k.as_bytes()), gh_str::new(v.as_bytes())) };
    }
}
unsafe extern "C" fn header_set(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: as `me`.
    let h = headers(unsafe { me(call) }, target);
    let name = text(name);
    h.retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
    h.push((name, text(value)));
    1
}
unsafe extern "C" fn header_add(call: *mut gh_call, target: gh_target, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: as `me`.
    headers(unsafe { me(call) }, target).push((text(name), text(value)));
    1
}
unsafe extern "C" fn header_remove(call: *mut gh_call, target: gh_target, name: gh_str) -> i32 {
    let name = text(name);
    // SAFETY: as `me`.
    headers(unsafe { me(call) }, target).retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
    1
}
unsafe extern "C" fn body_get(call: *mut gh_call, target: gh_target, o: *mut gh_str) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    let body = if target == GH_REQUEST { &c.request_body } else { &c.response_body };
    match body {
        // SAFETY: `o` is a valid place to write; the body lives in the TestCall.
        Some(b) => unsafe {
            *o = gh_str::new(b);
            1
        },
        None => 0,
    }
}
unsafe extern "C" fn body_set(call: *mut gh_call, target: gh_target, body: gh_str) -> i32 {
    // SAFETY: as `me`; `body` is readable for the call.
    let (c, b) = unsafe { (me(call), body.as_bytes().to_vec()) };
    if target == GH_REQUEST {
        c.request_body = Some(b)
    } else {
        c.response_body = Some(b)
    }
    1
}
unsafe extern "C" fn response_status(call: *mut gh_call) -> u16 {
    // SAFETY: as `me`.
    unsafe { me(call) }.status
}
unsafe extern "C" fn response_set_status(call: *mut gh_call, status: u16) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.status = status;
    1
}
unsafe extern "C" fn session_id(call: *mut gh_call, o: *mut gh_str) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.session.as_ref().map_or(0, |(id, _)| out(id, o))
}
unsafe extern "C" fn session_json(call: *mut gh_call, o: *mut gh_str) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    let Some((id, meta)) = &c.session else { return 0 };
    let meta: Vec<String> = meta.iter().map(|(k, v)| format!("{k:?}:{v:?}")).collect();
    c.scratch = format!("{{\"id\":{id:?},\"meta_data\":{{{}}}}}", meta.join(","));
    out(&c.scratch, o)
}
unsafe extern "C" fn session_meta_get(call: *mut gh_call, key: gh_str, o: *mut gh_str) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    c.session.as_ref().and_then(|(_, m)| m.get(&text(key))).map_or(0, |v| out(v, o))
}
unsafe extern "C" fn session_meta_set(call: *mut gh_call, key: gh_str, value: gh_str) -> i32 {
    // SAFETY: as `me`.
    match &mut unsafe { me(call) }.session {
        Some((_, m)) => {
            m.insert(text(key), text(value));
            1
        }
        None => 0,
    }
}
unsafe extern "C" fn session_create(call: *mut gh_call, init: *const gh_session_init) -> i32 {
    // SAFETY: as `me`; `init` is valid for the call.
    let (c, init) = unsafe { (me(call), &*init) };
    let mut meta = BTreeMap::new();
    if init.size as usize >= size_of::<gh_session_init>() {
        // SAFETY: the SDK passes `meta_len` pairs, readable for the call.
        let pairs = unsafe { slice(init.meta, init.meta_len) };
        meta.extend(pairs.iter().map(|p| (text(p.key), text(p.value))));
        let alias = text(init.alias);
        c.session_alias = (!alias.is_empty()).then_some(alias);
    }
    c.session = Some((text(init.id), meta));
    1
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
unsafe extern "C" fn api_id(_: *mut gh_call) -> gh_str {
    gh_str::from_static("default/test-api")
}
unsafe extern "C" fn api_name(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    gh_str::new(unsafe { me(call) }.api_name.as_bytes())
}
unsafe extern "C" fn api_listen_path(_: *mut gh_call) -> gh_str {
    gh_str::from_static("/test/")
}
unsafe extern "C" fn api_config_data(call: *mut gh_call) -> gh_str {
    // SAFETY: as `request_method`.
    gh_str::new(unsafe { me(call) }.api_config_data.as_bytes())
}
unsafe extern "C" fn api_spec(_: *mut gh_call) -> gh_str {
    gh_str::from_static("{}")
}

unsafe extern "C" fn request_set_method(call: *mut gh_call, v: gh_str) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.method = text(v);
    1
}
unsafe extern "C" fn request_set_path(call: *mut gh_call, v: gh_str) -> i32 {
    let v = text(v);
    if !v.starts_with('/') {
        return -1;
    }
    // SAFETY: as `me`.
    unsafe { me(call) }.path = v;
    1
}
unsafe extern "C" fn request_set_query(call: *mut gh_call, v: gh_str) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.query = text(v);
    1
}
unsafe extern "C" fn header_values(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    o: *mut gh_str,
    cap: usize,
    count: *mut usize,
) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    let name = text(name);
    let mut n = 0;
    for (_, v) in headers(c, target).iter().filter(|(k, _)| k.eq_ignore_ascii_case(&name)) {
        if n < cap {
            // SAFETY: `o` has room for `cap` views; the value lives in the TestCall.
            unsafe { *o.add(n) = gh_str::new(v.as_bytes()) };
        }
        n += 1;
    }
    // SAFETY: a valid place to write.
    unsafe { *count = n };
    i32::from(n > 0)
}
unsafe extern "C" fn header_replace(
    call: *mut gh_call,
    target: gh_target,
    name: gh_str,
    values: *const gh_str,
    len: usize,
) -> i32 {
    // SAFETY: as `me`; `values` holds `len` views.
    let (h, values) = unsafe { (headers(me(call), target), slice(values, len)) };
    let name = text(name);
    h.retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
    h.extend(values.iter().map(|v| (name.clone(), text(*v))));
    1
}
unsafe extern "C" fn set_error_status(call: *mut gh_call, status: u16) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.error_status = Some(status);
    1
}

unsafe extern "C" fn record_get(call: *mut gh_call, name: gh_str, o: *mut gh_str) -> i32 {
    // SAFETY: as `me`.
    let c = unsafe { me(call) };
    match c.record.get(&text(name)) {
        Some(Some(v)) => {
            // SAFETY: hooks pass a valid place to write; the bytes live in the TestCall.
            unsafe { *o = gh_str::new(v) };
            1
        }
        _ => 0,
    }
}
unsafe extern "C" fn record_set(call: *mut gh_call, name: gh_str, value: gh_str) -> i32 {
    // SAFETY: as `me`; the view is readable for the call.
    unsafe { me(call) }.record.insert(text(name), Some(unsafe { value.as_bytes() }.to_vec()));
    1
}
unsafe extern "C" fn record_drop(call: *mut gh_call, name: gh_str) -> i32 {
    // SAFETY: as `me`.
    i32::from(unsafe { me(call) }.record.remove(&text(name)).is_some())
}
unsafe extern "C" fn record_add_tag(call: *mut gh_call, tag: gh_str) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.tags.push(text(tag));
    1
}
unsafe extern "C" fn record_set_meta(call: *mut gh_call, key: gh_str, value: gh_str) -> i32 {
    // SAFETY: as `me`.
    unsafe { me(call) }.meta.insert(text(key), text(value));
    1
}

static TEST_HOST: gh_host_api = gh_host_api {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, SessionInit};

    #[test]
    fn setters_take_values_borrowed_from_the_same_call() {
        fn tag(req: &mut Request<'_>) -> Flow {
            req.set_header("X-Api", req.api().name());
            req.set_header("X-Entry", req.config());
            Flow::Continue
        }
        let mut call = TestCall::new("GET", "/x");
        assert_eq!(call.request(tag), Flow::Continue);
        assert_eq!((call.request_header("x-api"), call.request_header("x-entry")), (Some("test-api"), Some("null")));
    }

    #[test]
    fn the_api_definition_is_typed() {
        fn read(req: &mut Request<'_>) -> Flow {
            let api = req.api();
            let tier = api.config_data()["tier"].as_str().unwrap_or("none").to_owned();
            req.set_header("X-Tier", &tier);
            req.set_header("X-Where", &format!("{} {} {}", api.id(), api.name(), api.listen_path()));
            Flow::Continue
        }
        let mut call = TestCall::new("GET", "/x");
        call.api_config_data = r#"{"tier": "gold"}"#.to_owned();
        assert_eq!(call.request(read), Flow::Continue);
        assert_eq!(call.request_header("x-tier"), Some("gold"));
        assert_eq!(call.request_header("x-where"), Some("default/test-api test-api /test/"));
    }

    #[test]
    fn an_error_carries_its_status() {
        let mut call = TestCall::new("GET", "/x");
        let flow = call.request(|_| Flow::error_status(403, "no tenant"));
        assert_eq!(flow, Flow::Error { status: 403, message: "no tenant".to_owned() });
        let mut call = TestCall::new("GET", "/x");
        assert_eq!(call.request(|_| Flow::error("boom")), Flow::Error { status: 500, message: "boom".to_owned() });
        assert_eq!(call.error_status, None, "500 is the default and is not sent");
    }

    #[test]
    fn a_session_is_created_with_alias_and_metadata_in_one_call() {
        fn auth(req: &mut Request<'_>) -> Flow {
            let meta = [("tier", "gold"), ("org", "acme")];
            match req.create_session(&SessionInit::new("user-1").alias("Alice").meta(&meta)) {
                Ok(()) => Flow::Continue,
                Err(e) => Flow::error(e),
            }
        }
        let mut call = TestCall::new("GET", "/x");
        assert_eq!(call.request(auth), Flow::Continue);
        let (id, meta) = call.session.clone().unwrap_or_default();
        assert_eq!((id.as_str(), call.session_alias.as_deref()), ("user-1", Some("Alice")));
        assert_eq!(
            (meta.get("tier").map(String::as_str), meta.get("org").map(String::as_str)),
            (Some("gold"), Some("acme"))
        );
    }

    #[test]
    fn every_value_of_a_header_is_read_and_replaced_at_once() {
        fn values(req: &mut Request<'_>) -> Flow {
            let all = req.header_values("x-multi").join("|");
            req.set_header_values("x-multi", &["a", "b"]);
            req.set_header("X-Joined", &all);
            Flow::Continue
        }
        let mut call = TestCall::new("GET", "/x");
        call.request_headers = (0..10).map(|i| ("x-multi".to_owned(), i.to_string())).collect();
        assert_eq!(call.request(values), Flow::Continue);
        assert_eq!(call.request_header("x-joined"), Some("0|1|2|3|4|5|6|7|8|9"), "more than fit the first try");
        let after: Vec<_> =
            call.request_headers.iter().filter(|(k, _)| k == "x-multi").map(|(_, v)| v.as_str()).collect();
        assert_eq!(after, ["a", "b"]);
    }

    #[test]
    fn a_plugin_refuses_a_gateway_older_than_its_sdk() {
        let old = gh_host_api { size: GH_HOST_API_SIZE_1_0 as u32, abi_minor: 0, ..TEST_HOST };
        let old: &'static gh_host_api = Box::leak(Box::new(old));
        let mut text = [0u8; 256];
        let mut err = gh_buf { ptr: text.as_mut_ptr(), cap: text.len(), len: 0 };
        // SAFETY: a host table and a valid error buffer, as a host passes them.
        let rc = unsafe { crate::rt::init(old, &mut err, || Ok(())) };
        let msg = String::from_utf8_lossy(&text[..err.len]);
        assert_eq!(rc, 1);
        assert!(msg.contains("the gateway is older than this plugin's SDK"), "{msg}");
    }
}
