//! The current snapshot and its version, and the fan-out of deltas to every connected
//! dataplane stream.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use gatehouse_crds::{
    protocol::Delta,
    routes::{Conflict, RouteClaims},
    snapshot::Snapshot,
};
use tokio::sync::broadcast;

pub struct Hub {
    current: Mutex<Current>,
    tx: broadcast::Sender<Arc<Delta>>,
}

/// The snapshot and who owns each of its routes, changed together.
struct Current {
    snapshot: Snapshot,
    routes: RouteClaims,
}

/// Deltas a slow stream may fall behind by before it is sent the whole snapshot again.
const BACKLOG: usize = 1024;

impl Hub {
    /// Versions start from the wall clock in milliseconds, so they keep growing across
    /// controller restarts.
    pub fn new() -> Self {
        let start = jiff::Timestamp::now().as_millisecond().max(1) as u64;
        let (tx, _) = broadcast::channel(BACKLOG);
        let snapshot = Snapshot { version: start, ..Default::default() };
        Self { current: Mutex::new(Current { snapshot, routes: RouteClaims::default() }), tx }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Changed only by `publish`, which cannot panic half-way; a panic elsewhere leaves
        // it consistent.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies and broadcasts a delta; returns its version and its size as sent (bytes of
    /// JSON), or None if it changed nothing.
    pub fn publish(&self, mut delta: Delta) -> Option<(u64, usize)> {
        let mut current = self.lock();
        let Current { snapshot: snap, routes } = &mut *current;
        delta.apis.retain(|id, e| changed(e, snap.apis.get(id)));
        delta.plugins.retain(|id, e| changed(e, snap.plugins.get(id)));
        delta.keys.retain(|id, e| changed(e, snap.keys.get(id)));
        delta.certificates.retain(|id, e| changed(e, snap.certificates.get(id)));
        delta.ca_certificates.retain(|id, e| changed(e, snap.ca_certificates.get(id)));
        let nothing = [delta.apis.is_empty(), delta.plugins.is_empty(), delta.keys.is_empty()];
        if nothing.into_iter().all(|n| n) && delta.certificates.is_empty() && delta.ca_certificates.is_empty() {
            return None;
        }
        delta.base = snap.version;
        delta.version = snap.version + 1;
        // The delta was made for this very version, so it applies.
        if snap.apply(&delta).is_err() {
            return None;
        }
        for (id, e) in &delta.apis {
            routes.update(id, e.as_ref());
        }
        let size = serde_json::to_vec(&delta).map_or(0, |v| v.len());
        // No receivers is fine: nobody is connected yet.
        let _ = self.tx.send(Arc::new(delta));
        Some((snap.version, size))
    }

    /// The whole current state and a subscription to what follows it, taken together so
    /// that no delta falls in between.
    pub fn subscribe(&self) -> (Snapshot, broadcast::Receiver<Arc<Delta>>) {
        let current = self.lock();
        (current.snapshot.clone(), self.tx.subscribe())
    }

    pub fn version(&self) -> u64 {
        self.lock().snapshot.version
    }

    /// APIs in the current snapshot that lose a route to an older API, decided exactly as
    /// the dataplanes decide when they build it.
    pub fn route_conflicts(&self) -> BTreeMap<String, Conflict> {
        self.lock().routes.conflicts().clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().snapshot.clone()
    }
}

fn changed<T: PartialEq>(new: &Option<T>, old: Option<&T>) -> bool {
    new.as_ref() != old
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use gatehouse_crds::{KeySession, snapshot::KeyEntry};

    use super::*;

    fn key(hash: &str) -> Option<KeyEntry> {
        Some(KeyEntry { namespace: "ns".into(), name: "k".into(), hash: hash.into(), session: KeySession::default() })
    }

    #[test]
    fn publishing_bumps_the_version_and_skips_no_op_deltas() {
        let hub = Hub::new();
        let (start, mut rx) = hub.subscribe();
        let d = Delta { keys: BTreeMap::from([("ns/k".into(), key("a"))]), ..Default::default() };
        assert_eq!(hub.publish(d.clone()).map(|(v, _)| v), Some(start.version + 1));
        assert_eq!(hub.publish(d), None, "the same entry again changes nothing");
        let sent = rx.try_recv().expect("a delta");
        assert_eq!((sent.base, sent.version), (start.version, start.version + 1));
        let mut replay = start;
        replay.apply(&sent).expect("applies to the subscribed snapshot");
        assert_eq!(replay, hub.snapshot());
    }
}
