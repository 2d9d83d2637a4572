//! What one API's change costs the dataplane at 100, 1,000 and 10,000 APIs: applying the
//! delta to the snapshot and building the next runtime from the previous one, as the
//! subscriber does for each change it receives. And what a route lookup costs among
//! 10,000 APIs.
//!
//! ```text
//! cargo bench -p gatehouse-dataplane --bench rebuild
//! ```
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, hint::black_box};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gatehouse_crds::{
    manifest,
    protocol::Delta,
    snapshot::{ApiEntry, Snapshot},
};
use gatehouse_dataplane::{
    connect::Connector,
    key_id::KeyIdSecret,
    metrics::Metrics,
    runtime::{Changed, Runtime},
};
use gatehouse_plugin_host::Loader;

fn entry(i: usize, upstream: &str) -> ApiEntry {
    let yaml = format!(
        "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: api-{i}, namespace: bench}}\nspec:\n  listenPath: /api-{i}/\n  upstream: {{url: 'http://127.0.0.1:9/{upstream}'}}\n"
    );
    let Some((_, manifest::Resource::Api(a))) = manifest::parse("bench", &yaml).resources.into_iter().next() else {
        panic!("bad bench API")
    };
    ApiEntry::compile(&a, None).unwrap()
}

fn rebuild(c: &mut Criterion) {
    let (metrics, loader) = (Metrics::new(), Loader::new(std::env::temp_dir().join("gatehouse-bench-unused")));
    let (key_ids, connector) = (KeyIdSecret::new(b"benchmark key id secret"), Connector::default());
    let mut group = c.benchmark_group("one API changed");
    for n in [100, 1_000, 10_000] {
        let mut snapshot = Snapshot { version: 1, ..Default::default() };
        for i in 0..n {
            let e = entry(i, "v0");
            snapshot.apis.insert(e.id(), e);
        }
        let mut prev = Runtime::build(&snapshot, &metrics, &loader, &key_ids, &connector, None, &Changed::All);
        let mut k = 0usize;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                k += 1;
                let changed = entry((k * 7919) % n, &format!("v{k}"));
                let id = changed.id();
                let delta = Delta {
                    base: snapshot.version,
                    version: snapshot.version + 1,
                    apis: [(id.clone(), Some(changed))].into(),
                    ..Default::default()
                };
                let what = Changed::Apis { since: snapshot.version, ids: BTreeSet::from([id]) };
                snapshot.apply(&delta).unwrap();
                prev = Runtime::build(&snapshot, &metrics, &loader, &key_ids, &connector, Some(&prev), &what);
                black_box(&prev);
            });
        });
    }
    group.finish();
}

/// The request path's side: one route lookup among 10,000 APIs (the 5,000th's path).
fn route(c: &mut Criterion) {
    let (metrics, loader) = (Metrics::new(), Loader::new(std::env::temp_dir().join("gatehouse-bench-unused")));
    let (key_ids, connector) = (KeyIdSecret::new(b"benchmark key id secret"), Connector::default());
    let mut snapshot = Snapshot { version: 1, ..Default::default() };
    for i in 0..10_000 {
        let e = entry(i, "v0");
        snapshot.apis.insert(e.id(), e);
    }
    let rt = Runtime::build(&snapshot, &metrics, &loader, &key_ids, &connector, None, &Changed::All);
    c.bench_function("route among 10000 APIs", |b| {
        b.iter(|| black_box(rt.router.route(black_box(Some("api.example.com")), black_box("/api-5000/items/1"))));
    });
}

criterion_group!(benches, rebuild, route);
criterion_main!(benches);
