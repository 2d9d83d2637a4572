//! WebSockets: an HTTP/1.1 `Upgrade: websocket` request goes through the whole chain like
//! any other (route, auth, limits, request hooks); when the upstream answers
//! `101 Switching Protocols`, the client's and the upstream's connections are joined byte
//! for byte.
//!
//! The joined connection runs on the client connection's own task (`server`), after hyper
//! hands the connection back, so it keeps holding its connection slot
//! (`--max-connections`), counts in `gatehouse_client_connections` and is waited for by the
//! drain; it keeps its upstream target's slot too. It ends when either side closes, or
//! when no byte has moved either way for between one and two `--idle-timeout`s.

use std::{
    io,
    pin::Pin,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::slots::Slot;

/// What one client connection shares between the server, which watches it, and the
/// requests on it: the tunnel an upgrade request left to run once hyper hands the
/// connection back. `server::Watched` treats a live `Arc` of this beyond its own as a
/// request in flight.
#[derive(Default)]
pub struct ConnState {
    tunnel: Mutex<Option<Tunnel>>,
}

impl ConnState {
    /// Leaves `t` for the connection's task to run. An HTTP/1.1 connection upgrades at
    /// most once: a second one can only come from a request hyper never sends.
    pub fn leave(&self, t: Tunnel) {
        *self.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(t);
    }

    pub fn take(&self) -> Option<Tunnel> {
        self.tunnel.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A request extension, put only on HTTP/1.1 requests that carry `Upgrade`: where the
/// proxy leaves the tunnel. Holding it counts as a request in flight.
#[derive(Clone)]
pub struct UpgradeSlot(pub std::sync::Arc<ConnState>);

/// The upstream's end of an upgraded exchange (the client's is the connection the server
/// holds), and the upstream target's slot.
pub struct Tunnel {
    pub upstream: OnUpgrade,
    pub slot: Option<Slot>,
}

impl Tunnel {
    /// Copies both ways until either side closes, or nothing has moved for a whole
    /// `idle` period (checked once per period: closed after one to two of them).
    pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(self, client: C, idle: Duration, peer: std::net::SocketAddr) {
        let upstream = match self.upstream.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "upgrade did not complete");
                return;
            }
        };
        let moved = AtomicBool::new(false);
        let mut client = Active { io: client, moved: &moved };
        let mut upstream = TokioIo::new(upstream);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => {
                    match r {
                        Ok((up, down)) => tracing::debug!(%peer, up, down, "websocket closed"),
                        Err(e) => tracing::debug!(%peer, error = %e, "websocket ended"),
                    }
                    break;
                }
                () = tokio::time::sleep(idle) => {
                    if !moved.swap(false, Ordering::Relaxed) {
                        tracing::debug!(%peer, "websocket idle timeout");
                        break;
                    }
                }
            }
        }
        drop(self.slot);
    }
}

/// The client's side of a tunnel, noting that bytes moved: every byte of a tunnel passes
/// through it, one way or the other.
struct Active<'a, S> {
    io: S,
    moved: &'a AtomicBool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.store(true, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether a request asks for a WebSocket (RFC 6455 4.1): an HTTP/1.1 `GET` with
/// `Upgrade: websocket`, `Connection: upgrade`, a `Sec-WebSocket-Key` of 16 bytes in base64
/// and `Sec-WebSocket-Version: 13`. Other upgrades (`h2c`, ...), and WebSocket requests that
/// miss any of these, are not passed on as upgrades: their `Upgrade` header is dropped like
/// any hop-by-hop header.
pub fn is_websocket(method: &Method, version: Version, h: &HeaderMap) -> bool {
    method == Method::GET
        && version == Version::HTTP_11
        && has_token(h, &header::UPGRADE, "websocket")
        && has_token(h, &header::CONNECTION, "upgrade")
        && h.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13")
        && h.get(header::SEC_WEBSOCKET_KEY).is_some_and(|k| {
            base64::engine::general_purpose::STANDARD.decode(k.as_bytes()).is_ok_and(|b| b.len() == 16)
        })
}

/// Whether an upstream's `101` completes the WebSocket handshake `request` began: its own
/// `Upgrade: websocket`, and the `Sec-WebSocket-Accept` that only a WebSocket server
/// computes from the request's key (RFC 6455 4.2.2). Anything else joined byte for byte
/// would hand the client a raw connection to the upstream's HTTP server, past every check
/// of the chain.
pub fn completes_handshake(request_key: Option<&HeaderValue>, response: &HeaderMap) -> bool {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let Some(key) = request_key else { return false };
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    has_token(response, &header::UPGRADE, "websocket")
        && response.get(header::SEC_WEBSOCKET_ACCEPT).is_some_and(|a| a.as_bytes() == accept.as_bytes())
}

pub fn has_token(h: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The two headers that make a request or a `101` an upgrade, after hop-by-hop headers
/// were stripped.
pub fn set_upgrade_headers(h: &mut HeaderMap) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn ws(extra: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = headers(&[("sec-websocket-key", KEY), ("sec-websocket-version", "13")]);
        for (k, v) in extra {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn websocket_requests_need_a_get_the_headers_a_key_and_http_1_1() {
        let full = ws(&[("upgrade", "WebSocket"), ("connection", "keep-alive, Upgrade")]);
        assert!(is_websocket(&Method::GET, Version::HTTP_11, &full));
        assert!(!is_websocket(&Method::POST, Version::HTTP_11, &full));
        assert!(!is_websocket(&Method::GET, Version::HTTP_10, &full));
        assert!(!is_websocket(&Method::GET, Version::HTTP_2, &full));
        assert!(!is_websocket(&Method::GET, Version::HTTP_11, &ws(&[("upgrade", "websocket")])));
        assert!(!is_websocket(&Method::GET, Version::HTTP_11, &ws(&[("upgrade", "h2c"), ("connection", "upgrade")])));
        let split = ws(&[("upgrade", "websocket"), ("connection", "keep-alive"), ("connection", "upgrade")]);
        assert!(is_websocket(&Method::GET, Version::HTTP_11, &split));
        let no_key = headers(&[("upgrade", "websocket"), ("connection", "upgrade"), ("sec-websocket-version", "13")]);
        assert!(!is_websocket(&Method::GET, Version::HTTP_11, &no_key));
        let short_key = headers(&[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "c2hvcnQ="),
        ]);
        assert!(!is_websocket(&Method::GET, Version::HTTP_11, &short_key));
    }

    #[test]
    fn only_a_101_with_the_accept_for_the_key_completes_the_handshake() {
        // RFC 6455 1.3's example.
        let key = HeaderValue::from_static(KEY);
        let good = headers(&[("upgrade", "websocket"), ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]);
        assert!(completes_handshake(Some(&key), &good));
        let wrong = headers(&[("upgrade", "websocket"), ("sec-websocket-accept", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")]);
        assert!(!completes_handshake(Some(&key), &wrong));
        let other = headers(&[("upgrade", "h2c"), ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]);
        assert!(!completes_handshake(Some(&key), &other));
        assert!(!completes_handshake(None, &good));
    }
}
