//! Step 6b of the chain: which `middleware.endpoints` entry a request is for. Patterns are
//! compiled when the runtime is built; matching walks the path's segments in place and
//! allocates nothing.

use gatehouse_crds::{EndpointPlugins, EndpointSegment, HttpMethod, parse_endpoint_path};
use http::Method;

use gatehouse_plugin_host::HookCall;

use crate::path::prefix_key;

/// One endpoint entry, compiled, with its bound hooks.
pub struct Endpoint {
    segments: Box<[Seg]>,
    /// One bit per [`HttpMethod`]; 0 means any method.
    methods: u16,
    pub hooks: Vec<HookCall>,
}

enum Seg {
    Literal(Box<str>),
    Param,
    Rest,
}

impl Endpoint {
    /// Compiles an entry's path and methods; the error is the reason its path is refused.
    pub fn compile(e: &EndpointPlugins) -> Result<Self, String> {
        let segments = parse_endpoint_path(&e.path)?
            .into_iter()
            .map(|s| match s {
                EndpointSegment::Literal(l) => Seg::Literal(l.into()),
                EndpointSegment::Param(_) => Seg::Param,
                EndpointSegment::Rest => Seg::Rest,
            })
            .collect();
        let methods = e.methods.iter().fold(0, |bits, m| bits | method_bit(*m));
        Ok(Self { segments, methods, hooks: Vec::new() })
    }

    fn matches(&self, method: &Method, rest: &str) -> bool {
        if self.methods != 0 && self.methods & request_method_bit(method) == 0 {
            return false;
        }
        // `rest` starts with '/', so its segments are what follows each slash.
        let mut parts = rest.strip_prefix('/').unwrap_or(rest).split('/');
        for seg in &self.segments {
            match seg {
                Seg::Rest => return true,
                Seg::Param => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Seg::Literal(l) => {
                    if parts.next() != Some(&**l) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

fn method_bit(m: HttpMethod) -> u16 {
    1 << (m as u16)
}

/// Methods outside the HTTP set no endpoint can name: they match only "any method".
fn request_method_bit(m: &Method) -> u16 {
    let named = [
        (Method::GET, HttpMethod::Get),
        (Method::HEAD, HttpMethod::Head),
        (Method::POST, HttpMethod::Post),
        (Method::PUT, HttpMethod::Put),
        (Method::PATCH, HttpMethod::Patch),
        (Method::DELETE, HttpMethod::Delete),
        (Method::OPTIONS, HttpMethod::Options),
        (Method::TRACE, HttpMethod::Trace),
        (Method::CONNECT, HttpMethod::Connect),
    ];
    named.iter().find(|(known, _)| known == m).map_or(0, |(_, h)| method_bit(*h))
}

/// The path after the listen path (`/` when nothing is left), or None when the path no
/// longer lies under it.
pub fn after_listen_path<'p>(listen_path: &str, path: &'p str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix_key(listen_path))?;
    match rest {
        "" => Some("/"),
        r if r.starts_with('/') => Some(r),
        _ => None,
    }
}

/// The first endpoint, in declared order, whose method and path match.
pub fn find<'e>(endpoints: &'e [Endpoint], listen_path: &str, method: &Method, path: &str) -> Option<&'e Endpoint> {
    let rest = after_listen_path(listen_path, path)?;
    endpoints.iter().find(|e| e.matches(method, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(path: &str, methods: &[HttpMethod]) -> Endpoint {
        let e = EndpointPlugins { path: path.to_owned(), methods: methods.to_vec(), plugins: Vec::new() };
        Endpoint::compile(&e).expect("valid pattern")
    }

    #[test]
    fn patterns_match_segments_parameters_and_the_rest() {
        let get = Method::GET;
        let users = endpoint("/users/{id}", &[]);
        assert!(users.matches(&get, "/users/42"));
        for no in ["/users", "/users/", "/users/42/", "/users/42/x", "/usersx/42", "/"] {
            assert!(!users.matches(&get, no), "{no}");
        }
        let rest = endpoint("/files/*", &[]);
        for yes in ["/files", "/files/", "/files/a", "/files/a/b/c"] {
            assert!(rest.matches(&get, yes), "{yes}");
        }
        assert!(!rest.matches(&get, "/filesx"));
        let root = endpoint("/", &[]);
        assert!(root.matches(&get, "/") && !root.matches(&get, "/a"));
        assert!(endpoint("/*", &[]).matches(&get, "/any/thing"));
        let slash = endpoint("/a/", &[]);
        assert!(slash.matches(&get, "/a/") && !slash.matches(&get, "/a"));
    }

    #[test]
    fn methods_restrict_and_unknown_methods_match_only_any() {
        let put = endpoint("/x", &[HttpMethod::Put, HttpMethod::Delete]);
        assert!(put.matches(&Method::PUT, "/x") && put.matches(&Method::DELETE, "/x"));
        assert!(!put.matches(&Method::GET, "/x"));
        let custom = Method::from_bytes(b"PURGE").expect("method");
        assert!(!put.matches(&custom, "/x"));
        assert!(endpoint("/x", &[]).matches(&custom, "/x"));
    }

    #[test]
    fn the_path_after_the_listen_path() {
        assert_eq!(after_listen_path("/api/", "/api/users/1"), Some("/users/1"));
        assert_eq!(after_listen_path("/api/", "/api"), Some("/"));
        assert_eq!(after_listen_path("/api", "/api/"), Some("/"));
        assert_eq!(after_listen_path("/", "/users"), Some("/users"));
        assert_eq!(after_listen_path("/api/", "/apix"), None);
        assert_eq!(after_listen_path("/api/", "/other"), None);
    }

    #[test]
    fn the_first_match_in_declared_order_wins() {
        let list = [endpoint("/users/me", &[]), endpoint("/users/{id}", &[]), endpoint("/*", &[])];
        let at = |p: &str| {
            let hit = find(&list, "/api/", &Method::GET, p).expect("a match");
            list.iter().position(|e| std::ptr::eq(e, hit))
        };
        assert_eq!(at("/api/users/me"), Some(0));
        assert_eq!(at("/api/users/7"), Some(1));
        assert_eq!(at("/api/other"), Some(2));
    }
}
