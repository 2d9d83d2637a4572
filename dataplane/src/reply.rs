//! Answers the gateway gives itself: a status and a JSON `{"error": "..."}` body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::{body::ProxyBody, path::PathError};

/// Every way the gateway ends a request itself. Each maps to one status, one message and
/// one metric label, so a rejection is visible in /metrics and analytics alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no API matches this request")]
    NoRoute,
    #[error("authorization field missing")]
    MissingKey,
    #[error("key not authorised")]
    UnknownKey,
    #[error("access to this API has been disallowed")]
    AccessDenied,
    #[error("key has expired, please renew")]
    KeyExpired,
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("API rate limit exceeded")]
    ApiRateLimited { retry_after: Duration },
    #[error("quota exceeded")]
    QuotaExceeded { retry_after: Duration },
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("plugin failure")]
    PluginFailure,
    /// A hook failed with its own status (`Flow::error_status`, `set_error_status`).
    #[error("{}", refused_text(*.0))]
    PluginRefused(StatusCode),
    #[error("counter store unavailable")]
    StoreUnavailable,
    #[error("body too large for the plugins that read it")]
    BodyTooLarge,
    #[error("could not read the request body")]
    BadBody,
    #[error("bad request path: {0}")]
    BadPath(PathError),
    #[error("upstream connect timed out")]
    UpstreamConnectTimeout,
    #[error("upstream connection limit reached")]
    UpstreamBusy,
    #[error("gateway busy: too many request bodies held for plugins")]
    BodyBudgetExhausted,
    /// The upstream's certificate was refused, or it refused the gateway's (the log says
    /// which, in rustls's words).
    #[error("upstream TLS handshake failed")]
    UpstreamTls,
    /// An `mtls` API and no client certificate: plain HTTP, or none presented.
    #[error("client certificate required")]
    ClientCertRequired,
    /// A client certificate that does not chain to the API's CA (or the API has none yet).
    #[error("client certificate not trusted for this API")]
    ClientCertUntrusted,
    /// A TLS connection on which no client certificate was asked for (its SNI named another
    /// host) carried a request for an `mtls` API: the client should connect again.
    #[error("misdirected request: connect with this API's host as the TLS server name")]
    Misdirected,
}

fn refused_text(status: StatusCode) -> &'static str {
    if status.is_client_error() { "refused by plugin" } else { "plugin failure" }
}

impl From<gatehouse_plugin_host::HookFailure> for GatewayError {
    fn from(f: gatehouse_plugin_host::HookFailure) -> Self {
        use gatehouse_plugin_host::HookFailure;
        match f {
            HookFailure::Failed => GatewayError::PluginFailure,
            HookFailure::Refused(status) => GatewayError::PluginRefused(status),
        }
    }
}

impl GatewayError {
    pub fn status(self) -> StatusCode {
        use GatewayError::*;
        match self {
            NoRoute => StatusCode::NOT_FOUND,
            MissingKey | UnknownKey | ClientCertRequired => StatusCode::UNAUTHORIZED,
            AccessDenied | KeyExpired | ClientCertUntrusted => StatusCode::FORBIDDEN,
            Misdirected => StatusCode::MISDIRECTED_REQUEST,
            RateLimited { .. } | ApiRateLimited { .. } | QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamUnreachable | UpstreamTls => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            PluginFailure => StatusCode::INTERNAL_SERVER_ERROR,
            PluginRefused(status) => status,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BadBody | BadPath(_) => StatusCode::BAD_REQUEST,
            UpstreamConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            // The counter store is down and the policy is to refuse: the request may work
            // once it is back.
            UpstreamBusy | BodyBudgetExhausted | StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `reason` label of `gatehouse_rejections_total`.
    pub fn reason(self) -> &'static str {
        use GatewayError::*;
        match self {
            NoRoute => "no_route",
            MissingKey => "auth_missing",
            UnknownKey => "auth_unknown",
            AccessDenied => "access_denied",
            KeyExpired => "key_expired",
            RateLimited { .. } => "rate_limit",
            ApiRateLimited { .. } => "api_rate_limit",
            QuotaExceeded { .. } => "quota",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamTimeout => "upstream_timeout",
            PluginFailure => "plugin_failure",
            PluginRefused(_) => "plugin_refused",
            StoreUnavailable => "store_unavailable",
            BodyTooLarge => "body_too_large",
            BadBody => "bad_body",
            BadPath(_) => "bad_path",
            UpstreamConnectTimeout => "upstream_connect_timeout",
            UpstreamBusy => "upstream_busy",
            BodyBudgetExhausted => "body_budget",
            UpstreamTls => "upstream_tls",
            ClientCertRequired => "client_cert_missing",
            ClientCertUntrusted => "client_cert_untrusted",
            Misdirected => "misdirected",
        }
    }

    fn body(self) -> &'static str {
        use GatewayError::*;
        match self {
            NoRoute => r#"{"error":"no API matches this request"}"#,
            MissingKey => r#"{"error":"authorization field missing"}"#,
            UnknownKey => r#"{"error":"key not authorised"}"#,
            AccessDenied => r#"{"error":"access to this API has been disallowed"}"#,
            KeyExpired => r#"{"error":"key has expired, please renew"}"#,
            RateLimited { .. } => r#"{"error":"rate limit exceeded"}"#,
            ApiRateLimited { .. } => r#"{"error":"API rate limit exceeded"}"#,
            QuotaExceeded { .. } => r#"{"error":"quota exceeded"}"#,
            UpstreamUnreachable => r#"{"error":"upstream unreachable"}"#,
            UpstreamTimeout => r#"{"error":"upstream timed out"}"#,
            PluginFailure => r#"{"error":"plugin failure"}"#,
            // The hook's message may hold internals: it goes to the log, not the client.
            PluginRefused(s) if s.is_client_error() => r#"{"error":"refused by plugin"}"#,
            PluginRefused(_) => r#"{"error":"plugin failure"}"#,
            StoreUnavailable => r#"{"error":"counter store unavailable"}"#,
            BodyTooLarge => r#"{"error":"body too large for the plugins that read it"}"#,
            BadBody => r#"{"error":"could not read the request body"}"#,
            BadPath(e) => e.json(),
            UpstreamConnectTimeout => r#"{"error":"upstream connect timed out"}"#,
            UpstreamBusy => r#"{"error":"upstream connection limit reached"}"#,
            BodyBudgetExhausted => r#"{"error":"gateway busy: too many request bodies held for plugins"}"#,
            UpstreamTls => r#"{"error":"upstream TLS handshake failed"}"#,
            ClientCertRequired => r#"{"error":"client certificate required"}"#,
            ClientCertUntrusted => r#"{"error":"client certificate not trusted for this API"}"#,
            Misdirected => r#"{"error":"misdirected request: connect with this API's host as the TLS server name"}"#,
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = json(self.status(), Bytes::from_static(self.body().as_bytes()));
        if let GatewayError::RateLimited { retry_after }
        | GatewayError::ApiRateLimited { retry_after }
        | GatewayError::QuotaExceeded { retry_after } = self
        {
            // Whole seconds, rounded up, as RFC 9110 wants.
            let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl GatewayError {
    /// The gRPC status a gRPC client gets instead (`grpc-status`), after the gRPC spec's
    /// HTTP-to-gRPC mapping where the error is an HTTP status, and by meaning elsewhere.
    pub fn grpc_code(self) -> u8 {
        use GatewayError::*;
        const INVALID_ARGUMENT: u8 = 3;
        const DEADLINE_EXCEEDED: u8 = 4;
        const PERMISSION_DENIED: u8 = 7;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const UNIMPLEMENTED: u8 = 12;
        const INTERNAL: u8 = 13;
        const UNAVAILABLE: u8 = 14;
        const UNAUTHENTICATED: u8 = 16;
        match self {
            NoRoute => UNIMPLEMENTED,
            MissingKey | UnknownKey | ClientCertRequired => UNAUTHENTICATED,
            AccessDenied | KeyExpired | ClientCertUntrusted => PERMISSION_DENIED,
            Misdirected => UNAVAILABLE,
            RateLimited { .. } | ApiRateLimited { .. } | QuotaExceeded { .. } | BodyTooLarge => RESOURCE_EXHAUSTED,
            UpstreamUnreachable | UpstreamTls | UpstreamBusy | StoreUnavailable | BodyBudgetExhausted => UNAVAILABLE,
            UpstreamTimeout | UpstreamConnectTimeout => DEADLINE_EXCEEDED,
            PluginFailure => INTERNAL,
            BadBody | BadPath(_) => INVALID_ARGUMENT,
            PluginRefused(s) => match s.as_u16() {
                401 => UNAUTHENTICATED,
                403 => PERMISSION_DENIED,
                404 => UNIMPLEMENTED,
                429 | 502 | 503 | 504 => UNAVAILABLE,
                400 => INTERNAL,
                _ => 2, // UNKNOWN
            },
        }
    }

    /// A trailers-only gRPC answer: HTTP 200, `grpc-status` and `grpc-message` (the same
    /// words as the JSON message) in the headers, no body.
    pub fn into_grpc_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::empty());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(u16::from(self.grpc_code())));
        // The messages are printable ASCII without '%': valid as they are (no
        // percent-encoding needed), except a path error's, which may quote the path.
        if let Ok(m) = HeaderValue::try_from(grpc_message(&self.to_string())) {
            h.insert("grpc-message", m);
        }
        if let GatewayError::RateLimited { retry_after }
        | GatewayError::ApiRateLimited { retry_after }
        | GatewayError::QuotaExceeded { retry_after } = self
        {
            let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Percent-encodes what the gRPC spec says `grpc-message` may not hold as is.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is gRPC (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

pub fn json(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_body_is_json_with_its_message() {
        use GatewayError::*;
        let d = Duration::from_secs(1);
        for e in [
            NoRoute,
            MissingKey,
            UnknownKey,
            AccessDenied,
            KeyExpired,
            RateLimited { retry_after: d },
            ApiRateLimited { retry_after: d },
            QuotaExceeded { retry_after: d },
            UpstreamUnreachable,
            UpstreamTimeout,
            PluginFailure,
            PluginRefused(StatusCode::FORBIDDEN),
            PluginRefused(StatusCode::SERVICE_UNAVAILABLE),
            StoreUnavailable,
            BodyTooLarge,
            BadBody,
            BadPath(PathError::AboveRoot),
            UpstreamConnectTimeout,
            UpstreamBusy,
            BodyBudgetExhausted,
            UpstreamTls,
        ] {
            let v: serde_json::Value = serde_json::from_str(e.body()).expect("json");
            assert_eq!(v["error"], e.to_string());
            let g = e.into_grpc_response();
            assert_eq!(g.status(), StatusCode::OK, "{e}: gRPC refusals are trailers-only 200s");
            assert_eq!(g.headers()["grpc-status"], e.grpc_code().to_string().as_str());
            assert_ne!(e.grpc_code(), 0, "{e}: never OK");
        }
    }

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        let h = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            h
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("application/grpc+proto")));
        assert!(is_grpc(&h("Application/GRPC;charset=utf-8")));
        assert!(!is_grpc(&h("application/grpc-web")));
        assert!(!is_grpc(&h("application/json")));
        assert!(!is_grpc(&http::HeaderMap::new()));
        assert_eq!(grpc_message("bad request path: \"/%2e\" \u{7f}"), "bad request path: \"/%252e\" %7F");
    }
}
