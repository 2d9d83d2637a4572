//! The admin port: /metrics, /healthz, /readyz, /config.

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use crate::{body::ProxyBody, gateway::Gateway, reply};

pub fn serve(gw: &Gateway, req: &Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(ProxyBody::from(Bytes::from(gw.metrics.render())));
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(prometheus::TEXT_FORMAT));
            r
        }
        "/healthz" => reply::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
        "/readyz" if gw.is_ready() => reply::json(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#)),
        "/readyz" => {
            reply::json(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(br#"{"status":"no config applied yet"}"#))
        }
        "/config" => {
            let rt = gw.runtime();
            let body = json!({
                "version": rt.version,
                "ready": gw.is_ready(),
                "apis": rt.report.apis,
                "plugins": rt.report.plugins,
                "keys": rt.report.keys,
                "errors": *gw.source_errors(),
            });
            reply::json(StatusCode::OK, Bytes::from(body.to_string()))
        }
        _ => reply::json(StatusCode::NOT_FOUND, Bytes::from_static(br#"{"error":"not found"}"#)),
    }
}
