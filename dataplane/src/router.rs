//! Step 1 of the chain: Host header, then the longest listen-path prefix, picks the API.
//!
//! A lookup costs one hash probe per distinct prefix length, however many APIs there are.
//!
//! The tables are persistent maps: the next runtime's router starts as a copy of this one
//! that costs nothing, and one API's change touches its own routes only.

use std::sync::Arc;

use crate::{model::Api, path::prefix_key};

/// Keys and values are shared pointers: a changed map copies the nodes on the way to the
/// change, and copying a node then bumps reference counts rather than allocating.
#[derive(Default, Clone)]
pub struct Router {
    by_host: imbl::HashMap<Arc<str>, Table>,
    any_host: Table,
}

#[derive(Default, Clone)]
struct Table {
    by_prefix: imbl::HashMap<Arc<str>, Arc<Api>>,
    /// Distinct prefix lengths, longest first, and how many prefixes have each.
    lengths: Arc<Vec<(usize, usize)>>,
}

impl Table {
    /// Adds `api` unless its prefix is taken; returns the API that holds it then.
    fn insert(&mut self, api: Arc<Api>) -> Result<(), Arc<Api>> {
        let key = prefix_key(&api.entry.spec.listen_path);
        if let Some(holder) = self.by_prefix.get(key) {
            return Err(holder.clone());
        }
        let lengths = Arc::make_mut(&mut self.lengths);
        match lengths.iter_mut().find(|(len, _)| *len == key.len()) {
            Some((_, n)) => *n += 1,
            None => {
                lengths.push((key.len(), 1));
                lengths.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
            }
        }
        self.by_prefix.insert(Arc::from(key), api);
        Ok(())
    }

    /// Removes `api`'s prefix if `api` is what holds it.
    fn remove(&mut self, api: &Arc<Api>) {
        let key = prefix_key(&api.entry.spec.listen_path);
        if !self.by_prefix.get(key).is_some_and(|holder| Arc::ptr_eq(holder, api)) {
            return;
        }
        self.by_prefix.remove(key);
        let lengths = Arc::make_mut(&mut self.lengths);
        if let Some(i) = lengths.iter().position(|(len, _)| *len == key.len()) {
            lengths[i].1 -= 1;
            if lengths[i].1 == 0 {
                lengths.remove(i);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    fn lookup(&self, path: &str) -> Option<(usize, &Arc<Api>)> {
        let bytes = path.as_bytes();
        self.lengths.iter().find_map(|&(len, _)| {
            let at_boundary = bytes.len() == len || bytes.get(len) == Some(&b'/');
            if !at_boundary || !path.is_char_boundary(len) {
                return None;
            }
            self.by_prefix.get(&path[..len]).map(|api| (len, api))
        })
    }
}

impl Router {
    /// Adds an API under each of its hosts (or any host); on a clash, names the API that
    /// already holds the route.
    pub fn insert(&mut self, api: &Arc<Api>) -> Result<(), Arc<Api>> {
        if api.entry.spec.hosts.is_empty() {
            return self.any_host.insert(api.clone());
        }
        let hosts: std::collections::BTreeSet<String> =
            api.entry.spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        // All or nothing: an API refused on one host must not be served on the others.
        let key = prefix_key(&api.entry.spec.listen_path);
        if let Some(holder) = hosts.iter().find_map(|h| self.by_host.get(h.as_str())?.by_prefix.get(key)) {
            return Err(holder.clone());
        }
        for h in hosts {
            self.by_host.entry(Arc::from(h)).or_default().insert(api.clone())?;
        }
        Ok(())
    }

    /// Takes out the routes `api` holds (a route another API holds stays).
    pub fn remove(&mut self, api: &Arc<Api>) {
        if api.entry.spec.hosts.is_empty() {
            return self.any_host.remove(api);
        }
        for h in &api.entry.spec.hosts {
            let h = h.to_ascii_lowercase();
            if let Some(table) = self.by_host.get_mut(h.as_str()) {
                table.remove(api);
                if table.is_empty() {
                    self.by_host.remove(h.as_str());
                }
            }
        }
    }

    /// The API for this host and path: a host-specific route wins over an any-host route
    /// with a prefix as long.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Api>> {
        let specific = match host {
            Some(h) if !self.by_host.is_empty() => self.host_table(h).and_then(|t| t.lookup(path)),
            _ => None,
        };
        let any = self.any_host.lookup(path);
        match (specific, any) {
            (Some((l1, a)), Some((l2, _))) if l1 >= l2 => Some(a),
            (Some(_), Some((_, b))) => Some(b),
            (Some((_, a)), None) => Some(a),
            (None, b) => b.map(|(_, b)| b),
        }
    }

    fn host_table(&self, host: &str) -> Option<&Table> {
        let host = strip_port(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(host.to_ascii_lowercase().as_str())
        } else {
            self.by_host.get(host)
        }
    }
}

/// The host without a `:port`; `[v6]` loses its brackets.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::api;

    fn router(apis: &[(&str, &str, &[&str])]) -> Router {
        let mut r = Router::default();
        for (name, path, hosts) in apis {
            r.insert(&api(name, path, hosts)).expect("no clash");
        }
        r
    }

    fn routed<'a>(r: &'a Router, host: Option<&str>, path: &str) -> Option<&'a str> {
        r.route(host, path).map(|a| a.entry.name.as_str())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router(&[("root", "/", &[]), ("a", "/a/", &[]), ("ab", "/a/b/", &[])]);
        assert_eq!(routed(&r, None, "/a/b/c"), Some("ab"));
        assert_eq!(routed(&r, None, "/a/bc"), Some("a"));
        assert_eq!(routed(&r, None, "/a"), Some("a"));
        assert_eq!(routed(&r, None, "/ab"), Some("root"));
        assert_eq!(routed(&r, None, "/"), Some("root"));
    }

    #[test]
    fn no_match_is_none() {
        let r = router(&[("a", "/a/", &[])]);
        assert_eq!(routed(&r, None, "/b"), None);
        assert_eq!(routed(&r, None, "/ab"), None);
    }

    #[test]
    fn host_routes_win_ties_and_ignore_case_and_port() {
        let r =
            router(&[("any", "/a/", &[]), ("host", "/a/", &["api.example.com"]), ("root", "/", &["Other.example"])]);
        assert_eq!(routed(&r, Some("API.example.com:8080"), "/a/x"), Some("host"));
        assert_eq!(routed(&r, Some("elsewhere"), "/a/x"), Some("any"));
        assert_eq!(routed(&r, Some("other.example"), "/a/x"), Some("any"), "longer any-host prefix wins");
        assert_eq!(routed(&r, Some("other.example"), "/b"), Some("root"));
    }

    #[test]
    fn clash_names_the_holder() {
        let mut r = Router::default();
        r.insert(&api("first", "/x/", &[])).expect("first");
        let holder = r.insert(&api("second", "/x", &[])).expect_err("clash");
        assert_eq!(holder.entry.name, "first");
    }

    #[test]
    fn removing_an_api_frees_its_routes_and_leaves_the_others() {
        let (root, a, ab, host) =
            (api("root", "/", &[]), api("a", "/a/", &[]), api("ab", "/a/b/", &[]), api("h", "/a/b/", &["H.example"]));
        let mut r = Router::default();
        for x in [&root, &a, &ab, &host] {
            r.insert(x).expect("no clash");
        }
        let before = r.clone();
        r.remove(&ab);
        r.remove(&host);
        assert_eq!(routed(&r, None, "/a/b/c"), Some("a"));
        assert_eq!(routed(&r, Some("h.example"), "/a/b/c"), Some("a"));
        assert!(r.by_host.is_empty(), "an empty host table goes");
        assert_eq!(*r.any_host.lengths, [(2, 1), (0, 1)], "a length no prefix has goes");
        let other = api("ab", "/a/b/", &[]);
        r.remove(&other);
        r.remove(&a);
        r.insert(&other).expect("free again");
        assert_eq!(routed(&r, None, "/a/b/c"), Some("ab"));
        assert_eq!(routed(&r, None, "/a/x"), Some("root"), "removing one API's route leaves the others");
        assert_eq!(routed(&before, Some("h.example"), "/a/b/c"), Some("h"), "the copy it came from is as it was");
    }

    #[test]
    fn a_clash_on_one_host_leaves_the_other_hosts_free() {
        let mut r = Router::default();
        r.insert(&api("first", "/x/", &["b.example"])).expect("first");
        r.insert(&api("second", "/x/", &["a.example", "B.example"])).expect_err("clash on b.example");
        assert_eq!(routed(&r, Some("a.example"), "/x/y"), None);
        r.insert(&api("dup", "/y/", &["c.example", "C.EXAMPLE"])).expect("one API, one host twice");
    }
}
