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
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderValue, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::slots::Slot;

/// What one client connection shares between the server, which watches it, and the
/// requests on it: how many requests started (`server::Watched` counts them, and treats
/// a live `Arc` of this beyond its own as a request in flight), and the tunnel an upgrade
/// request left to run once hyper hands the connection back.
#[derive(Default)]
pub struct ConnState {
    pub requests: AtomicU32,
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

/// Both ends of an upgraded exchange, and the upstream target's slot.
pub struct Tunnel {
    pub client: OnUpgrade,
    pub upstream: OnUpgrade,
    pub slot: Option<Slot>,
}

impl Tunnel {
    /// Copies both ways until either side closes, or nothing has moved for a whole
    /// `idle` period (checked once per period: closed after one to two of them).
    pub async fn run(self, idle: Duration, peer: std::net::SocketAddr) {
        let (client, upstream) = match tokio::join!(self.client, self.upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                let error = c.err().or(u.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::debug!(%peer, %error, "upgrade did not complete");
                return;
            }
        };
        let moved = AtomicBool::new(false);
        let mut client = Active { io: TokioIo::new(client), moved: &moved };
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

/// Whether a request asks for a WebSocket (RFC 6455 4.1): HTTP/1.1, `Upgrade: websocket`
/// and `Connection: upgrade`. Other upgrades (`h2c`, ...) are not passed on: their
/// `Upgrade` header is dropped like any hop-by-hop header.
pub fn is_websocket(version: Version, h: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && has_token(h, &header::UPGRADE, "websocket")
        && has_token(h, &header::CONNECTION, "upgrade")
}

fn has_token(h: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
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

    #[test]
    fn websocket_requests_need_both_headers_and_http_1_1() {
        let ws = headers(&[("upgrade", "WebSocket"), ("connection", "keep-alive, Upgrade")]);
        assert!(is_websocket(Version::HTTP_11, &ws));
        assert!(!is_websocket(Version::HTTP_10, &ws));
        assert!(!is_websocket(Version::HTTP_2, &ws));
        assert!(!is_websocket(Version::HTTP_11, &headers(&[("upgrade", "websocket")])));
        assert!(!is_websocket(Version::HTTP_11, &headers(&[("upgrade", "h2c"), ("connection", "upgrade")])));
        let split = headers(&[("upgrade", "websocket"), ("connection", "keep-alive"), ("connection", "upgrade")]);
        assert!(is_websocket(Version::HTTP_11, &split));
    }
}
