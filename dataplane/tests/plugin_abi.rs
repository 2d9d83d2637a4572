//! Plugin ABI 1.1 in the real gateway, over real HTTP with real `.so` files: hooks found
//! through the plugin's own `find_hook`, `create_for`, request rewrites, multi-value
//! headers, error statuses, `quiesce`, the Go-runtime flag, a plugin built against 1.0,
//! and host calls refused when a plugin misuses its `gh_call`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;

fn pre(plugin: &str, symbol: &str) -> String {
    format!("  middleware:\n    pre: [{{plugin: {plugin}, symbol: {symbol}}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_are_found_through_find_hook_and_created_for_their_own_table() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c11", &p.c("abi11"), ""),
            api("named", "/named/", &up.url(), &pre("c11", "Named")),
            api("values", "/values/", &up.url(), &pre("c11", "Values")),
            // Exported nowhere but the plugin's declaration: only find_hook can know it.
            api("unknown", "/unknown/", &up.url(), &pre("c11", "Nope")),
            // The declaration itself is never a hook.
            api("decl", "/decl/", &up.url(), &pre("c11", "gatehouse_plugin")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    // One create_for serves every hook and tells them apart by their table.
    assert_eq!(gw.get("/named/x").await.json()["headers"]["x-hook"], "Named");

    let r = gw.get("/unknown/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    let state = gw.config().await;
    let s = api_state(&state, "default/unknown");
    assert!(s.contains("symbol \"Nope\" not found: the plugin's find_hook does not know it"), "{s}");
    assert_eq!(gw.get("/decl/x").await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
    assert_eq!(state["plugins"][0]["sdk"], "abi11_plugin.c abi11", "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_abi_1_0_keeps_working() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("old", &p.c("abi10"), ""),
            api(
                "one",
                "/one/",
                &up.url(),
                "  middleware:\n    pre: [{plugin: old, symbol: AddHeader10, config: configured}]\n",
            ),
            api("two", "/two/", &up.url(), &pre("old", "AddHeader10")),
            api("missing", "/missing/", &up.url(), &pre("old", "NotThere")),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    // Its gh_hook is the 1.0 size and it was found in the dynamic symbol table.
    assert_eq!(gw.get("/one/x").await.json()["headers"]["x-abi10"], "configured");
    assert_eq!(gw.get("/two/x").await.json()["headers"]["x-abi10"], "yes");
    let s = api_state(&gw.config().await, "default/missing");
    assert!(s.contains("symbol \"NotThere\" not found in the library"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rewrites_reach_the_upstream_and_invalid_ones_are_refused() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c11", &p.c("abi11"), ""),
            api("rw", "/rw/", &up.url(), &pre("c11", "Rewrite")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // Valid: the upstream sees the new method, the normalised path (the listen path is
    // still stripped when the new path is under it) and the new query.
    let j = gw
        .get_with(
            "/rw/old?x=1",
            &[("x-set-method", "PATCH"), ("x-set-path", "/rw/a/./b/%2e%2e/c"), ("x-set-query", "q=%20v&r=/s?t")],
        )
        .await
        .json();
    assert_eq!(j["headers"]["x-rewrite"], "1 1 1");
    assert_eq!((j["method"].as_str(), j["path"].as_str()), (Some("PATCH"), Some("/a/c")), "{j}");
    assert_eq!(j["query"], "q=%20v&r=/s?t");
    // A path outside the listen path goes as set (routing is not re-run); an empty query
    // removes it.
    let j = gw.get_with("/rw/old?x=1", &[("x-set-path", "/elsewhere"), ("x-set-query", "")]).await.json();
    assert_eq!((j["path"].as_str(), j["query"].as_str()), (Some("/elsewhere"), None), "{j}");

    // Invalid: refused with -1, the request goes on unchanged, and the reason is logged.
    for (header, value, reason) in [
        ("x-set-method", "BAD METHOD", "not an HTTP token"),
        ("x-set-path", "relative/path", "must start with '/'"),
        ("x-set-path", "/a/../../etc", "climb above the root"),
        ("x-set-path", "/a/..%2f..%2fetc", ""),
        ("x-set-path", "/a#frag", "URI path characters"),
        ("x-set-query", "a=<b>", "URI query characters"),
    ] {
        let j = gw.get_with("/rw/old?x=1", &[(header, value)]).await.json();
        let refused = match header {
            "x-set-method" => "-1 0 0",
            "x-set-path" => "0 -1 0",
            _ => "0 0 -1",
        };
        assert_eq!(j["headers"]["x-rewrite"], refused, "{value}");
        assert_eq!(
            (j["method"].as_str(), j["path"].as_str(), j["query"].as_str()),
            (Some("GET"), Some("/old"), Some("x=1"))
        );
        if !reason.is_empty() {
            gw.wait_for_log(reason, |l| l.contains("refused") && l.contains(reason)).await;
        }
    }
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_of_a_header_is_read_and_replaced_in_one_call() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[plugin("c11", &p.c("abi11"), ""), api("v", "/v/", &up.url(), &pre("c11", "Values"))].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let j = gw.get_with("/v/x", &[("x-multi", "1"), ("x-multi", "2"), ("x-multi", "3")]).await.json();
    assert_eq!(j["headers"]["x-joined"], "1|2|3");
    assert_eq!(j["headers"]["x-after"], "2 a b");
    // A replacement with one invalid value changes nothing.
    assert_eq!(j["headers"]["x-bad-replace"], "-1");
    assert_eq!(j["headers"]["x-multi"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misused_gh_call_is_refused_logged_and_the_gateway_keeps_serving() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c11", &p.c("abi11"), ""),
            api("loop", "/loop/", &up.url(), &pre("c11", "MutateInLoop")),
            api("keep", "/keep/", &up.url(), &pre("c11", "KeepCall")),
            api("stale", "/stale/", &up.url(), &pre("c11", "UseKept")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // Changing headers from inside headers_each: refused (set, add, remove); reading is fine.
    let j = gw.get("/loop/x").await.json();
    assert_eq!(j["headers"]["x-loop"], "-1 -1 -1 1");
    assert!(j["headers"]["x-injected"].is_null() && !j["headers"]["host"].is_null(), "{j}");
    gw.wait_for_log("the iteration refusal", |l| {
        l.contains("inside a headers_each callback") && l.contains("MutateInLoop")
    })
    .await;

    // From another thread while the hook runs: refused.
    let j = gw.get("/keep/x").await.json();
    assert_eq!(j["headers"]["x-thread"], "-1");
    assert!(j["headers"]["x-from-thread"].is_null());
    // After the hook returned, from a later request (whatever thread it lands on): refused.
    for _ in 0..20 {
        let j = gw.get("/stale/x").await.json();
        assert_eq!(j["headers"]["x-stale"], "-1", "{j}");
        assert!(j["headers"]["x-stale-write"].is_null());
    }
    gw.wait_for_log("the stale-call refusal", |l| l.contains("is not the hook call running on this thread")).await;
    // Logged once per hook, not per call.
    let stale = gw.logs().lines().filter(|l| l.contains("refused a host call") && l.contains("UseKept")).count();
    assert_eq!(stale, 1, "{}", gw.logs());
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
    assert_eq!(gw.get("/loop/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_failing_with_a_status_is_answered_with_it() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c11", &p.c("abi11"), ""),
            plugin("faulty", &p.rust("faulty"), ""),
            api("c", "/c/", &up.url(), &pre("c11", "Forbid")),
            api("rust", "/rust/", &up.url(), &format!("  name: Tenants\n{}", pre("faulty", "Forbidden"))),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    for path in ["/c/x", "/rust/x"] {
        let r = gw.get(path).await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::FORBIDDEN, "refused by plugin"), "{path}");
        assert_eq!(r.header("content-type"), "application/json");
    }
    // The reason goes to the log, not to the client.
    gw.wait_for_log_containing("tenant not allowed").await;
    gw.wait_for_log_containing("tenant of Tenants not allowed").await;
    assert_eq!(up.hits(), 0);
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_no_configuration_uses_any_more_is_quiesced_once() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let with = [
        plugin("q", &p.c("abi11_quiesce"), ""),
        api("q1", "/q1/", &up.url(), &pre("q", "Named")),
        api("q2", "/q2/", &up.url(), &pre("q", "Values")),
    ]
    .concat();
    cfg.write("q.yaml", &with);
    cfg.write("other.yaml", &api("other", "/other/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let quiesced =
        |gw: &Gatehouse| gw.logs().lines().filter(|l| l.contains("abi11 plugin quiesce-me quiesced")).count();
    assert_eq!(gw.get("/q1/x").await.json()["headers"]["x-hook"], "Named");
    let v = gw.config().await["version"].as_u64().unwrap();

    // One of its two users goes: still used, not quiesced.
    cfg.write(
        "q.yaml",
        &[plugin("q", &p.c("abi11_quiesce"), ""), api("q1", "/q1/", &up.url(), &pre("q", "Named"))].concat(),
    );
    gw.wait_version(v + 1).await;
    assert_eq!(gw.get("/q2/x").await.status, StatusCode::NOT_FOUND);
    assert_eq!(quiesced(&gw), 0, "still used by q1");

    // The last one goes: quiesced, once, and the gateway keeps serving.
    cfg.write("q.yaml", "");
    gw.wait_until("the library to be quiesced", async || quiesced(&gw) == 1).await;
    cfg.write("other.yaml", &[api("other", "/other/", &up.url(), ""), api("more", "/more/", &up.url(), "")].concat());
    gw.wait_version(v + 3).await;
    assert_eq!(gw.get("/more/x").await.status, StatusCode::OK);
    assert_eq!(quiesced(&gw), 1, "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_library_carrying_a_go_runtime_is_refused() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("go-a", &p.c("go_a"), ""),
            plugin("go-b", &p.c("go_b"), ""),
            api("a", "/a/", &up.url(), &pre("go-a", "Named")),
            api("b", "/b/", &up.url(), &pre("go-b", "Named")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let state = gw.config().await;
    let plugins = state["plugins"].as_array().unwrap();
    let loaded: Vec<_> = plugins.iter().filter(|p| p["state"] == "loaded").collect();
    let refused: Vec<_> = plugins.iter().filter(|p| p["state"] != "loaded").collect();
    assert_eq!((loaded.len(), refused.len()), (1, 1), "{state}");
    let reason = refused[0]["state"].as_str().unwrap();
    assert!(
        reason.contains("carries a Go runtime, but")
            && reason.contains("bundle your Go plugins into one library with gatehouse-go build"),
        "{reason}"
    );
    let (ok, bad) = if loaded[0]["id"] == "default/go-a" { ("/a/x", "/b/x") } else { ("/b/x", "/a/x") };
    assert_eq!(gw.get(ok).await.json()["headers"]["x-hook"], "Named");
    assert_eq!(gw.get(bad).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_hook_creates_a_session_with_alias_and_metadata_in_one_call() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let mw = "  auth: {type: plugin}\n  middleware:\n    authCheck:\n      plugin: auth\n      symbol: MyPluginAuthCheck\n      config: {tokens: {t1: user-1}}\n    post: [{plugin: hits, symbol: MyProcessRequest}]\n";
    cfg.write(
        "all.yaml",
        &[
            plugin("auth", &p.rust("custom-auth"), ""),
            plugin("hits", &p.rust("hit-counter"), ""),
            api("s", "/s/", &up.url(), mw),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let j = gw.get_with("/s/x", &[("authorization", "Bearer t1")]).await.json();
    assert_eq!(j["session"]["id"], "token-user user-1", "{j}");
    assert_eq!(j["session"]["meta_data"]["user"], "user-1", "{j}");
}
