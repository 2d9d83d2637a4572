//! Response headers from request hooks, and per-endpoint hooks.
//!
//! `LookupUser` is an endpoint hook answering for `/users/{id}` itself (Tyk's virtual
//! endpoint); `Step` is one configurable hook for trying the chain out, phase by phase.
//!
//! ```yaml
//! middleware:
//!   pre: [{plugin: plugin-api, symbol: Step, config: {setResponseHeader: {x-served-by: gatehouse}}}]
//!   endpoints:
//!   - path: /users/{id}
//!     methods: [GET]
//!     plugins: [{plugin: plugin-api, symbol: LookupUser}]
//! ```
use std::collections::BTreeMap;

use gatehouse_plugin::{Flow, Hook, Request, Response, declare_plugin, hook};
use serde::Deserialize;

declare_plugin!(hooks: [LookupUser, Step]);
hook!(request LookupUser = lookup_user);
hook!(Step: Step);

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
    fn step_traces_and_sets_response_headers() {
        let mut call = TestCall::new("GET", "/");
        call.request_headers.push(("x-trace".into(), "a".into()));
        assert_eq!(call.request(step), Flow::Continue);
        assert_eq!(call.request_header("x-trace"), Some("a,b"));
        assert_eq!(call.response_header("x-a"), Some("1"));
    }
}
