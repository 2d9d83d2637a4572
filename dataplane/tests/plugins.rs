//! Native plugins in the real gateway: real `.so` files (Rust examples built with the SDK,
//! C ones built against the header), loaded with libloading, exercised over real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

fn mw(phase: &str, plugin: &str, symbol: &str) -> String {
    format!("  middleware:\n    {phase}: [{{plugin: {plugin}, symbol: {symbol}}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tyk_examples_work_over_http() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    let out = cfg.path().join("analytics.jsonl");
    cfg.write(
        "plugins.yaml",
        &[
            plugin("hit-counter", &p.rust("hit-counter"), ""),
            plugin("api-name", &p.rust("api-name"), ""),
            plugin("session-meta", &p.rust("session-meta"), ""),
            plugin("foo-bar", &p.rust("foo-bar-header"), ""),
            plugin("rewrite", &p.rust("response-rewrite"), ""),
        ]
        .concat(),
    );
    cfg.write(
        "apis.yaml",
        &[
            api("hits", "/hits/", &u, &format!("{auth}{}", mw("post", "hit-counter", "MyProcessRequest"))),
            api("named", "/named/", &u, &format!("  name: HTTPBin\n{}", mw("pre", "api-name", "MyPluginFunction"))),
            api("meta", "/meta/", &u, &format!("{auth}{}", mw("postKeyAuth", "session-meta", "MyPluginFunction"))),
            api("foo", "/foo/", &u, &mw("pre", "foo-bar", "AddFooBarHeader")),
            api("rewrite", "/rewrite/", &u, &mw("response", "rewrite", "MyPluginResponse")),
            key(
                "alice",
                "alice-key",
                "accessRights: [hits, meta]\nmetaData: {tyk_developer_id: \"42\", tyk_developer_email: a@example.com}",
            ),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    let key = [("authorization", "alice-key")];

    // Hit counter: answers itself, with the session, the endpoint and a count kept across calls.
    let first = gw.get_with("/hits/a", &key).await.json();
    let second = gw.get_with("/hits/a", &key).await.json();
    assert_eq!((first["endpoint"].as_str(), first["hit_counter"].as_u64()), (Some("GET /hits/a"), Some(1)));
    assert_eq!(second["hit_counter"], 2);
    assert_eq!(second["session"]["id"], "default/alice");
    assert_eq!(second["session"]["meta_data"]["tyk_developer_id"], "42");
    assert_eq!(gw.get_with("/hits/b", &key).await.json()["hit_counter"], 1, "counted per endpoint");
    assert_eq!(up.hits(), 0, "the hit counter answered; the upstream was never called");

    // API definition: the hook reads the API's name.
    assert_eq!(gw.get("/named/x").await.json()["headers"]["x-api-name"], "HTTPBin");
    // Session metadata.
    let j = gw.get_with("/meta/x", &key).await.json();
    assert_eq!(
        (j["headers"]["x-developer-id"].as_str(), j["headers"]["x-developer-email"].as_str()),
        (Some("42"), Some("a@example.com"))
    );
    // A header and a log line through the gateway's logger.
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar");
    // The response hook: a header added and the body replaced.
    let r = gw.get("/rewrite/x").await;
    assert_eq!(r.header("x-response-added"), "resp-added");
    assert_eq!(r.text(), r#"{"message":"Hi! I'm a response plugin"}"#);
    assert_eq!(r.header("content-length"), r.body.len().to_string());

    gw.wait_until("plugin log lines", async || {
        let logs = gw.logs();
        logs.contains("Processing HTTP request in Rust plugin!!")
            && logs.contains("API name is HTTPBin")
            && logs.contains("Developer ID: 42")
            && logs.contains("Custom middleware, new hit: GET /hits/a")
    })
    .await;
    let line = gw.wait_for_log_containing("Processing HTTP request").await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["fields"]["symbol"], "AddFooBarHeader");
    assert_eq!(line["fields"]["phase"], "pre");
    assert_eq!(line["fields"]["api"], "default/foo");

    // Analytics still record requests a plugin answered, and say so.
    gw.wait_until("analytics for the hit counter", async || {
        std::fs::read_to_string(&out).unwrap_or_default().lines().any(|l| l.contains("\"plugin_answered\":true"))
    })
    .await;

    // Every hook call is timed, per plugin file, symbol and phase, with Tyk's event name.
    let event = format!("NativePluginMiddleware:{}:AddFooBarHeader", p.rust("foo-bar-header"));
    // Prometheus writes labels in name order.
    let labels =
        format!(r#"{{event="{event}",phase="pre",plugin="{}",symbol="AddFooBarHeader"}}"#, p.rust("foo-bar-header"));
    assert_eq!(gw.metric(&format!("gatehouse_plugin_calls_total{labels}")).await, 1.0);
    assert_eq!(gw.metric(&format!("gatehouse_plugin_duration_seconds_count{labels}")).await, 1.0);
    let cfg_state = gw.config().await;
    assert!(cfg_state["plugins"].as_array().unwrap().iter().all(|p| p["state"] == "loaded"), "{cfg_state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_plugin_and_per_entry_config_work() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c", &p.c("c_add_header"), ""),
            api("one", "/one/", &up.url(), "  middleware:\n    pre: [{plugin: c, symbol: AddHeader, config: first}]\n"),
            api("two", "/two/", &up.url(), "  middleware:\n    pre: [{plugin: c, symbol: AddHeader}]\n"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.get("/one/x").await.json()["headers"]["x-c-plugin"], "first");
    assert_eq!(gw.get("/two/x").await.json()["headers"]["x-c-plugin"], "hello from C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_auth_hook_creates_the_session_the_chain_enforces() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: plugin}\n  middleware:\n    authCheck:\n      plugin: auth\n      symbol: MyPluginAuthCheck\n      config: {tokens: {t1: user-1}, rate: 2, perSeconds: 3600}\n    post: [{plugin: meta, symbol: MyPluginFunction}]\n";
    cfg.write(
        "all.yaml",
        &[
            plugin("auth", &p.rust("custom-auth"), ""),
            plugin("meta", &p.rust("session-meta"), ""),
            api("private", "/private/", &up.url(), auth),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let r = gw.get("/private/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::FORBIDDEN, "forbidden"), "the hook's own answer");
    let r = gw.get_with("/private/x", &[("authorization", "Bearer wrong")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let ok = [("authorization", "Bearer t1")];
    assert_eq!(gw.get_with("/private/x", &ok).await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/private/x", &ok).await.status, StatusCode::OK);
    let r = gw.get_with("/private/x", &ok).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded"),
        "the session's rate is enforced"
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_that_ask_for_bodies_read_and_replace_them() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let hooks = "  middleware:\n    pre: [{plugin: body, symbol: UppercaseBody}]\n    response: [{plugin: body, symbol: WrapBody}]\n";
    cfg.write("all.yaml", &[plugin("body", &p.rust("body-transform"), ""), api("b", "/b/", &up.url(), hooks)].concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let req = Request::post(gw.url("/b/gate-in")).body(Full::new(Bytes::from_static(b"hello body")).boxed()).unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.text(), "wrapped(HELLO BODY)");
    assert_eq!(r.header("content-length"), r.body.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_load_failure_affects_only_its_apis_and_is_reported() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let not_so = cfg.path().join("notes.txt");
    std::fs::write(&not_so, "this is not a shared object").unwrap();
    let cases: &[(&str, String, &str, &str, &str)] = &[
        // (name, path, plugin spec extra, symbol, expected reason)
        ("missing-file", "/nonexistent/libgone.so".to_owned(), "", "Ok", "cannot read the file"),
        ("not-so", not_so.display().to_string(), "", "Ok", "not a loadable shared object"),
        ("no-decl", p.c("bad_no_decl"), "", "Ok", "exports no `gatehouse_plugin` declaration"),
        ("missing-symbol", p.c("bad_ok"), "", "Nope", "symbol \"Nope\" not found"),
        ("abi", p.c("bad_abi"), "", "Ok", "built for plugin ABI 2.x"),
        ("unwind", p.c("bad_unwind"), "", "Ok", "without panic unwinding"),
        ("init", p.c("bad_init"), "", "Ok", "init failed: cannot reach the license server"),
        (
            "pinned",
            p.c("bad_ok"),
            "  sha256: \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "Ok",
            "but spec.sha256 pins",
        ),
        ("config", p.rust("faulty"), "", "NeedsConfig", "the hook refused its config: config must be"),
        ("wrong-phase", p.rust("response-rewrite"), "", "MyPluginResponse", "has no handler for the pre phase"),
    ];
    let mut text = api("healthy", "/healthy/", &up.url(), "");
    for (name, path, extra, symbol, _) in cases {
        text += &plugin(name, path, extra);
        text += &api(name, &format!("/{name}/"), &up.url(), &mw("pre", name, symbol));
    }
    text += &plugin("ignored", "/nonexistent/libignored.so", "  failurePolicy: Ignore\n");
    text += &api("ignoring", "/ignoring/", &up.url(), &mw("pre", "ignored", "Anything"));
    text += &api("no-plugin", "/no-plugin/", &up.url(), &mw("pre", "never-declared", "Anything"));
    cfg.write("all.yaml", &text);
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let state = gw.config().await;
    for (name, path, _, symbol, reason) in cases {
        let r = gw.get(&format!("/{name}/x")).await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"), "{name}");
        let s = api_state(&state, &format!("default/{name}"));
        assert!(s.starts_with("answering 500"), "{name}: {s}");
        assert!(s.contains(reason), "{name}: expected {reason:?} in {s:?}");
        assert!(s.contains(&format!("symbol {symbol:?}")), "{name}: names the symbol: {s}");
        assert!(s.contains(&format!("Plugin default/{name}")), "{name}: names the plugin: {s}");
        if !path.starts_with("/nonexistent") {
            assert!(std::path::Path::new(path).exists(), "{name}: the fixture exists");
        }
    }
    let s = api_state(&state, "default/no-plugin");
    assert!(s.contains("no Plugin named never-declared"), "{s}");
    // Ignore: served without the hook, and the reason is shown.
    assert_eq!(gw.get("/ignoring/x").await.status, StatusCode::OK);
    assert!(api_state(&state, "default/ignoring").starts_with("serving; skipping"), "{state}");
    // The others keep working.
    assert_eq!(gw.get("/healthy/x").await.status, StatusCode::OK);
    // Failures are logged.
    gw.wait_for_log_containing("cannot reach the license server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_hook_gets_500_is_counted_and_the_gateway_keeps_serving() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("faulty", &p.rust("faulty"), ""),
            api("panics", "/panics/", &up.url(), &mw("pre", "faulty", "Panic")),
            api("fails", "/fails/", &up.url(), &mw("pre", "faulty", "Fail")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    for _ in 0..3 {
        let r = gw.get("/panics/boom").await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    }
    assert_eq!(gw.get("/panics/ok").await.status, StatusCode::OK, "the same hook works on the next request");
    let r = gw.get("/fails/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
    let path = p.rust("faulty");
    let panics = format!(
        r#"gatehouse_plugin_failures_total{{event="NativePluginMiddleware:{path}:Panic",kind="panic",phase="pre",plugin="{path}",symbol="Panic"}}"#
    );
    assert_eq!(gw.metric(&panics).await, 3.0);
    let errors = format!(
        r#"gatehouse_plugin_failures_total{{event="NativePluginMiddleware:{path}:Fail",kind="error",phase="pre",plugin="{path}",symbol="Fail"}}"#
    );
    assert_eq!(gw.metric(&errors).await, 1.0);
    // The panic message is logged.
    gw.wait_for_log_containing("this hook panics on purpose").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_swapped_under_load_is_hot_reloaded_without_a_failed_request() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib = lib_dir.path().join("libc_add_header.so");
    std::fs::copy(p.c("c_add_header_v1"), &lib).unwrap();
    cfg.write(
        "all.yaml",
        &[plugin("c", &lib.display().to_string(), ""), api("a", "/a/", &up.url(), &mw("pre", "c", "AddHeader"))]
            .concat(),
    );
    let gw = Arc::new(Gatehouse::start(cfg.path(), &[]).await);
    assert_eq!(gw.get("/a/x").await.json()["headers"]["x-c-plugin-version"], "v1");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (failed, v2_seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (gw, stop, failed, v2_seen) = (gw.clone(), stop.clone(), failed.clone(), v2_seen.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let j = gw.get("/a/x").await;
                match (j.status, j.json()["headers"]["x-c-plugin-version"].as_str()) {
                    (StatusCode::OK, Some("v2")) => {
                        v2_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    (StatusCode::OK, Some("v1")) => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Replace the file the way a deploy does: write beside it, rename over it.
    let tmp = lib_dir.path().join(".new.so");
    std::fs::copy(p.c("c_add_header_v2"), &tmp).unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    gw.wait_until("the new plugin version to be served", async || v2_seen.load(Ordering::Relaxed) > 10).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across the swap");
    assert_eq!(gw.get("/a/x").await.json()["headers"]["x-c-plugin-version"], "v2");
    let state = gw.config().await;
    let sha = state["plugins"][0]["sha256"].as_str().unwrap().to_owned();
    let v2 = std::fs::read(p.c("c_add_header_v2")).unwrap();
    assert_eq!(sha, hex_sha256(&v2), "serving the new content");
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
