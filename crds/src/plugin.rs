//! The Plugin resource: a native shared object the dataplanes load.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ResourceError;

/// A native plugin library, mounted into the dataplane pods, whose exported hooks
/// ApiDefinitions name in their `middleware`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "Plugin",
    namespaced,
    shortname = "gplugin",
    status = "PluginStatus",
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Loaded","type":"string","jsonPath":".status.conditions[?(@.type==\"Loaded\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A native plugin library (.so) that the Gatehouse dataplanes load, whose exported hooks ApiDefinitions name in their middleware."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// Absolute path of the `.so` inside the dataplane (a mounted volume).
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
    /// Optional pin: the hex SHA-256 of the file; a mismatch refuses the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    /// The ConfigMap behind the volume, checked by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    /// The ConfigMap's name, in the Plugin's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key of the ConfigMap holding the `.so`.
    #[schemars(length(min = 1, max = 253), regex(pattern = "^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// What APIs that use a plugin do while it cannot be loaded.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum FailurePolicy {
    /// Answer 500: an API must not run without a hook it relies on (auth, say).
    #[default]
    Fail,
    /// Skip the plugin's hooks and serve the API without them.
    Ignore,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl PluginSpec {
    pub fn validate(&self, resource: &str) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        if !self.path.starts_with('/') {
            errors.push(ResourceError::new(
                resource,
                "spec.path",
                format!("must be an absolute path, got {:?}", self.path),
            ));
        }
        if let Some(sum) = &self.sha256
            && (sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            errors.push(ResourceError::new(resource, "spec.sha256", "must be 64 hex digits"));
        }
        errors
    }
}
