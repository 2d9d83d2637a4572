//! `gatehouse-dataplane`: parses flags and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = gatehouse_dataplane::Cli::parse();
    gatehouse_dataplane::init_logging(cli.log_format);
    // Worker 0's runtime; `run` starts the others (`workers`).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(gatehouse_dataplane::run(cli));
    // `run` has drained within --drain-timeout; blocking work still running (a file read,
    // an analytics write) must not hold the process past it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
