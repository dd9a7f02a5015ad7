//! The projection worker: one thread per projection that follows the log.
//!
//! It is woken by the committer's `async-broadcast` channel rather than by
//! polling, reads with a long-lived [`WalReader`] (never past the committed
//! position), applies up to `batch` events per transaction, and publishes
//! the applied position on a `watch` channel that read-your-writes queries
//! wait on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Projection;
use crate::wal::WalReader;

/// Largest number of events applied in one transaction.
pub const DEFAULT_BATCH: usize = 10_000;

/// A running worker.
pub struct Worker {
    /// The projection's name.
    pub name: &'static str,
    applied: watch::Receiver<u64>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts following the log in `wal_dir` for `projection`.
    pub fn spawn(
        projection: Arc<dyn Projection>,
        wal_dir: std::path::PathBuf,
        committed: Arc<AtomicU64>,
        notify: async_broadcast::Receiver<u64>,
        batch: usize,
    ) -> std::io::Result<Worker> {
        let name = projection.name();
        let start = projection.checkpoint().unwrap_or(0);
        let (tx, rx) = watch::channel(start);
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proj-{name}"))
            .spawn(move || run(projection, wal_dir, committed, notify, tx, f, batch))?;
        Ok(Worker { name, applied: rx, failed, thread: Some(thread) })
    }

    /// The last applied position.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver to wait for positions on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.clone()
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

fn run(
    p: Arc<dyn Projection>,
    wal_dir: std::path::PathBuf,
    committed: Arc<AtomicU64>,
    mut notify: async_broadcast::Receiver<u64>,
    applied: watch::Sender<u64>,
    failed: Arc<AtomicBool>,
    batch: usize,
) {
    let name = p.name();
    let mut pos = loop {
        match p.checkpoint() {
            Ok(c) => break c,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                tracing::error!(projection = name, error = %e, "cannot read checkpoint; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let _ = applied.send(pos);
    metrics::gauge!("stemedb_projection_position", "projection" => name).set(pos as f64);
    let mut reader: Option<WalReader> = None;
    let mut buf = Vec::with_capacity(batch.min(65_536));
    loop {
        let head = committed.load(Ordering::Acquire);
        metrics::gauge!("stemedb_projection_lag_events", "projection" => name).set(head.saturating_sub(pos) as f64);
        if head > pos {
            if reader.is_none() {
                match WalReader::open(&wal_dir, pos + 1) {
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
            let read = loop {
                if buf.len() >= batch {
                    break Ok(());
                }
                match r.next_record() {
                    Ok(Some(rec)) => buf.push(rec),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = read {
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
            let t = Instant::now();
            match p.apply(&buf) {
                Ok(()) => {
                    failed.store(false, Ordering::Relaxed);
                    pos = buf.last().map(|r| r.position).unwrap_or(pos);
                    metrics::histogram!("stemedb_projection_apply_seconds", "projection" => name).record(t.elapsed().as_secs_f64());
                    metrics::gauge!("stemedb_projection_position", "projection" => name).set(pos as f64);
                    let _ = applied.send(pos);
                }
                Err(e) => {
                    // Nothing was committed; re-read the same events.
                    reader = None;
                    fail(&failed, name, &e.to_string());
                }
            }
            continue;
        }
        match notify.recv_blocking() {
            Ok(_) | Err(async_broadcast::RecvError::Overflowed(_)) => {}
            Err(async_broadcast::RecvError::Closed) => {
                // The committer stopped: apply anything it committed last, then exit.
                if committed.load(Ordering::Acquire) > pos {
                    continue;
                }
                break;
            }
        }
    }
    tracing::info!(projection = name, position = pos, "projection worker stopped");
}

fn fail(failed: &AtomicBool, name: &str, err: &str) {
    failed.store(true, Ordering::Relaxed);
    tracing::error!(projection = name, error = err, "projection apply failed; retrying in 1 s");
    std::thread::sleep(Duration::from_secs(1));
}
