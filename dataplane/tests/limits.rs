//! Client-facing bounds of the real gateway: timeouts, connection caps, header limits,
//! upstream caps, the buffered-body budget, HTTP/2 stream limits and the shutdown drain.
//! Every test shows the gateway's answer to the misbehaving client AND that others keep
//! being served. Waits are on conditions (a socket closed, a reply), never on sleeps.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{raw::*, *};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads until the peer closes (EOF or reset); panics past PATIENCE. Returns what was read.
async fn read_until_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: the gateway did not close the connection within {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An API whose upstream has a `timeout`.
fn timed_api(name: &str, listen_path: &str, url: &str, timeout: &str) -> String {
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: {listen_path}\n  upstream: {{url: \"{url}\", timeout: {timeout}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_before_their_headers_end_are_closed_while_others_are_served() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--header-read-timeout", "300ms"]).await;

    let mut mid_header = TcpStream::connect(gw.addr).await.unwrap();
    mid_header.write_all(b"GET /a/x HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    // Connects and sends nothing: the protocol is not even known yet.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();

    assert_eq!(gw.get("/a/x").await.status, StatusCode::OK, "another client is served meanwhile");
    let answer = read_until_closed(&mut mid_header, "client stopped mid-header").await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "closed without a request reaching anyone: {:?}",
        String::from_utf8_lossy(&answer)
    );
    read_until_closed(&mut silent, "client that sent nothing").await;
    assert_eq!(up.hits(), 1, "only the complete request reached the upstream");

    // Keep-alive: after one answered request, a client trickles the next head, a header
    // line at a time well within the period. Bytes arriving are not a request starting.
    let mut trickle = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut trickle, "/a/first").await.0, "HTTP/1.1 200 OK");
    trickle.write_all(b"GET /a/next HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let closed = async {
        let mut buf = [0u8; 256];
        loop {
            if trickle.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return;
            }
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed).await.expect("a keep-alive connection trickling its next head is closed");
    assert_eq!(up.hits(), 2, "the trickled request never reached the upstream");
    // On a new connection: the harness client's pooled one has been waiting for a next
    // request longer than the 300 ms, and the gateway may be closing it just as it is reused.
    let mut fresh = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut fresh, "/a/y").await.0, "HTTP/1.1 200 OK", "and the gateway keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_but_not_while_a_request_is_in_flight() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--idle-timeout", "300ms", "--header-read-timeout", "60s"]).await;

    // A request that takes longer than the idle timeout is not cut: it is in flight.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let (status, body) = get_on(&mut s, "/a/slow?ms=1000").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "slept up"));
    // Then the connection sits idle, and is closed.
    let rest = read_until_closed(&mut s, "idle HTTP/1.1 keep-alive connection").await;
    assert!(rest.is_empty(), "nothing more was sent: {:?}", String::from_utf8_lossy(&rest));

    // HTTP/2: hyper has no idle timeout of its own; the gateway's applies there too.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = Request::get(gw.url("/a/h2")).body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    let ended = tokio::time::timeout(PATIENCE, conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");

    assert_eq!(gw.get("/a/z").await.status, StatusCode::OK, "new clients are served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_clients_wait_and_open_ones_keep_working() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--max-connections", "2", "--header-read-timeout", "60s"]).await;

    let mut a = TcpStream::connect(gw.addr).await.unwrap();
    let mut b = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut a, "/a/1").await.0, "HTTP/1.1 200 OK");
    assert_eq!(get_on(&mut b, "/a/2").await.0, "HTTP/1.1 200 OK");
    gw.wait_until("two client connections open", async || gw.metric("gatehouse_client_connections").await == 2.0).await;

    // The kernel completes the handshake, but the gateway does not accept past the cap.
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /a/3 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(get_on(&mut a, "/a/4").await.0, "HTTP/1.1 200 OK", "open connections keep working");
    let mut buf = [0u8; 64];
    // Waiting longer could only make this pass more surely; a gateway without the cap
    // answers within it.
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
    assert!(early.is_err(), "the third connection was served past the cap: {early:?}");

    drop(a);
    let (status, _) = read_response(&mut c).await;
    assert_eq!(status, "HTTP/1.1 200 OK", "served once a slot freed");
    assert_eq!(get_on(&mut b, "/a/5").await.0, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_is_shared_by_the_workers_and_a_freed_slot_serves_whichever_one_has_a_client() {
    let up = Upstream::start("up").await;
    let args = ["--workers", "2", "--max-connections", "1", "--header-read-timeout", "60s"];
    let (_cfg, gw) = gateway(&up, &args).await;
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut first, "/a/0").await.0, "HTTP/1.1 200 OK");
    // Eight more clients, spread by the kernel over both workers' listeners, each asking
    // once and closing: served one at a time as slots free, on whichever worker holds them.
    let mut waiting = Vec::new();
    for i in 1..=8 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("GET /a/{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        waiting.push(s);
    }
    assert_eq!(gw.metric("gatehouse_client_connections").await, 1.0, "one served: the cap is for all workers");
    drop(first);
    for (i, s) in waiting.iter_mut().enumerate() {
        let answer = String::from_utf8_lossy(&read_until_closed(s, "a client past the cap").await).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "client {}: {answer}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_too_many_headers_get_431_on_http1_and_http2() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--max-header-bytes", "8192", "--max-headers", "20"]).await;
    let big = "x".repeat(10_000);

    let r = gw.get_with("/a/x", &[("x-big", big.as_str())]).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "a head over --max-header-bytes");
    let many: Vec<(String, String)> = (0..30).map(|i| (format!("x-h{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = gw.get_with("/a/x", &many).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "more headers than --max-headers");
    let r = gw.get_with("/a/x", &many[..10]).await;
    assert_eq!(r.status, StatusCode::OK, "a normal request is fine");

    // HTTP/2: the same byte limit is SETTINGS_MAX_HEADER_LIST_SIZE.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let ok = Request::get(gw.url("/a/h2")).body(()).unwrap();
    assert_eq!(h2.send_request(ok, true).unwrap().0.await.unwrap().status(), StatusCode::OK);
    let over = Request::get(gw.url("/a/h2")).header("x-big", big.as_str()).body(()).unwrap();
    let (resp, _) = h2.clone().ready().await.unwrap().send_request(over, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let ok = Request::get(gw.url("/a/h2")).body(()).unwrap();
    let (resp, _) = h2.ready().await.unwrap().send_request(ok, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK, "the same HTTP/2 connection keeps working");
    assert_eq!(up.hits(), 3);
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects hang.
fn blackhole() -> (std::net::SocketAddr, tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..64 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return (addr, listener, held),
        }
    }
    panic!("could not fill the accept queue of {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_is_its_own_bound_apart_from_upstream_timeout() {
    let up = Upstream::start("up").await;
    let (hole, _listener, _held) = blackhole();
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[api("a", "/a/", &up.url(), ""), timed_api("hole", "/hole/", &format!("http://{hole}"), "60s")].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &["--upstream-connect-timeout", "300ms"]).await;
    let r = gw.get("/hole/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out"));
    assert_eq!(gw.get("/a/x").await.status, StatusCode::OK, "other APIs are served");
    assert_eq!(
        gw.metric("gatehouse_rejections_total{api=\"default/hole\",reason=\"upstream_connect_timeout\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_per_target_cap_wait_for_a_slot_then_get_503() {
    let up = Upstream::start("up").await;
    let other = Upstream::start("other").await;
    let u = up.url();
    let cfg = ConfigDir::new();
    // Two APIs on the same target share its slots.
    let quick = timed_api("quick", "/quick/", &u, "300ms");
    cfg.write("apis.yaml", &[api("a", "/a/", &u, ""), quick, api("o", "/o/", &other.url(), "")].concat());
    let gw = std::sync::Arc::new(Gatehouse::start(cfg.path(), &["--upstream-max-connections-per-target", "1"]).await);

    // Holds the target's only slot: its body streams until the gate opens.
    let holder = tokio::spawn({
        let gw = gw.clone();
        async move { gw.get("/a/gate").await }
    });
    gw.wait_until("the upstream to get the first request", async || up.hits() == 1).await;

    let r = gw.get("/quick/x").await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "upstream connection limit reached"),
        "no slot within the API's timeout"
    );
    assert_eq!(gw.get("/o/x").await.status, StatusCode::OK, "other targets are not affected");

    // This one waits (its API allows 30 s) and gets the slot once the holder's body ends.
    let waiter = tokio::spawn({
        let gw = gw.clone();
        async move { gw.get("/a/after").await }
    });
    up.gate.notify_one();
    let held = holder.await.unwrap();
    assert_eq!((held.status, held.text().as_str()), (StatusCode::OK, "onetwo"));
    assert_eq!(waiter.await.unwrap().status, StatusCode::OK);
    assert_eq!(up.hits(), 2, "the refused request never reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_buffered_for_plugins_share_one_budget_413_then_503() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let hooks = "  middleware:\n    pre: [{plugin: body, symbol: UppercaseBody}]\n";
    cfg.write(
        "all.yaml",
        &[
            plugin("body", &p.rust("body-transform"), ""),
            api("b", "/b/", &up.url(), hooks),
            api("a", "/a/", &up.url(), ""),
        ]
        .concat(),
    );
    let kib = 1024;
    let gw = Gatehouse::start(
        cfg.path(),
        &[
            "--max-buffered-body-bytes",
            &(800 * kib).to_string(),
            "--buffered-body-budget-bytes",
            &(1024 * kib).to_string(),
        ],
    )
    .await;
    let upload =
        |n: usize| Request::post(gw.url("/b/upload")).body(Full::new(Bytes::from(vec![b'a'; n])).boxed()).unwrap();

    let r = gw.send(upload(900 * kib)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "one body over the per-request limit: {}", r.text());

    // A slow upload holds 600 KiB of the budget while it is being read; once those bytes
    // are in, a second upload of 600 KiB cannot fit.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!("POST /b/upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", 700 * kib);
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&vec![b'a'; 600 * kib]).await.unwrap();
    let held = (600 * kib) as f64;
    gw.wait_until("the slow upload's bytes to be held", async || {
        gw.metric("gatehouse_buffered_body_bytes").await == held
    })
    .await;
    let refused = gw.send(upload(600 * kib)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert_eq!(refused.error(), "gateway busy: too many request bodies held for plugins");
    assert_eq!(gw.get("/a/x").await.status, StatusCode::OK, "requests without buffered bodies are served");

    slow.write_all(&vec![b'a'; 100 * kib]).await.unwrap();
    let (status, body) = read_response(&mut slow).await;
    assert_eq!((status.as_str(), body), ("HTTP/1.1 200 OK", (700 * kib).to_string()), "the slow upload completes");
    // The budget is given back when requests end.
    gw.wait_until("the budget to be given back", async || gw.metric("gatehouse_buffered_body_bytes").await == 0.0)
        .await;
    let r = gw.send(upload(600 * kib)).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, (600 * kib).to_string()));
    assert!(gw.metric("gatehouse_rejections_total{api=\"default/b\",reason=\"body_budget\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_capped() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--http2-max-concurrent-streams", "2"]).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _) = h2.send_request(Request::get(gw.url("/a/x")).body(()).unwrap(), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    assert_eq!(h2.current_max_send_streams(), 2, "the gateway advertises its stream cap");

    // Three at once on one connection: the third waits for a stream to end, all succeed.
    let mut calls = Vec::new();
    for i in 0..3 {
        let mut c = h2.clone().ready().await.unwrap();
        let (resp, _) =
            c.send_request(Request::get(gw.url(&format!("/a/slow?ms=200&i={i}"))).body(()).unwrap(), true).unwrap();
        calls.push(tokio::spawn(resp));
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

// One thread: the whole burst of HEADERS + RST_STREAM pairs is queued before the client's
// connection task writes it, as an attacker's would be.
#[tokio::test(flavor = "current_thread")]
async fn http2_rapid_reset_floods_end_the_connection_and_others_are_served() {
    let up = Upstream::start("up").await;
    // Default flags: the protection is on out of the box.
    let (_cfg, gw) = gateway(&up, &[]).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let (resp, _) = h2.send_request(Request::get(gw.url("/a/x")).body(()).unwrap(), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);

    let started = Instant::now();
    'flood: while started.elapsed() < PATIENCE {
        for _ in 0..50 {
            let Ok(mut c) = h2.clone().ready().await else { break 'flood };
            let Ok((_, mut stream)) = c.send_request(Request::get(gw.url("/a/x")).body(()).unwrap(), false) else {
                break 'flood;
            };
            stream.send_reset(h2::Reason::CANCEL);
        }
        if conn.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let ended = tokio::time::timeout(PATIENCE, conn).await.expect("the flooding connection was not ended");
    // The client may see the reset socket before it reads the GOAWAY; the gateway's log says why.
    if let Ok(Err(e)) = &ended
        && let Some(reason) = e.reason()
    {
        assert_eq!(reason, h2::Reason::ENHANCE_YOUR_CALM, "{e}");
    }
    gw.wait_until("the gateway to log the reset flood", async || {
        gw.logs().contains("remotely-reset pending-accept streams reached limit")
    })
    .await;
    assert_eq!(gw.get("/a/y").await.status, StatusCode::OK, "another client is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_normal_requests_and_bounds_the_rest_by_the_drain_timeout() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &timed_api("a", "/a/", &up.url(), "120s"));
    let mut gw = Gatehouse::start(cfg.path(), &["--drain-timeout", "3s", "--header-read-timeout", "120s"]).await;

    let mut mid_header = TcpStream::connect(gw.addr).await.unwrap();
    mid_header.write_all(b"GET /a/x HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let mut stuck = TcpStream::connect(gw.addr).await.unwrap();
    stuck.write_all(b"GET /a/slow?ms=100000 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut normal = TcpStream::connect(gw.addr).await.unwrap();
    normal.write_all(b"GET /a/slow?ms=1000 HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    gw.wait_until("both requests at the upstream", async || up.hits() == 2).await;

    let stopping = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = gw.terminate();
        (status, gw)
    });
    let (status, body) = read_response(&mut normal).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "slept up"), "in-flight request finished");
    let (exit, gw) = tokio::time::timeout(PATIENCE, exit).await.expect("the gateway outlived its drain").unwrap();
    let took = stopping.elapsed();
    assert!(exit.success(), "clean exit: {exit:?}\n{}", gw.logs());
    assert!(took < Duration::from_secs(15), "stopped after {took:?}, drain is 3 s");
    let cut = read_until_closed(&mut stuck, "slow in-flight request after the drain").await;
    assert!(cut.is_empty(), "the stuck request got no answer: {:?}", String::from_utf8_lossy(&cut));
    read_until_closed(&mut mid_header, "client stopped mid-header").await;
    // The process has exited, but its last lines may still be in the pipe to the test.
    gw.wait_for_log_containing("drain timed out").await;
}
