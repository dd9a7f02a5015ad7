//! A read replica that follows the shipped log.
//!
//! The follower keeps its own copy of the WAL: it polls the manifest for
//! entries after the last segment it holds, downloads and verifies each new
//! segment, writes it into its WAL directory, and then advances a committed
//! head exactly like the writer's committer does. The projection workers
//! cannot tell the difference, so every read endpoint, lens and rebuild
//! works unchanged on a follower. Object storage is the only thing the
//! writer and its followers share: no consensus, no connection between them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use super::fetch;
use super::layout::{self, ManifestEntry};
use super::remote::{ArchiveError, Remote};
use super::shipper::read_entry;
use crate::projection::worker::LogFeed;
use crate::wal::lock::DirLock;
use crate::wal::segment;

/// The file in the data directory that marks it as a follower's, holding
/// the archive URL. A writer refuses to start on such a directory.
pub const FOLLOWING_FILE: &str = "FOLLOWING";

/// What the follower needs.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// The archive followed.
    pub remote: Remote,
    /// The data directory (for the marker file).
    pub data_dir: PathBuf,
    /// The follower's WAL copy.
    pub wal_dir: PathBuf,
    /// Time between manifest polls.
    pub poll: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    last_error: Option<String>,
    last_ok: Option<Instant>,
    caught_up_at: Option<Instant>,
    archive_position: u64,
    last_recorded_at: Option<DateTime<Utc>>,
    /// `recorded_at` of the oldest archived event not applied yet.
    behind_since: Option<DateTime<Utc>>,
}

/// Progress of a follower, for `/v1/health` and `/v1/ready`.
#[derive(Debug)]
pub struct FollowStatus {
    url: String,
    head: Arc<AtomicU64>,
    inner: Mutex<Inner>,
}

impl FollowStatus {
    /// The last position this follower holds (and serves once projected).
    pub fn position(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The archive followed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Seconds since the last successful poll, if any succeeded.
    pub fn since_last_poll(&self) -> Option<Duration> {
        self.inner.lock().ok().and_then(|i| i.last_ok.map(|t| t.elapsed()))
    }

    /// The JSON `/v1/health` and `/v1/ready` include.
    pub fn view(&self) -> serde_json::Value {
        let i = self.inner.lock();
        let (err, last_ok, caught, archive, recorded, behind) = match &i {
            Ok(i) => (i.last_error.clone(), i.last_ok, i.caught_up_at, i.archive_position, i.last_recorded_at, i.behind_since),
            Err(_) => (None, None, None, 0, None, None),
        };
        let position = self.position();
        serde_json::json!({
            "role": "follower",
            "url": self.url,
            "position": position,
            "archive_position": archive,
            "lag_events": archive.saturating_sub(position),
            "last_recorded_at": recorded.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            // Behind the archive, not the writer: the writer's shipping lag
            // (its own /v1/ready) adds to this.
            "lag_seconds": behind.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0),
            "seconds_since_poll": last_ok.map(|t| t.elapsed().as_secs_f64()),
            "seconds_since_caught_up": caught.map(|t| t.elapsed().as_secs_f64()),
            "last_error": err,
        })
    }
}

/// A running follower.
pub struct Follower {
    /// Its progress.
    pub status: Arc<FollowStatus>,
    feed: LogFeed,
    notify: async_broadcast::Sender<u64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _lock: DirLock,
}

impl Follower {
    /// Prepares the data directory (new, or one this follower left) and
    /// starts polling. Refuses a directory that a writer owns or that
    /// follows another archive, and a local log that disagrees with the
    /// archive.
    pub async fn start(cfg: FollowConfig) -> Result<Follower, ArchiveError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ArchiveError::io(&cfg.data_dir, e))?;
        std::fs::create_dir_all(&cfg.wal_dir).map_err(|e| ArchiveError::io(&cfg.wal_dir, e))?;
        let lock = DirLock::acquire(&cfg.wal_dir).map_err(|e| ArchiveError::Config(e.to_string()))?;
        mark(&cfg)?;
        segment::remove_temporaries(&cfg.wal_dir).map_err(|e| ArchiveError::Config(e.to_string()))?;
        let (head, last_first) = local_head(&cfg).await?;
        let head_cell = Arc::new(AtomicU64::new(head));
        let (mut tx, rx) = async_broadcast::broadcast(1);
        tx.set_overflow(true);
        tx.set_await_active(false);
        let feed = LogFeed { wal_dir: cfg.wal_dir.clone(), committed: head_cell.clone(), notify: rx };
        let status = Arc::new(FollowStatus { url: cfg.remote.url().to_string(), head: head_cell, inner: Mutex::new(Inner::default()) });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let poller = Poller { cfg, status: status.clone(), notify: tx.clone(), last_key: last_first.map(layout::manifest_key) };
        let task = tokio::spawn(poller.run(stop_rx));
        tracing::info!(position = head, url = %status.url, "following the archive");
        Ok(Follower { status, feed, notify: tx, stop, task, _lock: lock })
    }

    /// What the projection workers follow.
    pub fn feed(&self) -> LogFeed {
        self.feed.clone()
    }

    /// Stops polling and closes the feed so the workers exit.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.notify.close();
    }
}

/// Writes or checks the marker that says whom this directory follows.
fn mark(cfg: &FollowConfig) -> Result<(), ArchiveError> {
    let marker = cfg.data_dir.join(FOLLOWING_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(url) if url.trim() == cfg.remote.url() => Ok(()),
        Ok(url) => Err(ArchiveError::Config(format!(
            "{} follows {}, not {}; use another data directory",
            cfg.data_dir.display(),
            url.trim(),
            cfg.remote.url()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_log = segment::list(&cfg.wal_dir).map(|s| !s.is_empty()).unwrap_or(false);
            if has_log {
                return Err(ArchiveError::Config(format!(
                    "{} holds a writer's log; a follower needs an empty data directory (or one it created)",
                    cfg.data_dir.display()
                )));
            }
            std::fs::write(&marker, format!("{}\n", cfg.remote.url())).map_err(|e| ArchiveError::io(&marker, e))
        }
        Err(e) => Err(ArchiveError::io(&marker, e)),
    }
}

/// The last position of the local copy and the first position of its last
/// segment, after checking that segment against the archive's entry.
async fn local_head(cfg: &FollowConfig) -> Result<(u64, Option<u64>), ArchiveError> {
    let segs = segment::list(&cfg.wal_dir).map_err(|e| ArchiveError::Config(e.to_string()))?;
    let Some(last) = segs.last() else { return Ok((0, None)) };
    let key = layout::manifest_key(last.first_position);
    let entry = read_entry(&cfg.remote, &key)
        .await?
        .ok_or_else(|| ArchiveError::Conflict(format!("the local segment {} is not in the archive's manifest", last.path.display())))?;
    let bytes = std::fs::read(&last.path).map_err(|e| ArchiveError::io(&last.path, e))?;
    if blake3::hash(&bytes).to_hex().as_str() != entry.blake3 {
        return Err(ArchiveError::Conflict(format!(
            "the local segment {} differs from the archive's {}",
            last.path.display(),
            entry.object
        )));
    }
    Ok((entry.last_position, Some(entry.first_position)))
}

struct Poller {
    cfg: FollowConfig,
    status: Arc<FollowStatus>,
    notify: async_broadcast::Sender<u64>,
    last_key: Option<String>,
}

impl Poller {
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::ZERO;
        loop {
            let r = tokio::select! {
                r = self.poll() => r,
                _ = stop.changed() => return,
            };
            let wait = match r {
                Ok(()) => {
                    backoff = Duration::ZERO;
                    self.cfg.poll
                }
                Err(e) => {
                    metrics::counter!("stemedb_follow_errors_total").increment(1);
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "following the archive failed; retrying");
                    if let Ok(mut i) = self.status.inner.lock() {
                        i.last_error = Some(e.to_string());
                    }
                    backoff
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Lists what is new, downloads it in order (a few at a time) and
    /// publishes each segment as soon as it and all before it are on disk.
    async fn poll(&mut self) -> Result<(), ArchiveError> {
        let remote = &self.cfg.remote;
        let keys: Vec<String> = remote
            .list(layout::MANIFEST_DIR, self.last_key.as_deref())
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| layout::manifest_first_position(k).is_some() && Some(k) > self.last_key.as_ref())
            .collect();
        let entries: Vec<ManifestEntry> = futures::stream::iter(keys.into_iter().map(|k| {
            let remote = remote.clone();
            async move {
                read_entry(&remote, &k)
                    .await?
                    .ok_or_else(|| ArchiveError::Corrupt { key: k.clone(), reason: "listed but cannot be read".into() })
            }
        }))
        .buffered(16)
        .try_collect()
        .await?;
        if let (Some(first), Some(last), Ok(mut i)) = (entries.first(), entries.last(), self.status.inner.lock()) {
            i.archive_position = last.last_position;
            i.behind_since = Some(first.first_recorded_at);
        }
        let mut head = self.status.position();
        for e in &entries {
            if e.first_position != head + 1 {
                return Err(ArchiveError::Conflict(format!(
                    "{}: starts at position {}, but this follower holds the log up to {head}",
                    e.object, e.first_position
                )));
            }
            head = e.last_position;
        }
        let wal_dir = self.cfg.wal_dir.clone();
        let mut downloads = futures::stream::iter(entries.clone().into_iter().map(|e| {
            let wal_dir = wal_dir.clone();
            let remote = remote.clone();
            async move {
                let bytes = fetch::download(&remote, &e).await?;
                let first = e.first_position;
                let dir = wal_dir.clone();
                tokio::task::spawn_blocking(move || fetch::write_segment(&dir, first, &bytes))
                    .await
                    .map_err(|err| ArchiveError::io(&wal_dir, std::io::Error::other(err.to_string())))??;
                Ok::<ManifestEntry, ArchiveError>(e)
            }
        }))
        .buffered(fetch::DOWNLOAD_CONCURRENCY);
        let mut next = entries.iter().skip(1);
        while let Some(e) = downloads.try_next().await? {
            segment::sync_dir(&self.cfg.wal_dir)
                .map_err(|err| ArchiveError::io(&self.cfg.wal_dir, std::io::Error::other(err.to_string())))?;
            self.status.head.store(e.last_position, Ordering::Release);
            self.last_key = Some(layout::manifest_key(e.first_position));
            if let Ok(mut i) = self.status.inner.lock() {
                i.last_recorded_at = Some(e.last_recorded_at);
                i.behind_since = next.next().map(|n| n.first_recorded_at);
            }
            metrics::gauge!("stemedb_follow_position").set(e.last_position as f64);
            let _ = self.notify.try_broadcast(e.last_position);
        }
        if let Ok(mut i) = self.status.inner.lock() {
            let now = Instant::now();
            let lag = i.behind_since.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
            metrics::gauge!("stemedb_follow_lag_seconds").set(lag);
            i.last_ok = Some(now);
            i.last_error = None;
            if self.status.head.load(Ordering::Acquire) >= i.archive_position {
                i.caught_up_at = Some(now);
            }
        }
        Ok(())
    }
}

/// Whether `data_dir` is a follower's (a writer must not start on it).
pub fn following(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(FOLLOWING_FILE)).ok().map(|s| s.trim().to_string())
}
