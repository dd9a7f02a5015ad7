//! `stemedb wal verify` and `stemedb wal dump`: offline tools for a stopped
//! server's log.

use std::io::Write;

use clap::Subcommand;
use serde_json::json;

use crate::config::DataArgs;
use crate::model::time;
use crate::wal::{WalReader, verify};

/// WAL subcommands.
#[derive(Subcommand, Debug)]
pub enum WalCommand {
    /// Check every frame, checksum and position; exit 0 if sound, 1 if not.
    Verify,
    /// Print events as JSON lines: position, recorded_at, event.
    Dump {
        /// First position to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Most events to print.
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// Runs a WAL subcommand.
pub fn run(data: &DataArgs, cmd: WalCommand) -> anyhow::Result<i32> {
    let dir = data.wal_dir();
    match cmd {
        WalCommand::Verify => match verify::verify(&dir) {
            Ok(report) => {
                println!("{}", serde_json::to_string(&json!({"status": "ok", "wal_dir": dir, "report": report}))?);
                Ok(0)
            }
            Err(e) => {
                println!("{}", serde_json::to_string(&json!({"status": "corrupt", "wal_dir": dir, "error": e.to_string()}))?);
                eprintln!("WAL verification failed: {e}");
                Ok(1)
            }
        },
        WalCommand::Dump { from, limit } => {
            if !dir.exists() {
                anyhow::bail!("no WAL directory at {}", dir.display());
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut reader = WalReader::open(&dir, from)?;
            let mut n = 0;
            while limit.is_none_or(|l| n < l) {
                let Some(rec) = reader.next_record()? else { break };
                let line = json!({"position": rec.position, "recorded_at": time::format(&rec.recorded_at), "event": rec.event});
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
                n += 1;
            }
            out.flush()?;
            Ok(0)
        }
    }
}
