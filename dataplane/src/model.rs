//! What one API and one key session are on the request path: the compiled `Api` (with its
//! targets and its hooks) and the `Session` a key or an `authCheck` hook gives a request.
//! The router, the chain's stages and the plugin host (through `HookApi` and
//! `HookSession`) read them; this module reads none of those.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use gatehouse_crds::{
    KeySession,
    snapshot::{ApiEntry, KeyEntry},
};
use gatehouse_plugin_host::{HookApi, HookSession, NewSession, SessionView};
use http::uri::Authority;

use crate::{
    connect::{Connector, TlsClient, TlsInputs, UpstreamClient},
    key_id::KeyIdSecret,
    metrics::{ApiMetrics, Metrics},
    middleware::PluginChain,
};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Api {
    pub id: Arc<str>,
    pub display_name: Arc<str>,
    pub entry: ApiEntry,
    targets: Vec<Target>,
    next_target: AtomicUsize,
    pub timeout: Duration,
    /// Counter-store key of the API-wide rate limit.
    pub rate_key: Arc<str>,
    pub metrics: ApiMetrics,
    pub plugins: PluginChain,
    /// Hooks skipped under `failurePolicy: Ignore`, and why.
    pub notes: Vec<String>,
    /// What plugins read through `api_config_data` and `api_spec`, serialised once.
    pub config_data_json: String,
    pub spec_json: String,
    /// The client of its `https://` targets, and what it was made from.
    pub tls: Option<(TlsClient, TlsInputs)>,
    /// `upstream.protocol: http2`: the h2c client of its `http://` targets.
    pub h2c: Option<UpstreamClient>,
    pub http2: bool,
}

pub struct Target {
    pub authority: Authority,
    /// `https://`: sent through the API's TLS client.
    pub https: bool,
    /// Path of the upstream URL without its trailing slash ("" for none).
    pub base_path: String,
    /// This target's connection slots, bound on first use (`proxy::TargetSlots`).
    pub slots: std::sync::OnceLock<Arc<crate::slots::Slots>>,
    /// The `Host` its requests carry, computed once.
    pub host: http::HeaderValue,
    /// Its idle HTTP/1.1 connections (`http://` only), bound on first use (`pool::Pool`).
    pub pool: std::sync::OnceLock<Arc<crate::pool::TargetPool<crate::body::ProxyBody>>>,
}

/// A key's session, looked up by the SHA-256 of the key, or created by an `authCheck` hook.
#[derive(Clone)]
pub struct Session {
    /// `namespace/name` of the key Secret.
    pub alias: Arc<str>,
    pub hash: Arc<str>,
    /// What analytics records identify the key by: HMAC-SHA256 of `hash` under the
    /// installation's secret (see `key_id`), never the plain hash. None for sessions an
    /// `authCheck` hook created.
    pub key_id: Option<Arc<str>>,
    pub namespace: String,
    pub session: KeySession,
    pub rate_key: Arc<str>,
    pub quota_key: Arc<str>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Api {
    /// Round robin over the targets.
    pub fn pick_target(&self) -> &Target {
        let i = self.next_target.fetch_add(1, Ordering::Relaxed);
        &self.targets[i % self.targets.len()]
    }

    pub(crate) fn compile(
        entry: &ApiEntry,
        metrics: &Metrics,
        plugins: PluginChain,
        notes: Vec<String>,
        tls: Option<TlsInputs>,
        connector: &Connector,
    ) -> Result<Self, String> {
        let id: Arc<str> = Arc::from(entry.id());
        let targets = entry.targets.iter().map(|t| parse_target(t)).collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err("spec.upstream: no targets".to_owned());
        }
        let http2 = entry.spec.upstream.protocol == gatehouse_crds::UpstreamProtocol::Http2;
        let tls = match tls {
            Some(inputs) => Some((connector.tls(&inputs.config(&id)?, http2), inputs)),
            None => None,
        };
        let h2c = (http2 && targets.iter().any(|t| !t.https)).then(|| connector.h2c());
        Ok(Self {
            display_name: Arc::from(entry.display_name()),
            targets,
            next_target: AtomicUsize::new(0),
            timeout: entry.spec.upstream.timeout.map_or(DEFAULT_TIMEOUT, |t| t.as_std()),
            rate_key: Arc::from(format!("rate:{id}/api")),
            metrics: metrics.for_api(&id),
            config_data_json: entry.spec.config_data.as_ref().map_or_else(|| "null".to_owned(), |v| v.to_string()),
            spec_json: serde_json::to_string(&entry.spec).unwrap_or_else(|_| "{}".to_owned()),
            plugins,
            notes,
            tls,
            h2c,
            http2,
            entry: entry.clone(),
            id,
        })
    }
}

fn parse_target(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("spec.upstream: {url:?}: {e}"))?;
    let authority = uri.authority().cloned().ok_or_else(|| format!("spec.upstream: {url:?} has no host"))?;
    let https = uri.scheme_str() == Some("https");
    crate::egress::check_literal(authority.host(), authority.port_u16().unwrap_or(if https { 443 } else { 80 }))
        .map_err(|r| format!("spec.upstream: {url:?}: {r}"))?;
    Ok(Target {
        host: crate::pool::host_header(&authority, https),
        authority,
        https,
        base_path: uri.path().trim_end_matches('/').to_owned(),
        slots: Default::default(),
        pool: Default::default(),
    })
}

impl Session {
    pub(crate) fn compile(k: &KeyEntry, digest: &[u8; 32], key_ids: &KeyIdSecret) -> Self {
        let key_id = key_ids.id(digest);
        // Counter names hold the keyed id, never the key's plain hash: a shared store is
        // read by more people than the gateway, and a plain hash can be tested against
        // guesses. The namespace keeps equal keys of two tenants apart.
        let counter = format!("{}/key/{key_id}", k.namespace);
        Self {
            alias: Arc::from(k.id()),
            hash: Arc::from(k.hash.as_str()),
            key_id: Some(key_id),
            namespace: k.namespace.clone(),
            session: k.session.clone(),
            rate_key: Arc::from(format!("rate:{counter}")),
            quota_key: Arc::from(format!("quota:{counter}")),
        }
    }

    /// Whether this session was compiled from `k` as it is now (same key, same Secret, same
    /// session), so a rebuild can keep it, keyed id included.
    pub(crate) fn is_from(&self, k: &KeyEntry) -> bool {
        let alias = self.alias.strip_prefix(k.namespace.as_str()).and_then(|rest| rest.strip_prefix('/'));
        alias == Some(k.name.as_str())
            && *self.hash == *k.hash
            && self.namespace == k.namespace
            && self.session == k.session
    }

    pub fn from_plugin(namespace: &str, plugin: &str, id: &str, session: KeySession) -> Self {
        // An auth plugin may name sessions by the token itself: counters hold its SHA-256,
        // scoped to the plugin and namespace that made it.
        let scoped = format!("{namespace}/plugin/{plugin}/{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(id)));
        Self {
            alias: Arc::from(id),
            hash: Arc::from(""),
            key_id: None,
            namespace: namespace.to_owned(),
            session,
            rate_key: Arc::from(format!("rate:{scoped}")),
            quota_key: Arc::from(format!("quota:{scoped}")),
        }
    }

    /// The session of a client certificate on the mtls API `api_name`: no limits of its
    /// own (a `postKeyAuth` hook may set some), its counters keyed by the certificate.
    pub fn from_client_certificate(
        namespace: &str,
        api_name: &str,
        subject: &Arc<str>,
        sha256: &str,
        meta_data: std::collections::BTreeMap<String, String>,
    ) -> Self {
        let counter = format!("{namespace}/certificate/{sha256}");
        Self {
            alias: subject.clone(),
            hash: Arc::from(""),
            key_id: None,
            namespace: namespace.to_owned(),
            session: KeySession { access_rights: vec![api_name.to_owned()], meta_data, ..KeySession::default() },
            rate_key: Arc::from(format!("rate:{counter}")),
            quota_key: Arc::from(format!("quota:{counter}")),
        }
    }

    /// Keys grant APIs by name, in their own namespace only.
    pub fn may_access(&self, api: &Api) -> bool {
        self.namespace == api.entry.namespace && self.session.access_rights.contains(&api.entry.name)
    }
}

impl HookApi for Api {
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.entry.name
    }
    fn namespace(&self) -> &str {
        &self.entry.namespace
    }
    fn display_name(&self) -> &str {
        &self.display_name
    }
    fn listen_path(&self) -> &str {
        &self.entry.spec.listen_path
    }
    fn config_data_json(&self) -> &str {
        &self.config_data_json
    }
    fn spec_json(&self) -> &str {
        &self.spec_json
    }
}

impl HookSession for Session {
    fn view(&self) -> SessionView<'_> {
        SessionView { alias: &self.alias, key_id: self.key_id.as_deref(), session: &self.session }
    }

    fn key_session_mut(&mut self) -> &mut KeySession {
        &mut self.session
    }

    fn from_hook(new: NewSession<'_>) -> Self {
        let mut made = Session::from_plugin(new.namespace, new.plugin, new.id, new.session);
        if !new.alias.is_empty() {
            made.alias = Arc::from(new.alias);
        }
        made
    }
}
