//! `stemedb serve`: wires the write path and the HTTP API together and
//! handles signals.

use anyhow::Context;

use crate::archive::Remote;
use crate::archive::follower::{self, FollowConfig, Follower};
use crate::archive::shipper::{ShipConfig, Shipper};
use crate::config::{DataArgs, ServeArgs, WalSync};
use crate::http::readiness::{self, Readiness};
use crate::http::{self, AppState, Role};
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
    crate::projection::tune_stores(crate::projection::StoreTuning {
        cache_bytes: usize::try_from(args.store_cache_mb).unwrap_or(usize::MAX / 2).saturating_mul(1024 * 1024),
        sync_interval: args.projection_sync_interval,
    });
    if let Some(url) = args.follow.clone() {
        return follow(data, args, &url, metrics).await;
    }
    if let Some(url) = follower::following(&data.data_dir) {
        anyhow::bail!(
            "{} is a follower's data directory (it follows {url}); start it with --follow {url} (STEMEDB_FOLLOW), \
             or promote it to a writer as docs/operations/backup-and-restore.md describes",
            data.data_dir.display()
        );
    }
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
    let shipper = match &args.s3_url {
        None => None,
        Some(url) => {
            let remote = Remote::connect(&args.s3.remote(url)).context("STEMEDB_S3_URL")?;
            let cfg = ShipConfig { remote, wal_dir: data.wal_dir(), interval: args.s3_ship_interval };
            match Shipper::start(cfg, ingest.clone()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    ingest.shutdown().await;
                    return Err(anyhow::anyhow!("cannot ship the WAL to {url}: {e}"));
                }
            }
        }
    };
    let read = std::sync::Arc::new(open_read_side(data, &args, ingest.feed(&data.wal_dir()))?);
    let state = app_state(&args, Role::Writer(ingest.clone()), shipper.as_ref().map(|s| s.status.clone()), metrics, read.clone());
    listen_and_serve(data, &args, state).await?;
    tracing::info!("HTTP server stopped; finishing queued commits");
    if let Some(s) = shipper {
        // Everything acknowledged is committed now: seal and ship it, so a
        // clean stop loses nothing even if this machine never comes back.
        s.finish(std::time::Duration::from_secs(20)).await;
    }
    ingest.shutdown().await;
    // Workers apply what the committer made durable, then exit.
    let r = read.clone();
    tokio::task::spawn_blocking(move || r.join()).await?;
    tracing::info!(position = ingest.committed_position(), "shut down cleanly");
    Ok(())
}

/// A read-only node: download the archive's log, project it, serve reads.
async fn follow(data: &DataArgs, args: ServeArgs, url: &str, metrics: metrics_exporter_prometheus::PrometheusHandle) -> anyhow::Result<()> {
    let remote = Remote::connect(&args.s3.remote(url)).context("STEMEDB_FOLLOW")?;
    let cfg = FollowConfig { remote, data_dir: data.data_dir.clone(), wal_dir: data.wal_dir(), poll: args.follow_poll_interval };
    let follower = Follower::start(cfg).await.with_context(|| format!("cannot follow {url}"))?;
    let read = std::sync::Arc::new(open_read_side(data, &args, follower.feed())?);
    let state = app_state(&args, Role::Follower(follower.status.clone()), None, metrics, read.clone());
    listen_and_serve(data, &args, state).await?;
    follower.shutdown().await;
    let r = read.clone();
    tokio::task::spawn_blocking(move || r.join()).await?;
    tracing::info!("follower shut down cleanly");
    Ok(())
}

fn app_state(
    args: &ServeArgs,
    role: Role,
    shipping: Option<std::sync::Arc<crate::archive::shipper::ShipStatus>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    read: std::sync::Arc<ReadSide>,
) -> AppState {
    let state = AppState {
        role,
        shipping,
        parse_options: ParseOptions { require_signatures: args.require_signatures },
        metrics,
        read,
        readiness: std::sync::Arc::new(Readiness::new(args.ready_max_lag, args.ready_max_delay)),
        admin_enabled: args.admin_enabled || args.bind.ip().is_loopback(),
        follow_max_silence: args.follow_max_silence,
        search_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(search_threads(args.search_threads))),
    };
    tokio::spawn(sample_head(state.clone()));
    state
}

/// Feeds readiness the head every [`readiness::SAMPLE_EVERY`], for as long
/// as the runtime runs (its answer needs the heads of the last delay).
async fn sample_head(state: AppState) {
    let mut tick = tokio::time::interval(readiness::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.readiness.observe(std::time::Instant::now(), state.head());
    }
}

/// `STEMEDB_SEARCH_THREADS`, with 0 meaning 1.5 × cores + 1.
fn search_threads(configured: u32) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()) * 3 / 2 + 1,
        n => n as usize,
    }
}

fn open_read_side(data: &DataArgs, args: &ServeArgs, feed: crate::projection::worker::LogFeed) -> anyhow::Result<ReadSide> {
    let defs = crate::lens::Definitions::load(args.projections_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid lens definitions (STEMEDB_PROJECTIONS_DIR): {e}"))?;
    let search_def = crate::projection::search::SearchDefinition::load(args.projections_dir.as_deref())
        .map_err(|e| anyhow::anyhow!("invalid search definition (STEMEDB_PROJECTIONS_DIR): {e}"))?;
    let read = ReadSide::start_with(&data.db_dir(), feed, defs, search_def).context("cannot open the projections (STEMEDB_DB_DIR)")?;
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
    Ok(read)
}

async fn listen_and_serve(data: &DataArgs, args: &ServeArgs, state: AppState) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(args.bind).await.with_context(|| format!("cannot listen on {} (STEMEDB_BIND_ADDR)", args.bind))?;
    let role = match state.role {
        Role::Writer(_) => "writer",
        Role::Follower(_) => "follower",
    };
    tracing::info!(addr = %listener.local_addr()?, data_dir = %data.data_dir.display(), position = state.head(), role, "StemeDB listening");
    http::serve(listener, state, shutdown_signal()).await?;
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
