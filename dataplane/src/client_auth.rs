//! Client certificates for APIs with `spec.auth.type: mtls`.
//!
//! Two checks, because a connection's SNI does not bind the `Host` of the requests on it:
//! - in the handshake, a client naming (SNI) a host of an mtls API is asked for a
//!   certificate, with the CAs of all mtls APIs on that host as hints, and rustls checks
//!   that the client holds its key. Clients naming any other host are not asked: browsers
//!   would prompt their users for a certificate on every site;
//! - per request, the certificate must chain to the CA of the API the request is routed
//!   to. The verdicts for the host's APIs are worked out once per connection and CA, right
//!   after the handshake, so a request compares pointers; an API whose CA changed since is
//!   checked again, once, under a lock only that path takes.
//!
//! A request for an mtls API of another host than the handshake named gets 421, so that
//! HTTP/2 clients that coalesced it onto another host's connection connect again with the
//! right server name (and pick a certificate for that host's CAs).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
};

use gatehouse_crds::{
    AuthType,
    snapshot::{ApiEntry, Snapshot},
};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};

use crate::model::Session;

/// One mtls API's CA, kept across config builds while its `ca.crt` is unchanged, so that
/// verdicts made on open connections stay valid (they hold it by pointer).
pub struct ClientCa {
    /// `namespace/name` of the Secret.
    secret: String,
    pem: String,
    /// Its certificates as trust anchors, for the hints of the hosts it serves.
    anchors: RootCertStore,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCa").field("secret", &self.secret).finish_non_exhaustive()
    }
}

impl ClientCa {
    fn parse(secret: &str, pem: &str) -> Result<Self, String> {
        let roots = roots(pem).map_err(|why| format!("Secret {secret}: ca.crt: {why}"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
            .build()
            .map_err(|e| format!("Secret {secret}: ca.crt: {e}"))?;
        Ok(Self { secret: secret.to_owned(), pem: pem.to_owned(), anchors: roots, verifier })
    }

    /// Whether `chain` (leaf first, as the client sent it) chains to this CA, now.
    fn trusts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else { return false };
        self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|_| "not a PEM certificate list".to_owned())?;
        roots.add(der).map_err(|e| format!("a certificate cannot be used as a CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(roots)
}

/// An mtls API as the handshake of one of its hosts sees it.
struct HostApi {
    id: String,
    namespace: String,
    name: String,
    ca: Arc<ClientCa>,
}

/// What a host of mtls APIs asks its clients for.
pub struct HostAuth {
    /// Asks for a certificate, checked against the union of `apis`' CAs; lets clients
    /// without one finish the handshake, so that they get an HTTP answer saying why.
    config: Arc<ServerConfig>,
    apis: Vec<HostApi>,
}

/// The client-certificate side of a config: built with the certificate table.
#[derive(Default)]
pub struct ClientAuthTable {
    by_host: HashMap<String, Arc<HostAuth>>,
    /// API id → its CA (the last good one, if its Secret broke).
    by_api: HashMap<String, Arc<ClientCa>>,
}

impl ClientAuthTable {
    /// The CA an mtls API trusts; None when it never had a usable one.
    pub fn ca_of(&self, api_id: &str) -> Option<&Arc<ClientCa>> {
        self.by_api.get(api_id)
    }

    /// What to ask a client that named `sni`; None: no client certificate.
    pub fn host(&self, sni: Option<&str>) -> Option<&Arc<HostAuth>> {
        self.by_host.get(sni?)
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// Builds the table for the served mtls `apis` (oldest first): each API's CA from its
/// `caSecretRef`, and a server config per host. `cert_for` is the certificate a host is
/// served with; `complain` records an API's problem (a missing or unusable CA: the API
/// keeps its last good CA if it had one, else refuses every request with 403).
pub fn build(
    snapshot: &Snapshot,
    apis: &[&ApiEntry],
    prev: &ClientAuthTable,
    cert_for: impl Fn(&str) -> Option<Arc<CertifiedKey>>,
    mut complain: impl FnMut(&str, String),
) -> ClientAuthTable {
    let mut table = ClientAuthTable::default();
    let mut hosts: BTreeMap<String, Vec<HostApi>> = BTreeMap::new();
    // CAs by Secret id, parsed once per build even when several APIs name them.
    let mut parsed: HashMap<String, Result<Arc<ClientCa>, String>> = HashMap::new();
    let kept: HashMap<&str, &Arc<ClientCa>> = prev.by_api.values().map(|c| (c.secret.as_str(), c)).collect();
    for api in apis.iter().filter(|a| a.spec.auth.kind == AuthType::Mtls) {
        let Some(m) = &api.spec.auth.mtls else { continue };
        let api_id = api.id();
        let secret = format!("{}/{}", api.namespace, m.ca_secret_ref.name);
        let pem = snapshot
            .ca_certificates
            .get(&secret)
            .map(|c| c.ca_certificate_pem.as_str())
            .or_else(|| snapshot.certificates.get(&secret).and_then(|c| c.ca_certificate_pem.as_deref()));
        let Some(pem) = pem else {
            // Deleting the Secret (or naming another that is not there) is how a CA is
            // withdrawn: no last good version stands in for it.
            complain(&api_id, format!("spec.auth.mtls.caSecretRef: Secret {secret} with a ca.crt entry is not there"));
            continue;
        };
        let ca = parsed
            .entry(secret.clone())
            .or_insert_with(|| match kept.get(secret.as_str()) {
                Some(c) if c.pem == pem => Ok(Arc::clone(c)),
                _ => ClientCa::parse(&secret, pem).map(Arc::new),
            })
            .clone();
        let ca = match ca {
            Ok(ca) => ca,
            Err(why) => {
                // The same Secret, changed into something unusable: its last good CA goes on.
                let last_good = kept.get(secret.as_str()).map(|c| Arc::clone(c));
                let serving = if last_good.is_some() { " (its last good version is used)" } else { "" };
                complain(&api_id, format!("spec.auth.mtls.caSecretRef: {why}{serving}"));
                match last_good {
                    Some(c) => c,
                    None => continue,
                }
            }
        };
        table.by_api.insert(api_id.clone(), ca.clone());
        for host in &api.spec.hosts {
            hosts.entry(host.to_ascii_lowercase()).or_default().push(HostApi {
                id: api_id.clone(),
                namespace: api.namespace.clone(),
                name: api.name.clone(),
                ca: ca.clone(),
            });
        }
    }
    for (host, apis) in hosts {
        let cert = cert_for(&host);
        match host_config(&apis, cert) {
            Ok(config) => {
                table.by_host.insert(host, Arc::new(HostAuth { config, apis }));
            }
            Err(e) => {
                // Nobody can be asked for a certificate there: nobody is admitted.
                for a in &apis {
                    complain(&a.id, format!("spec.auth.mtls: host {host}: {e}"));
                    table.by_api.remove(&a.id);
                }
            }
        }
    }
    table
}

fn host_config(apis: &[HostApi], cert: Option<Arc<CertifiedKey>>) -> Result<Arc<ServerConfig>, String> {
    let mut union = RootCertStore::empty();
    let mut seen: Vec<&Arc<ClientCa>> = Vec::new();
    for a in apis {
        if seen.iter().any(|s| Arc::ptr_eq(s, &a.ca)) {
            continue;
        }
        seen.push(&a.ca);
        union.roots.extend(a.ca.anchors.roots.iter().cloned());
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(union), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let verifier = Arc::new(ChainCheckedPerRequest(verifier));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(cert)));
    config.alpn_protocols = crate::tls::alpn();
    Ok(Arc::new(config))
}

/// The handshake's verifier: it names the host's CAs to the client (so it picks the right
/// certificate) and checks that the client holds the certificate's key, but leaves the
/// chain to the request, which is checked against its own API's CA: a client with a
/// certificate of the wrong CA gets a 403 that says so, not a failed handshake.
#[derive(Debug)]
struct ChainCheckedPerRequest(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ChainCheckedPerRequest {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The certificate of one host, as of the build its config belongs to.
#[derive(Debug)]
struct Fixed(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

impl HostAuth {
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Whether the mtls API `api_id` is on this host: a request for another one came over
    /// a connection whose certificate was chosen for this host's CAs.
    fn serves(&self, api_id: &str) -> bool {
        self.apis.iter().any(|a| a.id == api_id)
    }

    /// The identity of a client that presented `chain`, with a verdict for each mtls API
    /// of this host whose CA trusts it (each CA checked once). None: not a certificate
    /// this gateway can read.
    pub fn identify(self: &Arc<Self>, chain: Vec<CertificateDer<'static>>) -> Option<ClientIdentity> {
        let leaf = chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let subject: Arc<str> = Arc::from(rfc4514(cert.subject()));
        let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
        let meta = BTreeMap::from([
            ("tls_client_subject".to_owned(), subject.to_string()),
            ("tls_client_issuer".to_owned(), rfc4514(cert.issuer())),
            ("tls_client_serial".to_owned(), cert.raw_serial_as_string()),
            ("tls_client_sha256".to_owned(), fingerprint.clone()),
        ]);
        let not_after = cert.validity().not_after.timestamp();
        let mut id = ClientIdentity {
            host: self.clone(),
            chain,
            subject,
            fingerprint,
            meta,
            not_after,
            verdicts: Vec::new(),
            later: Mutex::new(Vec::new()),
        };
        let mut checked: Vec<(&Arc<ClientCa>, bool)> = Vec::new();
        for a in &self.apis {
            let trusted = match checked.iter().find(|(ca, _)| Arc::ptr_eq(ca, &a.ca)) {
                Some((_, t)) => *t,
                None => {
                    let t = a.ca.trusts(&id.chain);
                    checked.push((&a.ca, t));
                    t
                }
            };
            if trusted {
                let session = Arc::new(id.session(&a.namespace, &a.name));
                id.verdicts.push(Verdict { api: a.id.clone(), ca: a.ca.clone(), session: Some(session) });
            }
        }
        Some(id)
    }
}

/// A name as RFC 4514 writes it: the last RDN first, `+` within one, special characters
/// escaped, so that two different names never read alike. Types without a short name are
/// dotted OIDs; values that are not text are `#` and the hex of their content.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), x509_parser::objects::oid_registry()) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_value(v, &mut out),
                Err(_) => {
                    out.push('#');
                    out.push_str(&hex::encode(attr.as_slice()));
                }
            }
        }
    }
    out
}

fn escape_value(v: &str, out: &mut String) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
}

struct Verdict {
    api: String,
    ca: Arc<ClientCa>,
    /// None: the certificate does not chain to `ca`.
    session: Option<Arc<Session>>,
}

/// Verdicts made after the handshake, for a CA that changed since: a handful per
/// connection at most, as many as the host's APIs.
const LATER_VERDICTS: usize = 16;

/// A client certificate a connection presented, and what it was found good for.
pub struct ClientIdentity {
    /// The host the handshake named, whose CAs the client chose its certificate for.
    host: Arc<HostAuth>,
    chain: Vec<CertificateDer<'static>>,
    /// RFC 4514 form, as `session_id` and analytics' `key_alias` show it.
    subject: Arc<str>,
    fingerprint: String,
    meta: BTreeMap<String, String>,
    /// The leaf's `notAfter`, in Unix seconds: past it, nothing more is admitted.
    not_after: i64,
    /// Made with the handshake, for the host's APIs: read without a lock.
    verdicts: Vec<Verdict>,
    /// Made later, when an API's CA changed: kept so the chain is checked once per CA.
    later: Mutex<Vec<Verdict>>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").field("subject", &self.subject).finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// The session of a request for the mtls API `api_id` of `namespace`/`name`, whose CA
    /// is `ca`: None when the certificate does not chain to it, or has expired since the
    /// handshake.
    fn session_for(&self, api_id: &str, namespace: &str, name: &str, ca: &Arc<ClientCa>) -> Option<Arc<Session>> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if i64::try_from(now).unwrap_or(i64::MAX) > self.not_after {
            return None;
        }
        let made = |v: &Verdict| Arc::ptr_eq(&v.ca, ca) && v.api == api_id;
        if let Some(v) = self.verdicts.iter().find(|v| made(v)) {
            return v.session.clone();
        }
        let mut later = self.later.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = later.iter().find(|v| made(v)) {
            return v.session.clone();
        }
        let session = ca.trusts(&self.chain).then(|| Arc::new(self.session(namespace, name)));
        if later.len() == LATER_VERDICTS {
            later.remove(0);
        }
        later.push(Verdict { api: api_id.to_owned(), ca: ca.clone(), session: session.clone() });
        session
    }

    fn session(&self, namespace: &str, api_name: &str) -> Session {
        Session::from_client_certificate(namespace, api_name, &self.subject, &self.fingerprint, self.meta.clone())
    }
}

/// What a connection knows of its client's certificate.
#[derive(Clone)]
pub enum ClientCert {
    /// Plain HTTP, or a TLS handshake that named (`sni`) no host of an mtls API.
    NotAsked {
        sni: bool,
    },
    /// Asked for by this host, and none sent.
    Absent(Arc<HostAuth>),
    /// Sent, but not a certificate this gateway can read.
    Unreadable(Arc<HostAuth>),
    Present(Arc<ClientIdentity>),
}

impl Default for ClientCert {
    fn default() -> Self {
        Self::NotAsked { sni: false }
    }
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAsked { sni } => write!(f, "NotAsked {{ sni: {sni} }}"),
            Self::Absent(_) => f.write_str("Absent"),
            Self::Unreadable(_) => f.write_str("Unreadable"),
            Self::Present(id) => write!(f, "Present({:?})", id.subject),
        }
    }
}

/// Why a request for an mtls API is refused, or the session it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No certificate: 401.
    Missing,
    /// A certificate the API's CA does not admit (or no CA): 403.
    Untrusted,
    /// A TLS connection whose handshake named another host: 421, connect again.
    Misdirected,
}

impl ClientCert {
    /// The session of a request for the mtls API `api_id` (`namespace`/`name`), whose CA is
    /// `ca` (None: it has no usable CA).
    pub fn session(
        &self,
        api_id: &str,
        namespace: &str,
        name: &str,
        ca: Option<&Arc<ClientCa>>,
    ) -> Result<Arc<Session>, Refusal> {
        // Without a CA nobody is admitted; sending the client to connect again would only
        // loop, since its host asks for no certificate.
        let ca = ca.ok_or(Refusal::Untrusted)?;
        match self {
            Self::Present(id) if id.host.serves(api_id) => {
                id.session_for(api_id, namespace, name, ca).ok_or(Refusal::Untrusted)
            }
            Self::Absent(host) if host.serves(api_id) => Err(Refusal::Missing),
            Self::Unreadable(host) if host.serves(api_id) => Err(Refusal::Untrusted),
            // Plain HTTP, or no SNI: connecting again changes nothing.
            Self::NotAsked { sni: false } => Err(Refusal::Missing),
            // The handshake named another host (an HTTP/2 client reusing the connection,
            // or this API became mtls since): a connection naming this one is asked.
            _ => Err(Refusal::Misdirected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(dn: &[(rcgen::DnType, &str)]) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let cert = params.self_signed(&key).expect("cert");
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).expect("parses");
        rfc4514(parsed.subject())
    }

    #[test]
    fn subjects_are_written_last_rdn_first_with_special_characters_escaped() {
        use rcgen::DnType::{CommonName, OrganizationName};
        assert_eq!(name_of(&[(OrganizationName, "Example"), (CommonName, "alice")]), "CN=alice,O=Example");
        // A CN that looks like two RDNs must not read as them.
        let tricky = name_of(&[(CommonName, "alice, O=Admin")]);
        assert_eq!(tricky, "CN=alice\\, O=Admin");
        assert_ne!(tricky, name_of(&[(OrganizationName, "Admin"), (CommonName, "alice")]));
        assert_eq!(name_of(&[(CommonName, "#1 ")]), "CN=\\#1\\ ");
        assert_eq!(name_of(&[(CommonName, "a+b\"c\\d<e>f;g")]), "CN=a\\+b\\\"c\\\\d\\<e\\>f\\;g");
    }
}
