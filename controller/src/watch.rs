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
use gatehouse_crds::{ApiDefinition, KEY_LABEL, Plugin, TLS_SECRET_TYPE, protocol::Delta, routes::Conflict};
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
    compile::{KeyObject, Outcome, Resources, SecretObject, id_of, secrets_of},
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
    /// `kubernetes.io/tls` Secrets, watched only when the stream is secured.
    Certificate,
    /// Opaque Secrets, for those with a `ca.crt`; likewise.
    CaBundle,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Api => "ApiDefinition",
            Kind::Plugin => "Plugin",
            Kind::Key => "Secret",
            Kind::Service => "Service",
            Kind::Slice => "EndpointSlice",
            Kind::Certificate | Kind::CaBundle => "Secret",
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
    /// Certificates an API needs that cannot be used, and why (the last good version keeps
    /// serving).
    pub secret_errors: BTreeMap<String, String>,
    /// ApiDefinitions not served because an older one holds their route.
    pub conflicts: BTreeMap<String, Conflict>,
    /// Kinds whose initial list is complete.
    pub synced: BTreeSet<Kind>,
    /// Kinds watched: the controller is ready when all of them are synced.
    pub watched: usize,
}

pub type State = Arc<Mutex<Shared>>;

pub fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

// One per watch event, moved once into the compiler: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Change {
    Api(watcher::Event<ApiDefinition>),
    Plugin(watcher::Event<Plugin>),
    Key(watcher::Event<KeyObject>),
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    Certificate(watcher::Event<SecretObject>),
    CaBundle(watcher::Event<SecretObject>),
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

/// One watcher's events, tagged with the namespace it watches ("" for all).
fn stream<K, F>(
    a: Api<K>,
    scope: &str,
    cfg: watcher::Config,
    wrap: F,
) -> BoxStream<'static, Result<(Arc<str>, Change), watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    F: Fn(watcher::Event<K>) -> Change + Send + 'static,
{
    let scope: Arc<str> = Arc::from(scope);
    watcher(a, cfg).default_backoff().map(move |e| e.map(|e| (scope.clone(), wrap(e)))).boxed()
}

/// Runs until the process ends; watch errors are retried with backoff. `namespaces` empty:
/// every namespace.
pub async fn run(client: Client, namespaces: Vec<String>, state: State, hub: Arc<Hub>, metrics: Arc<Metrics>) {
    let secured = lock(&state).resources.secret_scope.is_some();
    let scopes: Vec<Option<&str>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.iter().map(|n| Some(n.as_str())).collect() };
    let default = watcher::Config::default;
    let mut streams = Vec::new();
    for ns in &scopes {
        let (ns, scope) = (*ns, ns.unwrap_or(""));
        streams.extend([
            stream(api::<ApiDefinition>(&client, ns), scope, default(), Change::Api),
            stream(api::<Plugin>(&client, ns), scope, default(), Change::Plugin),
            // Each key Secret is compiled and dropped as it arrives: only its hash and session
            // are kept (see `KeyObject`), never the raw key.
            stream(api::<Secret>(&client, ns), scope, default().labels(&format!("{KEY_LABEL}=true")), |e| {
                Change::Key(map_event(e, KeyObject::from_secret))
            }),
            stream(api::<Service>(&client, ns), scope, default(), Change::Service),
            stream(api::<EndpointSlice>(&client, ns), scope, default(), Change::Slice),
        ]);
        if secured {
            // Like keys, each Secret is cut down as it arrives: Opaque ones to their ca.crt,
            // so other applications' secrets never stay in memory.
            let tls = default().fields(&format!("type={TLS_SECRET_TYPE}"));
            streams.push(stream(api::<Secret>(&client, ns), scope, tls, |e| {
                Change::Certificate(map_event(e, SecretObject::from_secret))
            }));
            streams.push(stream(api::<Secret>(&client, ns), scope, default().fields("type=Opaque"), |e| {
                Change::CaBundle(map_event(e, SecretObject::from_secret))
            }));
        }
    }
    // Every namespace has the same watches, one per kind.
    lock(&state).watched = streams.len() / scopes.len().max(1);
    let mut changes = futures::stream::select_all(streams);
    let scopes = scopes.len();
    let mut compiler = Compiler { state, hub, metrics, listing: Listing::new(), listed: BTreeMap::new(), scopes };
    while let Some(change) = changes.next().await {
        match change {
            Ok((scope, c)) => compiler.handle(&scope, c),
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
    /// Per kind, the namespaces whose initial list is complete; a kind is synced when all are.
    listed: BTreeMap<Kind, BTreeSet<Arc<str>>>,
    /// How many namespaces are watched (1 for all of them).
    scopes: usize,
}

/// Resources whose entries must be compiled again.
#[derive(Default)]
struct Affected {
    apis: BTreeSet<String>,
    plugins: BTreeSet<String>,
    keys: BTreeSet<String>,
    /// Services (`namespace/name`) whose APIs must be compiled again.
    services: BTreeSet<String>,
    /// Secrets whose certificate or CA entries must be compiled again.
    secrets: BTreeSet<String>,
}

/// Keyed by kind and watched namespace ("" for all).
type Listing = BTreeMap<(Kind, Arc<str>), (BTreeSet<String>, Affected)>;

impl Compiler {
    fn handle(&mut self, scope: &Arc<str>, change: Change) {
        let started = Instant::now();
        let (kind, affected) = {
            let mut shared = lock(&self.state);
            let Shared { resources: r, synced, .. } = &mut *shared;
            let mut w =
                Watched { listing: &mut self.listing, listed: &mut self.listed, scopes: self.scopes, synced, scope };
            match change {
                Change::Api(e) => (
                    Kind::Api,
                    w.event(Kind::Api, e, &mut r.apis, |a, id| {
                        let mut affected = Affected::api(id);
                        affected.secrets.extend(a.map(secrets_of).unwrap_or_default());
                        affected
                    }),
                ),
                Change::Certificate(e) => {
                    (Kind::Certificate, w.event(Kind::Certificate, e, &mut r.secrets, |_, id| Affected::secret(id)))
                }
                Change::CaBundle(e) => {
                    (Kind::CaBundle, w.event(Kind::CaBundle, e, &mut r.ca_bundles, |_, id| Affected::secret(id)))
                }
                Change::Plugin(e) => {
                    (Kind::Plugin, w.event(Kind::Plugin, e, &mut r.plugins, |_, id| Affected::plugin(id)))
                }
                Change::Key(e) => (Kind::Key, w.event(Kind::Key, e, &mut r.keys, |_, id| Affected::key(id))),
                Change::Service(e) => {
                    (Kind::Service, w.event(Kind::Service, e, &mut r.services, |_, id| Affected::service(id)))
                }
                Change::Slice(e) => (
                    Kind::Slice,
                    w.event(Kind::Slice, e, &mut r.slices, |s: Option<&EndpointSlice>, _| {
                        s.and_then(Resources::service_of_slice).map(|id| Affected::service(&id)).unwrap_or_default()
                    }),
                ),
            }
        };
        let Some(affected) = affected else { return };
        let delta = self.compile(affected);
        let routes_may_move = !delta.apis.is_empty();
        self.metrics.changes.with_label_values(&[kind.as_str()]).inc();
        if let Some((v, bytes)) = self.hub.publish(delta) {
            if routes_may_move {
                // Any API's change can win or lose another's route, so decide afresh.
                let conflicts = self.hub.route_conflicts();
                lock(&self.state).conflicts = conflicts;
            }
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
        for id in &a.secrets {
            let entries = shared.resources.compile_secret(id);
            match entries.certificate {
                Ok(c) => {
                    shared.secret_errors.remove(id);
                    delta.certificates.insert(id.clone(), c);
                }
                Err(e) => {
                    tracing::warn!(secret = %id, error = %e, "certificate not usable; its last good version keeps serving");
                    shared.secret_errors.insert(id.clone(), e.to_string());
                }
            }
            delta.ca_certificates.insert(id.clone(), entries.ca);
        }
        delta
    }
}

/// What one watch event updates besides the store of its kind.
struct Watched<'a> {
    listing: &'a mut Listing,
    listed: &'a mut BTreeMap<Kind, BTreeSet<Arc<str>>>,
    scopes: usize,
    synced: &'a mut BTreeSet<Kind>,
    /// The namespace the event's watcher watches ("" for all).
    scope: &'a Arc<str>,
}

impl Watched<'_> {
    /// Updates the store from one watch event and says what to recompile, or None while an
    /// initial list is still coming in (it is compiled in one go when it ends).
    fn event<K: Resource + Clone>(
        &mut self,
        kind: Kind,
        e: watcher::Event<K>,
        store: &mut BTreeMap<String, K>,
        affects: impl Fn(Option<&K>, &str) -> Affected,
    ) -> Option<Affected> {
        let listing_key = (kind, self.scope.clone());
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
                self.listing.insert(listing_key, Default::default());
                None
            }
            watcher::Event::InitApply(o) => {
                let id = id_of(&o);
                // A re-list after a lost watch: what the stored version named may be gone.
                let mut a = affects(store.get(&id), &id);
                a.extend(affects(Some(&o), &id));
                if let Some((seen, pending)) = self.listing.get_mut(&listing_key) {
                    seen.insert(id.clone());
                    pending.extend(a);
                }
                store.insert(id, o);
                None
            }
            watcher::Event::InitDone => {
                let (seen, mut pending) = self.listing.remove(&listing_key).unwrap_or_default();
                // Whatever this watcher's namespace no longer lists is gone.
                let prefix = format!("{}/", self.scope);
                let gone: Vec<String> = store
                    .keys()
                    .filter(|id| !seen.contains(*id) && (self.scope.is_empty() || id.starts_with(&prefix)))
                    .cloned()
                    .collect();
                for id in gone {
                    if let Some(old) = store.remove(&id) {
                        pending.extend(affects(Some(&old), &id));
                    }
                }
                let listed = self.listed.entry(kind).or_default();
                listed.insert(self.scope.clone());
                if listed.len() == self.scopes {
                    self.synced.insert(kind);
                }
                tracing::info!(kind = kind.as_str(), namespace = %self.scope, objects = seen.len(), "initial list complete");
                Some(pending)
            }
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
    fn secret(id: &str) -> Self {
        Self { secrets: BTreeSet::from([id.to_owned()]), ..Default::default() }
    }
    fn extend(&mut self, other: Affected) {
        self.secrets.extend(other.secrets);
        self.apis.extend(other.apis);
        self.plugins.extend(other.plugins);
        self.keys.extend(other.keys);
        self.services.extend(other.services);
    }
}
