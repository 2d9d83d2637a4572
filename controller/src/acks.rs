//! What each dataplane said it serves, and which dataplanes are alive.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use gatehouse_crds::protocol::{Ack, HEARTBEAT};

/// A dataplane silent for this long no longer counts.
pub const FORGET_AFTER: Duration = Duration::from_secs(HEARTBEAT.as_secs() * 3);

#[derive(Default)]
pub struct Acks {
    nodes: Mutex<BTreeMap<String, (Instant, Ack)>>,
}

/// How many live dataplanes serve a resource at its current generation, and why the
/// others do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub serving: usize,
    pub live: usize,
    pub problems: Vec<String>,
}

impl Acks {
    /// Keeps a full ack as it is; merges a partial one into the node's last.
    pub fn record(&self, ack: Ack) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match nodes.get_mut(&ack.node) {
            Some((at, prev)) if ack.partial => {
                *at = Instant::now();
                prev.version = ack.version;
                prev.apis.extend(ack.apis);
                prev.plugins.extend(ack.plugins);
            }
            _ => {
                nodes.insert(ack.node.clone(), (Instant::now(), ack));
            }
        }
    }

    /// The acks of live dataplanes; forgets the others.
    pub fn live(&self) -> Vec<Ack> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.retain(|_, (at, _)| at.elapsed() < FORGET_AFTER);
        nodes.values().map(|(_, a)| a.clone()).collect()
    }
}

/// Tallies `pick(ack)` (an ack's result for one resource) over live acks.
pub fn tally<'a>(
    acks: &'a [Ack],
    generation: i64,
    pick: impl Fn(&'a Ack) -> Option<&'a gatehouse_crds::protocol::ResourceResult>,
) -> Tally {
    let mut t = Tally { serving: 0, live: acks.len(), problems: Vec::new() };
    for a in acks {
        match pick(a) {
            Some(r) if r.generation == generation && r.ok => t.serving += 1,
            Some(r) if r.generation == generation => t.problems.push(format!("{}: {}", a.node, r.message)),
            Some(r) => t.problems.push(format!("{}: at generation {}", a.node, r.generation)),
            None => t.problems.push(format!("{}: not received yet", a.node)),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use gatehouse_crds::protocol::ResourceResult;

    use super::*;

    fn ack(node: &str, generation: i64, ok: bool) -> Ack {
        let r = ResourceResult { generation, ok, message: if ok { String::new() } else { "plugin failure".into() } };
        Ack {
            node: node.into(),
            version: 1,
            partial: false,
            apis: BTreeMap::from([("ns/a".into(), r)]),
            plugins: BTreeMap::new(),
        }
    }

    #[test]
    fn partial_acks_merge_into_the_last_full_one() {
        let acks = Acks::default();
        acks.record(ack("dp-1", 1, true));
        let mut update = ack("dp-1", 2, true);
        update.partial = true;
        update.apis =
            BTreeMap::from([("ns/b".into(), ResourceResult { generation: 1, ok: true, message: String::new() })]);
        acks.record(update);
        let live = acks.live();
        assert_eq!(live[0].apis.keys().collect::<Vec<_>>(), ["ns/a", "ns/b"]);
        assert_eq!(live[0].version, 1);
    }

    #[test]
    fn tally_counts_dataplanes_at_the_generation_and_names_the_rest() {
        let acks = [ack("dp-1", 2, true), ack("dp-2", 2, false), ack("dp-3", 1, true)];
        let t = tally(&acks, 2, |a| a.apis.get("ns/a"));
        assert_eq!((t.serving, t.live), (1, 3));
        assert_eq!(t.problems, ["dp-2: plugin failure", "dp-3: at generation 1"]);
    }
}
