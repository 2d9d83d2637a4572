//! The middleware chain, top to bottom, in DESIGN.md's order. Each step may end the
//! request; whatever ends it, step 10 records it.
//!
//! ```text
//!  1 route ─ 2 pre ─ 3 API rate limit ─ 4 auth ─ 5 postKeyAuth ─ 6 key checks
//!    ─ 6b endpoint plugins ─ 7 post ─ 8 upstream ─ 9 response ─ 10 analytics + metrics
//! ```
//!
//! Response headers that request hooks set (`GH_RESPONSE` in a request phase, Tyk's
//! `rw.Header()`) ride on whatever answers: the upstream (before `response` hooks, which
//! see them), a hook, or the gateway's own error.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use gatehouse_crds::AuthType;
use gatehouse_plugin_host::{self as plugins, Exchange as PluginExchange, Next, RequestState, ResponseState};
use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::{
    analytics::{BODY_CAP, Bodies, Captured, Record},
    auth::{self, QuotaLeft},
    body::{BufferError, Capture, ProxyBody, Tee},
    client_auth::{ClientCert, Refusal},
    endpoints,
    gateway::Gateway,
    limits::{CounterStore, Decision},
    model::{Api, Session},
    path::{self, PathError},
    proxy,
    reply::GatewayError,
    runtime::Runtime,
    server::Conn,
};

/// What the chain learnt about a request, for step 10.
#[derive(Default)]
struct Exchange {
    api: Option<Arc<Api>>,
    session: Option<Arc<Session>>,
    upstream_latency: Option<std::time::Duration>,
    error: Option<GatewayError>,
    plugin_answered: bool,
    /// What request hooks set on the response: sent as is when one answers; otherwise its
    /// headers go onto whatever answers instead.
    reply: ResponseState,
    /// Bytes of bodies buffered for plugins, given back to the shared budget when the
    /// request ends.
    held: crate::body::Reservation,
    /// With `detailedRecording` (and a sink on): the request body as it streamed by.
    request_capture: Option<Arc<Capture>>,
}

static RATE_LIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static RATE_LIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

impl Gateway {
    /// Serves one request. Never fails: every failure becomes a response.
    ///
    /// Written as a function returning an `async move` block, as are the steps it awaits
    /// (`run`, `proxy::forward`, `Pool::send`): an `async fn` keeps each argument twice for
    /// as long as it runs (the argument, and the local it is moved into), and every byte of
    /// a future is copied each time it is moved into the one that awaits it and, here, into
    /// its box. The steps before the first await run before the block, which keeps only
    /// what they produce.
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Conn,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let started = Instant::now();
        // A gRPC client reads the gateway's own refusals as gRPC statuses only.
        let grpc = req.version() == http::Version::HTTP_2 && crate::reply::is_grpc(req.headers());
        let mut req = req.map(ProxyBody::Stream);
        // 1. Route, first half: the normalised path is the one every later step sees,
        // analytics included.
        let normal = path::normalise_uri(req.uri_mut()).map_err(GatewayError::BadPath);
        // Only read for analytics, so copied only when a sink is on.
        let seen = self
            .analytics
            .enabled()
            .then(|| (req.method().to_string(), req.uri().path().to_owned(), content_length(req.headers())));
        async move {
            let peer = conn.peer;
            let rt = self.runtime();
            let mut ex = Exchange::default();
            let result = match normal {
                Ok(()) => self.run(&rt, &mut ex, req, conn).await,
                Err(e) => Err(e),
            };
            let response = match result {
                Ok(resp) => resp,
                Err(e) => {
                    ex.error = Some(e);
                    let mut resp = if grpc { e.into_grpc_response() } else { e.into_response() };
                    carry_headers(&ex.reply.headers, resp.headers_mut());
                    resp
                }
            };
            self.record(&ex, response, started, peer, seen)
        }
    }

    fn run(
        &self,
        rt: &Runtime,
        ex: &mut Exchange,
        req: Request<ProxyBody>,
        conn: Conn,
    ) -> impl Future<Output = Result<Response<ProxyBody>, GatewayError>> + Send {
        // Taken apart before the block, which then works on these in place: taken apart
        // inside it, the request would be kept twice, whole and in parts.
        let (parts, body) = req.into_parts();
        let mut req = RequestState { parts, body: None, body_set: false };
        let mut body = Some(body);
        async move {
            let peer = conn.peer;
            let uri = &req.parts.uri;
            // 1. Route: the request-target's authority (absolute form, HTTP/2 `:authority`)
            // wins over Host (RFC 9112 3.2.2); then the longest listen path.
            let host = uri.host().or_else(|| req.parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
            let api = rt.router.route(host, uri.path()).ok_or(GatewayError::NoRoute)?;
            ex.api = Some(api.clone());
            // A server that drops `;parameters` must land on the same API (see `path`).
            if let Some(bare) = path::without_parameters(uri.path())
                && !rt.router.route(host, &bare).is_some_and(|b| Arc::ptr_eq(b, api))
            {
                return Err(GatewayError::BadPath(PathError::ParametersChangeRoute));
            }
            // Plain HTTP for an API that asks for TLS only: send the client there first, before
            // anything reads (or a plugin sees) what it sent in the clear.
            if !conn.tls
                && let Some(tls) = &api.entry.spec.tls
                && tls.redirect_http
            {
                return Ok(self.redirect_to_https(host, uri));
            }
            let plugins = &api.plugins;
            if plugins.unavailable.is_some() {
                return Err(GatewayError::PluginFailure);
            }

            if plugins.detailed_recording
                && self.analytics.enabled()
                && let Some(b) = body.take()
            {
                let capture = Arc::new(Capture::default());
                body = Some(Tee::wrap(b, capture.clone(), BODY_CAP, None));
                ex.request_capture = Some(capture);
            }
            // Boxed: only hooks that read bodies wait here, and inline this wait would be
            // the largest state of every request's future.
            if plugins.request_body {
                req.body = Some(Box::pin(self.buffer(body.take(), GatewayError::BadBody, &mut ex.held)).await?);
            }
            macro_rules! hooks {
                ($hooks:expr) => {{
                    let mut x = PluginExchange {
                        req: &mut req,
                        resp: &mut ex.reply,
                        session: &mut ex.session,
                        api: &**api,
                        peer,
                    };
                    if let Next::Respond = plugins::run_phase($hooks, &mut x)? {
                        ex.plugin_answered = true;
                        return Ok(into_response(std::mem::take(&mut ex.reply), None));
                    }
                }};
            }

            // 2. `pre` plugins.
            hooks!(&plugins.pre);

            // 3. API-wide rate limit, before any key lookup so floods stay cheap.
            if let Some(rl) = api.entry.spec.rate_limit {
                let d = self.counters.rate(&api.rate_key, rl.rate, rl.per.as_std()).await.map_err(auth::store_down)?;
                if let Decision::Denied { retry_after } = d {
                    return Err(GatewayError::ApiRateLimited { retry_after });
                }
            }

            // 4. Auth. Keyless APIs skip 4-6.
            match api.entry.spec.auth.kind {
                AuthType::Keyless => {}
                AuthType::AuthToken => {
                    let cfg = &api.entry.spec.auth.auth_token;
                    ex.session = Some(auth::authenticate(rt, cfg, &req.parts)?);
                    if cfg.strip_credentials {
                        auth::strip_credentials(cfg, &mut req.parts);
                    }
                }
                AuthType::Mtls => ex.session = Some(client_certificate_session(rt, api, &conn.client_cert)?),
                AuthType::Plugin => {
                    // The hook creates the session (or answers itself); none means refused.
                    hooks!(plugins.auth_check.as_slice());
                    if ex.session.is_none() {
                        return Err(GatewayError::UnknownKey);
                    }
                }
            }

            // 5. `postKeyAuth` plugins.
            hooks!(&plugins.post_key_auth);

            // 6. Key checks: expiry, access rights, per-key rate limit, quota.
            let mut quota: Option<QuotaLeft> = None;
            if let Some(s) = &ex.session {
                quota = auth::check_key(&self.counters, api, s).await?;
            }

            // 6b. Endpoint plugins (Tyk's per-endpoint plugins): the first entry, in declared
            // order, whose method and path after the listen path match.
            if !plugins.endpoints.is_empty()
                && let Some(e) = endpoints::find(
                    &plugins.endpoints,
                    &api.entry.spec.listen_path,
                    &req.parts.method,
                    req.parts.uri.path(),
                )
            {
                hooks!(&e.hooks);
            }

            // 7. `post` plugins.
            hooks!(&plugins.post);

            // 8. Upstream. Response hooks see the request too, so they get a copy of it.
            let seen_by_response_hooks = (!plugins.response.is_empty()).then(|| copy_request(&req.parts));
            let body = match (req.body, body) {
                (Some(b), _) => {
                    fix_length(&mut req.parts.headers, b.len());
                    ProxyBody::from(b)
                }
                (None, Some(stream)) => stream,
                (None, None) => ProxyBody::empty(),
            };
            let (mut resp, took) = proxy::forward(
                &self.pool,
                &self.target_slots,
                api,
                Request::from_parts(req.parts, body),
                &conn.forwarded_for,
                conn.tls,
            )
            .await?;
            ex.upstream_latency = Some(took);
            carry_headers(&ex.reply.headers, resp.headers_mut());

            // 9. `response` plugins, then the answer. A `101` has no body to change, and what
            // follows it is no longer HTTP.
            if let Some(parts) = seen_by_response_hooks
                && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                let (head, body) = resp.into_parts();
                let mut upstream =
                    ResponseState { status: head.status, headers: head.headers, body: None, body_set: false };
                let mut body = Some(body);
                if plugins.response_body {
                    upstream.body = Some(
                        Box::pin(self.buffer(body.take(), GatewayError::UpstreamUnreachable, &mut ex.held)).await?,
                    );
                }
                let mut req = RequestState { parts, body: None, body_set: false };
                let mut x =
                    PluginExchange { req: &mut req, resp: &mut upstream, session: &mut ex.session, api: &**api, peer };
                // A response hook cannot answer instead of the upstream: it already answered.
                let _ = plugins::run_phase(&plugins.response, &mut x)?;
                resp = into_response(upstream, body);
            }
            if let Some(q) = quota {
                let h = resp.headers_mut();
                h.insert(RATE_LIMIT_LIMIT.clone(), HeaderValue::from(q.limit));
                h.insert(RATE_LIMIT_REMAINING.clone(), HeaderValue::from(q.remaining));
            }
            Ok(resp)
        }
    }

    /// Step 10: metrics always; an analytics record when a sink is on. With
    /// `detailedRecording` the record waits, inside the response body, for that body to end
    /// (or be dropped).
    fn record(
        &self,
        ex: &Exchange,
        resp: Response<ProxyBody>,
        started: Instant,
        peer: SocketAddr,
        seen: Option<(String, String, Option<u64>)>,
    ) -> Response<ProxyBody> {
        let took = started.elapsed();
        // What the gateway decided: a refusal sent as a gRPC status still counts as such.
        let status = ex.error.map_or(resp.status(), GatewayError::status).as_u16();
        let m = ex.api.as_ref().map_or(&self.metrics.unrouted, |a| &a.metrics);
        m.count(status);
        m.duration.observe(took.as_secs_f64());
        if let Some(u) = ex.upstream_latency {
            m.upstream.observe(u.as_secs_f64());
        }
        if let Some(e) = ex.error {
            m.reject(e);
        }
        let Some((method, path, request_bytes)) = seen else {
            return resp;
        };
        let record = Record {
            time: jiff::Timestamp::now().to_string(),
            api_id: ex.api.as_ref().map(|a| a.id.clone()),
            api_name: ex.api.as_ref().map(|a| a.display_name.clone()),
            method,
            path,
            status,
            latency_total_ms: took.as_secs_f64() * 1e3,
            latency_upstream_ms: ex.upstream_latency.map(|d| d.as_secs_f64() * 1e3),
            key_id: ex.session.as_ref().and_then(|s| s.key_id.clone()),
            key_alias: ex.session.as_ref().map(|s| s.alias.clone()),
            client_ip: peer.ip().to_string(),
            request_bytes,
            response_bytes: http_body::Body::size_hint(resp.body()).exact().or_else(|| content_length(resp.headers())),
            plugin_answered: ex.plugin_answered,
            error: ex.error.map(GatewayError::reason),
            tags: Vec::new(),
            session: ex.session.clone(),
            hooks: ex.api.as_ref().filter(|a| !a.plugins.analytics.is_empty()).cloned(),
            bodies: None,
        };
        let Some(request_capture) = ex.request_capture.clone() else {
            self.analytics.send(record);
            return resp;
        };
        let analytics = self.analytics.clone();
        let response_capture = Arc::new(Capture::default());
        let captured = response_capture.clone();
        let send = move || {
            let mut record = record;
            record.bodies = Some(Bodies { request: Captured::of(&request_capture), response: Captured::of(&captured) });
            analytics.send(record);
        };
        let (head, body) = resp.into_parts();
        Response::from_parts(head, Tee::wrap(body, response_capture, BODY_CAP, Some(Box::new(send))))
    }
}

impl Gateway {
    /// 308 to the same URL over https. `host` matched one of the API's `hosts` (an API
    /// with `spec.tls` has some), so it is a name the API declared, not arbitrary input;
    /// the port is `--tls-redirect-port`, or `--tls-listen`'s, left out when 443.
    fn redirect_to_https(&self, host: Option<&str>, uri: &http::Uri) -> Response<ProxyBody> {
        let host = crate::router::strip_port(host.unwrap_or_default());
        let query = uri.query().map_or(0, |q| q.len() + 1);
        let mut location = String::with_capacity(8 + host.len() + self.redirect_port.len() + uri.path().len() + query);
        location.push_str("https://");
        location.extend(host.chars().map(|c| c.to_ascii_lowercase()));
        location.push_str(&self.redirect_port);
        location.push_str(uri.path());
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
        match HeaderValue::try_from(location) {
            Ok(v) => {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            // A host that routed and a normalised path are always a valid header value; if
            // that ever fails, no redirect to a mangled URL.
            Err(_) => return GatewayError::NoRoute.into_response(),
        }
        resp
    }

    /// Reads a body whole for hooks that asked for it, within the per-body limit (413)
    /// and the budget shared by all requests (503).
    async fn buffer(
        &self,
        body: Option<ProxyBody>,
        on_error: GatewayError,
        held: &mut crate::body::Reservation,
    ) -> Result<Bytes, GatewayError> {
        let Some(body) = body else { return Ok(Bytes::new()) };
        self.bodies.read(body, held).await.map_err(|e| match e {
            BufferError::TooLarge => GatewayError::BodyTooLarge,
            BufferError::Exhausted => GatewayError::BodyBudgetExhausted,
            BufferError::Read => on_error,
        })
    }
}

/// Puts the response headers request hooks set onto the answer: for each name they set,
/// their values replace the answer's. Framing headers stay the answer's own, which alone
/// knows its body. Costs one emptiness check when no hook set any.
fn carry_headers(set: &http::HeaderMap, answer: &mut http::HeaderMap) {
    if set.is_empty() {
        return;
    }
    for name in set.keys() {
        if is_framing(name) {
            continue;
        }
        answer.remove(name);
        for v in set.get_all(name) {
            answer.append(name.clone(), v.clone());
        }
    }
}

fn is_framing(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, TE, TRAILER, UPGRADE].contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// After a body was buffered or replaced: its length is known, so say it.
fn fix_length(h: &mut http::HeaderMap, len: usize) {
    h.remove(http::header::TRANSFER_ENCODING);
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// A response from hook state: a body a hook set or buffered wins over the stream.
fn into_response(mut r: ResponseState, stream: Option<ProxyBody>) -> Response<ProxyBody> {
    let body = match (r.body, stream) {
        (Some(b), _) => {
            fix_length(&mut r.headers, b.len());
            ProxyBody::from(b)
        }
        (None, Some(s)) => s,
        (None, None) => ProxyBody::empty(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = r.status;
    *resp.headers_mut() = r.headers;
    resp
}

/// Step 4 for `mtls` APIs: the session of the connection's certificate, if it chains to
/// this API's CA.
fn client_certificate_session(rt: &Runtime, api: &Api, cert: &ClientCert) -> Result<Arc<Session>, GatewayError> {
    let ca = rt.certificates.client_auth.ca_of(&api.id);
    cert.session(&api.id, &api.entry.namespace, &api.entry.name, ca).map_err(|r| match r {
        Refusal::Missing => GatewayError::ClientCertRequired,
        Refusal::Untrusted => GatewayError::ClientCertUntrusted,
        Refusal::Misdirected => GatewayError::Misdirected,
    })
}

fn copy_request(p: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.headers = p.headers.clone();
    parts
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned<A, B, C, R>(_: impl FnOnce(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's future is boxed, and each step's future is moved whole into the one
    /// awaiting it, so its size is copied on every request. `handle`'s holds all the steps'
    /// (`run`, `proxy::forward`, `Pool::send`): one of them turned back into an `async fn`
    /// grows it by a request or more (see `Gateway::handle`).
    #[test]
    fn a_request_s_future_stays_small() {
        let size = returned(Gateway::handle);
        // 3,040 B with rustc 1.95; a request is 320 B, so one step keeping it twice again
        // goes past the bound.
        assert!(size <= 3_328, "a request's future is {size} B: has a step become an async fn again?");
    }
}
