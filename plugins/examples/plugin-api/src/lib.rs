//! Response headers from request hooks, per-endpoint hooks, and analytics hooks.
//!
//! `LookupUser` is an endpoint hook answering for `/users/{id}` itself (Tyk's virtual
//! endpoint); `Step` is one configurable hook for trying the chain out, phase by phase.
//! `MaskPasswords` and `TagRecord` are analytics hooks (Tyk's analytics plugins): the
//! first masks passwords in the recorded bodies, the second tags and edits records.
//!
//! ```yaml
//! middleware:
//!   pre: [{plugin: plugin-api, symbol: Step, config: {setResponseHeader: {x-served-by: gatehouse}}}]
//!   endpoints:
//!   - path: /users/{id}
//!     methods: [GET]
//!     plugins: [{plugin: plugin-api, symbol: LookupUser}]
//!   analytics:
//!   - {plugin: plugin-api, symbol: MaskPasswords, detailedRecording: true}
//!   - {plugin: plugin-api, symbol: TagRecord, config: {tags: [billing], meta: {team: a}}}
//! ```
use std::collections::BTreeMap;

use gatehouse_plugin::{Flow, Hook, Record, Request, Response, declare_plugin, hook};
use serde::Deserialize;

declare_plugin!(hooks: [LookupUser, Step, MaskPasswords, TagRecord]);
hook!(request LookupUser = lookup_user);
hook!(Step: Step);
hook!(analytics MaskPasswords = mask_passwords);
hook!(TagRecord: TagRecord);

/// Tyk's `MaskAnalyticsData`: replaces the value of every `password` member of a JSON
/// request or response body with `****` before the record is written.
fn mask_passwords(rec: &mut Record) -> Flow {
    for field in ["request_body", "response_body"] {
        let Some(body) = rec.get_bytes(field) else { continue };
        let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(body) else { continue };
        if mask_in(&mut json) {
            rec.set(field, json.to_string());
        }
    }
    Flow::Continue
}

/// Masks `password` members at any depth; whether any was found.
fn mask_in(v: &mut serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            let mut found = false;
            for (k, v) in m.iter_mut() {
                if k.eq_ignore_ascii_case("password") {
                    *v = serde_json::Value::from("****");
                    found = true;
                } else {
                    found |= mask_in(v);
                }
            }
            found
        }
        serde_json::Value::Array(a) => a.iter_mut().fold(false, |found, v| mask_in(v) | found),
        _ => false,
    }
}

/// An analytics hook that edits each record as its config says, in this order: tags,
/// metadata, masked fields, fields set, dropped fields.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagRecord {
    /// Appended to `tags`; `{status}` and `{method}` are replaced by the record's own.
    #[serde(default)]
    tags: Vec<String>,
    /// Set in `meta_data`.
    #[serde(default)]
    meta: BTreeMap<String, String>,
    /// Fields replaced by `****`.
    #[serde(default)]
    mask: Vec<String>,
    /// Fields set to a value.
    #[serde(default)]
    set: BTreeMap<String, String>,
    /// Fields removed.
    #[serde(default)]
    drop: Vec<String>,
    /// Before anything else, waits (at most a minute) until this file exists: a slow
    /// analytics hook, to see that it holds up analytics and never requests.
    #[serde(default)]
    wait_for_file: Option<std::path::PathBuf>,
}

impl Hook for TagRecord {
    fn new(config: &str) -> Result<Self, String> {
        if config == "null" {
            return Ok(Self::default());
        }
        serde_json::from_str(config).map_err(|e| format!("TagRecord config: {e}"))
    }

    fn on_analytics(&self, rec: &mut Record<'_>) -> Flow {
        if let Some(file) = &self.wait_for_file {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !file.exists() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        for tag in &self.tags {
            let tag = tag
                .replace("{status}", rec.get("status").unwrap_or("-"))
                .replace("{method}", rec.get("method").unwrap_or("-"));
            rec.add_tag(&tag);
        }
        for (k, v) in &self.meta {
            rec.set_meta(k, v);
        }
        for f in &self.mask {
            rec.mask(f);
        }
        for (f, v) in &self.set {
            if !rec.set(f, v) {
                return Flow::error(format!("cannot set {f} to {v:?}"));
            }
        }
        for f in &self.drop {
            rec.drop_field(f);
        }
        Flow::Continue
    }
}

/// Answers `GET …/users/{id}` with the id, read from the path's last segment.
fn lookup_user(req: &mut Request) -> Flow {
    let id = req.path().rsplit('/').next().unwrap_or_default().to_owned();
    let body = serde_json::json!({"user": id, "method": req.method()}).to_string();
    req.respond(200).json(body)
}

/// What one `Step` entry does, in this order; every part is optional.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// Appends this name to the request's `x-trace` header (`a,b,c`), so the upstream or
    /// an answer shows which hooks ran, in order.
    #[serde(default)]
    trace: Option<String>,
    /// Response headers to set (`set_response_header`).
    #[serde(default)]
    set_response_header: BTreeMap<String, String>,
    /// Response headers to add (`add_response_header`).
    #[serde(default)]
    add_response_header: BTreeMap<String, String>,
    /// Answers with this status and `{"answeredBy": trace, "trace": x-trace}`.
    #[serde(default)]
    answer: Option<u16>,
    /// In `response`: copies this response header's values into `x-seen-by-response`.
    #[serde(default)]
    see_response_header: Option<String>,
}

impl Hook for Step {
    fn new(config: &str) -> Result<Self, String> {
        if config == "null" {
            return Ok(Self::default());
        }
        serde_json::from_str(config).map_err(|e| format!("Step config: {e}"))
    }

    fn on_request(&self, req: &mut Request<'_>) -> Flow {
        let mut trace = req.header("x-trace").unwrap_or_default().to_owned();
        if let Some(name) = &self.trace {
            if !trace.is_empty() {
                trace.push(',');
            }
            trace.push_str(name);
            req.set_header("x-trace", &trace);
        }
        for (name, value) in &self.set_response_header {
            req.set_response_header(name, value);
        }
        for (name, value) in &self.add_response_header {
            req.add_response_header(name, value);
        }
        match self.answer {
            Some(status) => {
                let body = serde_json::json!({"answeredBy": self.trace, "trace": trace}).to_string();
                req.respond(status).json(body)
            }
            None => Flow::Continue,
        }
    }

    fn on_response(&self, resp: &mut Response<'_>) -> Flow {
        if let Some(name) = &self.see_response_header {
            let seen: Vec<String> =
                resp.headers().into_iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).collect();
            resp.set_header("x-seen-by-response", &seen.join(","));
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use gatehouse_plugin::testing::TestCall;

    use super::*;

    #[test]
    fn lookup_user_answers_with_the_last_segment() {
        let mut call = TestCall::new("GET", "/api/users/42");
        assert_eq!(call.request(lookup_user), Flow::Respond);
        assert_eq!(call.response_body.as_deref(), Some(&br#"{"method":"GET","user":"42"}"#[..]));
    }

    fn step(call: &mut Request<'_>) -> Flow {
        let s = Step::new(r#"{"trace": "b", "setResponseHeader": {"x-a": "1"}}"#).unwrap_or_default();
        s.on_request(call)
    }

    #[test]
    fn mask_passwords_masks_json_bodies_at_any_depth() {
        let mut call = TestCall::new("POST", "/login")
            .with_field("request_body", r#"{"user":"a","password":"hunter2","nested":[{"Password":"x"}]}"#)
            .with_field("response_body", "not json, password=kept");
        assert_eq!(call.analytics(mask_passwords), Flow::Continue);
        let body: serde_json::Value =
            serde_json::from_str(call.field("request_body").unwrap_or("")).unwrap_or_default();
        assert_eq!(body, serde_json::json!({"user": "a", "password": "****", "nested": [{"Password": "****"}]}));
        assert_eq!(call.field("response_body"), Some("not json, password=kept"));
    }

    fn tag(rec: &mut Record<'_>) -> Flow {
        let t = TagRecord::new(
            r#"{"tags": ["s-{status}"], "meta": {"team": "a"}, "mask": ["key_alias"], "drop": ["client_ip"]}"#,
        )
        .unwrap_or_default();
        t.on_analytics(rec)
    }

    #[test]
    fn tag_record_tags_sets_meta_masks_and_drops() {
        let mut call = TestCall::new("GET", "/").with_field("status", "200").with_field("key_alias", "default/alice");
        call = call.with_field("client_ip", "127.0.0.1");
        assert_eq!(call.analytics(tag), Flow::Continue);
        assert_eq!(call.tags, ["s-200"]);
        assert_eq!(call.meta.get("team").map(String::as_str), Some("a"));
        assert_eq!(call.field("key_alias"), Some("****"));
        assert_eq!(call.field("client_ip"), None);
    }

    #[test]
    fn step_traces_and_sets_response_headers() {
        let mut call = TestCall::new("GET", "/");
        call.request_headers.push(("x-trace".into(), "a".into()));
        assert_eq!(call.request(step), Flow::Continue);
        assert_eq!(call.request_header("x-trace"), Some("a,b"));
        assert_eq!(call.response_header("x-a"), Some("1"));
    }
}
