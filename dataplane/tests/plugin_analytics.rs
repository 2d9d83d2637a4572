//! Analytics plugins (`middleware.analytics`) over real HTTP with real plugin `.so` files:
//! hooks tag, mask and drop fields of the records the file sink then holds, see the key's
//! metadata and, with `detailedRecording`, the bodies; a failing hook never loses a record,
//! a slow one never slows requests, and the wrong host calls for a phase are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

/// A `TagRecord` entry of the `plugin-api` example with `config` (a YAML flow mapping).
fn tag(config: &str) -> String {
    format!("{{plugin: api, symbol: TagRecord, config: {config}}}")
}

fn analytics(entries: &[String]) -> String {
    format!("  middleware:\n    analytics: [{}]\n", entries.join(", "))
}

struct Setup {
    /// Holds the config directory (and the analytics file) for the test's length.
    _cfg: ConfigDir,
    out: PathBuf,
    gw: Gatehouse,
}

async fn start(up: &Upstream, docs: &[String]) -> Setup {
    let p = plugins();
    let cfg = ConfigDir::new();
    let mut text = plugin("api", &p.rust("plugin-api"), "");
    text += &plugin("faulty", &p.rust("faulty"), "");
    text += &plugin("fixture", &p.c("analytics_fixture"), "");
    text += &api("plain", "/plain/", &up.url(), "");
    text += &docs.concat();
    cfg.write("all.yaml", &text);
    let out = cfg.path().join("analytics.jsonl");
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    Setup { _cfg: cfg, out, gw }
}

/// Every record written so far.
fn records(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits for the record of the request to `path` (the first one, or the `nth`).
async fn record_of(gw: &Gatehouse, out: &Path, path: &str) -> Value {
    let mut found = None;
    gw.wait_until(&format!("the analytics record of {path}"), async || {
        found = records(out).into_iter().find(|r| r["path"] == path);
        found.is_some()
    })
    .await;
    found.unwrap()
}

fn tags(r: &Value) -> Vec<&str> {
    r["tags"].as_array().unwrap_or_else(|| panic!("no tags in {r}")).iter().map(|t| t.as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_hooks_tag_mask_drop_and_see_the_key_metadata_in_order() {
    let up = Upstream::start("up").await;
    let hooks = analytics(&[
        tag("{tags: ['first-{status}'], meta: {team: a}, mask: [key_alias], drop: [client_ip]}"),
        // Runs second: sees what the first did (the masked alias), adds after it.
        tag("{tags: [second], set: {error: 'set by a hook', status: '299'}}"),
    ]);
    let s = start(
        &up,
        &[
            api("keyed", "/keyed/", &up.url(), &format!("  auth: {{type: authToken}}\n{hooks}")),
            key("alice", "alice-key", "accessRights: [keyed]\nmetaData: {tyk_developer_id: '42'}"),
        ],
    )
    .await;
    let r = s.gw.get_with("/keyed/x", &[("authorization", "alice-key")]).await;
    assert_eq!(r.status, StatusCode::OK, "hooks change the record, never the answer");
    let rec = record_of(&s.gw, &s.out, "/keyed/x").await;
    assert_eq!(tags(&rec), ["first-200", "second"], "both hooks ran, in order: {rec}");
    assert_eq!(rec["meta_data"], serde_json::json!({"tyk_developer_id": "42", "team": "a"}), "{rec}");
    assert_eq!(rec["key_alias"], "****");
    assert!(rec.get("client_ip").is_none(), "dropped: {rec}");
    assert_eq!((rec["status"].as_u64(), rec["error"].as_str()), (Some(299), Some("set by a hook")));
    assert_eq!(rec["api_id"], "default/keyed");
    assert!(rec.get("request_body").is_none(), "no bodies without detailedRecording: {rec}");

    // Without a session the metadata is empty; without hooks, the record is the gateway's.
    assert_eq!(s.gw.get("/plain/y").await.status, StatusCode::OK);
    let plain = record_of(&s.gw, &s.out, "/plain/y").await;
    assert_eq!((plain["tags"].clone(), plain["meta_data"].clone()), (serde_json::json!([]), serde_json::json!({})));
    assert_eq!(plain["client_ip"], "127.0.0.1");
    // A refused request is recorded and hooked too.
    assert_eq!(s.gw.get("/keyed/z").await.status, StatusCode::UNAUTHORIZED);
    let refused = record_of(&s.gw, &s.out, "/keyed/z").await;
    assert_eq!(tags(&refused), ["first-401", "second"]);
    assert_eq!(refused["meta_data"], serde_json::json!({"team": "a"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_recorded_only_with_detailed_recording_masked_and_cut_when_big() {
    let up = Upstream::start("up").await;
    let detailed = analytics(&["{plugin: api, symbol: MaskPasswords, detailedRecording: true}".to_owned()]);
    let s = start(
        &up,
        &[
            api("detailed", "/detailed/", &up.url(), &detailed),
            api("tagged", "/tagged/", &up.url(), &analytics(&[tag("{tags: [t]}")])),
        ],
    )
    .await;
    let login = r#"{"user":"alice","password":"hunter2"}"#;
    let post = |path: &str, body: Vec<u8>| {
        Request::builder().method(Method::POST).uri(s.gw.url(path)).body(Full::new(Bytes::from(body)).boxed()).unwrap()
    };
    // `/echo` streams the request body back: both bodies carry the password.
    let r = s.gw.send(post("/detailed/echo", login.as_bytes().to_vec())).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, login.to_owned()), "the client gets the body unmasked");
    let rec = record_of(&s.gw, &s.out, "/detailed/echo").await;
    let masked = serde_json::json!({"user": "alice", "password": "****"});
    for field in ["request_body", "response_body"] {
        let body: Value =
            serde_json::from_str(rec[field].as_str().unwrap_or_else(|| panic!("no {field}: {rec}"))).unwrap();
        assert_eq!(body, masked, "{field}");
        assert_eq!(rec[format!("{field}_capture")], "whole", "{rec}");
    }
    assert!(!rec.to_string().contains("hunter2"));

    // Big bodies are cut at 64 KiB, and the record says so; the client gets everything.
    let big = 200 * 1024;
    let r = s.gw.send(post("/detailed/upload", vec![b'u'; big])).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, big.to_string()));
    let rec = record_of(&s.gw, &s.out, "/detailed/upload").await;
    assert_eq!(
        (rec["request_body"].as_str().unwrap().len(), rec["request_body_capture"].as_str()),
        (64 * 1024, Some("cut"))
    );
    assert_eq!(
        (rec["response_body"].as_str(), rec["response_body_capture"].as_str()),
        (Some(big.to_string().as_str()), Some("whole"))
    );
    let r = s.gw.get(&format!("/detailed/big?bytes={big}")).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, big));
    let rec = record_of(&s.gw, &s.out, "/detailed/big").await;
    assert_eq!(
        (rec["response_body"].as_str().unwrap().len(), rec["response_body_capture"].as_str()),
        (64 * 1024, Some("cut"))
    );
    assert_eq!((rec["request_body"].as_str(), rec["request_body_capture"].as_str()), (Some(""), Some("whole")));

    // Not asked: no body in the record, even with hooks.
    assert_eq!(s.gw.send(post("/tagged/echo", login.as_bytes().to_vec())).await.status, StatusCode::OK);
    let rec = record_of(&s.gw, &s.out, "/tagged/echo").await;
    assert_eq!(tags(&rec), ["t"]);
    assert!(rec.get("request_body").is_none() && rec.get("response_body").is_none(), "{rec}");
    assert!(!rec.to_string().contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_panicking_analytics_hook_leaves_the_record_as_it_was_and_the_gateway_serving() {
    let up = Upstream::start("up").await;
    let hooks = analytics(&[
        tag("{tags: [before]}"),
        "{plugin: faulty, symbol: PanicInAnalytics}".to_owned(),
        "{plugin: faulty, symbol: FailInAnalytics}".to_owned(),
        tag("{tags: [after]}"),
    ]);
    let s = start(&up, &[api("faulty", "/faulty/", &up.url(), &hooks)]).await;
    for i in 0..3 {
        let r = s.gw.get(&format!("/faulty/{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "analytics hooks never fail a request");
        let rec = record_of(&s.gw, &s.out, &format!("/faulty/{i}")).await;
        assert_eq!(tags(&rec), ["before", "after"], "what the failing hooks did is undone: {rec}");
        assert_eq!(
            (rec["path"].as_str(), rec["method"].as_str()),
            (Some(format!("/faulty/{i}").as_str()), Some("GET"))
        );
    }
    assert_eq!(s.gw.get("/plain/x").await.status, StatusCode::OK, "other APIs keep serving");
    let path = plugins().rust("faulty");
    for (symbol, kind) in [("PanicInAnalytics", "panic"), ("FailInAnalytics", "error")] {
        let metric = format!(
            r#"gatehouse_plugin_failures_total{{event="NativePluginMiddleware:{path}:{symbol}",kind="{kind}",phase="analytics",plugin="{path}",symbol="{symbol}"}}"#
        );
        assert_eq!(s.gw.metric(&metric).await, 3.0, "{symbol}");
    }
    // Logged once per hook, with the reason.
    s.gw.wait_for_log_containing("this analytics hook panics on purpose").await;
    s.gw.wait_for_log_containing("this analytics hook fails on purpose").await;
    let logs = s.gw.logs();
    assert_eq!(logs.matches("analytics hook failed").count(), 2, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_analytics_hook_holds_up_analytics_never_requests() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    let hooks = analytics(&[tag(&format!("{{tags: [slow], waitForFile: '{}'}}", open.display()))]);
    let s = start(&up, &[api("slow", "/slow-api/", &up.url(), &hooks)]).await;
    // The hook blocks on the first record; requests go on being answered meanwhile.
    for i in 0..20 {
        assert_eq!(s.gw.get(&format!("/slow-api/{i}")).await.status, StatusCode::OK);
        assert_eq!(s.gw.get(&format!("/plain/{i}")).await.status, StatusCode::OK);
    }
    assert!(records(&s.out).is_empty(), "the writer is held up by the hook");
    std::fs::write(&open, b"").unwrap();
    let lines = wait_for_lines(&s.out, 40).await;
    assert_eq!(lines.len(), 40);
    let rec = record_of(&s.gw, &s.out, "/slow-api/19").await;
    assert_eq!(tags(&rec), ["slow"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_analytics_entries_are_not_bound() {
    let up = Upstream::start("up").await;
    let hooks = analytics(&[
        "{plugin: absent, symbol: Nope, disabled: true}".to_owned(),
        tag("{tags: ['on']}"),
        "{plugin: api, symbol: TagRecord, config: {tags: ['off']}, disabled: true, detailedRecording: true}".to_owned(),
    ]);
    let s = start(&up, &[api("some-off", "/some-off/", &up.url(), &hooks)]).await;
    assert_eq!(s.gw.get("/some-off/x").await.status, StatusCode::OK);
    let rec = record_of(&s.gw, &s.out, "/some-off/x").await;
    assert_eq!(tags(&rec), ["on"]);
    assert!(rec.get("request_body").is_none(), "a disabled entry asks for no bodies: {rec}");
    let state = s.gw.config().await;
    let entry = state["apis"].as_array().unwrap().iter().find(|a| a["id"] == "default/some-off").unwrap();
    assert_eq!(entry["state"], "serving");
    assert_eq!(
        entry["disabled"],
        serde_json::json!([
            "spec.middleware.analytics[0] (Plugin absent, symbol \"Nope\")",
            "spec.middleware.analytics[2] (Plugin api, symbol \"TagRecord\")",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_without_an_analytics_handler_is_a_load_error_naming_symbol_and_phase() {
    let up = Upstream::start("up").await;
    let s = start(
        &up,
        &[
            api(
                "request-only",
                "/request-only/",
                &up.url(),
                &analytics(&["{plugin: api, symbol: LookupUser}".to_owned()]),
            ),
            // A table from before `on_analytics` existed, whatever lies past its size.
            api("short", "/short/", &up.url(), &analytics(&["{plugin: fixture, symbol: Short}".to_owned()])),
        ],
    )
    .await;
    let state = s.gw.config().await;
    for (api, symbol) in [("request-only", "LookupUser"), ("short", "Short")] {
        let st = api_state(&state, &format!("default/{api}"));
        assert!(
            st.contains("spec.middleware.analytics[0]: Plugin default/")
                && st.contains(&format!("symbol {symbol:?} has no handler for the analytics phase")),
            "{st}"
        );
        let r = s.gw.get(&format!("/{api}/x")).await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    }
    assert_eq!(s.gw.get("/plain/x").await.status, StatusCode::OK, "other APIs keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_calls_of_the_wrong_phase_are_refused_without_harm() {
    let up = Upstream::start("up").await;
    let s = start(
        &up,
        &[
            api(
                "from-request",
                "/from-request/",
                &up.url(),
                "  middleware:\n    pre: [{plugin: fixture, symbol: RecordFromRequest}]\n",
            ),
            api(
                "from-analytics",
                "/from-analytics/",
                &up.url(),
                &analytics(&["{plugin: fixture, symbol: RequestFromAnalytics, detailedRecording: true}".to_owned()]),
            ),
        ],
    )
    .await;
    // Record calls from a request hook: each -1, the request goes on.
    for _ in 0..3 {
        let r = s.gw.get("/from-request/x").await;
        assert_eq!((r.status, r.header("x-record-calls")), (StatusCode::OK, "-1,-1,-1,-1,-1"));
    }
    let rec = record_of(&s.gw, &s.out, "/from-request/x").await;
    assert_eq!((rec["method"].as_str(), tags(&rec)), (Some("GET"), vec![]), "the record is untouched");
    // Request calls from an analytics hook: an empty view, -1, -1, -1; api_* calls work.
    assert_eq!(s.gw.get("/from-analytics/x").await.status, StatusCode::OK);
    let rec = record_of(&s.gw, &s.out, "/from-analytics/x").await;
    assert_eq!(tags(&rec), ["method_len=0,header_get=-1,body_get=-1,session_id=-1"]);
    assert_eq!(rec["meta_data"]["api"], "from-analytics");
    // Logged once per hook. Each hook's line is waited for: the log reaches the test through
    // a pipe, so the analytics hook's may not be readable yet when its record is.
    for phase in ["pre", "analytics"] {
        s.gw.wait_for_log(&format!("the {phase} hook's refusal"), |l| {
            l.contains("it does not apply to this phase") && l.contains(&format!("\"phase\":\"{phase}\""))
        })
        .await;
    }
    let logs = s.gw.logs();
    assert_eq!(logs.matches("it does not apply to this phase").count(), 2, "{logs}");
    assert_eq!(s.gw.get("/plain/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_analytics_off_no_record_is_built_and_no_analytics_hook_runs() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let hooks = analytics(&[
        "{plugin: faulty, symbol: PanicInAnalytics, detailedRecording: true}".to_owned(),
        tag("{tags: [t]}"),
    ]);
    cfg.write(
        "all.yaml",
        &[
            plugin("api", &p.rust("plugin-api"), ""),
            plugin("faulty", &p.rust("faulty"), ""),
            api("sink-off", "/off/", &up.url(), &hooks),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let big = 100 * 1024;
    for _ in 0..3 {
        let r = gw.get(&format!("/off/big?bytes={big}")).await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, big), "{}", gw.config().await);
    }
    assert_eq!(api_state(&gw.config().await, "default/sink-off"), "serving");
    let path = p.rust("faulty");
    let calls = format!(
        r#"gatehouse_plugin_duration_seconds_count{{event="NativePluginMiddleware:{path}:PanicInAnalytics",phase="analytics",plugin="{path}",symbol="PanicInAnalytics"}}"#
    );
    assert!(gw.admin("/metrics").await.text().contains(&calls), "the hook is bound and its series exists");
    assert_eq!(gw.metric(&calls).await, 0.0, "never called: no record was built");
}
