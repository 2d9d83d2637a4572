//! From resources to snapshot entries, one resource at a time, with the outcome each gets
//! in its status (Accepted, ResolvedRefs).

use std::collections::{BTreeMap, BTreeSet};

use gatehouse_crds::{
    ApiDefinition, Plugin, ResourceError, ServiceRef,
    manifest::key_from_secret,
    snapshot::{ApiEntry, KeyEntry, PluginEntry},
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
        let m = &s.metadata;
        let meta = ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            ..ObjectMeta::default()
        };
        Self { meta, compiled: key_from_secret(s).map(KeyEntry::from) }
    }
}

/// Kind, group and version are those of a Secret: events and ids read the same as for
/// any other watched object.
impl kube::Resource for KeyObject {
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

/// Why an API with `spec.tls` is not programmed: its certificate's private key may not
/// travel over the plaintext config stream, so dataplanes never receive it.
pub const TLS_NOT_STREAMED: &str =
    "spec.tls: certificates reach dataplanes only over the TLS config stream, which this controller does not serve yet";

/// Why an API whose `upstream.tls` names a Secret is not programmed, for the same reason.
pub const UPSTREAM_TLS_NOT_STREAMED: &str = "spec.upstream.tls: the Secrets caSecretRef and clientCertificateSecretRef name reach dataplanes only over the TLS config stream, which this controller does not serve yet";

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
        let unprogrammable = if api.spec.tls.is_some() {
            Some(TLS_NOT_STREAMED.to_owned())
        } else {
            names_secrets.then(|| UPSTREAM_TLS_NOT_STREAMED.to_owned())
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
    fn a_service_without_endpoints_is_unresolved() {
        let mut r = with_service();
        r.slices.clear();
        let (entry, outcome) = r.compile_api("shop/web").expect("known");
        assert_eq!(entry.expect("still served").targets, Vec::<String>::new());
        assert!(outcome.resolved.expect_err("unresolved").contains("Service web has no ready endpoints"));
    }
}
