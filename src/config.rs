//! Configuration: clap flags with environment fallbacks.
//!
//! Every value can come from a flag or from its `STEMEDB_*` variable, so the
//! same binary runs from a shell, from systemd (`Environment=`) and from
//! tests. Bad values fail at start with the variable's name, because a
//! server that starts with a half-understood configuration is worse than
//! one that refuses to start.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::wal::SyncMode;

/// Where data lives. Shared by every subcommand that reads or writes data.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// Root of the data directory.
    #[arg(long, env = "STEMEDB_DATA_DIR", default_value = "./stemedb-data", global = true)]
    pub data_dir: PathBuf,
    /// WAL directory [default: <data-dir>/wal].
    #[arg(long, env = "STEMEDB_WAL_DIR", global = true)]
    pub wal_dir: Option<PathBuf>,
    /// Projection stores directory [default: <data-dir>/db].
    #[arg(long, env = "STEMEDB_DB_DIR", global = true)]
    pub db_dir: Option<PathBuf>,
}

impl DataArgs {
    /// The WAL directory, with the default applied.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal_dir.clone().unwrap_or_else(|| self.data_dir.join("wal"))
    }

    /// The projection directory, with the default applied.
    pub fn db_dir(&self) -> PathBuf {
        self.db_dir.clone().unwrap_or_else(|| self.data_dir.join("db"))
    }

    /// The write side's id index file (beside the projections, but owned
    /// by the write path).
    pub fn id_index_path(&self) -> PathBuf {
        self.db_dir().join("ids.redb")
    }
}

/// `STEMEDB_WAL_SYNC` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WalSync {
    /// fdatasync before acknowledging (durable).
    Always,
    /// Never fdatasync (benchmarks only: acknowledged writes can be lost).
    Never,
}

impl From<WalSync> for SyncMode {
    fn from(s: WalSync) -> Self {
        match s {
            WalSync::Always => SyncMode::Always,
            WalSync::Never => SyncMode::Never,
        }
    }
}

/// Options of `stemedb serve`.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "STEMEDB_BIND_ADDR", default_value = "127.0.0.1:18180")]
    pub bind: SocketAddr,
    /// Roll WAL segments at this size (bytes; at least 4096).
    #[arg(long, env = "STEMEDB_WAL_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = parse_segment_bytes)]
    pub wal_segment_bytes: u64,
    /// `always` (durable) or `never` (benchmarks only).
    #[arg(long, env = "STEMEDB_WAL_SYNC", value_enum, default_value = "always")]
    pub wal_sync: WalSync,
    /// Reject unsigned assertions and agents that are not public keys.
    #[arg(long, env = "STEMEDB_REQUIRE_SIGNATURES", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub require_signatures: bool,
    /// Directory holding `lenses.toml` [default: the definitions built into the binary].
    #[arg(long, env = "STEMEDB_PROJECTIONS_DIR")]
    pub projections_dir: Option<PathBuf>,
    /// `/v1/ready` answers 503 when a projection is more than this many
    /// events behind the head of `--ready-max-delay` ago.
    #[arg(long, env = "STEMEDB_READY_MAX_LAG", default_value_t = 10_000)]
    pub ready_max_lag: u64,
    /// How stale a projection may be before `/v1/ready` counts its lag:
    /// events committed more recently than this are allowed to be missing
    /// (the search index shows writes at commits on a cadence, and a bulk
    /// load is briefly far ahead of every projection). `0s` counts every
    /// event.
    #[arg(long, env = "STEMEDB_READY_MAX_DELAY", default_value = "2s", value_parser = parse_delay)]
    pub ready_max_delay: std::time::Duration,
    /// Page cache of each projection store, in MiB. Lens and KV reads are
    /// fastest when the stores fit (a lens read that misses it costs a
    /// file read and a page allocation); offline tools (`admin
    /// rebuild-projections`, `restore`) default to 64 MiB instead: they
    /// only append, and a smaller cache is faster for that.
    #[arg(long, env = "STEMEDB_STORE_CACHE_MB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub store_cache_mb: u64,
    /// Longest time between two durable (fsynced) commits of a projection
    /// store. Readers never wait for these commits (new events are served
    /// from memory until written), but their fsyncs share the disk with the
    /// WAL's, which every acknowledgement waits for: fewer is better. A
    /// crash costs at most this much re-applied log, never a lost or
    /// doubled event.
    #[arg(long, env = "STEMEDB_PROJECTION_SYNC_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub projection_sync_interval: std::time::Duration,
    /// Searches that run at once; more wait their turn in arrival order.
    /// A search is CPU-bound, so running more than the cores can serve
    /// only makes each one slower and, under many connections, grows the
    /// blocking thread pool; the queue bounds both. 0 = 1.5 × cores + 1
    /// (Elasticsearch's search pool size).
    #[arg(long, env = "STEMEDB_SEARCH_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub search_threads: u32,
    /// Serve `/v1/admin/` even on a non-loopback address.
    #[arg(long, env = "STEMEDB_ADMIN_ENABLED", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub admin_enabled: bool,
    /// Rebuild projections whose definitions changed online at start,
    /// instead of refusing to serve them until an operator does.
    #[arg(long, env = "STEMEDB_AUTO_REBUILD", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub auto_rebuild: bool,
    /// Ship sealed WAL segments to this archive (`s3://bucket/prefix`).
    #[arg(long, env = "STEMEDB_S3_URL", conflicts_with = "follow")]
    pub s3_url: Option<String>,
    /// Seal and ship the active segment at least this often when it holds
    /// new events: the recovery point objective.
    #[arg(long, env = "STEMEDB_S3_SHIP_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub s3_ship_interval: std::time::Duration,
    /// Run as a read-only follower of this archive (`s3://bucket/prefix`).
    #[arg(long, env = "STEMEDB_FOLLOW")]
    pub follow: Option<String>,
    /// How often a follower polls the archive's manifest.
    #[arg(long, env = "STEMEDB_FOLLOW_POLL_INTERVAL", default_value = "200ms", value_parser = parse_interval)]
    pub follow_poll_interval: std::time::Duration,
    /// A follower is not ready after this long without reading the archive.
    #[arg(long, env = "STEMEDB_FOLLOW_MAX_SILENCE", default_value = "30s", value_parser = parse_interval)]
    pub follow_max_silence: std::time::Duration,
    /// The archive's store.
    #[command(flatten)]
    pub s3: S3Args,
}

/// How to reach the archive's S3-compatible store. Shared by `serve`,
/// `restore` and `backup`; credentials come from the usual `AWS_*`
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
#[derive(Args, Clone, Debug)]
pub struct S3Args {
    /// S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 [default: AWS].
    #[arg(long, env = "STEMEDB_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Region [default: AWS_REGION, else us-east-1].
    #[arg(long, env = "STEMEDB_S3_REGION")]
    pub s3_region: Option<String>,
    /// Longest wait for one request to the store before it is retried.
    #[arg(long, env = "STEMEDB_S3_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_interval)]
    pub s3_request_timeout: std::time::Duration,
}

impl S3Args {
    /// The options for `url`.
    pub fn remote(&self, url: &str) -> crate::archive::RemoteOptions {
        crate::archive::RemoteOptions {
            url: url.to_string(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            timeout: Some(self.s3_request_timeout),
        }
    }
}

/// Durations such as `5s`, `500ms` or `1m`, at least 10 ms.
pub fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration such as 5s or 500ms: {e}"))?;
    if d < std::time::Duration::from_millis(10) {
        return Err(format!("{s:?} is too short; use at least 10ms"));
    }
    Ok(d)
}

/// A duration that may be zero (`0s` turns the allowance off).
fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration such as 2s or 0s: {e}"))
}

fn parse_segment_bytes(s: &str) -> Result<u64, String> {
    let n: u64 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of bytes"))?;
    if n < 4096 {
        return Err(format!("{n} is too small; use at least 4096 bytes"));
    }
    Ok(n)
}

/// Strict booleans: a typo must not silently mean `false`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean; use true or false")),
    }
}
