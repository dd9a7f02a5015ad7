//! `stemedb serve`: wires the write path and the HTTP API together and
//! handles signals.

use anyhow::Context;

use crate::config::{DataArgs, ServeArgs, WalSync};
use crate::http::{self, AppState};
use crate::ingest::{Ingest, IngestOptions};
use crate::model::parse::ParseOptions;
use crate::projection::read_side::ReadSide;
use crate::wal::WriterOptions;

/// Starts the server and blocks until SIGTERM/SIGINT and a clean shutdown.
pub fn run(data: &DataArgs, args: ServeArgs) -> anyhow::Result<i32> {
    crate::telemetry::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(data, args))?;
    Ok(0)
}

async fn serve(data: &DataArgs, args: ServeArgs) -> anyhow::Result<()> {
    let metrics = crate::telemetry::init_metrics()?;
    if args.wal_sync == WalSync::Never {
        tracing::warn!(
            "STEMEDB_WAL_SYNC=never: writes are acknowledged WITHOUT fdatasync; a power loss or kernel crash loses acknowledged data. Use only for benchmarks."
        );
    }
    let ingest = Ingest::start(IngestOptions {
        wal_dir: data.wal_dir(),
        index_path: data.id_index_path(),
        writer: WriterOptions { segment_bytes: args.wal_segment_bytes, sync: args.wal_sync.into() },
        queue_depth: 16_384,
        max_group_events: 65_536,
    })
    .with_context(|| format!("cannot open the data directory {}", data.data_dir.display()))?;
    let defs = crate::lens::Definitions::load(args.projections_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid lens definitions (STEMEDB_PROJECTIONS_DIR): {e}"))?;
    let search_def = crate::projection::search::SearchDefinition::load(args.projections_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid search definition (STEMEDB_PROJECTIONS_DIR): {e}"))?;
    let read = std::sync::Arc::new(
        ReadSide::start_with(&data.db_dir(), &data.wal_dir(), &ingest, defs, search_def)
            .context("cannot open the projections (STEMEDB_DB_DIR)")?,
    );
    let listener =
        tokio::net::TcpListener::bind(args.bind).await.with_context(|| format!("cannot listen on {} (STEMEDB_BIND_ADDR)", args.bind))?;
    tracing::info!(addr = %listener.local_addr()?, data_dir = %data.data_dir.display(), position = ingest.committed_position(), "StemeDB listening");
    let state = AppState {
        ingest: ingest.clone(),
        parse_options: ParseOptions { require_signatures: args.require_signatures },
        metrics,
        read: read.clone(),
        ready_max_lag: args.ready_max_lag,
        admin_enabled: args.admin_enabled || args.bind.ip().is_loopback(),
    };
    let stale: Vec<String> =
        crate::projection::read_side::PROJECTIONS.iter().filter(|p| read.stale(p).is_some()).map(|p| p.to_string()).collect();
    if !stale.is_empty() {
        if args.auto_rebuild {
            match read.start_rebuild(&stale) {
                Ok(job) => tracing::info!(job = %job.id, projections = ?stale, "STEMEDB_AUTO_REBUILD: rebuilding stale projections online"),
                Err(e) => tracing::error!(error = %e, "could not start the automatic rebuild"),
            }
        } else {
            tracing::warn!(projections = ?stale, "stale projections are not served; run `stemedb admin rebuild-projections` or set STEMEDB_AUTO_REBUILD=true");
        }
    }
    http::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("HTTP server stopped; finishing queued commits");
    ingest.shutdown().await;
    // Workers apply what the committer made durable, then exit.
    let r = read.clone();
    tokio::task::spawn_blocking(move || r.join()).await?;
    tracing::info!(position = ingest.committed_position(), "shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; no longer accepting connections");
}
