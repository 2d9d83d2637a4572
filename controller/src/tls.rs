//! TLS for the config stream: the serving certificate, read again whenever its files change
//! (the kubelet and cert-manager rotate them in place, so a restart is never needed), and
//! the client that forwards acks to the leader, checking it against the same CA and name.

use std::{
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

/// What identifies a version of a file without reading it.
type Stamp = (u64, i64, i64, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// The serving certificate and key, from PEM files.
pub struct ServingCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    /// The files' versions last read, served or refused: a refused pair is not read again
    /// on every handshake, only once the files change.
    stamps: (Stamp, Stamp),
    key: Arc<CertifiedKey>,
    dns_names: Vec<String>,
}

impl fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCertificate").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl ServingCertificate {
    /// Reads both files; at start, a certificate that cannot be served is an error.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let loaded = read(cert, key)?;
        Ok(Arc::new(Self { cert: cert.to_owned(), key: key.to_owned(), current: Mutex::new(loaded) }))
    }

    /// The certificate's DNS names: the first is the name forwarded acks check the leader by.
    pub fn dns_names(&self) -> Vec<String> {
        self.lock().dns_names.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current key, read again first if either file changed. A new version that cannot
    /// be served (half written, key and certificate not matching yet) leaves the last good
    /// one serving, and is tried again on the next connection.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.lock();
        let now = (stamp(&self.cert), stamp(&self.key));
        if let (Ok(c), Ok(k)) = now
            && (c, k) != loaded.stamps
        {
            match read(&self.cert, &self.key) {
                Ok(fresh) => {
                    tracing::info!(cert = %self.cert.display(), names = ?fresh.dns_names, "serving certificate changed; new connections get the new one");
                    *loaded = fresh;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new serving certificate not usable yet; the last good one serves")
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let stamps = (stamp(cert).map_err(|e| file_error(cert, e))?, stamp(key).map_err(|e| file_error(key, e))?);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(cert, format!("not PEM certificates: {e}")))?;
    let Some(leaf) = chain.first() else { return Err(file_error(cert, "no PEM certificate")) };
    let dns_names = dns_names(leaf).map_err(|e| file_error(cert, e))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, format!("no PEM private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|e| file_error(key, e))?;
    Ok(Loaded { stamps, key: Arc::new(certified), dns_names })
}

fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the first certificate cannot be read: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    Ok(names)
}

/// TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(cert: Arc<ServingCertificate>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub type ForwardClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client forwarded acks go through. The leader is reached by pod address, which no
/// certificate names, so it is checked by the name our own certificate has (every replica
/// serves the same one) and against `ca` (PEM).
pub fn forward_client(ca: &Path, name: &str) -> Result<ForwardClient, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(ca, format!("not PEM certificates: {e}")))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(file_error(ca, "no CA certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| TlsError::File { path: "--tls-cert-file".into(), reason: format!("DNS name {name:?}: {e}") })?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .with_server_name_resolver(FixedServerNameResolver::new(name))
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        // Rename into place, as the kubelet's atomic writer does.
        for (path, text) in [(&c, cert.pem()), (&k, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, path).expect("rename");
        }
        (c, k)
    }

    #[test]
    fn a_rotated_certificate_is_served_and_a_broken_one_leaves_the_last_good_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_pair(dir.path(), &["one.example"]);
        let serving = ServingCertificate::load(&c, &k).expect("loads");
        let first = serving.current();
        assert_eq!(serving.dns_names(), ["one.example"]);
        assert!(Arc::ptr_eq(&first, &serving.current()), "unchanged files are not read again");

        write_pair(dir.path(), &["two.example"]);
        let second = serving.current();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(serving.dns_names(), ["two.example"]);

        std::fs::write(&k, "not a key").expect("write");
        assert!(Arc::ptr_eq(&second, &serving.current()), "the last good certificate keeps serving");
        assert_eq!(serving.dns_names(), ["two.example"]);
    }

    #[test]
    fn files_that_are_no_certificate_are_refused_at_start_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = write_pair(dir.path(), &["one.example"]);
        std::fs::write(&c, "garbage").expect("write");
        let e = ServingCertificate::load(&c, &k).expect_err("refused").to_string();
        assert!(e.starts_with(&c.display().to_string()), "{e}");
        let missing = dir.path().join("missing.key");
        let e = ServingCertificate::load(&dir.path().join("missing.crt"), &missing).expect_err("refused");
        assert!(e.to_string().contains("missing.crt"), "{e}");
    }
}
