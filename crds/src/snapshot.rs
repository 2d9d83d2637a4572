//! The config snapshot: everything a dataplane needs, compiled from resources, versioned.
//!
//! Entries are keyed by `namespace/name` so that a change to one resource replaces one
//! entry; that is what makes per-resource deltas possible.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ApiDefinition, ApiDefinitionSpec, CaSecret, KeySession, Plugin, PluginSpec, ResourceError, TlsSecret,
    manifest::{KeySecret, Resource},
};

/// A certificate in a snapshot: a `kubernetes.io/tls` Secret, private key included. Only a
/// config source that keeps keys on the dataplane's side of a trust boundary (the
/// `--config` directory; a config stream over TLS) may carry these.
pub type CertificateEntry = TlsSecret;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    /// Grows with every change; dataplanes report the version they serve.
    pub version: u64,
    pub apis: BTreeMap<String, ApiEntry>,
    pub plugins: BTreeMap<String, PluginEntry>,
    /// Keyed by the Secret's `namespace/name`; the raw key is never here, only its hash.
    pub keys: BTreeMap<String, KeyEntry>,
    /// `kubernetes.io/tls` Secrets by `namespace/name`. Absent from older snapshots, and
    /// never sent over a plaintext config stream.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub certificates: BTreeMap<String, CertificateEntry>,
    /// Secrets with only a `ca.crt` (CA bundles an upstream's `tls.caSecretRef` trusts), by
    /// `namespace/name`. Like certificates, absent from older snapshots and never sent over
    /// a plaintext config stream.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ca_certificates: BTreeMap<String, CaSecret>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiEntry {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub generation: i64,
    pub spec: ApiDefinitionSpec,
    /// Upstream base URLs: `url`, `targets`, or the endpoints of `service`.
    pub targets: Vec<String>,
    /// `metadata.creationTimestamp`, or in standalone mode when the dataplane first saw the
    /// resource: of two APIs claiming one route, the older keeps it (see [`route_conflicts`]).
    /// Absent in snapshots from older controllers, which then fall back to `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<jiff::Timestamp>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PluginEntry {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub generation: i64,
    pub spec: PluginSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyEntry {
    pub namespace: String,
    pub name: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    pub session: KeySession,
}

impl ApiEntry {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn display_name(&self) -> &str {
        self.spec.name.as_deref().unwrap_or(&self.name)
    }

    /// Compiles an ApiDefinition whose upstream is `url` or `targets`; an upstream
    /// `service` needs its endpoints, which only the controller can resolve.
    pub fn compile(api: &ApiDefinition, service_targets: Option<Vec<String>>) -> Result<Self, ResourceError> {
        let namespace = api.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let name = api.metadata.name.clone().unwrap_or_default();
        let u = &api.spec.upstream;
        let targets = match (&u.url, u.targets.is_empty(), &u.service, service_targets) {
            (Some(url), _, _, _) => vec![url.clone()],
            (None, false, _, _) => u.targets.clone(),
            (None, true, Some(_), Some(t)) => t,
            (None, true, Some(_), None) => {
                return Err(ResourceError::new(
                    format!("ApiDefinition {namespace}/{name}"),
                    "spec.upstream.service",
                    "needs the controller to resolve endpoints; use url or targets in standalone mode",
                ));
            }
            (None, true, None, _) => {
                return Err(ResourceError::new(
                    format!("ApiDefinition {namespace}/{name}"),
                    "spec.upstream",
                    "no upstream set",
                ));
            }
        };
        Ok(Self {
            namespace,
            name,
            generation: api.metadata.generation.unwrap_or(0),
            spec: api.spec.clone(),
            targets,
            creation_timestamp: api.metadata.creation_timestamp.as_ref().map(|t| t.0),
        })
    }
}

/// Who wins what two APIs both claim (a route, a host's certificate): the older, then the
/// first by `namespace/name`. A newer API, from any namespace, never takes over.
pub fn oldest_first(a: &ApiEntry, b: &ApiEntry) -> std::cmp::Ordering {
    let age = |e: &ApiEntry| (e.creation_timestamp.is_none(), e.creation_timestamp);
    age(a).cmp(&age(b)).then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
}

impl PluginEntry {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn from_resource(p: &Plugin) -> Self {
        Self {
            namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
            name: p.metadata.name.clone().unwrap_or_default(),
            generation: p.metadata.generation.unwrap_or(0),
            spec: p.spec.clone(),
        }
    }
}

impl From<KeySecret> for KeyEntry {
    fn from(k: KeySecret) -> Self {
        Self { namespace: k.namespace, name: k.name, hash: k.hash, session: k.session }
    }
}

impl KeyEntry {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Snapshot {
    /// Compiles standalone resources; those that cannot be compiled come back as errors
    /// and are left out, never blocking the others.
    pub fn compile(version: u64, resources: impl IntoIterator<Item = Resource>) -> (Self, Vec<ResourceError>) {
        let mut snap = Snapshot { version, ..Default::default() };
        let mut errors = Vec::new();
        for r in resources {
            match r {
                Resource::Api(api) => match ApiEntry::compile(&api, None) {
                    Ok(e) => {
                        snap.apis.insert(e.id(), e);
                    }
                    Err(e) => errors.push(e),
                },
                Resource::Plugin(p) => {
                    let e = PluginEntry::from_resource(&p);
                    snap.plugins.insert(e.id(), e);
                }
                Resource::Key(k) => {
                    let e = KeyEntry::from(k);
                    snap.keys.insert(e.id(), e);
                }
                Resource::Certificate(c) => {
                    snap.certificates.insert(c.id(), c);
                }
                Resource::CaCertificate(c) => {
                    snap.ca_certificates.insert(c.id(), c);
                }
            }
        }
        (snap, errors)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(id: &str, path: &str, hosts: &[&str], created: Option<&str>) -> ApiEntry {
        let (namespace, name) = id.split_once('/').expect("ns/name");
        let yaml = format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  listenPath: {path}\n  hosts: {hosts:?}\n  upstream: {{url: 'http://127.0.0.1:1'}}\n"
        );
        let parsed = crate::manifest::parse("test", &yaml);
        let Some((_, Resource::Api(api))) = parsed.resources.into_iter().next() else {
            panic!("bad test API: {:?}", parsed.rejected)
        };
        let mut e = ApiEntry::compile(&api, None).expect("compiles");
        e.creation_timestamp = created.map(|t| t.parse().expect("timestamp"));
        e
    }

    #[test]
    fn snapshots_without_creation_timestamps_still_parse() {
        let e = entry("ns/a", "/x/", &[], None);
        let json = serde_json::to_value(&e).expect("serialises");
        assert!(json.get("creationTimestamp").is_none());
        let back: ApiEntry = serde_json::from_value(json).expect("parses");
        assert_eq!(back, e);
    }
}
