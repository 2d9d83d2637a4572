//! Step 8 of the chain: forward to the upstream over pooled keep-alive connections and
//! stream both bodies through. `http://` HTTP/1.1 targets go through `pool::Pool`; h2c and
//! `https://` targets through their API's own client.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

pub use crate::connect::CONNECT_TIMEOUT;
use crate::{
    body::{Hold, ProxyBody},
    connect::tls_failure,
    model::{Api, Target},
    path::{normalise, prefix_key},
    pool::{Pool, SendError},
    reply::GatewayError,
    slots::{Slot, Slots},
    tunnel::{self, Tunnel, UpgradeSlot},
};
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery, Scheme},
};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// One `Slots` per upstream target (`host:port`), shared by every API and config that
/// names it, bounding the requests in flight to it and so the connections open to it
/// (`--upstream-max-connections-per-target`).
#[derive(Debug, Default)]
pub struct TargetSlots {
    /// 0: no cap.
    cap: u32,
    by_target: Mutex<HashMap<Authority, Arc<Slots>>>,
}

impl TargetSlots {
    pub fn new(cap: u32) -> Self {
        Self { cap, by_target: Mutex::default() }
    }

    /// The target's slots. Looked up once per compiled target, then kept in it, so a
    /// request pays no lookup.
    fn of<'t>(&self, target: &'t Target) -> Option<&'t Arc<Slots>> {
        if self.cap == 0 {
            return None;
        }
        Some(target.slots.get_or_init(|| {
            let mut map = self.by_target.lock().unwrap_or_else(PoisonError::into_inner);
            map.entry(target.authority.clone()).or_insert_with(|| Slots::new(self.cap)).clone()
        }))
    }

    /// Forgets targets no runtime and no request uses any more, so the map does not grow
    /// with every upstream ever configured. One that comes back starts with no slot taken,
    /// which is right: nothing holds one.
    pub fn prune(&self) {
        let mut map = self.by_target.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, slots| Arc::strong_count(slots) > 1);
    }

    #[cfg(test)]
    fn known(&self) -> usize {
        self.by_target.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// A slot on `target` if one is free (`Ok(None)` without a cap), else its slots.
    fn try_take<'t>(&self, target: &'t Target) -> Result<Option<Slot>, &'t Arc<Slots>> {
        match self.of(target) {
            None => Ok(None),
            Some(slots) => slots.try_take().map(Some).ok_or(slots),
        }
    }
}

/// Sends `req` to one of the API's targets; the answer's headers must come within the
/// API's timeout, which also bounds the wait for a free slot on the target. Returns the
/// upstream's response and how long its headers took. `forwarded_for` (the client's
/// address as an `X-Forwarded-For` entry) and `tls` describe the client's connection
/// (`server::Conn`), taken apart so this layer imports no entry point.
///
/// An `async move` block rather than an `async fn`, so that the request is kept once, not
/// twice (see `Gateway::handle`).
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
pub fn forward(
    pool: &Pool<ProxyBody>,
    slots: &TargetSlots,
    api: &Api,
    mut req: Request<ProxyBody>,
    forwarded_for: &HeaderValue,
    tls: bool,
) -> impl Future<Output = Result<(Response<ProxyBody>, Duration), GatewayError>> + Send {
    async move {
        let target = api.pick_target();
        let mut timeout = api.timeout;
        let slot = match slots.try_take(target) {
            Ok(s) => s,
            Err(slots) => {
                // Every slot is taken: only now is the clock worth reading.
                let waiting = std::time::Instant::now();
                let Ok(s) = tokio::time::timeout(timeout, slots.take()).await else {
                    return Err(GatewayError::UpstreamBusy);
                };
                timeout = timeout.saturating_sub(waiting.elapsed());
                Some(s)
            }
        };
        let path = upstream_path(api, target, req.uri())?;
        // A WebSocket: where to leave the tunnel, and the key its handshake answers. Over
        // HTTP/2 to the upstream there is no Upgrade: the request goes as a plain one.
        let upgrade = match req.extensions_mut().remove::<UpgradeSlot>() {
            Some(to) if !api.http2 && tunnel::is_websocket(req.method(), req.version(), req.headers()) => {
                let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
                Some((to, key))
            }
            _ => None,
        };
        // gRPC needs `te: trailers` to reach an HTTP/2 upstream; it is the one TE value HTTP/2
        // allows, and hop-by-hop otherwise.
        let te_trailers =
            api.http2 && req.headers().get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        let host_header = req.headers_mut().remove(header::HOST);
        // The host the request was routed by: the request-target's authority (absolute form,
        // HTTP/2 `:authority`) wins over Host, as in chain step 1.
        let original_host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str().rsplit('@').next().unwrap_or("")).ok())
            .or(host_header);
        *req.version_mut() = if api.http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if upgrade.is_some() {
            tunnel::set_upgrade_headers(headers);
        }
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        append_forwarded_for(headers, forwarded_for);
        // Always set, never passed on: what a client sends here is its own claim.
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(if tls { "https" } else { "http" }));
        if let Some(host) = original_host {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }

        let started = std::time::Instant::now();
        let (resp, lease) = if target.https || api.h2c.is_some() {
            // hyper-util's clients take the absolute form, and set `Host` from it.
            *req.uri_mut() = absolute(target, path)?;
            let sent = match (target.https, &api.tls, &api.h2c) {
                (true, Some((tls, _)), _) => tls.request(req),
                (false, _, Some(h2c)) => h2c.request(req),
                // An `https://` target always has its API's TLS client (`Api::compile`).
                _ => return Err(GatewayError::UpstreamUnreachable),
            };
            match tokio::time::timeout(timeout, sent).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout),
                Ok(Err(e)) => return Err(failed(api, target, &e, e.is_connect())),
                Ok(Ok(resp)) => (resp, None),
            }
        } else {
            *req.uri_mut() = Uri::from(path);
            req.headers_mut().insert(header::HOST, target.host.clone());
            let pooled = target.pool.get_or_init(|| pool.target(&target.authority));
            match tokio::time::timeout(timeout, pool.send(pooled, req, upgrade.is_some())).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout),
                Ok(Err(e)) => return Err(failed(api, target, &e, matches!(e, SendError::Connect(_)))),
                Ok(Ok((resp, lease))) => (resp, Some(lease)),
            }
        };
        let took = started.elapsed();
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Only the upgrade the client asked for, and the gateway passed on, may happen.
            let Some((to, key)) = upgrade else {
                tracing::warn!(api = %api.id, "upstream switched protocols on a request that did not ask to");
                return Err(GatewayError::UpstreamUnreachable);
            };
            if !tunnel::completes_handshake(key.as_ref(), resp.headers()) {
                tracing::warn!(api = %api.id, "upstream answered 101 without completing the WebSocket handshake");
                return Err(GatewayError::UpstreamUnreachable);
            }
            let mut resp = resp;
            let upstream = hyper::upgrade::on(&mut resp);
            strip_hop_by_hop(resp.headers_mut());
            tunnel::set_upgrade_headers(resp.headers_mut());
            // The tunnel holds the target's slot for as long as it is open; the upgraded
            // connection is the tunnel's, never the pool's again.
            drop(lease);
            to.0.leave(Tunnel { upstream, slot });
            return Ok((resp.map(ProxyBody::Stream), took));
        }
        // The slot stays taken, and the connection out of the pool, until the body has been
        // read: the connection is busy till then.
        let mut resp = match (slot, lease) {
            (None, None) => resp.map(ProxyBody::Stream),
            (slot, lease) => resp.map(|b| ProxyBody::upstream(b, Hold { slot, lease })),
        };
        strip_hop_by_hop(resp.headers_mut());
        Ok((resp, took))
    }
}

/// The gateway's answer to a request the upstream did not answer, logged with why.
fn failed(api: &Api, target: &Target, e: &(dyn std::error::Error + 'static), connect: bool) -> GatewayError {
    if connect && timed_out(e) {
        return GatewayError::UpstreamConnectTimeout;
    }
    if let Some(refusal) = crate::egress::refusal_in(e) {
        tracing::warn!(api = %api.id, reason = %refusal, "upstream refused");
    } else if let Some(reason) = tls_failure(e) {
        tracing::warn!(api = %api.id, upstream = %target.authority, %reason, "upstream TLS handshake failed");
        return GatewayError::UpstreamTls;
    } else {
        tracing::warn!(api = %api.id, error = %e, source = ?e.source(), "upstream request failed");
    }
    GatewayError::UpstreamUnreachable
}

/// Whether the connect failed on `--upstream-connect-timeout` (the connector's error is an
/// `io::Error` of kind `TimedOut` somewhere down the chain).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `base path + request path (less the listen path if stripped) + query`.
fn upstream_path(api: &Api, target: &Target, incoming: &Uri) -> Result<PathAndQuery, GatewayError> {
    let base = &target.base_path;
    // Step 1 normalised the path already, so this is one pass without allocation; it holds
    // any later rewrite of the path to the same rules.
    let path = normalise(incoming.path()).map_err(GatewayError::BadPath)?;
    let prefix = prefix_key(&api.entry.spec.listen_path);
    let rest = if api.entry.spec.strip_listen_path {
        // The router matched this prefix, unless a plugin rewrote the path (routing is not
        // re-run): a path outside the listen path is sent as the plugin set it.
        match path.strip_prefix(prefix) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => &path,
        }
    } else {
        &path
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    // Sent as it came (no base path, nothing stripped, already normal): the incoming
    // request-target's own bytes, shared rather than copied and parsed again.
    // (`http://h?q` has the path-and-query `?q`, and a `/` made up for its path.)
    if base.is_empty()
        && matches!(path, std::borrow::Cow::Borrowed(p) if std::ptr::eq(p, rest))
        && let Some(pq) = incoming.path_and_query()
        && pq.as_str().starts_with('/')
    {
        return Ok(pq.clone());
    }
    let mut pq = String::with_capacity(base.len() + rest.len() + incoming.query().map_or(0, |q| q.len() + 1));
    pq.push_str(base);
    pq.push_str(rest);
    if let Some(q) = incoming.query() {
        pq.push('?');
        pq.push_str(q);
    }
    PathAndQuery::try_from(pq).map_err(|_| GatewayError::UpstreamUnreachable)
}

fn absolute(target: &Target, path: PathAndQuery) -> Result<Uri, GatewayError> {
    Uri::builder()
        .scheme(if target.https { Scheme::HTTPS } else { Scheme::HTTP })
        .authority(target.authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| GatewayError::UpstreamUnreachable)
}

/// The hop-by-hop headers `strip_hop_by_hop` always removes; `Connection` first.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Where a name, in any case, is in `HOP_BY_HOP`. The length rules out most names before
/// a comparison: this runs for every header of every request and response.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    let first = name.as_bytes().first().map(u8::to_ascii_lowercase);
    let i = match name.len() {
        10 if first == Some(b'k') => 7,
        10 => 0,
        18 => 1,
        19 => 2,
        2 => 3,
        7 if first == Some(b'u') => 6,
        7 => 4,
        17 => 5,
        16 => 8,
        _ => return None,
    };
    name.eq_ignore_ascii_case(HOP_BY_HOP[i].as_str()).then_some(i)
}

/// Headers meant for one hop only (RFC 9110 7.6.1), and any the Connection header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names tells which of the nine are there, so only those are
    // removed: most messages have none, and an upstream's usual `Connection: keep-alive`
    // costs one removal, not nine lookups (each a hash and a probe) and a name parsed.
    let mut present = 0u16;
    for name in h.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Every `Connection` field, not only the first: a name in a second one is as
        // hop-by-hop as one in the first. One field (the usual case) costs no allocation.
        let mut fields = h.get_all(header::CONNECTION).iter();
        let first = fields.next().cloned();
        let more: Vec<HeaderValue> = fields.cloned().collect();
        h.remove(header::CONNECTION);
        for v in first.iter().chain(&more) {
            for name in v.to_str().unwrap_or("").split(',').map(str::trim) {
                // The nine are removed below if they are there at all.
                if !name.is_empty() && hop_by_hop_index(name).is_none() {
                    h.remove(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Appends the client's address (`ip`, made once per connection) to `X-Forwarded-For`; a
/// value that is not visible ASCII is replaced rather than extended.
fn append_forwarded_for(h: &mut HeaderMap, ip: &HeaderValue) {
    let value = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::try_from(format!("{prev}, {}", ip.to_str().unwrap_or(""))).ok(),
        None => Some(ip.clone()),
    };
    if let Some(v) = value {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::api;

    fn mapped(listen: &str, strip: bool, incoming: &str) -> String {
        let a = api("a", listen, &[]);
        let mut a = std::sync::Arc::into_inner(a).expect("sole owner");
        a.entry.spec.strip_listen_path = strip;
        let t = a.pick_target();
        let path = upstream_path(&a, t, &incoming.parse().expect("uri")).expect("maps");
        absolute(t, path).expect("absolute").to_string()
    }

    #[test]
    fn strips_listen_path_and_keeps_base_and_query() {
        assert_eq!(mapped("/a/", true, "/a/get?x=1"), "http://127.0.0.1:1/base/get?x=1");
        assert_eq!(mapped("/a/", true, "/a"), "http://127.0.0.1:1/base/");
        assert_eq!(mapped("/a/", false, "/a/get"), "http://127.0.0.1:1/base/a/get");
        assert_eq!(mapped("/", true, "/x/y"), "http://127.0.0.1:1/base/x/y");
    }

    #[test]
    fn a_path_sent_as_it_came_is_the_incoming_one() {
        for (listen, incoming, sent) in [
            ("/", "/x/y?q=1", "/x/y?q=1"),
            ("/", "/", "/"),
            ("/", "/x/./y?q=1", "/x/y?q=1"),
            ("/", "/x//y", "/x/y"),
            ("/", "http://h?q=1", "/?q=1"),
            ("/", "http://h", "/"),
            ("/a/", "/a/x?q", "/x?q"),
            ("/a/", "/a", "/"),
        ] {
            let a = crate::runtime::tests::api_to("a", listen, &[], "http://127.0.0.1:1");
            let path = upstream_path(&a, a.pick_target(), &incoming.parse().expect("uri")).expect("maps");
            assert_eq!(path, sent, "{listen} {incoming}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Secret"),
            ("connection", "x-second"),
            ("x-secret", "1"),
            ("x-second", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_name_is_found_and_no_other() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
            assert_eq!(hop_by_hop_index(&name.as_str().to_ascii_uppercase()), Some(i), "{name}");
        }
        for name in
            ["user-agent", "keepalive", "tk", "trailers", "upgrade2", "x-forwarded-for", "", "proxy-authorizatio"]
        {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn an_upstreams_keep_alive_goes_and_the_rest_stays() {
        let mut h = HeaderMap::new();
        for (k, v) in [("content-length", "5"), ("connection", "Keep-Alive, Upgrade"), ("keep-alive", "timeout=5")] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h.append(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["content-length"]);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.1"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("::1"));
        assert_eq!(h[&X_FORWARDED_FOR], "::1", "a value that is not text is replaced, not extended");
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_keeps_all_of_them() {
        let mut h = HeaderMap::new();
        for (k, v) in [("host", "a"), ("x-connection", "keep"), ("accept", "*/*")] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        for name in ["proxy-connection", "keep-alive", "upgrade", "trailer"] {
            let mut with = before.clone();
            with.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut with);
            assert_eq!(with, before, "{name} goes");
        }
    }

    #[test]
    fn targets_nothing_uses_are_forgotten() {
        let slots = TargetSlots::new(4);
        let (a, b) = (api("a", "/a/", &[]), api("b", "/b/", &[]));
        let (ta, tb) = (a.pick_target(), b.pick_target());
        let held = slots.try_take(ta).expect("free").expect("capped");
        let _ = slots.try_take(tb).expect("free");
        slots.prune();
        assert_eq!(slots.known(), 1, "both runtimes' targets are alive: only one authority, shared");
        drop((a, b));
        slots.prune();
        assert_eq!(slots.known(), 1, "a request still holds a slot");
        drop(held);
        slots.prune();
        assert_eq!(slots.known(), 0);
    }
}
