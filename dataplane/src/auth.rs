//! Steps 4 and 6 of the chain: find the key the client sent, then check what it grants.

use std::sync::Arc;

use gatehouse_crds::AuthToken;
use http::{HeaderMap, request::Parts};
use sha2::{Digest, Sha256};

use crate::{
    limits::{CounterStore, Decision},
    model::{Api, Session},
    reply::GatewayError,
    runtime::Runtime,
};

/// Step 4 for `authToken`: the key from the header, else the query parameter, else the
/// cookie; looked up by its SHA-256, as keys are stored.
pub fn authenticate(rt: &Runtime, cfg: &AuthToken, req: &Parts) -> Result<Arc<Session>, GatewayError> {
    let token = find_token(cfg, req).ok_or(GatewayError::MissingKey)?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    rt.session(&digest).cloned().ok_or(GatewayError::UnknownKey)
}

/// Removes the credential from the request, wherever `cfg` says to look for one: the
/// header, the query parameter (other parameters kept as sent), the cookie (other cookies
/// kept). Allocates only when a credential is present in the query or a cookie.
pub fn strip_credentials(cfg: &AuthToken, req: &mut Parts) {
    if !cfg.header.is_empty() {
        req.headers.remove(cfg.header.as_str());
    }
    if !cfg.query.is_empty()
        && let Some(uri) = without_query_param(&req.uri, &cfg.query)
    {
        req.uri = uri;
    }
    if !cfg.cookie.is_empty() {
        strip_cookie(&mut req.headers, &cfg.cookie);
    }
}

/// The URI without every `name=…` (or bare `name`) pair, or None when it has none.
fn without_query_param(uri: &http::Uri, name: &str) -> Option<http::Uri> {
    let query = uri.query()?;
    let is_it = |pair: &str| pair.split_once('=').map_or(pair, |(k, _)| k) == name;
    if !query.split('&').any(is_it) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_it(p)).collect();
    let mut pq = uri.path().to_owned();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    // Built from a valid path and a subset of a valid query: it parses.
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Drops the cookie `name` from every `Cookie` header; a header left empty goes too.
fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let is_it = |c: &str| c.trim().split_once('=').is_some_and(|(k, _)| k == name);
    let has_it =
        headers.get_all(http::header::COOKIE).iter().any(|v| v.to_str().is_ok_and(|line| line.split(';').any(is_it)));
    if !has_it {
        return;
    }
    let kept: Vec<http::HeaderValue> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| match v.to_str() {
            Ok(line) if line.split(';').any(is_it) => {
                let rest: Vec<&str> = line.split(';').filter(|c| !is_it(c)).map(str::trim).collect();
                http::HeaderValue::from_str(&rest.join("; ")).ok().filter(|v| !v.is_empty())
            }
            _ => Some(v.clone()),
        })
        .collect();
    headers.remove(http::header::COOKIE);
    for v in kept {
        headers.append(http::header::COOKIE, v);
    }
}

fn find_token<'a>(cfg: &AuthToken, req: &'a Parts) -> Option<&'a str> {
    let from_header = || {
        let v = req.headers.get(cfg.header.as_str())?.to_str().ok()?.trim();
        // `Authorization: Bearer <key>` and a bare key both work.
        let v = match v.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("bearer ") => v[7..].trim_start(),
            _ => v,
        };
        (!v.is_empty()).then_some(v)
    };
    let from_query = || {
        req.uri.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == cfg.query && !v.is_empty()).then_some(v)
        })
    };
    let from_cookie = || cookie(&req.headers, &cfg.cookie);
    (!cfg.header.is_empty())
        .then(from_header)
        .flatten()
        .or_else(|| (!cfg.query.is_empty()).then(from_query).flatten())
        .or_else(|| (!cfg.cookie.is_empty()).then(from_cookie).flatten())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name && !v.is_empty()).then_some(v)
        })
    })
}

/// What the quota left, for the `X-RateLimit-*` response headers.
#[derive(Debug, Clone, Copy)]
pub struct QuotaLeft {
    pub limit: u64,
    pub remaining: u64,
}

/// Step 6: expiry, access rights, per-key rate limit, quota, in that order.
pub async fn check_key(store: &impl CounterStore, api: &Api, s: &Session) -> Result<Option<QuotaLeft>, GatewayError> {
    let k = &s.session;
    if k.expires.is_some_and(|t| t <= jiff::Timestamp::now()) {
        return Err(GatewayError::KeyExpired);
    }
    if !s.may_access(api) {
        return Err(GatewayError::AccessDenied);
    }
    if let (Some(rate), Some(per)) = (k.rate, k.per) {
        let d = store.rate(&s.rate_key, rate, per.as_std()).await.map_err(store_down)?;
        if let Decision::Denied { retry_after } = d {
            return Err(GatewayError::RateLimited { retry_after });
        }
    }
    match (u64::try_from(k.quota_max), k.quota_renewal) {
        (Ok(max), Some(renewal)) => match store.quota(&s.quota_key, max, renewal.as_std()).await.map_err(store_down)? {
            Decision::Denied { retry_after } => Err(GatewayError::QuotaExceeded { retry_after }),
            Decision::Allowed { remaining } => Ok(Some(QuotaLeft { limit: max, remaining })),
            Decision::Unchecked => Ok(None),
        },
        _ => Ok(None),
    }
}

/// The counter store failed and the policy is to refuse; `Counters` logged it.
pub fn store_down(e: crate::limits::StoreError) -> GatewayError {
    tracing::debug!(error = %e, "limit check failed");
    GatewayError::StoreUnavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn cfg(header: &str, query: &str, cookie: &str) -> AuthToken {
        AuthToken { header: header.into(), query: query.into(), cookie: cookie.into(), strip_credentials: true }
    }

    fn cookies(p: &Parts) -> Vec<&str> {
        p.headers.get_all("cookie").iter().map(|v| v.to_str().expect("ascii")).collect()
    }

    #[test]
    fn stripping_removes_only_the_credential() {
        let c = cfg("X-Api-Key", "key", "session");
        let mut p = parts(
            "/x/y?a=1&key=secret&b=2&key&c",
            &[
                ("x-api-key", "secret"),
                ("cookie", "a=1; session=secret; b=2"),
                ("cookie", "session=s2"),
                ("x-other", "v"),
            ],
        );
        strip_credentials(&c, &mut p);
        assert_eq!(p.uri.to_string(), "/x/y?a=1&b=2&c");
        assert!(p.headers.get("x-api-key").is_none());
        assert_eq!(cookies(&p), ["a=1; b=2"]);
        assert_eq!(p.headers["x-other"], "v");

        let mut only = parts("http://h:1/p?key=secret", &[("cookie", "session=x")]);
        strip_credentials(&c, &mut only);
        assert_eq!(only.uri.to_string(), "http://h:1/p");
        assert!(cookies(&only).is_empty());

        // Names are matched whole: `keyring` and `sessions` are not the credential.
        let mut near = parts("/p?keyring=1", &[("cookie", "sessions=1")]);
        strip_credentials(&c, &mut near);
        assert_eq!(near.uri.to_string(), "/p?keyring=1");
        assert_eq!(cookies(&near), ["sessions=1"]);
    }

    #[test]
    fn header_then_query_then_cookie() {
        let c = cfg("Authorization", "key", "session");
        let all = parts("/x?a=1&key=q", &[("authorization", "h"), ("cookie", "session=c")]);
        assert_eq!(find_token(&c, &all), Some("h"));
        let no_header = parts("/x?a=1&key=q", &[("cookie", "x=y; session=c")]);
        assert_eq!(find_token(&c, &no_header), Some("q"));
        let cookie_only = parts("/x", &[("cookie", "x=y; session=c")]);
        assert_eq!(find_token(&c, &cookie_only), Some("c"));
        assert_eq!(find_token(&c, &parts("/x", &[])), None);
    }

    #[test]
    fn bearer_prefix_is_optional_and_empty_names_are_not_looked_at() {
        let c = cfg("Authorization", "", "");
        assert_eq!(find_token(&c, &parts("/", &[("authorization", "Bearer  tok")])), Some("tok"));
        assert_eq!(find_token(&c, &parts("/", &[("authorization", "tok")])), Some("tok"));
        assert_eq!(find_token(&c, &parts("/?=x", &[])), None);
    }
}
