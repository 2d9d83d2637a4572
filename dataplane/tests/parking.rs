//! Idle HTTP/1.1 keep-alive connections give their HTTP buffers back (they "park") and
//! are served again on the same socket: what a parked connection read while parked, and
//! what the client sent before it parked, reach the next request; a connection is never
//! parked while a response is still streaming; the time limits hold across parking; and a
//! drain closes parked connections. Waits are on conditions (the parked gauge, a reply).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PARKED: &str = "gatehouse_client_connections_parked";

/// Reads one HTTP/1.1 response, Content-Length or chunked; returns its status line and body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let lower = head.to_ascii_lowercase();
            let rest = &got[end + 4..];
            let body = if lower.contains("transfer-encoding: chunked") {
                rest.windows(5).position(|w| w == b"0\r\n\r\n").map(|_| dechunk(rest))
            } else {
                let len: usize = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                    .unwrap_or(0);
                (rest.len() >= len).then(|| String::from_utf8_lossy(&rest[..len]).into_owned())
            };
            if let Some(body) = body {
                got.drain(..end + 4);
                return (head.lines().next().unwrap_or_default().to_owned(), body);
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("no full response within {PATIENCE:?}; got {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("connection closed mid-response: {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn dechunk(mut b: &[u8]) -> String {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return String::from_utf8(out).unwrap();
        }
        out.extend_from_slice(&b[line + 2..line + 2 + n]);
        b = &b[line + 2 + n + 2..];
    }
}

async fn get_on(s: &mut TcpStream, path: &str) -> (String, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
    read_response(s).await
}

async fn gateway(up: &Upstream, extra: &[&str]) -> (ConfigDir, Gatehouse) {
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), extra).await;
    (cfg, gw)
}

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
    let n = tokio::time::timeout(PATIENCE, streaming.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("one"), "the first chunk came");

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
    let (_cfg, mut gw) = gateway(&up, &["--drain-timeout", "60s"]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(get_on(&mut s, "/a/x").await.0, "HTTP/1.1 200 OK");
    parked(&gw, 1.0).await;
    gw.sigterm();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("the parked connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without a byte");
    let status = gw.exited().await;
    assert!(status.success(), "a clean exit well within the 60 s drain: {status:?}\n{}", gw.logs());
}
