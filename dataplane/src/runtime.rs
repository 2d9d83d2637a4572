//! The config a dataplane serves, compiled from a snapshot into what the request path
//! needs: a router, parsed upstreams, key lookups by hash, resolved metric handles.
//!
//! A `Runtime` never changes once built; a new config builds a new one and swaps it in,
//! and each request keeps the one it started with.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use gatehouse_crds::snapshot::{ApiEntry, KeyEntry, PluginEntry, Snapshot, route_conflicts};
use gatehouse_plugin_host::{ChainBuilder, HookMetrics, Loader, PluginReport, ServedPlugins};
use serde::Serialize;

use crate::{
    connect::{Connector, TlsInputs},
    key_id::KeyIdSecret,
    metrics::Metrics,
    middleware,
    model::{Api, Session},
    router::Router,
    tls::{self, CertTable, CertificateReport},
};

/// How the `/config` state of an API that lost its route to an older one starts.
pub const CONFLICTED: &str = "conflicted";

pub struct Runtime {
    pub version: u64,
    pub router: Router,
    /// Shared with the next runtime when no key changed: most config changes touch APIs.
    keys: Arc<HashMap<[u8; 32], Arc<Session>>>,
    /// Per-resource results, for /config and acknowledgements.
    pub report: Report,
    /// Each Plugin file and the content hash last examined in it (None: it could not be
    /// examined, so any content now there is new).
    pub plugin_files: Vec<(String, Option<String>)>,
    /// Some Plugin failed for a reason that may pass by itself (its file was still being
    /// written): look at plugin files again soon.
    pub plugin_retry: bool,
    /// The library each Plugin is served by, for the next build to fall back to.
    served_plugins: ServedPlugins,
    /// Compiled APIs by id, for the next build to reuse.
    apis: HashMap<String, Arc<Api>>,
    /// Each Plugin and the content loaded for it, to tell which APIs a change touches.
    plugin_state: BTreeMap<String, (PluginEntry, Option<String>)>,
    /// The certificates `--tls-listen` serves with this config.
    pub certificates: Arc<CertTable>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub version: u64,
    pub apis: Vec<ApiReport>,
    pub plugins: Vec<PluginReport>,
    pub keys: usize,
    /// `kubernetes.io/tls` Secrets: state and names, never key material.
    pub certificates: Vec<CertificateReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiReport {
    pub id: String,
    pub name: String,
    pub generation: i64,
    pub listen_path: String,
    /// Upstream base URLs.
    pub targets: Vec<String>,
    /// `serving`, `inactive`, or why it is not served.
    pub state: String,
    /// `middleware` entries with `disabled: true`, which are not bound: field path, Plugin
    /// and symbol.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disabled: Vec<String>,
}

impl ApiReport {
    /// Served as declared (possibly without `Ignore`d hooks), or deliberately inactive.
    pub fn ok(&self) -> bool {
        self.state == "serving" || self.state == "inactive" || self.state.starts_with("serving;")
    }
}

/// The key lookup table. Sessions whose key Secret did not change are taken over from
/// `prev` (no new HMAC); when none changed, the whole table is (no allocation at all).
fn build_keys(
    snapshot: &Snapshot,
    key_ids: &KeyIdSecret,
    prev: Option<&Runtime>,
) -> Arc<HashMap<[u8; 32], Arc<Session>>> {
    let digest = |k: &KeyEntry| {
        let mut d = [0u8; 32];
        hex::decode_to_slice(&k.hash, &mut d).ok().map(|()| d)
    };
    let kept = |k: &KeyEntry| {
        let d = digest(k)?;
        prev?.keys.get(&d).filter(|s| s.is_from(k)).map(|s| (d, s.clone()))
    };
    if let Some(p) = prev
        && p.keys.len() == snapshot.keys.len()
        && snapshot.keys.values().all(|k| kept(k).is_some())
    {
        return p.keys.clone();
    }
    let mut keys = HashMap::with_capacity(snapshot.keys.len());
    for k in snapshot.keys.values() {
        let (d, session) = match (kept(k), digest(k)) {
            (Some(reused), _) => reused,
            (None, Some(d)) => (d, Arc::new(Session::compile(k, &d, key_ids))),
            (None, None) => {
                tracing::warn!(key = %k.id(), "key hash is not 64 hex digits; key not served");
                continue;
            }
        };
        keys.insert(d, session);
    }
    Arc::new(keys)
}

impl Runtime {
    /// Compiles a snapshot. An API whose entry and Plugins are unchanged since `prev` is
    /// reused as it is, so a one-API change costs one API's compilation (plus rebuilding
    /// the router), however many APIs there are.
    pub fn build(
        snapshot: &Snapshot,
        metrics: &Metrics,
        loader: &Loader,
        key_ids: &KeyIdSecret,
        connector: &Connector,
        prev: Option<&Runtime>,
    ) -> Self {
        let mut router = Router::default();
        let mut report = Report { version: snapshot.version, ..Default::default() };
        let hook_metrics = HookMetrics { duration: &metrics.plugin_duration, failures: &metrics.plugin_failures };
        let plugins = ChainBuilder::new(snapshot, loader, hook_metrics, prev.map(|p| &p.served_plugins));
        let plugin_state: BTreeMap<String, (PluginEntry, Option<String>)> = snapshot
            .plugins
            .iter()
            .map(|(id, p)| {
                let sha = plugins.reports.iter().find(|r| r.id == *id).and_then(|r| r.sha256.clone());
                (id.clone(), (p.clone(), sha))
            })
            .collect();
        let mut apis = HashMap::with_capacity(snapshot.apis.len());
        // Decided before anything is compiled, by the same rule as the controller's status,
        // so that the order of the snapshot never picks a route's owner.
        let conflicts = route_conflicts(snapshot.apis.values());
        for (id, entry) in &snapshot.apis {
            let mut state = "serving".to_owned();
            let mut disabled = Vec::new();
            if !entry.spec.active {
                state = "inactive".to_owned();
            } else if let Some(c) = conflicts.get(id) {
                state = format!("{CONFLICTED}: spec.listenPath: {c}");
            } else {
                let compiled = TlsInputs::of(snapshot, entry).and_then(|tls| {
                    let same_tls = |a: &Api| a.tls.as_ref().map(|(_, i)| i) == tls.as_ref();
                    let reused = prev.and_then(|p| {
                        p.apis
                            .get(id)
                            .filter(|a| a.entry == *entry && same_tls(a) && p.same_plugins(entry, &plugin_state))
                    });
                    match reused {
                        Some(api) => Ok(api.clone()),
                        None => {
                            let (chain, notes) = middleware::chain(&plugins, entry);
                            Api::compile(entry, metrics, chain, notes, tls, connector).map(Arc::new)
                        }
                    }
                });
                match compiled {
                    Ok(api) => {
                        if let Err(holder) = router.insert(&api) {
                            state = format!(
                                "spec.listenPath: {} is already served by {}",
                                entry.spec.listen_path, holder.id
                            );
                        } else if let Some(reason) = &api.plugins.unavailable {
                            state = format!("answering 500: {reason}");
                        } else if !api.notes.is_empty() {
                            state = format!("serving; {}", api.notes.join("; "));
                        }
                        disabled.clone_from(&api.plugins.disabled);
                        apis.insert(id.clone(), api);
                    }
                    Err(e) => state = e,
                }
            }
            if state != "serving" && state != "inactive" {
                tracing::warn!(api = %id, reason = %state, "API not served as declared");
            }
            report.apis.push(ApiReport {
                id: id.clone(),
                name: entry.display_name().to_owned(),
                generation: entry.generation,
                listen_path: entry.spec.listen_path.clone(),
                targets: entry.targets.clone(),
                state,
                disabled,
            });
        }
        // Certificates, for the APIs that are routed: an API with a TLS problem still
        // serves plain HTTP (and its hosts keep the certificate they had, if any).
        let empty = CertTable::default();
        let served = snapshot.apis.iter().filter(|(id, _)| apis.contains_key(*id)).map(|(_, e)| e);
        let tls = tls::build(snapshot, served, prev.map_or(&empty, |p| &p.certificates));
        for a in &mut report.apis {
            if let Some(problem) = tls.api_problems.get(&a.id)
                && a.ok()
            {
                tracing::warn!(api = %a.id, reason = %problem, "API not served over TLS as declared");
                a.state = format!("not served over TLS as declared: {problem}");
            }
        }
        report.certificates = tls.certificates;
        let keys = build_keys(snapshot, key_ids, prev);
        report.keys = keys.len();
        let (plugin_files, plugin_retry, served_plugins) =
            (plugins.checked_files(), plugins.retry_pending(), plugins.served());
        report.plugins = plugins.reports;
        Self {
            version: snapshot.version,
            router,
            keys,
            report,
            plugin_files,
            plugin_retry,
            served_plugins,
            apis,
            plugin_state,
            certificates: tls.table,
        }
    }

    /// Whether every Plugin `entry` names is as it was (resource and loaded content).
    fn same_plugins(&self, entry: &ApiEntry, now: &BTreeMap<String, (PluginEntry, Option<String>)>) -> bool {
        entry.spec.middleware.refs().all(|(_, r)| {
            let id = format!("{}/{}", entry.namespace, r.plugin);
            self.plugin_state.get(&id) == now.get(&id)
        })
    }

    pub fn session(&self, key_sha256: &[u8; 32]) -> Option<&Arc<Session>> {
        self.keys.get(key_sha256)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use gatehouse_crds::KeySession;

    use super::*;
    use crate::middleware::PluginChain;

    pub(crate) fn api(name: &str, listen_path: &str, hosts: &[&str]) -> Arc<Api> {
        api_to(name, listen_path, hosts, "http://127.0.0.1:1/base/")
    }

    pub(crate) fn api_to(name: &str, listen_path: &str, hosts: &[&str], url: &str) -> Arc<Api> {
        let yaml = format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: {listen_path}\n  hosts: {hosts:?}\n  upstream: {{url: '{url}'}}\n"
        );
        let parsed = gatehouse_crds::manifest::parse("test", &yaml);
        let Some((_, gatehouse_crds::manifest::Resource::Api(a))) = parsed.resources.into_iter().next() else {
            panic!("bad test API: {:?}", parsed.rejected)
        };
        let entry = ApiEntry::compile(&a, None).expect("compiles");
        Arc::new(
            Api::compile(&entry, &Metrics::new(), PluginChain::default(), Vec::new(), None, &Connector::default())
                .expect("compiles"),
        )
    }

    fn key(name: &str, token: &str, rate: Option<u64>) -> KeyEntry {
        KeyEntry {
            namespace: "default".into(),
            name: name.into(),
            hash: gatehouse_crds::key_hash(token.as_bytes()),
            session: KeySession {
                rate,
                per: rate.map(|_| gatehouse_crds::Duration(Duration::from_secs(1))),
                ..Default::default()
            },
        }
    }

    fn snapshot(keys: &[KeyEntry]) -> Snapshot {
        Snapshot { keys: keys.iter().map(|k| (k.id(), k.clone())).collect(), ..Default::default() }
    }

    #[test]
    fn unchanged_keys_are_taken_over_by_the_next_runtime() {
        let (metrics, loader) = (Metrics::new(), Loader::new(std::env::temp_dir().join("gatehouse-unused")));
        let secret = KeyIdSecret::new(b"0123456789abcdef");
        let (alice, bob) = (key("alice", "a-token", None), key("bob", "b-token", Some(5)));
        let first = Runtime::build(
            &snapshot(&[alice.clone(), bob.clone()]),
            &metrics,
            &loader,
            &secret,
            &Connector::default(),
            None,
        );
        let same = Runtime::build(
            &snapshot(&[alice.clone(), bob.clone()]),
            &metrics,
            &loader,
            &secret,
            &Connector::default(),
            Some(&first),
        );
        assert!(Arc::ptr_eq(&first.keys, &same.keys), "no key changed: the same table");

        let bob2 = key("bob", "b-token", Some(6));
        let next = Runtime::build(
            &snapshot(&[alice.clone(), bob2]),
            &metrics,
            &loader,
            &secret,
            &Connector::default(),
            Some(&same),
        );
        let digest =
            |t: &str| -> [u8; 32] { sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(t)).into() };
        let (a, b) = (digest("a-token"), digest("b-token"));
        assert!(Arc::ptr_eq(&same.keys[&a], &next.keys[&a]), "alice did not change");
        assert!(!Arc::ptr_eq(&same.keys[&b], &next.keys[&b]), "bob changed");
        assert_eq!(next.keys[&b].session.rate, Some(6));
        assert_eq!(next.keys[&b].key_id, same.keys[&b].key_id, "same key, same id");
        assert_ne!(next.keys[&a].key_id.as_deref(), Some(alice.hash.as_str()), "never the plain hash");

        let gone = Runtime::build(&snapshot(&[alice]), &metrics, &loader, &secret, &Connector::default(), Some(&next));
        assert_eq!(gone.keys.len(), 1);
        assert!(gone.session(&b).is_none());
    }

    #[test]
    fn targets_keep_base_path_without_trailing_slash() {
        let a = api("a", "/a/", &[]);
        assert_eq!(a.pick_target().base_path, "/base");
        assert_eq!(a.pick_target().authority.as_str(), "127.0.0.1:1");
    }
}
