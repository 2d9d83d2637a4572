//! Request-path normalisation and the request authority, over real HTTP: the real binary,
//! a real upstream that echoes the path it got, and request-targets written byte for byte
//! on a TCP socket (an HTTP client library would normalise or refuse some of them).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

// ---------------------------------------------------------------- raw HTTP/1.1

/// A response read off the wire.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `GET <target> HTTP/1.1` exactly as written, with `headers` (each `Name: value`)
/// and `Connection: close`, and reads the whole answer.
async fn raw_get(addr: SocketAddr, target: &[u8], headers: &[&str]) -> Raw {
    let mut req = Vec::new();
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        req.extend_from_slice(h.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await.expect("the gateway answers and closes").unwrap();
    parse(&buf)
}

fn parse(buf: &[u8]) -> Raw {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{status_line}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &buf[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Raw { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..line_end]).split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

// ---------------------------------------------------------------- a lenient server

/// How a lenient upstream reads a path: percent-decodes twice, reads `\` as `/`, drops
/// `;parameters`, merges slashes and resolves dot-segments (never above the root).
fn lenient(path: &str) -> String {
    let twice = decode(&decode(path.as_bytes()));
    let text = String::from_utf8_lossy(&twice).replace('\\', "/");
    let mut segs: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg.split(';').next().unwrap() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    format!("/{}", segs.join("/"))
}

fn decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------- the corpus

/// What the gateway must do with a request-target sent without a key.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Forwarded through the keyless API; the normalised path (stripListenPath: false
    /// forwards it as is; true forwards it under the upstream base `/pub`).
    Pub(&'static str),
    /// Routed to the authToken API: 401 without a key, and with one the upstream gets this.
    Priv(&'static str),
    /// 404: no API.
    NoRoute,
    /// 400 from the gateway, JSON naming the reason.
    BadPath,
    /// 400 from the HTTP parser, before the chain: the request-target is not HTTP.
    NotHttp,
}

use Want::*;

const CORPUS: &[(&[u8], Want)] = &[
    // Already normal, and the listen-path boundaries.
    (b"/pub/x", Pub("/pub/x")),
    (b"/pub/", Pub("/pub/")),
    (b"/pub", Pub("/pub")),
    (b"/pubx", NoRoute),
    (b"/pubx/../pub/y", Pub("/pub/y")),
    (b"/pub/x/", Pub("/pub/x/")),
    (b"/pub/.../x", Pub("/pub/.../x")),
    (b"/pub/a%20b", Pub("/pub/a%20b")),
    (b"/pub/a;v=1/b", Pub("/pub/a;v=1/b")),
    (b"/pub/100%25", Pub("/pub/100%25")),
    (b"/priv/secret", Priv("/priv/secret")),
    // Dot-segments, raw.
    (b"/pub/../priv/secret", Priv("/priv/secret")),
    (b"/pub/./x", Pub("/pub/x")),
    (b"/pub/x/.", Pub("/pub/x/")),
    (b"/pub/x/..", Pub("/pub/")),
    (b"/pub/..", NoRoute),
    (b"/pub/a/../..", NoRoute),
    (b"/priv/../pub/x", Pub("/pub/x")),
    (b"/pub;x/../priv/secret", Priv("/priv/secret")),
    // Dot-segments, encoded, in every case mix.
    (b"/pub/%2e%2e/priv/secret", Priv("/priv/secret")),
    (b"/pub/%2E%2E/priv/secret", Priv("/priv/secret")),
    (b"/pub/%2E%2e/priv/secret", Priv("/priv/secret")),
    (b"/pub/.%2e/priv/secret", Priv("/priv/secret")),
    (b"/pub/%2e./priv/secret", Priv("/priv/secret")),
    (b"/pub/%2e/x", Pub("/pub/x")),
    (b"/p%75b/%41%7e", Pub("/pub/A~")),
    // Repeated slashes merge before dot-segments resolve, as a lenient server does.
    (b"//pub//x", Pub("/pub/x")),
    (b"/pub//../priv/secret", Priv("/priv/secret")),
    (b"/pub//..//priv//secret", Priv("/priv/secret")),
    // Climbing above the root.
    (b"/..", BadPath),
    (b"/pub/../../priv/secret", BadPath),
    (b"/pub/a/../../..", BadPath),
    (b"/%2e%2e/pub/x", BadPath),
    // Encoded separators and backslashes.
    (b"/pub/..%2fpriv/secret", BadPath),
    (b"/pub/..%2Fpriv/secret", BadPath),
    (b"/pub/%2e%2e%2fpriv/secret", BadPath),
    (b"/pub/..%5cpriv/secret", BadPath),
    (b"/pub/..%5Cpriv/secret", BadPath),
    (b"/pub/..\\priv/secret", BadPath),
    (b"/pub\\..\\priv\\secret", BadPath),
    (b"/pub/a%3b/../../priv/secret", BadPath),
    // Path parameters on dot or empty segments.
    (b"/pub/..;/priv/secret", BadPath),
    (b"/pub/..;x=1/priv/secret", BadPath),
    (b"/pub/.;x/secret", BadPath),
    (b"/pub/;x/../priv/secret", BadPath),
    (b"/pub/%2e%2e;/priv/secret", BadPath),
    // Double encoding, in the request and formed by decoding.
    (b"/pub/%252e%252e/priv/secret", BadPath),
    (b"/pub/%252E%252E/priv/secret", BadPath),
    (b"/pub/%252f", BadPath),
    (b"/pub/%25%32%65%25%32%65/priv/secret", BadPath),
    // Control bytes, encoded (raw ones are refused by the HTTP parser, below).
    (b"/pub/%00", BadPath),
    (b"/pub/x%00.json", BadPath),
    (b"/pub/%0a", BadPath),
    (b"/pub/%0D%0A", BadPath),
    (b"/pub/%7f", BadPath),
    // Invalid and overlong escapes.
    (b"/pub/%zz", BadPath),
    (b"/pub/%2", BadPath),
    (b"/pub/%", BadPath),
    (b"/pub/%u002e%u002e/priv/secret", BadPath),
    (b"/pub/%c0%ae%c0%ae/priv/secret", BadPath),
    (b"/pub/%e0%80%ae", BadPath),
    (b"/pub/%80", BadPath),
    // Unicode: valid UTF-8, raw or encoded, is an ordinary character.
    (b"/pub/caf%C3%A9", Pub("/pub/caf%C3%A9")),
    ("/pub/café".as_bytes(), Pub("/pub/café")),
    (b"/pub/%EF%BC%8E%EF%BC%8E/x", Pub("/pub/%EF%BC%8E%EF%BC%8E/x")),
    // Raw control bytes and spaces never get past the HTTP parser.
    (b"/pub/\x01", NotHttp),
    (b"/pub/\x7f/../../priv/secret", NotHttp),
];

/// The path the upstream gets for a normalised path under the pub or priv API.
fn upstream_path(normal: &str, prefix: &str, strip: bool) -> String {
    if !strip {
        return normal.to_owned();
    }
    let rest = normal.strip_prefix(prefix).unwrap();
    format!("{prefix}{}", if rest.is_empty() { "/" } else { rest })
}

/// A keyless API on `/pub/` and an authToken API on `/priv/`, in front of one upstream
/// that serves `/pub/...` and `/priv/...` whichever way the listen path is forwarded.
async fn layout(up: &Upstream, strip: bool, analytics: Option<&std::path::Path>) -> (ConfigDir, Gatehouse) {
    let cfg = ConfigDir::new();
    let u = up.url();
    let (pub_up, priv_up) = if strip { (format!("{u}/pub"), format!("{u}/priv")) } else { (u.clone(), u) };
    let strip_line = format!("  stripListenPath: {strip}\n");
    cfg.write(
        "apis.yaml",
        &[
            api("pub", "/pub/", &pub_up, &strip_line),
            api("priv", "/priv/", &priv_up, &format!("{strip_line}  auth: {{type: authToken}}\n")),
            key("k", "k1", "accessRights: [priv]"),
        ]
        .concat(),
    );
    let extra = analytics.map(|p| format!("--analytics=file:{}", p.display()));
    let gw = Gatehouse::start(cfg.path(), &extra.iter().map(String::as_str).collect::<Vec<_>>()).await;
    (cfg, gw)
}

async fn run_corpus(strip: bool) {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = layout(&up, strip, None).await;
    let host = "Host: gw.test";
    let mut bad = 0.0;
    for (target, want) in CORPUS {
        let shown = String::from_utf8_lossy(target);
        let ctx = format!("GET {shown:?} (stripListenPath: {strip}, want {want:?})");
        let hits = up.hits();
        let r = raw_get(gw.addr, target, &[host]).await;
        match *want {
            Pub(normal) => {
                assert_eq!(r.status, 200, "{ctx}: {}", String::from_utf8_lossy(&r.body));
                let j = r.json();
                let got = j["path"].as_str().unwrap();
                assert_eq!(got, upstream_path(normal, "/pub", strip), "{ctx}: the path the upstream got");
                let seen = lenient(got);
                assert!(seen == "/pub" || seen.starts_with("/pub/"), "{ctx}: a lenient upstream reads {seen}");
            }
            Priv(normal) => {
                assert_eq!(r.status, 401, "{ctx}: {}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.json()["error"], "authorization field missing", "{ctx}");
                assert_eq!(up.hits(), hits, "{ctx}: the private upstream was reached without a key");
                // With a key the same target reaches the private API, normalised.
                let r = raw_get(gw.addr, target, &[host, "Authorization: k1"]).await;
                assert_eq!(r.status, 200, "{ctx} with a key");
                assert_eq!(r.json()["path"], upstream_path(normal, "/priv", strip), "{ctx} with a key");
            }
            NoRoute => {
                assert_eq!(r.status, 404, "{ctx}");
                assert_eq!(r.json()["error"], "no API matches this request", "{ctx}");
                assert_eq!(up.hits(), hits, "{ctx}");
            }
            BadPath => {
                assert_eq!(r.status, 400, "{ctx}: {}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.header("content-type"), Some("application/json"), "{ctx}");
                let msg = r.json()["error"].as_str().unwrap().to_owned();
                assert!(msg.starts_with("bad request path: "), "{ctx}: {msg}");
                assert_eq!(up.hits(), hits, "{ctx}");
                bad += 1.0;
            }
            NotHttp => {
                assert_eq!(r.status, 400, "{ctx}");
                assert_eq!(up.hits(), hits, "{ctx}");
            }
        }
    }
    // Every refusal is counted, and the APIs keep serving.
    assert_eq!(gw.metric(r#"gatehouse_rejections_total{api="",reason="bad_path"}"#).await, bad);
    assert_eq!(gw.get("/pub/still-fine").await.status, StatusCode::OK);
    let r = gw.get_with("/priv/still-fine", &[("authorization", "k1")]).await;
    assert_eq!((r.status, r.json()["path"].as_str()), (StatusCode::OK, Some("/priv/still-fine")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_is_normalised_or_refused_with_the_listen_path_stripped() {
    run_corpus(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_is_normalised_or_refused_with_the_listen_path_kept() {
    run_corpus(false).await;
}

#[test]
fn the_lenient_model_reads_the_old_bypasses_as_the_private_api() {
    // What the corpus guards against: each of these, forwarded as sent, is private.
    for p in ["/pub/../priv/s", "/pub/..%2fpriv/s", "/pub/%252e%252e/priv/s", "/pub/..;/priv/s", "/pub\\..\\priv/s"] {
        assert_eq!(lenient(p), "/priv/s", "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings_are_forwarded_as_sent() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = layout(&up, true, None).await;
    let r = raw_get(gw.addr, b"/pub/%2e/x?q=/../priv&r=%2e%2e&s=%2f", &["Host: gw.test"]).await;
    let j = r.json();
    assert_eq!((j["path"].as_str(), j["query"].as_str()), (Some("/pub/x"), Some("q=/../priv&r=%2e%2e&s=%2f")));
    let r = raw_get(gw.addr, b"/pub/%2e%2e/priv/s?a=1", &["Host: gw.test", "Authorization: k1"]).await;
    let j = r.json();
    assert_eq!((j["path"].as_str(), j["query"].as_str()), (Some("/priv/s"), Some("a=1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_see_the_normalised_path_and_the_refusal_reason() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("analytics.jsonl");
    let (_cfg, gw) = layout(&up, false, Some(&out)).await;
    assert_eq!(raw_get(gw.addr, b"/pub/a/%2e%2e/b", &["Host: gw.test"]).await.status, 200);
    assert_eq!(raw_get(gw.addr, b"/pub/..%2f", &["Host: gw.test"]).await.status, 400);
    let records: Vec<serde_json::Value> =
        wait_for_lines(&out, 2).await.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!((records[0]["path"].as_str(), records[0]["api_id"].as_str()), (Some("/pub/b"), Some("default/pub")));
    assert_eq!((records[1]["status"].as_u64(), records[1]["error"].as_str()), (Some(400), Some("bad_path")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_that_would_change_the_route_are_refused() {
    // A catch-all keyless API beside a private one: a server that drops `;x` would read
    // `/priv;x/secret` as the private `/priv/secret`, so the gateway must not send it to `/`.
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let u = up.url();
    cfg.write(
        "apis.yaml",
        &[
            api("all", "/", &u, "  stripListenPath: false\n"),
            api("priv", "/priv/", &u, "  stripListenPath: false\n  auth: {type: authToken}\n"),
            api("deep", "/a/b/", &u, "  stripListenPath: false\n  auth: {type: authToken}\n"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let host = "Host: gw.test";
    for target in [&b"/priv;x/secret"[..], b"/priv;jsessionid=1", b"/a;x/b/c", b"/a/b;x/c"] {
        let r = raw_get(gw.addr, target, &[host]).await;
        let shown = String::from_utf8_lossy(target);
        assert_eq!(r.status, 400, "{shown}");
        assert_eq!(
            r.json()["error"],
            "bad request path: without its ;parameters it would match another API",
            "{shown}"
        );
    }
    assert_eq!(up.hits(), 0);
    // Parameters that keep the route are forwarded as sent.
    let r = raw_get(gw.addr, b"/files;v=2/x;jsessionid=1", &[host]).await;
    assert_eq!(r.json()["path"], "/files;v=2/x;jsessionid=1");
    let r = raw_get(gw.addr, b"/priv/x;v=1", &[host]).await;
    assert_eq!(r.status, 401);
}

// ---------------------------------------------------------------- the authority

/// `/h/` three times: for `a.example`, for `b.example`, and for any host. Each forwards
/// under its own upstream base, so the path tells which one answered.
async fn hosted(up: &Upstream) -> (ConfigDir, Gatehouse) {
    let cfg = ConfigDir::new();
    let u = up.url();
    cfg.write(
        "apis.yaml",
        &[
            api("a", "/h/", &format!("{u}/a"), "  hosts: [a.example]\n"),
            api("b", "/h/", &format!("{u}/b"), "  hosts: [b.example]\n"),
            api("any", "/h/", &format!("{u}/any"), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    (cfg, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_wins_over_host() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = hosted(&up).await;
    let addr = gw.addr;
    let at = async |t: &[u8], h: &str| raw_get(addr, t, &[h]).await;

    let r = at(b"/h/x", "Host: b.example").await;
    assert_eq!(r.json()["path"], "/b/x", "origin form: Host routes");
    let r = at(b"http://a.example/h/x", "Host: b.example").await;
    let j = r.json();
    assert_eq!(j["path"], "/a/x", "absolute form: its authority routes, not Host");
    assert_eq!(j["headers"]["x-forwarded-host"], "a.example");
    let r = at(b"http://A.Example:8080/h/x", "Host: b.example").await;
    assert_eq!(r.json()["path"], "/a/x", "case and port are ignored");
    let r = at(b"http://c.example/h/x", "Host: a.example").await;
    assert_eq!(r.json()["path"], "/any/x", "an unknown authority does not fall back to Host");
    // The absolute form's path is normalised like any other.
    let r = at(b"http://a.example/h/%2e%2e/h/y/./z?q=1", "Host: b.example").await;
    let j = r.json();
    assert_eq!((j["path"].as_str(), j["query"].as_str()), (Some("/a/y/z"), Some("q=1")));
    let r = at(b"http://a.example/h/..%2f", "Host: b.example").await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_wins_over_host_and_host_serves_without_it() {
    let up = Upstream::start("up").await;
    let (_cfg, gw) = hosted(&up).await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut send = async |uri: &str, host: Option<&str>| {
        let mut b = Request::get(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        let resp = h2.send_request(b.body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let (parts, body) = resp.into_parts();
        let body: Bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        (parts.status, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
    };

    let (s, j) = send("http://a.example/h/x", Some("b.example")).await;
    assert_eq!((s, j["path"].as_str()), (StatusCode::OK, Some("/a/x")), ":authority routes, not Host");
    assert_eq!(j["headers"]["x-forwarded-host"], "a.example");
    let (_, j) = send("http://b.example/h/%2e%2e/h/y", None).await;
    assert_eq!(j["path"], "/b/y", ":authority alone, path normalised");
    let (_, j) = send("/h/x", Some("b.example")).await;
    assert_eq!(j["path"], "/b/x", "no :authority: Host routes");
    let (s, _) = send("http://a.example/h/..%2f", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
