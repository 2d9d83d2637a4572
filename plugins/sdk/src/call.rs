//! Safe views of one hook call. Every raw pointer stays in this module and `rt`.
#![allow(unsafe_code)]

use std::{ffi::c_void, marker::PhantomData, time::Duration};

use crate::{Flow, abi::*};

/// A live hook call: the host's handle plus its function table. Views borrowed from it end
/// with the hook, which the lifetime `'a` expresses.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    raw: *mut gh_call,
    host: &'static gh_host_api,
    config: &'a str,
    _call: PhantomData<&'a mut gh_call>,
}

fn view(s: &str) -> gh_str {
    gh_str::new(s.as_bytes())
}

impl<'a> Call<'a> {
    pub(crate) fn new(raw: *mut gh_call, host: &'static gh_host_api, config: &'a str) -> Self {
        Self { raw, host, config, _call: PhantomData }
    }

    /// Text the host returned. Host views live until the hook returns or the item changes;
    /// callers tie the result to a borrow of the wrapper, which `&mut` methods end.
    fn text(&self, s: gh_str) -> &str {
        // SAFETY: the host guarantees `s` is readable until this hook returns or the item
        // changes; the returned borrow is bounded by `&self`, and changes need `&mut`.
        std::str::from_utf8(unsafe { s.as_bytes() }).unwrap_or("")
    }

    fn bytes(&self, s: gh_str) -> &[u8] {
        // SAFETY: as in `text`.
        unsafe { s.as_bytes() }
    }

    /// Text that does not change during the call (the API definition, the entry's config):
    /// borrowed for the whole call, so it can be passed to a setter of the same call.
    fn fixed(self, f: unsafe extern "C" fn(*mut gh_call) -> gh_str) -> &'a str {
        // SAFETY: `raw` is the live call; the API definition's text lives in the host's
        // compiled config, which the call holds for its whole duration and no host call
        // changes.
        std::str::from_utf8(unsafe { f(self.raw).as_bytes() }).unwrap_or("")
    }

    fn header_all(&self, target: gh_target, name: &str) -> Vec<&str> {
        let mut out = [gh_str::EMPTY; 8];
        let mut count = 0usize;
        // SAFETY: live call; `out` has room for its length; `count` is a valid place.
        let rc =
            unsafe { (self.host.header_values)(self.raw, target, view(name), out.as_mut_ptr(), out.len(), &mut count) };
        if rc != 1 {
            return Vec::new();
        }
        if count <= out.len() {
            return out[..count].iter().map(|v| self.text(*v)).collect();
        }
        let mut more = vec![gh_str::EMPTY; count];
        // SAFETY: as above, with room for `count`; nothing changed the headers in between.
        unsafe { (self.host.header_values)(self.raw, target, view(name), more.as_mut_ptr(), more.len(), &mut count) };
        more.truncate(count);
        more.into_iter().map(|v| self.text(v)).collect()
    }

    fn replace_header(&mut self, target: gh_target, name: &str, values: &[&str]) -> bool {
        let views: Vec<gh_str> = values.iter().map(|v| view(v)).collect();
        // SAFETY: live call; the views outlive the call (the host copies them).
        unsafe { (self.host.header_replace)(self.raw, target, view(name), views.as_ptr(), views.len()) == 1 }
    }

    fn set_request(&mut self, f: unsafe extern "C" fn(*mut gh_call, gh_str) -> i32, v: &str) -> bool {
        // SAFETY: live call; `v` outlives the call (the host copies it).
        unsafe { f(self.raw, view(v)) == 1 }
    }

    fn get(&self, f: unsafe extern "C" fn(*mut gh_call) -> gh_str) -> &str {
        // SAFETY: `raw` is the live call the host passed to this hook; `f` is from its table.
        let s = unsafe { f(self.raw) };
        self.text(s)
    }

    fn header(&self, target: gh_target, name: &str) -> Option<&str> {
        let mut out = gh_str::EMPTY;
        // SAFETY: live call; `name` outlives the call; `out` is a valid place to write.
        let found = unsafe { (self.host.header_get)(self.raw, target, view(name), 0, &mut out) };
        if found != 1 {
            return None;
        }
        // SAFETY: as in `text`.
        std::str::from_utf8(unsafe { out.as_bytes() }).ok()
    }

    fn headers(&self, target: gh_target) -> Vec<(String, String)> {
        unsafe extern "C" fn collect(ctx: *mut c_void, name: gh_str, value: gh_str) {
            // SAFETY: `ctx` is the Vec passed below, alive and exclusively ours during the
            // call; `name` and `value` are readable for the callback's duration.
            let (all, name, value) =
                unsafe { (&mut *ctx.cast::<Vec<(String, String)>>(), name.as_bytes(), value.as_bytes()) };
            all.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()));
        }
        let mut all: Vec<(String, String)> = Vec::new();
        // SAFETY: live call; the callback only runs during this call, while `all` lives.
        unsafe { (self.host.headers_each)(self.raw, target, (&raw mut all).cast(), collect) };
        all
    }

    fn set_header(&mut self, target: gh_target, name: &str, value: &str, add: bool) -> bool {
        let f = if add { self.host.header_add } else { self.host.header_set };
        // SAFETY: live call; both views outlive the call (the host copies them).
        unsafe { f(self.raw, target, view(name), view(value)) == 1 }
    }

    fn remove_header(&mut self, target: gh_target, name: &str) {
        // SAFETY: live call; `name` outlives the call.
        unsafe { (self.host.header_remove)(self.raw, target, view(name)) };
    }

    fn body(&self, target: gh_target) -> Option<&[u8]> {
        let mut out = gh_str::EMPTY;
        // SAFETY: live call; `out` is a valid place to write.
        let found = unsafe { (self.host.body_get)(self.raw, target, &mut out) };
        (found == 1).then(|| self.bytes(out))
    }

    fn set_body(&mut self, target: gh_target, body: &[u8]) {
        // SAFETY: live call; `body` outlives the call (the host copies it).
        unsafe { (self.host.body_set)(self.raw, target, gh_str::new(body)) };
    }

    fn out_str(&self, f: unsafe extern "C" fn(*mut gh_call, *mut gh_str) -> i32) -> Option<&str> {
        let mut out = gh_str::EMPTY;
        // SAFETY: live call; `out` is a valid place to write.
        let found = unsafe { f(self.raw, &mut out) };
        (found == 1).then(|| self.text(out))
    }

    fn session(&self) -> Option<Session<'_>> {
        self.out_str(self.host.session_id)?;
        Some(Session { call: *self, _borrow: PhantomData })
    }

    fn set_meta(&mut self, key: &str, value: &str) -> bool {
        // SAFETY: live call; both views outlive the call.
        unsafe { (self.host.session_meta_set)(self.raw, view(key), view(value)) == 1 }
    }

    fn api(&self) -> Api<'a> {
        Api { call: *self }
    }

    fn set_status(&mut self, status: u16) {
        // SAFETY: live call.
        unsafe { (self.host.response_set_status)(self.raw, status) };
    }
}

/// The request, in `pre`, `authCheck`, `postKeyAuth` and `post` hooks.
pub struct Request<'a> {
    call: Call<'a>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(call: Call<'a>) -> Self {
        Self { call }
    }

    /// The request method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.call.get(self.call.host.request_method)
    }
    /// The (normalised) request path, e.g. `/api/users`.
    pub fn path(&self) -> &str {
        self.call.get(self.call.host.request_path)
    }
    /// The query string without `?`, empty if none.
    pub fn query(&self) -> &str {
        self.call.get(self.call.host.request_query)
    }
    /// Rewrites the method the upstream sees (routing is not re-run); false if `method` is
    /// not an HTTP token.
    pub fn set_method(&mut self, method: &str) -> bool {
        self.call.set_request(self.call.host.request_set_method, method)
    }
    /// Rewrites the path the upstream sees (routing is not re-run): it must start with `/`
    /// and is normalised as the gateway normalises requests; false if refused (the
    /// gateway logs why).
    pub fn set_path(&mut self, path: &str) -> bool {
        self.call.set_request(self.call.host.request_set_path, path)
    }
    /// Rewrites the query string (without `?`; empty removes it); false unless it is
    /// made of URI characters.
    pub fn set_query(&mut self, query: &str) -> bool {
        self.call.set_request(self.call.host.request_set_query, query)
    }
    /// The client's IP address, as text.
    pub fn client_ip(&self) -> &str {
        self.call.get(self.call.host.client_ip)
    }
    /// The first value of a header (case-insensitive name), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.call.header(GH_REQUEST, name)
    }
    /// Every value of a header, in order, in one host call (non-UTF-8 values read as "").
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.call.header_all(GH_REQUEST, name)
    }
    /// Every header, in order, copied.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.call.headers(GH_REQUEST)
    }
    /// Replaces every value of the header; false if the name or value is not valid.
    pub fn set_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_REQUEST, name, value, false)
    }
    /// Replaces every value of the header with `values` in one call (none removes it);
    /// false, and nothing changed, if any is not valid.
    pub fn set_header_values(&mut self, name: &str, values: &[&str]) -> bool {
        self.call.replace_header(GH_REQUEST, name, values)
    }
    /// Adds a value, keeping the header's others; false if the name or value is not valid.
    pub fn add_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_REQUEST, name, value, true)
    }
    /// Removes every value of the header.
    pub fn remove_header(&mut self, name: &str) {
        self.call.remove_header(GH_REQUEST, name)
    }
    /// Sets a header on the response the client gets (Tyk's `rw.Header().Set` in a request
    /// hook), replacing the values an earlier hook set for that name: whoever answers, the
    /// upstream, a later hook or the gateway with an error, the response carries it, and its
    /// values replace the answer's own for that name. `response` hooks see it applied.
    /// False if the name or value is not valid.
    pub fn set_response_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_RESPONSE, name, value, false)
    }
    /// Like [`Request::set_response_header`], keeping the values set before (Tyk's
    /// `rw.Header().Add`).
    pub fn add_response_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_RESPONSE, name, value, true)
    }
    /// The body, for hooks exported with `request(body)` or `REQUEST_BODY`.
    pub fn body(&self) -> Option<&[u8]> {
        self.call.body(GH_REQUEST)
    }
    /// Replaces the body sent upstream (Content-Length follows).
    pub fn set_body(&mut self, body: impl AsRef<[u8]>) {
        self.call.set_body(GH_REQUEST, body.as_ref())
    }
    /// The key's session, once auth has run (or an `authCheck` hook created one).
    pub fn session(&self) -> Option<Session<'_>> {
        self.call.session()
    }
    /// Sets session metadata for the rest of this request (later hooks, analytics).
    pub fn set_session_meta(&mut self, key: &str, value: &str) -> bool {
        self.call.set_meta(key, value)
    }
    /// `authCheck` hooks: the session the gateway then enforces (rate, quota, access).
    pub fn create_session(&mut self, s: &SessionInit<'_>) -> Result<(), String> {
        let rights: Vec<gh_str> = s.access_rights.iter().map(|r| view(r)).collect();
        let (rate, per) = s.rate.map_or((0, 0), |(n, per)| (n, per.as_millis() as u64));
        let (quota_max, renewal) =
            s.quota.map_or((-1, 0), |(n, r)| (i64::try_from(n).unwrap_or(i64::MAX), r.as_millis() as u64));
        let meta: Vec<gh_pair> = s.meta.iter().map(|(k, v)| gh_pair { key: view(k), value: view(v) }).collect();
        let init = gh_session_init {
            size: size_of::<gh_session_init>() as u32,
            _reserved: 0,
            id: view(s.id),
            rate,
            per_ms: per,
            quota_max,
            quota_renewal_ms: renewal,
            access_rights: rights.as_ptr(),
            access_rights_len: rights.len(),
            alias: view(s.alias),
            meta: meta.as_ptr(),
            meta_len: meta.len(),
        };
        // SAFETY: live call; `init` and the views it holds outlive the call.
        match unsafe { (self.call.host.session_create)(self.call.raw, &init) } {
            1 => Ok(()),
            _ => Err("session_create is only allowed in authCheck hooks, with a non-empty id".to_owned()),
        }
    }
    /// The API definition the request was routed to. Its text is borrowed for the whole
    /// call, so `req.set_header("X-Api", req.api().name())` works.
    pub fn api(&self) -> Api<'a> {
        self.call.api()
    }
    /// This entry's `config` from the ApiDefinition, as JSON (`null` when unset).
    pub fn config(&self) -> &'a str {
        self.call.config
    }
    /// Starts the response this hook will send instead of calling the upstream; finish it
    /// with [`Reply::body`], [`Reply::json`] or [`Reply::send`], and return that `Flow`.
    pub fn respond(&mut self, status: u16) -> Reply<'_> {
        self.call.set_status(status);
        Reply { call: self.call, _borrow: PhantomData }
    }
}

/// A response a request hook is building.
pub struct Reply<'r> {
    call: Call<'r>,
    _borrow: PhantomData<&'r mut ()>,
}

impl Reply<'_> {
    /// Adds a header to the response.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.call.set_header(GH_RESPONSE, name, value, true);
        self
    }
    /// Sets the body and finishes: return the `Flow` this gives.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> Flow {
        self.call.set_body(GH_RESPONSE, body.as_ref());
        Flow::Respond
    }
    /// Sets `Content-Type: application/json` and the body.
    pub fn json(self, body: impl AsRef<[u8]>) -> Flow {
        self.header("content-type", "application/json").body(body)
    }
    /// Finishes without a body.
    pub fn send(self) -> Flow {
        Flow::Respond
    }
}

/// The upstream's response, in `response` hooks.
pub struct Response<'a> {
    call: Call<'a>,
}

impl<'a> Response<'a> {
    pub(crate) fn new(call: Call<'a>) -> Self {
        Self { call }
    }
    /// The upstream's status.
    pub fn status(&self) -> u16 {
        // SAFETY: live call.
        unsafe { (self.call.host.response_status)(self.call.raw) }
    }
    /// Changes the status the client gets.
    pub fn set_status(&mut self, status: u16) {
        self.call.set_status(status)
    }
    /// The first value of a response header, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.call.header(GH_RESPONSE, name)
    }
    /// Every value of a response header, in one host call.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.call.header_all(GH_RESPONSE, name)
    }
    /// Every response header, in order, copied.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.call.headers(GH_RESPONSE)
    }
    /// Replaces every value of a response header; false if the name or value is not valid.
    pub fn set_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_RESPONSE, name, value, false)
    }
    /// Replaces every value of a response header with `values` in one call.
    pub fn set_header_values(&mut self, name: &str, values: &[&str]) -> bool {
        self.call.replace_header(GH_RESPONSE, name, values)
    }
    /// Adds a value to a response header.
    pub fn add_header(&mut self, name: &str, value: &str) -> bool {
        self.call.set_header(GH_RESPONSE, name, value, true)
    }
    /// Removes every value of a response header.
    pub fn remove_header(&mut self, name: &str) {
        self.call.remove_header(GH_RESPONSE, name)
    }
    /// The upstream body, for hooks exported with `response(body)` or `RESPONSE_BODY`.
    pub fn body(&self) -> Option<&[u8]> {
        self.call.body(GH_RESPONSE)
    }
    /// Replaces the body sent to the client (Content-Length follows).
    pub fn set_body(&mut self, body: impl AsRef<[u8]>) {
        self.call.set_body(GH_RESPONSE, body.as_ref())
    }
    /// The request this response answers (read-only).
    pub fn request(&self) -> RequestView<'_> {
        RequestView { call: self.call, _borrow: PhantomData }
    }
    /// The key's session, if the request had one.
    pub fn session(&self) -> Option<Session<'_>> {
        self.call.session()
    }
    /// The API definition, borrowed for the whole call.
    pub fn api(&self) -> Api<'a> {
        self.call.api()
    }
    /// This entry's `config` from the ApiDefinition, as JSON (`null` when unset).
    pub fn config(&self) -> &'a str {
        self.call.config
    }
}

/// The request, as a response hook sees it.
pub struct RequestView<'c> {
    call: Call<'c>,
    _borrow: PhantomData<&'c ()>,
}

impl RequestView<'_> {
    /// The request method.
    pub fn method(&self) -> &str {
        self.call.get(self.call.host.request_method)
    }
    /// The request path (as sent upstream).
    pub fn path(&self) -> &str {
        self.call.get(self.call.host.request_path)
    }
    /// The query string without `?`.
    pub fn query(&self) -> &str {
        self.call.get(self.call.host.request_query)
    }
    /// The first value of a request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.call.header(GH_REQUEST, name)
    }
}

/// The API definition the request was routed to. It does not change during a call, so
/// its text is borrowed for the whole call (`'a`), not from the request view.
#[derive(Clone, Copy)]
pub struct Api<'a> {
    call: Call<'a>,
}

impl<'a> Api<'a> {
    /// `namespace/name`.
    pub fn id(&self) -> &'a str {
        self.call.fixed(self.call.host.api_id)
    }
    /// `spec.name`, or `metadata.name`.
    pub fn name(&self) -> &'a str {
        self.call.fixed(self.call.host.api_name)
    }
    /// `spec.listenPath`.
    pub fn listen_path(&self) -> &'a str {
        self.call.fixed(self.call.host.api_listen_path)
    }
    /// `spec.configData`, parsed (`Value::Null` when unset).
    pub fn config_data(&self) -> serde_json::Value {
        serde_json::from_str(self.config_data_json()).unwrap_or(serde_json::Value::Null)
    }
    /// `spec.configData` as JSON text (`null` when unset).
    pub fn config_data_json(&self) -> &'a str {
        self.call.fixed(self.call.host.api_config_data)
    }
    /// The whole spec as JSON.
    pub fn spec(&self) -> &'a str {
        self.call.fixed(self.call.host.api_spec)
    }
}

/// The session of the key that authenticated the request.
pub struct Session<'c> {
    call: Call<'c>,
    _borrow: PhantomData<&'c ()>,
}

impl Session<'_> {
    /// The key Secret's `namespace/name`, or the id an auth hook gave.
    pub fn id(&self) -> &str {
        self.call.out_str(self.call.host.session_id).unwrap_or("")
    }
    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        let mut out = gh_str::EMPTY;
        // SAFETY: live call; `key` outlives the call; `out` is a valid place to write.
        let found = unsafe { (self.call.host.session_meta_get)(self.call.raw, view(key), &mut out) };
        (found == 1).then(|| self.call.text(out))
    }
    /// The whole session as JSON: id, rate, per, quota, access rights, metadata, expiry.
    pub fn json(&self) -> &str {
        self.call.out_str(self.call.host.session_json).unwrap_or("null")
    }
}

/// A session an `authCheck` hook creates.
#[derive(Debug, Clone, Default)]
pub struct SessionInit<'s> {
    /// Stable identity: rate limits and quotas count per id.
    pub id: &'s str,
    /// Shown in analytics and as the session id; empty means `id`.
    pub alias: &'s str,
    /// At most `n` requests every duration.
    pub rate: Option<(u64, Duration)>,
    /// At most `n` requests per renewal window.
    pub quota: Option<(u64, Duration)>,
    /// ApiDefinition names the session may call; none means the API being called.
    pub access_rights: &'s [&'s str],
    /// The session's metadata, which later hooks and analytics see.
    pub meta: &'s [(&'s str, &'s str)],
}

impl<'s> SessionInit<'s> {
    /// A session counted under `id`, with no limits.
    pub fn new(id: &'s str) -> Self {
        Self { id, ..Default::default() }
    }
    /// At most `n` requests every `per`.
    pub fn rate(mut self, n: u64, per: Duration) -> Self {
        self.rate = Some((n, per));
        self
    }
    /// At most `n` requests per `renewal` window.
    pub fn quota(mut self, n: u64, renewal: Duration) -> Self {
        self.quota = Some((n, renewal));
        self
    }
    /// ApiDefinition names; none means only the API being called.
    pub fn access_rights(mut self, apis: &'s [&'s str]) -> Self {
        self.access_rights = apis;
        self
    }
    /// The name shown in analytics and as the session id (default: `id`).
    pub fn alias(mut self, alias: &'s str) -> Self {
        self.alias = alias;
        self
    }
    /// The session's metadata, set in the same call.
    pub fn meta(mut self, pairs: &'s [(&'s str, &'s str)]) -> Self {
        self.meta = pairs;
        self
    }
}

/// One analytics record, as an `analytics` hook sees it (Tyk's `AnalyticsRecord`), before
/// the gateway writes it. Fields are read and set by name, as text; see the SDK reference
/// in docs/plugins.md for the names. Changes show in the record written and in later
/// analytics hooks; a hook that fails or panics leaves the record as it was before it.
pub struct Record<'a> {
    call: Call<'a>,
}

impl<'a> Record<'a> {
    pub(crate) fn new(call: Call<'a>) -> Self {
        Self { call }
    }
    /// A field as text (numbers in decimal, `true`/`false`); `None` when absent, null,
    /// dropped, or not UTF-8 (a body: see [`Record::get_bytes`]).
    pub fn get(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.get_bytes(name)?).ok()
    }
    /// A field's bytes: the bodies (`request_body`, `response_body`) as captured.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        let mut out = gh_str::EMPTY;
        // SAFETY: live call; `name` outlives the call; `out` is a valid place to write.
        let found = unsafe { (self.call.host.record_get)(self.call.raw, view(name), &mut out) };
        (found == 1).then(|| self.call.bytes(out))
    }
    /// Sets (or brings back) a field: text fields take any text, numbers and booleans
    /// their text form (`"404"`, `"false"`), bodies any bytes. `false` for an unknown
    /// field or a value of the wrong type.
    pub fn set(&mut self, name: &str, value: impl AsRef<[u8]>) -> bool {
        // SAFETY: live call; both views outlive the call (the host copies them).
        unsafe { (self.call.host.record_set)(self.call.raw, view(name), gh_str::new(value.as_ref())) == 1 }
    }
    /// Replaces a text field or a body with `****`, keeping the field: Tyk's masking.
    pub fn mask(&mut self, name: &str) -> bool {
        self.set(name, "****")
    }
    /// Removes a field from the record (also `tags` or `meta_data`). `false` if absent.
    pub fn drop_field(&mut self, name: &str) -> bool {
        // SAFETY: live call; `name` outlives the call.
        unsafe { (self.call.host.record_drop)(self.call.raw, view(name)) == 1 }
    }
    /// Appends a tag to the record's `tags` (Tyk's `Tags`).
    pub fn add_tag(&mut self, tag: &str) -> bool {
        // SAFETY: live call; `tag` outlives the call.
        unsafe { (self.call.host.record_add_tag)(self.call.raw, view(tag)) == 1 }
    }
    /// Sets an entry of the record's `meta_data` (the key's metadata, Tyk's `MetaData`);
    /// the key's own session does not change.
    pub fn set_meta(&mut self, key: &str, value: &str) -> bool {
        // SAFETY: live call; both views outlive the call.
        unsafe { (self.call.host.record_set_meta)(self.call.raw, view(key), view(value)) == 1 }
    }
    /// The API definition the request was routed to.
    pub fn api(&self) -> Api<'a> {
        self.call.api()
    }
    /// This entry's `config` from the ApiDefinition, as JSON (`null` when unset).
    pub fn config(&self) -> &'a str {
        self.call.config
    }
}
