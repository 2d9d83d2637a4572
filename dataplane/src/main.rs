//! `gatehouse-dataplane`: parses flags and hands over to the library.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = gatehouse_dataplane::Cli::parse();
    gatehouse_dataplane::init_logging(cli.log_format);
    // TOKIO_WORKER_THREADS sets the worker count; by default one per core.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(gatehouse_dataplane::run(cli))
}
