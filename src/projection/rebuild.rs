//! Rebuilding projections from the log, online (while serving) and offline.
//!
//! Online, a job builds a shadow store from position 1 beside each live
//! one while the live stores keep serving and following the log; once the
//! shadow is within one batch of the head it is handed to the slot's
//! worker, which catches it up and swaps it in atomically (see
//! [`Slot`]). Offline, the same replay runs with the
//! server stopped and the finished store is renamed over the old one.
//! Either way an interrupted rebuild leaves the old store untouched; its
//! partial shadow is removed on the next start or run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::slot::Slot;
use super::worker::{DEFAULT_BATCH, LogFeed, bulk_replay, replay_into};
use super::{Projection, ProjectionError};

/// The state of a rebuild job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "error")]
pub enum JobState {
    /// Replaying or waiting for the swap.
    Running,
    /// Every projection was swapped in.
    Completed,
    /// Cancelled; the old stores stay.
    Cancelled,
    /// Failed; the old stores stay.
    Failed(String),
}

/// Progress of one projection within a job.
#[derive(Debug, Default)]
pub struct Progress {
    /// Last position applied to the shadow.
    pub done: AtomicU64,
    /// The head when last looked at.
    pub target: AtomicU64,
    /// Whether this projection's shadow has been swapped in.
    pub swapped: AtomicBool,
    /// Microseconds into the job at which the running
    /// [`settle`](super::Projection::settle) began; 0 when none runs.
    pub settling_since_us: AtomicU64,
    /// Microseconds spent settling, which the replay speed leaves out.
    pub settled_us: AtomicU64,
}

/// One rebuild job.
#[derive(Debug)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// Projections it rebuilds, in order.
    pub projections: Vec<&'static str>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    started: Instant,
    cancel: AtomicBool,
    state: Mutex<JobState>,
    progress: BTreeMap<&'static str, Progress>,
}

/// What the admin API shows of a job's projection.
#[derive(Debug, Serialize)]
pub struct ProgressView {
    /// The job.
    pub job: String,
    /// Position reached by the shadow.
    pub position: u64,
    /// The head to reach.
    pub head: u64,
    /// Fraction done, 0 to 1.
    pub progress: f64,
    /// Replay speed since the job started.
    pub events_per_sec: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// When the job started.
    pub started_at: String,
    /// Whether the shadow has been swapped in.
    pub swapped: bool,
    /// Whether the shadow is finishing background work before it is
    /// handed over (search: merging the segments of the bulk load).
    pub settling: bool,
    /// Seconds spent settling so far.
    pub settle_seconds: f64,
}

impl Job {
    fn new(id: String, projections: Vec<&'static str>) -> Job {
        let progress = projections.iter().map(|p| (*p, Progress::default())).collect();
        Job {
            id,
            projections,
            started_at: Utc::now(),
            started: Instant::now(),
            cancel: AtomicBool::new(false),
            state: Mutex::new(JobState::Running),
            progress,
        }
    }

    /// Asks the job to stop; the old stores stay.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Whether cancellation was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// The current state.
    pub fn state(&self) -> JobState {
        self.state.lock().map(|s| s.clone()).unwrap_or(JobState::Failed("poisoned".into()))
    }

    fn set_state(&self, s: JobState) {
        if let Ok(mut st) = self.state.lock() {
            *st = s;
        }
    }

    /// Progress of `projection` in this job.
    pub fn view(&self, projection: &str) -> Option<ProgressView> {
        let p = self.progress.get(projection)?;
        let done = p.done.load(Ordering::Relaxed);
        let head = p.target.load(Ordering::Relaxed).max(done);
        let now_us = self.micros();
        let since = p.settling_since_us.load(Ordering::Relaxed);
        let settle_us = p.settled_us.load(Ordering::Relaxed) + if since > 0 { now_us.saturating_sub(since) } else { 0 };
        let secs = (now_us.saturating_sub(settle_us) as f64 / 1e6).max(1e-3);
        let rate = done as f64 / secs;
        let swapped = p.swapped.load(Ordering::Relaxed);
        Some(ProgressView {
            job: self.id.clone(),
            position: done,
            head,
            // A projection whose turn has not come yet has no head: 0 %, not 100 %.
            progress: if head == 0 { if swapped { 1.0 } else { 0.0 } } else { done as f64 / head as f64 },
            events_per_sec: rate,
            eta_seconds: (rate > 0.0).then(|| (head - done) as f64 / rate),
            started_at: crate::model::time::format(&self.started_at),
            swapped,
            settling: since > 0,
            settle_seconds: settle_us as f64 / 1e6,
        })
    }

    /// Microseconds since the job started (at least 1, so 0 can mean "none").
    fn micros(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
    }

    /// Runs `shadow`'s [`settle`](super::Projection::settle), timed apart
    /// from the replay in `p`.
    fn settle(&self, p: &Progress, shadow: &dyn Projection) -> Result<(), ProjectionError> {
        let since = self.micros();
        p.settling_since_us.store(since, Ordering::Relaxed);
        let result = shadow.settle();
        p.settled_us.fetch_add(self.micros().saturating_sub(since), Ordering::Relaxed);
        p.settling_since_us.store(0, Ordering::Relaxed);
        result
    }
}

/// Something a job can rebuild: a slot of any store type.
pub trait Rebuildable: Send + Sync {
    /// The projection's name.
    fn name(&self) -> &'static str;
    /// Builds a shadow and hands it over; returns when it is swapped in,
    /// cancelled or failed.
    fn rebuild_online(&self, feed: &LogFeed, job: &Job) -> Result<bool, ProjectionError>;
    /// Compares the live store with a replay of the log.
    fn verify(&self, wal_dir: &std::path::Path) -> Result<super::verify::Comparison, ProjectionError>;
    /// A fresh, empty shadow store (for [`rebuild_offline_many`]).
    fn open_shadow_store(&self) -> Result<Box<dyn Projection>, ProjectionError>;
    /// Renames the finished, closed shadow over the live store.
    fn install_shadow_offline(&self) -> Result<(), ProjectionError>;
    /// Deletes the shadow store's files.
    fn remove_shadow(&self);
    /// Where the shadow store lives (a file or a directory).
    fn shadow_location(&self) -> std::path::PathBuf;
}

/// Rebuilds `slots` offline (the caller holds the WAL lock) from one pass
/// over the log up to `head`: the log is decoded once and every shadow is
/// bulk-loaded from the same batches (see [`bulk_replay`]). Each finished
/// shadow is durable before it is renamed over its live store; if any
/// fails, every shadow is deleted and every live store stays as it was.
/// `progress(i, position)` reports slot `i`. Returns each slot's time.
///
/// `extra` stores (fresh, never installed: a restore's id index) are fed
/// from the same pass; their times follow the slots' in the result.
pub fn rebuild_offline_many(
    slots: &[&dyn Rebuildable],
    extra: &[&dyn Projection],
    wal_dir: &std::path::Path,
    head: u64,
    progress: &(dyn Fn(usize, u64) + Sync),
) -> Result<Vec<Duration>, ProjectionError> {
    let built = (|| {
        let mut shadows = Vec::new();
        for slot in slots {
            shadows.push(slot.open_shadow_store()?);
        }
        let mut stores: Vec<&dyn Projection> = shadows.iter().map(|s| &**s).collect();
        stores.extend_from_slice(extra);
        let locations: Vec<std::path::PathBuf> = slots.iter().map(|s| s.shadow_location()).collect();
        let loading = AtomicBool::new(true);
        let done = std::thread::scope(|scope| {
            scope.spawn(|| write_back_while(&loading, &locations));
            let done = bulk_replay(&stores, wal_dir, head, &|i, p| {
                progress(i, p);
                true
            });
            loading.store(false, Ordering::Release);
            done
        })?;
        for s in &shadows {
            s.flush()?;
        }
        for s in &shadows {
            s.settle()?;
        }
        Ok(done.into_iter().map(|(_, t)| t).collect::<Vec<_>>())
    })();
    match built {
        Ok(times) => {
            for slot in slots {
                slot.install_shadow_offline()?;
            }
            Ok(times)
        }
        Err(e) => {
            for slot in slots {
                slot.remove_shadow();
            }
            Err(e)
        }
    }
}

/// Pushes the shadows' written pages to disk every half second while a
/// bulk load runs. A load writes gigabytes through the page cache, which
/// the kernel would otherwise hold dirty until the final durable commit
/// fsyncs them all at once, with every core idle; flushed as they come,
/// that commit has little left to wait for.
fn write_back_while(loading: &AtomicBool, locations: &[std::path::PathBuf]) {
    let tick = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while loading.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        waited += tick;
        if waited < Duration::from_millis(500) {
            continue;
        }
        waited = Duration::ZERO;
        for location in locations {
            let files: Vec<std::path::PathBuf> = match std::fs::read_dir(location) {
                Ok(dir) => dir.flatten().map(|e| e.path()).collect(),
                Err(_) => vec![location.clone()],
            };
            for file in files {
                // Best effort: the load's own durable commit is what counts.
                if let Ok(f) = std::fs::File::open(&file) {
                    let _ = f.sync_data();
                }
            }
        }
    }
}

impl<T: Projection> Rebuildable for Slot<T> {
    fn name(&self) -> &'static str {
        Slot::name(self)
    }

    fn rebuild_online(&self, feed: &LogFeed, job: &Job) -> Result<bool, ProjectionError> {
        let name = Slot::name(self);
        let progress =
            job.progress.get(name).ok_or_else(|| ProjectionError { projection: name, message: "not part of this job".into() })?;
        let shadow = self.open_shadow()?;
        metrics::gauge!("stemedb_projection_rebuild_in_progress", "projection" => name).set(1.0);
        let result = (|| {
            let mut last = 0;
            loop {
                let head = feed.committed.load(Ordering::Acquire);
                progress.target.store(head, Ordering::Relaxed);
                let reached = if last == 0 {
                    // The shadow is private until it is handed over, so
                    // the first, long pass is a bulk load.
                    let seen = AtomicU64::new(0);
                    let done = bulk_replay(&[&shadow], &feed.wal_dir, head, &|_, pos| {
                        let before = seen.swap(pos, Ordering::Relaxed);
                        metrics::counter!("stemedb_projection_rebuild_events_total", "projection" => name).increment(pos - before);
                        progress.done.store(pos, Ordering::Relaxed);
                        !job.cancelled()
                    })?;
                    if !job.cancelled() {
                        // Merged while the old store still serves; the
                        // passes below catch up with the writes meanwhile.
                        job.settle(progress, &shadow)?;
                    }
                    done.first().map(|d| d.0).unwrap_or(0)
                } else {
                    replay_into(&shadow, &feed.wal_dir, head, DEFAULT_BATCH, |pos| {
                        metrics::counter!("stemedb_projection_rebuild_events_total", "projection" => name).increment(pos - last);
                        last = pos;
                        progress.done.store(pos, Ordering::Relaxed);
                        !job.cancelled()
                    })?
                };
                last = last.max(reached);
                if job.cancelled() {
                    return Ok(false);
                }
                if feed.committed.load(Ordering::Acquire).saturating_sub(reached) < DEFAULT_BATCH as u64 {
                    break;
                }
            }
            shadow.flush()?;
            Ok(true)
        })();
        let outcome = match result {
            Ok(true) => {
                let generation = self.generation();
                self.hand_over(Arc::new(shadow));
                // The worker installs it between two batches.
                let deadline = Instant::now() + Duration::from_secs(600);
                while self.generation() == generation {
                    if Instant::now() > deadline {
                        metrics::gauge!("stemedb_projection_rebuild_in_progress", "projection" => name).set(0.0);
                        return Err(ProjectionError { projection: name, message: "the worker did not install the rebuilt store".into() });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                progress.swapped.store(true, Ordering::Relaxed);
                Ok(true)
            }
            Ok(false) => {
                drop(shadow);
                self.discard_shadow();
                Ok(false)
            }
            Err(e) => {
                drop(shadow);
                self.discard_shadow();
                Err(e)
            }
        };
        metrics::gauge!("stemedb_projection_rebuild_in_progress", "projection" => name).set(0.0);
        outcome
    }

    fn open_shadow_store(&self) -> Result<Box<dyn Projection>, ProjectionError> {
        Ok(Box::new(self.open_shadow()?))
    }

    fn install_shadow_offline(&self) -> Result<(), ProjectionError> {
        super::slot::replace_path(&self.shadow_path(), self.live_path())
            .map_err(|e| ProjectionError { projection: Slot::name(self), message: format!("cannot install the rebuilt store: {e}") })
    }

    fn remove_shadow(&self) {
        self.discard_shadow();
    }

    fn shadow_location(&self) -> std::path::PathBuf {
        self.shadow_path()
    }

    fn verify(&self, wal_dir: &std::path::Path) -> Result<super::verify::Comparison, ProjectionError> {
        super::verify::verify_slot(self, wal_dir)
    }
}

/// Why a job could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A name that is not a projection.
    #[error("unknown projection {0:?}")]
    Unknown(String),
    /// Another job is rebuilding it.
    #[error("projection {0} is already being rebuilt by job {1}")]
    Busy(&'static str, String),
    /// Nothing asked for.
    #[error("name at least one projection")]
    Empty,
}

/// The rebuild jobs of this process.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<Vec<Arc<Job>>>,
    next: AtomicU64,
}

impl Jobs {
    /// Starts a job over `slots` (by name, from `all`).
    pub fn start(&self, names: &[String], all: &[Arc<dyn Rebuildable>], feed: LogFeed) -> Result<Arc<Job>, StartError> {
        if names.is_empty() {
            return Err(StartError::Empty);
        }
        let mut chosen: Vec<Arc<dyn Rebuildable>> = Vec::new();
        for n in names {
            let slot = all.iter().find(|s| s.name() == n).ok_or_else(|| StartError::Unknown(n.clone()))?;
            if !chosen.iter().any(|c| c.name() == slot.name()) {
                chosen.push(slot.clone());
            }
        }
        let mut jobs = self.jobs.lock().map_err(|_| StartError::Empty)?;
        for j in jobs.iter().filter(|j| j.state() == JobState::Running) {
            if let Some(busy) = chosen.iter().find(|c| j.projections.contains(&c.name())) {
                return Err(StartError::Busy(busy.name(), j.id.clone()));
            }
        }
        let id = format!("rebuild-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let job = Arc::new(Job::new(id, chosen.iter().map(|c| c.name()).collect()));
        jobs.push(job.clone());
        let j = job.clone();
        std::thread::Builder::new()
            .name(format!("rebuild-{}", job.id))
            .spawn(move || {
                tracing::info!(job = %j.id, projections = ?j.projections, "online rebuild started");
                for slot in &chosen {
                    match slot.rebuild_online(&feed, &j) {
                        Ok(true) => tracing::info!(job = %j.id, projection = slot.name(), "rebuilt and swapped in"),
                        Ok(false) => {
                            tracing::info!(job = %j.id, projection = slot.name(), "rebuild cancelled; old store kept");
                            j.set_state(JobState::Cancelled);
                            return;
                        }
                        Err(e) => {
                            tracing::error!(job = %j.id, projection = slot.name(), error = %e, "rebuild failed; old store kept");
                            j.set_state(JobState::Failed(e.to_string()));
                            return;
                        }
                    }
                }
                j.set_state(JobState::Completed);
            })
            .map_err(|_| StartError::Empty)?;
        Ok(job)
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().ok()?.iter().find(|j| j.id == id).cloned()
    }

    /// The running job rebuilding `projection`, if any.
    pub fn running_for(&self, projection: &str) -> Option<Arc<Job>> {
        self.jobs.lock().ok()?.iter().find(|j| j.state() == JobState::Running && j.projections.contains(&projection)).cloned()
    }

    /// Every job, oldest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().map(|j| j.clone()).unwrap_or_default()
    }
}
