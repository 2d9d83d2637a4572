//! Gatehouse's resources (ApiDefinition, Plugin, key Secrets), their validation, and the
//! config snapshot that the controller compiles and the dataplane serves.
//!
//! This crate knows nothing about HTTP servers or Kubernetes clients: both the controller
//! and the dataplane (standalone or not) depend on it, and share nothing else.
#![forbid(unsafe_code)]

mod api;
pub mod crdgen;
mod duration;
mod endpoint;
mod error;
mod key;
pub mod manifest;
mod plugin;
pub mod protocol;
pub mod routes;
pub mod snapshot;
mod tls;

pub use api::{
    AnalyticsPluginRef, ApiDefinition, ApiDefinitionSpec, ApiDefinitionStatus, ApiTls, Auth, AuthToken, AuthType,
    Middleware, MtlsAuth, PluginRef, RateLimit, SecretRef, ServiceRef, Upstream, UpstreamProtocol, UpstreamTls,
};
pub use duration::Duration;
pub use endpoint::{EndpointPlugins, EndpointSegment, HttpMethod, parse_endpoint_path};
pub use error::ResourceError;
pub use key::{KEY_LABEL, KeySession, key_hash};
pub use plugin::{ConfigMapKeyRef, FailurePolicy, Plugin, PluginSpec, PluginStatus};
pub use tls::{
    CA_KEY, CaSecret, DEFAULT_CERTIFICATE_LABEL, PrivateKeyPem, TLS_SECRET_TYPE, TlsSecret, ca_from_secret, has_ca,
    is_tls_secret, tls_from_secret,
};

/// The API group of every Gatehouse resource.
pub const GROUP: &str = "gatehouse.dev";
