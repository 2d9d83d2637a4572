//! Idle HTTP/1.1 keep-alive connections give their HTTP buffers back (they "park") and
//! are served again on the same socket: what a parked connection read while parked, and
//! what the client sent before it parked, reach the next request; a connection is never
//! parked while a response is still streaming; the time limits hold across parking; and a
//! drain closes parked connections; and the memory they gave back leaves the process.
//! Waits are on conditions (the parked gauge, a reply, the resident set).
#![allow(clippy::unwrap_used)]

mod common;

use common::{raw::*, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PARKED: &str = "gatehouse_client_connections_parked";

async fn parked(gw: &Gatehouse, n: f64) {
    gw.wait_until(&format!("{n} connections parked"), async || gw.metric(PARKED).await == n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_parks_and_is_served_again_on_the_same_socket() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &[]).await;

    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut s, "/a/one").await.0, "HTTP/1.1 200 OK");
    parked(&gw, 1.0).await;
    assert_eq!(get_on(&mut s, "/a/two").await.0, "HTTP/1.1 200 OK", "served after parking");
    parked(&gw, 1.0).await;

    // Two requests in one write reach a parked connection: both answered, in order.
    s.write_all(b"GET /a/three HTTP/1.1\r\nHost: a\r\n\r\nGET /a/four HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (third, fourth) = (read_response(&mut s).await, read_response(&mut s).await);
    assert!(third.1.contains("/three") && fourth.1.contains("/four"), "{third:?} {fourth:?}");

    // Part of a head sent before the connection parks: hyper had read it; it is handed
    // to the next hyper connection with the rest.
    parked(&gw, 1.0).await;
    assert_eq!(get_on(&mut s, "/a/five").await.0, "HTTP/1.1 200 OK");
    s.write_all(b"GET /a/six HT").await.unwrap();
    parked(&gw, 1.0).await;
    s.write_all(b"TP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (status, body) = read_response(&mut s).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("/six"), "the request as the client sent it: {body}");
    assert_eq!(up.hits(), 6, "every request reached the upstream once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_response_is_still_streaming_is_not_parked() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--workers", "1"]).await;

    let mut streaming = TcpStream::connect(gw.addr).await.unwrap();
    streaming.write_all(b"GET /a/gate HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut first = [0u8; 256];
    let mut head = Vec::new();
    // The head and the first chunk may come in more than one read.
    while !String::from_utf8_lossy(&head).contains("one") {
        let n = tokio::time::timeout(PATIENCE, streaming.read(&mut first)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the first chunk: {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&first[..n]);
    }

    // Another connection goes idle after the stream began and parks: a tick and more has
    // passed with the stream's body still unsent, and it is not parked.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut idle, "/a/idle").await.0, "HTTP/1.1 200 OK");
    parked(&gw, 1.0).await;

    up.gate.notify_one();
    let mut rest = Vec::new();
    while !String::from_utf8_lossy(&rest).contains("0\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, streaming.read(&mut first)).await.unwrap().unwrap();
        assert!(n > 0, "the stream was cut: {:?}", String::from_utf8_lossy(&rest));
        rest.extend_from_slice(&first[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).contains("two"));
    assert_eq!(get_on(&mut streaming, "/a/after").await.0, "HTTP/1.1 200 OK", "and it was kept alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_next_head_is_closed_even_as_it_parks() {
    let up = Upstream::start("up").await;
    // A check period of 3 s: the connection parks (after 1-2 s) before it is closed.
    let (_cfg, gw) = gateway(&up, &["--header-read-timeout", "3s"]).await;

    let mut trickle = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut trickle, "/a/first").await.0, "HTTP/1.1 200 OK");
    trickle.write_all(b"GET /a/next HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    parked(&gw, 1.0).await;
    // Each byte wakes the parked connection; none of them starts a request, so the
    // connection's deadline, kept across parking, still falls.
    let closed = async {
        let mut buf = [0u8; 256];
        loop {
            if trickle.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return;
            }
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(std::time::Duration::from_millis(200), trickle.read(&mut buf)).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed).await.expect("a trickling client is closed");
    assert_eq!(up.hits(), 1, "the trickled request never reached the upstream");
    parked(&gw, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_parked_connections_at_once() {
    let up = Upstream::start("up").await;
    // Time limits past the test's patience: only the drain can close the connection.
    let (_cfg, mut gw) =
        gateway(&up, &["--drain-timeout", "600s", "--header-read-timeout", "600s", "--idle-timeout", "600s"]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut s, "/a/x").await.0, "HTTP/1.1 200 OK");
    parked(&gw, 1.0).await;
    gw.sigterm();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("the parked connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without a byte");
    let status = gw.exited().await;
    assert!(status.success(), "a clean exit well within the 600 s drain: {status:?}\n{}", gw.logs());
}

/// A request that ends its connection (`Connection: close`, HTTP/1.0) answered before its
/// body has come: the rest of the body is never read as a next request, however long the
/// connection stays idle waiting for it (it is never parked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_a_body_after_a_closing_answer_is_never_read_as_a_request() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken}\n";
    cfg.write("apis.yaml", &(api("a", "/a/", &up.url(), auth) + &api("b", "/b/", &up.url(), "")));
    let gw = Gatehouse::start(cfg.path(), &["--workers", "1"]).await;

    // The body's second half is a request to an open API; the first half is sent now, and
    // the gateway refuses the request (no key) before the body has come.
    let smuggled = "GET /b/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut suspects = Vec::new();
    for (version, close) in [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head =
            format!("POST /a/x {version}\r\nHost: a\r\n{close}Content-Length: {}\r\n\r\nabcd", 4 + smuggled.len());
        s.write_all(head.as_bytes()).await.unwrap();
        assert!(read_response(&mut s).await.0.ends_with(" 401 Unauthorized"));
        suspects.push(s);
    }
    // Another connection on the same worker parks, twice: ticks enough for an idle
    // connection to park have passed since the suspects were answered, and only it is
    // parked (the gauge would read 2 or 3 otherwise).
    let mut control = TcpStream::connect(gw.addr).await.unwrap();
    for _ in 0..2 {
        assert_eq!(get_on(&mut control, "/b/control").await.0, "HTTP/1.1 200 OK");
        parked(&gw, 1.0).await;
    }
    for mut s in suspects {
        // Refused or read as body: either way not a request.
        let _ = s.write_all(smuggled.as_bytes()).await;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest)).await.expect("the connection closes");
        assert!(end.is_err() || rest.is_empty(), "nothing more is answered: {:?}", String::from_utf8_lossy(&rest));
    }
    assert_eq!(get_on(&mut control, "/b/after").await.0, "HTTP/1.1 200 OK");
    assert_eq!(up.hits(), 3, "only the control connection's requests reached the upstream");
}

/// Requests that turn keep-alive off (`Transfer-Encoding` beside `Content-Length`,
/// `Connection: close`, HTTP/1.0) answered by an upstream that goes on reading their
/// bodies: each connection stays open for its body, idle, and is never parked, so the body's
/// end and what follows it are never read as a next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_coming_after_a_keep_alive_off_answer_is_never_read_as_a_request() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &["--workers", "1"]).await;

    let smuggled = "GET /a/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let chunked = ("Transfer-Encoding: chunked\r\n", "4\r\nabcd\r\n", format!("0\r\n\r\n{smuggled}"));
    let variants = [
        ("HTTP/1.1", format!("{}Content-Length: 3\r\n", chunked.0), chunked.1, chunked.2.clone()),
        (
            "HTTP/1.1",
            format!("Connection: close\r\nContent-Length: {}\r\n", 4 + smuggled.len()),
            "abcd",
            smuggled.to_owned(),
        ),
        ("HTTP/1.0", format!("Content-Length: {}\r\n", 4 + smuggled.len()), "abcd", smuggled.to_owned()),
    ];
    let mut suspects = Vec::new();
    for (version, headers, first, rest) in variants {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("POST /a/early {version}\r\nHost: a\r\n{headers}\r\n{first}").as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut s).await;
        assert!(status.ends_with(" 200 OK") && body == "early", "{version} {headers:?}: {status} {body}");
        suspects.push((s, rest));
    }
    // Ticks enough for an idle connection to park pass (another one parks, twice), and
    // only that one is parked.
    let mut control = TcpStream::connect(gw.addr).await.unwrap();
    for _ in 0..2 {
        assert_eq!(get_on(&mut control, "/a/control").await.0, "HTTP/1.1 200 OK");
        parked(&gw, 1.0).await;
    }
    for (mut s, rest) in suspects {
        let _ = s.write_all(rest.as_bytes()).await;
        let mut after = Vec::new();
        let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut after)).await.expect("the connection closes");
        assert!(end.is_err() || after.is_empty(), "nothing more is answered: {:?}", String::from_utf8_lossy(&after));
    }
    assert_eq!(up.hits(), 5, "the three early requests and the control connection's two");
}

/// A closing response larger than the socket can hold, to a client that reads slowly:
/// hyper's buffered tail is flushed before the socket is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_response_reaches_a_slow_reader_whole() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = gateway(&up, &[]).await;
    let total = 48 * 1024 * 1024;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("GET /a/big?bytes={total} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // A slow client: the gateway's writes wait on it.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(PATIENCE * 4, read_all).await.expect("the response ends");
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &got[end..];
    let body = if String::from_utf8_lossy(&got[..end]).to_ascii_lowercase().contains("chunked") {
        dechunk_bytes(body)
    } else {
        body.to_vec()
    };
    assert_eq!(body.len(), total, "the whole body, then the close");
}

/// What parked connections gave back does not stay resident: the dataplane's allocator
/// (jemalloc) returns pages freed for a while to the kernel from its background thread.
/// With glibc's malloc the resident set stayed at its peak, the freed request buffers pinned
/// by the small allocations the parked connections kept between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_parked_connections_gave_back_leaves_the_process() {
    const N: u64 = 400;
    let up = Upstream::start("up").await;
    // The keep-alive wait (`--header-read-timeout`) outlasts the allocator's decay, so the
    // parked connections are still open, and served, at the end.
    let (_cfg, gw) = gateway(&up, &["--workers", "1", "--header-read-timeout", "600s", "--idle-timeout", "600s"]).await;
    let pid = gw.pid();
    gw.wait_until("the allocator's background thread", async || threads(pid).iter().any(|t| t == "jemalloc_bg_thd"))
        .await;

    let before = rss_kib(pid);
    let mut held = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        assert_eq!(get_on(&mut s, &format!("/a/{i}")).await.0, "HTTP/1.1 200 OK");
        held.push(s);
    }
    parked(&gw, N as f64).await;
    // Each connection had hyper's buffers until it parked (about 9 KiB of resident pages
    // each, measured).
    let peak = rss_kib(pid);
    assert!(peak >= before + N * 4, "{N} connections' buffers grew the resident set by {} KiB only", peak - before);

    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    let mut now = peak;
    while now > before + (peak - before) / 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {now} KiB resident {:?} after {N} connections parked (before them {before}, at their peak {peak})",
            PATIENCE * 3
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        now = rss_kib(pid);
    }
    // The parked connections are still served.
    for (i, s) in held.iter_mut().enumerate().step_by(50) {
        assert_eq!(get_on(s, &format!("/a/again/{i}")).await.0, "HTTP/1.1 200 OK");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn threads(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

fn dechunk_bytes(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + n]);
        b = &b[line + 2 + n + 2..];
    }
}
