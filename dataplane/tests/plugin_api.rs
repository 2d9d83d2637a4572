//! Tyk's plugin API on the request path, over real HTTP with real plugin `.so` files:
//! response headers set by request hooks, `disabled` entries, and per-endpoint plugins.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::{Method, Request, StatusCode};

/// A `Step` entry of the `plugin-api` example with `config` (a YAML flow mapping).
fn step(config: &str) -> String {
    format!("{{plugin: api, symbol: Step, config: {config}}}")
}

fn values(r: &Reply, name: &str) -> Vec<String> {
    r.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}

async fn call(gw: &Gatehouse, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    gw.send(b.body(empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_set_by_request_hooks_reach_every_answer() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    let pre = step("{setResponseHeader: {x-pre: pre}}");
    cfg.write(
        "all.yaml",
        &[
            plugin("api", &p.rust("plugin-api"), ""),
            plugin("faulty", &p.rust("faulty"), ""),
            // Keyless: pre and post set headers, the response hook sees them applied; a
            // hook setting a framing header does not change the body's framing.
            api(
                "up",
                "/up/",
                &u,
                &format!(
                    "  middleware:\n    pre: [{pre}]\n    post: [{}]\n    response: [{}]\n",
                    step("{addResponseHeader: {x-post: post, content-length: '1'}}"),
                    step("{seeResponseHeader: x-pre}"),
                ),
            ),
            api(
                "keyed",
                "/keyed/",
                &u,
                &format!(
                    "  auth: {{type: authToken}}\n  middleware:\n    pre: [{pre}]\n    postKeyAuth: [{}]\n    post: [{}]\n",
                    step("{setResponseHeader: {x-pka: pka}}"),
                    step("{addResponseHeader: {x-post: post}}"),
                ),
            ),
            api("limited", "/limited/", &u, &format!("  rateLimit: {{rate: 1, per: 1h}}\n  middleware:\n    pre: [{pre}]\n")),
            // A later hook answers: the headers set before ride on its answer, added ones
            // after its own.
            api(
                "answered",
                "/answered/",
                &u,
                &format!(
                    "  middleware:\n    pre: [{}]\n    post: [{}]\n",
                    step("{setResponseHeader: {x-pre: pre}, addResponseHeader: {x-multi: one}}"),
                    step("{addResponseHeader: {x-multi: two}, answer: 201}"),
                ),
            ),
            api(
                "fails",
                "/fails/",
                &u,
                &format!("  middleware:\n    pre: [{pre}]\n    post: [{{plugin: faulty, symbol: Fail}}]\n"),
            ),
            api("plain", "/plain/", &u, ""),
            key("alice", "alice-key", "accessRights: [keyed]"),
            key("bob", "bob-key", "accessRights: [keyed]\nquotaMax: 1\nquotaRenewal: 1h"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // The upstream's answer carries what pre and post hooks set; response hooks see it.
    let r = gw.get("/up/x").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((r.header("x-pre"), r.header("x-post")), ("pre", "post"));
    assert_eq!(r.header("x-seen-by-response"), "pre", "response hooks see the headers applied");
    assert_eq!(r.json()["upstream"], "up", "the body is whole: content-length stays the upstream's");
    assert_eq!(r.header("content-length"), r.body.len().to_string());
    assert!(r.json()["headers"].get("x-pre").is_none(), "a response header is not sent upstream");

    // postKeyAuth too, onto the upstream's answer.
    let r = gw.get_with("/keyed/x", &[("authorization", "alice-key")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((r.header("x-pre"), r.header("x-pka"), r.header("x-post")), ("pre", "pka", "post"));
    // The gateway's own errors: 401 after `pre`, 429 (quota) after `postKeyAuth`.
    let r = gw.get("/keyed/x").await;
    assert_eq!((r.status, r.header("x-pre"), r.header("x-pka")), (StatusCode::UNAUTHORIZED, "pre", ""));
    assert_eq!(r.error(), "authorization field missing");
    assert_eq!(gw.get_with("/keyed/x", &[("authorization", "bob-key")]).await.status, StatusCode::OK);
    let r = gw.get_with("/keyed/x", &[("authorization", "bob-key")]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((r.header("x-pre"), r.header("x-pka"), r.header("x-post")), ("pre", "pka", ""));
    // 429 from the API rate limit, right after `pre`.
    assert_eq!(gw.get("/limited/x").await.status, StatusCode::OK);
    let r = gw.get("/limited/x").await;
    assert_eq!((r.status, r.header("x-pre")), (StatusCode::TOO_MANY_REQUESTS, "pre"));
    assert!(!r.header("retry-after").is_empty());
    assert_eq!(r.header("content-type"), "application/json");

    // A later hook answering.
    let r = gw.get("/answered/x").await;
    assert_eq!((r.status, r.header("x-pre")), (StatusCode::CREATED, "pre"));
    assert_eq!(values(&r, "x-multi"), ["one", "two"]);
    // A hook failing after `pre` set one: the 500 carries it.
    let r = gw.get("/fails/x").await;
    assert_eq!((r.status, r.header("x-pre")), (StatusCode::INTERNAL_SERVER_ERROR, "pre"));
    assert_eq!(r.error(), "plugin failure");

    // Without hooks, nothing is added.
    let r = gw.get("/plain/x").await;
    assert_eq!((r.status, r.header("x-pre")), (StatusCode::OK, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_entries_are_not_bound_in_any_phase_and_are_shown_on_config() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    // `absent` names no Plugin: bound, it would make the API answer 500.
    let absent = "{plugin: absent, symbol: Nope, disabled: true}";
    let off = format!(
        "  middleware:\n    pre: [{absent}, {}]\n    postKeyAuth: [{absent}]\n    post: [{}]\n    response: [{absent}]\n    endpoints:\n    - path: /*\n      plugins: [{}, {absent}]\n",
        step("{trace: pre}"),
        "{plugin: api, symbol: Step, config: {answer: 503}, disabled: true}",
        "{plugin: api, symbol: Step, config: {answer: 418}, disabled: true}",
    );
    cfg.write(
        "all.yaml",
        &[
            plugin("api", &p.rust("plugin-api"), ""),
            api("all-off", "/off/", &u, &off),
            api(
                "auth-off",
                "/auth-off/",
                &u,
                &format!("  auth: {{type: plugin}}\n  middleware:\n    authCheck: {absent}\n"),
            ),
            api("enabled", "/on/", &u, "  middleware:\n    pre: [{plugin: absent, symbol: Nope}]\n"),
            api(
                "endpoint-missing",
                "/endpoint-missing/",
                &u,
                "  middleware:\n    endpoints: [{path: /x, plugins: [{plugin: api, symbol: Nope}]}]\n",
            ),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/off/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}: {}", r.text(), gw.config().await);
    assert_eq!(r.json()["headers"]["x-trace"], "pre", "only the enabled hook ran");
    assert_eq!(up.hits(), 1);
    // A disabled authCheck binds no hook: no session, so every request is refused.
    let r = gw.get("/auth-off/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::UNAUTHORIZED, "key not authorised"));
    // The same missing Plugin, enabled, makes its API answer 500.
    assert_eq!(gw.get("/on/x").await.status, StatusCode::INTERNAL_SERVER_ERROR);

    let state = gw.config().await;
    let off = state["apis"].as_array().unwrap().iter().find(|a| a["id"] == "default/all-off").unwrap();
    assert_eq!(off["state"], "serving", "{off}");
    let disabled: Vec<&str> = off["disabled"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(
        disabled,
        [
            "spec.middleware.pre[0] (Plugin absent, symbol \"Nope\")",
            "spec.middleware.postKeyAuth[0] (Plugin absent, symbol \"Nope\")",
            "spec.middleware.post[0] (Plugin api, symbol \"Step\")",
            "spec.middleware.response[0] (Plugin absent, symbol \"Nope\")",
            "spec.middleware.endpoints[0].plugins[0] (Plugin api, symbol \"Step\")",
            "spec.middleware.endpoints[0].plugins[1] (Plugin absent, symbol \"Nope\")",
        ]
    );
    assert_eq!(api_state(&state, "default/auth-off"), "serving");
    let auth_off = state["apis"].as_array().unwrap().iter().find(|a| a["id"] == "default/auth-off").unwrap();
    assert_eq!(auth_off["disabled"][0], "spec.middleware.authCheck (Plugin absent, symbol \"Nope\")");
    assert!(api_state(&state, "default/enabled").contains("no Plugin named absent"));
    // An endpoint hook that cannot be bound fails its API as any other entry does.
    let r = gw.get("/endpoint-missing/y").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    let s = api_state(&state, "default/endpoint-missing");
    assert!(
        s.contains(
            "spec.middleware.endpoints[0].plugins[0]: Plugin default/api, symbol \"Nope\": symbol \"Nope\" not found"
        ),
        "{s}"
    );
    assert_eq!(gw.get("/off/x").await.status, StatusCode::OK, "the others keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_plugins_run_for_the_first_matching_path_and_method() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let endpoints = format!(
        "  middleware:\n    endpoints:\n{}",
        [
            format!("    - {{path: /users/me, plugins: [{}]}}\n", step("{trace: me, answer: 200}")),
            format!("    - {{path: '/users/{{id}}', methods: [GET, PUT], plugins: [{}]}}\n", step("{trace: user, answer: 200}")),
            "    - {path: '/users/{id}', methods: [DELETE], plugins: [{plugin: api, symbol: Step, config: {answer: 200}, disabled: true}]}\n".to_owned(),
            format!("    - {{path: /files/*, plugins: [{}]}}\n", step("{trace: files}")),
            "    - {path: '/lookup/{id}', methods: [GET], plugins: [{plugin: api, symbol: LookupUser}]}\n".to_owned(),
            format!("    - {{path: /*, methods: [POST], plugins: [{}]}}\n", step("{trace: any-post}")),
        ]
        .concat()
    );
    cfg.write("all.yaml", &[plugin("api", &p.rust("plugin-api"), ""), api("e", "/e/", &up.url(), &endpoints)].concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let answered_by = async |method: Method, path: &str| {
        let r = call(&gw, method.clone(), path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {}", r.text());
        let j = r.json();
        match j.get("upstream") {
            Some(_) => format!("upstream, trace {}", j["headers"]["x-trace"].as_str().unwrap_or("none")),
            None => format!("hook {}", j["answeredBy"].as_str().unwrap_or_default()),
        }
    };
    for (method, path, want) in [
        // First match in declared order: /users/me before /users/{id}.
        (Method::GET, "/e/users/me", "hook me"),
        (Method::GET, "/e/users/42", "hook user"),
        (Method::PUT, "/e/users/42", "hook user"),
        // No /users/{id} entry for POST: the catch-all POST entry.
        (Method::POST, "/e/users/42", "upstream, trace any-post"),
        // {id} is one whole segment.
        (Method::GET, "/e/users/42/orders", "upstream, trace none"),
        (Method::GET, "/e/users", "upstream, trace none"),
        (Method::GET, "/e/users/", "upstream, trace none"),
        // The DELETE entry matches first; its only hook is disabled, so nothing runs.
        (Method::DELETE, "/e/users/42", "upstream, trace none"),
        // A trailing /* is the rest of the path, also nothing.
        (Method::GET, "/e/files", "upstream, trace files"),
        (Method::GET, "/e/files/a/b.txt", "upstream, trace files"),
        (Method::GET, "/e/filesx", "upstream, trace none"),
        // Matched on the normalised path.
        (Method::GET, "/e//files/./a", "upstream, trace files"),
        (Method::GET, "/e", "upstream, trace none"),
        (Method::POST, "/e", "upstream, trace any-post"),
    ] {
        assert_eq!(answered_by(method.clone(), path).await, want, "{method} {path}");
    }
    // An endpoint hook answering itself, reading the id from the path.
    let before = up.hits();
    let r = gw.get("/e/lookup/7").await;
    assert_eq!(r.json(), serde_json::json!({"user": "7", "method": "GET"}));
    assert_eq!(up.hits(), before, "the upstream was not called");
    let r = call(&gw, Method::HEAD, "/e/lookup/7", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.hits(), before + 1, "HEAD is not GET: the upstream answered");
    // Endpoint hooks are counted under their own phase.
    let path = p.rust("plugin-api");
    let labels = format!(
        r#"{{event="NativePluginMiddleware:{path}:LookupUser",phase="endpoint",plugin="{path}",symbol="LookupUser"}}"#
    );
    assert_eq!(gw.metric(&format!("gatehouse_plugin_calls_total{labels}")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_plugins_run_after_the_key_checks_and_before_post() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let chain = format!(
        "  auth: {{type: authToken}}\n  middleware:\n    pre: [{}]\n    postKeyAuth: [{}]\n    post: [{}]\n    endpoints:\n    - {{path: /x, plugins: [{}]}}\n    - {{path: /answer, plugins: [{}]}}\n",
        step("{trace: pre}"),
        step("{trace: postKeyAuth}"),
        step("{trace: post}"),
        step("{trace: endpoint}"),
        step("{trace: endpoint, answer: 200}"),
    );
    cfg.write(
        "all.yaml",
        &[
            plugin("api", &p.rust("plugin-api"), ""),
            api("ord", "/ord/", &up.url(), &chain),
            key("alice", "alice-key", "accessRights: [ord]"),
            key("eve", "eve-key", "accessRights: []"),
            key("carol", "carol-key", "accessRights: [ord]\nquotaMax: 1\nquotaRenewal: 1h"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let alice = [("authorization", "alice-key")];

    let r = gw.get_with("/ord/x", &alice).await;
    assert_eq!(r.json()["headers"]["x-trace"], "pre,postKeyAuth,endpoint,post");
    let r = gw.get_with("/ord/answer", &alice).await;
    assert_eq!(r.json()["trace"], "pre,postKeyAuth,endpoint", "an answer stops the chain: no post, no upstream");
    assert_eq!(up.hits(), 1);
    // The key checks come first: a key without the access right, or over its quota, is
    // refused before the endpoint hook could answer.
    let r = gw.get_with("/ord/answer", &[("authorization", "eve-key")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let carol = [("authorization", "carol-key")];
    assert_eq!(gw.get_with("/ord/answer", &carol).await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/ord/answer", &carol).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(gw.get("/ord/answer").await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoint_specs_are_refused_naming_the_field_while_other_apis_serve() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    let hook = "[{plugin: api, symbol: LookupUser}]";
    let with = |endpoints: &str| format!("  middleware:\n    endpoints: {endpoints}\n");
    let cases = [
        (
            "no-slash",
            format!("[{{path: users, plugins: {hook}}}]"),
            "spec.middleware.endpoints[0].path: must start with '/'",
        ),
        (
            "half-param",
            format!("[{{path: /ok}}, {{path: '/users/x{{id}}', plugins: {hook}}}]"),
            "spec.middleware.endpoints[1].path: a parameter must be a whole segment",
        ),
        (
            "mid-star",
            format!("[{{path: /a/*/b, plugins: {hook}}}]"),
            "spec.middleware.endpoints[0].path: '*' is only allowed as the whole last segment",
        ),
        (
            "dot-dot",
            format!("[{{path: /a/../b, plugins: {hook}}}]"),
            "spec.middleware.endpoints[0].path: empty, '.' and '..' segments never match",
        ),
        (
            "duplicate",
            format!(
                "[{{path: '/u/{{id}}', methods: [GET], plugins: {hook}}}, {{path: '/u/{{other}}', methods: [PUT, GET]}}]"
            ),
            "spec.middleware.endpoints[1]: path \"/u/{other}\" with method GET is already declared by spec.middleware.endpoints[0]",
        ),
        (
            "bad-method",
            "[{path: /x, methods: [FETCH]}]".to_owned(),
            "spec.middleware.endpoints[0].methods[0]: unknown variant `FETCH`",
        ),
    ];
    let mut text = plugin("api", &p.rust("plugin-api"), "")
        + &api("good", "/good/", &u, &with(&format!("[{{path: '/lookup/{{id}}', plugins: {hook}}}]")));
    for (name, endpoints, _) in &cases {
        text += &api(name, &format!("/{name}/"), &u, &with(endpoints));
    }
    cfg.write("all.yaml", &text);
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let errors = gw.config().await["errors"].to_string();
    for (name, _, reason) in &cases {
        let want = format!("ApiDefinition default/{name}: {reason}");
        assert!(errors.contains(&want.replace('"', "\\\"")), "{want}\nnot in {errors}");
        assert_eq!(gw.get(&format!("/{name}/users/1")).await.status, StatusCode::NOT_FOUND, "{name} is not served");
    }
    assert_eq!(gw.get("/good/lookup/5").await.json()["user"], "5");

    // An API that served, edited into a bad one, keeps serving its last good version.
    cfg.write(
        "all.yaml",
        &text.replace(
            "[{path: '/lookup/{id}', plugins: [{plugin: api, symbol: LookupUser}]}]",
            "[{path: '/lookup/{id}', plugins: [{plugin: api, symbol: LookupUser}]}, {path: '/lookup/{n}'}]",
        ),
    );
    gw.wait_until("the duplicate to be reported", async || {
        gw.config().await["errors"].to_string().contains("ApiDefinition default/good: spec.middleware.endpoints[1]")
    })
    .await;
    assert!(gw.config().await["errors"].to_string().contains("serving its last good version"));
    assert_eq!(gw.get("/good/lookup/6").await.json()["user"], "6");
}
