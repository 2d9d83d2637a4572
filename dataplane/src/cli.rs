//! Command-line flags, as DESIGN.md names them.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(name = "gatehouse-dataplane", version, about = "The Gatehouse API gateway dataplane")]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "controller"])))]
pub struct Cli {
    /// Address the gateway serves clients on (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the admin port: /metrics, /healthz, /readyz, /config.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Standalone mode: a YAML file, or a directory of YAML files, holding ApiDefinition,
    /// Plugin and key Secret manifests. Watched: changes are applied without a restart.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: the controller's config stream, e.g. `http://gatehouse-controller:9443`.
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// The projected ServiceAccount token presented to the controller (re-read on every
    /// connection, so rotation just works).
    #[arg(long, value_name = "PATH", default_value = "/var/run/secrets/gatehouse/token")]
    pub token_file: PathBuf,
    /// Where the last applied config is kept, to serve it after a restart while the
    /// controller is unreachable.
    #[arg(long, value_name = "DIR", default_value = "/tmp/gatehouse/state")]
    pub state_dir: PathBuf,
    /// This dataplane's name in acknowledgements and status; the pod name in Kubernetes.
    #[arg(long, env = "POD_NAME")]
    pub node_name: Option<String>,
    /// Where analytics records go: `none`, `stdout`, or `file:PATH` (JSON lines).
    #[arg(long, default_value = "none", value_parser = parse_analytics)]
    pub analytics: AnalyticsSink,
    /// Where plugin libraries are copied, by content hash, before loading. Must be
    /// writable; in a pod, an emptyDir.
    #[arg(long, value_name = "DIR", default_value = "/tmp/gatehouse/plugins")]
    pub plugin_dir: PathBuf,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalyticsSink {
    None,
    Stdout,
    File(PathBuf),
}

fn parse_analytics(s: &str) -> Result<AnalyticsSink, String> {
    match s {
        "none" => Ok(AnalyticsSink::None),
        "stdout" => Ok(AnalyticsSink::Stdout),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(AnalyticsSink::File(PathBuf::from(p))),
            _ => Err(format!("{s:?}: expected none, stdout or file:PATH")),
        },
    }
}
