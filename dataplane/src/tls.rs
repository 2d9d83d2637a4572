//! Client-facing TLS: certificates from `kubernetes.io/tls` Secrets, chosen by SNI.
//!
//! A [`CertTable`] is compiled with each runtime, on the config thread, and swapped into
//! the [`Resolver`] that rustls asks during every handshake: a handshake costs one
//! `ArcSwap` load and at most two hash probes, no lock and no allocation of ours.
//!
//! What is checked when a table is built, and what a failure does:
//! - a Secret that is not a certificate chain + matching private key: reported on
//!   `/config` (`certificates`), and its last good version keeps serving, if it had one;
//! - an API whose `spec.tls.secretName` names a missing or unusable Secret, or whose
//!   certificate does not cover one of its `hosts` (SANs, checked by rustls-webpki): the
//!   API reports it, and each host concerned keeps the certificate it was served with
//!   before, if any. Other APIs and hosts are untouched;
//! - a certificate that has expired or is not yet valid is a warning, not a refusal: the
//!   gateway cannot renew it, and refusing it would only swap a certificate clients may
//!   reject for a handshake every client fails.
//!
//! Private keys are never printed: errors say which field is wrong, never its content.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use arc_swap::ArcSwap;
use gatehouse_crds::snapshot::{ApiEntry, CertificateEntry, Snapshot};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::Serialize;

use crate::client_auth::{self, ClientAuthTable, ClientCert};

/// The certificates served, by the name a client sends.
#[derive(Default)]
pub struct CertTable {
    /// Each host of an API with `spec.tls` (lowercase) → its certificate.
    by_host: HashMap<String, Arc<CertifiedKey>>,
    /// Wildcard SANs (`*.example.com`) of the certificates APIs name, by the parent domain
    /// (`example.com`), so a lookup needs no new string.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with a name nothing above covers.
    default: Option<Arc<CertifiedKey>>,
    /// Every usable certificate by Secret id (kept over bad versions), for the next build.
    parsed: HashMap<String, Arc<Parsed>>,
    /// The hosts of `mtls` APIs and their CAs.
    pub client_auth: ClientAuthTable,
}

/// One usable certificate and the Secret content it was parsed from.
struct Parsed {
    source: CertificateEntry,
    key: Arc<CertifiedKey>,
    /// SAN DNS names, as written.
    dns_names: Vec<String>,
    not_after: Option<jiff::Timestamp>,
    not_before: Option<jiff::Timestamp>,
}

impl CertTable {
    /// Whether a certificate became valid or expired in `(from, to]`: the reports built at
    /// `from` say otherwise now.
    pub fn validity_changed(&self, from: jiff::Timestamp, to: jiff::Timestamp) -> bool {
        let crossed = |t: Option<jiff::Timestamp>| t.is_some_and(|t| from < t && t <= to);
        self.parsed.values().any(|p| crossed(p.not_after) || crossed(p.not_before))
    }

    /// SNI name (rustls lowercases it) → exact host, then a one-label wildcard, then the
    /// default certificate.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(name) = sni {
            if let Some(c) = self.by_host.get(name) {
                return Some(c);
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(c);
            }
        }
        self.default.as_ref()
    }
}

/// What rustls asks for a certificate; holds the table of the runtime being served.
#[derive(Default)]
pub struct Resolver {
    table: ArcSwap<CertTable>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn store(&self, table: Arc<CertTable>) {
        self.table.store(table);
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<CertTable>> {
        self.table.load()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None: rustls ends the handshake with an alert (no SNI match and no default).
        self.table.load().lookup(hello.server_name()).cloned()
    }
}

/// The rustls server config for `--tls-listen`: TLS 1.3 and 1.2, ALPN h2 then http/1.1.
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

/// Accepts `--tls-listen` connections. The ClientHello picks the config: a host of `mtls`
/// APIs asks for a client certificate, every other name is served without asking.
#[derive(Clone)]
pub struct Acceptor {
    resolver: Arc<Resolver>,
    plain: Arc<ServerConfig>,
}

impl Acceptor {
    pub fn new(resolver: Arc<Resolver>) -> Result<Self, rustls::Error> {
        Ok(Self { plain: server_config(resolver.clone())?, resolver })
    }

    /// The handshake, and the client certificate it brought when one was asked for.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, ClientCert)>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let sni = start.client_hello().server_name().is_some();
        let host = {
            let table = self.resolver.table();
            let auth = &table.client_auth;
            if auth.is_empty() { None } else { auth.host(start.client_hello().server_name()).cloned() }
        };
        let Some(host) = host else {
            return Ok((start.into_stream(self.plain.clone()).await?, ClientCert::NotAsked { sni }));
        };
        let stream = start.into_stream(host.config()).await?;
        let cert = match stream.get_ref().1.peer_certificates() {
            None | Some([]) => ClientCert::Absent(host),
            Some(chain) => match host.identify(chain.iter().map(|d| d.clone().into_owned()).collect()) {
                Some(id) => ClientCert::Present(Arc::new(id)),
                None => ClientCert::Unreadable(host),
            },
        };
        Ok((stream, cert))
    }
}

pub fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// A certificate's line on `/config`: never any key material.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateReport {
    pub id: String,
    /// Labelled as the default certificate.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// `valid`, or why not (and whether its last good version serves).
    pub state: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<jiff::Timestamp>,
    /// Served anyway: expired, not yet valid, a second default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A table and what building it found.
pub struct Built {
    pub table: Arc<CertTable>,
    pub certificates: Vec<CertificateReport>,
    /// API id → why it is not served over TLS as declared.
    pub api_problems: HashMap<String, String>,
}

/// Builds the table for `snapshot`'s certificates and the served `apis` (those routed).
/// Unchanged Secrets are taken over from `prev` without parsing them again.
pub fn build<'a>(snapshot: &Snapshot, apis: impl IntoIterator<Item = &'a ApiEntry>, prev: &CertTable) -> Built {
    let now = jiff::Timestamp::now();
    let mut table = CertTable::default();
    let mut reports = Vec::with_capacity(snapshot.certificates.len());
    let mut invalid: HashMap<&str, String> = HashMap::new();
    for (id, entry) in &snapshot.certificates {
        let reused = prev.parsed.get(id).filter(|p| p.source == *entry).cloned();
        let parsed = match reused {
            Some(p) => Ok(p),
            None => parse(entry).map(Arc::new),
        };
        let mut report = CertificateReport {
            id: id.clone(),
            default: entry.default,
            state: "valid".to_owned(),
            dns_names: Vec::new(),
            not_after: None,
            warnings: Vec::new(),
        };
        let served = match parsed {
            Ok(p) => Some(p),
            Err(reason) => {
                let last_good = prev.parsed.get(id).cloned();
                report.state = match &last_good {
                    Some(_) => format!("{reason} (serving its last good version)"),
                    None => reason.clone(),
                };
                tracing::warn!(certificate = %id, reason = %report.state, "certificate Secret not usable");
                invalid.insert(id.as_str(), reason);
                last_good
            }
        };
        if let Some(p) = served {
            report.dns_names.clone_from(&p.dns_names);
            report.not_after = p.not_after;
            if p.not_after.is_some_and(|t| t < now) {
                report.warnings.push(format!("expired at {}; served anyway", p.not_after.unwrap_or(now)));
            }
            if let Some(t) = p.not_before.filter(|t| *t > now) {
                report.warnings.push(format!("not valid before {t}; served anyway"));
            }
            table.parsed.insert(id.clone(), p);
        }
        reports.push(report);
    }

    // The default: the first labelled certificate that can serve, by namespace/name.
    let defaults: Vec<&String> = snapshot.certificates.iter().filter(|(_, c)| c.default).map(|(id, _)| id).collect();
    let chosen = defaults.iter().find(|id| table.parsed.contains_key(id.as_str())).copied();
    table.default = chosen.and_then(|id| table.parsed.get(id)).map(|p| p.key.clone());
    if let Some(chosen) = chosen {
        for r in reports.iter_mut().filter(|r| r.default && r.id != *chosen) {
            r.warnings.push(format!("not used: {chosen} is the default certificate"));
        }
    }

    // Hosts, oldest API first (as routes): a host claimed with two certificates keeps the
    // older API's, so a newer API in another namespace cannot take a host's certificate.
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut owner: HashMap<String, (String, String)> = HashMap::new();
    let mut apis: Vec<&ApiEntry> = apis.into_iter().collect();
    apis.sort_by(|a, b| gatehouse_crds::snapshot::oldest_first(a, b));
    for &api in &apis {
        let Some(tls) = &api.spec.tls else { continue };
        let api_id = api.id();
        let secret = format!("{}/{}", api.namespace, tls.secret_name);
        let mut complain = |why: String| problems.entry(api_id.clone()).or_default().push(why);
        let cert = table.parsed.get(&secret).cloned();
        match (&cert, invalid.get(secret.as_str())) {
            (None, Some(reason)) => {
                complain(format!("spec.tls.secretName: Secret {secret} is not a usable certificate: {reason}"))
            }
            (None, None) => complain(format!("spec.tls.secretName: Secret {secret} not found")),
            (Some(_), Some(reason)) => complain(format!(
                "spec.tls.secretName: Secret {secret} is not a usable certificate: {reason} (its last good version serves)"
            )),
            (Some(_), None) => {}
        }
        let leaf = cert.as_ref().and_then(|c| c.key.cert.first()).and_then(|d| webpki::EndEntityCert::try_from(d).ok());
        for host in &api.spec.hosts {
            let host = host.to_ascii_lowercase();
            let covered = match (&leaf, ServerName::try_from(host.as_str())) {
                (Some(leaf), Ok(name)) => leaf.verify_is_valid_for_subject_name(&name).is_ok(),
                _ => false,
            };
            if let (Some(c), false) = (&cert, covered) {
                let names = if c.dns_names.is_empty() { "no DNS name".to_owned() } else { c.dns_names.join(", ") };
                complain(format!(
                    "spec.tls.secretName: the certificate in {secret} does not cover host {host} (it names {names})"
                ));
            }
            match owner.get(&host) {
                Some((other_api, other_secret)) if *other_secret != secret => {
                    complain(format!(
                        "spec.tls.secretName: host {host} is served with {other_secret}, the certificate of {other_api}"
                    ));
                    continue;
                }
                Some(_) => continue,
                None => {}
            }
            let serve = match (&cert, covered) {
                (Some(c), true) => Some(c.key.clone()),
                // The certificate this host was served with before keeps serving it.
                _ => prev.by_host.get(&host).cloned(),
            };
            if let Some(key) = serve {
                owner.insert(host.clone(), (api_id.clone(), secret.clone()));
                table.by_host.insert(host, key);
            }
        }
        if let Some(c) = &cert {
            for parent in c.dns_names.iter().filter_map(|n| n.strip_prefix("*.")) {
                table.wildcard.entry(parent.to_ascii_lowercase()).or_insert_with(|| c.key.clone());
            }
        }
    }
    table.client_auth = client_auth::build(
        snapshot,
        &apis,
        &prev.client_auth,
        |host| table.lookup(Some(host)).cloned(),
        |api, why| problems.entry(api.to_owned()).or_default().push(why),
    );
    let api_problems = problems.into_iter().map(|(id, p)| (id, p.join("; "))).collect();
    Built { table: Arc::new(table), certificates: reports, api_problems }
}

/// Parses and checks one Secret: a PEM chain, a PEM private key that matches its leaf.
/// Reasons name the field and never quote it.
fn parse(entry: &CertificateEntry) -> Result<Parsed, String> {
    let chain = CertificateDer::pem_slice_iter(entry.certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "tls.crt: not a PEM certificate chain".to_owned())?;
    let Some(leaf) = chain.first() else {
        return Err("tls.crt: no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    };
    let (not_before, not_after, dns_names) = read_leaf(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(entry.private_key_pem.expose().as_bytes())
        .map_err(|_| "tls.key: no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned())?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => "tls.key: does not match the certificate in tls.crt".to_owned(),
        _ => "tls.key: not a private key this gateway can use (RSA, ECDSA P-256/P-384 or Ed25519)".to_owned(),
    })?;
    Ok(Parsed {
        source: entry.clone(),
        key: Arc::new(key),
        dns_names,
        not_after: Some(not_after),
        not_before: Some(not_before),
    })
}

/// The leaf's validity and SAN DNS names.
fn read_leaf(der: &CertificateDer<'_>) -> Result<(jiff::Timestamp, jiff::Timestamp, Vec<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("tls.crt: the first certificate cannot be read: {e}"))?;
    let time = |t: &x509_parser::time::ASN1Time| {
        jiff::Timestamp::from_second(t.timestamp()).map_err(|e| format!("tls.crt: validity out of range: {e}"))
    };
    let validity = cert.validity();
    let (not_before, not_after) = (time(&validity.not_before)?, time(&validity.not_after)?);
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    Ok((not_before, not_after, names))
}

#[cfg(test)]
mod tests {
    use gatehouse_crds::PrivateKeyPem;

    use super::*;

    fn cert(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let c = params.self_signed(&key).expect("cert");
        (c.pem(), key.serialize_pem())
    }

    fn entry(name: &str, (crt, key): &(String, String), default: bool) -> CertificateEntry {
        CertificateEntry {
            namespace: "default".into(),
            name: name.into(),
            default,
            certificate_pem: crt.clone(),
            private_key_pem: PrivateKeyPem::new(key.clone()),
            ca_certificate_pem: None,
        }
    }

    fn api(name: &str, hosts: &[&str], secret: &str) -> ApiEntry {
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let yaml = format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: /{name}/\n  hosts: {hosts:?}\n  tls: {{secretName: {secret}}}\n  upstream: {{url: 'http://127.0.0.1:1'}}\n"
        );
        let parsed = gatehouse_crds::manifest::parse("test", &yaml);
        let Some((_, gatehouse_crds::manifest::Resource::Api(a))) = parsed.resources.into_iter().next() else {
            panic!("bad test API: {:?}", parsed.rejected)
        };
        ApiEntry::compile(&a, None).expect("compiles")
    }

    fn snapshot(certs: Vec<CertificateEntry>) -> Snapshot {
        Snapshot { certificates: certs.into_iter().map(|c| (c.id(), c)).collect(), ..Default::default() }
    }

    fn same(a: Option<&Arc<CertifiedKey>>, b: &Arc<CertifiedKey>) -> bool {
        a.is_some_and(|a| Arc::ptr_eq(a, b))
    }

    #[test]
    fn sni_picks_exact_host_then_wildcard_then_default() {
        let (a, wild, def) = (cert(&["a.example"]), cert(&["*.wild.example"]), cert(&["default.example"]));
        let snap = snapshot(vec![entry("a", &a, false), entry("wild", &wild, false), entry("def", &def, true)]);
        let apis = [api("a", &["a.example"], "a"), api("w", &["x.wild.example"], "wild")];
        let built = build(&snap, &apis, &CertTable::default());
        assert!(built.api_problems.is_empty(), "{:?}", built.api_problems);
        let t = &built.table;
        let key = |id: &str| t.parsed[id].key.clone();
        assert!(same(t.lookup(Some("a.example")), &key("default/a")));
        assert!(same(t.lookup(Some("x.wild.example")), &key("default/wild")));
        assert!(same(t.lookup(Some("y.wild.example")), &key("default/wild")), "any one label");
        assert!(same(t.lookup(Some("z.y.wild.example")), &key("default/def")), "one label only");
        assert!(same(t.lookup(None), &key("default/def")));
        assert!(same(t.lookup(Some("unknown.example")), &key("default/def")));
    }

    #[test]
    fn bad_secrets_are_reported_without_key_material_and_keep_their_last_good_version() {
        let a = cert(&["a.example"]);
        let first =
            build(&snapshot(vec![entry("a", &a, false)]), &[api("a", &["a.example"], "a")], &CertTable::default());
        let good = first.table.parsed["default/a"].key.clone();

        let other = cert(&["a.example"]);
        let mismatched = (a.0.clone(), other.1.clone());
        let next =
            build(&snapshot(vec![entry("a", &mismatched, false)]), &[api("a", &["a.example"], "a")], &first.table);
        assert_eq!(
            next.certificates[0].state,
            "tls.key: does not match the certificate in tls.crt (serving its last good version)"
        );
        assert!(same(next.table.lookup(Some("a.example")), &good), "the last good version serves");
        assert!(next.api_problems["default/a"].contains("is not a usable certificate"), "{:?}", next.api_problems);

        let garbage = ("not pem".to_owned(), "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n".to_owned());
        let fresh = build(&snapshot(vec![entry("b", &garbage, false)]), &[], &CertTable::default());
        let shown = format!("{:?}", fresh.certificates);
        assert!(fresh.certificates[0].state.starts_with("tls.crt:"), "{shown}");
        assert!(!shown.contains("SECRETSECRET"));
        let garbage_key =
            (a.0.clone(), "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n".to_owned());
        let fresh = build(&snapshot(vec![entry("b", &garbage_key, false)]), &[], &CertTable::default());
        assert!(fresh.certificates[0].state.starts_with("tls.key:"), "{:?}", fresh.certificates);
        assert!(!format!("{:?}", fresh.certificates).contains("SECRETSECRET"));
    }

    #[test]
    fn a_certificate_must_cover_the_hosts_and_a_missing_secret_is_named() {
        let a = cert(&["a.example"]);
        let built = build(
            &snapshot(vec![entry("a", &a, false)]),
            &[api("a", &["a.example", "b.example"], "a"), api("m", &["m.example"], "missing")],
            &CertTable::default(),
        );
        assert_eq!(
            built.api_problems["default/a"],
            "spec.tls.secretName: the certificate in default/a does not cover host b.example (it names a.example)"
        );
        assert_eq!(built.api_problems["default/m"], "spec.tls.secretName: Secret default/missing not found");
        assert!(built.table.lookup(Some("a.example")).is_some());
        assert!(built.table.lookup(Some("b.example")).is_none(), "no default, nothing served before");
    }

    #[test]
    fn a_host_claimed_with_two_certificates_keeps_the_older_apis_whatever_the_names() {
        let (victim, intruder) = (cert(&["shop.example"]), cert(&["shop.example"]));
        let mut older = api("zz-shop", &["shop.example"], "victim");
        older.creation_timestamp = Some(jiff::Timestamp::from_second(1_000).expect("time"));
        let mut newer = api("aa-intruder", &["shop.example"], "intruder");
        newer.creation_timestamp = Some(jiff::Timestamp::from_second(2_000).expect("time"));
        let snap = snapshot(vec![entry("victim", &victim, false), entry("intruder", &intruder, false)]);
        // Listed first by name, the newer API still does not get the host.
        let built = build(&snap, &[newer, older], &CertTable::default());
        let t = &built.table;
        assert!(same(t.lookup(Some("shop.example")), &t.parsed["default/victim"].key.clone()));
        assert_eq!(
            built.api_problems["default/aa-intruder"],
            "spec.tls.secretName: host shop.example is served with default/victim, the certificate of default/zz-shop"
        );
        assert!(!built.api_problems.contains_key("default/zz-shop"));
    }
}
