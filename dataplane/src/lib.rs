//! The Gatehouse dataplane: a reverse proxy whose middleware chain runs authentication,
//! limits and native plugins in front of upstream services.
//!
//! `run` wires the pieces: config source → [`gateway::Gateway`] → [`server`] for clients
//! and for the admin port. The chain itself reads top to bottom in [`chain`].
// `unsafe` lives in the plugin host (`gatehouse_plugin_host`), never here.
#![forbid(unsafe_code)]

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod body;
pub mod chain;
mod cli;
pub mod client_auth;
pub mod config_thread;
pub mod connect;
pub mod egress;
pub mod endpoints;
pub mod gateway;
pub mod key_id;
pub mod limits;
pub mod metrics;
pub mod middleware;
pub mod model;
pub mod pool;
pub mod proxy;
pub mod reply;
pub mod router;
pub mod runtime;
pub mod server;
pub mod slots;
pub mod standalone;
pub mod subscriber;
pub mod tls;
pub mod tunnel;

use std::sync::Arc;

use anyhow::Context;
pub use cli::{AnalyticsSink, Cli, Limits, LogFormat};
/// Request-path normalisation, shared with the plugin host (`request_set_path`).
pub use gatehouse_path as path;
use tokio::{net::TcpListener, sync::watch};

use crate::{analytics::Analytics, gateway::Gateway, metrics::Metrics, standalone::Standalone, subscriber::Subscriber};

/// Where config comes from.
enum Source {
    Standalone(Standalone),
    Controller(Box<Subscriber>),
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // rustls warns about what a client sent (an IP address as SNI, say) once per
    // handshake: a line any client can make the gateway write as fast as it can connect.
    let filter = match "rustls::msgs=error".parse() {
        Ok(quiet) if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) => filter.add_directive(quiet),
        _ => filter,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let plain = match cli.plain_listen() {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--listen {addr}"))?),
        None => None,
    };
    let secure = match cli.tls_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--tls-listen {addr}"))?),
        None => None,
    };
    let admin =
        TcpListener::bind(cli.admin_listen).await.with_context(|| format!("--admin-listen {}", cli.admin_listen))?;
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (plain_addr, tls_addr) = (local(&plain), local(&secure));
    let metrics = Metrics::new();
    let analytics = Analytics::start(&cli.analytics, metrics.analytics_dropped.clone()).await?;
    let key_ids = key_id::KeyIdSecret::load(cli.key_id_secret_file.as_deref(), &cli.state_dir)?;
    let loader =
        gatehouse_plugin_host::Loader::new(cli.plugin_dir.clone()).with_go_runtimes(cli.dev_go_runtimes.into());
    let counters = counters(&cli, &metrics).await?;
    let gw = Arc::new(
        Gateway::new(metrics, analytics, loader, key_ids)
            .context("starting the config thread")?
            .with_limits(&cli.limits)
            .with_redirect_port(cli.redirect_port(tls_addr.map(|a| a.port())))
            .with_counters(counters),
    );
    let open_connections = prometheus::IntGauge::new("gatehouse_client_connections", "Client connections open now")?;
    gw.metrics.registry().register(Box::new(open_connections.clone()))?;

    let source = match (&cli.config, &cli.controller) {
        (Some(path), _) => Source::Standalone(Standalone::new(path.clone())?),
        (None, Some(url)) => Source::Controller(Box::new(Subscriber::new(url, &cli)?)),
        (None, None) => anyhow::bail!("one of --config or --controller is required"),
    };
    // Before any config is applied: runtimes refuse upstreams by this policy.
    let own = plain_addr.into_iter().chain(tls_addr).chain([admin.local_addr()?]).collect();
    egress::install(egress::EgressPolicy::new(&cli.allow_upstream, own));
    let from =
        cli.config.as_ref().map_or_else(|| cli.controller.clone().unwrap_or_default(), |p| p.display().to_string());
    let shown = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "none".to_owned(), |a| a.to_string());
    tracing::info!(
        listen = %shown(plain_addr),
        tls_listen = %shown(tls_addr),
        admin = %admin.local_addr()?,
        config = %from,
        "gatehouse dataplane starting"
    );

    let (stop_tx, stop) = watch::channel(false);
    let watcher = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let result = match source {
                Source::Standalone(s) => s.run(gw).await,
                Source::Controller(s) => {
                    s.run(gw).await;
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "config watcher stopped; serving the last applied config");
            }
        })
    };
    let proxy_handler = {
        let gw = gw.clone();
        move |req, conn| {
            let gw = gw.clone();
            async move { gw.handle(req, conn).await }
        }
    };
    let mut servers = Vec::new();
    for (listener, tls) in [(plain, None), (secure, Some(tls::Acceptor::new(gw.certificates.clone())?))] {
        let Some(listener) = listener else { continue };
        servers.push(tokio::spawn(server::serve(
            listener,
            proxy_handler.clone(),
            stop.clone(),
            cli.limits.clone(),
            Some(open_connections.clone()),
            tls,
        )));
    }
    servers.push(tokio::spawn(server::serve(
        admin,
        {
            let gw = gw.clone();
            let access = admin::ConfigAccess::from_flag(cli.expose_config);
            move |req, conn: server::Conn| {
                let gw = gw.clone();
                async move { admin::serve(&gw, &req, conn.peer, access) }
            }
        },
        stop,
        cli.limits.clone(),
        None,
        None,
    )));

    shutdown_signal().await;
    tracing::info!("shutting down: draining requests in flight");
    let _ = stop_tx.send(true);
    watcher.abort();
    for s in servers {
        let _ = s.await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn counters(cli: &Cli, metrics: &Metrics) -> anyhow::Result<limits::Counters> {
    let c = &cli.counters;
    if c.is_memory() {
        tracing::info!("rate limits and quotas are counted per dataplane (--counters memory)");
        return Ok(limits::Counters::default());
    }
    // Keys are counted under their keyed id: replicas with different secrets would count
    // one key under different names, each allowing the whole limit.
    anyhow::ensure!(
        cli.key_id_secret_file.is_some(),
        "--counters redis needs --key-id-secret-file: every replica sharing the counters must name keys with the same secret"
    );
    let ca = match &c.ca_file {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("--counters-ca-file {}", path.display()))?)
        }
        None => None,
    };
    let counters =
        limits::Counters::redis(&c.url, c.timeout, c.failure, ca.as_deref(), metrics.counter_store()).await?;
    tracing::info!(failure = ?c.failure, timeout = ?c.timeout, "rate limits and quotas are counted in Redis, shared by every replica using it");
    Ok(counters)
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
