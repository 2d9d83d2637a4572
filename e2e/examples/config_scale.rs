//! Config at scale: applies N ApiDefinitions to a real API server, with a controller and
//! two dataplanes (release builds) as local processes, then measures how long a one-API
//! change takes from `kubectl apply` to being served by both dataplanes, the processes'
//! memory, and the size of one delta.
//!
//! ```text
//! GATEHOUSE_E2E_RELEASE=1 cargo run --release -p gatehouse-e2e --example config_scale -- 100 1000 10000
//! ```
#![allow(clippy::unwrap_used)]

#[path = "../tests/e2e/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/e2e/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use gatehouse_crds::ApiDefinition;
use http::StatusCode;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};

/// One-API changes measured per N.
const SAMPLES: usize = 60;
const WRITERS: usize = 16;

#[tokio::main]
async fn main() {
    assert!(std::env::var_os("GATEHOUSE_E2E_RELEASE").is_some(), "run with GATEHOUSE_E2E_RELEASE=1 (release binaries)");
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let sizes = if sizes.is_empty() { vec![100, 1000, 10_000] } else { sizes };
    let mut rows = Vec::new();
    for n in sizes {
        rows.push(run(n).await);
    }
    println!(
        "\n| APIs | apply → served on 2/2, p50 | p99 | max | controller RSS | dataplane RSS | one delta | initial sync | a dataplane joining | a controller starting |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
}

/// Waits until `dp` serves `path`.
async fn serves(dp: &procs::Proc, path: &str) {
    procs::eventually_for(Duration::from_secs(600), "every API to be served", || async {
        match procs::get(&format!("http://{}{path}", dp.addr), &[]).await {
            Ok((StatusCode::OK, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

async fn run(n: usize) -> String {
    let c = cluster::cluster().await;
    cluster::install_crds(&c.client).await;
    let ns = cluster::fresh_namespace(&c.client, &format!("scale{n}")).await;
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta { name: Some("dataplane".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(c.client.clone(), &ns).create(&PostParams::default(), &sa).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let out = std::process::Command::new(&c.kubectl)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-n", &ns, "create", "token", "dataplane", "--audience", "gatehouse", "--duration", "2h"])
        .output()
        .unwrap();
    std::fs::write(&token, out.stdout).unwrap();

    let up = procs::upstream("bench").await;
    let ctl = procs::controller(&c.kubeconfig, &ns, "bench");
    let dps = [
        procs::dataplane(ctl.addr, &token, &dir.path().join("dp1"), "dp-1"),
        procs::dataplane(ctl.addr, &token, &dir.path().join("dp2"), "dp-2"),
    ];

    // Create N APIs, WRITERS at a time.
    let apis: Arc<Api<ApiDefinition>> = Arc::new(Api::namespaced(c.client.clone(), &ns));
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let apis = apis.clone();
        writers.spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                let api: ApiDefinition = serde_json::from_value(serde_json::json!({
                    "apiVersion": "gatehouse.dev/v1alpha1", "kind": "ApiDefinition",
                    "metadata": {"name": format!("api-{i}")},
                    "spec": {"listenPath": format!("/api-{i}/"), "upstream": {"url": format!("http://{up}")}}
                }))
                .unwrap();
                apis.create(&PostParams::default(), &api).await.unwrap();
            }
        });
    }
    while writers.join_next().await.is_some() {}
    let created = started.elapsed();
    let last = format!("/api-{}/x", n - 1);
    for dp in &dps {
        serves(dp, &last).await;
    }
    let initial = started.elapsed();
    eprintln!("N={n}: {n} APIs created in {created:?}, served on 2/2 in {initial:?}");

    // A dataplane that joins a controller already holding N APIs.
    let t0 = Instant::now();
    let late = procs::dataplane(ctl.addr, &token, &dir.path().join("dp3"), "dp-3");
    serves(&late, &last).await;
    let join = t0.elapsed();
    drop(late);
    eprintln!("N={n}: a dataplane joining serves all {n} in {join:?}");

    // A controller that starts with N APIs in the API server (an upgrade, a rescheduled
    // pod): from its start to a new dataplane serving all of them.
    let t0 = Instant::now();
    let ctl2 = procs::controller(&c.kubeconfig, &ns, "bench-2");
    let fresh = procs::dataplane(ctl2.addr, &token, &dir.path().join("dp4"), "dp-4");
    serves(&fresh, &last).await;
    let restart = t0.elapsed();
    drop((fresh, ctl2));
    eprintln!("N={n}: a controller starting with {n} APIs has a new dataplane serving them in {restart:?}");

    let metric = |name: &'static str| {
        let ctl = &ctl;
        async move { ctl.metric(name).await }
    };
    let (bytes0, count0) =
        (metric("gatehouse_controller_delta_bytes_sum").await, metric("gatehouse_controller_delta_bytes_count").await);
    let mut latencies = Vec::with_capacity(SAMPLES);
    for k in 0..SAMPLES {
        let i = (k * 7919) % n;
        let patch = serde_json::json!({"spec": {"upstream": {"url": format!("http://{up}/v{k}")}}});
        let want = format!("upstream bench /v{k}/x");
        let t0 = Instant::now();
        apis.patch(&format!("api-{i}"), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        for dp in &dps {
            let url = format!("http://{}/api-{i}/x", dp.addr);
            loop {
                if let Ok((StatusCode::OK, body)) = procs::get(&url, &[]).await
                    && body == want
                {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "update {k} never served");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        latencies.push(t0.elapsed());
    }
    let (bytes1, count1) =
        (metric("gatehouse_controller_delta_bytes_sum").await, metric("gatehouse_controller_delta_bytes_count").await);
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1).min(latencies.len() - 1)];
    let delta = if count1 > count0 { (bytes1 - bytes0) / (count1 - count0) } else { 0.0 };
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let row = format!(
        "| {n} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} / {} | {delta:.0} B | {:.1} s ({:.1} s creating) | {:.1} s | {:.1} s |",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        mib(ctl.rss_kib()),
        mib(dps[0].rss_kib()),
        mib(dps[1].rss_kib()),
        initial.as_secs_f64(),
        created.as_secs_f64(),
        join.as_secs_f64(),
        restart.as_secs_f64(),
    );
    eprintln!("{row}");
    row
}
