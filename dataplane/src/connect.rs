//! How the gateway connects to upstreams: the pool every `http://` HTTP/1.1 target shares
//! (`pool`), one h2c client per API that speaks HTTP/2 to them, and one client per API
//! with `https://` targets, whose TLS config its `upstream.tls`
//! (and the Secrets that names) decides. All of them dial through the egress guard.
//!
//! A TLS client is built when its API is compiled, on the config thread, and belongs to
//! that compiled API: APIs never share pooled TLS connections, so a connection one API
//! verified is never reused by another that trusts something else (or skips verifying).
//! An API is rebuilt, with a new client and pool, when its spec or any Secret it names
//! changes.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use gatehouse_crds::{
    UpstreamTls,
    snapshot::{ApiEntry, CertificateEntry, Snapshot},
};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{
    body::ProxyBody,
    egress::{GuardedConnector, GuardedResolver},
};

pub type UpstreamClient = Client<GuardedConnector, ProxyBody>;
pub type TlsClient = Client<HttpsConnector<GuardedConnector>, ProxyBody>;

/// A TCP connect to an upstream that takes longer fails (`--upstream-connect-timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds upstream clients with the process's connect timeout.
#[derive(Debug, Clone, Copy)]
pub struct Connector {
    connect_timeout: Duration,
}

impl Default for Connector {
    fn default() -> Self {
        Self { connect_timeout: CONNECT_TIMEOUT }
    }
}

impl Connector {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout }
    }

    /// `under_tls`: the TLS connector hands `https://` URIs down, and alone decides the
    /// scheme; a plain client refuses them rather than send cleartext to port 443.
    fn tcp(&self, under_tls: bool) -> GuardedConnector {
        let mut connector = HttpConnector::new_with_resolver(GuardedResolver::default());
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.enforce_http(!under_tls);
        GuardedConnector::new(connector)
    }

    /// The pool `http://` HTTP/1.1 targets share.
    pub fn pool(&self) -> crate::pool::Pool<ProxyBody> {
        crate::pool::Pool::new(self.tcp(false))
    }

    /// A client for one API's `http://` targets spoken to in HTTP/2 (h2c, prior knowledge).
    pub fn h2c(&self) -> UpstreamClient {
        pool(true).build(self.tcp(false))
    }

    /// A client for one API's `https://` targets; with `http2`, h2 is the only protocol
    /// offered by ALPN.
    pub fn tls(&self, tls: &UpstreamTlsConfig, http2: bool) -> TlsClient {
        let builder =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(ClientConfig::clone(&tls.config)).https_only();
        let builder = match &tls.server_name {
            Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
            None => builder,
        };
        let connector = if http2 {
            builder.enable_http2().wrap_connector(self.tcp(true))
        } else {
            builder.enable_http1().wrap_connector(self.tcp(true))
        };
        pool(http2).build(connector)
    }
}

/// Pooled keep-alive connections; with `http2`, one multiplexed connection per target.
fn pool(http2: bool) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(90)).pool_max_idle_per_host(1024).http2_only(http2);
    b
}

/// What an API's TLS client is made from: its `upstream.tls` and the content of the
/// Secrets it names, so that a changed Secret rebuilds the API.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsInputs {
    spec: UpstreamTls,
    ca: Option<String>,
    client: Option<CertificateEntry>,
}

/// The rustls side of an API's TLS client.
pub struct UpstreamTlsConfig {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl TlsInputs {
    /// The inputs of an API with `https://` targets or `upstream.tls`, None for one with
    /// neither; an error names the field and the Secret that is missing or unusable.
    pub fn of(snapshot: &Snapshot, entry: &ApiEntry) -> Result<Option<Self>, String> {
        let https = entry.targets.iter().any(|t| t.starts_with("https://"));
        let Some(spec) = entry.spec.upstream.tls.clone().or_else(|| https.then(UpstreamTls::default)) else {
            return Ok(None);
        };
        // Validation refuses `tls` beside an `http://` url or target; a Service's endpoints
        // are `http://`: never let such a target go out in the clear as if it were TLS.
        if let Some(plain) = entry.targets.iter().find(|t| !t.starts_with("https://"))
            && entry.spec.upstream.tls.is_some()
        {
            return Err(format!("spec.upstream.tls: applies to https:// upstreams only, and {plain:?} is not one"));
        }
        let ns = &entry.namespace;
        let ca = match &spec.ca_secret_ref {
            None => None,
            Some(r) => {
                let id = format!("{ns}/{}", r.name);
                let pem = snapshot
                    .ca_certificates
                    .get(&id)
                    .map(|c| c.ca_certificate_pem.clone())
                    .or_else(|| snapshot.certificates.get(&id).and_then(|c| c.ca_certificate_pem.clone()))
                    .ok_or_else(|| {
                        format!("spec.upstream.tls.caSecretRef: Secret {id} with a ca.crt entry is not there")
                    })?;
                Some(pem)
            }
        };
        let client = match &spec.client_certificate_secret_ref {
            None => None,
            Some(r) => {
                let id = format!("{ns}/{}", r.name);
                let c = snapshot.certificates.get(&id).cloned().ok_or_else(|| {
                    format!("spec.upstream.tls.clientCertificateSecretRef: kubernetes.io/tls Secret {id} is not there")
                })?;
                Some(c)
            }
        };
        Ok(Some(Self { spec, ca, client }))
    }

    /// The rustls client config; an error names the field and why (never key material).
    pub fn config(&self, api: &str) -> Result<UpstreamTlsConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("spec.upstream.tls: {e}"))?;
        let builder = if self.spec.insecure_skip_verify {
            tracing::warn!(
                api,
                "spec.upstream.tls.insecureSkipVerify: upstream certificates are not verified; anyone on the path can read and change this API's upstream traffic"
            );
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        } else {
            let roots = match &self.ca {
                Some(pem) => {
                    let mut roots = RootCertStore::empty();
                    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("spec.upstream.tls.caSecretRef: ca.crt is not PEM certificates: {e}"))?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err("spec.upstream.tls.caSecretRef: ca.crt holds no usable CA certificate".to_owned());
                    }
                    Arc::new(roots)
                }
                None => system_roots()?,
            };
            builder.with_root_certificates(roots)
        };
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let field = "spec.upstream.tls.clientCertificateSecretRef";
                let chain = CertificateDer::pem_slice_iter(c.certificate_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("{field}: tls.crt is not PEM certificates"))?;
                // The key's content never goes into an error.
                let key = PrivateKeyDer::from_pem_slice(c.private_key_pem.expose().as_bytes())
                    .map_err(|_| format!("{field}: tls.key is not a PEM private key"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{field}: the certificate and key do not make a pair: {e}"))?
            }
        };
        let server_name = match &self.spec.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|_| format!("spec.upstream.tls.serverName: {n:?} is not a DNS name or an IP address"))?,
            ),
            None => None,
        };
        Ok(UpstreamTlsConfig { config: Arc::new(config), server_name })
    }
}

/// The system's trusted roots, read once (rustls-native-certs: the OS store, or
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`).
pub(crate) fn system_roots() -> Result<Arc<RootCertStore>, String> {
    // Only a store that was found is kept: one installed later is read by the next build.
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(format!(
            "spec.upstream.tls: no system CA certificates to verify https upstreams against{why}; name a caSecretRef"
        ));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// `insecureSkipVerify`: any certificate is taken, but the handshake's signatures are still
/// checked, so the peer at least holds the key of the certificate it shows.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS failure inside a failed upstream request, for the log: rustls's own words
/// (`invalid peer certificate: UnknownIssuer`, ...).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // An `io::Error`'s `source` skips the error it wraps (hyper-rustls nests two).
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}
