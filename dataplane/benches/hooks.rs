//! What a plugin hook call costs through the real host: a no-op hook, and a hook that
//! reads ten request headers and sets one, both from the `noop` example plugin; Tyk's
//! AddFooBarHeader in Rust; and, where Go is installed, a no-op Go hook and the Go
//! AddFooBarHeader, built with gatehouse-go. Each loaded from its `.so` as the gateway does.
//!
//! ```text
//! cargo bench -p gatehouse-dataplane --bench hooks
//! ```
#![allow(clippy::unwrap_used)]

use std::{hint::black_box, path::Path, process::Command, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_crds::{manifest, snapshot::Snapshot};
use gatehouse_dataplane::{
    metrics::Metrics,
    model::Session,
    runtime::{Changed, Runtime},
};
use gatehouse_plugin_host::{Exchange, Loader, RequestState, ResponseState, run_phase};

fn build_rust() -> (String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = root.join("target/plugin-bench");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--quiet", "--release", "-p", "noop", "-p", "foo-bar-header", "--target-dir"])
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    let lib = |name: &str| target.join(format!("release/lib{name}.so")).display().to_string();
    (lib("noop"), lib("foo_bar_header"))
}

/// The Go bundle of Noop and AddFooBarHeader, or None where Go is not installed.
fn build_go() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let go = ["go", "/usr/local/go/bin/go"].into_iter().find(|g| Command::new(g).arg("version").output().is_ok())?;
    let out = root.join("target/plugin-bench");
    let tool = out.join("gatehouse-go");
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    let path = format!("/usr/local/go/bin:{}", std::env::var("PATH").unwrap_or_default());
    assert!(ok(Command::new(go)
        .current_dir(root.join("plugins/go"))
        .args(["build", "-o"])
        .arg(&tool)
        .arg("./cmd/gatehouse-go")));
    let lib = out.join("go-bench.so");
    assert!(ok(Command::new(&tool)
        .env("PATH", path)
        .current_dir(root.join("plugins/examples/go"))
        .args(["build", "-o"])
        .arg(&lib)
        .args(["./noop", "./foo-bar-header"])));
    Some(lib.display().to_string())
}

fn runtime(noop: &str, foo_bar: &str, go: Option<&str>) -> Runtime {
    let api = |name: &str, plugin: &str, pre: &str, post: &str| {
        format!(
            "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  \
             listenPath: /{name}/\n  upstream: {{url: 'http://127.0.0.1:1'}}\n  middleware:\n    \
             pre: [{{plugin: {plugin}, symbol: {pre}}}]\n    post: [{{plugin: {plugin}, symbol: {post}}}]\n"
        )
    };
    let plugin = |name: &str, path: &str| {
        format!(
            "---\napiVersion: gatehouse.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: {name}}}\nspec: {{path: {path}}}\n"
        )
    };
    let mut yaml = plugin("noop", noop) + &plugin("foo-bar", foo_bar) + &api("a", "noop", "Noop", "ReadTenSetOne");
    yaml += &api("r", "foo-bar", "AddFooBarHeader", "AddFooBarHeader");
    if let Some(go) = go {
        yaml += &(plugin("go", go) + &api("g", "go", "Noop", "AddFooBarHeader"));
    }
    let parsed = manifest::parse("bench", &yaml);
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    let (snap, errors) = Snapshot::compile(1, parsed.resources.into_iter().map(|(_, r)| r));
    assert!(errors.is_empty());
    let dir = std::env::temp_dir().join("gatehouse-bench-plugins");
    let key_ids = gatehouse_dataplane::key_id::KeyIdSecret::new(b"benchmark key id secret");
    Runtime::build(&snap, &Metrics::new(), &Loader::new(dir), &key_ids, &Default::default(), None, &Changed::All)
}

fn hooks(c: &mut Criterion) {
    let (noop, foo_bar) = build_rust();
    let go = build_go();
    let rt = runtime(&noop, &foo_bar, go.as_deref());
    let route = |path: &str| {
        let api = rt.router.route(None, path).unwrap().clone();
        assert!(api.plugins.unavailable.is_none(), "{:?}", api.plugins.unavailable);
        api
    };
    let (api, rust) = (route("/a/x"), route("/r/x"));
    let go_api = go.map(|_| route("/g/x"));
    let mut req = http::Request::get("/a/x");
    for i in 0..10 {
        req = req.header(format!("h{i}"), "value");
    }
    let (parts, ()) = req.body(()).unwrap().into_parts();
    let mut state = RequestState { parts, body: None, body_set: false };
    let mut resp = ResponseState::default();
    let mut session: Option<Arc<Session>> = None;
    let peer = "127.0.0.1:1".parse().unwrap();

    let mut group = c.benchmark_group("hook call");
    group.bench_function("no-op", |b| {
        b.iter(|| {
            let mut x = Exchange { req: &mut state, resp: &mut resp, session: &mut session, api: &*api, peer };
            black_box(run_phase(&api.plugins.pre, &mut x)).ok();
        })
    });
    group.bench_function("read 10 headers, set 1", |b| {
        b.iter(|| {
            let mut x = Exchange { req: &mut state, resp: &mut resp, session: &mut session, api: &*api, peer };
            black_box(run_phase(&api.plugins.post, &mut x)).ok();
        })
    });
    group.bench_function("Rust AddFooBarHeader", |b| {
        b.iter(|| {
            let mut x = Exchange { req: &mut state, resp: &mut resp, session: &mut session, api: &*rust, peer };
            black_box(run_phase(&rust.plugins.pre, &mut x)).ok();
            // Tyk's example adds: without this the header would grow each iteration.
            state.parts.headers.remove("foo");
        })
    });
    match &go_api {
        Some(g) => {
            group.bench_function("Go no-op", |b| {
                b.iter(|| {
                    let mut x = Exchange { req: &mut state, resp: &mut resp, session: &mut session, api: &**g, peer };
                    black_box(run_phase(&g.plugins.pre, &mut x)).ok();
                })
            });
            group.bench_function("Go AddFooBarHeader", |b| {
                b.iter(|| {
                    let mut x = Exchange { req: &mut state, resp: &mut resp, session: &mut session, api: &**g, peer };
                    black_box(run_phase(&g.plugins.post, &mut x)).ok();
                    state.parts.headers.remove("foo");
                })
            });
        }
        None => eprintln!("go is not installed: the Go hooks are not measured"),
    }
    group.finish();
}

criterion_group!(benches, hooks);
criterion_main!(benches);
