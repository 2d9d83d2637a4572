//! The CRDs against the real API server: they install, valid resources are accepted (and
//! read back into the Rust types unchanged), and invalid ones are refused at admission with
//! the message `kubectl apply` prints.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use gatehouse_crds::{
    AnalyticsPluginRef, ApiDefinition, ApiDefinitionSpec, ApiTls, Auth, AuthToken, AuthType, ConfigMapKeyRef, Duration,
    EndpointPlugins, FailurePolicy, HttpMethod, Middleware, Plugin, PluginRef, PluginSpec, RateLimit, SecretRef,
    ServiceRef, Upstream, UpstreamProtocol, UpstreamTls,
    manifest::{self, Resource},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::cluster::{Cluster, MANAGER, cluster, fresh_namespace, install_crds, repo_root};

/// Server-side apply with strict field validation, as `kubectl apply --server-side` does.
fn strict() -> PatchParams {
    PatchParams::apply(MANAGER).force().validation_strict()
}

fn resource(kind: &str) -> ApiResource {
    match kind {
        "ApiDefinition" => ApiResource::erase::<ApiDefinition>(&()),
        _ => ApiResource::erase::<Plugin>(&()),
    }
}

fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "gatehouse.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// Server-side applies `{apiVersion, kind, metadata: {name}, spec}` as an untyped object, so
/// that tests can send what the Rust types cannot express.
async fn apply(client: &Client, ns: &str, kind: &str, name: &str, spec: Value) -> Result<DynamicObject, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource(kind));
    api.patch(name, &strict(), &Patch::Apply(object(kind, name, spec))).await
}

/// Creates the object as `kubectl apply` (client-side) or `kubectl create` do: a POST with
/// strict field validation, which kube's `PostParams` cannot ask for.
async fn create(client: &Client, ns: &str, kind: &str, name: &str, spec: Value) -> Result<DynamicObject, kube::Error> {
    let url = format!(
        "{}?fieldValidation=Strict",
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource(kind)).resource_url()
    );
    let body = serde_json::to_vec(&object(kind, name, spec)).map_err(kube::Error::SerdeError)?;
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    client.request(request).await
}

#[tokio::test]
async fn the_crds_install_and_become_established() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let api: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    for (name, short) in [("apidefinitions.gatehouse.dev", "apidef"), ("plugins.gatehouse.dev", "gplugin")] {
        let crd = api.get(name).await.unwrap_or_else(|e| panic!("get CRD {name}: {e}"));
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for ty in ["NamesAccepted", "Established"] {
            assert!(
                conditions.iter().any(|c| c.type_ == ty && c.status == "True"),
                "{name}: {ty} is not True: {conditions:?}"
            );
        }
        assert!(
            !conditions.iter().any(|c| c.type_ == "NonStructuralSchema"),
            "{name} has a non-structural schema: {conditions:?}"
        );
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_owned()]), "{name}");
        let version = &crd.spec.versions[0];
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{name}: no status subresource"
        );
        assert!(
            version.additional_printer_columns.as_ref().is_some_and(|c| !c.is_empty()),
            "{name}: no printer columns"
        );
    }
}

#[tokio::test]
async fn the_standalone_examples_are_accepted_and_read_back_as_the_standalone_parser_reads_them() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "crds-examples").await;
    let mut applied = 0;
    for file in ["apis.yaml", "plugins.yaml"] {
        let path = repo_root().join("examples/standalone").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let parsed = manifest::parse(file, &text);
        assert!(parsed.rejected.is_empty(), "{file}: {:?}", parsed.rejected);
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            apply(&c.client, &ns, &kind, &name, doc["spec"].clone())
                .await
                .unwrap_or_else(|e| panic!("{file}: {kind} {name} was refused: {e}"));
            applied += 1;
        }
        // What the server stored (its defaults applied) reads into the Rust types, and equals
        // what standalone mode makes of the same file (serde's defaults).
        for (id, resource) in parsed.resources {
            match resource {
                Resource::Api(local) => {
                    let api: Api<ApiDefinition> = Api::namespaced(c.client.clone(), &ns);
                    let stored = api.get(&id.name).await.unwrap_or_else(|e| panic!("{file}: reading {id}: {e}"));
                    assert_eq!(stored.spec, local.spec, "{file}: {id}");
                }
                Resource::Plugin(local) => {
                    let api: Api<Plugin> = Api::namespaced(c.client.clone(), &ns);
                    let stored = api.get(&id.name).await.unwrap_or_else(|e| panic!("{file}: reading {id}: {e}"));
                    assert_eq!(stored.spec, local.spec, "{file}: {id}");
                }
                Resource::Key(_) | Resource::Certificate(_) | Resource::CaCertificate(_) => {}
            }
        }
    }
    assert!(applied >= 9, "expected the examples' 4 APIs and 5 plugins, applied {applied}");
}

fn plugin_ref(plugin: &str, symbol: &str, config: Option<Value>) -> PluginRef {
    PluginRef { plugin: plugin.to_owned(), symbol: symbol.to_owned(), config, disabled: false }
}

#[tokio::test]
async fn every_field_of_the_rust_types_round_trips_through_the_api_server() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "crds-typed").await;

    let full = ApiDefinitionSpec {
        name: Some("Everything".to_owned()),
        active: false,
        listen_path: "/everything/".to_owned(),
        strip_listen_path: false,
        hosts: vec!["api.example.com".to_owned(), "api.example.com:8443".to_owned()],
        upstream: Upstream {
            service: Some(ServiceRef { name: "httpbin".to_owned(), port: 8080 }),
            timeout: Some(Duration::from_millis(1500)),
            ..Upstream::default()
        },
        tls: Some(ApiTls { secret_name: "everything-cert".to_owned(), redirect_http: true }),
        auth: Auth { kind: AuthType::Plugin, auth_token: AuthToken::default(), mtls: None },
        rate_limit: Some(RateLimit { rate: 100, per: Duration::from_secs(1) }),
        middleware: Middleware {
            pre: vec![plugin_ref("hit-counter", "MyProcessRequest", Some(json!({"start": 1})))],
            auth_check: Some(plugin_ref("my-auth", "Authenticate", None)),
            post_key_auth: vec![plugin_ref("session-meta", "MyPluginFunction", Some(json!(["a", 1, null, true])))],
            post: vec![plugin_ref("c-add-header", "AddHeader", Some(json!("v1")))],
            response: vec![plugin_ref("rewrite.v2", "_rewrite_2", Some(json!(42)))],
            endpoints: vec![
                EndpointPlugins {
                    path: "/users/{id}".to_owned(),
                    methods: vec![HttpMethod::Get, HttpMethod::Put],
                    plugins: vec![
                        plugin_ref("users", "LookupUser", Some(json!({"db": "x"}))),
                        PluginRef { disabled: true, ..plugin_ref("audit", "Audit", None) },
                    ],
                },
                EndpointPlugins { path: "/files/*".to_owned(), methods: Vec::new(), plugins: Vec::new() },
            ],
            analytics: vec![
                AnalyticsPluginRef {
                    hook: plugin_ref("mask", "MaskPasswords", Some(json!({"fields": ["password"]}))),
                    detailed_recording: true,
                },
                AnalyticsPluginRef {
                    hook: PluginRef { disabled: true, ..plugin_ref("tag", "TagRecord", None) },
                    detailed_recording: false,
                },
            ],
        },
        config_data: Some(json!({"tier": "gold", "nested": {"list": [1, 2.5, "x"], "flag": false}})),
    };
    let targets = ApiDefinitionSpec {
        listen_path: "/t/".to_owned(),
        upstream: Upstream {
            targets: vec!["https://10.0.0.1".to_owned(), "https://[::1]:8443/base".to_owned()],
            tls: Some(UpstreamTls {
                ca_secret_ref: Some(SecretRef { name: "httpbin-ca".to_owned() }),
                server_name: Some("httpbin.internal".to_owned()),
                insecure_skip_verify: false,
                client_certificate_secret_ref: Some(SecretRef { name: "gateway-client".to_owned() }),
            }),
            protocol: UpstreamProtocol::Http2,
            ..Upstream::default()
        },
        auth: Auth {
            kind: AuthType::AuthToken,
            auth_token: AuthToken { header: String::new(), query: "key".to_owned(), ..AuthToken::default() },
            mtls: None,
        },
        ..serde_json::from_value(json!({"listenPath": "/", "upstream": {"url": "http://127.0.0.1:1"}}))
            .unwrap_or_else(|e| panic!("minimal spec: {e}"))
    };
    let apis: Api<ApiDefinition> = Api::namespaced(c.client.clone(), &ns);
    for (name, spec) in [("full", full), ("targets", targets)] {
        let object = ApiDefinition::new(name, spec.clone());
        apis.patch(name, &strict(), &Patch::Apply(&object)).await.unwrap_or_else(|e| panic!("{name} was refused: {e}"));
        let stored = apis.get(name).await.unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert_eq!(stored.spec, spec, "{name}");
    }

    let plugins: Api<Plugin> = Api::namespaced(c.client.clone(), &ns);
    let spec = PluginSpec {
        path: "/opt/gatehouse/plugins/libhit_counter.so".to_owned(),
        sha256: Some("9F2C".repeat(16)),
        config_map_ref: Some(ConfigMapKeyRef { name: "hit-counter".to_owned(), key: "libhit_counter.so".to_owned() }),
        failure_policy: FailurePolicy::Ignore,
    };
    plugins
        .patch("hit-counter", &strict(), &Patch::Apply(&Plugin::new("hit-counter", spec.clone())))
        .await
        .unwrap_or_else(|e| panic!("the Plugin was refused: {e}"));
    let stored = plugins.get("hit-counter").await.unwrap_or_else(|e| panic!("reading the Plugin: {e}"));
    assert_eq!(stored.spec, spec);
}

#[tokio::test]
async fn status_conditions_are_written_through_the_status_subresource() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "crds-status").await;
    let apis: Api<ApiDefinition> = Api::namespaced(c.client.clone(), &ns);
    let spec = json!({"listenPath": "/s/", "upstream": {"url": "http://127.0.0.1:1"}});
    apply(&c.client, &ns, "ApiDefinition", "s", spec).await.unwrap_or_else(|e| panic!("refused: {e}"));
    let condition = |ty: &str, status: &str| json!({"type": ty, "status": status, "reason": ty, "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1});
    let status = json!({
        "apiVersion": "gatehouse.dev/v1alpha1", "kind": "ApiDefinition",
        "status": {"observedGeneration": 1, "conditions": [condition("Accepted", "True"), condition("Programmed", "False")]},
    });
    apis.patch_status("s", &PatchParams::apply("gatehouse-controller").force(), &Patch::Apply(&status))
        .await
        .unwrap_or_else(|e| panic!("status patch refused: {e}"));
    // Conditions are a map keyed by type: another manager's condition joins, not replaces.
    let other = json!({
        "apiVersion": "gatehouse.dev/v1alpha1", "kind": "ApiDefinition",
        "status": {"conditions": [condition("ResolvedRefs", "True")]},
    });
    apis.patch_status("s", &PatchParams::apply("someone-else").force(), &Patch::Apply(&other))
        .await
        .unwrap_or_else(|e| panic!("second status patch refused: {e}"));
    let stored = apis.get("s").await.unwrap_or_else(|e| panic!("reading it back: {e}"));
    let status = stored.status.unwrap_or_default();
    assert_eq!(status.observed_generation, Some(1));
    let mut types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    types.sort_unstable();
    assert_eq!(types, ["Accepted", "Programmed", "ResolvedRefs"]);
    assert_eq!(stored.metadata.generation, Some(1), "a status write must not bump the generation");
}

/// What an invalid spec must be refused with: a substring of the API server's message, when
/// created (`kubectl apply`, `kubectl create`) and when server-side applied.
struct Invalid {
    what: &'static str,
    spec: Value,
    create: &'static str,
    apply: &'static str,
}

/// Refused with the same message either way (schema and CEL validation).
fn invalid(what: &'static str, spec: Value, error: &'static str) -> Invalid {
    Invalid { what, spec, create: error, apply: error }
}

/// Refused before validation, by decoding: the two paths word it differently.
fn undecodable(what: &'static str, spec: Value, create: &'static str, apply: &'static str) -> Invalid {
    Invalid { what, spec, create, apply }
}

/// A valid ApiDefinition spec with `patch` merged in at the top level.
fn api_with(patch: Value) -> Value {
    let mut spec = json!({"listenPath": "/a/", "upstream": {"url": "http://127.0.0.1:8080"}});
    if let (Some(spec), Value::Object(patch)) = (spec.as_object_mut(), patch) {
        spec.extend(patch);
    }
    spec
}

/// Creates and applies each case; collects every case that was accepted or refused for
/// another reason.
async fn refusals(client: &Client, ns: &str, kind: &str, cases: &[Invalid]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = format!("invalid-{i}");
        let created = create(client, ns, kind, &name, case.spec.clone()).await;
        let applied = apply(client, ns, kind, &name, case.spec.clone()).await;
        for (how, result, expected) in [("create", created, case.create), ("apply", applied, case.apply)] {
            match result {
                Ok(_) => wrong.push(format!("{how} {}: accepted {}", case.what, case.spec)),
                Err(kube::Error::Api(status)) if status.message.contains(expected) => {}
                Err(kube::Error::Api(status)) => wrong.push(format!(
                    "{how} {}: expected {expected:?} in the error, got ({}) {:?}",
                    case.what, status.code, status.message
                )),
                Err(e) => wrong.push(format!("{how} {}: not an API error: {e}", case.what)),
            }
        }
    }
    wrong
}

#[tokio::test]
async fn invalid_api_definitions_are_refused_with_a_message_naming_the_problem() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "crds-invalid-apis").await;
    let hook = |plugin: &str, symbol: &str| json!({"plugin": plugin, "symbol": symbol});
    let cases = vec![
        invalid(
            "listenPath without a leading slash",
            api_with(json!({"listenPath": "a/"})),
            "spec.listenPath in body should match '^/'",
        ),
        invalid("no listenPath", json!({"upstream": {"url": "http://127.0.0.1:1"}}), "spec.listenPath: Required value"),
        invalid("no upstream at all", json!({"listenPath": "/a/"}), "spec.upstream: Required value"),
        invalid(
            "an empty upstream",
            api_with(json!({"upstream": {}})),
            "exactly one of spec.upstream.url, spec.upstream.targets, spec.upstream.service must be set",
        ),
        invalid(
            "url and targets",
            api_with(json!({"upstream": {"url": "http://a:1", "targets": ["http://b:2"]}})),
            "exactly one of spec.upstream.url, spec.upstream.targets, spec.upstream.service must be set",
        ),
        invalid(
            "url and service",
            api_with(json!({"upstream": {"url": "http://a:1", "service": {"name": "s", "port": 80}}})),
            "exactly one of spec.upstream.url, spec.upstream.targets, spec.upstream.service must be set",
        ),
        invalid(
            "a target that is not http or https",
            api_with(json!({"upstream": {"targets": ["http://a:1", "ftp://b:2"]}})),
            "spec.upstream.targets[1]: Invalid value: \"ftp://b:2\": upstream URLs must start with http:// or https://",
        ),
        invalid(
            "a target without a host",
            api_with(json!({"upstream": {"targets": ["https://"]}})),
            "upstream URLs must have the form http[s]://host[:port][/base]",
        ),
        invalid(
            "upstream tls that skips verification and names a CA",
            api_with(
                json!({"upstream": {"url": "https://a", "tls": {"insecureSkipVerify": true, "caSecretRef": {"name": "ca"}}}}),
            ),
            "spec.upstream.tls: caSecretRef has no effect with insecureSkipVerify",
        ),
        invalid(
            "an upstream CA Secret name that is not a name",
            api_with(json!({"upstream": {"url": "https://a", "tls": {"caSecretRef": {"name": "../ca"}}}})),
            "spec.upstream.tls.caSecretRef.name: Invalid value: \"../ca\": must be the name of a Secret in the same namespace",
        ),
        invalid(
            "upstream tls for a plain http target",
            api_with(json!({"upstream": {"targets": ["https://a", "http://b"], "tls": {"serverName": "a"}}})),
            "spec.upstream.tls applies to https:// upstreams only: every url and target must start with https://",
        ),
        invalid(
            "upstream tls for a Service",
            api_with(json!({"upstream": {"service": {"name": "s", "port": 443}, "tls": {"serverName": "s"}}})),
            "spec.upstream.tls applies to https:// upstreams only: every url and target must start with https://",
        ),
        invalid(
            "an upstream protocol that is not http1 or http2",
            api_with(json!({"upstream": {"url": "http://a:1", "protocol": "http3"}})),
            "spec.upstream.protocol: Unsupported value: \"http3\": supported values: \"http1\", \"http2\"",
        ),
        undecodable(
            "an unknown upstream tls field",
            api_with(json!({"upstream": {"url": "https://a", "tls": {"verify": false}}})),
            "strict decoding error: unknown field \"spec.upstream.tls.verify\"",
            ".spec.upstream.tls.verify: field not declared in schema",
        ),
        invalid(
            "an upstream url with a query",
            api_with(json!({"upstream": {"url": "http://a:1/x?y=z"}})),
            "upstream URLs must not have a query or fragment",
        ),
        invalid(
            "a timeout that is not a duration",
            api_with(json!({"upstream": {"url": "http://a:1", "timeout": "3x"}})),
            "spec.upstream.timeout in body should match '^([0-9]{1,5}(h|m|s|ms)){1,4}$'",
        ),
        invalid(
            "a Go-style fractional duration",
            api_with(json!({"upstream": {"url": "http://a:1", "timeout": "1.5s"}})),
            "spec.upstream.timeout in body should match",
        ),
        invalid(
            "a zero timeout",
            api_with(json!({"upstream": {"url": "http://a:1", "timeout": "0s"}})),
            "spec.upstream.timeout must be greater than zero",
        ),
        invalid(
            "rate 0",
            api_with(json!({"rateLimit": {"rate": 0, "per": "1s"}})),
            "spec.rateLimit.rate in body should be greater than or equal to 1",
        ),
        invalid(
            "a zero rate window",
            api_with(json!({"rateLimit": {"rate": 5, "per": "0ms"}})),
            "spec.rateLimit.per must be greater than zero",
        ),
        invalid(
            "a rate without per",
            api_with(json!({"rateLimit": {"rate": 5}})),
            "spec.rateLimit.per: Required value",
        ),
        invalid(
            "an unknown auth type",
            api_with(json!({"auth": {"type": "basic"}})),
            "spec.auth.type: Unsupported value: \"basic\": supported values: \"keyless\", \"authToken\", \"plugin\", \"mtls\"",
        ),
        invalid(
            "mtls auth without mtls",
            api_with(json!({"hosts": ["a.example"], "auth": {"type": "mtls"}})),
            "spec.auth.mtls: Required value: spec.auth.mtls is required when spec.auth.type is mtls",
        ),
        invalid(
            "mtls auth without hosts",
            api_with(json!({"auth": {"type": "mtls", "mtls": {"caSecretRef": {"name": "clients"}}}})),
            "spec.hosts: Required value: spec.auth.type mtls requires spec.hosts",
        ),
        invalid(
            "mtls settings on a keyless API",
            api_with(json!({"hosts": ["a.example"], "auth": {"mtls": {"caSecretRef": {"name": "clients"}}}})),
            "spec.auth.mtls: Forbidden: spec.auth.mtls is only used when spec.auth.type is mtls",
        ),
        invalid(
            "tls without hosts",
            api_with(json!({"tls": {"secretName": "api-cert"}})),
            "spec.tls: Required value: spec.tls requires spec.hosts: the certificate is chosen by the host a client names (SNI)",
        ),
        invalid(
            "tls naming no Secret",
            api_with(json!({"hosts": ["a.example"], "tls": {"secretName": "Not_A_Name"}})),
            "secretName must be the name of a Secret in the same namespace",
        ),
        invalid(
            "plugin auth without authCheck",
            api_with(json!({"auth": {"type": "plugin"}})),
            "spec.middleware.authCheck: Required value: spec.middleware.authCheck is required when spec.auth.type is plugin",
        ),
        invalid(
            "authCheck on a keyless API",
            api_with(json!({"middleware": {"authCheck": hook("my-auth", "Authenticate")}})),
            "spec.middleware.authCheck: Forbidden: spec.middleware.authCheck is only used when spec.auth.type is plugin",
        ),
        invalid(
            "authCheck with authToken auth",
            api_with(json!({"auth": {"type": "authToken"}, "middleware": {"authCheck": hook("a", "B")}})),
            "spec.middleware.authCheck is only used when spec.auth.type is plugin",
        ),
        invalid(
            "authToken with nowhere to look for the key",
            api_with(json!({"auth": {"type": "authToken", "authToken": {"header": "", "query": "", "cookie": ""}}})),
            "spec.auth.authToken: Invalid value: spec.auth.authToken needs at least one of header, query, cookie when spec.auth.type is authToken",
        ),
        undecodable(
            "an unknown field in spec",
            api_with(json!({"listenpath": "/b/"})),
            "strict decoding error: unknown field \"spec.listenpath\"",
            ".spec.listenpath: field not declared in schema",
        ),
        undecodable(
            "an unknown field deeper down",
            api_with(json!({"upstream": {"url": "http://a:1", "tmeout": "1s"}})),
            "strict decoding error: unknown field \"spec.upstream.tmeout\"",
            ".spec.upstream.tmeout: field not declared in schema",
        ),
        invalid(
            "service port 0",
            api_with(json!({"upstream": {"service": {"name": "s", "port": 0}}})),
            "spec.upstream.service.port in body should be greater than or equal to 1",
        ),
        invalid(
            "service port 65536",
            api_with(json!({"upstream": {"service": {"name": "s", "port": 65536}}})),
            "spec.upstream.service.port in body should be less than or equal to 65535",
        ),
        invalid(
            "a service name that is not a DNS label",
            api_with(json!({"upstream": {"service": {"name": "My_Service", "port": 80}}})),
            "spec.upstream.service.name in body should match",
        ),
        invalid(
            "an empty symbol",
            api_with(json!({"middleware": {"pre": [hook("hit-counter", "")]}})),
            "spec.middleware.pre[0].symbol: Invalid value: \"\": symbol must be the name of a hook the plugin exports",
        ),
        invalid(
            "a symbol with a space",
            api_with(json!({"middleware": {"response": [hook("a", "My Hook")]}})),
            "spec.middleware.response[0].symbol: Invalid value: \"My Hook\": symbol must be the name of a hook",
        ),
        invalid(
            "an empty plugin name",
            api_with(json!({"middleware": {"post": [hook("", "X")]}})),
            "spec.middleware.post[0].plugin: Invalid value: \"\": plugin must be the name of a Plugin in the same namespace",
        ),
        invalid(
            "a plugin name that is not a resource name",
            api_with(json!({"middleware": {"postKeyAuth": [hook("Hit_Counter", "X")]}})),
            "spec.middleware.postKeyAuth[0].plugin: Invalid value: \"Hit_Counter\": plugin must be the name of a Plugin",
        ),
        invalid(
            "a hook without symbol",
            api_with(json!({"middleware": {"pre": [{"plugin": "a"}]}})),
            "spec.middleware.pre[0].symbol: Required value",
        ),
        invalid(
            "an endpoint path without a leading slash",
            api_with(json!({"middleware": {"endpoints": [{"path": "users"}]}})),
            "spec.middleware.endpoints[0].path: Invalid value: \"users\": an endpoint path must start with '/'",
        ),
        invalid(
            "an endpoint parameter that is not a whole segment",
            api_with(json!({"middleware": {"endpoints": [{"path": "/ok"}, {"path": "/users/x{id}"}]}})),
            "spec.middleware.endpoints[1].path: Invalid value: \"/users/x{id}\": a parameter must be a whole segment",
        ),
        invalid(
            "a wildcard that is not the last segment",
            api_with(json!({"middleware": {"endpoints": [{"path": "/a/*/b"}]}})),
            "spec.middleware.endpoints[0].path: Invalid value: \"/a/*/b\": '*' is only allowed as the whole last segment",
        ),
        invalid(
            "an endpoint path with a dot-segment",
            api_with(json!({"middleware": {"endpoints": [{"path": "/a/../b"}]}})),
            "empty, '.' and '..' segments never match a normalised request path",
        ),
        invalid(
            "two endpoints with the same path and method",
            api_with(json!({"middleware": {"endpoints": [
                {"path": "/u/{id}", "methods": ["GET"]},
                {"path": "/u/{id}", "methods": ["PUT", "GET"]},
            ]}})),
            "spec.middleware.endpoints: Invalid value: two endpoints declare the same path and method",
        ),
        invalid(
            "an endpoint for any method after one for GET on the same path",
            api_with(json!({"middleware": {"endpoints": [{"path": "/u", "methods": ["GET"]}, {"path": "/u"}]}})),
            "two endpoints declare the same path and method",
        ),
        invalid(
            "a method outside the HTTP set",
            api_with(json!({"middleware": {"endpoints": [{"path": "/u", "methods": ["FETCH"]}]}})),
            "spec.middleware.endpoints[0].methods[0]: Unsupported value: \"FETCH\"",
        ),
        undecodable(
            "a method listed twice",
            api_with(json!({"middleware": {"endpoints": [{"path": "/u", "methods": ["GET", "GET"]}]}})),
            "spec.middleware.endpoints[0].methods[1]: Duplicate value: \"GET\"",
            ".spec.middleware.endpoints[0].methods: duplicate entries for key [=\"GET\"]",
        ),
        undecodable(
            "a disabled entry that is not a boolean",
            api_with(json!({"middleware": {"pre": [{"plugin": "a", "symbol": "B", "disabled": "yes"}]}})),
            "spec.middleware.pre[0].disabled: Invalid value: \"string\": spec.middleware.pre[0].disabled in body must be of type boolean",
            ".spec.middleware.pre[0].disabled: expected boolean",
        ),
        invalid(
            "65 hooks in one phase",
            api_with(json!({"middleware": {"pre": vec![hook("a", "B"); 65]}})),
            "spec.middleware.pre: Too many: 65: must have at most 64 items",
        ),
        invalid(
            "an empty host",
            api_with(json!({"hosts": ["a.example", ""]})),
            "spec.hosts[1] in body should be at least 1 chars long",
        ),
        invalid(
            "an empty display name",
            api_with(json!({"name": ""})),
            "spec.name in body should be at least 1 chars long",
        ),
        undecodable(
            "configData that is not an object",
            api_with(json!({"configData": "x"})),
            "spec.configData: Invalid value: \"string\": spec.configData in body must be of type object",
            ".spec.configData: expected map",
        ),
        undecodable(
            "a listenPath that is not a string",
            api_with(json!({"listenPath": 5})),
            "spec.listenPath: Invalid value: \"integer\": spec.listenPath in body must be of type string",
            ".spec.listenPath: expected string",
        ),
    ];
    let n = cases.len();
    let wrong = refusals(&c.client, &ns, "ApiDefinition", &cases).await;
    assert!(
        wrong.is_empty(),
        "{} of {n} invalid ApiDefinitions were not refused as expected:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test]
async fn invalid_plugins_are_refused_with_a_message_naming_the_problem() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "crds-invalid-plugins").await;
    let cases = vec![
        invalid("a relative path", json!({"path": "libx.so"}), "spec.path in body should match '^/'"),
        invalid("no path", json!({"failurePolicy": "Fail"}), "spec.path: Required value"),
        invalid(
            "a short sha256",
            json!({"path": "/x.so", "sha256": "9f2c"}),
            "spec.sha256 in body should match '^[0-9a-fA-F]{64}$'",
        ),
        invalid(
            "a sha256 that is not hex",
            json!({"path": "/x.so", "sha256": "z".repeat(64)}),
            "spec.sha256 in body should match '^[0-9a-fA-F]{64}$'",
        ),
        invalid(
            "a lowercase failurePolicy",
            json!({"path": "/x.so", "failurePolicy": "fail"}),
            "spec.failurePolicy: Unsupported value: \"fail\": supported values: \"Fail\", \"Ignore\"",
        ),
        invalid(
            "a configMapRef without key",
            json!({"path": "/x.so", "configMapRef": {"name": "x"}}),
            "spec.configMapRef.key: Required value",
        ),
        invalid(
            "a configMapRef key with a slash",
            json!({"path": "/x.so", "configMapRef": {"name": "x", "key": "a/b.so"}}),
            "spec.configMapRef.key in body should match",
        ),
        undecodable(
            "an unknown field",
            json!({"path": "/x.so", "symbols": ["A"]}),
            "strict decoding error: unknown field \"spec.symbols\"",
            ".spec.symbols: field not declared in schema",
        ),
    ];
    let n = cases.len();
    let wrong = refusals(&c.client, &ns, "Plugin", &cases).await;
    assert!(
        wrong.is_empty(),
        "{} of {n} invalid Plugins were not refused as expected:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Runs kubectl against the test cluster with `stdin` as its input.
fn run_kubectl(c: &Cluster, args: &[&str], stdin: &str) -> Output {
    Command::new(&c.kubectl)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut input) = child.stdin.take() {
                input.write_all(stdin.as_bytes())?;
            }
            child.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", c.kubectl.display()))
}

/// Runs kubectl, which must succeed; its stdout and stderr.
fn kubectl(c: &Cluster, args: &[&str], stdin: &str) -> String {
    let out = run_kubectl(c, args, stdin);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubectl {args:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn the_chart_crds_and_the_examples_apply_with_kubectl() {
    let c = cluster().await;
    let ns = fresh_namespace(&c.client, "crds-kubectl").await;
    // The committed chart files (checked against crdgen by a crds unit test), as helm would.
    let out = kubectl(&c, &["apply", "--server-side", "--force-conflicts", "-f", "charts/gatehouse/crds/"], "");
    assert!(!out.contains("Warning"), "the API server warned about the CRDs:\n{out}");
    let crds = ["crd/apidefinitions.gatehouse.dev", "crd/plugins.gatehouse.dev"];
    kubectl(&c, &[&["wait", "--for=condition=Established", "--timeout=30s"][..], &crds].concat(), "");
    // A user's plain `kubectl apply` (client-side, strict field validation by default) of
    // every example; a dry run, since the examples name the `default` namespace.
    let out = kubectl(&c, &["apply", "--dry-run=server", "-f", "examples/standalone/"], "");
    assert_eq!(out.matches("(server dry run)").count(), 10, "4 APIs, 5 plugins and a key expected:\n{out}");
    assert!(!out.contains("Warning"), "{out}");
    // And the printer columns, on a real object.
    let manifest = "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: shown}\n\
                    spec: {listenPath: /shown/, upstream: {url: 'http://127.0.0.1:9'}}\n";
    kubectl(&c, &["apply", "-n", &ns, "-f", "-"], manifest);
    let listed = kubectl(&c, &["get", "-n", &ns, "apidef", "shown"], "");
    for column in ["LISTEN PATH", "UPSTREAM", "PROGRAMMED", "/shown/", "http://127.0.0.1:9"] {
        assert!(listed.contains(column), "{column:?} not in:\n{listed}");
    }
    // A refusal reads as the CEL rule's message.
    let bad = "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: bad}\n\
               spec: {listenPath: /bad/, upstream: {}}\n";
    let out = run_kubectl(&c, &["create", "-n", &ns, "-f", "-"], bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("exactly one of spec.upstream.url, spec.upstream.targets, spec.upstream.service must be set"),
        "{stderr}"
    );
}
