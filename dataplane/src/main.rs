//! `gatehouse-dataplane`: parses flags and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = gatehouse_dataplane::Cli::parse();
    gatehouse_dataplane::init_logging(cli.log_format);
    // TOKIO_WORKER_THREADS sets the worker count; by default one per core.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(gatehouse_dataplane::run(cli));
    // `run` has drained within --drain-timeout; blocking work still running (a file read,
    // an analytics write) must not hold the process past it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
