//! The config snapshot: everything a dataplane needs, compiled from resources, versioned.
//!
//! Entries are keyed by `namespace/name` so that a change to one resource replaces one
//! entry; that is what makes per-resource deltas possible.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ApiDefinition, ApiDefinitionSpec, KeySession, Plugin, PluginSpec, ResourceError,
    manifest::{KeySecret, Resource},
};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    /// Grows with every change; dataplanes report the version they serve.
    pub version: u64,
    pub apis: BTreeMap<String, ApiEntry>,
    pub plugins: BTreeMap<String, PluginEntry>,
    /// Keyed by the Secret's `namespace/name`; the raw key is never here, only its hash.
    pub keys: BTreeMap<String, KeyEntry>,
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
        Ok(Self { namespace, name, generation: api.metadata.generation.unwrap_or(0), spec: api.spec.clone(), targets })
    }
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
            }
        }
        (snap, errors)
    }
}
