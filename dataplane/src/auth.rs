//! Steps 4 and 6 of the chain: find the key the client sent, then check what it grants.

use std::sync::Arc;

use gatehouse_crds::AuthToken;
use http::{HeaderMap, request::Parts};
use sha2::{Digest, Sha256};

use crate::{
    limits::{CounterStore, Decision},
    reply::GatewayError,
    runtime::{Api, Runtime, Session},
};

/// Step 4 for `authToken`: the key from the header, else the query parameter, else the
/// cookie; looked up by its SHA-256, as keys are stored.
pub fn authenticate(rt: &Runtime, cfg: &AuthToken, req: &Parts) -> Result<Arc<Session>, GatewayError> {
    let token = find_token(cfg, req).ok_or(GatewayError::MissingKey)?;
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    rt.session(&digest).cloned().ok_or(GatewayError::UnknownKey)
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
        },
        _ => Ok(None),
    }
}

pub fn store_down(e: crate::limits::StoreError) -> GatewayError {
    tracing::error!(error = %e, "counter store failed; refusing rather than letting requests through unlimited");
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
        AuthToken { header: header.into(), query: query.into(), cookie: cookie.into() }
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
