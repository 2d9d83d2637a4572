//! Certificates for the TLS tests, made by an rcgen CA per test, and the manifests that
//! carry them.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

pub struct Leaf {
    pub crt: String,
    pub key: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: a CA another test CA's name matches is found as the issuer,
        // and its refusal says BadSignature rather than UnknownIssuer.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.distinguished_name.push(DnType::CommonName, format!("Gatehouse test CA {n}"));
        let cert = params.self_signed(&key).unwrap();
        Self { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate for `names` (DNS names or IP addresses), with `names[0]` as its CN.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        if let Some(cn) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *cn);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { crt: cert.pem(), key: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A client certificate: `CN=cn`, for client authentication.
    pub fn client_leaf(&self, cn: &str) -> Leaf {
        self.client_leaf_until(cn, None)
    }

    /// A client certificate valid until `not_after` (rcgen's default when None).
    pub fn client_leaf_until(&self, cn: &str, not_after: Option<time::OffsetDateTime>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(t) = not_after {
            params.not_after = t;
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { crt: cert.pem(), key: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A client trusting this CA that presents `cert` when a server asks for one.
    pub fn client_with_cert(&self, alpn: &[&[u8]], cert: &Leaf) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::from_pem_slice(cert.key.as_bytes()).unwrap();
        let mut c = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(vec![cert.der.clone()], key)
            .unwrap();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    pub fn client(&self, alpn: &[&[u8]], sni: bool) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c.enable_sni = sni;
        Arc::new(c)
    }
}

impl Leaf {
    /// A server config presenting this certificate; with `clients`, it demands a client
    /// certificate that chains to that CA.
    pub fn server(&self, clients: Option<&Ca>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider).build().unwrap(),
            ),
        };
        let chain = vec![self.der.clone()];
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes()).unwrap();
        let mut c = builder.with_single_cert(chain, key).unwrap();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

pub fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

pub fn tls_secret(name: &str, crt: &str, key: &str, default: bool) -> String {
    let labels = if default { ", labels: {gatehouse.dev/default-certificate: \"true\"}" } else { "" };
    format!(
        "---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: {name}{labels}}}\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(crt),
        indent(key)
    )
}

/// An Opaque Secret holding a CA bundle (`ca.crt`).
pub fn ca_secret(name: &str, pem: &str) -> String {
    format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData:\n  ca.crt: |\n{}", indent(pem))
}
