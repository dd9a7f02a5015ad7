//! The projection worker: one thread per projection that follows the log.
//!
//! It is woken by the committer's `async-broadcast` channel rather than by
//! polling, reads with a long-lived [`WalReader`] (never past the committed
//! position), applies up to `batch` events per call, and publishes the
//! *visible* position on a `watch` channel that read-your-writes queries
//! wait on. Between batches it installs a rebuilt store when a rebuild
//! hands one over (see [`Slot`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::slot::Slot;
use super::{Projection, ProjectionError};
use crate::model::LogRecord;
use crate::wal::WalReader;

/// Largest number of events applied in one call (one staged batch).
pub const DEFAULT_BATCH: usize = 50_000;

/// Shortest time between the starts of two small applies. Every apply has
/// a fixed cost (a snapshot, a staged chunk that readers then look
/// through; for search, a tantivy batch), and under a steady write load a
/// worker woken per group commit would pay it for a handful of events;
/// waiting this long lets events accumulate, at the price of this much
/// extra visibility lag. It was 5 ms while an apply meant a redb commit;
/// staging made applies cheap. Full batches (catch-up) are never delayed.
pub const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(1);

/// A running worker.
pub struct Worker {
    /// The projection's name.
    pub name: &'static str,
    visible: watch::Receiver<u64>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a worker reads from and listens to.
#[derive(Clone)]
pub struct LogFeed {
    /// The WAL directory.
    pub wal_dir: std::path::PathBuf,
    /// The committed head.
    pub committed: Arc<AtomicU64>,
    /// Woken on every commit; closed at shutdown.
    pub notify: async_broadcast::Receiver<u64>,
}

impl Worker {
    /// Starts following the log for the store in `slot`.
    pub fn spawn<T: Projection>(slot: Arc<Slot<T>>, feed: LogFeed, batch: usize) -> std::io::Result<Worker> {
        let name = slot.name();
        let start = slot.load().checkpoint().unwrap_or(0);
        let (tx, rx) = watch::channel(start);
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let background = slot.load().background();
        let thread = std::thread::Builder::new().name(format!("proj-{name}")).spawn(move || {
            if background {
                crate::priority::lower_current_thread();
            }
            match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => run(slot, feed, tx, f, batch, &rt),
                Err(e) => tracing::error!(projection = name, error = %e, "cannot start the worker's timer runtime"),
            }
        })?;
        Ok(Worker { name, visible: rx, failed, thread: Some(thread) })
    }

    /// The last visible position.
    pub fn visible(&self) -> u64 {
        *self.visible.borrow()
    }

    /// A receiver to wait for positions on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible.clone()
    }

    /// Whether the last apply failed (the worker retries).
    pub fn failing(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits for the thread to finish (it exits when the log's committer stops).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads up to `max` records from `r` (bounded by its `until`).
pub fn read_batch(r: &mut WalReader, buf: &mut Vec<LogRecord>, max: usize) -> Result<(), crate::wal::WalError> {
    while buf.len() < max {
        match r.next_record()? {
            Some(rec) => buf.push(rec),
            None => break,
        }
    }
    Ok(())
}

/// Applies the log to `store` from its checkpoint up to `until`, in
/// batches; `progress` is called after each batch with the last position.
/// Used to catch a shadow up and by rebuilds.
pub fn replay_into<T: Projection + ?Sized>(
    store: &T,
    wal_dir: &std::path::Path,
    until: u64,
    batch: usize,
    mut progress: impl FnMut(u64) -> bool,
) -> Result<u64, ProjectionError> {
    let perr = |e: crate::wal::WalError| ProjectionError { projection: store.name(), message: e.to_string() };
    let mut pos = store.checkpoint()?;
    if pos >= until {
        return Ok(pos);
    }
    let mut reader = WalReader::open(wal_dir, pos + 1).map_err(perr)?;
    reader.set_until(until);
    let mut buf = Vec::with_capacity(batch.min(65_536));
    while pos < until {
        buf.clear();
        read_batch(&mut reader, &mut buf, batch).map_err(perr)?;
        let Some(last) = buf.last().map(|r| r.position) else {
            return Err(ProjectionError { projection: store.name(), message: format!("the log ends at {pos}, before position {until}") });
        };
        store.apply(&buf)?;
        pos = last;
        if !progress(pos) {
            break;
        }
    }
    Ok(pos)
}

/// Records per batch a [`bulk_replay`] reads and hands to every store.
pub const READ_BATCH: usize = 16_384;

/// Replays the log up to `until` into several stores that nobody reads yet
/// (shadows, verification copies), each from its own checkpoint, decoding
/// the log once: this thread reads and decodes, and one thread per store
/// applies the same batches (shared, not copied) through its
/// [`BulkLoad`](super::BulkLoad) if it has one, else through `apply`.
/// `progress(i, position)` is called after each batch of store `i`;
/// returning false stops the replay early. Returns, per store, the last
/// position applied (durable for a bulk load; call `flush` for the others)
/// and the time it took.
pub fn bulk_replay(
    stores: &[&dyn Projection],
    wal_dir: &std::path::Path,
    until: u64,
    progress: &(dyn Fn(usize, u64) -> bool + Sync),
) -> Result<Vec<(u64, Duration)>, ProjectionError> {
    let started = Instant::now();
    let starts = stores.iter().map(|s| s.checkpoint()).collect::<Result<Vec<u64>, _>>()?;
    let Some(from) = starts.iter().copied().min() else { return Ok(Vec::new()) };
    if from >= until {
        return Ok(starts.into_iter().map(|p| (p, started.elapsed())).collect());
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for (i, store) in stores.iter().enumerate() {
            // Two batches in flight per store: enough to keep both busy
            // while bounding the decoded records held in memory.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<LogRecord>>>(2);
            senders.push(tx);
            let (start, stop) = (starts[i], &stop);
            let thread = std::thread::Builder::new()
                .name(format!("rebuild-{}", store.name()))
                .spawn_scoped(scope, move || {
                    let r = consume(*store, rx, start, until, stop, &|p| progress(i, p));
                    if r.is_err() {
                        stop.store(true, Ordering::Release);
                    }
                    r.map(|p| (p, started.elapsed()))
                })
                .map_err(|e| ProjectionError { projection: store.name(), message: e.to_string() })?;
            handles.push(thread);
        }
        let read = (|| {
            let perr = |e: crate::wal::WalError| ProjectionError { projection: "log", message: e.to_string() };
            let mut reader = WalReader::open(wal_dir, from + 1).map_err(perr)?;
            reader.set_until(until);
            let mut pos = from;
            while pos < until && !stop.load(Ordering::Acquire) {
                let mut buf = Vec::with_capacity(READ_BATCH);
                read_batch(&mut reader, &mut buf, READ_BATCH).map_err(perr)?;
                let Some(last) = buf.last().map(|r| r.position) else {
                    return Err(ProjectionError { projection: "log", message: format!("the log ends at {pos}, before position {until}") });
                };
                pos = last;
                let batch = Arc::new(buf);
                // A store that stopped (error or cancel) drops its receiver.
                senders.retain(|s| s.send(batch.clone()).is_ok());
                if senders.is_empty() {
                    break;
                }
            }
            Ok(())
        })();
        if read.is_err() {
            stop.store(true, Ordering::Release);
        }
        drop(senders);
        let results: Vec<Result<(u64, Duration), ProjectionError>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ProjectionError { projection: "log", message: "a rebuild thread panicked".into() })))
            .collect();
        read?;
        results.into_iter().collect()
    })
}

/// One store's side of [`bulk_replay`].
fn consume(
    store: &dyn Projection,
    rx: std::sync::mpsc::Receiver<Arc<Vec<LogRecord>>>,
    start: u64,
    until: u64,
    stop: &AtomicBool,
    progress: &dyn Fn(u64) -> bool,
) -> Result<u64, ProjectionError> {
    let mut bulk = store.bulk_load()?;
    let mut pos = start;
    for batch in rx {
        if stop.load(Ordering::Acquire) {
            return Err(ProjectionError { projection: store.name(), message: "stopped: another part of the rebuild failed".into() });
        }
        let skip = batch.partition_point(|r| r.position <= pos);
        let records = &batch[skip..];
        let Some(last) = records.last().map(|r| r.position) else { continue };
        match bulk.as_mut() {
            Some(b) => b.push_shared(&batch, skip)?,
            None => {
                store.apply(records)?;
            }
        }
        pos = last;
        if !progress(pos) {
            // Cancelled: nothing more is written; the caller discards the store.
            return Ok(pos);
        }
    }
    if pos < until {
        return Err(ProjectionError { projection: store.name(), message: format!("the replay stopped at {pos}, before {until}") });
    }
    match bulk {
        Some(b) => b.finish(),
        None => Ok(pos),
    }
}

enum Wake {
    Event,
    Idle,
    Closed,
}

fn wait(
    rt: &tokio::runtime::Runtime,
    notify: &mut async_broadcast::Receiver<u64>,
    wake: &tokio::sync::Notify,
    idle: Option<Duration>,
) -> Wake {
    rt.block_on(async {
        let timer = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = notify.recv() => match r {
                Ok(_) | Err(async_broadcast::RecvError::Overflowed(_)) => Wake::Event,
                Err(async_broadcast::RecvError::Closed) => Wake::Closed,
            },
            _ = wake.notified() => Wake::Event,
            _ = timer => Wake::Idle,
        }
    })
}

fn run<T: Projection>(
    slot: Arc<Slot<T>>,
    mut feed: LogFeed,
    visible: watch::Sender<u64>,
    failed: Arc<AtomicBool>,
    batch: usize,
    rt: &tokio::runtime::Runtime,
) {
    let name = slot.name();
    let mut p = slot.load();
    // `pos` is how far this worker has read and applied; `shown` is what
    // readers can see (equal for kv and lenses, which stage every batch).
    let mut pos = loop {
        match p.checkpoint() {
            Ok(c) => break c,
            Err(e) => fail(&failed, name, &e.to_string()),
        }
    };
    let mut shown = pos;
    // The gauge first: a reader woken by `visible` may scrape /metrics
    // next, and must not see an older position than the one it was told.
    let publish = |v: u64| {
        metrics::gauge!("stemedb_projection_position", "projection" => name).set(v as f64);
        let _ = visible.send(v);
    };
    publish(shown);
    let mut reader: Option<WalReader> = None;
    let mut buf = Vec::with_capacity(batch.min(65_536));
    let mut last_apply = Instant::now() - MIN_COMMIT_INTERVAL;
    loop {
        if feed.notify.is_closed() {
            break; // shutting down: the next start resumes from the checkpoint
        }
        if let Some(shadow) = slot.take_handover() {
            match install(&slot, shadow, &feed.wal_dir, pos, batch) {
                Ok(store) => {
                    // A shadow may have been built past this worker's position.
                    pos = store.checkpoint().unwrap_or(pos).max(pos);
                    p = store;
                    reader = None;
                    shown = pos;
                    publish(shown);
                    tracing::info!(projection = name, position = pos, "rebuilt store installed");
                }
                Err(e) => tracing::error!(projection = name, error = %e, "could not install the rebuilt store; keeping the old one"),
            }
            continue;
        }
        let head = feed.committed.load(Ordering::Acquire);
        metrics::gauge!("stemedb_projection_lag_events", "projection" => name).set(head.saturating_sub(shown) as f64);
        if head > pos && slot.stale().is_none() {
            if reader.is_none() {
                match WalReader::open(&feed.wal_dir, pos + 1) {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        fail(&failed, name, &e.to_string());
                        continue;
                    }
                }
            }
            let Some(r) = reader.as_mut() else { continue };
            r.set_until(head);
            buf.clear();
            if let Err(e) = read_batch(r, &mut buf, batch) {
                reader = None;
                fail(&failed, name, &e.to_string());
                continue;
            }
            if buf.is_empty() {
                // The committed position is ahead of what the file shows
                // (should not happen); re-open on the next round.
                reader = None;
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if buf.len() < batch
                && let Some(wait) = MIN_COMMIT_INTERVAL.checked_sub(last_apply.elapsed())
            {
                // Small batch soon after the previous one: let more arrive.
                std::thread::sleep(wait);
                r.set_until(feed.committed.load(Ordering::Acquire));
                let _ = read_batch(r, &mut buf, batch);
            }
            last_apply = Instant::now();
            match p.apply(&buf) {
                Ok(v) => {
                    failed.store(false, Ordering::Relaxed);
                    pos = buf.last().map(|r| r.position).unwrap_or(pos);
                    metrics::histogram!("stemedb_projection_apply_seconds", "projection" => name)
                        .record(last_apply.elapsed().as_secs_f64());
                    if v != shown {
                        shown = v;
                        publish(shown);
                    }
                }
                Err(e) => {
                    // Nothing was committed; re-read the same events.
                    reader = None;
                    fail(&failed, name, &e.to_string());
                }
            }
            continue;
        }
        let idle = if shown < pos { p.idle_flush() } else { None };
        match wait(rt, &mut feed.notify, &slot.wake, idle) {
            Wake::Event => {}
            Wake::Closed => break,
            Wake::Idle => match p.flush() {
                Ok(v) => {
                    shown = v;
                    publish(shown);
                }
                Err(e) => fail(&failed, name, &e.to_string()),
            },
        }
    }
    if let Err(e) = p.flush() {
        tracing::warn!(projection = name, error = %e, "final flush failed; the next start re-applies from the last durable checkpoint");
    }
    tracing::info!(projection = name, position = pos, "projection worker stopped");
}

/// Catches `shadow` up to `pos`, makes it durable and swaps it in.
fn install<T: Projection>(
    slot: &Slot<T>,
    shadow: Arc<T>,
    wal_dir: &std::path::Path,
    pos: u64,
    batch: usize,
) -> Result<Arc<T>, ProjectionError> {
    replay_into(&*shadow, wal_dir, pos, batch, |_| true)?;
    shadow.flush()?;
    slot.install(shadow)
}

fn fail(failed: &AtomicBool, name: &str, err: &str) {
    failed.store(true, Ordering::Relaxed);
    tracing::error!(projection = name, error = err, "projection apply failed; retrying in 1 s");
    std::thread::sleep(Duration::from_secs(1));
}
