//! Command-line flags, as DESIGN.md names them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{egress::AllowUpstream, limits::FailurePolicy};

#[derive(Parser, Debug, Clone)]
#[command(name = "gatehouse-dataplane", version, about = "The Gatehouse API gateway dataplane")]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "controller"])))]
pub struct Cli {
    /// Address the gateway serves clients on (HTTP/1.1 and HTTP/2 cleartext). Default
    /// `0.0.0.0:8080`, unless only `--tls-listen` is given: then no plain-HTTP listener.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address the gateway serves clients on over TLS (1.3 and 1.2; ALPN h2 and
    /// http/1.1), with certificates from `kubernetes.io/tls` Secrets chosen by SNI.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// The port `spec.tls.redirectHttp` redirects send clients to. Default: the port of
    /// `--tls-listen` (443 without it). Set it when a Service or load balancer maps
    /// another port (usually 443) to `--tls-listen`. 443 is left out of the URL.
    #[arg(long, value_name = "PORT")]
    pub tls_redirect_port: Option<u16>,
    /// Address of the admin port: /metrics, /healthz, /readyz, /config.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Standalone mode: a YAML file, or a directory of YAML files, holding ApiDefinition,
    /// Plugin and key Secret manifests. Watched: changes are applied without a restart.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: the controller's config stream, e.g.
    /// `https://gatehouse-controller.gatehouse.svc:9443`. Certificates reach the dataplane
    /// only over `https://`; over `http://` they are refused.
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// PEM CA the controller's certificate must chain to (read again on every connection);
    /// without it, the system's roots. A controller that cannot be verified gets no
    /// connection: no config is taken from it.
    #[arg(long, value_name = "PATH", requires = "controller")]
    pub controller_ca_file: Option<PathBuf>,
    /// The name the controller's certificate must carry, when it is not the URL's host.
    #[arg(long, value_name = "NAME", requires = "controller")]
    pub controller_server_name: Option<String>,
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
    /// Where plugin libraries are copied, by content hash, before loading. Created 0700 if
    /// missing; refused if another user owns it or others can write it. In a pod, a
    /// directory under an emptyDir (the gateway creates it).
    #[arg(long, value_name = "DIR", default_value = "/tmp/gatehouse/plugins")]
    pub plugin_dir: PathBuf,
    /// Development only: how many Go plugin libraries (each with its own Go runtime) this
    /// process may load, so a rebuilt Go bundle can be reloaded without a restart. Go
    /// supports one runtime per process and never frees one: each reload keeps 5-11 MB and
    /// a few threads, and past about 40 the dynamic loader fails. In production keep 1 and
    /// roll out a new bundle by restarting the dataplane.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub dev_go_runtimes: u16,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads serving clients, each with its own listener on `--listen` and
    /// `--tls-listen` (the kernel spreads connections over them) and its own idle upstream
    /// connections. Default: one per CPU this process may use (its CPU quota included).
    #[arg(long, env = "GATEHOUSE_WORKERS", value_name = "N", value_parser = parse_workers)]
    pub workers: Option<std::num::NonZeroUsize>,
    #[command(flatten)]
    pub limits: Limits,
    /// Upstream addresses to allow that are refused by default, comma-separated:
    /// `link-local` (169.254.0.0/16 and fe80::/10, where cloud metadata services answer)
    /// and `self` (this gateway's own --listen and --admin-listen addresses).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "KIND")]
    pub allow_upstream: Vec<AllowUpstream>,
    /// Serve /config (every namespace's APIs and their state) to clients that are not on
    /// loopback. Without it, only loopback clients get /config; /metrics, /healthz and
    /// /readyz answer everyone.
    #[arg(long)]
    pub expose_config: bool,
    /// A file holding the secret (at least 16 bytes) that keys analytics' key ids:
    /// HMAC-SHA256 of each key's hash. Without it, one is generated once and kept in
    /// `--state-dir` as `key-id-secret`. Replicas that share analytics should share it.
    #[arg(long, value_name = "PATH", env = "GATEHOUSE_KEY_ID_SECRET_FILE")]
    pub key_id_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub counters: CounterArgs,
}

/// Where rate limits and quotas are counted.
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Counters")]
pub struct CounterArgs {
    /// `memory`: each dataplane counts alone, so with N replicas a limit lets N times as
    /// much through. Or a Redis/Valkey URL that every replica shares, which makes limits and
    /// quotas exact across replicas: `redis://[user:password@]host:port[/db]`, `rediss://`
    /// for TLS, `redis-cluster://host:port?node=host:port`, or
    /// `redis-sentinel://host:port/db?sentinelServiceName=NAME&node=host:port`. Read from
    /// the environment too, so the password can come from a Secret. Replicas sharing Redis
    /// must share `--key-id-secret-file`: keys are counted under their keyed id.
    #[arg(
        long = "counters",
        env = "GATEHOUSE_COUNTERS",
        hide_env_values = true,
        value_name = "memory|URL",
        default_value = "memory"
    )]
    pub url: String,
    /// What a limited request gets while Redis cannot answer within `--counters-timeout`:
    /// `open` lets it through uncounted (an outage of the counter store is not an outage
    /// of every limited API), `closed` answers 503. A metric and a log line (at most one
    /// every 10 s) say so either way; the gateway reconnects by itself.
    #[arg(long = "counters-failure", value_enum, value_name = "POLICY", default_value_t = FailurePolicy::Open)]
    pub failure: FailurePolicy,
    /// Longest one limit check may wait for Redis before the failure policy applies.
    /// 100 ms: a Redis next to the gateway answers in well under a millisecond; a check
    /// this slow means it is down or overloaded.
    #[arg(long = "counters-timeout", value_name = "DURATION", default_value = "100ms", value_parser = parse_positive)]
    pub timeout: Duration,
    /// PEM CA certificates a `rediss://` server's certificate must chain to, instead of the
    /// system's (a Redis with a private CA).
    #[arg(long = "counters-ca-file", env = "GATEHOUSE_COUNTERS_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl CounterArgs {
    pub fn is_memory(&self) -> bool {
        self.url == "memory"
    }
}

impl std::fmt::Debug for CounterArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        let store = if self.is_memory() { "memory" } else { "redis" };
        f.debug_struct("CounterArgs")
            .field("store", &store)
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The plain-HTTP listener when none is named: none if TLS alone was asked for.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

impl Cli {
    /// `--listen`, its default, or None when only `--tls-listen` is given.
    pub fn plain_listen(&self) -> Option<SocketAddr> {
        match (self.listen, self.tls_listen) {
            (Some(a), _) => Some(a),
            (None, None) => Some(DEFAULT_LISTEN),
            (None, Some(_)) => None,
        }
    }

    /// Where `spec.tls.redirectHttp` sends plain-HTTP clients, given the port
    /// `--tls-listen` is bound to.
    pub fn redirect_port(&self, tls_bound: Option<u16>) -> u16 {
        self.tls_redirect_port.or(tls_bound).unwrap_or(443)
    }
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

/// Every client-facing wait and buffer has a bound (DESIGN.md); these are they. Durations
/// take the Gateway API form (`500ms`, `10s`, `1m`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Limits")]
pub struct Limits {
    /// Longest a new connection may take to start its first request, and (HTTP/1.1) how
    /// long a keep-alive connection may wait for its next request to start: it is closed
    /// after between one and two of these (or of `--idle-timeout`, if shorter) with no
    /// request in flight, none started and nothing written. Bytes of an unfinished head
    /// do not count, so clients that stop mid-header (slowloris) cannot pile up. 10 s is
    /// ample for any real client over a slow link.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive)]
    pub header_read_timeout: Duration,
    /// A client connection with no request (HTTP/2: stream) in flight and no byte moving
    /// either way for between one and two of these is closed. 60 s outlives the keep-alive
    /// timeouts of common clients and load balancers' reuse windows, so they close first.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_positive)]
    pub idle_timeout: Duration,
    /// Client connections served at once. Past it the gateway stops accepting: new
    /// connections wait in the listen backlog until one closes, and connections already
    /// open keep being served. 10,000 keeps a 512 MiB pod well within memory and file
    /// descriptors; raise it with the pod's limits.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Largest request head (request line and headers, in bytes) on HTTP/1.1, and largest
    /// header list (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE); larger gets 431. 64 KiB is what
    /// Envoy allows and well above what browsers and API clients send.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// Most header fields in one HTTP/1.1 request; more gets 431. 100, as in Envoy and
    /// hyper: another value costs a heap allocation per request.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_headers: u32,
    /// Concurrent streams a client may open on one HTTP/2 connection (advertised in
    /// SETTINGS). 100 is the floor RFC 9113 recommends and what most servers use.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: u32,
    /// Streams an HTTP/2 client may open and reset before the gateway accepted them (the
    /// "rapid reset" attack, CVE-2023-44487); past it the connection ends with GOAWAY
    /// ENHANCE_YOUR_CALM. 20, hyper's default: honest clients never come close.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub http2_max_pending_accept_reset_streams: usize,
    /// Streams the gateway may reset because of a client's protocol errors on one HTTP/2
    /// connection before it ends the connection with GOAWAY. 1024, hyper's default.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub http2_max_local_error_reset_streams: usize,
    /// How long SIGTERM waits for requests in flight before closing what is left. 30 s
    /// fits the chart: 5 s preStop + 30 s drain ends well before the kubelet's SIGKILL at
    /// terminationGracePeriodSeconds (45 s).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Longest a TCP connect to an upstream may take, apart from `upstream.timeout` (which
    /// bounds the wait for the response headers). 5 s: a healthy target on the cluster
    /// network connects in milliseconds; one that does not answer SYNs should fail fast.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_positive)]
    pub upstream_connect_timeout: Duration,
    /// Requests in flight to one upstream target (host:port), and so connections open to
    /// it, across all APIs. Past it requests wait for a free slot up to their API's
    /// `upstream.timeout`, then get 503. 0 = no cap. 1024, as Envoy's circuit breaker.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub upstream_max_connections_per_target: u32,
    /// Largest body one request (or upstream response) may have when a plugin reads it
    /// whole; larger gets 413. 16 MiB.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_buffered_body_bytes: usize,
    /// Bytes of bodies held in memory for plugins across all requests at once, reserved as
    /// they arrive and freed when the request ends; a request that would pass it gets 503.
    /// 256 MiB: half of the chart's 512 MiB memory limit.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024 * 1024)]
    pub buffered_body_budget_bytes: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<gatehouse_crds::Duration>().map(|d| d.as_std()).map_err(|e| e.to_string())
}

fn parse_positive(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be more than zero")),
        d => Ok(d),
    }
}

/// 1 to 1024: past that it is a mistake, not a machine.
fn parse_workers(s: &str) -> Result<std::num::NonZeroUsize, String> {
    let n: usize = s.parse().map_err(|e| format!("not a number: {e}"))?;
    std::num::NonZeroUsize::new(n).filter(|n| n.get() <= 1024).ok_or_else(|| "must be between 1 and 1024".to_owned())
}
