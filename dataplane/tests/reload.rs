//! Config application in standalone mode: nothing is reloaded while nothing changes, and a
//! real change is applied once.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const INVALID: &str = "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: broken}\nspec:\n  listenPath: /broken/\n  upstream: {url: \"http://127.0.0.1:1\"}\n  rateLimit: {rate: 1, per: soon}\n";

async fn reloads(gw: &Gatehouse) -> f64 {
    gw.metric(r#"gatehouse_config_reloads_total{result="ok"}"#).await
        + gw.metric(r#"gatehouse_config_reloads_total{result="partial"}"#).await
}

fn reports_of_the_broken_manifest(gw: &Gatehouse) -> usize {
    gw.logs().lines().filter(|l| l.contains("spec.rateLimit.per: invalid duration")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_config_is_not_reloaded_and_a_bad_manifest_is_reported_once_per_change() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("good.yaml", &api("a", "/a/", &up.url(), ""));
    cfg.write("broken.yaml", INVALID);
    // Analytics written into the watched directory, and traffic meanwhile: writes the
    // gateway makes itself are not config changes.
    let out = cfg.path().join("analytics.jsonl");
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    gw.wait_until("the broken manifest to be reported", async || reports_of_the_broken_manifest(&gw) == 1).await;
    let version = gw.config().await["version"].as_u64().unwrap();
    let before = reloads(&gw).await;
    assert!(before >= 1.0);

    // Nothing changes for 3 s, while requests (and analytics writes) go on.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while tokio::time::Instant::now() < quiet_until {
        assert_eq!(gw.get("/a/x").await.status, StatusCode::OK);
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 10);
    assert_eq!(reloads(&gw).await, before, "reloaded with nothing changed");
    assert_eq!(reports_of_the_broken_manifest(&gw), 1, "the same error reported again:\n{}", gw.logs());
    assert_eq!(gw.config().await["version"].as_u64().unwrap(), version);
    // Rewriting a file with the same content is not a change either.
    cfg.write("good.yaml", &api("a", "/a/", &up.url(), ""));

    // A real change: applied and served, counted once, and the error (still there) reported
    // once more, for the new state.
    cfg.write("good.yaml", &[api("a", "/a/", &up.url(), ""), api("b", "/b/", &up.url(), "")].concat());
    gw.wait_until("the new API to be served", async || gw.get("/b/x").await.status == StatusCode::OK).await;
    let after = reloads(&gw).await;
    assert!((1.0..=2.0).contains(&(after - before)), "{before} -> {after} reloads for one change");
    gw.wait_version(version + 1).await;
    assert_eq!(gw.get("/a/x").await.status, StatusCode::OK);
    let reports = reports_of_the_broken_manifest(&gw);
    assert!((2..=3).contains(&reports), "{reports} reports for two states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_config_file_is_reloaded_on_change_only() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("gatehouse.yaml", &api("a", "/a/", &up.url(), ""));
    // Another file beside it, written continuously, is none of the gateway's business.
    let neighbour = cfg.path().join("notes.txt");
    let gw = Gatehouse::start(&cfg.path().join("gatehouse.yaml"), &[]).await;
    let before = reloads(&gw).await;
    for i in 0..100 {
        std::fs::write(&neighbour, format!("{i}")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reloads(&gw).await, before, "reloaded for a file that is not the config");
    cfg.write("gatehouse.yaml", &api("a", "/a2/", &up.url(), ""));
    gw.wait_until("the change to be served", async || gw.get("/a2/x").await.status == StatusCode::OK).await;
    assert_eq!(gw.get("/a/x").await.status, StatusCode::NOT_FOUND);
}
