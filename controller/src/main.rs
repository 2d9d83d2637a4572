//! `gatehouse-controller`: flags, then the watchers, the config server, leader election and
//! the status writer, side by side.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use gatehouse_controller::{
    acks::Acks,
    auth::Authenticator,
    compile::SecretScope,
    hub::Hub,
    leader::{Elector, Leadership},
    metrics::Metrics,
    server::{self, ConfigServer, Forwarding},
    status::StatusWriter,
    tls::{self, ServingCertificate},
    watch::{self, State, lock},
};
use tokio::{net::TcpListener, sync::watch as channel};

#[derive(Parser, Debug)]
#[command(
    name = "gatehouse-controller",
    version,
    about = "Compiles Gatehouse resources and streams them to dataplanes"
)]
struct Cli {
    /// Where dataplanes connect for config (`/v1/stream`, `/v1/ack`).
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8081")]
    admin_listen: SocketAddr,
    /// Watch only this namespace; repeatable (or comma-separated) for several; all
    /// namespaces when unset.
    #[arg(long, value_delimiter = ',')]
    namespace: Vec<String>,
    /// ServiceAccount (`namespace:name`) whose tokens may receive config; repeatable.
    #[arg(long = "allowed-service-account", value_name = "NAMESPACE:NAME", required = true)]
    allowed: Vec<String>,
    /// The audience dataplane tokens must be issued for.
    #[arg(long, default_value = "gatehouse")]
    token_audience: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "gatehouse-controller")]
    lease_name: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// `host:port` other replicas reach this one at, to forward acks to the leader.
    #[arg(long, env = "GATEHOUSE_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// PEM certificate to serve the config stream with over TLS (with `--tls-key-file`);
    /// read again when the file changes. Without it the stream is plaintext, and
    /// certificates (`spec.tls`, Secrets `spec.upstream.tls` names) never reach dataplanes.
    #[arg(long, value_name = "PATH", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file`.
    #[arg(long, value_name = "PATH", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA the serving certificate chains to: acks forwarded to the leader check its
    /// certificate against it (and against the first DNS name of our own).
    #[arg(long, value_name = "PATH", requires = "tls_cert_file")]
    tls_ca_file: Option<PathBuf>,
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    for sa in &cli.allowed {
        anyhow::ensure!(
            sa.split_once(':').is_some_and(|(n, s)| !n.is_empty() && !s.is_empty()),
            "--allowed-service-account {sa:?}: expected NAMESPACE:NAME"
        );
    }
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let identity = cli.identity.clone().unwrap_or_else(|| format!("gatehouse-controller-{}", std::process::id()));
    let listener = TcpListener::bind(cli.listen).await.with_context(|| format!("--listen {}", cli.listen))?;
    let admin =
        TcpListener::bind(cli.admin_listen).await.with_context(|| format!("--admin-listen {}", cli.admin_listen))?;
    let address = cli
        .advertise_address
        .clone()
        .unwrap_or_else(|| listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    tracing::info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, %identity, %address, "gatehouse controller starting");

    let serving = match (&cli.tls_cert_file, &cli.tls_key_file) {
        (Some(c), Some(k)) => Some(ServingCertificate::load(c, k).context("--tls-cert-file/--tls-key-file")?),
        _ => None,
    };
    let acceptor = match &serving {
        Some(s) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(s.clone())?)),
        None => {
            tracing::warn!(
                "the config stream is plaintext: certificates are not sent to dataplanes; give --tls-cert-file and --tls-key-file"
            );
            None
        }
    };
    let forwarding = match (&serving, &cli.tls_ca_file) {
        (None, _) => Forwarding::plain(),
        (Some(s), ca) => {
            let names = s.dns_names();
            let name = names.first().context("--tls-cert-file: the certificate has no DNS name")?;
            let ca = ca
                .as_deref()
                .context("--tls-ca-file is required with --tls-cert-file, to forward acks to the leader")?;
            Forwarding::Tls(tls::forward_client(ca, name)?)
        }
    };

    let metrics = Arc::new(Metrics::new());
    let state = State::default();
    if serving.is_some() {
        lock(&state).resources.secret_scope = Some(SecretScope { default_namespace: cli.lease_namespace.clone() });
    }
    let hub = Arc::new(Hub::new());
    let acks = Arc::new(Acks::default());
    let (lead_tx, lead_rx) = channel::channel(Leadership::default());

    tokio::spawn(watch::run(client.clone(), cli.namespace.clone(), state.clone(), hub.clone(), metrics.clone()));
    let elector = Elector::new(client.clone(), &cli.lease_namespace, &cli.lease_name, &identity, &address);
    let election = tokio::spawn(elector.run(lead_tx));
    tokio::spawn(
        StatusWriter::new(client.clone(), state.clone(), acks.clone(), metrics.clone(), &identity).run(lead_rx.clone()),
    );

    let (forward, queue) = tokio::sync::mpsc::channel(4096);
    tokio::spawn(server::forwarder(queue, forwarding));
    let config = Arc::new(ConfigServer {
        hub,
        acks,
        auth: Authenticator::new(
            client.clone(),
            cli.token_audience.clone(),
            &cli.allowed,
            metrics.token_reviews.clone(),
        ),
        metrics: metrics.clone(),
        leadership: lead_rx,
        address: address.clone(),
        forward,
    });
    tokio::spawn(server::serve(listener, acceptor, move |req, peer| config.clone().handle(req, peer)));
    let (st, m) = (state.clone(), metrics.clone());
    tokio::spawn(server::serve(admin, None, move |req, _| {
        let r = server::admin(&st, &m, &req);
        async move { r }
    }));

    shutdown_signal().await;
    tracing::info!("shutting down; giving up the lease");
    election.abort();
    Elector::new(client, &cli.lease_namespace, &cli.lease_name, &identity, &address).release().await;
    Ok(())
}

fn init_logging(format: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" { b.json().init() } else { b.init() }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
