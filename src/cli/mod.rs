//! The `stemedb` command line: one subcommand per module.

pub mod admin;
pub mod backup;
pub mod serve;
pub mod wal;

use clap::{Parser, Subcommand};

use crate::config::DataArgs;

/// StemeDB: a database for knowledge that AI agents disagree about.
#[derive(Parser, Debug)]
#[command(name = "stemedb", version, about)]
pub struct Cli {
    /// Where data lives.
    #[command(flatten)]
    pub data: DataArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(crate::config::ServeArgs),
    /// Inspect the write-ahead log of a stopped server.
    #[command(subcommand)]
    Wal(wal::WalCommand),
    /// Projection rebuilds, status and verification.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Restore a data directory from an archive, to its latest state or to a
    /// point in time, and rebuild its projections.
    Restore(backup::RestoreArgs),
    /// Inspect and manage a shipped archive (`s3://bucket/prefix`).
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Load tools (run against a live server).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// Runs the parsed command; the exit code is the returned value.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::run(&cli.data, args),
        Command::Wal(cmd) => wal::run(&cli.data, cmd),
        Command::Admin(cmd) => admin::run(&cli.data, cmd),
        Command::Restore(args) => backup::restore(&cli.data, args),
        Command::Backup(cmd) => backup::backup(&cli.data, cmd),
        Command::Bench(cmd) => crate::bench::run(cmd),
    }
}
