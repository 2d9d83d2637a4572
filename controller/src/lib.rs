//! The Gatehouse controller: watches ApiDefinitions, Plugins, key Secrets, Services and
//! EndpointSlices, compiles them into a versioned snapshot, streams per-resource deltas to
//! dataplanes, and (as the elected leader) writes what they acknowledge into status.
#![forbid(unsafe_code)]

pub mod acks;
pub mod auth;
pub mod compile;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod status;
pub mod tls;
pub mod watch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
