//! The `stemedb` binary: parses the command line and runs a subcommand.

use clap::Parser;

fn main() {
    let cli = stemedb::cli::Cli::parse();
    match stemedb::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// glibc malloc profiled as ~15% of ingest CPU (many small JSON and
/// B-tree allocations across threads); mimalloc's thread-local free lists
/// remove most of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
