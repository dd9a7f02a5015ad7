//! Load tools (`stemedb bench ...`): measure a live server from outside,
//! over HTTP on loopback, the way a client would see it.
//!
//! Timed limits never live in tests; they live here and in `benches/`, and
//! the results go to `docs/performance.md`.

pub mod conn;
pub mod data;
pub mod ingest;
pub mod lag;
pub mod query;
pub mod report;
pub mod search;

use clap::Subcommand;

/// Bench subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Write throughput and acknowledgement latency.
    Ingest(ingest::IngestArgs),
    /// Lens read throughput and latency over a loaded dataset.
    Query(query::QueryArgs),
    /// Write → visible latency at a steady write rate.
    Lag(lag::LagArgs),
    /// Search indexing throughput and search latency over a generated dataset.
    Search(search::SearchArgs),
}

/// Runs a bench subcommand.
pub fn run(cmd: BenchCommand) -> anyhow::Result<i32> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    match &cmd {
        BenchCommand::Query(args) => rt.worker_threads(args.threads.max(1)),
        BenchCommand::Search(args) => rt.worker_threads(args.threads.max(1)),
        _ => &mut rt,
    };
    let rt = rt.enable_all().build()?;
    match cmd {
        BenchCommand::Ingest(args) => rt.block_on(ingest::run(args)),
        BenchCommand::Query(args) => rt.block_on(query::run(args)),
        BenchCommand::Lag(args) => rt.block_on(lag::run(args)),
        BenchCommand::Search(args) => rt.block_on(search::run(args)),
    }
}
