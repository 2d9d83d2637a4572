//! The standalone gateway over real HTTP: the real binary, real upstreams on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Channel, Full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_host_strips_listen_path_and_skips_inactive_apis() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let u = up.url();
    let apis = [
        api("root", "/", &u, ""),
        api("a", "/a/", &u, ""),
        api("ab", "/a/b/", &format!("{u}/base"), ""),
        api("keep", "/keep/", &u, "  stripListenPath: false\n"),
        api("hosted", "/a/", &u, "  hosts: [api.example.com]\n"),
        api("disabled", "/off/", &u, "  active: false\n"),
    ];
    cfg.write("apis.yaml", &apis.concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let j = gw.get("/a/b/c?x=1").await.json();
    assert_eq!((j["path"].as_str(), j["query"].as_str()), (Some("/base/c"), Some("x=1")));
    assert_eq!(gw.get("/a/bc").await.json()["path"], "/bc");
    assert_eq!(gw.get("/keep/x").await.json()["path"], "/keep/x");
    assert_eq!(gw.get("/anything").await.json()["path"], "/anything", "/ catches the rest");

    // Host routes win; the upstream sees the original host in X-Forwarded-Host.
    let j = gw.get_with("/a/x", &[("host", "api.example.com")]).await.json();
    assert_eq!(j["headers"]["x-forwarded-host"], "api.example.com");
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    assert_eq!(gw.metric(r#"gatehouse_requests_total{api="default/hosted",code="2xx"}"#).await, 1.0);

    // Inactive APIs are not served: /off/ falls through to the root API.
    assert_eq!(gw.get("/off/x").await.json()["path"], "/off/x");
    let cfg_state = gw.config().await;
    assert!(cfg_state["errors"].as_array().unwrap().is_empty(), "{cfg_state}");
    let off = cfg_state["apis"].as_array().unwrap().iter().find(|a| a["id"] == "default/disabled").unwrap().clone();
    assert_eq!(off["state"], "inactive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_404_json() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let r = gw.get("/nothing/here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.error(), "no API matches this request");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let j = gw.get_with("/a/x", &[("connection", "x-private"), ("x-private", "1"), ("x-public", "2")]).await.json();
    assert!(j["headers"].get("x-private").is_none(), "{j}");
    assert_eq!(j["headers"]["x-public"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // Response: the upstream sends "one" and waits for the test to see it before "two".
    let resp = send_unread(Request::get(gw.url("/a/gate")).body(empty()).unwrap()).await;
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame()).await.expect("first chunk streamed").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "one");
    up.gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "two");

    // Request: the client sends the second chunk only once the upstream has the first.
    let (mut tx, chan) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post(gw.url("/a/gate-in")).body(chan.boxed()).unwrap();
    let seen = up.first_chunk_seen.clone();
    let sender = tokio::spawn(async move {
        tx.send_data(Bytes::from_static(b"first;")).await.unwrap();
        tokio::time::timeout(PATIENCE, seen.notified()).await.expect("upstream got the first chunk while streaming");
        tx.send_data(Bytes::from_static(b"second")).await.unwrap();
    });
    let r = gw.send(req).await;
    sender.await.unwrap();
    assert_eq!(r.text(), "first;second");

    // And large bodies arrive whole.
    let big = 32 * 1024 * 1024;
    let r = gw.get(&format!("/a/big?bytes={big}")).await;
    assert_eq!(r.body.len(), big);
    assert!(r.body.iter().all(|&b| b == b'x'));
    let r =
        gw.send(Request::post(gw.url("/a/upload")).body(Full::new(Bytes::from(vec![7u8; big])).boxed()).unwrap()).await;
    assert_eq!(r.text(), big.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_carry_the_next_request_only_once_a_response_was_read_whole() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    // One worker: idle upstream connections are kept per worker, and a client connection
    // the test's client opens anew could land on another one.
    let gw = Gatehouse::start(cfg.path(), &["--workers", "1"]).await;

    // Fixed-length, chunked and empty answers, one after another: one upstream connection.
    for _ in 0..5 {
        assert_eq!(gw.get("/a/x").await.json()["path"], "/x");
        assert_eq!(gw.get("/a/big?bytes=100000").await.body.len(), 100_000);
        assert_eq!(gw.get("/a/empty").await.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(up.connections(), 1, "15 requests in turn share one upstream connection");

    // A client that leaves half-way through a body: the rest of that response is on the
    // upstream connection, and must never be read as the answer to someone else's request.
    let resp = send_unread(Request::get(gw.url("/a/big?bytes=268435456")).body(empty()).unwrap()).await;
    let mut body = resp.into_body();
    tokio::time::timeout(PATIENCE, body.frame()).await.expect("a first chunk").unwrap().unwrap();
    drop(body);
    gw.wait_until("the gateway closes the half-read upstream connection", async || up.closed() == 1).await;
    let r = gw.get("/a/after").await;
    assert_eq!((r.status, r.json()["path"].as_str()), (StatusCode::OK, Some("/after")));
    assert_eq!(up.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_keeps_only_its_socket_and_carries_the_next_request() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &["--workers", "1"]).await;
    assert_eq!(gw.get("/a/x").await.json()["path"], "/x");
    let parked = r#"gatehouse_upstream_connections_idle{state="parked"}"#;
    gw.wait_until("the idle upstream connection parks", async || gw.metric(parked).await == 1.0).await;
    assert_eq!(gw.metric(r#"gatehouse_upstream_connections_idle{state="live"}"#).await, 0.0);
    assert_eq!(gw.get("/a/y").await.json()["path"], "/y");
    assert_eq!((up.connections(), up.closed()), (1, 0), "the parked socket carried the next request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_the_workers_and_each_keeps_its_own_upstream_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &["--workers", "2"]).await;
    let addr = gw.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    // One request per new client connection, one at a time: a worker finds the upstream
    // connection it used before idle, so the upstream sees one connection per worker
    // that served. The kernel spreads 32 connections over both listeners (all on one:
    // a chance of 2^-31).
    for i in 0..32 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!("GET /a/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(PATIENCE, s.read_to_string(&mut answer)).await.expect("answered").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("\"/{i}\"")), "{answer}");
    }
    assert_eq!(up.hits(), 32);
    assert_eq!(up.connections(), 2, "one upstream connection per worker, each reused by its own worker only");
}

/// Sends a request and returns the response unread, for tests that read it frame by frame.
async fn send_unread(req: Request<Body>) -> http::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    client.request(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_outcome_has_its_status_and_message() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken, authToken: {header: Authorization, query: api_key, cookie: gh_key}}\n";
    let text = [
        api("orders", "/orders/", &up.url(), auth),
        api("billing", "/billing/", &up.url(), auth),
        key("alice", "alice-key", "accessRights: [orders]\nmetaData: {team: shop}"),
        key("old", "old-key", "accessRights: [orders]\nexpires: \"2020-01-01T00:00:00Z\""),
    ];
    cfg.write("apis.yaml", &text.concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/orders/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::UNAUTHORIZED, "authorization field missing"));
    let r = gw.get_with("/orders/x", &[("authorization", "nope")]).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::UNAUTHORIZED, "key not authorised"));
    let r = gw.get_with("/orders/x", &[("authorization", "old-key")]).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::FORBIDDEN, "key has expired, please renew"));
    let r = gw.get_with("/billing/x", &[("authorization", "alice-key")]).await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::FORBIDDEN, "access to this API has been disallowed"));
    assert_eq!(up.hits(), 0, "rejected requests never reach the upstream");

    for r in [
        gw.get_with("/orders/x", &[("authorization", "alice-key")]).await,
        gw.get_with("/orders/x", &[("authorization", "Bearer alice-key")]).await,
        gw.get("/orders/x?api_key=alice-key").await,
        gw.get_with("/orders/x", &[("cookie", "a=b; gh_key=alice-key")]).await,
    ] {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(up.hits(), 4);
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="default/orders",reason="auth_missing"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="default/orders",reason="auth_unknown"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="default/orders",reason="key_expired"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="default/billing",reason="access_denied"}"#).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rate_limit_reaches_429_and_recovers_after_per() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    cfg.write(
        "apis.yaml",
        // One request every 3 s: four requests on loopback take far less, however busy the machine.
        &[api("a", "/a/", &up.url(), auth), key("k", "k1", "rate: 3\nper: 9s\naccessRights: [a]")].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let call = || gw.get_with("/a/x", &[("authorization", "k1")]);
    for _ in 0..3 {
        assert_eq!(call().await.status, StatusCode::OK);
    }
    let r = call().await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded"));
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
    // Recovers: after Retry-After, a request gets through again.
    let refused = retry_until(&r, StatusCode::OK, call).await;
    let rejections = 1 + refused;
    assert_eq!(
        gw.metric(r#"gatehouse_rejections_total{api="default/a",reason="rate_limit"}"#).await,
        rejections as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rate_limit_counts_all_callers_and_recovers() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[api("a", "/a/", &up.url(), "  rateLimit: {rate: 2, per: 6s}\n"), api("b", "/b/", &up.url(), "")].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.get("/a/1").await.status, StatusCode::OK);
    assert_eq!(gw.get("/a/2").await.status, StatusCode::OK);
    let r = gw.get("/a/3").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::TOO_MANY_REQUESTS, "API rate limit exceeded"));
    assert_eq!(gw.get("/b/1").await.status, StatusCode::OK, "other APIs are not limited");
    retry_until(&r, StatusCode::OK, async || gw.get("/a/4").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_reaches_429_and_renews() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    cfg.write(
        "apis.yaml",
        &[api("a", "/a/", &up.url(), auth), key("k", "k1", "quotaMax: 2\nquotaRenewal: 5s\naccessRights: [a]")]
            .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let call = || gw.get_with("/a/x", &[("authorization", "k1")]);
    let r = call().await;
    assert_eq!(
        (r.status, r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining")),
        (StatusCode::OK, "2", "1")
    );
    assert_eq!(call().await.header("x-ratelimit-remaining"), "0");
    let r = call().await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::TOO_MANY_REQUESTS, "quota exceeded"));
    // Renewed once the window ends.
    retry_until(&r, StatusCode::OK, call).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_swaps_config_without_failing_a_request() {
    let (one, two) = (Upstream::start("one").await, Upstream::start("two").await);
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &one.url(), ""));
    let gw = Arc::new(Gatehouse::start(cfg.path(), &[]).await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = gw.get("/a/slow?ms=5").await;
                let counter = if r.status == StatusCode::OK { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    gw.wait_until("load to start", async || ok.load(Ordering::Relaxed) > 20).await;
    for v in 2..=6 {
        let target = if v % 2 == 0 { &two } else { &one };
        cfg.write(
            "apis.yaml",
            &[api("a", "/a/", &target.url(), ""), api(&format!("extra{v}"), &format!("/e{v}/"), &one.url(), "")]
                .concat(),
        );
        gw.wait_version(v).await;
        let served_by = gw.get("/a/who").await.json()["upstream"].as_str().unwrap().to_owned();
        assert_eq!(served_by, if v % 2 == 0 { "two" } else { "one" }, "version {v}");
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across 5 reloads");
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert!(one.hits() > 0 && two.hits() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_reported_and_the_last_good_config_keeps_serving() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("a.yaml", &api("a", "/a/", &up.url(), ""));
    cfg.write("b.yaml", &api("b", "/b/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let v = gw.config().await["version"].as_u64().unwrap();

    // Not YAML at all: the file's resources keep serving.
    cfg.write("a.yaml", "apiVersion: [unclosed\n");
    gw.wait_until("the YAML error to be reported", async || gw.config().await["errors"].to_string().contains("a.yaml"))
        .await;
    assert_eq!(gw.get("/a/x").await.status, StatusCode::OK);

    // An unknown field: reported with file, resource and field; the last good version serves.
    cfg.write("b.yaml", &api("b", "/b/", &up.url(), "  stripListenPth: true\n"));
    gw.wait_until("the unknown field to be reported", async || {
        gw.config().await["errors"].to_string().contains("stripListenPth")
    })
    .await;
    let errors = gw.config().await["errors"].to_string();
    assert!(errors.contains("b.yaml: ApiDefinition default/b: spec.stripListenPth: unknown field"), "{errors}");
    assert!(errors.contains("serving its last good version"), "{errors}");
    assert_eq!(gw.get("/b/x").await.status, StatusCode::OK);

    // An invalid value, likewise.
    cfg.write("b.yaml", &api("b", "/b/", &up.url(), "  rateLimit: {rate: 1, per: soon}\n"));
    gw.wait_until("the bad duration to be reported", async || {
        gw.config().await["errors"].to_string().contains("spec.rateLimit.per: invalid duration")
    })
    .await;
    assert_eq!(gw.get("/b/x").await.status, StatusCode::OK);
    assert_eq!(gw.config().await["version"].as_u64().unwrap(), v, "nothing changed while broken");

    // Fixed: errors clear and the new config applies.
    cfg.write("a.yaml", &api("a", "/a2/", &up.url(), ""));
    cfg.write("b.yaml", &api("b", "/b/", &up.url(), ""));
    gw.wait_until("the fixed config to apply", async || gw.get("/a2/x").await.status == StatusCode::OK).await;
    gw.wait_until("errors to clear", async || gw.config().await["errors"].as_array().unwrap().is_empty()).await;
    assert_eq!(gw.get("/a/x").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_is_504_while_other_apis_keep_working() {
    let up = Upstream::start("up").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("down", "/down/", &format!("http://{closed}"), ""),
            api("slow", "/slow/", &up.url(), "").replace("upstream: {url:", "upstream: {timeout: 2s, url:"),
            api("ok", "/ok/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let r = gw.get("/down/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::BAD_GATEWAY, "upstream unreachable"));
    // 2 s: far longer than a 1 ms answer takes on a busy machine, far shorter than 60 s.
    let r = gw.get("/slow/slow?ms=60000").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream timed out"));
    assert_eq!(gw.get("/slow/slow?ms=1").await.status, StatusCode::OK, "fast enough is fine");
    assert_eq!(gw.get("/ok/x").await.status, StatusCode::OK);
    assert_eq!(gw.metric(r#"gatehouse_requests_total{api="default/down",code="5xx"}"#).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_records_are_written_for_answered_and_rejected_requests() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    cfg.write("apis.yaml", &[api("a", "/a/", &up.url(), auth), key("k", "k1", "accessRights: [a]")].concat());
    let out = cfg.path().join("analytics.jsonl");
    let gw = Gatehouse::start(cfg.path(), &[&format!("--analytics=file:{}", out.display())]).await;
    assert_eq!(gw.get_with("/a/ok", &[("authorization", "k1")]).await.status, StatusCode::OK);
    assert_eq!(gw.get("/a/nokey").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.get("/nowhere").await.status, StatusCode::NOT_FOUND);

    let records: Vec<serde_json::Value> =
        wait_for_lines(&out, 3).await.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 3, "{records:?}");
    let ok = &records[0];
    assert_eq!(
        (ok["api_id"].as_str(), ok["method"].as_str(), ok["path"].as_str()),
        (Some("default/a"), Some("GET"), Some("/a/ok"))
    );
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["key_alias"], "default/k");
    assert_eq!(ok["key_id"].as_str().unwrap().len(), 64, "a keyed id (see tests/keys.rs)");
    assert!(ok["latency_upstream_ms"].as_f64().unwrap() <= ok["latency_total_ms"].as_f64().unwrap());
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["plugin_answered"], false);
    assert!(ok["response_bytes"].as_u64().unwrap() > 0);
    assert_eq!((records[1]["status"].as_u64(), records[1]["error"].as_str()), (Some(401), Some("auth_missing")));
    assert!(records[1]["latency_upstream_ms"].is_null());
    assert_eq!((records[2]["status"].as_u64(), records[2]["api_id"].as_str()), (Some(404), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_latency_and_rejections() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    for _ in 0..3 {
        gw.get("/a/x").await;
    }
    gw.get("/zzz").await;
    assert_eq!(gw.metric(r#"gatehouse_requests_total{api="default/a",code="2xx"}"#).await, 3.0);
    assert_eq!(gw.metric(r#"gatehouse_request_duration_seconds_count{api="default/a"}"#).await, 3.0);
    assert_eq!(gw.metric(r#"gatehouse_upstream_duration_seconds_count{api="default/a"}"#).await, 3.0);
    assert_eq!(gw.metric(r#"gatehouse_requests_total{api="",code="4xx"}"#).await, 1.0);
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="",reason="no_route"}"#).await, 1.0);
    assert_eq!(gw.metric("gatehouse_config_version").await, 1.0);
    let health = gw.admin("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_config_and_http2_clients_are_served() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.admin("/readyz").await.status, StatusCode::OK);
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let resp = h2.request(Request::get(gw.url("/a/h2")).body(empty()).unwrap()).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["path"], "/h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_cleanly() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let mut gw = Gatehouse::start(cfg.path(), &[]).await;
    let url = gw.url("/a/slow?ms=1000");
    let inflight = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Body>();
        let resp = client.request(Request::get(url).body(empty()).unwrap()).await.unwrap();
        (resp.status(), resp.into_body().collect().await.unwrap().to_bytes())
    });
    gw.wait_until("the slow request to reach the upstream", async || up.hits() == 1).await;
    let status = tokio::task::spawn_blocking(move || (gw.terminate(), gw)).await.unwrap();
    let (code, body) = inflight.await.unwrap();
    assert_eq!((code, body.as_ref()), (StatusCode::OK, b"slept up".as_ref()));
    assert!(status.0.success(), "exit status {:?}", status.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_config_path_is_a_clear_startup_error() {
    let out = std::process::Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config", "/nonexistent/gatehouse"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--config /nonexistent/gatehouse"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_address_for_plain_and_tls_and_a_silly_worker_count_are_startup_errors() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = ConfigDir::new();
    let start = |extra: &[&str]| {
        let out = std::process::Command::new(binary())
            .args(["--admin-listen", "127.0.0.1:0", "--config"])
            .arg(cfg.path())
            .args(extra)
            .env("GATEHOUSE_WORKERS", "2")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (plain, any) = (format!("127.0.0.1:{free}"), format!("0.0.0.0:{free}"));
    let err = start(&["--listen", &plain, "--tls-listen", &plain]);
    assert!(err.contains(&format!("--tls-listen {plain}: the same address as --listen {plain}")), "{err}");
    let err = start(&["--listen", &any, "--tls-listen", &plain]);
    assert!(err.contains("the same address as --listen"), "{err}");
    let err = start(&["--listen", &plain, "--workers", "0"]);
    assert!(err.contains("--workers") && err.contains("between 1 and 1024"), "{err}");
}
