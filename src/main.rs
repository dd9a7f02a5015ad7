//! The `stemedb` binary: parses the command line and runs a subcommand.

use clap::{CommandFactory, FromArgMatches};

fn main() {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match stemedb::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Parses arguments; a bad value that came from an environment variable
/// is reported with the variable's name, since that is what the operator
/// has to fix (clap alone names only the flag).
fn parse() -> Result<stemedb::cli::Cli, clap::Error> {
    let mut cmd = stemedb::cli::Cli::command();
    let matches = cmd.try_get_matches_from_mut(std::env::args_os()).map_err(|e| name_env_var(&mut cmd, e))?;
    stemedb::cli::Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

fn name_env_var(cmd: &mut clap::Command, e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else { return e };
    let arg = arg.clone();
    let mut found = None;
    let mut visit = |c: &clap::Command| {
        for a in c.get_arguments() {
            if let (Some(long), Some(env)) = (a.get_long(), a.get_env())
                && (arg.starts_with(&format!("--{long} ")) || arg == format!("--{long}"))
            {
                let env = env.to_string_lossy().into_owned();
                if std::env::var_os(&env).is_some() {
                    found = Some(env);
                }
            }
        }
    };
    visit(cmd);
    for sub in cmd.get_subcommands() {
        visit(sub);
    }
    match found {
        Some(env) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid value").trim_start_matches("error: ").to_string();
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{env}: {first}\n")).format(cmd)
        }
        None => e,
    }
}

/// glibc malloc profiled as ~15% of ingest CPU (many small JSON and
/// B-tree allocations across threads); mimalloc's thread-local free lists
/// remove most of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
