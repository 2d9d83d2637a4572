//! What a plugin hook call costs through the real host: a no-op hook, and a hook that
//! reads ten request headers and sets one. Both from the `noop` example plugin, loaded
//! from its `.so` as the gateway does.
//!
//! ```text
//! cargo bench -p gatehouse-dataplane --bench hooks
//! ```
#![allow(clippy::unwrap_used)]

use std::{hint::black_box, path::Path, process::Command, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_crds::{manifest, snapshot::Snapshot};
use gatehouse_dataplane::{metrics::Metrics, model::Session, runtime::Runtime};
use gatehouse_plugin_host::{Exchange, Loader, RequestState, ResponseState, run_phase};

fn build_noop() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = root.join("target/plugin-bench");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--quiet", "--release", "-p", "noop", "--target-dir"])
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    target.join("release/libnoop.so").display().to_string()
}

fn runtime(path: &str) -> Runtime {
    let yaml = format!(
        "apiVersion: gatehouse.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: noop}}\nspec: {{path: {path}}}\n---\n\
         apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: a}}\nspec:\n  listenPath: /a/\n  \
         upstream: {{url: 'http://127.0.0.1:1'}}\n  middleware:\n    pre: [{{plugin: noop, symbol: Noop}}]\n    \
         post: [{{plugin: noop, symbol: ReadTenSetOne}}]\n"
    );
    let parsed = manifest::parse("bench", &yaml);
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    let (snap, errors) = Snapshot::compile(1, parsed.resources.into_iter().map(|(_, r)| r));
    assert!(errors.is_empty());
    let dir = std::env::temp_dir().join("gatehouse-bench-plugins");
    let key_ids = gatehouse_dataplane::key_id::KeyIdSecret::new(b"benchmark key id secret");
    Runtime::build(&snap, &Metrics::new(), &Loader::new(dir), &key_ids, &Default::default(), None)
}

fn hooks(c: &mut Criterion) {
    let rt = runtime(&build_noop());
    let api = rt.router.route(None, "/a/x").unwrap().clone();
    assert!(api.plugins.unavailable.is_none(), "{:?}", api.plugins.unavailable);
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
    group.finish();
    let _ = Arc::strong_count(&api);
}

criterion_group!(benches, hooks);
criterion_main!(benches);
