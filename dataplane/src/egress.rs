//! Where the gateway refuses to send requests: link-local addresses (169.254.0.0/16 and
//! fe80::/10, where cloud metadata services answer) and its own listeners, unless
//! `--allow-upstream` allows them. An API's author chooses its upstream, so without this
//! anyone who can write an ApiDefinition could read the node's cloud credentials or loop
//! the gateway into itself.
//!
//! IP literals are refused when a runtime is built (`Api::compile`): the API is not served
//! and `/config` says why. Host names are checked when they resolve (`GuardedResolver`
//! drops forbidden addresses before connecting), and every new connection's peer is checked
//! once more (`GuardedConnector`), since only then is the port known next to the address.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
};

use clap::ValueEnum;
use http::Uri;
use hyper_util::{
    client::legacy::connect::{
        HttpConnector,
        dns::{GaiResolver, Name},
    },
    rt::TokioIo,
};
use tokio::net::TcpStream;
use tower_service::Service;

/// What `--allow-upstream` can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllowUpstream {
    /// 169.254.0.0/16 and fe80::/10, including the cloud metadata service 169.254.169.254.
    LinkLocal,
    /// The gateway's own `--listen` and `--admin-listen` addresses.
    #[value(name = "self")]
    OwnListeners,
}

/// The upstream addresses this process refuses.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow_link_local: bool,
    allow_own: bool,
    /// The addresses the listeners are bound to, with the ports the OS gave them.
    listeners: Vec<SocketAddr>,
}

/// Why an upstream address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is link-local (cloud metadata services answer there); refused unless --allow-upstream link-local")]
    LinkLocal(IpAddr),
    #[error("{addr} is this gateway's own listener {listener}; refused unless --allow-upstream self")]
    OwnListener { addr: SocketAddr, listener: SocketAddr },
    #[error("{name} resolves only to refused addresses: {first}")]
    Name { name: String, first: Box<Refusal> },
}

static POLICY: OnceLock<EgressPolicy> = OnceLock::new();
static DEFAULT: EgressPolicy = EgressPolicy { allow_link_local: false, allow_own: false, listeners: Vec::new() };

/// Sets the policy for this process, once its listeners are bound. A process has one set of
/// listeners and one set of flags, and both the runtime builder and the connection pool
/// need them, so this is process state rather than something threaded through each.
pub fn install(policy: EgressPolicy) {
    if POLICY.set(policy).is_err() {
        tracing::warn!("the upstream address policy was already set; keeping the first");
    }
}

/// The policy in force: the installed one, else refuse link-local (listeners unknown yet).
pub fn policy() -> &'static EgressPolicy {
    POLICY.get().unwrap_or(&DEFAULT)
}

impl EgressPolicy {
    pub fn new(allow: &[AllowUpstream], listeners: Vec<SocketAddr>) -> Self {
        Self {
            allow_link_local: allow.contains(&AllowUpstream::LinkLocal),
            allow_own: allow.contains(&AllowUpstream::OwnListeners),
            listeners,
        }
    }

    /// Why the gateway must not connect to `addr`, if it must not.
    pub fn refusal(&self, addr: SocketAddr) -> Option<Refusal> {
        let ip = canonical(addr.ip());
        if !self.allow_link_local && is_link_local(ip) {
            return Some(Refusal::LinkLocal(ip));
        }
        if self.allow_own {
            return None;
        }
        let listener = self.listeners.iter().find(|l| l.port() == addr.port() && reaches(l.ip(), ip))?;
        Some(Refusal::OwnListener { addr, listener: *listener })
    }

    /// The part of `refusal` that needs no port: what a resolver can filter out.
    fn refuses_ip(&self, ip: IpAddr) -> bool {
        !self.allow_link_local && is_link_local(canonical(ip))
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses reach the IPv4
/// address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., hi, lo] = s;
                return IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Whether a connection to `target` (on the listener's port) would reach a listener bound
/// to `bound`.
fn reaches(bound: IpAddr, target: IpAddr) -> bool {
    // Connecting to 0.0.0.0 or :: reaches this host.
    if target.is_unspecified() {
        return true;
    }
    if bound.is_unspecified() {
        // Bound to every address (and on Linux, [::] takes IPv4 too): loopback, or any
        // address this host has, which is exactly what the OS lets us bind to.
        return target.is_loopback() || std::net::UdpSocket::bind((target, 0)).is_ok();
    }
    canonical(bound) == target
}

/// A DNS resolver that drops addresses no upstream may have, before anything connects.
#[derive(Clone)]
pub struct GuardedResolver {
    inner: GaiResolver,
}

impl Default for GuardedResolver {
    fn default() -> Self {
        Self { inner: GaiResolver::new() }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Resolving = Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, BoxError>> + Send>>;

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.inner.call(name.clone());
        Box::pin(async move {
            let policy = policy();
            let mut first = None;
            let allowed: Vec<SocketAddr> = lookup
                .await?
                .filter(|a| {
                    let refused = policy.refuses_ip(a.ip());
                    if refused && first.is_none() {
                        first = Some(Refusal::LinkLocal(canonical(a.ip())));
                    }
                    !refused
                })
                .collect();
            match first {
                Some(first) if allowed.is_empty() => {
                    Err(Refusal::Name { name: name.as_str().to_owned(), first: Box::new(first) }.into())
                }
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// The upstream connector: `HttpConnector` over `GuardedResolver`, and a check of each new
/// connection's peer, which catches the gateway's own listeners behind a host name.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector<GuardedResolver>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl GuardedConnector {
    pub fn new(inner: HttpConnector<GuardedResolver>) -> Self {
        Self { inner }
    }
}

impl Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            // Closing before a byte is written: the peer sees a connection come and go.
            if let Ok(peer) = io.inner().peer_addr()
                && let Some(refusal) = policy().refusal(peer)
            {
                return Err(refusal.into());
            }
            Ok(io)
        })
    }
}

/// The refusal behind a failed upstream request, if that is why it failed.
pub fn refusal_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// Checks an upstream URL's host when it is an IP literal; names are checked when they
/// resolve. `port` is the one the connector will use.
pub fn check_literal(host: &str, port: u16) -> Result<(), Refusal> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => policy().refusal(SocketAddr::new(ip, port)).map_or(Ok(()), Err),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn link_local_is_refused_in_every_spelling() {
        let p = EgressPolicy::default();
        for a in [
            "169.254.169.254:80",
            "169.254.0.1:8080",
            "[fe80::1]:80",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a9fe:a9fe]:80",
        ] {
            assert!(matches!(p.refusal(addr(a)), Some(Refusal::LinkLocal(_))), "{a}");
        }
        for a in ["10.0.0.1:80", "127.0.0.1:80", "[::1]:80", "[fd00::1]:80", "169.255.0.1:80"] {
            assert_eq!(p.refusal(addr(a)), None, "{a}");
        }
        let allowed = EgressPolicy::new(&[AllowUpstream::LinkLocal], vec![]);
        assert_eq!(allowed.refusal(addr("169.254.169.254:80")), None);
    }

    #[test]
    fn own_listeners_are_refused_by_address_and_port() {
        let p = EgressPolicy::new(&[], vec![addr("127.0.0.1:8080"), addr("0.0.0.0:9090")]);
        assert!(p.refusal(addr("127.0.0.1:8080")).is_some());
        assert!(p.refusal(addr("[::ffff:127.0.0.1]:8080")).is_some());
        assert!(p.refusal(addr("0.0.0.0:8080")).is_some(), "0.0.0.0 reaches this host");
        assert_eq!(p.refusal(addr("127.0.0.2:8080")), None, "another loopback address, not the bound one");
        assert_eq!(p.refusal(addr("127.0.0.1:8081")), None, "another port");
        assert!(p.refusal(addr("127.0.0.1:9090")).is_some(), "a wildcard bind takes loopback");
        assert!(p.refusal(addr("127.0.0.9:9090")).is_some(), "and all of 127/8");
        assert!(p.refusal(addr("[::1]:9090")).is_some());
        assert_eq!(p.refusal(addr("203.0.113.77:9090")), None, "not an address of this host");
        assert_eq!(
            EgressPolicy::new(&[AllowUpstream::OwnListeners], p.listeners.clone()).refusal(addr("127.0.0.1:8080")),
            None
        );
    }

    #[test]
    fn literals_are_checked_and_names_left_to_the_resolver() {
        assert!(check_literal("169.254.169.254", 80).is_err());
        assert!(check_literal("[fe80::1]", 80).is_err());
        assert!(check_literal("metadata.google.internal", 80).is_ok());
    }

    #[test]
    fn a_refusal_is_found_behind_wrapping_errors() {
        let w = Wrapper(Refusal::LinkLocal("169.254.169.254".parse().expect("ip")).into());
        assert!(matches!(refusal_in(&w), Some(Refusal::LinkLocal(_))));
        assert!(refusal_in(&std::io::Error::other("connection refused")).is_none());
    }

    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }
}
