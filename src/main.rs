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
