//! Watches the five kinds the config is made of and turns every change into a delta for
//! the resources it affects: an ApiDefinition itself; a Plugin and the APIs naming it; a
//! Service or EndpointSlice and the APIs using it as upstream; a key Secret.
//!
//! Watchers rather than `Controller::reconcile`: a snapshot needs deletions as events, and
//! status is written separately, by the leader only (see `status`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::{StreamExt, stream::BoxStream};
use gatehouse_crds::{ApiDefinition, KEY_LABEL, Plugin, protocol::Delta};
use k8s_openapi::api::{
    core::v1::{Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;

use crate::{
    compile::{KeyObject, Outcome, Resources, id_of},
    hub::Hub,
    metrics::Metrics,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Api,
    Plugin,
    Key,
    Service,
    Slice,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Api => "ApiDefinition",
            Kind::Plugin => "Plugin",
            Kind::Key => "Secret",
            Kind::Service => "Service",
            Kind::Slice => "EndpointSlice",
        }
    }
}

/// What the controller knows, shared with the status writer.
#[derive(Default)]
pub struct Shared {
    pub resources: Resources,
    /// Compile outcomes of ApiDefinitions and Plugins, by id.
    pub api_outcomes: BTreeMap<String, Outcome>,
    pub plugin_outcomes: BTreeMap<String, Outcome>,
    /// Key Secrets that cannot be used, and why (the last good version keeps serving).
    pub key_errors: BTreeMap<String, String>,
    /// Kinds whose initial list is complete.
    pub synced: BTreeSet<Kind>,
}

pub type State = Arc<Mutex<Shared>>;

pub fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

enum Change {
    Api(watcher::Event<ApiDefinition>),
    Plugin(watcher::Event<Plugin>),
    Key(watcher::Event<KeyObject>),
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn stream<K, F>(a: Api<K>, cfg: watcher::Config, wrap: F) -> BoxStream<'static, Result<Change, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    F: Fn(watcher::Event<K>) -> Change + Send + 'static,
{
    watcher(a, cfg).default_backoff().map(move |e| e.map(&wrap)).boxed()
}

/// Runs until the process ends; watch errors are retried with backoff.
pub async fn run(client: Client, namespace: Option<String>, state: State, hub: Arc<Hub>, metrics: Arc<Metrics>) {
    let ns = namespace.as_deref();
    let default = watcher::Config::default;
    let mut changes = futures::stream::select_all([
        stream(api::<ApiDefinition>(&client, ns), default(), Change::Api),
        stream(api::<Plugin>(&client, ns), default(), Change::Plugin),
        // Each key Secret is compiled and dropped as it arrives: only its hash and session
        // are kept (see `KeyObject`), never the raw key.
        stream(api::<Secret>(&client, ns), default().labels(&format!("{KEY_LABEL}=true")), |e| {
            Change::Key(map_event(e, KeyObject::from_secret))
        }),
        stream(api::<Service>(&client, ns), default(), Change::Service),
        stream(api::<EndpointSlice>(&client, ns), default(), Change::Slice),
    ]);
    let mut compiler = Compiler { state, hub, metrics, listing: Listing::new() };
    while let Some(change) = changes.next().await {
        match change {
            Ok(c) => compiler.handle(c),
            Err(e) => {
                compiler.metrics.watch_errors.inc();
                tracing::warn!(error = %e, "watch failed; retrying");
            }
        }
    }
}

/// The same event about a smaller object.
fn map_event<A, B>(e: watcher::Event<A>, f: impl Fn(&A) -> B) -> watcher::Event<B> {
    match e {
        watcher::Event::Apply(o) => watcher::Event::Apply(f(&o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(f(&o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(f(&o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

struct Compiler {
    state: State,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Kinds in their initial list: the ids seen so far, and what to compile at the end.
    listing: Listing,
}

/// Resources whose entries must be compiled again.
#[derive(Default)]
struct Affected {
    apis: BTreeSet<String>,
    plugins: BTreeSet<String>,
    keys: BTreeSet<String>,
    /// Services (`namespace/name`) whose APIs must be compiled again.
    services: BTreeSet<String>,
}

type Listing = BTreeMap<Kind, (BTreeSet<String>, Affected)>;

impl Compiler {
    fn handle(&mut self, change: Change) {
        let started = Instant::now();
        let (kind, affected) = {
            let mut shared = lock(&self.state);
            let Shared { resources: r, synced, .. } = &mut *shared;
            let l = &mut self.listing;
            match change {
                Change::Api(e) => (Kind::Api, event(l, synced, Kind::Api, e, &mut r.apis, |_, id| Affected::api(id))),
                Change::Plugin(e) => {
                    (Kind::Plugin, event(l, synced, Kind::Plugin, e, &mut r.plugins, |_, id| Affected::plugin(id)))
                }
                Change::Key(e) => (Kind::Key, event(l, synced, Kind::Key, e, &mut r.keys, |_, id| Affected::key(id))),
                Change::Service(e) => {
                    (Kind::Service, event(l, synced, Kind::Service, e, &mut r.services, |_, id| Affected::service(id)))
                }
                Change::Slice(e) => (
                    Kind::Slice,
                    event(l, synced, Kind::Slice, e, &mut r.slices, |s: Option<&EndpointSlice>, _| {
                        s.and_then(Resources::service_of_slice).map(|id| Affected::service(&id)).unwrap_or_default()
                    }),
                ),
            }
        };
        let Some(affected) = affected else { return };
        let delta = self.compile(affected);
        self.metrics.changes.with_label_values(&[kind.as_str()]).inc();
        if let Some((v, bytes)) = self.hub.publish(delta) {
            self.metrics.config_version.set(i64::try_from(v).unwrap_or(i64::MAX));
            self.metrics.delta_bytes.observe(bytes as f64);
            self.metrics.push_seconds.observe(started.elapsed().as_secs_f64());
            tracing::debug!(version = v, kind = kind.as_str(), "config version published");
        }
    }

    fn compile(&self, a: Affected) -> Delta {
        let mut shared = lock(&self.state);
        let mut delta = Delta::default();
        let mut apis = a.apis;
        for id in &a.plugins {
            apis.extend(shared.resources.apis_using_plugin(id));
        }
        for id in &a.services {
            apis.extend(shared.resources.apis_using_service(id));
        }
        for id in &a.plugins {
            match shared.resources.compile_plugin(id) {
                None => {
                    shared.plugin_outcomes.remove(id);
                    delta.plugins.insert(id.clone(), None);
                }
                Some((entry, outcome)) => {
                    if let Some(e) = entry {
                        delta.plugins.insert(id.clone(), Some(e));
                    }
                    shared.plugin_outcomes.insert(id.clone(), outcome);
                }
            }
        }
        for id in &apis {
            match shared.resources.compile_api(id) {
                None => {
                    shared.api_outcomes.remove(id);
                    delta.apis.insert(id.clone(), None);
                }
                Some((entry, outcome)) => {
                    if let Err(reason) = &outcome.accepted {
                        tracing::warn!(api = %id, %reason, "ApiDefinition not accepted; its last good version keeps serving");
                    }
                    // Invalid: keep serving the last good version, if any.
                    if let Some(e) = entry {
                        delta.apis.insert(id.clone(), Some(e));
                    }
                    shared.api_outcomes.insert(id.clone(), outcome);
                }
            }
        }
        for id in &a.keys {
            match shared.resources.compile_key(id) {
                None => {
                    shared.key_errors.remove(id);
                    delta.keys.insert(id.clone(), None);
                }
                Some(Ok(k)) => {
                    shared.key_errors.remove(id);
                    delta.keys.insert(id.clone(), Some(k));
                }
                Some(Err(e)) => {
                    tracing::warn!(key = %id, error = %e, "key Secret not usable; its last good version keeps serving");
                    shared.key_errors.insert(id.clone(), e.to_string());
                }
            }
        }
        delta
    }
}

/// Updates the store from one watch event and says what to recompile, or None while an
/// initial list is still coming in (it is compiled in one go when it ends).
fn event<K: Resource + Clone>(
    listing: &mut Listing,
    synced: &mut BTreeSet<Kind>,
    kind: Kind,
    e: watcher::Event<K>,
    store: &mut BTreeMap<String, K>,
    affects: impl Fn(Option<&K>, &str) -> Affected,
) -> Option<Affected> {
    match e {
        watcher::Event::Apply(o) => {
            let id = id_of(&o);
            let mut a = affects(store.get(&id), &id);
            a.extend(affects(Some(&o), &id));
            store.insert(id, o);
            Some(a)
        }
        watcher::Event::Delete(o) => {
            let id = id_of(&o);
            let mut a = affects(Some(&o), &id);
            if let Some(old) = store.remove(&id) {
                a.extend(affects(Some(&old), &id));
            }
            Some(a)
        }
        watcher::Event::Init => {
            listing.insert(kind, Default::default());
            None
        }
        watcher::Event::InitApply(o) => {
            let id = id_of(&o);
            let a = affects(Some(&o), &id);
            if let Some((seen, pending)) = listing.get_mut(&kind) {
                seen.insert(id.clone());
                pending.extend(a);
            }
            store.insert(id, o);
            None
        }
        watcher::Event::InitDone => {
            let (seen, mut pending) = listing.remove(&kind).unwrap_or_default();
            // Whatever was not listed again is gone.
            let gone: Vec<String> = store.keys().filter(|id| !seen.contains(*id)).cloned().collect();
            for id in gone {
                if let Some(old) = store.remove(&id) {
                    pending.extend(affects(Some(&old), &id));
                }
            }
            synced.insert(kind);
            tracing::info!(kind = kind.as_str(), objects = seen.len(), "initial list complete");
            Some(pending)
        }
    }
}

impl Affected {
    fn api(id: &str) -> Self {
        Self { apis: BTreeSet::from([id.to_owned()]), ..Default::default() }
    }
    fn plugin(id: &str) -> Self {
        Self { plugins: BTreeSet::from([id.to_owned()]), ..Default::default() }
    }
    fn key(id: &str) -> Self {
        Self { keys: BTreeSet::from([id.to_owned()]), ..Default::default() }
    }
    fn service(id: &str) -> Self {
        Self { services: BTreeSet::from([id.to_owned()]), ..Default::default() }
    }
    fn extend(&mut self, other: Affected) {
        self.apis.extend(other.apis);
        self.plugins.extend(other.plugins);
        self.keys.extend(other.keys);
        self.services.extend(other.services);
    }
}
