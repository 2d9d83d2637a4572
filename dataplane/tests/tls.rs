//! Client-facing TLS on `--tls-listen`: real handshakes on loopback with a rustls client,
//! against certificates an rcgen CA signs for each test.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, sync::Arc};

use common::{certs::*, *};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

// ---------------------------------------------------------------- certificates

fn secret_of(name: &str, leaf: &Leaf, default: bool) -> String {
    tls_secret(name, &leaf.crt, &leaf.key, default)
}

fn tls_api(name: &str, upstream: &str, hosts: &str, secret: &str, redirect: bool) -> String {
    let redirect = if redirect { ", redirectHttp: true" } else { "" };
    api(
        name,
        &format!("/{name}/"),
        upstream,
        &format!("  hosts: [{hosts}]\n  tls: {{secretName: {secret}{redirect}}}\n"),
    )
}

/// The base64 lines of a PEM key: what must never show up anywhere.
fn key_lines(pem: &str) -> Vec<String> {
    pem.lines().filter(|l| !l.starts_with("-----") && l.len() > 16).map(str::to_owned).collect()
}

// ---------------------------------------------------------------- client

async fn connect(addr: SocketAddr, config: Arc<ClientConfig>, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await
}

fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

struct Answer {
    status: StatusCode,
    version: Version,
    body: String,
}

impl Answer {
    fn upstream_header(&self, name: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body));
        v["headers"][name].as_str().unwrap_or_default().to_owned()
    }
}

async fn read(resp: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
    Answer { status: parts.status, version: parts.version, body }
}

/// An HTTP/1.1 connection over TLS, kept open for several requests.
struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl H1 {
    async fn open(stream: TlsStream<TcpStream>) -> Self {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut b = Request::get(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.sender.ready().await.unwrap();
        read(self.sender.send_request(b.body(Empty::new()).unwrap()).await.unwrap()).await
    }
}

async fn h2_get(stream: TlsStream<TcpStream>, host: &str, path: &str) -> Answer {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{host}{path}")).body(Empty::<Bytes>::new()).unwrap();
    read(sender.send_request(req).await.unwrap()).await
}

async fn start(cfg: &ConfigDir, extra: &[&str]) -> (Gatehouse, SocketAddr) {
    let mut args = vec!["--tls-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let gw = Gatehouse::start(cfg.path(), &args).await;
    let tls = gw.tls.expect("a --tls-listen address in the startup line");
    (gw, tls)
}

/// One API on `a.test` over TLS with its own certificate (`leaf`), served with `extra`;
/// bind `_up` and `_cfg` by name: the upstream and the config must outlive the test.
struct ATest {
    _up: Upstream,
    _cfg: ConfigDir,
    ca: Ca,
    leaf: Leaf,
    gw: Gatehouse,
    tls: SocketAddr,
}

async fn serve_a_test(extra: &[&str]) -> ATest {
    let up = Upstream::start("up").await;
    let ca = Ca::new();
    let leaf = ca.leaf(&["a.test"]);
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[tls_api("a", &up.url(), "a.test", "a-cert", false), secret_of("a-cert", &leaf, false)].concat(),
    );
    let (gw, tls) = start(&cfg, extra).await;
    ATest { _up: up, _cfg: cfg, ca, leaf, gw, tls }
}

fn certificate_state(config: &serde_json::Value, id: &str) -> String {
    config["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .map_or_else(|| panic!("no certificate {id} in {config}"), |c| c["state"].as_str().unwrap().to_owned())
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_apis_certificate_then_a_wildcard_then_the_default() {
    let up = Upstream::start("up").await;
    let ca = Ca::new();
    let (a, b, wild, def) =
        (ca.leaf(&["a.test"]), ca.leaf(&["b.test"]), ca.leaf(&["*.wild.test"]), ca.leaf(&["default.test"]));
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            tls_api("a", &up.url(), "a.test", "a-cert", false),
            tls_api("b", &up.url(), "b.test", "b-cert", false),
            tls_api("w", &up.url(), "api.wild.test", "wild-cert", false),
        ]
        .concat(),
    );
    cfg.write(
        "certs.yaml",
        &[
            secret_of("a-cert", &a, false),
            secret_of("b-cert", &b, false),
            secret_of("wild-cert", &wild, false),
            secret_of("fallback", &def, true),
        ]
        .concat(),
    );
    let (gw, tls) = start(&cfg, &[]).await;
    let config = gw.config().await;
    for id in ["default/a", "default/b", "default/w"] {
        assert_eq!(api_state(&config, id), "serving", "{config}");
    }

    let client = ca.client(&[b"http/1.1"], true);
    for (name, want) in [
        ("a.test", &a),
        ("b.test", &b),
        ("api.wild.test", &wild),
        ("other.wild.test", &wild),
        ("unknown.test", &def),
        ("x.api.wild.test", &def),
    ] {
        // The client checks the chain against the CA; names the served certificate does
        // not cover are checked by hand below, so verification is for covered names only.
        let config = if std::ptr::eq(want, &def) && name != "default.test" {
            insecure_client(&[b"http/1.1"], true)
        } else {
            client.clone()
        };
        let s = connect(tls, config, name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(served(&s), want.der, "{name} got another certificate");
    }
    // No SNI at all: the default.
    let s = connect(tls, ca.client(&[b"http/1.1"], false), "default.test").await.unwrap();
    assert_eq!(served(&s), def.der);

    // Requests go through the same chain as plain HTTP.
    let mut a_conn = H1::open(connect(tls, client.clone(), "a.test").await.unwrap()).await;
    let r = a_conn.get("a.test", "/a/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = a_conn.get("b.test", "/b/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "a host routes by Host, whichever certificate the handshake chose");
}

/// A client that accepts any certificate: for names the served certificate does not
/// cover (the default one), where the test compares the certificate itself.
fn insecure_client(alpn: &[&[u8]], sni: bool) -> Arc<ClientConfig> {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c.enable_sni = sni;
    Arc::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_certificate_unknown_names_and_no_sni_fail_the_handshake() {
    let ATest { _up, _cfg, ca, leaf: a, gw: _gw, tls } = serve_a_test(&[]).await;
    let any = insecure_client(&[b"http/1.1"], true);
    let e = connect(tls, any.clone(), "unknown.test").await.expect_err("no certificate for this name");
    assert!(e.to_string().contains("alert"), "the gateway refuses with an alert: {e}");
    connect(tls, insecure_client(&[b"http/1.1"], false), "a.test").await.expect_err("no SNI, no default");
    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.expect("a.test still works");
    assert_eq!(served(&s), a.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http1_by_alpn_carry_x_forwarded_proto_https_and_plain_http_says_http() {
    let ATest { _up, _cfg, ca, leaf: _, gw, tls } = serve_a_test(&[]).await;

    let s = connect(tls, ca.client(&[b"h2", b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let r = h2_get(s, "a.test", "/a/x").await;
    assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_2), "{}", r.body);
    assert_eq!(r.upstream_header("x-forwarded-proto"), "https");

    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = H1::open(s).await.get("a.test", "/a/x", &[("x-forwarded-proto", "http")]).await;
    assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_11));
    assert_eq!(r.upstream_header("x-forwarded-proto"), "https", "the client's own claim is overwritten");

    // No ALPN at all: HTTP/1.1.
    let s = connect(tls, ca.client(&[], true), "a.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);

    let r = gw.get_with("/a/x", &[("host", "a.test"), ("x-forwarded-proto", "https")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "http", "plain HTTP never passes as https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_redirecting_api_gets_308_to_the_tls_port() {
    let up = Upstream::start("up").await;
    let ca = Ca::new();
    let r = ca.leaf(&["r.test", "plain.test"]);
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            tls_api("r", &up.url(), "r.test", "r-cert", true),
            tls_api("p", &up.url(), "plain.test", "r-cert", false),
            secret_of("r-cert", &r, false),
        ]
        .concat(),
    );
    let (gw, tls) = start(&cfg, &[]).await;
    let resp = gw.get_with("/r/x/y?q=1&b=2", &[("host", "R.test:8080")]).await;
    assert_eq!(resp.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.header("location"), format!("https://r.test:{}/r/x/y?q=1&b=2", tls.port()));
    assert_eq!(up.hits(), 0, "the upstream never sees a request sent in the clear");
    assert_eq!(gw.get_with("/p/x", &[("host", "plain.test")]).await.status, StatusCode::OK, "no redirect asked");

    let s = connect(tls, ca.client(&[b"http/1.1"], true), "r.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("r.test", "/r/x", &[]).await.status, StatusCode::OK, "over TLS: served");

    // Behind a load balancer that maps 443 to --tls-listen: no port in the URL.
    drop(gw);
    let (gw, _) = start(&cfg, &["--tls-redirect-port", "443"]).await;
    let resp = gw.get_with("/r/x", &[("host", "r.test")]).await;
    assert_eq!(resp.header("location"), "https://r.test/r/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_reported_and_other_apis_keep_serving_over_tls_without_leaking_keys() {
    let up = Upstream::start("up").await;
    let ca = Ca::new();
    let (a, other, narrow) = (ca.leaf(&["a.test"]), ca.leaf(&["m.test"]), ca.leaf(&["elsewhere.test"]));
    let analytics = tempfile::NamedTempFile::new().unwrap();
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            tls_api("a", &up.url(), "a.test", "a-cert", false),
            tls_api("g", &up.url(), "g.test", "garbage", false),
            tls_api("m", &up.url(), "m.test", "mismatched", false),
            tls_api("c", &up.url(), "c.test", "narrow", false),
            tls_api("x", &up.url(), "x.test", "missing", false),
        ]
        .concat(),
    );
    cfg.write(
        "certs.yaml",
        &[
            secret_of("a-cert", &a, false),
            tls_secret("garbage", "not a certificate", &other.key, false),
            tls_secret("mismatched", &other.crt, &a.key, false),
            secret_of("narrow", &narrow, false),
        ]
        .concat(),
    );
    let (gw, tls) = start(&cfg, &[&format!("--analytics=file:{}", analytics.path().display())]).await;
    let config = gw.config().await;
    assert_eq!(api_state(&config, "default/a"), "serving");
    assert_eq!(
        certificate_state(&config, "default/garbage"),
        "tls.crt: no PEM certificate (-----BEGIN CERTIFICATE-----)"
    );
    assert_eq!(certificate_state(&config, "default/mismatched"), "tls.key: does not match the certificate in tls.crt");
    assert_eq!(certificate_state(&config, "default/narrow"), "valid");
    let g = api_state(&config, "default/g");
    assert!(g.contains("spec.tls.secretName: Secret default/garbage is not a usable certificate: tls.crt"), "{g}");
    let m = api_state(&config, "default/m");
    assert!(m.contains("spec.tls.secretName: Secret default/mismatched is not a usable certificate: tls.key"), "{m}");
    assert!(
        api_state(&config, "default/c").contains(
            "spec.tls.secretName: the certificate in default/narrow does not cover host c.test (it names elsewhere.test)"
        ),
        "{config}"
    );
    assert!(api_state(&config, "default/x").contains("spec.tls.secretName: Secret default/missing not found"));

    // The good API serves over TLS; the others fail their handshakes (no default), and
    // still answer plain HTTP.
    let client = ca.client(&[b"http/1.1"], true);
    let s = connect(tls, client.clone(), "a.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);
    for host in ["g.test", "m.test", "x.test"] {
        connect(tls, insecure_client(&[], true), host).await.expect_err(host);
    }
    assert_eq!(gw.get_with("/g/x", &[("host", "g.test")]).await.status, StatusCode::OK);

    // A good certificate that turns bad keeps serving its last good version.
    let version = config["version"].as_u64().unwrap();
    cfg.write(
        "certs.yaml",
        &[
            tls_secret("a-cert", &a.crt, &other.key, false),
            tls_secret("garbage", "not a certificate", &other.key, false),
            tls_secret("mismatched", &other.crt, &a.key, false),
            secret_of("narrow", &narrow, false),
        ]
        .concat(),
    );
    let config = gw.wait_version(version + 1).await;
    assert_eq!(
        certificate_state(&config, "default/a-cert"),
        "tls.key: does not match the certificate in tls.crt (serving its last good version)"
    );
    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(served(&s), a.der, "the last good certificate serves");
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);

    // Key material appears nowhere: /config, the log, analytics.
    let shown = [gw.admin("/config").await.text(), gw.logs(), std::fs::read_to_string(analytics.path()).unwrap()];
    for (what, text) in ["/config", "log", "analytics"].iter().zip(&shown) {
        for line in key_lines(&a.key).iter().chain(&key_lines(&other.key)).chain(&key_lines(&narrow.key)) {
            assert!(!text.contains(line.as_str()), "key material in {what}");
        }
        assert!(!text.contains("PRIVATE KEY"), "a key in {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_connections_while_open_ones_keep_working() {
    let up = Upstream::start("up").await;
    let ca = Ca::new();
    let (first, second) = (ca.leaf(&["a.test"]), ca.leaf(&["a.test"]));
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &tls_api("a", &up.url(), "a.test", "a-cert", false));
    cfg.write("cert.yaml", &secret_of("a-cert", &first, false));
    let (gw, tls) = start(&cfg, &[]).await;
    let client = ca.client(&[b"http/1.1"], true);
    let s = connect(tls, client.clone(), "a.test").await.unwrap();
    assert_eq!(served(&s), first.der);
    let mut open = H1::open(s).await;
    assert_eq!(open.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);

    let version = gw.config().await["version"].as_u64().unwrap();
    cfg.write("cert.yaml", &secret_of("a-cert", &second, false));
    gw.wait_version(version + 1).await;
    // A client of its own: a resumed session would present no certificate at all.
    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(served(&s), second.der, "a new connection gets the new certificate");
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(open.get("a.test", "/a/x", &[]).await.status, StatusCode::OK, "the open connection goes on");
    }
    assert!(up.hits() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_the_handshake_is_cut_by_the_header_read_timeout_and_blocks_no_one() {
    let ATest { _up, _cfg, ca, leaf: _, gw, tls } =
        serve_a_test(&["--header-read-timeout", "2s", "--max-connections", "3"]).await;

    // One sends nothing; one stops in the middle of its ClientHello.
    let mut silent = TcpStream::connect(tls).await.unwrap();
    let mut halfway = TcpStream::connect(tls).await.unwrap();
    halfway.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();
    gw.wait_until("both to hold a connection slot", async || gw.metric("gatehouse_client_connections").await >= 2.0)
        .await;

    // Meanwhile others are served.
    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);

    for (what, stream) in [("silent", &mut silent), ("halfway", &mut halfway)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("{what}: the gateway sent {n} bytes to a client that never finished its hello"),
            Err(_) => panic!("{what}: still open after {PATIENCE:?}"),
        }
    }
    gw.wait_until("their slots to be given back", async || gw.metric("gatehouse_client_connections").await == 0.0)
        .await;
}

// ---------------------------------------------------------------- client certificates

/// An API on `host` that admits clients with a certificate of the CA in Secret `clients`.
fn mtls_api(name: &str, upstream: &str, host: &str, clients: &str, extra: &str) -> String {
    api(
        name,
        &format!("/{name}/"),
        upstream,
        &format!(
            "  hosts: [{host}]\n  tls: {{secretName: {host}}}\n  auth: {{type: mtls, mtls: {{caSecretRef: {{name: {clients}}}}}}}\n{extra}"
        ),
    )
}

fn refusal(a: &Answer) -> String {
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_else(|_| panic!("not JSON: {}", a.body));
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_api_admits_certificates_of_its_own_ca_only_and_other_hosts_ask_for_none() {
    let up = Upstream::start("up").await;
    let (ca, clients, strangers) = (Ca::new(), Ca::new(), Ca::new());
    let (alice, mallory) = (clients.client_leaf("alice"), strangers.client_leaf("mallory"));
    let p = plugins();
    let analytics = tempfile::NamedTempFile::new().unwrap();
    let cfg = ConfigDir::new();
    cfg.write("plugins.yaml", &plugin("hit-counter", &p.rust("hit-counter"), ""));
    cfg.write(
        "apis.yaml",
        &[
            mtls_api("m", &up.url(), "m.test", "clients", ""),
            mtls_api(
                "hits",
                &up.url(),
                "m.test",
                "clients",
                "  middleware: {post: [{plugin: hit-counter, symbol: MyProcessRequest}]}\n",
            ),
            mtls_api("other", &up.url(), "other.test", "strangers", ""),
            tls_api("open", &up.url(), "open.test", "open.test", false),
        ]
        .concat(),
    );
    cfg.write(
        "secrets.yaml",
        &[
            secret_of("m.test", &ca.leaf(&["m.test"]), false),
            secret_of("other.test", &ca.leaf(&["other.test"]), false),
            secret_of("open.test", &ca.leaf(&["open.test"]), false),
            ca_secret("clients", &clients.pem),
            ca_secret("strangers", &strangers.pem),
            secret_of("fallback", &ca.leaf(&["m.test"]), true),
        ]
        .concat(),
    );
    let (gw, tls) = start(&cfg, &[&format!("--analytics=file:{}", analytics.path().display())]).await;
    let config = gw.config().await;
    for id in ["default/m", "default/hits", "default/other", "default/open"] {
        assert_eq!(api_state(&config, id), "serving", "{config}");
    }

    // Alice's certificate is of the clients CA: admitted, as herself.
    let mut as_alice =
        H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &alice), "m.test").await.unwrap()).await;
    let r = as_alice.get("m.test", "/m/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let hits = as_alice.get("m.test", "/hits/x", &[]).await;
    let hits: serde_json::Value = serde_json::from_str(&hits.body).unwrap();
    assert_eq!(hits["session"]["id"], "CN=alice", "a plugin reads the subject as the session id: {hits}");
    let meta = &hits["session"]["meta_data"];
    assert_eq!(meta["tls_client_subject"], "CN=alice", "{hits}");
    assert!(meta["tls_client_issuer"].as_str().unwrap().starts_with("CN=Gatehouse test CA"), "{hits}");
    assert_eq!(meta["tls_client_sha256"].as_str().unwrap().len(), 64, "{hits}");
    // The same connection, another host's mtls API: the certificate was chosen for this
    // host's CAs, so the client is sent to connect again, naming that host.
    let r = as_alice.get("other.test", "/other/x", &[]).await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{}", r.body);
    assert_eq!(as_alice.get("open.test", "/open/x", &[]).await.status, StatusCode::OK);
    let mut there =
        H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &alice), "other.test").await.unwrap()).await;
    let r = there.get("other.test", "/other/x", &[]).await;
    assert_eq!(
        (r.status, refusal(&r).as_str()),
        (StatusCode::FORBIDDEN, "client certificate not trusted for this API")
    );

    // Mallory's certificate is of another CA: the handshake passes, the request is refused.
    let mut as_mallory =
        H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &mallory), "m.test").await.unwrap()).await;
    let r = as_mallory.get("m.test", "/m/x", &[]).await;
    assert_eq!(
        (r.status, refusal(&r).as_str()),
        (StatusCode::FORBIDDEN, "client certificate not trusted for this API")
    );
    let mut there =
        H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &mallory), "other.test").await.unwrap()).await;
    assert_eq!(there.get("other.test", "/other/x", &[]).await.status, StatusCode::OK, "the API of its CA");

    // No certificate at all, over TLS and in plain HTTP.
    let mut anonymous = H1::open(connect(tls, ca.client(&[b"http/1.1"], true), "m.test").await.unwrap()).await;
    let r = anonymous.get("m.test", "/m/x", &[]).await;
    assert_eq!((r.status, refusal(&r).as_str()), (StatusCode::UNAUTHORIZED, "client certificate required"));
    let r = gw.get_with("/m/x", &[("host", "m.test")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "plain HTTP has no certificate");
    // Without SNI no certificate is asked for, and connecting again would not change that:
    // 401, not 421.
    let mut no_sni = H1::open(connect(tls, ca.client(&[b"http/1.1"], false), "m.test").await.unwrap()).await;
    let r = no_sni.get("m.test", "/m/x", &[]).await;
    assert_eq!((r.status, refusal(&r).as_str()), (StatusCode::UNAUTHORIZED, "client certificate required"));

    // A host without mtls asks for no certificate; an mtls request on such a connection is
    // sent to connect again (421), as HTTP/2 clients that coalesce connections expect.
    let mut open =
        H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &alice), "open.test").await.unwrap()).await;
    assert_eq!(open.get("open.test", "/open/x", &[]).await.status, StatusCode::OK);
    let r = open.get("m.test", "/m/x", &[]).await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{}", r.body);
    let s = connect(tls, ca.client_with_cert(&[b"h2"], &alice), "open.test").await.unwrap();
    assert_eq!(h2_get(s, "m.test", "/m/x").await.status, StatusCode::MISDIRECTED_REQUEST);
    let s = connect(tls, ca.client_with_cert(&[b"h2"], &alice), "m.test").await.unwrap();
    let r = h2_get(s, "m.test", "/m/x").await;
    assert_eq!((r.version, r.status), (Version::HTTP_2, StatusCode::OK));

    // Analytics name the caller by the certificate's subject. Records are written in the
    // background: wait for the last request's, not for a number of lines.
    let mut lines = Vec::new();
    gw.wait_until("the analytics records of the admitted requests", async || {
        lines = wait_for_lines(analytics.path(), 1).await;
        let records: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        records.iter().filter(|r| r["status"] == 200 && r["key_alias"] == "CN=alice").count() >= 3
    })
    .await;
    let records: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records.iter().any(|r| r["status"] == 403 && r["error"] == "client_cert_untrusted"), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_broken_client_ca_refuses_its_api_only_and_a_new_ca_applies_to_open_connections() {
    let up = Upstream::start("up").await;
    let (ca, clients, strangers) = (Ca::new(), Ca::new(), Ca::new());
    let (alice, mallory) = (clients.client_leaf("alice"), strangers.client_leaf("mallory"));
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            mtls_api("m", &up.url(), "m.test", "clients", ""),
            tls_api("open", &up.url(), "open.test", "open.test", false),
        ]
        .concat(),
    );
    let certs =
        [secret_of("m.test", &ca.leaf(&["m.test"]), false), secret_of("open.test", &ca.leaf(&["open.test"]), false)]
            .concat();
    cfg.write("certs.yaml", &certs);
    let (gw, tls) = start(&cfg, &[]).await;
    let config = gw.config().await;
    let state = api_state(&config, "default/m");
    assert!(
        state.contains("spec.auth.mtls.caSecretRef: Secret default/clients with a ca.crt entry is not there"),
        "{state}"
    );
    assert_eq!(api_state(&config, "default/open"), "serving");
    let alice_client = ca.client_with_cert(&[b"http/1.1"], &alice);
    let get_m = async |client: &Arc<ClientConfig>| {
        H1::open(connect(tls, client.clone(), "m.test").await.unwrap()).await.get("m.test", "/m/x", &[]).await
    };
    assert_eq!(get_m(&alice_client).await.status, StatusCode::FORBIDDEN, "no CA: nobody is admitted");
    let s = connect(tls, alice_client.clone(), "open.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("open.test", "/open/x", &[]).await.status, StatusCode::OK);

    // The CA arrives: admitted.
    let version = config["version"].as_u64().unwrap();
    cfg.write("ca.yaml", &ca_secret("clients", &clients.pem));
    let config = gw.wait_version(version + 1).await;
    assert_eq!(api_state(&config, "default/m"), "serving", "{config}");
    let mut kept = H1::open(connect(tls, alice_client.clone(), "m.test").await.unwrap()).await;
    assert_eq!(kept.get("m.test", "/m/x", &[]).await.status, StatusCode::OK);

    // A broken CA Secret: the last good CA goes on admitting, and the API says why.
    cfg.write(
        "ca.yaml",
        &ca_secret("clients", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"),
    );
    let config = gw.wait_version(version + 2).await;
    let state = api_state(&config, "default/m");
    assert!(state.contains("spec.auth.mtls.caSecretRef: Secret default/clients: ca.crt:"), "{state}");
    assert!(state.contains("(its last good version is used)"), "{state}");
    assert_eq!(get_m(&alice_client).await.status, StatusCode::OK);

    // The CA replaced by another: Alice is refused, on the connection she kept open too.
    cfg.write("ca.yaml", &ca_secret("clients", &strangers.pem));
    gw.wait_version(version + 3).await;
    assert_eq!(get_m(&alice_client).await.status, StatusCode::FORBIDDEN);
    assert_eq!(kept.get("m.test", "/m/x", &[]).await.status, StatusCode::FORBIDDEN, "a verdict of the old CA");
    let mallory_client = ca.client_with_cert(&[b"http/1.1"], &mallory);
    assert_eq!(get_m(&mallory_client).await.status, StatusCode::OK);

    // The Secret deleted: the CA is withdrawn, with no last good version standing in.
    cfg.remove("ca.yaml");
    let config = gw.wait_version(version + 4).await;
    let state = api_state(&config, "default/m");
    assert!(state.contains("Secret default/clients with a ca.crt entry is not there"), "{state}");
    assert_eq!(get_m(&mallory_client).await.status, StatusCode::FORBIDDEN);
    let s = connect(tls, alice_client.clone(), "open.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("open.test", "/open/x", &[]).await.status, StatusCode::OK, "others serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_that_expires_on_an_open_connection_is_refused_from_then_on() {
    let up = Upstream::start("up").await;
    let (ca, clients) = (Ca::new(), Ca::new());
    let expired = clients.client_leaf_until("old", Some(time::OffsetDateTime::now_utc() - time::Duration::days(1)));
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            mtls_api("m", &up.url(), "m.test", "clients", ""),
            secret_of("m.test", &ca.leaf(&["m.test"]), false),
            ca_secret("clients", &clients.pem),
        ]
        .concat(),
    );
    let (_gw, tls) = start(&cfg, &[]).await;
    let mut old = H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &expired), "m.test").await.unwrap()).await;
    assert_eq!(old.get("m.test", "/m/x", &[]).await.status, StatusCode::FORBIDDEN, "expired at the handshake");

    // X.509 times have whole seconds: a few of them is enough to connect and be admitted.
    let expires = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() + time::Duration::seconds(5);
    let brief = clients.client_leaf_until("brief", Some(expires));
    let mut open = H1::open(connect(tls, ca.client_with_cert(&[b"http/1.1"], &brief), "m.test").await.unwrap()).await;
    assert_eq!(open.get("m.test", "/m/x", &[]).await.status, StatusCode::OK);
    // Waits on the clock itself, then a little: notAfter is the last valid second.
    while time::OffsetDateTime::now_utc() <= expires + time::Duration::seconds(1) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = open.get("m.test", "/m/x", &[]).await;
    assert_eq!(
        (r.status, refusal(&r).as_str()),
        (StatusCode::FORBIDDEN, "client certificate not trusted for this API")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_sent_a_byte_do_not_hold_up_a_drain() {
    let ATest { _up, _cfg, ca, leaf: _, mut gw, tls } =
        serve_a_test(&["--drain-timeout", "120s", "--header-read-timeout", "120s"]).await;
    // Opened ahead of use, as pools and load balancers do: two on each listener. A TLS one
    // waited in its handshake, holding up a drain until the header-read timeout.
    let mut silent = Vec::new();
    for addr in [gw.addr, gw.addr, tls, tls] {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let s = connect(tls, ca.client(&[b"http/1.1"], true), "a.test").await.unwrap();
    assert_eq!(H1::open(s).await.get("a.test", "/a/x", &[]).await.status, StatusCode::OK);
    gw.wait_until("the gateway to count the four silent connections", async || {
        gw.metric("gatehouse_client_connections").await >= 4.0
    })
    .await;

    let exit = tokio::task::spawn_blocking(move || {
        let status = gw.terminate();
        (status, gw)
    });
    // Far less than the 120 s drain timeout: nothing was in flight.
    let (exit, gw) = tokio::time::timeout(PATIENCE, exit).await.expect("drained without waiting on them").unwrap();
    assert!(exit.success(), "clean exit: {exit:?}\n{}", gw.logs());
    assert!(!gw.logs().contains("drain timed out"), "{}", gw.logs());
    for s in &mut silent {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("closed");
        assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
    }
}
