//! The admin port: /metrics, /healthz, /readyz, /config.
//!
//! `/config` lists every namespace's APIs, targets and failure reasons, so by default it
//! answers loopback clients only (`kubectl port-forward` arrives on loopback); probes and
//! scrapers reach the other endpoints on any address.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use crate::{body::ProxyBody, gateway::Gateway, reply};

/// Who may read `/config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigAccess {
    LoopbackOnly,
    Anyone,
}

impl ConfigAccess {
    /// From `--expose-config`.
    pub fn from_flag(expose: bool) -> Self {
        if expose { Self::Anyone } else { Self::LoopbackOnly }
    }

    fn allows(self, peer: SocketAddr) -> bool {
        self == Self::Anyone || peer.ip().to_canonical().is_loopback()
    }
}

pub fn serve(gw: &Gateway, req: &Request<Incoming>, peer: SocketAddr, access: ConfigAccess) -> Response<ProxyBody> {
    match req.uri().path() {
        "/metrics" => {
            gw.metrics.buffered_body_bytes.set(i64::try_from(gw.bodies.held()).unwrap_or(i64::MAX));
            let (live, parked) = gw.pool.idle();
            let gauge = |state: &str, n: usize| {
                gw.metrics.upstream_idle.with_label_values(&[state]).set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            gauge("live", live);
            gauge("parked", parked);
            let mut r = Response::new(ProxyBody::from(Bytes::from(gw.metrics.render())));
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(prometheus::TEXT_FORMAT));
            r
        }
        "/healthz" => reply::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        "/readyz" if gw.is_ready() => reply::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#)),
        "/readyz" => {
            reply::json(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(br#"{"status":"no config applied yet"}"#))
        }
        "/config" if !access.allows(peer) => reply::json(
            StatusCode::FORBIDDEN,
            Bytes::from_static(
                br#"{"error":"/config answers loopback clients only: it lists every namespace's APIs; start the dataplane with --expose-config to serve it on other addresses"}"#,
            ),
        ),
        "/config" => {
            let rt = gw.runtime();
            let body = json!({
                "version": rt.version,
                "ready": gw.is_ready(),
                "apis": rt.report.apis,
                "plugins": rt.report.plugins,
                "keys": rt.report.keys,
                "certificates": rt.report.certificates,
                "errors": *gw.source_errors(),
            });
            reply::json(StatusCode::OK, Bytes::from(body.to_string()))
        }
        _ => reply::json(StatusCode::NOT_FOUND, Bytes::from_static(br#"{"error":"not found"}"#)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_for_loopback_clients_unless_exposed() {
        let peer = |s: &str| s.parse::<SocketAddr>().expect("address");
        let only = ConfigAccess::from_flag(false);
        assert!(only.allows(peer("127.0.0.1:5000")));
        assert!(only.allows(peer("[::1]:5000")));
        assert!(only.allows(peer("[::ffff:127.0.0.1]:5000")));
        assert!(!only.allows(peer("10.1.2.3:5000")));
        assert!(ConfigAccess::from_flag(true).allows(peer("10.1.2.3:5000")));
    }
}
