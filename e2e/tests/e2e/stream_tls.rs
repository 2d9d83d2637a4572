//! The config stream over TLS: certificates an ApiDefinition names reach dataplanes and are
//! served (and rotated) without restarts; Secrets no API names never leave the controller;
//! an mtls API's client CA reaches them as its `ca.crt`; a dataplane that cannot verify the
//! controller takes nothing from it.

use std::{path::Path, sync::Arc};

use gatehouse_crds::ApiDefinition;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cluster::{cluster, fresh_namespace, install_crds},
    procs::{Proc, controller_with, dataplane_with, eventually, get, upstream},
};

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// PEM certificate and key for `names`.
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = params.signed_by(&key, &self.issuer).unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), key.serialize_pem())
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.display().to_string()
}

pub fn tls_secret(name: &str, (crt, key): &(String, String)) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: {name}}}\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(crt),
        indent(key)
    )
}

/// GET `path` over TLS with SNI `host`, trusting `ca`: the status line and the leaf
/// certificate the server showed.
pub async fn https_get(
    addr: std::net::SocketAddr,
    host: &str,
    ca: &str,
    path: &str,
) -> Result<(String, Vec<u8>), String> {
    https_get_as(addr, host, ca, path, None).await
}

/// As `https_get`, presenting `client` (PEM certificate and key) when asked for one.
pub async fn https_get_as(
    addr: std::net::SocketAddr,
    host: &str,
    ca: &str,
    path: &str,
    client: Option<&(String, String)>,
) -> Result<(String, Vec<u8>), String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some((crt, key)) => {
            let chain = CertificateDer::pem_slice_iter(crt.as_bytes()).collect::<Result<Vec<_>, _>>();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| e.to_string())?;
            config.with_client_auth_cert(chain.map_err(|e| e.to_string())?, key).map_err(|e| e.to_string())?
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // A peer that closes without close_notify still sent its answer.
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    Ok((text.lines().next().unwrap_or_default().to_owned(), leaf))
}

pub fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec()).unwrap_or_else(|e| panic!("{e}"))
}

async fn certificate_ids(dp: &Proc) -> Result<Vec<String>, String> {
    let (_, body) = get(&format!("http://{}/config", dp.admin), &[]).await?;
    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(v["certificates"].as_array().into_iter().flatten().filter_map(|c| c["id"].as_str().map(str::to_owned)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_tls_stream_named_certificates_are_served_and_rotated_and_an_unverified_controller_is_refused() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "tls-stream").await;
    let kubectl = |args: &[&str], stdin: Option<&str>| crate::controller::kubectl(&c, &ns, args, stdin);
    kubectl(&["create", "serviceaccount", "dataplane"], None);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = dir.path().join("token");
    std::fs::write(&token, kubectl(&["create", "token", "dataplane", "--audience", "gatehouse"], None).trim())
        .unwrap_or_else(|e| panic!("{e}"));

    let stream_ca = Ca::new("Gatehouse stream CA");
    let (crt, key) = stream_ca.leaf(&["gatehouse-controller.test.svc"]);
    let ca_file = write(&dir.path().join("stream-ca.crt"), &stream_ca.pem);
    let ctl = controller_with(
        &c.kubeconfig,
        &[&ns],
        "ctl-1",
        &[
            format!("--tls-cert-file={}", write(&dir.path().join("tls.crt"), &crt)),
            format!("--tls-key-file={}", write(&dir.path().join("tls.key"), &key)),
            format!("--tls-ca-file={ca_file}"),
        ],
    );
    let url = format!("https://{}", ctl.addr);
    let verified = |ca: &str| {
        vec![
            format!("--controller-ca-file={ca}"),
            "--controller-server-name=gatehouse-controller.test.svc".to_owned(),
            "--tls-listen=127.0.0.1:0".to_owned(),
        ]
    };
    let dp = dataplane_with(&url, &token, &dir.path().join("dp"), "dp-1", &verified(&ca_file));
    let tls_addr = dp.tls.unwrap_or_else(|| panic!("the dataplane logged no TLS address"));

    let up = upstream("s").await;
    let site_ca = Ca::new("Site CA");
    let first = site_ca.leaf(&["secure.example"]);
    kubectl(&["apply", "-f", "-"], Some(&tls_secret("secure-cert", &first)));
    kubectl(&["apply", "-f", "-"], Some(&tls_secret("unused-cert", &site_ca.leaf(&["other.example"]))));
    let api = format!(
        "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: secure}}\nspec:\n  listenPath: /secure/\n  hosts: [secure.example]\n  tls: {{secretName: secure-cert}}\n  upstream: {{url: \"http://{up}\"}}\n"
    );
    kubectl(&["apply", "-f", "-"], Some(&api));

    eventually("HTTPS with the Secret's certificate", || async {
        match https_get(tls_addr, "secure.example", &site_ca.pem, "/secure/x").await? {
            (status, leaf) if status == "HTTP/1.1 200 OK" && leaf == der(&first.0) => Ok(()),
            other => Err(format!("{}: {:?}", other.0, other.1.len())),
        }
    })
    .await;
    eventually("Programmed=True", || async {
        match crate::procs::condition::<ApiDefinition>(&c.client, &ns, "secure", "Programmed").await? {
            (s, ..) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let ids = certificate_ids(&dp).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, [format!("{ns}/secure-cert")], "only the certificate an API names is sent");

    // Client certificates: the CA an mtls API names travels as its ca.crt and admits its
    // clients only.
    let partners = Ca::new("Partner CA");
    let partner = partners.leaf(&["partner.client"]);
    kubectl(&["apply", "-f", "-"], Some(&tls_secret("partners-cert", &site_ca.leaf(&["partners.example"]))));
    let ca_secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: partner-ca}}\nstringData:\n  ca.crt: |\n{}",
        partners.pem.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    kubectl(&["apply", "-f", "-"], Some(&ca_secret));
    let mtls = format!(
        "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: partners}}\nspec:\n  listenPath: /partners/\n  hosts: [partners.example]\n  tls: {{secretName: partners-cert}}\n  auth: {{type: mtls, mtls: {{caSecretRef: {{name: partner-ca}}}}}}\n  upstream: {{url: \"http://{up}\"}}\n"
    );
    kubectl(&["apply", "-f", "-"], Some(&mtls));
    eventually("a partner's certificate admitted", || async {
        match https_get_as(tls_addr, "partners.example", &site_ca.pem, "/partners/x", Some(&partner)).await? {
            (status, _) if status == "HTTP/1.1 200 OK" => Ok(()),
            other => Err(other.0),
        }
    })
    .await;
    let (status, _) =
        https_get(tls_addr, "partners.example", &site_ca.pem, "/partners/x").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, "HTTP/1.1 401 Unauthorized", "no certificate");
    let stranger = Ca::new("Stranger CA").leaf(&["stranger.client"]);
    let (status, _) = https_get_as(tls_addr, "partners.example", &site_ca.pem, "/partners/x", Some(&stranger))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, "HTTP/1.1 403 Forbidden", "a certificate of another CA");

    // Rotation: new connections get the new certificate, with no restart.
    let second = site_ca.leaf(&["secure.example"]);
    kubectl(&["apply", "-f", "-"], Some(&tls_secret("secure-cert", &second)));
    eventually("the rotated certificate", || async {
        match https_get(tls_addr, "secure.example", &site_ca.pem, "/secure/x").await? {
            (status, leaf) if status == "HTTP/1.1 200 OK" && leaf == der(&second.0) => Ok(()),
            other => Err(format!("{}: {} bytes", other.0, other.1.len())),
        }
    })
    .await;

    // A dataplane trusting another CA never takes config from this controller.
    let other_ca = write(&dir.path().join("other-ca.crt"), &Ca::new("Another CA").pem);
    let doubtful = dataplane_with(&url, &token, &dir.path().join("dp-bad"), "dp-bad", &verified(&other_ca));
    eventually("the refusal in the dataplane's log", || async {
        let logs = doubtful.logs();
        if logs.contains("config stream lost") && logs.contains("UnknownIssuer") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    let ready = get(&format!("http://{}/readyz", doubtful.admin), &[]).await;
    assert_eq!(ready.map(|r| r.0), Ok(http::StatusCode::SERVICE_UNAVAILABLE));
    // The first dataplane kept serving throughout.
    let (status, _) =
        https_get(tls_addr, "secure.example", &site_ca.pem, "/secure/x").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, "HTTP/1.1 200 OK");
}
