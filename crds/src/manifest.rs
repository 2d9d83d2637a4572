//! Reading the manifests a user would `kubectl apply` (multi-document YAML), with errors
//! that name the file, the resource and the field.

use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    ApiDefinition, CA_KEY, CaSecret, KEY_LABEL, KeySession, Plugin, ResourceError, TLS_SECRET_TYPE, TlsSecret,
    ca_from_secret, key_hash, tls_from_secret,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ApiDefinition,
    Plugin,
    Key,
    /// A `kubernetes.io/tls` Secret.
    Certificate,
    /// Another Secret with a `ca.crt` (and no key label): a CA bundle for upstream TLS.
    CaCertificate,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::ApiDefinition => "ApiDefinition",
            Kind::Plugin => "Plugin",
            Kind::Key | Kind::Certificate | Kind::CaCertificate => "Secret",
        })
    }
}

/// Which resource a document is, as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A key Secret as the gateway needs it: the raw key is hashed while reading and dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySecret {
    pub namespace: String,
    pub name: String,
    pub hash: String,
    pub session: KeySession,
}

// Resources are read once per config change, never per request: size does not matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Resource {
    Api(ApiDefinition),
    Plugin(Plugin),
    Key(KeySecret),
    Certificate(TlsSecret),
    CaCertificate(CaSecret),
}

/// A document that could not be used, with its identity when that much was readable (so a
/// caller can keep serving the resource's last good version).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Option<ResourceId>,
    pub error: ResourceError,
}

/// What one YAML text yields: usable resources, rejected documents, and documents that are
/// not Gatehouse's (Secrets that are neither keys nor certificates), which callers may ignore.
#[derive(Debug, Default)]
pub struct Parsed {
    pub resources: Vec<(ResourceId, Resource)>,
    pub rejected: Vec<Rejected>,
    pub ignored: Vec<String>,
}

const NAMESPACE: &str = "default";

/// Parses every document in `text`; `origin` (a file name) prefixes every error.
pub fn parse(origin: &str, text: &str) -> Parsed {
    let mut out = Parsed::default();
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(e) => {
            out.rejected
                .push(Rejected { id: None, error: ResourceError::new(origin, "", format!("not valid YAML: {e}")) });
            return out;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        match parse_document(doc) {
            Ok(Some((id, r))) => out.resources.push((id, r)),
            Ok(None) => {
                out.ignored.push(format!(
                    "{origin}: document {}: a Secret that is neither a key (label {KEY_LABEL}=true), a certificate (type {TLS_SECRET_TYPE}) nor a CA bundle ({CA_KEY})",
                    i + 1
                ))
            }
            Err((id, mut error)) => {
                error.resource = match &id {
                    Some(id) => format!("{origin}: {id}"),
                    None => format!("{origin}: document {}", i + 1),
                };
                out.rejected.push(Rejected { id, error });
            }
        }
    }
    out
}

type DocResult = Result<Option<(ResourceId, Resource)>, (Option<ResourceId>, ResourceError)>;

#[allow(clippy::result_large_err)] // once per document, off the request path
fn parse_document(doc: Value) -> DocResult {
    let no_id = |field: &str, reason: String| (None, ResourceError::new("", field, reason));
    let Value::Object(map) = &doc else {
        return Err(no_id("", "a manifest must be a YAML mapping".to_owned()));
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let (api_version, kind_name) = (text("apiVersion"), text("kind"));
    let meta = map.get("metadata");
    let meta_str = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = meta_str("name").unwrap_or("").to_owned();
    let namespace = meta_str("namespace").unwrap_or(NAMESPACE).to_owned();
    let (kind, want_version) = match kind_name.as_str() {
        "ApiDefinition" => (Kind::ApiDefinition, "gatehouse.dev/v1alpha1"),
        "Plugin" => (Kind::Plugin, "gatehouse.dev/v1alpha1"),
        "Secret" if text("type") == TLS_SECRET_TYPE => (Kind::Certificate, "v1"),
        "Secret" => (Kind::Key, "v1"),
        "" => return Err(no_id("kind", "is missing".to_owned())),
        other => {
            return Err(no_id("kind", format!("{other:?} is not one of ApiDefinition, Plugin, Secret")));
        }
    };
    if name.is_empty() {
        let reason = match meta.and_then(|m| m.get("name")) {
            None | Some(Value::Null) => "is missing".to_owned(),
            Some(v) => format!("must be a string, got {v} (quote it: YAML reads off, no, yes, on as booleans)"),
        };
        return Err(no_id("metadata.name", reason));
    }
    // A Secret is a key only when labelled; unlabelled, one with a `ca.crt` is a CA bundle.
    let labelled =
        meta.and_then(|m| m.get("labels")).and_then(|l| l.get(KEY_LABEL)).and_then(Value::as_str) == Some("true");
    let has_ca = ["data", "stringData"].iter().any(|k| map.get(*k).and_then(|d| d.get(CA_KEY)).is_some());
    let kind = if kind == Kind::Key && !labelled && has_ca { Kind::CaCertificate } else { kind };
    let id = ResourceId { kind, namespace, name };
    let fail = |field: &str, reason: String| (Some(id.clone()), ResourceError::new(id.to_string(), field, reason));
    if api_version != want_version {
        return Err(fail("apiVersion", format!("must be {want_version}, got {api_version:?}")));
    }
    if kind == Kind::Key && !labelled {
        return Ok(None);
    }
    let resource = match kind {
        Kind::ApiDefinition => {
            let api: ApiDefinition = typed(doc).map_err(|(f, r)| fail(&f, r))?;
            if let Some(e) = api.spec.validate(&id.to_string()).into_iter().next() {
                return Err(fail(&e.field, e.reason));
            }
            Resource::Api(api)
        }
        Kind::Plugin => {
            let p: Plugin = typed(doc).map_err(|(f, r)| fail(&f, r))?;
            if let Some(e) = p.spec.validate(&id.to_string()).into_iter().next() {
                return Err(fail(&e.field, e.reason));
            }
            Resource::Plugin(p)
        }
        Kind::Key => {
            let s: Secret = typed(doc).map_err(|(f, r)| fail(&f, r))?;
            Resource::Key(key_from_secret(&s).map_err(|e| fail(&e.field, e.reason))?)
        }
        Kind::Certificate => {
            let s: Secret = typed(doc).map_err(|(f, r)| fail(&f, r))?;
            Resource::Certificate(tls_from_secret(&s).map_err(|e| fail(&e.field, e.reason))?)
        }
        Kind::CaCertificate => {
            let s: Secret = typed(doc).map_err(|(f, r)| fail(&f, r))?;
            Resource::CaCertificate(ca_from_secret(&s).map_err(|e| fail(&e.field, e.reason))?)
        }
    };
    Ok(Some((id, resource)))
}

/// Deserializes with the path of the failing field, e.g. `spec.upstream.timeout`.
fn typed<T: DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        (path, e.into_inner().to_string())
    })
}

/// Reads a key Secret (`data` or `stringData`: `key`, optional `session.yaml`).
pub fn key_from_secret(s: &Secret) -> Result<KeySecret, ResourceError> {
    let namespace = s.metadata.namespace.clone().unwrap_or_else(|| NAMESPACE.to_owned());
    let name = s.metadata.name.clone().unwrap_or_default();
    let resource = format!("Secret {namespace}/{name}");
    let field = |k: &str| -> Option<Vec<u8>> {
        s.string_data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| v.as_bytes().to_vec())
            .or_else(|| s.data.as_ref().and_then(|d| d.get(k)).map(|v| v.0.clone()))
    };
    let raw =
        field("key").ok_or_else(|| ResourceError::new(&resource, "data.key", "is required: the token clients send"))?;
    if raw.is_empty() {
        return Err(ResourceError::new(&resource, "data.key", "must not be empty"));
    }
    let session = match field("session.yaml") {
        None => KeySession::default(),
        Some(bytes) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| ResourceError::new(&resource, "data.session.yaml", "is not UTF-8"))?;
            let v: Value = serde_saphyr::from_str(&text)
                .map_err(|e| ResourceError::new(&resource, "data.session.yaml", format!("not valid YAML: {e}")))?;
            let v = if v.is_null() { Value::Object(Default::default()) } else { v };
            let session: KeySession = typed(v).map_err(|(f, r)| {
                let field =
                    if f.is_empty() { "data.session.yaml".to_owned() } else { format!("data.session.yaml: {f}") };
                ResourceError::new(&resource, field, r)
            })?;
            if let Some(mut e) = session.validate(&resource).into_iter().next() {
                e.field = e.field.replacen("session.yaml.", "data.session.yaml: ", 1);
                return Err(e);
            }
            session
        }
    };
    Ok(KeySecret { namespace, name, hash: key_hash(&raw), session })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: gatehouse.dev/v1alpha1
kind: ApiDefinition
metadata: {name: httpbin}
spec:
  listenPath: /httpbin/
  upstream: {url: "http://127.0.0.1:8080", timeout: 5s}
---
apiVersion: v1
kind: Secret
metadata: {name: alice, labels: {gatehouse.dev/key: "true"}}
stringData:
  key: secret-token
  session.yaml: |
    rate: 10
    per: 1s
    accessRights: [httpbin]
---
apiVersion: v1
kind: Secret
metadata: {name: unrelated}
stringData: {password: x}
"#;

    fn one_error(text: &str) -> ResourceError {
        let p = parse("apis.yaml", text);
        assert!(p.resources.is_empty(), "expected a rejection, got {:?}", p.resources);
        assert_eq!(p.rejected.len(), 1, "{:?}", p.rejected);
        p.rejected[0].error.clone()
    }

    #[test]
    fn reads_apis_and_key_secrets_and_ignores_other_secrets() {
        let p = parse("apis.yaml", GOOD);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert_eq!(p.resources.len(), 2);
        assert_eq!(p.ignored.len(), 1);
        let Resource::Key(k) = &p.resources[1].1 else { panic!("not a key") };
        assert_eq!(k.hash, key_hash(b"secret-token"));
        assert_eq!(k.session.rate, Some(10));
    }

    #[test]
    fn mtls_auth_needs_its_ca_and_hosts_and_only_with_its_type() {
        let head = "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: /a/\n  upstream: {url: 'http://127.0.0.1:1'}\n";
        let e = one_error(&format!("{head}  hosts: [a.example]\n  auth: {{type: mtls}}\n"));
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("spec.auth.mtls", "is required when spec.auth.type is mtls")
        );
        let e = one_error(&format!("{head}  auth: {{type: mtls, mtls: {{caSecretRef: {{name: clients}}}}}}\n"));
        assert_eq!(e.field, "spec.hosts");
        assert!(e.reason.contains("requires spec.hosts"), "{e:?}");
        let e =
            one_error(&format!("{head}  hosts: [a.example]\n  auth: {{mtls: {{caSecretRef: {{name: clients}}}}}}\n"));
        assert_eq!(e.field, "spec.auth.mtls");
        let ok = parse(
            "apis.yaml",
            &format!("{head}  hosts: [a.example]\n  auth: {{type: mtls, mtls: {{caSecretRef: {{name: clients}}}}}}\n"),
        );
        assert!(ok.rejected.is_empty(), "{:?}", ok.rejected);
    }

    #[test]
    fn unknown_field_names_file_resource_and_field() {
        let e = one_error(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: /a/\n  upstream: {url: 'http://127.0.0.1:1', tmeout: 1s}\n",
        );
        assert_eq!(e.resource, "apis.yaml: ApiDefinition default/a");
        assert_eq!(e.field, "spec.upstream.tmeout");
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn analytics_entries_read_detailed_recording_and_refuse_unknown_fields() {
        let head = "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: /a/\n  upstream: {url: 'http://127.0.0.1:1'}\n  middleware:\n    analytics:\n";
        let p = parse(
            "apis.yaml",
            &format!(
                "{head}    - {{plugin: mask, symbol: MaskPasswords, detailedRecording: true, config: {{k: v}}}}\n"
            ),
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let Resource::Api(a) = &p.resources[0].1 else { panic!("not an API") };
        let entry = &a.spec.middleware.analytics[0];
        assert!(entry.detailed_recording);
        assert_eq!((entry.hook.plugin.as_str(), entry.hook.symbol.as_str()), ("mask", "MaskPasswords"));
        let (field, _) = a.spec.middleware.refs().last().expect("a ref");
        assert_eq!(field, "spec.middleware.analytics[0]");
        let e = one_error(&format!("{head}    - {{plugin: mask, symbol: MaskPasswords, withBodies: true}}\n"));
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn invalid_duration_names_its_field() {
        let e = one_error(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a, namespace: team}\nspec:\n  listenPath: /a/\n  upstream: {url: 'http://127.0.0.1:1', timeout: 3x}\n",
        );
        assert_eq!(e.resource, "apis.yaml: ApiDefinition team/a");
        assert_eq!(e.field, "spec.upstream.timeout");
        assert!(e.reason.contains("invalid duration"), "{e}");
    }

    #[test]
    fn semantic_errors_name_their_field() {
        let e = one_error(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: a/\n  upstream: {url: 'http://127.0.0.1:1'}\n",
        );
        assert_eq!(e.field, "spec.listenPath");
        let e = one_error(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: /a/\n  upstream: {url: 'http://127.0.0.1:1', targets: ['http://127.0.0.1:2']}\n",
        );
        assert_eq!(e.field, "spec.upstream");
    }

    #[test]
    fn broken_yaml_is_reported_against_the_file() {
        let e = one_error("kind: [unclosed\n");
        assert_eq!(e.resource, "apis.yaml");
        assert!(e.reason.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn bad_session_yaml_is_reported_inside_the_secret() {
        let e = one_error(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k, labels: {gatehouse.dev/key: 'true'}}\nstringData:\n  key: t\n  session.yaml: 'rate: 5'\n",
        );
        assert_eq!(e.resource, "apis.yaml: Secret default/k");
        assert_eq!(e.field, "data.session.yaml: per");
    }

    #[test]
    fn a_name_yaml_reads_as_boolean_gets_a_hint() {
        let e = one_error("apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: off}\n");
        assert_eq!(e.field, "metadata.name");
        assert!(e.reason.contains("quote it"), "{e}");
    }

    #[test]
    fn tls_secrets_are_certificates_with_their_default_label() {
        let p = parse(
            "certs.yaml",
            "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {name: c, labels: {gatehouse.dev/default-certificate: 'true'}}\nstringData: {tls.crt: CERT, tls.key: KEY}\n",
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let Resource::Certificate(c) = &p.resources[0].1 else { panic!("not a certificate") };
        assert_eq!((c.id().as_str(), c.default, c.certificate_pem.as_str()), ("default/c", true, "CERT"));
        let e = one_error(
            "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {name: c}\nstringData: {tls.crt: CERT}\n",
        );
        assert_eq!((e.resource.as_str(), e.field.as_str()), ("apis.yaml: Secret default/c", "data.tls.key"));
    }

    #[test]
    fn ca_bundles_come_from_any_secret_with_a_ca_crt_that_is_not_a_key() {
        let p = parse(
            "ca.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: ca}\nstringData: {ca.crt: CA}\n---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {name: issued}\nstringData: {tls.crt: CERT, tls.key: KEY, ca.crt: ISSUER}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: other}\nstringData: {password: x}\n",
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let Resource::CaCertificate(ca) = &p.resources[0].1 else { panic!("not a CA bundle") };
        assert_eq!((ca.id().as_str(), ca.ca_certificate_pem.as_str()), ("default/ca", "CA"));
        assert_eq!(p.resources[0].0.to_string(), "Secret default/ca");
        let Resource::Certificate(c) = &p.resources[1].1 else { panic!("not a certificate") };
        assert_eq!(c.ca_certificate_pem.as_deref(), Some("ISSUER"), "cert-manager's ca.crt is kept");
        assert_eq!(p.ignored.len(), 1, "a Secret with neither is not Gatehouse's");
    }

    #[test]
    fn upstream_tls_is_checked() {
        let api = |upstream: &str| {
            format!(
                "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: a}}\nspec:\n  listenPath: /a/\n  upstream: {upstream}\n"
            )
        };
        let p = parse(
            "apis.yaml",
            &api("{url: 'https://orders.internal', tls: {caSecretRef: {name: ca}, serverName: orders.internal}}"),
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let e = one_error(&api("{url: 'ftp://a:1'}"));
        assert_eq!(e.field, "spec.upstream.url");
        let e = one_error(&api("{url: 'https://a', tls: {insecureSkipVerify: true, caSecretRef: {name: ca}}}"));
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("spec.upstream.tls", "caSecretRef has no effect with insecureSkipVerify")
        );
        let e = one_error(&api("{url: 'https://a', tls: {serverName: 'not a name'}}"));
        assert_eq!(e.field, "spec.upstream.tls.serverName");
        for plain in ["{url: 'http://a:1', tls: {serverName: a}}", "{service: {name: s, port: 443}, tls: {}}"] {
            let e = one_error(&api(plain));
            assert_eq!(e.field, "spec.upstream.tls", "{plain}");
            assert!(e.reason.starts_with("applies to https:// upstreams only"), "{e}");
        }
        let p = parse("apis.yaml", &api("{url: 'http://a:1', protocol: http2}"));
        let Resource::Api(a) = &p.resources[0].1 else { panic!("not an API: {:?}", p.rejected) };
        assert_eq!(a.spec.upstream.protocol, crate::UpstreamProtocol::Http2);
        let e = one_error(&api("{url: 'http://a:1', protocol: http3}"));
        assert_eq!(e.field, "spec.upstream.protocol");
    }

    #[test]
    fn tls_requires_hosts() {
        let e = one_error(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: a}\nspec:\n  listenPath: /a/\n  tls: {secretName: a-cert}\n  upstream: {url: 'http://127.0.0.1:1'}\n",
        );
        assert_eq!(e.field, "spec.tls");
        assert!(e.reason.starts_with("requires spec.hosts"), "{e}");
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let e = one_error("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert_eq!(e.field, "kind");
    }
}
