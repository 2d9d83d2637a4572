//! Step 1 of the chain: Host header, then the longest listen-path prefix, picks the API.
//!
//! A lookup costs one hash probe per distinct prefix length, however many APIs there are.

use std::{collections::HashMap, sync::Arc};

use crate::{model::Api, path::prefix_key};

#[derive(Default)]
pub struct Router {
    by_host: HashMap<String, Table>,
    any_host: Table,
}

#[derive(Default)]
struct Table {
    by_prefix: HashMap<String, Arc<Api>>,
    /// Distinct prefix lengths, longest first.
    lengths: Vec<usize>,
}

impl Table {
    /// Adds `api` unless its prefix is taken; returns the API that holds it then.
    fn insert(&mut self, api: Arc<Api>) -> Result<(), Arc<Api>> {
        let key = prefix_key(&api.entry.spec.listen_path).to_owned();
        if let Some(holder) = self.by_prefix.get(&key) {
            return Err(holder.clone());
        }
        if !self.lengths.contains(&key.len()) {
            self.lengths.push(key.len());
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.by_prefix.insert(key, api);
        Ok(())
    }

    fn lookup(&self, path: &str) -> Option<(usize, &Arc<Api>)> {
        let bytes = path.as_bytes();
        self.lengths.iter().find_map(|&len| {
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
        if let Some(holder) = hosts.iter().find_map(|h| self.by_host.get(h)?.by_prefix.get(key)) {
            return Err(holder.clone());
        }
        for h in hosts {
            self.by_host.entry(h).or_default().insert(api.clone())?;
        }
        Ok(())
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
            self.by_host.get(&host.to_ascii_lowercase())
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
    fn a_clash_on_one_host_leaves_the_other_hosts_free() {
        let mut r = Router::default();
        r.insert(&api("first", "/x/", &["b.example"])).expect("first");
        r.insert(&api("second", "/x/", &["a.example", "B.example"])).expect_err("clash on b.example");
        assert_eq!(routed(&r, Some("a.example"), "/x/y"), None);
        r.insert(&api("dup", "/y/", &["c.example", "C.EXAMPLE"])).expect("one API, one host twice");
    }
}
