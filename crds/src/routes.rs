//! Who owns a route when several active APIs claim the same host and listen path: the
//! oldest ([`oldest_first`]). An API that loses any of its routes is not served at all and
//! claims nothing, so it blocks no one. Inactive APIs claim nothing.
//!
//! The controller (for status) and the dataplane (for serving) decide this by the same code
//! on the same entries, so they agree on every winner. Both keep a [`RouteClaims`] and update
//! it one changed API at a time: a change costs the APIs that share a route with it, however
//! many APIs there are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::snapshot::ApiEntry;
#[cfg(doc)]
use crate::snapshot::oldest_first;

/// Why an API is not served: an older API holds one of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `namespace/name` of the API that keeps the route.
    pub winner: String,
    /// The contested host (lowercase), or None for "any host".
    pub host: Option<String>,
    /// The contested listen path, as the loser declares it.
    pub listen_path: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = match &self.host {
            Some(h) => format!("host {h}"),
            None => "any host".to_owned(),
        };
        write!(f, "{} on {on} is already served by {}, which is older", self.listen_path, self.winner)
    }
}

/// What a route is owned by: the host (lowercase; None = any) and the listen path without
/// trailing slashes, the way the dataplane's router matches it (`/a/` and `/a` are one).
type Route = (Option<String>, String);

/// An API's place in line: sorts exactly as [`oldest_first`] orders entries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    unknown_age: bool,
    created: Option<jiff::Timestamp>,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Claim {
    rank: Rank,
    routes: BTreeSet<Route>,
    /// As the API declares it, for the loser's message.
    listen_path: String,
}

impl Claim {
    fn of(e: &ApiEntry) -> Self {
        let path = e.spec.listen_path.trim_end_matches('/');
        let routes = if e.spec.hosts.is_empty() {
            BTreeSet::from([(None, path.to_owned())])
        } else {
            e.spec.hosts.iter().map(|h| (Some(h.to_ascii_lowercase()), path.to_owned())).collect()
        };
        let rank = Rank {
            unknown_age: e.creation_timestamp.is_none(),
            created: e.creation_timestamp,
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        };
        Self { rank, routes, listen_path: e.spec.listen_path.clone() }
    }
}

/// Every active API's claim on its routes, and the conflicts they decide.
#[derive(Debug, Clone, Default)]
pub struct RouteClaims {
    /// Per route, the APIs claiming it (rank, id), oldest first.
    claimants: HashMap<Route, BTreeSet<(Rank, String)>>,
    claims: HashMap<String, Claim>,
    conflicts: BTreeMap<String, Conflict>,
}

impl RouteClaims {
    /// The claims of `apis`, decided in one pass.
    pub fn new<'a>(apis: impl IntoIterator<Item = &'a ApiEntry>) -> Self {
        let mut me = Self::default();
        for e in apis {
            me.claim(&e.id(), e);
        }
        let everyone: BTreeSet<(Rank, String)> = me.claims.iter().map(|(id, c)| (c.rank.clone(), id.clone())).collect();
        me.settle(&everyone);
        me
    }

    /// APIs that lose a route to an older one, by id.
    pub fn conflicts(&self) -> &BTreeMap<String, Conflict> {
        &self.conflicts
    }

    /// Takes API `id`'s new entry (None: deleted) into account. Only the APIs linked to it
    /// through shared routes, before or after the change, are decided again: nothing else
    /// can win or lose by it. Returns those APIs (besides `id`).
    pub fn update(&mut self, id: &str, entry: Option<&ApiEntry>) -> Vec<String> {
        let mut touched: Vec<Route> = Vec::new();
        if let Some(old) = self.claims.remove(id) {
            for r in old.routes {
                if let Some(set) = self.claimants.get_mut(&r) {
                    set.remove(&(old.rank.clone(), id.to_owned()));
                    if set.is_empty() {
                        self.claimants.remove(&r);
                    }
                }
                touched.push(r);
            }
        }
        self.conflicts.remove(id);
        if let Some(e) = entry {
            touched.extend(self.claim(id, e));
        }
        let linked = self.linked(touched);
        self.settle(&linked);
        linked.into_iter().map(|(_, other)| other).filter(|other| other != id).collect()
    }

    /// Records `e`'s claim if it is active; the routes it claims.
    fn claim(&mut self, id: &str, e: &ApiEntry) -> Vec<Route> {
        if !e.spec.active {
            return Vec::new();
        }
        let claim = Claim::of(e);
        for r in &claim.routes {
            self.claimants.entry(r.clone()).or_default().insert((claim.rank.clone(), id.to_owned()));
        }
        let routes = claim.routes.iter().cloned().collect();
        self.claims.insert(id.to_owned(), claim);
        routes
    }

    /// Every API reachable from `routes` through routes that two APIs share, oldest first.
    fn linked(&self, mut routes: Vec<Route>) -> BTreeSet<(Rank, String)> {
        let mut seen: HashSet<Route> = HashSet::new();
        let mut members = BTreeSet::new();
        while let Some(r) = routes.pop() {
            let Some(set) = self.claimants.get(&r) else { continue };
            if !seen.insert(r) {
                continue;
            }
            for member in set {
                if members.insert(member.clone())
                    && let Some(c) = self.claims.get(&member.1)
                {
                    routes.extend(c.routes.iter().filter(|r| !seen.contains(*r)).cloned());
                }
            }
        }
        members
    }

    /// Decides `members` (a set no other API shares a route with) oldest first: each takes
    /// its routes unless an older member took one of them.
    fn settle(&mut self, members: &BTreeSet<(Rank, String)>) {
        let Self { claims, conflicts, .. } = self;
        let mut owners: HashMap<&Route, &str> = HashMap::new();
        for (_, id) in members {
            conflicts.remove(id);
            let Some(claim) = claims.get(id) else { continue };
            match claim.routes.iter().find_map(|r| owners.get(r).map(|w| (r, *w))) {
                Some((route, winner)) => {
                    let conflict = Conflict {
                        winner: winner.to_owned(),
                        host: route.0.clone(),
                        listen_path: claim.listen_path.clone(),
                    };
                    conflicts.insert(id.clone(), conflict);
                }
                None => {
                    for r in &claim.routes {
                        owners.insert(r, id);
                    }
                }
            }
        }
    }
}

/// The conflicts among `apis`, decided from scratch.
pub fn route_conflicts<'a>(apis: impl IntoIterator<Item = &'a ApiEntry>) -> BTreeMap<String, Conflict> {
    RouteClaims::new(apis).conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{oldest_first, tests::entry};

    fn losers(entries: &[ApiEntry]) -> Vec<(String, String)> {
        route_conflicts(entries).into_iter().map(|(id, c)| (id, c.winner)).collect()
    }

    #[test]
    fn the_oldest_claimant_keeps_the_route_whatever_its_name() {
        let old = entry("zz/old", "/x/", &[], Some("2026-01-01T00:00:00Z"));
        let new = entry("aa/new", "/x", &[], Some("2026-01-02T00:00:00Z"));
        assert_eq!(losers(&[old.clone(), new.clone()]), [("aa/new".to_owned(), "zz/old".to_owned())]);
        let c = &route_conflicts([&new, &old])["aa/new"];
        assert_eq!(c.to_string(), "/x on any host is already served by zz/old, which is older");
    }

    #[test]
    fn ties_and_unknown_ages_fall_back_to_namespace_and_name() {
        let t = Some("2026-01-01T00:00:00Z");
        assert_eq!(losers(&[entry("b/a", "/x/", &[], t), entry("a/b", "/x/", &[], t)]), [("b/a".into(), "a/b".into())]);
        assert_eq!(
            losers(&[entry("b/a", "/x/", &[], None), entry("a/b", "/x/", &[], None)]),
            [("b/a".into(), "a/b".into())]
        );
        assert_eq!(
            losers(&[entry("a/a", "/x/", &[], None), entry("b/b", "/x/", &[], t)]),
            [("a/a".into(), "b/b".into())],
            "a known age beats an unknown one"
        );
    }

    #[test]
    fn hosts_clash_case_insensitively_and_a_loser_claims_nothing() {
        let t = |d: u8| Some(format!("2026-01-0{d}T00:00:00Z"));
        let a = entry("ns/a", "/x/", &["API.example.com"], t(1).as_deref());
        // Loses on api.example.com, so its other host stays free for c.
        let b = entry("ns/b", "/x/", &["other.example.com", "api.example.com"], t(2).as_deref());
        let c = entry("ns/c", "/x/", &["other.example.com"], t(3).as_deref());
        let any = entry("ns/any", "/x/", &[], t(4).as_deref());
        let conflicts = route_conflicts([&a, &b, &c, &any]);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts["ns/b"].host.as_deref(), Some("api.example.com"));
        assert_eq!(conflicts["ns/b"].winner, "ns/a");
    }

    #[test]
    fn inactive_apis_claim_nothing() {
        let mut old = entry("ns/old", "/x/", &[], Some("2026-01-01T00:00:00Z"));
        old.spec.active = false;
        let new = entry("ns/new", "/x/", &[], Some("2026-01-02T00:00:00Z"));
        assert!(route_conflicts([&old, &new]).is_empty());
    }

    /// The rule as first written: every active API, oldest first, over the whole set.
    fn decided_from_scratch(apis: &BTreeMap<String, ApiEntry>) -> BTreeMap<String, Conflict> {
        let mut claimants: Vec<&ApiEntry> = apis.values().filter(|e| e.spec.active).collect();
        claimants.sort_by(|a, b| oldest_first(a, b));
        let mut owners: BTreeMap<Route, &ApiEntry> = BTreeMap::new();
        let mut conflicts = BTreeMap::new();
        for e in claimants {
            let routes = Claim::of(e).routes;
            if let Some((r, w)) = routes.iter().find_map(|r| owners.get(r).map(|w| (r, w))) {
                let c = Conflict { winner: w.id(), host: r.0.clone(), listen_path: e.spec.listen_path.clone() };
                conflicts.insert(e.id(), c);
                continue;
            }
            for r in routes {
                owners.insert(r, e);
            }
        }
        conflicts
    }

    #[test]
    fn updates_one_api_at_a_time_decide_what_the_whole_set_decides() {
        // A small world so that routes clash often: 12 APIs over 3 paths and 3 hosts (or
        // any host), with ages that tie, are unknown, or differ, some inactive.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut world: BTreeMap<String, ApiEntry> = BTreeMap::new();
        let mut claims = RouteClaims::default();
        for step in 0..3000 {
            let id = format!("ns{}/api{}", next(2), next(6));
            if next(5) == 0 {
                world.remove(&id);
                claims.update(&id, None);
            } else {
                let path = ["/a/", "/a", "/b/", "/c"][next(4) as usize];
                let hosts: Vec<&str> =
                    ["x.test", "Y.test", "y.test", "z.test"].into_iter().filter(|_| next(3) == 0).collect();
                let age = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"];
                let created = match next(3) {
                    0 => None,
                    i => Some(age[i as usize - 1]),
                };
                let mut e = entry(&id, path, &hosts, created);
                e.spec.active = next(6) != 0;
                world.insert(id.clone(), e.clone());
                claims.update(&id, Some(&e));
            }
            assert_eq!(claims.conflicts(), &decided_from_scratch(&world), "step {step}: {id}");
        }
        assert_eq!(route_conflicts(world.values()), decided_from_scratch(&world));
    }
}
