//! WebSockets through the gateway, over real TCP on loopback: a tungstenite echo server
//! behind the real binary, tungstenite clients in front. The upgrade request runs the
//! chain (auth, limits); the tunnel counts as a client connection and has an idle timeout.
#![allow(clippy::unwrap_used)]
// tungstenite's handshake callback returns its own (large) error response type.
#![allow(clippy::result_large_err)]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use common::*;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, handshake::server as ws_server},
};

/// A WebSocket server on loopback: its first message names the path and the
/// `x-forwarded-for` the upgrade request came with, then it echoes every message.
struct EchoServer {
    addr: SocketAddr,
    /// Headers of every upgrade request it accepted.
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut path = String::new();
                    let callback = |req: &ws_server::Request, resp: ws_server::Response| {
                        path = req.uri().path().to_owned();
                        s.lock().unwrap().push(req.headers().clone());
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { return };
                    if ws.send(Message::text(format!("path={path}"))).await.is_err() {
                        return;
                    }
                    while let Some(Ok(m)) = ws.next().await {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to the gateway at `path`, with extra request headers.
async fn connect(gw: &Gatehouse, path: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}{path}", gw.addr).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    tokio_tungstenite::client_async(req, tcp).await.map(|(ws, _)| ws)
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The HTTP status a refused handshake got.
fn refused_with(r: Result<Ws, tungstenite::Error>) -> StatusCode {
    match r {
        Err(tungstenite::Error::Http(resp)) => resp.status(),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

#[tokio::test]
async fn messages_pass_both_ways_and_other_apis_keep_serving() {
    let echo = EchoServer::start().await;
    let plain = Upstream::start("plain").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &(api("ws", "/ws/", &echo.url(), "  stripListenPath: true\n") + &api("plain", "/plain/", &plain.url(), "")),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let mut ws = connect(&gw, "/ws/chat", &[]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "path=/chat", "the upstream sees the path as for any request");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    let blob: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.as_ref(), blob.as_slice()),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    let headers = echo.seen.lock().unwrap()[0].clone();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["upgrade"], "websocket");

    // The tunnel holds its client connection: it is counted while open.
    assert_eq!(gw.metric("gatehouse_client_connections").await, 1.0);
    assert_eq!(gw.get("/plain/x").await.status, StatusCode::OK, "other APIs serve while a tunnel is open");
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still here");

    ws.close(None).await.unwrap();
    drop(ws);
    gw.wait_until("the closed tunnel's connection to be released", async || {
        // The test client's own keep-alive connection to /plain/ stays open.
        gw.metric("gatehouse_client_connections").await <= 1.0
    })
    .await;
}

#[tokio::test]
async fn the_upgrade_request_runs_the_chain_auth_and_rate_limit() {
    let echo = EchoServer::start().await;
    let cfg = ConfigDir::new();
    let auth = "  auth: {type: authToken, authToken: {header: X-Api-Key}}\n";
    cfg.write(
        "apis.yaml",
        &(api("ws", "/ws/", &echo.url(), auth) + &key("alice", "alice-token", "rate: 2\nper: 1m\naccessRights: [ws]")),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    assert_eq!(refused_with(connect(&gw, "/ws/", &[]).await), StatusCode::UNAUTHORIZED);
    assert_eq!(refused_with(connect(&gw, "/ws/", &[("x-api-key", "wrong")]).await), StatusCode::UNAUTHORIZED);
    assert!(echo.seen.lock().unwrap().is_empty(), "refused upgrades never reach the upstream");

    let mut ws = connect(&gw, "/ws/", &[("x-api-key", "alice-token")]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "path=/");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "ping");
    // Messages inside a tunnel are not requests: only upgrades count against the key's rate.
    let _second = connect(&gw, "/ws/", &[("x-api-key", "alice-token")]).await.unwrap();
    assert_eq!(
        refused_with(connect(&gw, "/ws/", &[("x-api-key", "alice-token")]).await),
        StatusCode::TOO_MANY_REQUESTS
    );
    ws.send(Message::text("open tunnels keep working")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "open tunnels keep working");
}

#[tokio::test]
async fn an_idle_tunnel_is_closed() {
    let echo = EchoServer::start().await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("ws", "/ws/", &echo.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &["--idle-timeout", "1s"]).await;

    let mut ws = connect(&gw, "/ws/", &[]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "path=/");
    // Nothing moves: the gateway closes the tunnel after one to two idle timeouts.
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
        other => panic!("expected the tunnel to close, got {other:?}"),
    }
    gw.wait_until("the idle tunnel's connection to be released", async || {
        gw.metric("gatehouse_client_connections").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn on_sigterm_open_tunnels_keep_working_for_the_drain_then_close() {
    let echo = EchoServer::start().await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("ws", "/ws/", &echo.url(), ""));
    let mut gw = Gatehouse::start(cfg.path(), &["--drain-timeout", "1s"]).await;

    let mut ws = connect(&gw, "/ws/", &[]).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "path=/");
    gw.sigterm();
    gw.wait_until("the drain to start", async || gw.logs().contains("shutting down: draining")).await;
    ws.send(Message::text("during the drain")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "during the drain", "the drain waits for open tunnels");
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {}
        other => panic!("expected the tunnel to close at the end of the drain, got {other:?}"),
    }
    assert!(gw.exited().await.success());
}

/// An upstream that answers every request with a `101` whose `Sec-WebSocket-Accept` is
/// wrong, then would serve plain HTTP on the same connection: what a raw pipe to it would
/// let a client reach past the chain.
async fn fake_101_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let Ok(n) = tcp.read(&mut buf).await else { return };
                if n == 0 {
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")
                    .await;
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nsecrets").await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_101_that_does_not_complete_the_handshake_is_a_502_not_a_pipe() {
    let (fake, _task) = fake_101_upstream().await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("fake", "/fake/", &format!("http://{fake}"), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(refused_with(connect(&gw, "/fake/", &[]).await), StatusCode::BAD_GATEWAY);
    gw.wait_for_log_containing("without completing the WebSocket handshake").await;
}

#[tokio::test]
async fn an_upstream_that_does_not_upgrade_answers_as_usual_and_other_upgrades_are_not_passed_on() {
    let plain = Upstream::start("plain").await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("plain", "/plain/", &plain.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    // A plain HTTP server answers a WebSocket handshake with 200: the client gets that.
    assert_eq!(refused_with(connect(&gw, "/plain/ws", &[]).await), StatusCode::OK);

    let ask = |upgrade: &'static str| {
        Request::get(gw.url("/plain/x"))
            .header("connection", "upgrade")
            .header("upgrade", upgrade)
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(empty())
            .unwrap()
    };
    let seen = gw.send(ask("websocket")).await.json();
    assert_eq!(seen["headers"]["upgrade"], "websocket", "{seen}");
    assert_eq!(seen["headers"]["connection"], "upgrade", "{seen}");
    let seen = gw.send(ask("h2c")).await.json();
    assert!(seen["headers"].get("upgrade").is_none(), "only WebSocket upgrades pass: {seen}");
    assert!(seen["headers"].get("connection").is_none(), "{seen}");
}
