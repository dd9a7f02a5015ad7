//! The shipper: uploads sealed WAL segments and their manifest entries.
//!
//! It runs as a tokio task beside the server and never sits on the write
//! path: the committer only ever sees a cheap "seal the active segment"
//! request, at most once per ship interval and only when the segment holds
//! records. Everything else (reading the sealed file, hashing, uploading,
//! retrying with backoff while the store is down) happens here. On restart
//! it lists the manifest and continues after its last entry, so nothing is
//! uploaded twice; an interrupted upload is finished or found identical.
//!
//! Safety against a second writer: the prefix's `writer.json` is claimed
//! once with a create-only put, re-read before every manifest entry, and
//! every object is itself create-only. Any disagreement stops shipping
//! ("fenced") and is reported loudly; it never overwrites history.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use super::layout::{self, ManifestEntry, WriterRecord};
use super::remote::{ArchiveError, Created, Remote};
use super::summary;
use crate::ingest::Ingest;
use crate::wal::segment;

/// Name of the file beside the WAL that identifies this writer's log.
pub const WRITER_ID_FILE: &str = "WRITER_ID";

/// Where the shipper stands, for `/v1/ready` and `/v1/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShipState {
    /// Not yet talked to the store.
    Starting,
    /// Up to date or uploading.
    Shipping,
    /// The last attempt failed; retrying with backoff.
    Retrying,
    /// Stopped for good: another writer owns the prefix or the archive
    /// disagrees with this log. Needs an operator.
    Fenced,
}

#[derive(Debug)]
struct Inner {
    state: ShipState,
    last_error: Option<String>,
    generation: Option<u64>,
}

/// Shared view of the shipper's progress.
#[derive(Debug)]
pub struct ShipStatus {
    url: String,
    shipped: AtomicU64,
    lag_ms: AtomicU64,
    inner: Mutex<Inner>,
}

impl ShipStatus {
    fn new(url: &str) -> ShipStatus {
        ShipStatus {
            url: url.to_string(),
            shipped: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            inner: Mutex::new(Inner { state: ShipState::Starting, last_error: None, generation: None }),
        }
    }

    /// The last position whose segment and manifest entry are in the store.
    pub fn shipped_position(&self) -> u64 {
        self.shipped.load(Ordering::Acquire)
    }

    /// Age of the oldest committed event not yet shipped (0 when none).
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }

    /// Current state.
    pub fn state(&self) -> ShipState {
        self.inner.lock().map(|i| i.state).unwrap_or(ShipState::Retrying)
    }

    fn set(&self, state: ShipState, error: Option<String>) {
        if let Ok(mut i) = self.inner.lock() {
            // Fenced is terminal: a later success report must not hide it.
            if i.state == ShipState::Fenced {
                return;
            }
            i.state = state;
            if error.is_some() || state == ShipState::Shipping {
                i.last_error = error;
            }
        }
    }

    /// The JSON that `/v1/ready` and `/v1/health` include.
    pub fn view(&self) -> serde_json::Value {
        let (state, last_error, generation) =
            self.inner.lock().map(|i| (i.state, i.last_error.clone(), i.generation)).unwrap_or((ShipState::Retrying, None, None));
        serde_json::json!({
            "url": self.url,
            "state": state,
            "shipped_position": self.shipped_position(),
            "lag_seconds": self.lag().as_secs_f64(),
            "generation": generation,
            "last_error": last_error,
        })
    }
}

/// What the shipper needs.
#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// The archive.
    pub remote: Remote,
    /// The local WAL directory.
    pub wal_dir: PathBuf,
    /// Seal and ship the active segment at least this often (the RPO).
    pub interval: Duration,
}

/// A running shipper.
pub struct Shipper {
    /// Its progress.
    pub status: Arc<ShipStatus>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    lag_task: tokio::task::JoinHandle<()>,
}

impl Shipper {
    /// Claims the prefix and starts shipping. A prefix owned by another
    /// writer is an error here, so the server refuses to start; if the
    /// store cannot be reached, the shipper starts anyway and keeps trying
    /// (writes must not depend on the archive being up).
    pub async fn start(cfg: ShipConfig, ingest: Ingest) -> Result<Shipper, ArchiveError> {
        let id = writer_id(&cfg.wal_dir)?;
        let status = Arc::new(ShipStatus::new(cfg.remote.url()));
        let claimed = match tokio::time::timeout(Duration::from_secs(15), claim(&cfg.remote, &id)).await {
            Ok(Ok(rec)) => Some(rec),
            Ok(Err(e @ ArchiveError::Conflict(_))) => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot reach the archive at start; writes continue and shipping retries");
                status.set(ShipState::Retrying, Some(e.to_string()));
                None
            }
            Err(_) => {
                status.set(ShipState::Retrying, Some("the archive did not answer within 15 s".into()));
                None
            }
        };
        metrics::gauge!("stemedb_wal_shipping_fenced").set(0.0);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let run = Run { cfg, ingest: ingest.clone(), status: status.clone(), id, claimed, remote_last: None };
        let task = tokio::spawn(run.main(stop_rx.clone()));
        let lag_task = tokio::spawn(track_lag(ingest, status.clone(), stop_rx));
        Ok(Shipper { status, stop, task, lag_task })
    }

    /// Seals and ships what is committed, waiting at most `timeout`, then
    /// stops. Called at shutdown before the write path stops, so a clean
    /// shutdown leaves nothing unshipped when the store is reachable.
    pub async fn finish(self, timeout: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!(
                shipped = self.status.shipped_position(),
                "shipping did not finish before shutdown; the rest ships at the next start"
            );
        }
        self.lag_task.abort();
    }
}

/// Reads (or creates, at first use) the id of the log in `wal_dir`.
pub fn writer_id(wal_dir: &Path) -> Result<String, ArchiveError> {
    let path = wal_dir.join(WRITER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ArchiveError::io(&path, e)),
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = wal_dir.join(format!("{WRITER_ID_FILE}.tmp"));
    std::fs::write(&tmp, format!("{id}\n")).map_err(|e| ArchiveError::io(&tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| ArchiveError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| ArchiveError::io(&path, e))?;
    segment::sync_dir(wal_dir).map_err(|e| ArchiveError::io(wal_dir, std::io::Error::other(e.to_string())))?;
    Ok(id)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Reads the writer record of the prefix, if any.
pub async fn read_writer(remote: &Remote) -> Result<Option<WriterRecord>, ArchiveError> {
    let Some(f) = remote.get(layout::WRITER_KEY).await? else { return Ok(None) };
    serde_json::from_slice(&f.bytes)
        .map(Some)
        .map_err(|e| ArchiveError::Corrupt { key: layout::WRITER_KEY.into(), reason: format!("not a writer record: {e}") })
}

/// Claims the prefix for writer `id`, or finds it already ours.
pub async fn claim(remote: &Remote, id: &str) -> Result<WriterRecord, ArchiveError> {
    for _ in 0..3 {
        if let Some(rec) = read_writer(remote).await? {
            if rec.writer_id == id {
                return Ok(rec);
            }
            return Err(ArchiveError::Conflict(format!(
                "{} is owned by another writer (id {}, generation {}, claimed {} by host {:?}); a second writer on one prefix \
                 would fork the log. Ship this server to another prefix (STEMEDB_S3_URL), or, if that writer is gone for good \
                 and this data directory was restored from this prefix, run `stemedb backup takeover`",
                remote.url(),
                rec.writer_id,
                rec.generation,
                rec.claimed_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                rec.host
            )));
        }
        let rec = WriterRecord { format: layout::FORMAT, writer_id: id.to_string(), generation: 1, claimed_at: Utc::now(), host: host() };
        let body = serde_json::to_vec_pretty(&rec).map_err(|e| ArchiveError::Config(e.to_string()))?;
        if remote.create(layout::WRITER_KEY, body).await? == Created::New {
            tracing::info!(url = remote.url(), writer_id = id, "claimed the archive prefix");
            return Ok(rec);
        }
        // Someone created it between our read and our create: read again.
    }
    Err(ArchiveError::Conflict(format!("{}: the writer record keeps changing; is another writer starting?", remote.url())))
}

/// The last manifest entry of the prefix, if any.
pub async fn last_entry(remote: &Remote) -> Result<Option<ManifestEntry>, ArchiveError> {
    let keys = remote.list(layout::MANIFEST_DIR, None).await?;
    let Some((key, _)) = keys.iter().rev().find(|(k, _)| layout::manifest_first_position(k).is_some()) else { return Ok(None) };
    read_entry(remote, key).await
}

/// Reads and parses one manifest entry.
pub async fn read_entry(remote: &Remote, key: &str) -> Result<Option<ManifestEntry>, ArchiveError> {
    let Some(f) = remote.get(key).await? else { return Ok(None) };
    let e: ManifestEntry = serde_json::from_slice(&f.bytes)
        .map_err(|e| ArchiveError::Corrupt { key: key.to_string(), reason: format!("not a manifest entry: {e}") })?;
    if layout::manifest_key(e.first_position) != key {
        return Err(ArchiveError::Corrupt { key: key.to_string(), reason: "entry's first position does not match its name".into() });
    }
    Ok(Some(e))
}

struct Run {
    cfg: ShipConfig,
    ingest: Ingest,
    status: Arc<ShipStatus>,
    id: String,
    claimed: Option<WriterRecord>,
    /// The last shipped position, once known.
    remote_last: Option<u64>,
}

impl Run {
    async fn main(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        // Fine enough that a seal is never much later than the interval asks:
        // the follower lag bound is the interval plus this lateness.
        let tick = (self.cfg.interval / 20).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut last_seal = Instant::now();
        let mut backoff = Duration::ZERO;
        let mut retry_at = Instant::now();
        loop {
            let finishing = *stop.borrow();
            if !finishing {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stop.changed() => {}
                }
            }
            let finishing = *stop.borrow();
            if Instant::now() < retry_at && !finishing {
                continue;
            }
            match self.pass(&mut last_seal, finishing).await {
                Ok(()) => {
                    backoff = Duration::ZERO;
                    self.status.set(ShipState::Shipping, None);
                }
                Err(ArchiveError::Conflict(why)) => {
                    metrics::counter!("stemedb_wal_ship_errors_total").increment(1);
                    tracing::error!(url = self.cfg.remote.url(), "WAL SHIPPING STOPPED: {why}");
                    self.status.set(ShipState::Retrying, Some(why));
                    if let Ok(mut i) = self.status.inner.lock() {
                        i.state = ShipState::Fenced;
                    }
                    metrics::gauge!("stemedb_wal_shipping_fenced").set(1.0);
                    return;
                }
                Err(e) => {
                    metrics::counter!("stemedb_wal_ship_errors_total").increment(1);
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "WAL shipping failed; retrying");
                    self.status.set(ShipState::Retrying, Some(e.to_string()));
                    retry_at = Instant::now() + backoff;
                    if finishing {
                        return;
                    }
                }
            }
            if finishing {
                return;
            }
        }
    }

    /// One round: claim if needed, learn the remote head if needed, seal
    /// when due, and ship every sealed segment not yet shipped.
    async fn pass(&mut self, last_seal: &mut Instant, finishing: bool) -> Result<(), ArchiveError> {
        if self.claimed.is_none() {
            let rec = claim(&self.cfg.remote, &self.id).await?;
            self.claimed = Some(rec);
        }
        if let (Some(rec), Ok(mut i)) = (&self.claimed, self.status.inner.lock()) {
            i.generation = Some(rec.generation);
        }
        let committed = self.ingest.committed_position();
        let remote_last = match self.remote_last {
            Some(p) => p,
            None => {
                let last = last_entry(&self.cfg.remote).await?.map(|e| e.last_position).unwrap_or(0);
                if last > committed {
                    return Err(ArchiveError::Conflict(format!(
                        "the archive {} holds positions up to {last} but this log ends at {committed}: it was shipped from another \
                         history (a restored or replaced data directory?)",
                        self.cfg.remote.url()
                    )));
                }
                self.remote_last = Some(last);
                self.publish(last);
                last
            }
        };
        let segments =
            segment::list(&self.cfg.wal_dir).map_err(|e| ArchiveError::io(&self.cfg.wal_dir, std::io::Error::other(e.to_string())))?;
        let active_first = segments.last().map(|s| s.first_position).unwrap_or(1);
        if committed >= active_first && (finishing || last_seal.elapsed() >= self.cfg.interval) {
            self.ingest.seal().await.map_err(|e| ArchiveError::io(&self.cfg.wal_dir, std::io::Error::other(e.to_string())))?;
            *last_seal = Instant::now();
        }
        self.ship_sealed(remote_last).await
    }

    async fn ship_sealed(&mut self, mut remote_last: u64) -> Result<(), ArchiveError> {
        let segments =
            segment::list(&self.cfg.wal_dir).map_err(|e| ArchiveError::io(&self.cfg.wal_dir, std::io::Error::other(e.to_string())))?;
        let sealed = &segments[..segments.len().saturating_sub(1)];
        for (i, seg) in sealed.iter().enumerate() {
            let next_first = segments[i + 1].first_position;
            if next_first <= remote_last + 1 {
                continue; // wholly shipped
            }
            if seg.first_position != remote_last + 1 {
                return Err(ArchiveError::Conflict(format!(
                    "the archive {} ends at position {remote_last}, which is not a segment boundary of this log ({} starts at {}): \
                     it was shipped from another history",
                    self.cfg.remote.url(),
                    seg.path.display(),
                    seg.first_position
                )));
            }
            let last = self.ship_one(&seg.path).await?;
            remote_last = last;
            self.remote_last = Some(last);
            self.publish(last);
        }
        Ok(())
    }

    fn publish(&self, last: u64) {
        self.status.shipped.store(last, Ordering::Release);
        metrics::gauge!("stemedb_wal_shipped_position").set(last as f64);
    }

    /// Uploads one sealed segment and then its manifest entry; returns its
    /// last position.
    async fn ship_one(&self, path: &Path) -> Result<u64, ArchiveError> {
        let started = Instant::now();
        let bytes = tokio::fs::read(path).await.map_err(|e| ArchiveError::io(path, e))?;
        let s = summary::summarize(&bytes).map_err(|reason| ArchiveError::Corrupt {
            key: path.display().to_string(),
            reason: format!("sealed segment does not verify: {reason}"),
        })?;
        let Some((first_recorded_at, last_recorded_at)) = s.recorded else {
            return Err(ArchiveError::Corrupt { key: path.display().to_string(), reason: "a sealed segment holds no record".into() });
        };
        let checksum = blake3::hash(&bytes).to_hex().to_string();
        let size = bytes.len() as u64;
        let generation = self.claimed.as_ref().map(|r| r.generation).unwrap_or(1);
        let key = layout::segment_key(s.first_position, generation);
        if self.cfg.remote.create(&key, bytes).await? == Created::AlreadyExists {
            // Ours from an interrupted attempt if the content is the same.
            let theirs = self.cfg.remote.head_checksum(&key).await?.flatten();
            if theirs.as_deref() != Some(checksum.as_str()) {
                return Err(ArchiveError::Conflict(format!(
                    "{}/{key} already exists with other content (blake3 {}, ours {checksum}): another writer shipped a different \
                     history to this prefix",
                    self.cfg.remote.url(),
                    theirs.unwrap_or_else(|| "unknown".into())
                )));
            }
        }
        // Fencing: re-read the writer record right before making the
        // segment part of the manifest, so a writer replaced by a takeover
        // stops here.
        if self.check_still_owner().await? != generation {
            return Err(ArchiveError::Conflict(format!("{}: the writer generation changed under this server", self.cfg.remote.url())));
        }
        let entry = ManifestEntry {
            format: layout::FORMAT,
            object: key.clone(),
            first_position: s.first_position,
            last_position: s.next_position - 1,
            first_recorded_at,
            last_recorded_at,
            size,
            blake3: checksum,
            writer_id: self.id.clone(),
            generation,
            shipped_at: Utc::now(),
        };
        let mkey = layout::manifest_key(s.first_position);
        let body = serde_json::to_vec_pretty(&entry).map_err(|e| ArchiveError::Config(e.to_string()))?;
        if self.cfg.remote.create(&mkey, body).await? == Created::AlreadyExists {
            let existing = read_entry(&self.cfg.remote, &mkey).await?;
            let same = existing.as_ref().is_some_and(|e| e.blake3 == entry.blake3 && e.last_position == entry.last_position);
            if !same {
                return Err(ArchiveError::Conflict(format!(
                    "{}/{mkey} already exists and describes another segment: another writer shipped to this prefix",
                    self.cfg.remote.url()
                )));
            }
        }
        metrics::counter!("stemedb_wal_shipped_bytes_total").increment(size);
        metrics::counter!("stemedb_wal_shipped_segments_total").increment(1);
        metrics::histogram!("stemedb_wal_ship_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(object = %key, first = entry.first_position, last = entry.last_position, size, "shipped WAL segment");
        Ok(entry.last_position)
    }

    async fn check_still_owner(&self) -> Result<u64, ArchiveError> {
        match read_writer(&self.cfg.remote).await? {
            Some(rec) if rec.writer_id == self.id => Ok(rec.generation),
            Some(rec) => Err(ArchiveError::Conflict(format!(
                "{} was taken over by writer {} (generation {}, host {:?}); this server no longer ships there",
                self.cfg.remote.url(),
                rec.writer_id,
                rec.generation,
                rec.host
            ))),
            None => Err(ArchiveError::Conflict(format!("{}: the writer record disappeared", self.cfg.remote.url()))),
        }
    }
}

/// Keeps `stemedb_wal_shipping_lag_seconds` current: the age of the oldest
/// committed event that is not shipped yet, to within 100 ms.
async fn track_lag(ingest: Ingest, status: Arc<ShipStatus>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // (committed position, when first seen) for every new head observed.
    let mut seen: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut last_seen = ingest.committed_position();
    if last_seen > 0 {
        seen.push_back((last_seen, Instant::now()));
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
        let committed = ingest.committed_position();
        if committed > last_seen {
            if seen.len() >= 100_000 {
                // Bounded memory during a long outage: merge into the oldest.
                seen.pop_back();
            }
            seen.push_back((committed, Instant::now()));
            last_seen = committed;
        }
        let shipped = status.shipped_position();
        while seen.front().is_some_and(|(p, _)| *p <= shipped) {
            seen.pop_front();
        }
        let lag = seen.front().map(|(_, t)| t.elapsed()).unwrap_or_default();
        status.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("stemedb_wal_shipping_lag_seconds").set(lag.as_secs_f64());
    }
}
