//! Binds an ApiDefinition's `middleware` to plugin hooks: the `PluginChain` an API runs,
//! phase by phase, and what its `failurePolicy` does to the API when an entry cannot be
//! bound. Loading libraries and binding one entry is the plugin host's
//! (`gatehouse_plugin_host::ChainBuilder`); which hooks an API has, and when it answers 500
//! instead, is decided here.

use gatehouse_crds::{FailurePolicy, PluginRef, snapshot::ApiEntry};
use gatehouse_plugin_host::{ChainBuilder, HookCall, Phase};

use crate::endpoints::Endpoint;

/// An API's hooks by phase. `unavailable` is set when a plugin under `failurePolicy: Fail`
/// could not be bound: the API then answers 500 rather than run without it.
#[derive(Default)]
pub struct PluginChain {
    pub pre: Vec<HookCall>,
    pub auth_check: Option<HookCall>,
    pub post_key_auth: Vec<HookCall>,
    /// In declared order; the first that matches a request runs (`endpoints::find`).
    pub endpoints: Vec<Endpoint>,
    pub post: Vec<HookCall>,
    pub response: Vec<HookCall>,
    /// `middleware.analytics`, run by the analytics writer on each record of the API.
    pub analytics: Vec<HookCall>,
    /// Some analytics entry asked for `detailedRecording`: records carry the bodies.
    pub detailed_recording: bool,
    pub unavailable: Option<String>,
    /// Entries with `disabled: true`, by field path, for `/config`.
    pub disabled: Vec<String>,
    /// Some request hook reads the body: buffer it before the chain.
    pub request_body: bool,
    /// Some response hook reads the body: buffer the upstream's.
    pub response_body: bool,
}

impl PluginChain {
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty()
            && self.auth_check.is_none()
            && self.post_key_auth.is_empty()
            && self.endpoints.is_empty()
            && self.post.is_empty()
            && self.response.is_empty()
            && self.analytics.is_empty()
            && self.unavailable.is_none()
    }
}

/// Binds an API's `middleware`. Returns the chain and notes on skipped hooks.
pub fn chain(plugins: &ChainBuilder<'_>, api: &ApiEntry) -> (PluginChain, Vec<String>) {
    let mut chain = PluginChain::default();
    let mut notes = Vec::new();
    let m = &api.spec.middleware;
    fn indexed(phase: Phase, list: &[PluginRef]) -> impl Iterator<Item = (Phase, usize, &PluginRef)> {
        list.iter().enumerate().map(move |(i, r)| (phase, i, r))
    }
    let entries = indexed(Phase::Pre, &m.pre)
        .chain(m.auth_check.iter().map(|r| (Phase::AuthCheck, 0, r)))
        .chain(indexed(Phase::PostKeyAuth, &m.post_key_auth))
        .chain(indexed(Phase::Post, &m.post))
        .chain(indexed(Phase::Response, &m.response));
    for (phase, i, r) in entries {
        if r.disabled {
            let field = if phase == Phase::AuthCheck {
                format!("spec.middleware.{phase}")
            } else {
                format!("spec.middleware.{phase}[{i}]")
            };
            chain.disabled.push(format!("{field} (Plugin {}, symbol {:?})", r.plugin, r.symbol));
            continue;
        }
        let Some(call) =
            bind_entry(plugins, api, phase, &format!("spec.middleware.{phase}"), r, &mut chain, &mut notes)
        else {
            continue;
        };
        match phase {
            Phase::Pre => chain.pre.push(call),
            Phase::AuthCheck => chain.auth_check = Some(call),
            Phase::PostKeyAuth => chain.post_key_auth.push(call),
            Phase::Post => chain.post.push(call),
            Phase::Response => chain.response.push(call),
            // Endpoint and analytics entries are bound below.
            Phase::Endpoint | Phase::Analytics => {}
        }
    }
    for (i, e) in m.endpoints.iter().enumerate() {
        let mut endpoint = match Endpoint::compile(e) {
            Ok(endpoint) => endpoint,
            Err(reason) => {
                // Validation refuses these before a snapshot is made; a snapshot from
                // elsewhere still must not serve the API without its endpoint hooks.
                chain.unavailable.get_or_insert(format!("spec.middleware.endpoints[{i}].path: {reason}"));
                continue;
            }
        };
        for (j, r) in e.plugins.iter().enumerate() {
            let field = format!("spec.middleware.endpoints[{i}].plugins[{j}]");
            if r.disabled {
                chain.disabled.push(format!("{field} (Plugin {}, symbol {:?})", r.plugin, r.symbol));
                continue;
            }
            if let Some(call) = bind_entry(plugins, api, Phase::Endpoint, &field, r, &mut chain, &mut notes) {
                endpoint.hooks.push(call);
            }
        }
        chain.endpoints.push(endpoint);
    }
    bind_analytics(plugins, api, &mut chain, &mut notes);
    (chain, notes)
}

/// Binds `middleware.analytics`, in order; a failure gets the Plugin's `failurePolicy` as
/// in every other phase.
fn bind_analytics(plugins: &ChainBuilder<'_>, api: &ApiEntry, chain: &mut PluginChain, notes: &mut Vec<String>) {
    for (i, e) in api.spec.middleware.analytics.iter().enumerate() {
        let field = format!("spec.middleware.analytics[{i}]");
        let r = &e.hook;
        if r.disabled {
            chain.disabled.push(format!("{field} (Plugin {}, symbol {:?})", r.plugin, r.symbol));
            continue;
        }
        if let Some(call) = bind_entry(plugins, api, Phase::Analytics, &field, r, chain, notes) {
            chain.analytics.push(call);
            chain.detailed_recording |= e.detailed_recording;
        }
    }
}

/// Binds one entry; a failure is applied to the chain by the Plugin's `failurePolicy`.
fn bind_entry(
    plugins: &ChainBuilder<'_>,
    api: &ApiEntry,
    phase: Phase,
    field: &str,
    r: &PluginRef,
    chain: &mut PluginChain,
    notes: &mut Vec<String>,
) -> Option<HookCall> {
    let plugin_id = format!("{}/{}", api.namespace, r.plugin);
    match plugins.bind(&plugin_id, phase, r) {
        Ok(call) => {
            // Analytics hooks see bodies through `detailedRecording`, never by buffering.
            chain.request_body |= !matches!(phase, Phase::Response | Phase::Analytics) && call.wants_body();
            chain.response_body |= phase == Phase::Response && call.wants_body();
            Some(call)
        }
        Err((policy, e)) => {
            let what = format!("{field}: Plugin {plugin_id}, symbol {:?}: {e}", r.symbol);
            match policy {
                FailurePolicy::Fail => {
                    tracing::warn!(api = %api.id(), "{what}; answering 500 (failurePolicy Fail)");
                    chain.unavailable.get_or_insert(what);
                }
                FailurePolicy::Ignore => {
                    tracing::warn!(api = %api.id(), "{what}; skipping it (failurePolicy Ignore)");
                    notes.push(format!("skipping {what}"));
                }
            }
            None
        }
    }
}
