//! Per-endpoint plugins (`spec.middleware.endpoints`, Tyk's `extended_paths.go_plugin`):
//! hooks that run only for requests to one path pattern, and the pattern syntax, checked
//! here once for the controller, the standalone parser and the dataplane alike.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::PluginRef;

/// Hooks for the requests whose path after the listen path matches `path` (and whose method
/// is one of `methods`). They run after the key checks and before the `post` hooks; the
/// first matching endpoint, in declared order, is the one that runs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPlugins {
    /// A path pattern after the listen path, starting with `/`: `{name}` matches one
    /// segment, a trailing `/*` the rest of the path (also nothing).
    #[schemars(length(min = 1, max = 1024), transform = endpoint_path_rules)]
    pub path: String,
    /// The methods this endpoint is for; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9), extend("x-kubernetes-list-type" = "set"))]
    pub methods: Vec<HttpMethod>,
    /// Run in order, as the phase lists are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub plugins: Vec<PluginRef>,
}

/// The CEL mirror of [`parse_endpoint_path`]'s checks, so `kubectl apply` refuses what the
/// dataplane would.
fn endpoint_path_rules(schema: &mut schemars::Schema) {
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([
            {"rule": "self.startsWith('/')", "message": "an endpoint path must start with '/'"},
            {
                "rule": "self.matches('^[^*]*(/[*])?$')",
                "message": "'*' is only allowed as the whole last segment ('/*', the rest of the path)"
            },
            {
                "rule": "!self.startsWith('/') || self.matches('^(/([^/{}]*|[{][A-Za-z_][A-Za-z0-9_]*[}]))*$')",
                "message": "a parameter must be a whole segment, '{name}', its name made of letters, digits and '_'"
            },
            {
                "rule": "!self.contains('//') && !self.matches('/[.][.]?(/|$)')",
                "message": "empty, '.' and '..' segments never match a normalised request path"
            }
        ]),
    );
}

/// The methods an endpoint may name.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Trace,
    Connect,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Connect => "CONNECT",
        }
    }
}

/// One segment of an endpoint path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointSegment<'a> {
    /// Matches exactly this text (empty: the empty segment after a trailing slash).
    Literal(&'a str),
    /// `{name}`: any one non-empty segment.
    Param(&'a str),
    /// A trailing `/*`: whatever follows, also nothing.
    Rest,
}

/// Splits an endpoint path into segments, or says what is wrong with it.
pub fn parse_endpoint_path(path: &str) -> Result<Vec<EndpointSegment<'_>>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("must start with '/', got {path:?}"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    let mut out = Vec::with_capacity(parts.len());
    for (i, seg) in parts.into_iter().enumerate() {
        if seg.contains('*') {
            if seg != "*" || i != last {
                return Err(format!(
                    "'*' is only allowed as the whole last segment ('/*', the rest of the path), got {path:?}"
                ));
            }
            out.push(EndpointSegment::Rest);
        } else if seg.contains(['{', '}']) {
            let name = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')).filter(|n| is_identifier(n));
            let Some(name) = name else {
                return Err(format!(
                    "a parameter must be a whole segment, '{{name}}', its name made of letters, digits and '_', got {seg:?} in {path:?}"
                ));
            };
            out.push(EndpointSegment::Param(name));
        } else if (seg.is_empty() && i != last) || seg == "." || seg == ".." {
            return Err(format!("empty, '.' and '..' segments never match a normalised request path, got {path:?}"));
        } else {
            out.push(EndpointSegment::Literal(seg));
        }
    }
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The pattern with parameter names left out: `/users/{id}` and `/users/{uid}` match the
/// same requests, so they are the same path for the duplicate check.
fn shape(segments: &[EndpointSegment<'_>]) -> String {
    let mut s = String::new();
    for seg in segments {
        s.push('/');
        match seg {
            EndpointSegment::Literal(l) => s.push_str(l),
            EndpointSegment::Param(_) => s.push_str("{}"),
            EndpointSegment::Rest => s.push('*'),
        }
    }
    s
}

/// Every problem with `endpoints`, as (field, reason).
pub(crate) fn check_endpoints(endpoints: &[EndpointPlugins]) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    // (shape, method or None for any, index) of the endpoints before.
    let mut seen: Vec<(String, Option<HttpMethod>, usize)> = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        let field = format!("spec.middleware.endpoints[{i}]");
        let segments = match parse_endpoint_path(&e.path) {
            Ok(s) => s,
            Err(reason) => {
                errors.push((format!("{field}.path"), reason));
                continue;
            }
        };
        for (j, m) in e.methods.iter().enumerate() {
            if e.methods[..j].contains(m) {
                errors.push((format!("{field}.methods[{j}]"), format!("{} is listed twice", m.as_str())));
            }
        }
        let shape = shape(&segments);
        let methods: Vec<Option<HttpMethod>> =
            if e.methods.is_empty() { vec![None] } else { e.methods.iter().copied().map(Some).collect() };
        let clash = methods.iter().find_map(|m| {
            seen.iter()
                .find(|(s, sm, _)| *s == shape && (sm.is_none() || m.is_none() || sm == m))
                .map(|(_, sm, k)| (m.or(*sm), *k))
        });
        if let Some((method, k)) = clash {
            let method = method.map_or("any method".to_owned(), |m| format!("method {}", m.as_str()));
            errors.push((
                field,
                format!(
                    "path {:?} with {method} is already declared by spec.middleware.endpoints[{k}]; the first matching endpoint wins, so this one would never run",
                    e.path
                ),
            ));
        }
        seen.extend(methods.into_iter().map(|m| (shape.clone(), m, i)));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(path: &str, methods: &[HttpMethod]) -> EndpointPlugins {
        EndpointPlugins { path: path.to_owned(), methods: methods.to_vec(), plugins: Vec::new() }
    }

    #[test]
    fn endpoint_paths_parse_into_segments() {
        use EndpointSegment::*;
        assert_eq!(parse_endpoint_path("/"), Ok(vec![Literal("")]));
        assert_eq!(parse_endpoint_path("/users/{id}"), Ok(vec![Literal("users"), Param("id")]));
        assert_eq!(parse_endpoint_path("/users/"), Ok(vec![Literal("users"), Literal("")]));
        assert_eq!(parse_endpoint_path("/*"), Ok(vec![Rest]));
        assert_eq!(parse_endpoint_path("/a/{_x1}/*"), Ok(vec![Literal("a"), Param("_x1"), Rest]));
    }

    #[test]
    fn bad_endpoint_paths_say_why() {
        for (path, reason) in [
            ("users", "must start with '/'"),
            ("", "must start with '/'"),
            ("/a/*/b", "'*' is only allowed as the whole last segment"),
            ("/a*", "'*' is only allowed as the whole last segment"),
            ("/users/x{id}", "a parameter must be a whole segment"),
            ("/users/{id", "a parameter must be a whole segment"),
            ("/users/{1d}", "a parameter must be a whole segment"),
            ("/users/{}", "a parameter must be a whole segment"),
            ("/a//b", "empty, '.' and '..' segments"),
            ("/a/../b", "empty, '.' and '..' segments"),
            ("/.", "empty, '.' and '..' segments"),
        ] {
            let err = parse_endpoint_path(path).expect_err(path);
            assert!(err.contains(reason), "{path}: {err}");
        }
    }

    #[test]
    fn the_same_path_and_method_twice_is_refused_naming_both_entries() {
        use HttpMethod::*;
        let ok = [endpoint("/a/{id}", &[Get]), endpoint("/a/{id}", &[Put]), endpoint("/a/*", &[])];
        assert_eq!(check_endpoints(&ok), vec![]);
        let errors = check_endpoints(&[endpoint("/a/{id}", &[Get, Put]), endpoint("/a/{other}", &[Put])]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "spec.middleware.endpoints[1]");
        assert!(errors[0].1.contains("with method PUT is already declared by spec.middleware.endpoints[0]"));
        let errors = check_endpoints(&[endpoint("/a", &[]), endpoint("/a", &[Get])]);
        assert!(errors[0].1.contains("method GET"), "{errors:?}");
        let errors = check_endpoints(&[endpoint("/a", &[Get, Get])]);
        assert_eq!(
            errors,
            vec![("spec.middleware.endpoints[0].methods[1]".to_owned(), "GET is listed twice".to_owned())]
        );
        let errors = check_endpoints(&[endpoint("/ok", &[]), endpoint("nope", &[])]);
        assert_eq!(errors[0].0, "spec.middleware.endpoints[1].path");
    }
}
