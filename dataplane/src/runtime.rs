//! The config a dataplane serves, compiled from a snapshot into what the request path
//! needs: a router, parsed upstreams, key lookups by hash, resolved metric handles.
//!
//! A `Runtime` never changes once built; a new config builds a new one and swaps it in,
//! and each request keeps the one it started with.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use gatehouse_crds::{
    AuthType,
    routes::RouteClaims,
    snapshot::{ApiEntry, KeyEntry, PluginEntry, Snapshot},
};
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
    apis: imbl::HashMap<Arc<str>, Arc<Api>>,
    /// Each Plugin and what loading it gave, to tell which APIs a change touches.
    plugin_state: BTreeMap<String, PluginState>,
    /// The certificates `--tls-listen` serves with this config, and when they were checked
    /// (their reports say whether each is valid then).
    pub certificates: Arc<CertTable>,
    certificates_checked: jiff::Timestamp,
    /// Who owns each route, for the next build to update rather than decide afresh. Taken
    /// by that build (so never shared by two); a build that finds it gone decides afresh.
    routes: Mutex<Option<RouteClaims>>,
}

/// A Plugin resource and what loading it gave (content hash, state): a file that now
/// fails for another reason, or loads, changes the APIs that use it.
type PluginState = (PluginEntry, Option<(Option<String>, String)>);

/// What changed between the snapshot of the runtime a build starts from and the one it
/// builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have: each entry is compared with what the previous runtime compiled.
    All,
    /// Since the snapshot of version `since`, these APIs only (changed, added or deleted);
    /// no Plugin resource, key or certificate did.
    Apis { since: u64, ids: BTreeSet<String> },
}

impl Changed {
    pub fn merge(self, other: Changed) -> Changed {
        match (self, other) {
            (Changed::Apis { since, mut ids }, Changed::Apis { ids: more, .. }) => {
                ids.extend(more);
                Changed::Apis { since, ids }
            }
            _ => Changed::All,
        }
    }

    fn api(&self, id: &str) -> bool {
        match self {
            Changed::All => true,
            Changed::Apis { ids, .. } => ids.contains(id),
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub version: u64,
    pub apis: ApiReports,
    pub plugins: Vec<PluginReport>,
    pub keys: usize,
    /// `kubernetes.io/tls` Secrets: state and names, never key material.
    pub certificates: Vec<CertificateReport>,
}

/// Each API's report by id, listed in id order. Persistent, like the router: the next
/// runtime's starts as a copy that costs nothing.
#[derive(Debug, Clone, Default)]
pub struct ApiReports(imbl::OrdMap<Arc<str>, Arc<ApiReport>>);

impl ApiReports {
    pub fn iter(&self) -> impl Iterator<Item = &ApiReport> {
        self.0.values().map(|r| &**r)
    }

    pub fn get(&self, id: &str) -> Option<&ApiReport> {
        self.0.get(id).map(|r| &**r)
    }
}

impl Serialize for ApiReports {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Whether an API's certificates or client CAs are part of the TLS table.
fn uses_tls(e: &ApiEntry) -> bool {
    e.spec.tls.is_some() || e.spec.auth.kind == AuthType::Mtls
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
    /// the router), however many APIs there are. `changed` says what differs from `prev`'s
    /// snapshot: APIs it does not name are taken over without comparing them.
    pub fn build(
        snapshot: &Snapshot,
        metrics: &Metrics,
        loader: &Loader,
        key_ids: &KeyIdSecret,
        connector: &Connector,
        prev: Option<&Runtime>,
        changed: &Changed,
    ) -> Self {
        let hook_metrics = HookMetrics { duration: &metrics.plugin_duration, failures: &metrics.plugin_failures };
        let plugins = ChainBuilder::new(snapshot, loader, hook_metrics, prev.map(|p| &p.served_plugins));
        let plugin_state: BTreeMap<String, PluginState> = snapshot
            .plugins
            .iter()
            .map(|(id, p)| {
                let report = plugins.reports.iter().find(|r| r.id == *id);
                let loaded = report.map(|r| (r.sha256.clone(), r.state.clone()));
                (id.clone(), (p.clone(), loaded))
            })
            .collect();
        // Route owners are decided before anything is compiled, by the same rule as the
        // controller's status, so that the order of the snapshot never picks one. Then the
        // APIs to decide: those `changed` names and those whose route owner moved with them,
        // in copies of `prev`'s tables; or all of them, in empty tables.
        let carried = prev.and_then(|p| p.routes.lock().unwrap_or_else(|e| e.into_inner()).take());
        // A plugin file's content can change under any build: then every API using it is
        // compiled again, by a full build.
        let (routes, mut apis, mut router, mut reports, mut decide, full) = match (prev, carried, changed) {
            (Some(p), Some(mut routes), Changed::Apis { since, ids })
                if p.version == *since && p.plugin_state == plugin_state =>
            {
                let mut decide = ids.clone();
                for id in ids {
                    decide.extend(routes.update(id, snapshot.apis.get(id)));
                }
                (routes, p.apis.clone(), p.router.clone(), p.report.apis.clone(), decide, false)
            }
            _ => {
                let all = snapshot.apis.keys().cloned().collect();
                let routes = RouteClaims::new(snapshot.apis.values());
                (routes, imbl::HashMap::new(), Router::default(), ApiReports::default(), all, true)
            }
        };
        // Certificates and client CAs depend on every API that uses them: when one of those
        // is decided again, or a certificate's validity started or ended since they were
        // checked (their reports would say otherwise now), all of them are, and their TLS is
        // built afresh.
        let now = jiff::Timestamp::now();
        let was_tls = |id: &String| prev.and_then(|p| p.apis.get(id.as_str())).is_some_and(|a| uses_tls(&a.entry));
        let tls_touched = full
            || prev.is_some_and(|p| p.certificates.validity_changed(p.certificates_checked, now))
            || decide.iter().any(|id| snapshot.apis.get(id).is_some_and(uses_tls) || was_tls(id));
        if tls_touched && !full {
            decide.extend(snapshot.apis.iter().filter(|(_, e)| uses_tls(e)).map(|(id, _)| id.clone()));
        }
        let conflicts = routes.conflicts();
        // Out first, all of them: a route the old owner held is free before its new owner
        // is decided.
        let olds: Vec<Option<Arc<Api>>> = decide
            .iter()
            .map(|id| {
                reports.0.remove(id.as_str());
                let old = apis.remove(id.as_str());
                if let Some(old) = &old {
                    router.remove(old);
                }
                old
            })
            .collect();
        for (id, old) in decide.iter().zip(olds) {
            let Some(entry) = snapshot.apis.get(id) else { continue };
            let mut state = "serving".to_owned();
            let mut disabled = Vec::new();
            if !entry.spec.active {
                state = "inactive".to_owned();
            } else if let Some(c) = conflicts.get(id) {
                state = format!("{CONFLICTED}: spec.listenPath: {c}");
            } else {
                // Decided again only because another API moved: its own inputs are as they were.
                let untouched = old.filter(|_| !full && !changed.api(id));
                let compiled = match untouched {
                    Some(api) => Ok(api),
                    None => TlsInputs::of(snapshot, entry).and_then(|tls| {
                        let same_tls = |a: &Api| a.tls.as_ref().map(|(_, i)| i) == tls.as_ref();
                        let reused = prev.and_then(|p| {
                            p.apis
                                .get(id.as_str())
                                .filter(|a| a.entry == *entry && same_tls(a) && p.same_plugins(entry, &plugin_state))
                        });
                        match reused {
                            Some(api) => Ok(api.clone()),
                            None => {
                                let (chain, notes) = middleware::chain(&plugins, entry);
                                Api::compile(entry, metrics, chain, notes, tls, connector).map(Arc::new)
                            }
                        }
                    }),
                };
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
                        apis.insert(Arc::from(id.as_str()), api);
                    }
                    Err(e) => state = e,
                }
            }
            if state != "serving" && state != "inactive" {
                tracing::warn!(api = %id, reason = %state, "API not served as declared");
            }
            let report = ApiReport {
                id: id.clone(),
                name: entry.display_name().to_owned(),
                generation: entry.generation,
                listen_path: entry.spec.listen_path.clone(),
                targets: entry.targets.clone(),
                state,
                disabled,
            };
            reports.0.insert(Arc::from(id.as_str()), Arc::new(report));
        }
        // Certificates, for the APIs that are routed: an API with a TLS problem still
        // serves plain HTTP (and its hosts keep the certificate they had, if any).
        let (certificates, certificate_reports, certificates_checked) = match prev {
            Some(p) if !tls_touched => (p.certificates.clone(), p.report.certificates.clone(), p.certificates_checked),
            _ => {
                let empty = CertTable::default();
                let served = snapshot
                    .apis
                    .iter()
                    .filter(|(id, e)| uses_tls(e) && apis.contains_key(id.as_str()))
                    .map(|(_, e)| e);
                let tls = tls::build(snapshot, served, prev.map_or(&empty, |p| &p.certificates));
                for (id, problem) in &tls.api_problems {
                    if let Some(a) = reports.0.get_mut(id.as_str()).map(Arc::make_mut)
                        && a.ok()
                    {
                        tracing::warn!(api = %a.id, reason = %problem, "API not served over TLS as declared");
                        a.state = format!("not served over TLS as declared: {problem}");
                    }
                }
                (tls.table, tls.certificates, now)
            }
        };
        let keys = match prev {
            Some(p) if !full => p.keys.clone(),
            _ => build_keys(snapshot, key_ids, prev),
        };
        let (plugin_files, plugin_retry, served_plugins) =
            (plugins.checked_files(), plugins.retry_pending(), plugins.served());
        let report = Report {
            version: snapshot.version,
            apis: reports,
            plugins: plugins.reports,
            keys: keys.len(),
            certificates: certificate_reports,
        };
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
            certificates,
            certificates_checked,
            routes: Mutex::new(Some(routes)),
        }
    }

    /// Whether every Plugin `entry` names is as it was (resource and loaded content).
    fn same_plugins(&self, entry: &ApiEntry, now: &BTreeMap<String, PluginState>) -> bool {
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
            &Changed::All,
        );
        let same = Runtime::build(
            &snapshot(&[alice.clone(), bob.clone()]),
            &metrics,
            &loader,
            &secret,
            &Connector::default(),
            Some(&first),
            &Changed::All,
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
            &Changed::All,
        );
        let digest =
            |t: &str| -> [u8; 32] { sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(t)).into() };
        let (a, b) = (digest("a-token"), digest("b-token"));
        assert!(Arc::ptr_eq(&same.keys[&a], &next.keys[&a]), "alice did not change");
        assert!(!Arc::ptr_eq(&same.keys[&b], &next.keys[&b]), "bob changed");
        assert_eq!(next.keys[&b].session.rate, Some(6));
        assert_eq!(next.keys[&b].key_id, same.keys[&b].key_id, "same key, same id");
        assert_ne!(next.keys[&a].key_id.as_deref(), Some(alice.hash.as_str()), "never the plain hash");

        let gone = Runtime::build(
            &snapshot(&[alice]),
            &metrics,
            &loader,
            &secret,
            &Connector::default(),
            Some(&next),
            &Changed::All,
        );
        assert_eq!(gone.keys.len(), 1);
        assert!(gone.session(&b).is_none());
    }

    fn entry(name: &str, path: &str, hosts: &[&str], extra: &str) -> ApiEntry {
        let yaml = format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  listenPath: {path}\n  hosts: {hosts:?}\n  upstream: {{url: 'http://127.0.0.1:1/{name}'}}\n{extra}"
        );
        let parsed = gatehouse_crds::manifest::parse("test", &yaml);
        let Some((_, gatehouse_crds::manifest::Resource::Api(a))) = parsed.resources.into_iter().next() else {
            panic!("bad test API: {:?}", parsed.rejected)
        };
        ApiEntry::compile(&a, None).expect("compiles")
    }

    #[test]
    fn a_build_from_the_changes_alone_serves_and_reports_what_a_full_build_does() {
        let (metrics, loader) = (Metrics::new(), Loader::new(std::env::temp_dir().join("gatehouse-unused")));
        let (secret, connector) = (KeyIdSecret::new(b"0123456789abcdef"), Connector::default());
        let build = |s: &Snapshot, prev: Option<&Runtime>, changed: &Changed| {
            Runtime::build(s, &metrics, &loader, &secret, &connector, prev, changed)
        };
        // Few names, paths and hosts, so that routes clash and clashes resolve often; some
        // APIs inactive, some with TLS (whose Secret is missing: a TLS problem to report).
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut snapshot = Snapshot { version: 1, ..Default::default() };
        let mut rt = build(&snapshot, None, &Changed::All);
        for step in 0..400 {
            let name = format!("api{}", next(8));
            let id = format!("ns/{name}");
            let mut changed = BTreeSet::from([id.clone()]);
            if next(4) == 0 {
                snapshot.apis.remove(&id);
            } else {
                let path = ["/a/", "/a", "/b/", "/a/b/"][next(4) as usize];
                let mut hosts: Vec<&str> = ["x.test", "Y.test"].into_iter().filter(|_| next(3) == 0).collect();
                let extra = match next(6) {
                    0 => "  active: false\n",
                    1 if !hosts.is_empty() => "  tls: {secretName: missing}\n",
                    1 => {
                        hosts.push("y.test");
                        "  tls: {secretName: missing}\n"
                    }
                    _ => "",
                };
                snapshot.apis.insert(id.clone(), entry(&name, path, &hosts, extra));
            }
            if next(5) == 0 {
                // Several APIs in one build, as a burst of deltas is applied.
                let other = format!("ns/api{}", next(8));
                snapshot.apis.remove(&other);
                changed.insert(other);
            }
            snapshot.version += 1;
            rt = build(&snapshot, Some(&rt), &Changed::Apis { since: snapshot.version - 1, ids: changed });
            let full = build(&snapshot, None, &Changed::All);
            let json = |r: &Runtime| serde_json::to_value(&r.report).expect("serialises");
            assert_eq!(json(&rt), json(&full), "step {step}");
            for e in snapshot.apis.values() {
                for host in [None, Some("x.test"), Some("y.test"), Some("other.test")] {
                    let routed =
                        |r: &Runtime| r.router.route(host, &format!("{}z", e.spec.listen_path)).map(|a| a.id.clone());
                    assert_eq!(routed(&rt), routed(&full), "step {step}: {} on {host:?}", e.spec.listen_path);
                }
            }
        }
    }

    #[test]
    fn a_plugin_file_that_changed_under_a_build_of_other_apis_recompiles_the_apis_using_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libx.so");
        let yaml = format!(
            "apiVersion: gatehouse.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: x, namespace: ns}}\nspec: {{path: {}, failurePolicy: Fail}}\n",
            lib.display()
        );
        let plugin = gatehouse_crds::manifest::parse("test", &yaml).resources;
        let (mut snapshot, errors) = Snapshot::compile(1, plugin.into_iter().map(|(_, r)| r));
        assert!(errors.is_empty(), "{errors:?}");
        let user = entry("user", "/user/", &[], "  middleware:\n    pre: [{plugin: x, symbol: Hook}]\n");
        snapshot.apis.insert(user.id(), user);
        snapshot.apis.insert("ns/other".into(), entry("other", "/other/", &[], ""));
        let (metrics, loader) = (Metrics::new(), Loader::new(dir.path().to_owned()));
        let (secret, connector) = (KeyIdSecret::new(b"0123456789abcdef"), Connector::default());
        let build = |s: &Snapshot, prev: Option<&Runtime>, changed: &Changed| {
            Runtime::build(s, &metrics, &loader, &secret, &connector, prev, changed)
        };
        let first = build(&snapshot, None, &Changed::All);
        let state = |r: &Runtime| r.report.apis.get("ns/user").map(|a| a.state.clone()).unwrap_or_default();
        assert!(state(&first).starts_with("answering 500"), "{}", state(&first));

        // The file appears (settled: written a while ago) while only another API changes.
        std::fs::write(&lib, b"not a shared library").expect("write");
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&lib).and_then(|f| f.set_modified(long_ago)).expect("mtime");
        snapshot.apis.insert("ns/other".into(), entry("other", "/other2/", &[], ""));
        snapshot.version = 2;
        let changed = Changed::Apis { since: 1, ids: BTreeSet::from(["ns/other".to_owned()]) };
        let next = build(&snapshot, Some(&first), &changed);
        let fresh = build(&snapshot, None, &Changed::All);
        assert_ne!(state(&fresh), state(&first), "the file's new content is reported");
        assert_eq!(state(&next), state(&fresh));
    }

    #[test]
    fn targets_keep_base_path_without_trailing_slash() {
        let a = api("a", "/a/", &[]);
        assert_eq!(a.pick_target().base_path, "/base");
        assert_eq!(a.pick_target().authority.as_str(), "127.0.0.1:1");
    }
}
