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
pub mod park;
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
pub mod workers;

use std::sync::Arc;

use anyhow::Context;
pub use cli::{AnalyticsSink, Cli, Limits, LogFormat};
/// Request-path normalisation, shared with the plugin host (`request_set_path`).
pub use gatehouse_path as path;
use tokio::sync::watch;

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

/// Serves until SIGTERM or Ctrl-C, then drains. Called on worker 0's runtime (a
/// current-thread one: see `workers`); the other workers get threads of their own.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let n = cli.workers.map_or_else(workers::default_count, std::num::NonZeroUsize::get);
    workers::set_count(n);
    let bind = |addr: Option<std::net::SocketAddr>, flag: &str| match addr {
        Some(addr) => workers::listeners(addr, n).with_context(|| format!("{flag} {addr}")),
        None => Ok(Vec::new()),
    };
    if let (Some(plain), Some(tls)) = (cli.plain_listen(), cli.tls_listen) {
        // With SO_REUSEPORT both would bind, as one group, and clients of either protocol
        // would land on both listeners.
        let overlap = plain.port() == tls.port()
            && (plain.ip() == tls.ip() || plain.ip().is_unspecified() || tls.ip().is_unspecified());
        anyhow::ensure!(plain.port() == 0 || !overlap, "--tls-listen {tls}: the same address as --listen {plain}");
    }
    let (plain, secure) = (bind(cli.plain_listen(), "--listen")?, bind(cli.tls_listen, "--tls-listen")?);
    let admin = std::net::TcpListener::bind(cli.admin_listen)
        .with_context(|| format!("--admin-listen {}", cli.admin_listen))?;
    let local = |l: &[std::net::TcpListener]| l.first().and_then(|l| l.local_addr().ok());
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
    let parked = prometheus::IntGauge::new(
        "gatehouse_client_connections_parked",
        "Client connections open with no request for a second or more, holding no HTTP buffers",
    )?;
    gw.metrics.registry().register(Box::new(parked.clone()))?;
    let gauges = server::Gauges { open: open_connections, parked };

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
        workers = n,
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
        move |req, conn| gw.clone().handle(req, conn)
    };
    // One connection cap per listener address, shared by its workers.
    let caps = || Arc::new(tokio::sync::Semaphore::new(cli.limits.max_connections as usize));
    let (plain_cap, tls_cap) = (caps(), caps());
    let acceptor = tls::Acceptor::new(gw.certificates.clone())?;
    let serve_clients = {
        let (stop, limits) = (stop.clone(), cli.limits.clone());
        move |_: usize, (plain, secure): (Option<std::net::TcpListener>, Option<std::net::TcpListener>)| {
            let (handler, stop, limits, open) = (proxy_handler.clone(), stop.clone(), limits.clone(), gauges.clone());
            let listeners = [(plain, plain_cap.clone(), None), (secure, tls_cap.clone(), Some(acceptor.clone()))];
            async move {
                let mut servers = Vec::new();
                for (listener, cap, tls) in listeners {
                    let Some(listener) = listener else { continue };
                    let serving = server::serve(
                        listener,
                        handler.clone(),
                        stop.clone(),
                        limits.clone(),
                        cap,
                        Some(open.clone()),
                        tls,
                    );
                    servers.push(tokio::spawn(serving));
                }
                for s in servers {
                    let _ = s.await;
                }
            }
        }
    };
    let mut per_worker: Vec<_> = {
        let (mut plain, mut secure) = (plain.into_iter(), secure.into_iter());
        (0..n).map(|_| (plain.next(), secure.next())).collect()
    };
    let mine = per_worker.remove(0);
    let mut workers = workers::spawn(per_worker, serve_clients.clone()).context("--workers: starting the workers")?;
    tokio::spawn(workers.track(0, serve_clients(0, mine)));
    let admin_server = tokio::spawn(server::serve(
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
        caps(),
        None,
        None,
    ));

    // A worker stops serving only when told to, or when it failed: its listener is closed
    // then, and the process would serve on with fewer. Better to exit, and be restarted.
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        i = workers.stopped() => Some(i),
    };
    match failed {
        Some(i) => tracing::error!(worker = i, "a worker stopped serving; shutting down"),
        None => tracing::info!("shutting down: draining requests in flight"),
    }
    let _ = stop_tx.send(true);
    watcher.abort();
    if let Err(e) = admin_server.await {
        tracing::error!(error = %e, "the admin server failed");
    }
    workers.finish(cli.limits.drain_timeout + std::time::Duration::from_secs(1)).await;
    tracing::info!("stopped");
    match failed {
        Some(i) => anyhow::bail!("worker {i} stopped serving"),
        None => Ok(()),
    }
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
