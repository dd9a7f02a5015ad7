//! Batches applied in memory that readers see before the store has them.
//!
//! Why: a live store's durable redb commit writes every page the commits
//! since the previous one copied, then fsyncs; at 2,000 writes/s that took
//! 50–250 ms, and while it ran the worker applied nothing, so every write
//! acknowledged meanwhile became visible only after it. Those stalls were
//! the write → visible p99.
//!
//! So a live store applies each batch in memory into an immutable chunk
//! (the rows it will write, and the state readers need), publishes it at
//! once, and a committer thread writes the chunks to redb behind it,
//! several per transaction when it has fallen behind. The committer's
//! stalls now delay only the redb copy, never what readers see.
//!
//! **Consistency.** A reader (or the worker applying the next batch) takes
//! the chunk list first, then a redb read transaction, and ignores the
//! chunks at or below that transaction's checkpoint. The committer removes
//! chunks from the list only after the commit that contains them, and a
//! commit always covers whole chunks, so every event is seen exactly once
//! whichever side of a commit a reader lands on.
//!
//! **Durability** is unchanged: the WAL is the durable copy. Commits are
//! durable at most once per sync interval (and when the store goes idle),
//! and a crash loses only staged chunks and non-durable commits, which the
//! worker re-applies from the last durable checkpoint.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};

use super::ProjectionError;
use crate::model::LogRecord;

/// Most events held in chunks not yet written before [`Staged::push`]
/// waits for the committer: bounds memory when the store falls behind
/// (catch-up, a slow disk) while leaving room for a full batch in flight.
pub const MAX_STAGED_EVENTS: usize = 65_536;

/// Most chunks staged before [`Staged::push`] waits: every read looks
/// through the staged chunks, so when commits stall with small batches
/// (a worker applies every millisecond) this bounds a read's extra work.
/// A normal 100 ms commit interval stages about a hundred.
pub const MAX_STAGED_CHUNKS: usize = 4_096;

/// Longest a staged chunk waits for the committer (or the sync interval,
/// if shorter): readers see it meanwhile, so this bounds only how many
/// chunks they merge and how much a crash makes the worker re-apply.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Staged events that make the committer write at once instead of waiting
/// for the commit interval (a worker catching up applies far more).
pub const COMMIT_EVENTS: usize = 8_192;

/// Which consecutive events of the log a chunk holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    /// Position of its first event.
    pub first: u64,
    /// Position of its last event.
    pub last: u64,
    /// How many events it holds (for [`MAX_STAGED_EVENTS`]).
    pub events: usize,
}

impl Extent {
    /// The extent of `records`, refused unless they continue a store at
    /// position `at` (0: an empty store, which may start anywhere).
    pub fn of(records: &[LogRecord], at: u64, err: fn(String) -> ProjectionError) -> Result<Extent, ProjectionError> {
        let (Some(first), Some(last)) = (records.first().map(|r| r.position), records.last().map(|r| r.position)) else {
            return Err(err("nothing to apply".into()));
        };
        if at != 0 && first != at + 1 {
            return Err(err(format!("batch starts at {first} but the store is at {at}")));
        }
        Ok(Extent { first, last, events: records.len() })
    }
}

/// One applied batch, as a store stages it.
pub trait Chunk: Send + Sync + 'static {
    /// The events it holds.
    fn extent(&self) -> Extent;
}

/// How many leading `chunks` a redb snapshot whose checkpoint is
/// `committed` already holds (commits always cover whole chunks).
pub fn committed_prefix<C: Chunk>(chunks: &[Arc<C>], committed: u64) -> usize {
    chunks.iter().take_while(|c| c.extent().last <= committed).count()
}

/// The last position a view reflects: the newest of `beyond` (the chunks
/// past its snapshot), else the snapshot's checkpoint.
pub fn view_position<C: Chunk>(beyond: &[Arc<C>], committed: u64) -> u64 {
    beyond.last().map_or(committed, |c| c.extent().last)
}

/// Writes consecutive chunks and their last position as the checkpoint in
/// one transaction of the given durability.
pub type WriteChunks<C> = Box<dyn FnMut(&[Arc<C>], Durability) -> Result<(), ProjectionError> + Send>;

/// Commits chunks to a redb store (see [`write_redb`]).
pub type WriteRedb<C> = fn(&Database, &[Arc<C>], Durability) -> Result<(), ProjectionError>;

/// Makes every earlier commit durable (an empty durable commit).
pub type SyncStore = Box<dyn FnMut() -> Result<(), ProjectionError> + Send>;

/// The staged chunks of one store and the thread that writes them.
pub struct Staged<C: Chunk> {
    shared: Arc<Shared<C>>,
    committer: Option<JoinHandle<()>>,
}

struct Shared<C> {
    state: Mutex<State<C>>,
    changed: Condvar,
}

struct State<C> {
    /// Chunks not yet known to be committed, oldest first. Replaced, never
    /// mutated, so a reader's snapshot is one `Arc` clone.
    chunks: Arc<Vec<Arc<C>>>,
    /// Events in `chunks`.
    events: usize,
    /// The last write failed with this (cleared by the next success).
    error: Option<String>,
    /// Failed writes so far: a waiter fails only on a failure that
    /// happened while it waited, not on an older one being retried.
    failures: u64,
    /// The committer thread is gone (it panicked): nothing will be written.
    dead: bool,
    /// Whether a commit since the last durable one was not durable.
    unsynced: bool,
    /// When the oldest staged chunk was staged (about: reset after each commit).
    since: Option<Instant>,
    /// Callers of [`Staged::drain`] waiting: commit without waiting.
    draining: usize,
    /// Commits that are merely due wait (tests: to look at a store with
    /// chunks staged); drains and a full stage still commit.
    held: bool,
    stop: bool,
}

impl<C: Chunk> Staged<C> {
    /// Starts the committer thread `commit-<name>`, which writes through
    /// `write` and makes commits durable through `sync` at most every
    /// `sync_every` (and once the store has been idle that long).
    pub fn start(name: &'static str, sync_every: Duration, write: WriteChunks<C>, sync: SyncStore) -> Result<Staged<C>, ProjectionError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                chunks: Arc::new(Vec::new()),
                events: 0,
                error: None,
                failures: 0,
                dead: false,
                unsynced: false,
                since: None,
                draining: 0,
                held: false,
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let committer = std::thread::Builder::new()
            .name(format!("commit-{name}"))
            .spawn(move || commit_loop(name, &s, sync_every, write, sync))
            .map_err(|e| ProjectionError { projection: name, message: format!("cannot start the committer thread: {e}") })?;
        Ok(Staged { shared, committer: Some(committer) })
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks not yet committed, oldest first. Take this *before* the
    /// redb read transaction it is merged with (see the module docs).
    pub fn snapshot(&self) -> Arc<Vec<Arc<C>>> {
        self.lock().chunks.clone()
    }

    /// Publishes `chunk` (which must continue the last one) to readers and
    /// queues it for writing. Waits while [`MAX_STAGED_EVENTS`] or
    /// [`MAX_STAGED_CHUNKS`] are staged;
    /// if the committer is failing meanwhile, returns its error and stages
    /// nothing, so the caller can retry the same events later.
    pub fn push(&self, name: &'static str, chunk: C) -> Result<(), ProjectionError> {
        let mut s = self.lock();
        let seen = s.failures;
        while s.events >= MAX_STAGED_EVENTS || s.chunks.len() >= MAX_STAGED_CHUNKS {
            if s.dead || s.failures > seen {
                return Err(cannot_write(name, &s));
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(prev) = s.chunks.last()
            && chunk.extent().first != prev.extent().last + 1
        {
            return Err(ProjectionError {
                projection: name,
                message: format!("batch starts at {} but the staged ones end at {}", chunk.extent().first, prev.extent().last),
            });
        }
        let mut chunks = Vec::with_capacity(s.chunks.len() + 1);
        chunks.extend(s.chunks.iter().cloned());
        s.events += chunk.extent().events;
        s.since.get_or_insert_with(Instant::now);
        chunks.push(Arc::new(chunk));
        s.chunks = Arc::new(chunks);
        metrics::gauge!("stemedb_projection_staged_events", "projection" => name).set(s.events as f64);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until every chunk staged when it is called is committed (not
    /// the ones pushed meanwhile, so it ends under a steady load); returns
    /// an error if a write fails while it waits.
    pub fn drain(&self, name: &'static str) -> Result<(), ProjectionError> {
        let mut s = self.lock();
        let Some(target) = s.chunks.last().map(|c| c.extent().last) else { return Ok(()) };
        let seen = s.failures;
        s.draining += 1;
        self.shared.changed.notify_all();
        let mut result = Ok(());
        while s.chunks.first().is_some_and(|c| c.extent().first <= target) {
            if s.dead || s.failures > seen {
                result = Err(cannot_write(name, &s));
                break;
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.draining -= 1;
        result
    }

    /// Pauses (true) or resumes (false) the committer's timed commits after
    /// its current write: tests use it to read a store while chunks are
    /// staged. A drain, or a full stage, still commits.
    pub fn hold(&self, held: bool) {
        self.lock().held = held;
        self.shared.changed.notify_all();
    }
}

impl<C: Chunk> Drop for Staged<C> {
    fn drop(&mut self) {
        // Staged chunks are dropped unwritten: the log still has them, and
        // the worker re-applies from the store's checkpoint on the next start.
        self.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

/// Where both redb stores keep their checkpoint (`"checkpoint"` → position).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Starts the committer of a redb store: `write` commits chunks (usually
/// through [`write_redb`]); idle syncs are empty durable commits.
pub fn start_redb<C: Chunk>(
    name: &'static str,
    db: &Arc<Database>,
    write: WriteRedb<C>,
    err: fn(String) -> ProjectionError,
) -> Result<Staged<C>, ProjectionError> {
    let (w, f) = (db.clone(), db.clone());
    Staged::start(
        name,
        super::store_tuning().sync_interval,
        Box::new(move |chunks, durability| write(&w, chunks, durability)),
        Box::new(move || super::flush_redb(&f, err)),
    )
}

/// Commits consecutive `chunks` in one redb transaction: `rows` writes
/// their rows, and the checkpoint moves to the last chunk's position. Chunks
/// that do not continue the store's checkpoint are refused, so no event is
/// ever written twice or skipped.
pub fn write_redb<C: Chunk>(
    db: &Database,
    chunks: &[Arc<C>],
    durability: Durability,
    err: fn(String) -> ProjectionError,
    rows: impl FnOnce(&WriteTransaction) -> Result<(), ProjectionError>,
) -> Result<(), ProjectionError> {
    let (Some(head), Some(tail)) = (chunks.first(), chunks.last()) else { return Ok(()) };
    let e = |x: &dyn std::fmt::Display| err(x.to_string());
    let mut tx = db.begin_write().map_err(|x| e(&x))?;
    tx.set_durability(durability).map_err(|x| e(&x))?;
    {
        let mut meta = tx.open_table(META).map_err(|x| e(&x))?;
        if let Some(cp) = meta.get("checkpoint").map_err(|x| e(&x))?.map(|v| v.value())
            && head.extent().first != cp + 1
        {
            return Err(err(format!("batch starts at {} but the checkpoint is {cp}", head.extent().first)));
        }
        rows(&tx)?;
        meta.insert("checkpoint", tail.extent().last).map_err(|x| e(&x))?;
    }
    tx.commit().map_err(|x| e(&x))
}

fn cannot_write<C>(name: &'static str, s: &State<C>) -> ProjectionError {
    let why = if s.dead { "its committer thread stopped" } else { s.error.as_deref().unwrap_or("a commit failed") };
    ProjectionError { projection: name, message: format!("the store cannot write: {why}") }
}

/// Marks the committer dead if its thread ends by a panic, so that
/// `push` and `drain` fail instead of waiting for it forever.
struct Obituary<'a, C>(&'a Shared<C>);

impl<C> Drop for Obituary<'_, C> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
            s.dead = true;
            self.0.changed.notify_all();
        }
    }
}

fn commit_loop<C: Chunk>(name: &'static str, shared: &Shared<C>, sync_every: Duration, mut write: WriteChunks<C>, mut sync: SyncStore) {
    let _obituary = Obituary(shared);
    let lock = || shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut last_durable = Instant::now();
    let commit_every = sync_every.min(COMMIT_INTERVAL);
    loop {
        // Wait for chunks; when none come for a sync interval after a
        // non-durable commit, make it durable so that an idle store does
        // not leave its recent events to a replay after a crash.
        let mut idle_sync = false;
        let batch = {
            let mut s = lock();
            loop {
                if s.stop {
                    return;
                }
                // Commits are batched: each copies every B-tree page it
                // touches, so one commit per applied batch (a millisecond
                // apart under a steady load) cost the committer about 130 µs
                // of CPU per event; readers see staged chunks meanwhile.
                let due = s.since.is_some_and(|t| t.elapsed() >= commit_every);
                let forced = s.draining > 0 || s.events >= MAX_STAGED_EVENTS || s.chunks.len() >= MAX_STAGED_CHUNKS;
                if !s.chunks.is_empty() && (forced || (!s.held && (s.events >= COMMIT_EVENTS || due))) {
                    break Some(s.chunks.clone());
                }
                if s.chunks.is_empty() && s.unsynced && !s.held && last_durable.elapsed() >= sync_every {
                    idle_sync = true;
                    break None;
                }
                // Sleep until the next thing that can become due (a push,
                // drain or hold change wakes it earlier).
                let timeout = match s.since {
                    _ if s.held => Duration::from_secs(3600),
                    Some(t) => commit_every.saturating_sub(t.elapsed()),
                    None if s.unsynced => sync_every.saturating_sub(last_durable.elapsed()),
                    None => Duration::from_secs(3600),
                };
                s = shared.changed.wait_timeout(s, timeout.max(Duration::from_millis(1))).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        let durable = idle_sync || last_durable.elapsed() >= sync_every;
        let started = Instant::now();
        let result = match &batch {
            Some(chunks) => write(chunks, if durable { Durability::Immediate } else { Durability::None }),
            None => sync(),
        };
        metrics::histogram!("stemedb_projection_commit_seconds", "projection" => name).record(started.elapsed().as_secs_f64());
        let mut s = lock();
        match result {
            Ok(()) => {
                if durable {
                    last_durable = Instant::now();
                }
                s.unsynced = !durable;
                s.error = None;
                if let Some(done) = batch {
                    // Everything written leaves the list; chunks pushed
                    // meanwhile stay, in order.
                    let rest: Vec<Arc<C>> = s.chunks[done.len()..].to_vec();
                    s.events = rest.iter().map(|c| c.extent().events).sum();
                    s.since = (!rest.is_empty()).then(Instant::now);
                    s.chunks = Arc::new(rest);
                    metrics::gauge!("stemedb_projection_staged_events", "projection" => name).set(s.events as f64);
                }
                shared.changed.notify_all();
            }
            Err(e) => {
                metrics::counter!("stemedb_projection_commit_errors_total", "projection" => name).increment(1);
                tracing::error!(projection = name, error = %e, "projection commit failed; readers still see the staged events; retrying in 1 s");
                s.error = Some(e.message);
                s.failures += 1;
                shared.changed.notify_all();
                let _ = shared.changed.wait_timeout_while(s, Duration::from_secs(1), |s| !s.stop);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    struct Span(u64, u64);

    impl Chunk for Span {
        fn extent(&self) -> Extent {
            Extent { first: self.0, last: self.1, events: (self.1 - self.0 + 1) as usize }
        }
    }

    /// A store whose writes record the last position written, and fail
    /// while `failing` is set (or panic, if `panicking` is).
    fn store(written: Arc<AtomicU64>, failing: Arc<AtomicBool>, panicking: bool) -> Staged<Span> {
        slow_store(written, failing, panicking, Duration::ZERO)
    }

    /// [`store`] whose writes take `delay`.
    fn slow_store(written: Arc<AtomicU64>, failing: Arc<AtomicBool>, panicking: bool, delay: Duration) -> Staged<Span> {
        let write: WriteChunks<Span> = Box::new(move |chunks, _| {
            assert!(!panicking, "a write that panics");
            std::thread::sleep(delay);
            if failing.load(Ordering::SeqCst) {
                return Err(ProjectionError { projection: "test", message: "disk full".into() });
            }
            let last = chunks.last().map_or(0, |c| c.extent().last);
            written.store(last, Ordering::SeqCst);
            Ok(())
        });
        Staged::start("test", Duration::from_millis(50), write, Box::new(|| Ok(()))).expect("start")
    }

    /// A drain ends once what was staged when it began is written, even
    /// while new chunks keep arriving (a verification under load).
    #[test]
    fn drain_ends_under_a_steady_load() {
        let written = Arc::new(AtomicU64::new(0));
        // Each write outlasts the gap between pushes, so the stage is never
        // empty while the pusher runs.
        let staged = Arc::new(slow_store(written.clone(), Arc::new(AtomicBool::new(false)), false, Duration::from_millis(20)));
        staged.push("test", Span(1, 10)).expect("push");
        let stop = Arc::new(AtomicBool::new(false));
        let pusher = {
            let (staged, stop) = (staged.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut next = 11;
                while !stop.load(Ordering::SeqCst) {
                    staged.push("test", Span(next, next)).expect("push");
                    next += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        // A drain that waited for an empty stage would never end here; the
        // watchdog turns that hang into a failure.
        let (done, wait) = std::sync::mpsc::channel();
        let drainer = {
            let staged = staged.clone();
            std::thread::spawn(move || {
                let _ = done.send(staged.drain("test"));
            })
        };
        let drained = wait.recv_timeout(Duration::from_secs(30));
        stop.store(true, Ordering::SeqCst);
        pusher.join().expect("pusher");
        drainer.join().expect("drainer");
        drained.expect("the drain ended while chunks kept arriving").expect("drain");
        assert!(written.load(Ordering::SeqCst) >= 10);
    }

    /// Failing writes keep chunks staged (readers still see them); a full
    /// stage and a drain then fail instead of waiting forever, and both
    /// succeed again once the store can write.
    #[test]
    fn failing_writes_fail_waiters_then_recover() {
        let written = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(true));
        let staged = store(written.clone(), failing.clone(), false);
        let n = MAX_STAGED_EVENTS as u64;
        staged.push("test", Span(1, n)).expect("the first push fits");
        let err = staged.push("test", Span(n + 1, n + 1)).expect_err("a full stage with failing writes");
        assert!(err.message.contains("disk full"), "{err}");
        assert_eq!(staged.snapshot().len(), 1, "the failed push staged nothing; the first chunk is still visible");
        assert!(staged.drain("test").is_err());
        failing.store(false, Ordering::SeqCst);
        staged.drain("test").expect("drain after recovery");
        assert_eq!(written.load(Ordering::SeqCst), n);
        staged.push("test", Span(n + 1, n + 1)).expect("push after recovery");
    }

    /// A committer that panics is reported, not waited for.
    #[test]
    fn a_dead_committer_fails_drains() {
        let staged = store(Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)), true);
        staged.push("test", Span(1, 1)).expect("push");
        let err = staged.drain("test").expect_err("the committer panicked");
        assert!(err.message.contains("committer thread stopped"), "{err}");
    }

    /// Many small chunks are bounded too: with timed commits held, the
    /// chunk that would pass the bound makes the committer write instead
    /// of staging without end.
    #[test]
    fn many_small_chunks_force_a_commit() {
        let written = Arc::new(AtomicU64::new(0));
        let staged = store(written.clone(), Arc::new(AtomicBool::new(false)), false);
        staged.hold(true);
        let n = MAX_STAGED_CHUNKS as u64 + 10;
        for p in 1..=n {
            staged.push("test", Span(p, p)).expect("push");
            assert!(staged.snapshot().len() <= MAX_STAGED_CHUNKS);
        }
        assert!(written.load(Ordering::SeqCst) >= MAX_STAGED_CHUNKS as u64, "a commit was forced");
    }

    /// A chunk that does not continue the staged ones is refused.
    #[test]
    fn gaps_are_refused() {
        let staged = store(Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)), false);
        staged.hold(true);
        staged.push("test", Span(1, 5)).expect("push");
        assert!(staged.push("test", Span(7, 8)).is_err());
        assert!(staged.push("test", Span(5, 8)).is_err());
        staged.push("test", Span(6, 8)).expect("push");
        staged.drain("test").expect("a drain commits even while held");
        assert!(staged.snapshot().is_empty());
    }
}
