//! `https://` upstreams: real TLS upstreams on loopback with certificates an rcgen CA signs
//! per test, behind the real binary. Verification against a private CA, the system's
//! roots, `serverName`, `insecureSkipVerify`, mTLS to the upstream, and Secrets that are
//! missing or change.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use common::{certs::*, *};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An HTTPS server on loopback answering JSON: the path, the SNI name the client sent and
/// the client certificate it presented (hex DER), if any.
struct TlsUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    async fn start(config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let conn = tls.get_ref().1;
                    let sni = conn.server_name().map(str::to_owned);
                    let client = conn.peer_certificates().and_then(|c| c.first()).map(|c| hex::encode(c.as_ref()));
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let body = serde_json::json!({"path": req.uri().path(), "sni": sni, "client": client});
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

fn tls_api(name: &str, upstream: &str, tls: &str) -> String {
    let tls = if tls.is_empty() { String::new() } else { format!("    tls: {{{tls}}}\n") };
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: /{name}/\n  upstream:\n    url: \"{upstream}\"\n{tls}"
    )
}

async fn state(gw: &Gatehouse, id: &str) -> String {
    let config = gw.config().await;
    let api = config["apis"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap_or_default();
    api["state"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_its_ca_and_refused_with_the_wrong_one() {
    let ca = Ca::new();
    let other = Ca::new();
    let upstream = TlsUpstream::start(ca.leaf(&["127.0.0.1", "localhost"]).server(None)).await;
    let plain = Upstream::start("plain").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            ca_secret("upstream-ca", &ca.pem),
            ca_secret("other-ca", &other.pem),
            tls_api("good", &upstream.url(), "caSecretRef: {name: upstream-ca}"),
            tls_api("wrong", &upstream.url(), "caSecretRef: {name: other-ca}"),
            // No caSecretRef: the system's roots, which do not hold the test CA.
            tls_api("system", &upstream.url(), ""),
            tls_api(
                "byname",
                &format!("https://localhost:{}", upstream.addr.port()),
                "caSecretRef: {name: upstream-ca}",
            ),
            api("plain", "/plain/", &plain.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/good/orders").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/orders");
    assert_eq!(r.json()["sni"], serde_json::Value::Null, "no SNI for an IP address");
    let r = gw.get("/byname/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["sni"], "localhost");

    for api in ["wrong", "system"] {
        let r = gw.get(&format!("/{api}/x")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{api}: {}", r.text());
        assert_eq!(r.error(), "upstream TLS handshake failed");
    }
    gw.wait_until("the refused certificates to be logged with rustls's reason", async || {
        gw.logs().matches("UnknownIssuer").count() >= 2
    })
    .await;
    assert_eq!(gw.metric("gatehouse_rejections_total{api=\"default/wrong\",reason=\"upstream_tls\"}").await, 1.0);
    assert_eq!(gw.get("/plain/x").await.status, StatusCode::OK, "other APIs keep serving");
    assert_eq!(gw.get("/good/again").await.status, StatusCode::OK, "pooled TLS connections are reused");
}

#[tokio::test]
async fn server_name_sets_sni_and_the_name_verified() {
    let ca = Ca::new();
    let upstream = TlsUpstream::start(ca.leaf(&["orders.internal"]).server(None)).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            ca_secret("ca", &ca.pem),
            tls_api("named", &upstream.url(), "caSecretRef: {name: ca}, serverName: orders.internal"),
            tls_api("unnamed", &upstream.url(), "caSecretRef: {name: ca}"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/named/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["sni"], "orders.internal");
    assert_eq!(
        gw.get("/unnamed/x").await.status,
        StatusCode::BAD_GATEWAY,
        "127.0.0.1 is not a name the certificate has"
    );
    gw.wait_until("the name mismatch to be logged", async || gw.logs().contains("certificate not valid for name"))
        .await;
}

#[tokio::test]
async fn insecure_skip_verify_takes_any_certificate_and_says_so_at_load() {
    let upstream = TlsUpstream::start(Ca::new().leaf(&["anything.test"]).server(None)).await;
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &tls_api("dev", &upstream.url(), "insecureSkipVerify: true"));
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/dev/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(gw.logs().contains("insecureSkipVerify: upstream certificates are not verified"), "{}", gw.logs());
}

#[tokio::test]
async fn the_gateway_presents_its_client_certificate_to_an_upstream_that_asks() {
    let ca = Ca::new();
    let client_ca = Ca::new();
    let upstream = TlsUpstream::start(ca.leaf(&["127.0.0.1"]).server(Some(&client_ca))).await;
    let client = client_ca.leaf(&["gatehouse.test"]);
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            ca_secret("ca", &ca.pem),
            tls_secret("gateway-client", &client.crt, &client.key, false),
            tls_api(
                "mtls",
                &upstream.url(),
                "caSecretRef: {name: ca}, clientCertificateSecretRef: {name: gateway-client}",
            ),
            tls_api("anonymous", &upstream.url(), "caSecretRef: {name: ca}"),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get("/mtls/x").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["client"], hex::encode(client.der.as_ref()), "the upstream saw the gateway's certificate");
    let r = gw.get("/anonymous/x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "the upstream refuses a client without a certificate");

    // The client key is in no log and not in /config.
    let shown = format!("{}\n{}", gw.logs(), gw.admin("/config").await.text());
    for line in client.key.lines().filter(|l| !l.starts_with("-----") && l.len() > 16) {
        assert!(!shown.contains(line), "key material leaked: {line}");
    }
}

#[tokio::test]
async fn a_missing_or_unusable_secret_keeps_the_api_out_and_others_serving_until_it_is_fixed() {
    let ca = Ca::new();
    let upstream = TlsUpstream::start(ca.leaf(&["127.0.0.1"]).server(None)).await;
    let plain = Upstream::start("plain").await;
    let cfg = ConfigDir::new();
    let apis = [
        tls_api("orders", &upstream.url(), "caSecretRef: {name: orders-ca}"),
        tls_api("pay", &upstream.url(), "caSecretRef: {name: ca}, clientCertificateSecretRef: {name: missing}"),
        api("plain", "/plain/", &plain.url(), ""),
    ]
    .concat();
    cfg.write("apis.yaml", &(apis.clone() + &ca_secret("orders-ca", "not a certificate") + &ca_secret("ca", &ca.pem)));
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let orders = state(&gw, "default/orders").await;
    assert!(orders.contains("spec.upstream.tls.caSecretRef") && orders.contains("ca.crt"), "{orders}");
    let pay = state(&gw, "default/pay").await;
    assert!(pay.contains("clientCertificateSecretRef") && pay.contains("default/missing"), "{pay}");
    assert_eq!(gw.get("/orders/x").await.status, StatusCode::NOT_FOUND);
    assert_eq!(gw.get("/plain/x").await.status, StatusCode::OK);

    // Fixing the Secret alone rebuilds the API.
    cfg.write("apis.yaml", &(apis + &ca_secret("orders-ca", &ca.pem) + &ca_secret("ca", &ca.pem)));
    gw.wait_until("orders to be served once its CA is fixed", async || {
        gw.get("/orders/x").await.status == StatusCode::OK
    })
    .await;
}
