//! Certificates: `kubernetes.io/tls` Secrets, named by an ApiDefinition's `spec.tls` or
//! labelled as the default certificate. This crate only carries the PEM text; the
//! dataplane parses and checks it (a bad certificate is its report, never a parse error
//! here, so that the last good version of it can keep serving).

use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use serde::{Deserialize, Serialize};

use crate::ResourceError;

/// The Secret type that makes a Secret a certificate.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// The label (`"true"`) that makes a certificate the one served to clients that send no
/// SNI name, or a name no API's certificate covers.
pub const DEFAULT_CERTIFICATE_LABEL: &str = "gatehouse.dev/default-certificate";

/// A PEM private key. Never printed: `Debug` shows only that it is there, so a snapshot,
/// a resource or an error that holds one can be logged without leaking it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for the TLS stack only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

/// A `kubernetes.io/tls` Secret as the gateway needs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecret {
    pub namespace: String,
    pub name: String,
    /// Labelled `gatehouse.dev/default-certificate: "true"`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// `tls.crt`: the chain, leaf first.
    pub certificate_pem: String,
    /// `tls.key`.
    pub private_key_pem: PrivateKeyPem,
    /// `ca.crt`, where the Secret has one (cert-manager writes the issuer's there): what an
    /// upstream's `tls.caSecretRef` may trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate_pem: Option<String>,
}

/// A Secret of another type with a `ca.crt`: certificates an upstream's
/// `tls.caSecretRef` trusts. Not secret in itself, but kept with the Secrets it comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecret {
    pub namespace: String,
    pub name: String,
    /// `ca.crt`: one or more PEM certificates.
    pub ca_certificate_pem: String,
}

impl CaSecret {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The key a CA bundle is read from, in any Secret.
pub const CA_KEY: &str = "ca.crt";

/// Whether a Secret carries a `ca.crt` entry.
pub fn has_ca(s: &Secret) -> bool {
    s.string_data.as_ref().is_some_and(|d| d.contains_key(CA_KEY))
        || s.data.as_ref().is_some_and(|d| d.contains_key(CA_KEY))
}

impl TlsSecret {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether a Secret is a certificate (`type: kubernetes.io/tls`).
pub fn is_tls_secret(s: &Secret) -> bool {
    s.type_.as_deref() == Some(TLS_SECRET_TYPE)
}

/// Reads a `kubernetes.io/tls` Secret (`data` or `stringData`: `tls.crt`, `tls.key`). The
/// PEM is checked by the dataplane; here only that both are there and are text.
pub fn tls_from_secret(s: &Secret) -> Result<TlsSecret, ResourceError> {
    let namespace = s.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let name = s.metadata.name.clone().unwrap_or_default();
    let resource = format!("Secret {namespace}/{name}");
    let field = |k: &str| {
        pem_field(s, &resource, k)?.ok_or_else(|| {
            ResourceError::new(&resource, format!("data.{k}"), "is required in a kubernetes.io/tls Secret")
        })
    };
    let certificate_pem = field("tls.crt")?;
    let private_key_pem = PrivateKeyPem::new(field("tls.key")?);
    let ca_certificate_pem = pem_field(s, &resource, CA_KEY)?;
    let default =
        s.metadata.labels.as_ref().and_then(|l| l.get(DEFAULT_CERTIFICATE_LABEL)).map(String::as_str) == Some("true");
    Ok(TlsSecret { namespace, name, default, certificate_pem, private_key_pem, ca_certificate_pem })
}

/// Reads the `ca.crt` of a Secret that is neither a key nor a certificate.
pub fn ca_from_secret(s: &Secret) -> Result<CaSecret, ResourceError> {
    let namespace = s.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let name = s.metadata.name.clone().unwrap_or_default();
    let resource = format!("Secret {namespace}/{name}");
    let ca_certificate_pem = pem_field(s, &resource, CA_KEY)?
        .ok_or_else(|| ResourceError::new(&resource, format!("data.{CA_KEY}"), "is missing"))?;
    Ok(CaSecret { namespace, name, ca_certificate_pem })
}

/// One entry of `stringData` (first) or `data`, as text; None when absent.
fn pem_field(s: &Secret, resource: &str, k: &str) -> Result<Option<String>, ResourceError> {
    let bytes = s
        .string_data
        .as_ref()
        .and_then(|d| d.get(k))
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| s.data.as_ref().and_then(|d| d.get(k)).map(|v| v.0.clone()));
    // Never quote the bytes: this may be the private key.
    bytes
        .map(|b| String::from_utf8(b).map_err(|_| ResourceError::new(resource, format!("data.{k}"), "is not PEM text")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_key_never_shows_in_debug_output() {
        let s = TlsSecret {
            namespace: "ns".into(),
            name: "c".into(),
            default: false,
            certificate_pem: "CERT".into(),
            private_key_pem: PrivateKeyPem::new("-----BEGIN PRIVATE KEY-----\nSECRETBYTES\n".into()),
            ca_certificate_pem: None,
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("SECRETBYTES"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
