//! From resources to snapshot entries, one resource at a time, with the outcome each gets
//! in its status (Accepted, ResolvedRefs).

use std::collections::{BTreeMap, BTreeSet};

use gatehouse_crds::{
    ApiDefinition, CaSecret, DEFAULT_CERTIFICATE_LABEL, Plugin, ResourceError, ServiceRef, TlsSecret, ca_from_secret,
    has_ca, is_tls_secret,
    manifest::key_from_secret,
    snapshot::{ApiEntry, KeyEntry, PluginEntry},
    tls_from_secret,
};
use k8s_openapi::api::{
    core::v1::{Secret, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

/// Every watched object, by `namespace/name`.
#[derive(Default)]
pub struct Resources {
    pub apis: BTreeMap<String, ApiDefinition>,
    pub plugins: BTreeMap<String, Plugin>,
    /// Key Secrets as [`KeyObject`]s: never the Secrets themselves.
    pub keys: BTreeMap<String, KeyObject>,
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
    /// `kubernetes.io/tls` Secrets as [`SecretObject`]s.
    pub secrets: BTreeMap<String, SecretObject>,
    /// Opaque Secrets, as [`SecretObject`]s: their `ca.crt` if they have one. Apart from
    /// `secrets` because each store follows one watch.
    pub ca_bundles: BTreeMap<String, SecretObject>,
    /// Some when the config stream runs over TLS, the only way certificates may travel.
    pub secret_scope: Option<SecretScope>,
}

/// Which Secrets reach dataplanes, when the stream is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretScope {
    /// Where a Secret labelled as the default certificate counts: the controller's own
    /// namespace, so that no tenant can take over what clients without SNI are served.
    pub default_namespace: String,
}

/// What the controller keeps of a Secret that may be a certificate or a CA bundle: only the
/// parts a dataplane may need. Other Secrets' data is dropped as they arrive.
#[derive(Debug, Clone)]
pub struct SecretObject {
    /// Name, namespace, uid and resourceVersion only.
    pub meta: ObjectMeta,
    /// A `kubernetes.io/tls` Secret: its certificate, or why it is not one.
    pub certificate: Option<Result<TlsSecret, ResourceError>>,
    /// Its `ca.crt`, from a Secret of any type.
    pub ca: Option<CaSecret>,
}

impl SecretObject {
    pub fn from_secret(s: &Secret) -> Self {
        let certificate = is_tls_secret(s).then(|| tls_from_secret(s));
        let ca = match &certificate {
            Some(Ok(t)) => t.ca_certificate_pem.clone().map(|pem| CaSecret {
                namespace: t.namespace.clone(),
                name: t.name.clone(),
                ca_certificate_pem: pem,
            }),
            _ if has_ca(s) => ca_from_secret(s).ok(),
            _ => None,
        };
        Self { meta: small_meta(&s.metadata), certificate, ca }
    }
}

/// How a Secret is used by the APIs of its namespace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SecretUse {
    /// `spec.tls.secretName`, `upstream.tls.clientCertificateSecretRef`, or the default
    /// certificate: the private key is needed.
    certificate: bool,
    /// `upstream.tls.caSecretRef`: only `ca.crt` is.
    ca: bool,
}

/// What a Secret contributes to the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntries {
    /// Err: a certificate that is used but broken (its last good version keeps serving).
    pub certificate: Result<Option<TlsSecret>, ResourceError>,
    pub ca: Option<CaSecret>,
}

fn small_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        labels: m.labels.as_ref().map(|l| {
            l.iter().filter(|(k, _)| *k == DEFAULT_CERTIFICATE_LABEL).map(|(k, v)| (k.clone(), v.clone())).collect()
        }),
        ..ObjectMeta::default()
    }
}

/// The Secrets (`namespace/name`) an ApiDefinition names.
pub fn secrets_of(api: &ApiDefinition) -> Vec<String> {
    let ns = api.namespace().unwrap_or_default();
    let mut names: Vec<&str> = api.spec.tls.iter().map(|t| t.secret_name.as_str()).collect();
    if let Some(t) = &api.spec.upstream.tls {
        names.extend(t.ca_secret_ref.iter().chain(&t.client_certificate_secret_ref).map(|r| r.name.as_str()));
    }
    names.extend(api.spec.auth.mtls.iter().map(|m| m.ca_secret_ref.name.as_str()));
    names.into_iter().map(|n| format!("{ns}/{n}")).collect()
}

/// What the controller keeps of a key Secret: its identity and the compiled entry (the
/// SHA-256 of the key and the parsed session), or why it cannot be used. The watcher maps
/// each Secret to this as it arrives and drops the Secret, so no raw key stays in the
/// controller's memory (or in a core dump of it) for longer than one event.
#[derive(Debug, Clone)]
pub struct KeyObject {
    /// Name, namespace, uid and resourceVersion only.
    pub meta: ObjectMeta,
    pub compiled: Result<KeyEntry, ResourceError>,
}

impl KeyObject {
    pub fn from_secret(s: &Secret) -> Self {
        let meta = ObjectMeta { labels: None, ..small_meta(&s.metadata) };
        Self { meta, compiled: key_from_secret(s).map(KeyEntry::from) }
    }
}

/// Kind, group and version are those of a Secret: events and ids read the same as for
/// any other watched object.
macro_rules! secret_resource {
    ($t:ty) => {
        impl kube::Resource for $t {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
                Secret::kind(dt)
            }
            fn group(dt: &()) -> std::borrow::Cow<'_, str> {
                Secret::group(dt)
            }
            fn version(dt: &()) -> std::borrow::Cow<'_, str> {
                Secret::version(dt)
            }
            fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
                Secret::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.meta
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.meta
            }
        }
    };
}
secret_resource!(KeyObject);
secret_resource!(SecretObject);

/// What compiling a resource found, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub generation: i64,
    /// Err: the spec is not valid (and the last good version, if any, keeps serving).
    pub accepted: Result<(), String>,
    /// Err: a Plugin or Service it names is missing.
    pub resolved: Result<(), String>,
    /// Some: dataplanes cannot serve it as declared, whatever they acknowledge.
    pub unprogrammable: Option<String>,
}

/// Why an API with `spec.tls` is not programmed by a controller without TLS: a private key
/// may not travel over a plaintext config stream, so dataplanes never receive it.
pub const TLS_NOT_STREAMED: &str = "spec.tls: certificates reach dataplanes only over a TLS config stream, and this controller's is plaintext (start it with --tls-cert-file and --tls-key-file)";

/// Why an API with client-certificate auth is not programmed, for the same reason.
pub const MTLS_NOT_STREAMED: &str = "spec.auth.mtls: the CA caSecretRef names reaches dataplanes only over a TLS config stream, and this controller's is plaintext (start it with --tls-cert-file and --tls-key-file)";

/// Why an API whose `upstream.tls` names a Secret is not programmed, for the same reason.
pub const UPSTREAM_TLS_NOT_STREAMED: &str = "spec.upstream.tls: the Secrets caSecretRef and clientCertificateSecretRef name reach dataplanes only over a TLS config stream, and this controller's is plaintext (start it with --tls-cert-file and --tls-key-file)";

pub fn id_of<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

const SERVICE_LABEL: &str = "kubernetes.io/service-name";

impl Resources {
    /// The entry to serve (None: nothing new to serve) and the outcome.
    pub fn compile_api(&self, id: &str) -> Option<(Option<ApiEntry>, Outcome)> {
        let api = self.apis.get(id)?;
        let generation = api.metadata.generation.unwrap_or(0);
        let ns = api.namespace().unwrap_or_default();
        let errors = api.spec.validate(&format!("ApiDefinition {id}"));
        if let Some(e) = errors.first() {
            let accepted = Err(format!("{}: {}", e.field, e.reason));
            return Some((None, Outcome { generation, accepted, resolved: Ok(()), unprogrammable: None }));
        }
        let mut missing = Vec::new();
        let mut plugins: BTreeSet<&str> = BTreeSet::new();
        // A disabled entry needs no Plugin: it is never bound.
        for (_, r) in api.spec.middleware.refs().filter(|(_, r)| !r.disabled) {
            plugins.insert(&r.plugin);
        }
        for p in plugins {
            if !self.plugins.contains_key(&format!("{ns}/{p}")) {
                missing.push(format!("Plugin {p} not found"));
            }
        }
        let targets = match &api.spec.upstream.service {
            Some(svc) => match self.service_targets(&ns, svc) {
                Ok(t) => Some(t),
                Err(e) => {
                    missing.push(e);
                    Some(Vec::new())
                }
            },
            None => None,
        };
        let resolved = if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) };
        let names_secrets = api
            .spec
            .upstream
            .tls
            .as_ref()
            .is_some_and(|t| t.ca_secret_ref.is_some() || t.client_certificate_secret_ref.is_some());
        let unprogrammable = match (&self.secret_scope, api.spec.tls.is_some()) {
            (Some(_), _) => None,
            (None, true) => Some(TLS_NOT_STREAMED.to_owned()),
            (None, false) if api.spec.auth.mtls.is_some() => Some(MTLS_NOT_STREAMED.to_owned()),
            (None, false) => names_secrets.then(|| UPSTREAM_TLS_NOT_STREAMED.to_owned()),
        };
        match ApiEntry::compile(api, targets) {
            Ok(entry) => Some((Some(entry), Outcome { generation, accepted: Ok(()), resolved, unprogrammable })),
            Err(e) => {
                let accepted = Err(format!("{}: {}", e.field, e.reason));
                Some((None, Outcome { generation, accepted, resolved, unprogrammable }))
            }
        }
    }

    pub fn compile_plugin(&self, id: &str) -> Option<(Option<PluginEntry>, Outcome)> {
        let p = self.plugins.get(id)?;
        let generation = p.metadata.generation.unwrap_or(0);
        if let Some(e) = p.spec.validate(&format!("Plugin {id}")).first() {
            let accepted = Err(format!("{}: {}", e.field, e.reason));
            return Some((None, Outcome { generation, accepted, resolved: Ok(()), unprogrammable: None }));
        }
        let outcome = Outcome { generation, accepted: Ok(()), resolved: Ok(()), unprogrammable: None };
        Some((Some(PluginEntry::from_resource(p)), outcome))
    }

    pub fn compile_key(&self, id: &str) -> Option<Result<KeyEntry, ResourceError>> {
        self.keys.get(id).map(|k| k.compiled.clone())
    }

    /// What a Secret puts in the snapshot: its certificate only where an API of its
    /// namespace needs the key (or it is the default certificate), its `ca.crt` alone where
    /// APIs only trust it; nothing for Secrets no API names, and nothing at all unless the
    /// stream is secured.
    pub fn compile_secret(&self, id: &str) -> SecretEntries {
        let nothing = SecretEntries { certificate: Ok(None), ca: None };
        let found = self.secrets.get(id).or_else(|| self.ca_bundles.get(id));
        let (Some(scope), Some(s)) = (&self.secret_scope, found) else { return nothing };
        let mut used = self.secret_use(id);
        let labelled = s.meta.labels.as_ref().and_then(|l| l.get(DEFAULT_CERTIFICATE_LABEL)).map(String::as_str);
        if labelled == Some("true") && s.meta.namespace.as_deref() == Some(scope.default_namespace.as_str()) {
            used.certificate = true;
        }
        let certificate = match (&s.certificate, used.certificate) {
            (Some(c), true) => c.clone().map(Some),
            _ => Ok(None),
        };
        // A certificate sent whole carries its ca.crt already.
        let ca = if used.ca && !matches!(certificate, Ok(Some(_))) { s.ca.clone() } else { None };
        SecretEntries { certificate, ca }
    }

    fn secret_use(&self, id: &str) -> SecretUse {
        let Some((ns, name)) = id.split_once('/') else { return SecretUse::default() };
        let mut used = SecretUse::default();
        for a in self.apis.values().filter(|a| a.namespace().as_deref() == Some(ns)) {
            let upstream = a.spec.upstream.tls.as_ref();
            used.certificate |= a.spec.tls.as_ref().is_some_and(|t| t.secret_name == name)
                || upstream.and_then(|t| t.client_certificate_secret_ref.as_ref()).is_some_and(|r| r.name == name);
            used.ca |= upstream.and_then(|t| t.ca_secret_ref.as_ref()).is_some_and(|r| r.name == name)
                || a.spec.auth.mtls.as_ref().is_some_and(|m| m.ca_secret_ref.name == name);
        }
        used
    }

    /// `http://address:port` for each ready endpoint of the Service port `svc.port`.
    fn service_targets(&self, ns: &str, svc: &ServiceRef) -> Result<Vec<String>, String> {
        let service = self
            .services
            .get(&format!("{ns}/{}", svc.name))
            .ok_or_else(|| format!("Service {} not found", svc.name))?;
        let port = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.iter().find(|p| p.port == i32::from(svc.port)))
            .ok_or_else(|| format!("Service {} has no port {}", svc.name, svc.port))?;
        let port_name = port.name.clone().unwrap_or_default();
        let mut targets = BTreeSet::new();
        for slice in self.slices.values() {
            let labelled = slice.labels().get(SERVICE_LABEL).map(String::as_str) == Some(svc.name.as_str());
            if slice.namespace().as_deref() != Some(ns) || !labelled {
                continue;
            }
            let Some(number) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
                .and_then(|p| p.port)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                for addr in &ep.addresses {
                    let host = if addr.contains(':') { format!("[{addr}]") } else { addr.clone() };
                    targets.insert(format!("http://{host}:{number}"));
                }
            }
        }
        if targets.is_empty() {
            return Err(format!("Service {} has no ready endpoints", svc.name));
        }
        Ok(targets.into_iter().collect())
    }

    /// ApiDefinitions whose middleware names this Plugin.
    pub fn apis_using_plugin(&self, plugin_id: &str) -> Vec<String> {
        let Some((ns, name)) = plugin_id.split_once('/') else { return Vec::new() };
        self.apis
            .iter()
            .filter(|(_, a)| {
                a.namespace().as_deref() == Some(ns) && a.spec.middleware.refs().any(|(_, r)| r.plugin == name)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// ApiDefinitions whose upstream is this Service (`namespace/name`).
    pub fn apis_using_service(&self, service_id: &str) -> Vec<String> {
        let Some((ns, name)) = service_id.split_once('/') else { return Vec::new() };
        self.apis
            .iter()
            .filter(|(_, a)| {
                a.namespace().as_deref() == Some(ns) && a.spec.upstream.service.as_ref().is_some_and(|s| s.name == name)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The Service an EndpointSlice belongs to, as `namespace/name`.
    pub fn service_of_slice(slice: &EndpointSlice) -> Option<String> {
        Some(format!("{}/{}", slice.namespace()?, slice.labels().get(SERVICE_LABEL)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }

    fn with_service() -> Resources {
        let mut r = Resources::default();
        let api: ApiDefinition = obj(serde_json::json!({
            "apiVersion": "gatehouse.dev/v1alpha1", "kind": "ApiDefinition",
            "metadata": {"name": "web", "namespace": "shop", "generation": 2},
            "spec": {"listenPath": "/web/", "upstream": {"service": {"name": "web", "port": 80}},
                     "middleware": {"pre": [{"plugin": "missing", "symbol": "X"}]}}
        }));
        r.apis.insert("shop/web".into(), api);
        let svc: Service = obj(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }));
        r.services.insert("shop/web".into(), svc);
        let slice: EndpointSlice = obj(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.1.2.3"], "conditions": {"ready": true}},
                {"addresses": ["10.1.2.4"], "conditions": {"ready": false}},
                {"addresses": ["10.1.2.5"]}
            ]
        }));
        r.slices.insert("shop/web-abc".into(), slice);
        r
    }

    fn secret(ns: &str, name: &str, ty: &str, data: serde_json::Value, default: bool) -> SecretObject {
        let labels =
            if default { serde_json::json!({DEFAULT_CERTIFICATE_LABEL: "true"}) } else { serde_json::json!({}) };
        SecretObject::from_secret(&obj(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels}, "type": ty, "stringData": data
        })))
    }

    #[test]
    fn only_secrets_an_api_of_their_namespace_names_are_sent_and_only_over_tls() {
        let mut r = with_service();
        let pair = serde_json::json!({"tls.crt": "CERT", "tls.key": "KEY", "ca.crt": "CA"});
        for (ns, name) in [("shop", "web-cert"), ("shop", "unused"), ("other", "web-cert"), ("shop", "client")] {
            r.secrets.insert(format!("{ns}/{name}"), secret(ns, name, "kubernetes.io/tls", pair.clone(), false));
        }
        let opaque = |extra| secret("shop", "bundle", "Opaque", extra, false);
        r.ca_bundles.insert("shop/bundle".into(), opaque(serde_json::json!({"ca.crt": "CA", "password": "p"})));
        let api = r.apis.get_mut("shop/web").expect("known");
        api.spec.hosts = vec!["web.example".into()];
        api.spec.tls = Some(gatehouse_crds::ApiTls { secret_name: "web-cert".into(), redirect_http: false });
        api.spec.upstream = gatehouse_crds::Upstream {
            url: Some("https://web.internal".into()),
            tls: Some(gatehouse_crds::UpstreamTls {
                ca_secret_ref: Some(gatehouse_crds::SecretRef { name: "bundle".into() }),
                client_certificate_secret_ref: Some(gatehouse_crds::SecretRef { name: "client".into() }),
                ..gatehouse_crds::UpstreamTls::default()
            }),
            ..gatehouse_crds::Upstream::default()
        };
        let api = r.apis.get("shop/web").expect("known").clone();
        assert_eq!(secrets_of(&api), ["shop/web-cert", "shop/bundle", "shop/client"]);

        // Plaintext: nothing, and the API says why.
        assert_eq!(r.compile_secret("shop/web-cert"), SecretEntries { certificate: Ok(None), ca: None });
        let outcome = r.compile_api("shop/web").expect("known").1;
        assert_eq!(outcome.accepted, Ok(()));
        assert_eq!(outcome.unprogrammable.as_deref(), Some(TLS_NOT_STREAMED));

        r.secret_scope = Some(SecretScope { default_namespace: "gatehouse".into() });
        assert_eq!(r.compile_api("shop/web").expect("known").1.unprogrammable, None);
        let sent = |r: &Resources, id: &str| r.compile_secret(id).certificate.expect("usable").map(|c| c.id());
        assert_eq!(sent(&r, "shop/web-cert").as_deref(), Some("shop/web-cert"));
        assert_eq!(sent(&r, "shop/client").as_deref(), Some("shop/client"));
        assert_eq!(sent(&r, "shop/unused"), None, "no API names it");
        assert_eq!(sent(&r, "other/web-cert"), None, "an API names Secrets of its own namespace only");
        // A CA bundle travels as its ca.crt alone: the Secret's other data stays behind.
        let bundle = r.compile_secret("shop/bundle");
        assert_eq!(bundle.certificate, Ok(None));
        let ca = bundle.ca.expect("sent");
        assert_eq!((ca.id(), ca.ca_certificate_pem.as_str()), ("shop/bundle".to_owned(), "CA"));
        assert!(!format!("{:?}", r.ca_bundles["shop/bundle"]).contains("password"));

        // The default certificate counts only in the controller's own namespace.
        r.secrets.insert("shop/fallback".into(), secret("shop", "fallback", "kubernetes.io/tls", pair.clone(), true));
        r.secrets.insert("gatehouse/fallback".into(), secret("gatehouse", "fallback", "kubernetes.io/tls", pair, true));
        assert_eq!(sent(&r, "shop/fallback"), None, "a tenant cannot supply the default certificate");
        assert_eq!(sent(&r, "gatehouse/fallback").as_deref(), Some("gatehouse/fallback"));

        // A certificate an API needs but that is broken is an error: its last good version stays.
        r.secrets.insert(
            "shop/web-cert".into(),
            secret("shop", "web-cert", "kubernetes.io/tls", serde_json::json!({"tls.crt": "CERT"}), false),
        );
        let e = r.compile_secret("shop/web-cert").certificate.expect_err("broken");
        assert_eq!(e.to_string(), "Secret shop/web-cert: data.tls.key: is required in a kubernetes.io/tls Secret");
    }

    #[test]
    fn the_key_store_keeps_the_hash_and_session_but_not_the_raw_key() {
        let raw = "raw-token-that-must-not-be-kept";
        let secret: Secret = obj(serde_json::json!({
            "metadata": {"name": "alice", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"gatehouse.dev/key": "true"}, "annotations": {"note": raw}},
            "stringData": {"key": raw, "session.yaml": "rate: 5\nper: 1s\naccessRights: [web]\n"}
        }));
        let kept = KeyObject::from_secret(&secret);
        let mut r = Resources::default();
        r.keys.insert(id_of(&kept), kept);
        let stored = format!("{:?}", r.keys);
        assert!(!stored.contains(raw), "the store holds the raw key: {stored}");
        let entry = r.compile_key("shop/alice").expect("known").expect("valid");
        assert_eq!(entry.hash, gatehouse_crds::key_hash(raw.as_bytes()));
        assert_eq!(entry.session.rate, Some(5));
        assert_eq!(r.keys["shop/alice"].meta.resource_version.as_deref(), Some("7"));

        let broken: Secret = obj(serde_json::json!({
            "metadata": {"name": "bob", "namespace": "shop", "labels": {"gatehouse.dev/key": "true"}},
            "stringData": {"key": raw, "session.yaml": "rate: 0\nper: 1s\n"}
        }));
        let kept = KeyObject::from_secret(&broken);
        assert!(!format!("{kept:?}").contains(raw));
        let e = kept.compiled.expect_err("rate 0 is refused");
        assert_eq!(e.to_string(), "Secret shop/bob: data.session.yaml: rate: must be at least 1");
    }

    #[test]
    fn service_upstreams_compile_to_ready_endpoint_targets() {
        let r = with_service();
        let (entry, outcome) = r.compile_api("shop/web").expect("known");
        let entry = entry.expect("compiles");
        assert_eq!(entry.targets, ["http://10.1.2.3:8080", "http://10.1.2.5:8080"]);
        assert_eq!(entry.generation, 2);
        assert_eq!(outcome.accepted, Ok(()));
        assert_eq!(outcome.resolved, Err("Plugin missing not found".into()), "refs are checked");
        assert_eq!(r.apis_using_service("shop/web"), ["shop/web"]);
        assert_eq!(r.apis_using_plugin("shop/missing"), ["shop/web"]);
    }

    #[test]
    fn an_api_with_tls_is_accepted_but_marked_unprogrammable() {
        let mut r = with_service();
        let api = r.apis.get_mut("shop/web").expect("known");
        api.spec.hosts = vec!["web.example".into()];
        api.spec.tls = Some(gatehouse_crds::ApiTls { secret_name: "web-cert".into(), redirect_http: false });
        let (entry, outcome) = r.compile_api("shop/web").expect("known");
        assert!(entry.is_some());
        assert_eq!(outcome.accepted, Ok(()));
        assert_eq!(outcome.unprogrammable.as_deref(), Some(TLS_NOT_STREAMED));
    }

    #[test]
    fn an_api_whose_upstream_tls_names_secrets_is_unprogrammable_and_one_without_is_not() {
        let mut r = with_service();
        let api = r.apis.get_mut("shop/web").expect("known");
        api.spec.upstream = gatehouse_crds::Upstream {
            url: Some("https://web.internal".into()),
            tls: Some(gatehouse_crds::UpstreamTls {
                server_name: Some("web.internal".into()),
                ..gatehouse_crds::UpstreamTls::default()
            }),
            ..gatehouse_crds::Upstream::default()
        };
        let (_, outcome) = r.compile_api("shop/web").expect("known");
        assert_eq!(outcome.unprogrammable, None, "system roots need no Secret");
        let api = r.apis.get_mut("shop/web").expect("known");
        if let Some(t) = api.spec.upstream.tls.as_mut() {
            t.ca_secret_ref = Some(gatehouse_crds::SecretRef { name: "web-ca".into() });
        }
        let (entry, outcome) = r.compile_api("shop/web").expect("known");
        assert!(entry.is_some());
        assert_eq!(outcome.unprogrammable.as_deref(), Some(UPSTREAM_TLS_NOT_STREAMED));
    }

    #[test]
    fn an_mtls_apis_client_ca_travels_as_its_ca_crt_and_only_over_tls() {
        let mut r = with_service();
        let data = serde_json::json!({"ca.crt": "CLIENT-CA", "ca.key": "never sent"});
        r.ca_bundles.insert("shop/clients".into(), secret("shop", "clients", "Opaque", data.clone(), false));
        r.ca_bundles.insert("other/clients".into(), secret("other", "clients", "Opaque", data, false));
        let api = r.apis.get_mut("shop/web").expect("known");
        api.spec.hosts = vec!["web.example".into()];
        api.spec.auth.kind = gatehouse_crds::AuthType::Mtls;
        api.spec.auth.mtls =
            Some(gatehouse_crds::MtlsAuth { ca_secret_ref: gatehouse_crds::SecretRef { name: "clients".into() } });
        let api = r.apis.get("shop/web").expect("known").clone();
        assert_eq!(secrets_of(&api), ["shop/clients"]);
        assert_eq!(r.compile_api("shop/web").expect("known").1.unprogrammable.as_deref(), Some(MTLS_NOT_STREAMED));
        assert_eq!(r.compile_secret("shop/clients").ca, None, "nothing over plaintext");

        r.secret_scope = Some(SecretScope { default_namespace: "gatehouse".into() });
        assert_eq!(r.compile_api("shop/web").expect("known").1.unprogrammable, None);
        let ca = r.compile_secret("shop/clients").ca.expect("sent");
        assert_eq!(ca.ca_certificate_pem, "CLIENT-CA");
        assert_eq!(r.compile_secret("other/clients").ca, None, "another namespace's Secret of the same name");
        assert!(!format!("{:?}", r.ca_bundles["shop/clients"]).contains("never sent"));
    }

    #[test]
    fn a_service_without_endpoints_is_unresolved() {
        let mut r = with_service();
        r.slices.clear();
        let (entry, outcome) = r.compile_api("shop/web").expect("known");
        assert_eq!(entry.expect("still served").targets, Vec::<String>::new());
        assert!(outcome.resolved.expect_err("unresolved").contains("Service web has no ready endpoints"));
    }
}
