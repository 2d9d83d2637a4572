//! The ApiDefinition resource: one API served by the gateway.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, ResourceError, endpoint::EndpointPlugins};

/// One API: where it listens, where it forwards to, how callers authenticate and which
/// plugins run in its chain.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gatehouse.dev",
    version = "v1alpha1",
    kind = "ApiDefinition",
    namespaced,
    shortname = "apidef",
    status = "ApiDefinitionStatus",
    printcolumn = r#"{"name":"Listen Path","type":"string","jsonPath":".spec.listenPath"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".spec.upstream.url"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "An API served by the Gatehouse dataplanes: where it listens, where it forwards to, how callers authenticate and which plugins run in its chain."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.auth) && has(self.auth.type) && self.auth.type == 'plugin') || (has(self.middleware) && has(self.middleware.authCheck))",
        "message": "spec.middleware.authCheck is required when spec.auth.type is plugin",
        "fieldPath": ".middleware.authCheck",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!(has(self.middleware) && has(self.middleware.authCheck)) || (has(self.auth) && has(self.auth.type) && self.auth.type == 'plugin')",
        "message": "spec.middleware.authCheck is only used when spec.auth.type is plugin",
        "fieldPath": ".middleware.authCheck",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!(has(self.auth) && has(self.auth.type) && self.auth.type == 'mtls') || (has(self.hosts) && size(self.hosts) > 0)",
        "message": "spec.auth.type mtls requires spec.hosts: the client certificate is asked for by the host a client names (SNI)",
        "fieldPath": ".hosts",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.tls) || (has(self.hosts) && size(self.hosts) > 0)",
        "message": "spec.tls requires spec.hosts: the certificate is chosen by the host a client names (SNI)",
        "fieldPath": ".tls",
        "reason": "FieldValueRequired"
    }
]))]
pub struct ApiDefinitionSpec {
    /// Display name; defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub name: Option<String>,
    /// Inactive APIs are not served.
    #[serde(default = "yes")]
    pub active: bool,
    /// Path prefix this API owns, starting with `/`; the longest matching prefix wins.
    #[schemars(regex(pattern = "^/"))]
    pub listen_path: String,
    /// Remove the listen path before forwarding.
    #[serde(default = "yes")]
    pub strip_listen_path: bool,
    /// Host header values this API answers to; empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub hosts: Vec<String>,
    pub upstream: Upstream,
    /// Client-facing TLS for `hosts`: the certificate, chosen by SNI on `--tls-listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTls>,
    #[serde(default)]
    pub auth: Auth,
    /// API-wide rate limit, counted over all callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub middleware: Middleware,
    /// Free-form data plugins can read (Tyk's `config_data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub config_data: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// Schema for user data the API server must keep as written.
pub(crate) fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

/// Where requests go: exactly one of `url`, `targets`, `service`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.url) ? 1 : 0) + (has(self.targets) && size(self.targets) > 0 ? 1 : 0) + (has(self.service) ? 1 : 0) == 1",
        "message": "exactly one of spec.upstream.url, spec.upstream.targets, spec.upstream.service must be set"
    },
    {
        "rule": "!has(self.tls) || (has(self.url) && self.url.startsWith('https://')) || (has(self.targets) && size(self.targets) > 0 && self.targets.all(t, t.startsWith('https://')))",
        "message": "spec.upstream.tls applies to https:// upstreams only: every url and target must start with https://",
        "fieldPath": ".tls"
    }
]))]
pub struct Upstream {
    /// A single upstream base URL, `http[s]://host[:port][/base]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = upstream_url_rules)]
    pub url: Option<String>,
    /// Several base URLs, used round robin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), transform = upstream_targets_rules)]
    pub targets: Vec<String>,
    /// A Kubernetes Service whose endpoints the controller resolves into targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Time allowed for the upstream's response headers; 30s when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^(0+(h|m|s|ms))+$')",
        "message": "spec.upstream.timeout must be greater than zero"
    }]))]
    pub timeout: Option<Duration>,
    /// How `https://` upstreams are verified and what the gateway presents to them. Without
    /// it, an `https://` upstream is verified against the system's roots for its URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// The HTTP version spoken to the upstream: `http1`, or `http2` (h2 negotiated by ALPN
    /// over TLS, h2c with prior knowledge in plaintext), which gRPC services need.
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub protocol: UpstreamProtocol,
}

/// The HTTP version spoken to an upstream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, with pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2: over TLS by ALPN (`h2`), in plaintext by prior knowledge (h2c). Trailers
    /// and streaming both ways pass through, as gRPC needs.
    Http2,
}

impl UpstreamProtocol {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// TLS to `https://` upstreams.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.insecureSkipVerify) && self.insecureSkipVerify && has(self.caSecretRef))",
    "message": "spec.upstream.tls: caSecretRef has no effect with insecureSkipVerify",
    "reason": "FieldValueForbidden"
}]))]
pub struct UpstreamTls {
    /// A Secret in the same namespace whose `ca.crt` holds the CA certificates (PEM) the
    /// upstream's certificate must chain to, instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,
    /// The name sent as SNI and checked against the upstream's certificate; the URL's host
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
    /// Accept any certificate the upstream presents. For development only: anyone on the
    /// path to the upstream can read and change the traffic. Logged whenever it is loaded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// A `kubernetes.io/tls` Secret in the same namespace: the client certificate and key
    /// the gateway presents to upstreams that ask for one (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret_ref: Option<SecretRef>,
}

/// A Secret in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253), transform = secret_name_rule)]
    pub name: String,
}

/// The CEL rule of a Secret's name: a DNS subdomain. Its message starts with the field's
/// name where a bare "must be" would not say which field (`secretName`).
fn secret_name_rule_for(schema: &mut schemars::Schema, field: &str) {
    let message =
        format!("{field}must be the name of a Secret in the same namespace (lowercase letters, digits, '-' and '.')");
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([{
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": message
        }]),
    );
}

fn secret_name_rule(schema: &mut schemars::Schema) {
    secret_name_rule_for(schema, "");
}

fn tls_secret_name_rule(schema: &mut schemars::Schema) {
    secret_name_rule_for(schema, "secretName ");
}

/// A Service in the same namespace, and the port of it to forward to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// The Service's name (a DNS label).
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The Service port (`port`, not `targetPort`).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// Adds the checks every upstream base URL gets to a string schema (those of
/// `check_upstream_url`, as CEL). The API server refuses CEL rules whose worst-case cost is
/// unbounded, hence the `maxLength` here and the `maxItems` on lists of checked items.
fn upstream_url_rules(schema: &mut schemars::Schema) {
    schema.insert("maxLength".to_owned(), 2048.into());
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([
            {
                "rule": "self.startsWith('http://') || self.startsWith('https://')",
                "message": "upstream URLs must start with http:// or https://"
            },
            {
                "rule": "!(self.startsWith('http://') || self.startsWith('https://')) || (isURL(self) && url(self).getHostname() != '')",
                "message": "upstream URLs must have the form http[s]://host[:port][/base]"
            },
            {
                "rule": "!self.contains('?') && !self.contains('#')",
                "message": "upstream URLs must not have a query or fragment"
            }
        ]),
    );
}

fn upstream_targets_rules(schema: &mut schemars::Schema) {
    if let Some(items) = schema.get_mut("items").and_then(|i| <&mut schemars::Schema>::try_from(i).ok()) {
        upstream_url_rules(items);
    }
}

/// The certificate an API is served with over TLS, and what plain HTTP requests get.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiTls {
    /// A `kubernetes.io/tls` Secret in the same namespace (`tls.crt`: PEM chain, leaf
    /// first; `tls.key`: PEM private key) whose certificate covers every one of `hosts`.
    #[schemars(length(min = 1, max = 253), transform = tls_secret_name_rule)]
    pub secret_name: String,
    /// Answer plain-HTTP requests for this API with 308 to the same URL over https.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_http: bool,
}

/// How callers authenticate.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.type) || self.type != 'authToken' || !has(self.authToken) || !has(self.authToken.header) || self.authToken.header != '' || (has(self.authToken.query) && self.authToken.query != '') || (has(self.authToken.cookie) && self.authToken.cookie != '')",
        "message": "spec.auth.authToken needs at least one of header, query, cookie when spec.auth.type is authToken",
        "fieldPath": ".authToken"
    },
    {
        "rule": "!has(self.type) || self.type != 'mtls' || has(self.mtls)",
        "message": "spec.auth.mtls is required when spec.auth.type is mtls",
        "fieldPath": ".mtls",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.mtls) || (has(self.type) && self.type == 'mtls')",
        "message": "spec.auth.mtls is only used when spec.auth.type is mtls",
        "fieldPath": ".mtls",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct Auth {
    #[serde(rename = "type", default)]
    pub kind: AuthType,
    #[serde(default)]
    pub auth_token: AuthToken,
    /// Client certificates, when `type` is `mtls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsAuth>,
}

/// Client-certificate authentication: over `--tls-listen`, clients naming one of the API's
/// `hosts` are asked for a certificate, and a request is let in only with one that chains
/// to this CA. The session is the certificate's: its subject is the session id (and the
/// `key_alias` of analytics records).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsAuth {
    /// A Secret in the same namespace whose `ca.crt` holds the CA certificates (PEM) client
    /// certificates must chain to.
    pub ca_secret_ref: SecretRef,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum AuthType {
    /// No key needed; key checks are skipped.
    #[default]
    Keyless,
    /// A key from a key Secret, sent in a header, query parameter or cookie.
    AuthToken,
    /// The `middleware.authCheck` plugin hook decides and may create the session.
    Plugin,
    /// A client certificate signed by `mtls.caSecretRef`'s CA, presented over TLS.
    Mtls,
}

/// Where the client's key is looked for, in this order; an empty name is not looked at.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthToken {
    #[serde(default = "authorization")]
    pub header: String,
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub cookie: String,
    /// Remove the credential (that header, that query parameter, that one cookie) before
    /// the request goes on, so upstreams and later hooks never see the key (Tyk's
    /// `strip_auth_data`).
    #[serde(default = "yes")]
    pub strip_credentials: bool,
}

fn authorization() -> String {
    "Authorization".to_owned()
}

impl Default for AuthToken {
    fn default() -> Self {
        Self { header: authorization(), query: String::new(), cookie: String::new(), strip_credentials: true }
    }
}

/// `rate` requests every `per`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub rate: u64,
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^(0+(h|m|s|ms))+$')",
        "message": "spec.rateLimit.per must be greater than zero"
    }]))]
    pub per: Duration,
}

/// Plugin hooks per phase, in Tyk's `custom_middleware` order.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Middleware {
    /// Before the API-wide rate limit and authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub pre: Vec<PluginRef>,
    /// Decides authentication when `spec.auth.type` is `plugin` (and only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_check: Option<PluginRef>,
    /// After authentication, before the key's checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub post_key_auth: Vec<PluginRef>,
    /// After the key's checks, before the upstream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub post: Vec<PluginRef>,
    /// On the upstream's response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub response: Vec<PluginRef>,
    /// Per-endpoint hooks (Tyk's `extended_paths.go_plugin`): after the key checks, before
    /// `post`, for the first endpoint whose path and method match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-validations" = [{
            "rule": "self.all(e, self.exists_one(f, f.path == e.path && (!has(e.methods) || !has(f.methods) || size(e.methods) == 0 || size(f.methods) == 0 || e.methods.exists(m, m in f.methods))))",
            "message": "two endpoints declare the same path and method: the first matching endpoint wins, so the other would never run"
        }])
    )]
    pub endpoints: Vec<EndpointPlugins>,
    /// Tyk's analytics plugins: each hook sees every analytics record of this API, in
    /// order, before it reaches the sink (off the request path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub analytics: Vec<AnalyticsPluginRef>,
}

impl Middleware {
    /// Every plugin reference with the field path it sits at.
    pub fn refs(&self) -> impl Iterator<Item = (String, &PluginRef)> {
        let mut out: Vec<(String, &PluginRef)> = Vec::new();
        for (name, v) in [
            ("pre", &self.pre),
            ("postKeyAuth", &self.post_key_auth),
            ("post", &self.post),
            ("response", &self.response),
        ] {
            out.extend(v.iter().enumerate().map(|(i, r)| (format!("spec.middleware.{name}[{i}]"), r)));
        }
        if let Some(r) = &self.auth_check {
            out.push(("spec.middleware.authCheck".to_owned(), r));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            out.extend(
                e.plugins.iter().enumerate().map(|(j, r)| (format!("spec.middleware.endpoints[{i}].plugins[{j}]"), r)),
            );
        }
        out.extend(
            self.analytics.iter().enumerate().map(|(i, r)| (format!("spec.middleware.analytics[{i}]"), &r.hook)),
        );
        out.into_iter()
    }
}

/// One hook in the chain: the exported `symbol` of the Plugin named `plugin`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRef {
    /// The name of a Plugin in the same namespace.
    #[schemars(
        length(max = 253),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "plugin must be the name of a Plugin in the same namespace (lowercase letters, digits, '-' and '.')"
        }])
    )]
    pub plugin: String,
    /// The hook the plugin exports.
    #[schemars(
        length(max = 256),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[A-Za-z_][A-Za-z0-9_]*$')",
            "message": "symbol must be the name of a hook the plugin exports (a C identifier such as MyProcessRequest)"
        }])
    )]
    pub symbol: String,
    /// Handed to the plugin once, when the chain is built: any JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub config: Option<serde_json::Value>,
    /// A disabled entry is not bound at all: its plugin is not needed, its hook not called.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// A `middleware.analytics` entry: a hook like any other, and whether the API's records
/// carry the request and response bodies.
// Read and written as `AnalyticsEntry`, which lists the fields flat: serde's `flatten`
// would let unknown fields through.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(from = "AnalyticsEntry", into = "AnalyticsEntry")]
pub struct AnalyticsPluginRef {
    pub hook: PluginRef,
    pub detailed_recording: bool,
}

/// A `middleware.analytics` entry as written.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalyticsEntry {
    /// The name of a Plugin in the same namespace.
    #[schemars(
        length(max = 253),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "plugin must be the name of a Plugin in the same namespace (lowercase letters, digits, '-' and '.')"
        }])
    )]
    pub plugin: String,
    /// The hook the plugin exports; it must handle the analytics phase.
    #[schemars(
        length(max = 256),
        extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[A-Za-z_][A-Za-z0-9_]*$')",
            "message": "symbol must be the name of a hook the plugin exports (a C identifier such as MyProcessRequest)"
        }])
    )]
    pub symbol: String,
    /// Handed to the plugin once, when the chain is built: any JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub config: Option<serde_json::Value>,
    /// A disabled entry is not bound at all: its plugin is not needed, its hook not called.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Tyk's `enable_detailed_recording`: the API's records carry the request and response
    /// bodies (each cut at 64 KiB, see docs/resources.md), for the analytics hooks and the
    /// sink. One enabled entry asking for it turns it on for the whole API.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detailed_recording: bool,
}

impl From<AnalyticsEntry> for AnalyticsPluginRef {
    fn from(e: AnalyticsEntry) -> Self {
        let hook = PluginRef { plugin: e.plugin, symbol: e.symbol, config: e.config, disabled: e.disabled };
        Self { hook, detailed_recording: e.detailed_recording }
    }
}

impl From<AnalyticsPluginRef> for AnalyticsEntry {
    fn from(r: AnalyticsPluginRef) -> Self {
        let PluginRef { plugin, symbol, config, disabled } = r.hook;
        Self { plugin, symbol, config, disabled, detailed_recording: r.detailed_recording }
    }
}

/// Schema for a value the API server must keep as written, whatever its JSON type.
fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApiDefinitionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl ApiDefinitionSpec {
    /// Checks what the types alone cannot; `resource` names the ApiDefinition in errors.
    pub fn validate(&self, resource: &str) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, reason: String| errors.push(ResourceError::new(resource, field, reason));
        if !self.listen_path.starts_with('/') {
            err("spec.listenPath", format!("must start with '/', got {:?}", self.listen_path));
        }
        let u = &self.upstream;
        let set = usize::from(u.url.is_some()) + usize::from(!u.targets.is_empty()) + usize::from(u.service.is_some());
        if set != 1 {
            err("spec.upstream", "exactly one of url, targets, service must be set".to_owned());
        }
        if let Some(url) = &u.url
            && let Err(reason) = check_upstream_url(url)
        {
            err("spec.upstream.url", reason);
        }
        for (i, t) in u.targets.iter().enumerate() {
            if let Err(reason) = check_upstream_url(t) {
                err(&format!("spec.upstream.targets[{i}]"), reason);
            }
        }
        if u.timeout.is_some_and(|t| t.0.is_zero()) {
            err("spec.upstream.timeout", "must be greater than zero".to_owned());
        }
        if let Some(tls) = &u.tls {
            let https = |t: &String| t.starts_with("https://");
            if u.service.is_some() || !u.url.iter().chain(&u.targets).all(https) {
                err(
                    "spec.upstream.tls",
                    "applies to https:// upstreams only: every url and target must start with https://".to_owned(),
                );
            }
            if tls.insecure_skip_verify && tls.ca_secret_ref.is_some() {
                err("spec.upstream.tls", "caSecretRef has no effect with insecureSkipVerify".to_owned());
            }
            if tls.server_name.as_deref().is_some_and(|n| check_server_name(n).is_err()) {
                err("spec.upstream.tls.serverName", "must be a DNS name or an IP address".to_owned());
            }
        }
        if let Some(rl) = &self.rate_limit {
            if rl.rate == 0 {
                err("spec.rateLimit.rate", "must be at least 1".to_owned());
            }
            if rl.per.0.is_zero() {
                err("spec.rateLimit.per", "must be greater than zero".to_owned());
            }
        }
        if let Some(tls) = &self.tls {
            if self.hosts.is_empty() {
                err(
                    "spec.tls",
                    "requires spec.hosts: the certificate is chosen by the host a client names (SNI)".to_owned(),
                );
            }
            if tls.secret_name.is_empty() {
                err("spec.tls.secretName", "must name a kubernetes.io/tls Secret in the same namespace".to_owned());
            }
        }
        match (self.auth.kind, &self.middleware.auth_check) {
            (AuthType::Plugin, None) => {
                err("spec.middleware.authCheck", "is required when spec.auth.type is plugin".to_owned())
            }
            (AuthType::Keyless | AuthType::AuthToken | AuthType::Mtls, Some(_)) => {
                err("spec.middleware.authCheck", "is only used when spec.auth.type is plugin".to_owned())
            }
            _ => {}
        }
        match (self.auth.kind, &self.auth.mtls) {
            (AuthType::Mtls, None) => err("spec.auth.mtls", "is required when spec.auth.type is mtls".to_owned()),
            (AuthType::Mtls, Some(m)) => {
                if self.hosts.is_empty() {
                    err(
                        "spec.hosts",
                        "spec.auth.type mtls requires spec.hosts: the client certificate is asked for by the host a client names (SNI)"
                            .to_owned(),
                    );
                }
                if m.ca_secret_ref.name.is_empty() {
                    err("spec.auth.mtls.caSecretRef.name", "must name a Secret in the same namespace".to_owned());
                }
            }
            (_, Some(_)) => err("spec.auth.mtls", "is only used when spec.auth.type is mtls".to_owned()),
            (_, None) => {}
        }
        let t = &self.auth.auth_token;
        if self.auth.kind == AuthType::AuthToken && t.header.is_empty() && t.query.is_empty() && t.cookie.is_empty() {
            err("spec.auth.authToken", "needs at least one of header, query, cookie".to_owned());
        }
        for (field, r) in self.middleware.refs() {
            if r.plugin.is_empty() {
                err(&format!("{field}.plugin"), "must name a Plugin".to_owned());
            }
            if r.symbol.is_empty() {
                err(&format!("{field}.symbol"), "must name an exported symbol".to_owned());
            }
        }
        for (field, reason) in crate::endpoint::check_endpoints(&self.middleware.endpoints) {
            err(&field, reason);
        }
        errors
    }
}

/// Whether `n` can be sent as SNI and checked against a certificate: a DNS name or an IP.
fn check_server_name(n: &str) -> Result<(), ()> {
    let ip = n.parse::<std::net::IpAddr>().is_ok();
    let dns = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
        });
    if ip || dns { Ok(()) } else { Err(()) }
}

/// `http[s]://host[:port][/base]`.
fn check_upstream_url(url: &str) -> Result<(), String> {
    let parsed: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url:?} must start with http:// or https://"));
    }
    if parsed.authority().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if parsed.query().is_some() {
        return Err(format!("{url:?} must not have a query"));
    }
    Ok(())
}
