//! Go plugins: Tyk's examples with only their imports changed, built by `gatehouse-go
//! build` into one library, loaded by the real gateway and exercised over HTTP.
//!
//! Needs Go. Where `go` is missing these tests say so and pass, unless
//! `GATEHOUSE_REQUIRE_GO` is set (scripts/test.sh sets it: there Go must be present).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// The Go libraries the tests load, built once per test binary.
struct GoLibs {
    go: PathBuf,
    tool: PathBuf,
    path: String,
    /// Every example and test plugin in one bundle.
    bundle: String,
    /// The same bundle built with `-tags v2`: another library, AddVersion says v2.
    bundle_v2: String,
    /// A different Go library (a second Go runtime).
    other: String,
    /// A library whose Go init panics.
    bad_init: String,
}

const BUNDLE: &[&str] = &[
    "./hit-counter",
    "./api-name",
    "./session-meta",
    "./foo-bar-header",
    "./response-rewrite",
    "./custom-auth",
    "./rewrite",
    "./faulty",
    "./noop",
    "./version",
    "./mask-analytics",
];

fn go() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("go")).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = on_path.into_iter().chain([PathBuf::from("/usr/local/go/bin/go")]).find(|g| g.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("GATEHOUSE_REQUIRE_GO").is_none(),
            "go is not installed, and GATEHOUSE_REQUIRE_GO is set: the Go plugin tests must run here"
        );
        eprintln!("SKIPPED: go is not installed, so the Go plugin tests do not run (install Go >= 1.21 to run them)");
    }
    found
}

fn go_libs() -> Option<&'static GoLibs> {
    static BUILT: std::sync::OnceLock<Option<GoLibs>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let go = go()?;
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
            let out = root.join("target/go-plugin-tests");
            std::fs::create_dir_all(&out).unwrap();
            let path = format!("{}:{}", go.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
            let run = |cmd: &mut Command, what: &str| {
                let status = cmd.env("PATH", &path).status().unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(status.success(), "{what} failed");
            };
            let tool = out.join("gatehouse-go");
            run(
                Command::new(&go)
                    .current_dir(root.join("plugins/go"))
                    .args(["build", "-o"])
                    .arg(&tool)
                    .arg("./cmd/gatehouse-go"),
                "building gatehouse-go",
            );
            let examples = root.join("plugins/examples/go");
            let build = |name: &str, tags: &str, dirs: &[&str]| {
                let lib = out.join(name);
                let mut cmd = Command::new(&tool);
                cmd.current_dir(&examples).args(["build", "-o"]).arg(&lib);
                if !tags.is_empty() {
                    cmd.args(["-tags", tags]);
                }
                run(cmd.args(dirs), &format!("gatehouse-go build -o {name}"));
                lib.display().to_string()
            };
            Some(GoLibs {
                go: go.clone(),
                tool: tool.clone(),
                path: path.clone(),
                bundle: build("bundle.so", "", BUNDLE),
                bundle_v2: build("bundle_v2.so", "v2", BUNDLE),
                other: build("other.so", "", &["./noop"]),
                bad_init: build("bad_init.so", "", &["./bad-init"]),
            })
        })
        .as_ref()
}

impl GoLibs {
    /// Builds `dirs` with the Go release `toolchain` (GOTOOLCHAIN) instead of the installed one.
    fn build_with_toolchain(&self, toolchain: &str, name: &str, dirs: &[&str]) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let lib = root.join("target/go-plugin-tests").join(name);
        let status = Command::new(&self.tool)
            .current_dir(root.join("plugins/examples/go"))
            .env("PATH", &self.path)
            .env("GOTOOLCHAIN", toolchain)
            .args(["build", "-o"])
            .arg(&lib)
            .args(dirs)
            .status()
            .unwrap();
        assert!(status.success(), "gatehouse-go build with {toolchain} failed");
        // `go version FILE` reads the toolchain from the file's own build info.
        let out = Command::new(&self.go).arg("version").arg(&lib).env("GOTOOLCHAIN", "local").output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.trim_end().ends_with(toolchain), "{name} was not built by {toolchain}: {said}");
        lib.display().to_string()
    }
}

fn mw(phase: &str, plugin: &str, symbol: &str) -> String {
    format!("  middleware:\n    {phase}: [{{plugin: {plugin}, symbol: {symbol}}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tyk_go_examples_work_over_http() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    cfg.write(
        "all.yaml",
        &[
            plugin("go", &go.bundle, ""),
            api("hits", "/hits/", &u, &format!("{auth}{}", mw("post", "go", "MyProcessRequest"))),
            api("named", "/named/", &u, &format!("  name: HTTPBin\n{}", mw("pre", "go", "api-name.MyPluginFunction"))),
            api("meta", "/meta/", &u, &format!("{auth}{}", mw("postKeyAuth", "go", "session-meta.MyPluginFunction"))),
            api("foo", "/foo/", &u, &mw("pre", "go", "AddFooBarHeader")),
            api("plain", "/plain/", &u, ""),
            api("rewrite", "/rewrite/", &u, &mw("response", "go", "MyPluginResponse")),
            key(
                "alice",
                "alice-key",
                "accessRights: [hits, meta]\nmetaData: {tyk_developer_id: \"42\", tyk_developer_email: a@example.com}",
            ),
        ]
        .concat(),
    );
    let out = cfg.path().join("analytics.jsonl");
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    let state = gw.config().await;
    assert_eq!(state["plugins"][0]["state"], "loaded", "{state}");
    let key = [("authorization", "alice-key")];

    // Hit counter: answers itself, with the session, the endpoint and a count kept in the
    // map its init made.
    let first = gw.get_with("/hits/a", &key).await.json();
    let second = gw.get_with("/hits/a", &key).await.json();
    assert_eq!((first["endpoint"].as_str(), first["hit_counter"].as_u64()), (Some("GET /hits/a"), Some(1)), "{first}");
    assert_eq!(second["hit_counter"], 2);
    assert_eq!(second["session"]["alias"], "default/alice");
    assert_eq!(second["session"]["meta_data"]["tyk_developer_id"], "42");
    assert_eq!(second["session"]["access_rights"]["meta"]["api_name"], "meta");
    assert_eq!(gw.get_with("/hits/b", &key).await.json()["hit_counter"], 1, "counted per endpoint");
    assert_eq!(up.hits(), 0, "the hit counter answered; the upstream was never called");

    // The API definition and the session's metadata, printed with fmt.Println as on Tyk.
    assert_eq!(gw.get("/named/x").await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/meta/x", &key).await.status, StatusCode::OK);
    // A header the upstream sees, and a line in the gateway's log.
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar");
    // A path the hook did not touch reaches the upstream as it came, even with characters
    // Go's URL type would escape.
    let raw = "/foo/a{b}|c%7Bd";
    let plain = gw.get(&raw.replacen("/foo/", "/plain/", 1)).await.json()["path"].clone();
    assert_eq!(plain, "/a{b}|c%7Bd", "the gateway passes these as they are");
    assert_eq!(gw.get(raw).await.json()["path"], plain);
    // The response hook: a header added and the body replaced.
    let r = gw.get("/rewrite/x").await;
    assert_eq!(r.header("x-response-added"), "resp-added");
    assert_eq!(r.text(), r#"{"message":"Hi! I'm a response plugin"}"#);
    assert_eq!(r.header("content-length"), r.body.len().to_string());

    gw.wait_until("the examples' printed lines", async || {
        let out = gw.stdout();
        out.contains("API name is HTTPBin")
            && out.contains("Developer ID: 42")
            && out.contains("Developer Email: a@example.com")
    })
    .await;
    // logrus's Info formats as fmt.Sprint: no space between two strings.
    gw.wait_until("the hit counter's log line", async || gw.logs().contains("Custom middleware, new hit:GET /hits/a"))
        .await;
    // A request the hit counter answered is still in analytics, marked as answered by it.
    gw.wait_until("analytics for the hit counter", async || {
        std::fs::read_to_string(&out).unwrap_or_default().lines().any(|l| {
            l.contains(r#""path":"/hits/a""#)
                && l.contains(r#""plugin_answered":true"#)
                && l.contains(r#""status":200"#)
        })
    })
    .await;
    let line = gw.wait_for_log_containing("Processing HTTP request in Golang plugin!!").await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["fields"]["symbol"], "AddFooBarHeader");
    assert_eq!(line["fields"]["phase"], "pre");
    assert_eq!(line["fields"]["api"], "default/foo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_analytics_hook_masks_the_record_and_not_the_response() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let out = cfg.path().join("analytics.jsonl");
    let hooks = "  middleware:\n    analytics: [{plugin: go, symbol: MaskAnalyticsData, detailedRecording: true}]\n";
    cfg.write("all.yaml", &[plugin("go", &go.bundle, ""), api("a", "/a/", &up.url(), hooks)].concat());
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    let body = r#"{"user":"alice","password":"hunter2"}"#;
    let req =
        Request::post(gw.url("/a/echo")).body(Full::new(bytes::Bytes::from_static(body.as_bytes())).boxed()).unwrap();
    assert_eq!(gw.send(req).await.text(), body, "the client gets the real body");
    let mut rec = serde_json::Value::Null;
    gw.wait_until("the masked record", async || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        rec = text.lines().filter_map(|l| serde_json::from_str(l).ok()).next().unwrap_or_default();
        !rec.is_null()
    })
    .await;
    assert_eq!(rec["response_body"], r#"{"user":"alice","password":"****"}"#, "{rec}");
    assert_eq!(rec["request_body"], body, "the hook changed only the response body");
    assert!(rec["tags"].as_array().unwrap().iter().any(|t| t == "masked-by-go"), "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_built_with_the_oldest_supported_go_serves() {
    let Some(go) = go_libs() else { return };
    // Go fetches the toolchain named by GOTOOLCHAIN through the module proxy, once.
    let lib = go.build_with_toolchain("go1.21.13", "oldest.so", &["./foo-bar-header", "./hit-counter"]);
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("go", &lib, ""),
            api("foo", "/foo/", &up.url(), &mw("pre", "go", "AddFooBarHeader")),
            api("hits", "/hits/", &up.url(), &mw("pre", "go", "MyProcessRequest")),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar");
    assert_eq!(gw.get("/hits/x").await.json()["hit_counter"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_auth_hook_s_session_is_enforced_and_request_rewrites_reach_the_upstream() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: plugin}\n  middleware:\n    authCheck: {plugin: go, symbol: MyAuthCheck}\n    post: [{plugin: go, symbol: MyProcessRequest}]\n";
    cfg.write(
        "all.yaml",
        &[
            plugin("go", &go.bundle, ""),
            api("s", "/s/", &up.url(), auth),
            api("rw", "/rw/", &up.url(), &mw("pre", "go", "Rewrite")),
            api("up", "/up/", &up.url(), &mw("pre", "go", "Upcase")),
            api("acc", "/acc/", &up.url(), &mw("response", "go", "Accepted")),
            api("plain", "/plain/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // The hook's own refusal.
    let r = gw.get_with("/s/x", &[("authorization", "nope")]).await;
    assert_eq!((r.status, r.text()), (StatusCode::UNAUTHORIZED, r#"{"error":"not authorised"}"#.to_owned()));
    // Its session: the alias and metadata it set, then its rate limit (2 per hour).
    let t1 = [("authorization", "t1")];
    let j = gw.get_with("/s/a", &t1).await.json();
    assert_eq!(
        (j["session"]["alias"].as_str(), j["session"]["meta_data"]["owner"].as_str()),
        (Some("user-1"), Some("user-1"))
    );
    assert_eq!(j["session"]["rate"], 2.0);
    assert_eq!(gw.get_with("/s/a", &t1).await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/s/a", &t1).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(gw.get_with("/s/a", &[("authorization", "t2")]).await.status, StatusCode::OK, "counted per key");

    // Method, path, query and headers rewritten on r reach the upstream; rw.Header() the client.
    let r = gw.get_with("/rw/old/x?a=1", &[("x-secret", "s3cret"), ("x-kept", "k")]).await;
    assert_eq!(r.header("x-rewritten-by"), "go");
    let j = r.json();
    assert_eq!((j["method"].as_str(), j["path"].as_str()), (Some("POST"), Some("/new/x")), "{j}");
    assert_eq!(j["query"], "a=1&rewritten=yes");
    assert!(j["headers"]["x-secret"].is_null(), "{j}");
    assert_eq!(j["headers"]["x-kept"], "k");
    assert_eq!(gw.get("/plain/x").await.status, StatusCode::OK);
    // A body replaced on r is the upstream's; a status changed on res the client's.
    let req =
        Request::post(gw.url("/up/echo")).body(Full::new(bytes::Bytes::from_static(b"hello go")).boxed()).unwrap();
    assert_eq!(gw.send(req).await.text(), "HELLO GO");
    let r = gw.get("/acc/x").await;
    assert_eq!((r.status, r.header("x-upstream-status")), (StatusCode::ACCEPTED, "200"));

    // The Go runtime takes no signal of the gateway's: SIGTERM still drains and exits 0.
    let mut gw = gw;
    let status = tokio::task::spawn_blocking(move || gw.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_panic_in_any_phase_is_a_500_and_the_next_request_is_served() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let phases = ["pre", "postKeyAuth", "post"];
    let mut docs = vec![plugin("go", &go.bundle, "")];
    for phase in phases {
        let auth = if phase == "postKeyAuth" { "  auth: {type: authToken}\n" } else { "" };
        let name = phase.to_lowercase();
        docs.push(api(&name, &format!("/{name}/"), &up.url(), &format!("{auth}{}", mw(phase, "go", "PanicOnRequest"))));
    }
    docs.push(api(
        "auth",
        "/auth/",
        &up.url(),
        "  auth: {type: plugin}\n  middleware:\n    authCheck: {plugin: go, symbol: PanicOnRequest}\n",
    ));
    docs.push(api("response", "/response/", &up.url(), &mw("response", "go", "PanicOnResponse")));
    docs.push(api("echo", "/echo/", &up.url(), &mw("pre", "go", "Echo")));
    docs.push(api("later", "/later/", &up.url(), &mw("pre", "go", "PanicLater")));
    docs.push(key("k", "k-key", "accessRights: [postkeyauth]"));
    cfg.write("all.yaml", &docs.concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let key = [("authorization", "k-key")];

    for phase in phases.iter().chain(&["response"]) {
        let phase = phase.to_lowercase();
        let r = gw.get_with(&format!("/{phase}/x?panic=1"), &key).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{phase}: {}", r.text());
        assert_eq!(gw.get_with(&format!("/{phase}/x"), &key).await.status, StatusCode::OK, "{phase} after a panic");
    }
    // authCheck: a panic is a 500; a hook that returns without a session is refused.
    assert_eq!(gw.get("/auth/x?panic=1").await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(gw.get("/auth/x").await.status, StatusCode::UNAUTHORIZED);
    let line = gw.wait_for_log_containing("Go hook PanicOnResponse panicked: boom in a response hook").await;
    assert!(line.contains("\"phase\":\"response\""), "{line}");
    let labels = format!(
        r#"{{event="NativePluginMiddleware:{0}:PanicOnResponse",kind="panic",phase="response",plugin="{0}",symbol="PanicOnResponse"}}"#,
        go.bundle
    );
    assert_eq!(gw.metric(&format!("gatehouse_plugin_failures_total{labels}")).await, 1.0);

    // A goroutine started with gatehouse.Go panics after the hook returned: recovered, logged.
    assert_eq!(gw.get("/later/x").await.status, StatusCode::OK);
    gw.wait_for_log_containing("goroutine started with gatehouse.Go panicked: boom in a goroutine").await;
    assert_eq!(gw.get("/later/x").await.status, StatusCode::OK, "still serving");

    // The body a hook reads is the client's.
    let req = Request::post(gw.url("/echo/x")).body(Full::new(bytes::Bytes::from_static(b"hello go")).boxed()).unwrap();
    assert_eq!(gw.send(req).await.text(), "echo: hello go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_go_library_is_refused_and_the_first_keeps_serving() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "a.yaml",
        &[plugin("go", &go.bundle, ""), api("foo", "/foo/", &up.url(), &mw("pre", "go", "AddFooBarHeader"))].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar");

    cfg.write(
        "b.yaml",
        &[plugin("other", &go.other, ""), api("other", "/other/", &up.url(), &mw("pre", "other", "Noop"))].concat(),
    );
    let mut state = serde_json::Value::Null;
    gw.wait_until("the second Go library to be refused", async || {
        state = gw.config().await;
        state["plugins"].as_array().unwrap().iter().any(|p| p["id"] == "default/other" && p["state"] != "pending")
            && state["plugins"].as_array().unwrap().len() == 2
    })
    .await;
    let other = state["plugins"].as_array().unwrap().iter().find(|p| p["id"] == "default/other").unwrap();
    let reason = other["state"].as_str().unwrap();
    assert!(reason.contains("bundle your Go plugins into one library with gatehouse-go build"), "{reason}");
    assert!(api_state(&state, "default/other") != "ok", "{state}");
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar", "the first bundle keeps serving");

    // A library whose Go init panics is refused with the panic's message; it does not
    // take the process down (its runtime is the second, so start a gateway of its own).
    let cfg2 = ConfigDir::new();
    cfg2.write(
        "all.yaml",
        &[
            plugin("bad", &go.bad_init, ""),
            api("bad", "/bad/", &up.url(), &mw("pre", "bad", "Never")),
            api("fine", "/fine/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw2 = Gatehouse::start(cfg2.path(), &[]).await;
    let state = gw2.config().await;
    let reason = state["plugins"][0]["state"].as_str().unwrap();
    assert!(reason.contains("init of Go package ./bad-init panicked: cannot reach the license server"), "{reason}");
    assert_eq!(gw2.get("/fine/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_go_bundle_reloads_under_the_dev_flag_without_a_failed_request() {
    let Some(go) = go_libs() else { return };
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("bundle.so");
    std::fs::copy(&go.bundle, &lib).unwrap();
    cfg.write(
        "all.yaml",
        &[plugin("go", &lib.display().to_string(), ""), api("v", "/v/", &up.url(), &mw("pre", "go", "AddVersion"))]
            .concat(),
    );
    let gw = Arc::new(Gatehouse::start(cfg.path(), &["--dev-go-runtimes", "2"]).await);
    let version = async |gw: &Gatehouse| {
        let r = gw.get("/v/x").await;
        (
            r.status,
            if r.status == StatusCode::OK {
                r.json()["headers"]["x-go-version"].as_str().unwrap_or("").to_owned()
            } else {
                r.text()
            },
        )
    };
    assert_eq!(version(&gw).await, (StatusCode::OK, "v1".to_owned()));

    let stop = Arc::new(AtomicBool::new(false));
    let (failed, v2_seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (gw, stop, failed, v2_seen) = (gw.clone(), stop.clone(), failed.clone(), v2_seen.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match version(&gw).await {
                    (StatusCode::OK, v) if v == "v2" => v2_seen.fetch_add(1, Ordering::Relaxed),
                    (StatusCode::OK, v) if v == "v1" => 0,
                    other => panic!("a request failed during the reload: {other:?}"),
                };
            }
            failed.load(Ordering::Relaxed)
        }));
    }
    // Replaced as a deploy does: written beside it, renamed over it. Same file name.
    let tmp = dir.path().join("bundle.so.tmp");
    std::fs::copy(&go.bundle_v2, &tmp).unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    gw.wait_until("the rebuilt bundle to serve", async || v2_seen.load(Ordering::Relaxed) > 10).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        assert_eq!(l.await.unwrap(), 0);
    }

    // A third Go runtime is past the flag: refused, and v2 keeps serving.
    std::fs::copy(&go.other, &tmp).unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    gw.wait_until("the third runtime to be refused", async || {
        gw.config().await["plugins"][0]["state"]
            .as_str()
            .is_some_and(|s| s.contains("the most --dev-go-runtimes allows"))
    })
    .await;
    assert_eq!(version(&gw).await, (StatusCode::OK, "v2".to_owned()));
}

/// The bundle packaged as docs/go-plugins.md says (plugins/examples/go/Dockerfile, built with
/// buildah into an OCI layout, no registry): its one layer holds exactly the library, at
/// /plugins.so, which an image volume mounts at <plugins.mountPath>/<name>/plugins.so.
#[test]
fn the_bundle_packages_as_an_oci_image_with_the_library_at_its_root() {
    let Some(go) = go_libs() else { return };
    if Command::new("buildah").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("GATEHOUSE_REQUIRE_BUILDAH").is_none(),
            "buildah is not installed, and GATEHOUSE_REQUIRE_BUILDAH is set"
        );
        eprintln!("SKIPPED: buildah is not installed (apt-get install buildah), so the image is not built");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::copy(root.join("plugins/examples/go/Dockerfile"), ctx.join("Dockerfile")).unwrap();
    std::fs::copy(&go.bundle, ctx.join("plugins.so")).unwrap();
    let buildah = |args: &[&str]| {
        let out = Command::new("buildah")
            .args(["--storage-driver", "vfs", "--root"])
            .arg(tmp.path().join("root"))
            .arg("--runroot")
            .arg(tmp.path().join("run"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ctx_arg = ctx.display().to_string();
    buildah(&["build", "--isolation", "chroot", "-t", "localhost/go-plugins:test", &ctx_arg]);
    let layout = tmp.path().join("oci");
    buildah(&["push", "localhost/go-plugins:test", &format!("oci:{}", layout.display())]);

    let json = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = json(index["manifests"][0]["digest"].as_str().unwrap());
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "FROM scratch + one COPY is one layer: {manifest}");
    let layer =
        layout.join("blobs/sha256").join(layers[0]["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap());
    // GNU tar reads the layer whether or not it is compressed.
    let list = Command::new("tar").arg("-tf").arg(&layer).output().unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout).lines().map(str::to_owned).collect();
    assert_eq!(names, ["plugins.so"], "the layer holds the library alone, at the image's root");
    let content = Command::new("tar").arg("-xOf").arg(&layer).arg("plugins.so").output().unwrap();
    assert!(content.stdout == std::fs::read(&go.bundle).unwrap(), "the layer's plugins.so is the bundle");
}
