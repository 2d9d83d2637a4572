//! `gatehouse-dataplane`: parses flags and hands over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

// jemalloc, not glibc's malloc: its size classes keep the small allocations a parked
// connection holds apart from the request buffers freed around them, and its background
// thread gives pages freed for ~10 s (`dirty_decay_ms`) back to the kernel, so resident
// memory follows what connections hold. With glibc, the buffers of thousands of connections
// that had parked stayed resident, pinned by small allocations between them
// (docs/BENCHMARKS.md, "Memory per open connection").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = gatehouse_dataplane::Cli::parse();
    gatehouse_dataplane::init_logging(cli.log_format);
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "the allocator's background purging did not start: freed memory goes back to the kernel only while requests allocate");
    }
    // Worker 0's runtime; `run` starts the others (`workers`).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(gatehouse_dataplane::run(cli));
    // `run` has drained within --drain-timeout; blocking work still running (a file read,
    // an analytics write) must not hold the process past it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
