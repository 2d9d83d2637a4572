//! The config server (`/v1/stream`, `/v1/ack`) and the admin server (`/metrics`,
//! `/healthz`, `/readyz`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use gatehouse_crds::{
    protocol::{ACK_PATH, Ack, Delta, STREAM_PATH},
    snapshot::Snapshot,
};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Channel, Full, Limited, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{broadcast::error::RecvError, mpsc, watch},
};

use crate::{
    acks::Acks,
    auth::{Authenticator, Identity},
    hub::Hub,
    leader::Leadership,
    metrics::Metrics,
    watch::{State, lock},
};

type Body = BoxBody<Bytes, Infallible>;

/// Sent on an idle stream, so both ends notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(10);
/// An ack of 10,000 APIs is under 1 MiB; a bigger one is refused unread.
const MAX_ACK: usize = 8 * 1024 * 1024;

pub struct ConfigServer {
    pub hub: Arc<Hub>,
    pub acks: Arc<Acks>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub leadership: watch::Receiver<Leadership>,
    /// This replica's ack address, as published on the Lease.
    pub address: String,
    /// Acks to forward to the leader, in the order they came: a full ack overtaken by a
    /// partial one would undo it.
    pub forward: mpsc::Sender<Forward>,
}

/// An ack on its way to the leader: its address, the dataplane's Authorization, the body.
pub type Forward = (String, Option<String>, Bytes);

/// How acks reach the leader: over TLS when the config stream is served over TLS.
pub enum Forwarding {
    Plain(HttpClient<HttpConnector, Full<Bytes>>),
    Tls(crate::tls::ForwardClient),
}

impl Forwarding {
    pub fn plain() -> Self {
        Forwarding::Plain(HttpClient::builder(TokioExecutor::new()).build_http())
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match self {
            Forwarding::Plain(c) => c.request(req).await,
            Forwarding::Tls(c) => c.request(req).await,
        }
    }

    fn scheme(&self) -> &'static str {
        match self {
            Forwarding::Plain(_) => "http",
            Forwarding::Tls(_) => "https",
        }
    }
}

/// Forwards acks one at a time, in order; drops them when the leader is unreachable (the
/// dataplanes' next full ack repairs it).
pub async fn forwarder(mut rx: mpsc::Receiver<Forward>, client: Forwarding) {
    while let Some((addr, auth, body)) = rx.recv().await {
        let mut req = Request::post(format!("{}://{addr}{ACK_PATH}", client.scheme()))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let Ok(req) = req.body(Full::new(body)) else { continue };
        match tokio::time::timeout(Duration::from_secs(5), client.send(req)).await {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => tracing::warn!(status = %r.status(), %addr, "the leader refused a forwarded ack"),
            Ok(Err(e)) => tracing::debug!(error = %e, %addr, "forwarding an ack to the leader"),
            Err(_) => tracing::debug!(%addr, "forwarding an ack to the leader timed out"),
        }
    }
}

/// Borrowing twin of `protocol::StreamMessage`, to send deltas without copying them.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Out<'a> {
    Snapshot { snapshot: &'a Snapshot },
    Delta(&'a Delta),
    Ping,
}

fn line(m: &Out<'_>) -> Bytes {
    let mut v = serde_json::to_vec(m).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn json(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

impl ConfigServer {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let route = (req.method().clone(), req.uri().path().to_owned());
        if route.1 != STREAM_PATH && route.1 != ACK_PATH {
            return json(StatusCode::NOT_FOUND, "not found");
        }
        let identity = match self.auth.check(auth.as_deref(), peer.ip()).await {
            Ok(i) => i,
            Err(e) => {
                self.metrics.refused_clients.inc();
                tracing::warn!(reason = %e, "config client refused");
                return json(e.status(), &e.to_string());
            }
        };
        match route {
            (Method::GET, p) if p == STREAM_PATH => self.stream(&identity.user),
            (Method::POST, p) if p == ACK_PATH => self.ack(req, auth, &identity).await,
            _ => json(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    }

    fn stream(self: &Arc<Self>, user: &str) -> Response<Body> {
        let (snapshot, mut rx) = self.hub.subscribe();
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(64);
        let me = self.clone();
        let user = user.to_owned();
        tokio::spawn(async move {
            me.metrics.streams.inc();
            tracing::info!(%user, version = snapshot.version, "dataplane connected");
            let mut ok = tx.send_data(line(&Out::Snapshot { snapshot: &snapshot })).await.is_ok();
            drop(snapshot);
            let mut ping = tokio::time::interval(PING_EVERY);
            ping.tick().await;
            while ok {
                ok = tokio::select! {
                    d = rx.recv() => match d {
                        Ok(d) => tx.send_data(line(&Out::Delta(&d))).await.is_ok(),
                        Err(RecvError::Lagged(_)) => {
                            // Too far behind for deltas: start again from the whole state.
                            let (snapshot, fresh) = me.hub.subscribe();
                            rx = fresh;
                            tx.send_data(line(&Out::Snapshot { snapshot: &snapshot })).await.is_ok()
                        }
                        Err(RecvError::Closed) => false,
                    },
                    _ = ping.tick() => tx.send_data(line(&Out::Ping)).await.is_ok(),
                };
            }
            me.metrics.streams.dec();
            tracing::info!(%user, "dataplane disconnected");
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
        r
    }

    async fn ack(&self, req: Request<Incoming>, auth: Option<String>, identity: &Identity) -> Response<Body> {
        let body = match Limited::new(req.into_body(), MAX_ACK).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return json(StatusCode::BAD_REQUEST, "ack body unreadable or too large"),
        };
        let ack: Ack = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return json(StatusCode::BAD_REQUEST, &format!("not an ack: {e}")),
        };
        if let Err(e) = identity.may_ack_for(&ack.node) {
            self.metrics.refused_clients.inc();
            tracing::warn!(reason = %e, user = %identity.user, "ack refused");
            return json(e.status(), &e.to_string());
        }
        self.acks.record(ack);
        let leader = self.leadership.borrow().clone();
        if let Some(addr) = leader.leader_address.filter(|a| !leader.is_leader && *a != self.address) {
            // The leader writes status: it needs every dataplane's ack.
            if self.forward.try_send((addr, auth, body)).is_err() {
                tracing::warn!("ack forwarding queue full; dropping an ack");
            }
        }
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    }
}

pub fn admin(state: &State, metrics: &Metrics, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics.render())).boxed());
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(prometheus::TEXT_FORMAT));
            r
        }
        "/healthz" => json(StatusCode::OK, "").map(|_| Full::new(Bytes::from_static(br#"{"status":"ok"}"#)).boxed()),
        "/readyz" => {
            let (synced, all) = {
                let s = lock(state);
                (s.synced.len(), s.watched)
            };
            if synced == all && all > 0 {
                json(StatusCode::OK, "").map(|_| Full::new(Bytes::from_static(br#"{"status":"ready"}"#)).boxed())
            } else {
                json(StatusCode::SERVICE_UNAVAILABLE, &format!("initial lists: {synced}/{all} kinds done"))
            }
        }
        _ => json(StatusCode::NOT_FOUND, "not found"),
    }
}

/// A TLS handshake that takes longer is given up: a client that stalls it holds a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 and HTTP/2 on `listener` (over TLS when `tls` is given) until the process
/// ends.
pub async fn serve<H, F>(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let fut = handler(req, peer);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let served = match tls {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => builder.serve_connection(TokioIo::new(stream), svc).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
