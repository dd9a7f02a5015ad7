//! Group commit: many concurrent requests, one writer thread, one fdatasync
//! per group.
//!
//! Requests queue on a channel. The committer takes the first, drains the
//! rest that are waiting (up to a byte budget), checks each request against
//! the id index, appends one frame per request, syncs once, updates the
//! index, publishes the new committed position on an `async-broadcast`
//! channel, and only then answers every request of the group. Under load,
//! groups grow by themselves: the more requests wait during one fsync, the
//! more share the next.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::id_index::{self, IdEntry, IdIndex, IndexHandle, IndexReader};
use super::unindexed::Unindexed;
use crate::model::{Assertion, AssertionId, Event, Retraction};
use crate::wal::{WalError, WalReader, WalWriter, WriterOptions};

/// One thing to append.
#[derive(Clone, Debug)]
pub enum Item {
    /// A validated assertion and its id.
    Assert {
        /// `assertion.id()`.
        id: AssertionId,
        /// The assertion.
        assertion: Box<Assertion>,
    },
    /// A retraction.
    Retract(Retraction),
}

/// What happened to one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// Appended at `position`.
    Created {
        /// Log position.
        position: u64,
    },
    /// Already in the log at `position` (the original); nothing appended.
    Duplicate {
        /// The original position.
        position: u64,
    },
}

impl Outcome {
    /// The position the client should remember.
    pub fn position(&self) -> u64 {
        match self {
            Outcome::Created { position } | Outcome::Duplicate { position } => *position,
        }
    }
}

/// A write-time check that failed for one item of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemError {
    /// Index of the item in the request.
    pub index: usize,
    /// The field concerned.
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// The status this error maps to alone (422, 403 or 404).
    #[serde(skip)]
    pub status: u16,
}

/// Why a request was not committed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Some items failed write-time checks; nothing of the request was written.
    #[error("{} item(s) failed write-time checks", .0.len())]
    Rejected(Vec<ItemError>),
    /// The log cannot accept writes (I/O failure, shutting down).
    #[error("the log is not accepting writes: {0}")]
    Unavailable(String),
}

/// Tunables of the write path.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// WAL directory.
    pub wal_dir: PathBuf,
    /// Path of the id index file.
    pub index_path: PathBuf,
    /// WAL writer options.
    pub writer: WriterOptions,
    /// Most requests waiting before senders are pushed back.
    pub queue_depth: usize,
    /// Stop adding requests to a group past this many events.
    pub max_group_events: usize,
}

/// The answer to one request: its outcomes, and the `recorded_at` its new
/// events got (the whole group shares one).
#[derive(Clone, Debug)]
pub struct Committed {
    /// One outcome per item, in request order.
    pub outcomes: Vec<Outcome>,
    /// Server time stamped on the group.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

struct Job {
    items: Vec<Item>,
    reply: oneshot::Sender<Result<Committed, IngestError>>,
}

enum Msg {
    Job(Job),
    /// Seal the active segment (if it holds records) so it can be shipped;
    /// answers whether a segment was sealed.
    Seal(oneshot::Sender<Result<bool, String>>),
    /// Finish what is queued, then exit.
    Stop,
}

/// Cloneable handle to the write path.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Msg>,
    committed: Arc<AtomicU64>,
    failure: Arc<std::sync::OnceLock<String>>,
    notify: async_broadcast::InactiveReceiver<u64>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Ingest {
    /// Recovers the WAL, brings the id index up to date with it, and starts
    /// the committer thread.
    pub fn start(opts: IngestOptions) -> anyhow::Result<Ingest> {
        let (writer, recovered) = WalWriter::open(&opts.wal_dir, opts.writer.clone())?;
        if let Some(t) = &recovered.truncation {
            tracing::warn!(segment = %t.path.display(), bytes = t.bytes, first_dropped_position = t.first_dropped_position, "WAL tail truncated at start");
        }
        let head = writer.committed_position();
        let mut index = IdIndex::open(&opts.index_path)?;
        catch_up_index(&mut index, &opts.index_path, &opts.wal_dir, head)?;
        tracing::info!(position = head, segments = recovered.segments.len(), "WAL recovered");

        let committed = Arc::new(AtomicU64::new(head));
        let (mut btx, brx) = async_broadcast::broadcast(1);
        btx.set_overflow(true);
        btx.set_await_active(false);
        let (tx, rx) = mpsc::channel(opts.queue_depth);
        let c = committed.clone();
        let failure = Arc::new(std::sync::OnceLock::new());
        let f = failure.clone();
        let max_group = opts.max_group_events;
        let handle = index.handle();
        let (itx, irx) = std::sync::mpsc::channel();
        let indexer = std::thread::Builder::new().name("id-indexer".into()).spawn(move || run_indexer(index, irx))?;
        let thread = std::thread::Builder::new().name("wal-committer".into()).spawn(move || {
            run(writer, handle, itx, rx, c, btx, max_group, f);
            // The committer dropped its sender: the indexer drains and flushes.
            let _ = indexer.join();
        })?;
        Ok(Ingest { tx, committed, failure, notify: brx.deactivate(), thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    /// Appends `items` as one atomic frame, after the write-time checks,
    /// and resolves once the frame is durable.
    pub async fn submit(&self, items: Vec<Item>) -> Result<Committed, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Job(Job { items, reply })).await.map_err(|_| IngestError::Unavailable("shutting down".into()))?;
        rx.await.map_err(|_| IngestError::Unavailable("the committer stopped".into()))?
    }

    /// Seals the active WAL segment if it holds any record, so that the
    /// archive shipper can upload it; returns whether a segment was sealed.
    /// It goes through the committer's queue because the committer alone
    /// owns the writer, so a seal never races an append.
    pub async fn seal(&self) -> Result<bool, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Seal(reply)).await.map_err(|_| IngestError::Unavailable("shutting down".into()))?;
        rx.await.map_err(|_| IngestError::Unavailable("the committer stopped".into()))?.map_err(IngestError::Unavailable)
    }

    /// What projection workers follow: this log's directory, committed
    /// head and commit notifications.
    pub fn feed(&self, wal_dir: &std::path::Path) -> crate::projection::worker::LogFeed {
        crate::projection::worker::LogFeed { wal_dir: wal_dir.to_path_buf(), committed: self.committed_handle(), notify: self.subscribe() }
    }

    /// Why the log stopped accepting writes, if it did (health reports it).
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// The highest durable position.
    pub fn committed_position(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// The shared committed position, for threads that read it without
    /// async (projection workers).
    pub fn committed_handle(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    /// A receiver woken with each new committed position (it sees the
    /// latest value; intermediate ones may be skipped).
    pub fn subscribe(&self) -> async_broadcast::Receiver<u64> {
        self.notify.activate_cloned()
    }

    /// Stops accepting requests, lets the committer finish every queued
    /// request, and waits for it to exit.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Stop).await;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Re-reads the WAL after the index's checkpoint into the index.
fn catch_up_index(index: &mut IdIndex, index_path: &std::path::Path, wal_dir: &std::path::Path, head: u64) -> anyhow::Result<()> {
    let mut from = index.checkpoint()?;
    if from > head {
        tracing::warn!(index = from, wal = head, "id index is ahead of the WAL (restored or replaced log?); rebuilding it");
        index.clear()?;
        from = 0;
    }
    if from == head {
        return Ok(());
    }
    let started = Instant::now();
    if from == 0 {
        return load_index_sorted(index, index_path, wal_dir, head, started);
    }
    let mut reader = WalReader::open(wal_dir, from + 1)?;
    reader.set_until(head);
    let mut ids = Vec::new();
    let mut retractions = Vec::new();
    let mut last = from;
    while let Some(rec) = reader.next_record()? {
        match &rec.event {
            Event::AssertionRecorded { id, assertion } => ids.push((*id, IdEntry::of(assertion, rec.position))),
            Event::AssertionRetracted(r) => retractions.push((r.id, rec.position)),
        }
        last = rec.position;
        if ids.len() + retractions.len() >= 50_000 {
            index.insert(&ids, &retractions, last)?;
            ids.clear();
            retractions.clear();
        }
    }
    index.insert(&ids, &retractions, last)?;
    index.flush()?;
    tracing::info!(from = from + 1, to = last, elapsed_ms = started.elapsed().as_millis() as u64, "id index caught up with the WAL");
    Ok(())
}

/// [`catch_up_index`] into an empty index: see [`id_index::SortedLoad`].
fn load_index_sorted(
    index: &mut IdIndex,
    index_path: &std::path::Path,
    wal_dir: &std::path::Path,
    head: u64,
    started: Instant,
) -> anyhow::Result<()> {
    let mut load = id_index::SortedLoad::new(index_path);
    let mut reader = WalReader::open(wal_dir, 1)?;
    reader.set_until(head);
    while let Some(rec) = reader.next_record()? {
        load.push(&rec)?;
    }
    let last = load.finish(index)?;
    tracing::info!(to = last, elapsed_ms = started.elapsed().as_millis() as u64, "id index built from the WAL");
    Ok(())
}

/// Per-group scratch state: what this group has staged so far, so that
/// later requests of the same group see earlier ones.
#[derive(Default)]
struct Group {
    ids: HashMap<AssertionId, IdEntry>,
    retractions: HashMap<AssertionId, u64>,
    new_ids: Vec<(AssertionId, IdEntry)>,
    new_retractions: Vec<(AssertionId, u64)>,
}

/// Where the committer looks ids up: this group, then what is committed but
/// not yet indexed, then a snapshot of the index.
struct Lookup<'a> {
    group: &'a Group,
    unindexed: &'a Unindexed,
    index: &'a IndexReader,
}

impl Lookup<'_> {
    fn get(&self, id: &AssertionId) -> Result<Option<IdEntry>, id_index::IndexError> {
        match self.group.ids.get(id).copied().or_else(|| self.unindexed.get(id)) {
            Some(e) => Ok(Some(e)),
            None => self.index.get(id),
        }
    }

    fn retraction(&self, id: &AssertionId) -> Result<Option<u64>, id_index::IndexError> {
        match self.group.retractions.get(id).copied().or_else(|| self.unindexed.retraction(id)) {
            Some(p) => Ok(Some(p)),
            None => self.index.retraction(id),
        }
    }
}

/// One committed group for the indexer.
struct IndexBatch {
    ids: Vec<(AssertionId, IdEntry)>,
    retractions: Vec<(AssertionId, u64)>,
    position: u64,
}

/// Shortest time between two commits of the id index. Each commit copies
/// every B-tree page it touches, and ids are random keys: committing each
/// WAL group (about 200 a second at 10,000 writes/s) copied the same
/// branch pages 200 times a second. Ids wait in the committer's
/// in-memory layer meanwhile, so no check misses them.
const INDEX_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Most ids gathered into one commit.
const INDEX_MAX_IDS: usize = 100_000;

/// The indexer thread: applies committed groups to the id index, those of
/// up to [`INDEX_EVERY`] in one commit, and flushes when the committer
/// stops.
fn run_indexer(mut index: IdIndex, rx: std::sync::mpsc::Receiver<IndexBatch>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last_commit = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut ids = first.ids;
        let mut retractions = first.retractions;
        let mut position = first.position;
        while ids.len() < INDEX_MAX_IDS {
            let more = match rx.try_recv() {
                Ok(more) => more,
                Err(_) => match rx.recv_timeout(INDEX_EVERY.saturating_sub(last_commit.elapsed())) {
                    Ok(more) => more,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                },
            };
            ids.extend(more.ids);
            retractions.extend(more.retractions);
            position = more.position;
        }
        if let Err(e) = index.insert(&ids, &retractions, position) {
            // The WAL is the truth; the index catches up at the next start,
            // and until then the committer keeps these ids in memory.
            tracing::error!(error = %e, "id index update failed");
        }
        last_commit = Instant::now();
    }
    if let Err(e) = index.flush() {
        tracing::error!(error = %e, "final id index flush failed");
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    mut writer: WalWriter,
    index: IndexHandle,
    to_indexer: std::sync::mpsc::Sender<IndexBatch>,
    mut rx: mpsc::Receiver<Msg>,
    committed: Arc<AtomicU64>,
    notify: async_broadcast::Sender<u64>,
    max_group: usize,
    failure: Arc<std::sync::OnceLock<String>>,
) {
    let mut pending: Vec<(Job, Result<Committed, IngestError>)> = Vec::new();
    let mut unindexed = Unindexed::default();
    let mut stopping = false;
    while !stopping {
        let first = match rx.blocking_recv() {
            Some(Msg::Job(j)) => j,
            Some(Msg::Seal(reply)) => {
                let _ = reply.send(seal(&mut writer, &failure));
                continue;
            }
            Some(Msg::Stop) => {
                // Drain what was queued before the stop, then exit.
                rx.close();
                stopping = true;
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => j,
                    _ => break,
                }
            }
            None => break,
        };
        let mut jobs = vec![first];
        let mut seals = Vec::new();
        let mut events = jobs[0].items.len();
        while events < max_group {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => {
                    events += j.items.len();
                    jobs.push(j);
                }
                Ok(Msg::Seal(reply)) => {
                    // Sealing commits what is buffered, so it waits for the
                    // group: answer it after the group below.
                    seals.push(reply);
                }
                Ok(Msg::Stop) => {
                    rx.close();
                    stopping = true;
                }
                Err(_) => break,
            }
        }
        if stopping {
            // Closed: everything still queued joins this last group.
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Job(j) => jobs.push(j),
                    Msg::Seal(reply) => seals.push(reply),
                    Msg::Stop => {}
                }
            }
        }
        let mut group = Group::default();
        let reader = match index.reader() {
            Ok(r) => r,
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(IngestError::Unavailable(e.to_string())));
                }
                continue;
            }
        };
        unindexed.prune(&reader);
        metrics::gauge!("stemedb_id_index_lag_ids").set(unindexed.len() as f64);
        let recorded_at = writer.next_recorded_at();
        for job in jobs {
            let result = stage(&mut writer, &reader, &unindexed, &mut group, &job.items, recorded_at)
                .map(|outcomes| Committed { outcomes, recorded_at });
            pending.push((job, result));
        }
        drop(reader);
        let appended = group.new_ids.len() + group.new_retractions.len();
        let commit = if appended > 0 { writer.commit().map(Some) } else { Ok(None) };
        match commit {
            Ok(Some(pos)) => {
                if let Some(d) = writer.last_sync_duration() {
                    metrics::histogram!("stemedb_wal_fsync_latency_seconds").record(d.as_secs_f64());
                }
                metrics::histogram!("stemedb_wal_group_commit_size").record(appended as f64);
                metrics::counter!("stemedb_assertions_total").increment(group.new_ids.len() as u64);
                metrics::counter!("stemedb_events_total").increment(appended as u64);
                metrics::gauge!("stemedb_wal_position").set(pos as f64);
                unindexed.add(pos, &group.new_ids, &group.new_retractions);
                let batch = IndexBatch {
                    ids: std::mem::take(&mut group.new_ids),
                    retractions: std::mem::take(&mut group.new_retractions),
                    position: pos,
                };
                if to_indexer.send(batch).is_err() {
                    tracing::error!("the id indexer stopped; ids stay in memory until restart");
                }
                committed.store(pos, Ordering::Release);
                let _ = notify.try_broadcast(pos);
                for (job, result) in pending.drain(..) {
                    let _ = job.reply.send(result);
                }
            }
            Ok(None) => {
                for (job, result) in pending.drain(..) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                let _ = failure.set(e.to_string());
                for (job, result) in pending.drain(..) {
                    let r = match result {
                        Err(IngestError::Rejected(v)) => Err(IngestError::Rejected(v)),
                        _ => Err(IngestError::Unavailable(e.to_string())),
                    };
                    let _ = job.reply.send(r);
                }
            }
        }
        for reply in seals {
            let _ = reply.send(seal(&mut writer, &failure));
        }
    }
    if let Err(e) = writer.commit() {
        tracing::error!(error = %e, "final WAL commit failed");
    }
    tracing::info!(position = writer.committed_position(), "WAL committer stopped");
}

/// Seals the active segment; a failure poisons the writer like any other
/// write failure, and health reports it.
fn seal(writer: &mut WalWriter, failure: &std::sync::OnceLock<String>) -> Result<bool, String> {
    writer.seal_active().map_err(|e| {
        let _ = failure.set(e.to_string());
        e.to_string()
    })
}

/// Checks one request and, if it passes, appends its frame. Returns the
/// outcomes the client will get once the group is durable.
fn stage(
    writer: &mut WalWriter,
    idx: &IndexReader,
    unindexed: &Unindexed,
    group: &mut Group,
    items: &[Item],
    recorded_at: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Outcome>, IngestError> {
    let look = Lookup { group: &*group, unindexed, index: idx };
    let unavailable = |e: id_index::IndexError| IngestError::Unavailable(e.to_string());
    let mut errors = Vec::new();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
    let mut events = Vec::new();
    // Ids appended earlier in this same request.
    let mut local: HashMap<AssertionId, IdEntry> = HashMap::new();
    let mut local_retractions: HashMap<AssertionId, u64> = HashMap::new();
    let mut next = writer.next_position();
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Assert { id, assertion } => {
                let existing = match local.get(id) {
                    Some(e) => Some(*e),
                    None => look.get(id).map_err(unavailable)?,
                };
                if let Some(e) = existing {
                    outcomes[i] = Some(Outcome::Duplicate { position: e.position });
                    continue;
                }
                let me = IdEntry::of(assertion, next);
                for sid in &assertion.supersedes {
                    let target = match local.get(sid) {
                        Some(e) => Some(*e),
                        None => look.get(sid).map_err(unavailable)?,
                    };
                    // `supersedes` is kept sorted, so an index here is not the
                    // index the client sent; the reason names the id instead.
                    let field = "supersedes".to_string();
                    match target {
                        None => {
                            errors.push(ItemError { index: i, field, reason: format!("no assertion {sid} is in the log"), status: 422 })
                        }
                        Some(t) if t.agent != me.agent => errors.push(ItemError {
                            index: i,
                            field,
                            reason: format!("assertion {sid} belongs to another agent; an agent may only supersede its own assertions"),
                            status: 422,
                        }),
                        Some(t) if t.pair != me.pair => errors.push(ItemError {
                            index: i,
                            field,
                            reason: format!("assertion {sid} is about another subject or predicate"),
                            status: 422,
                        }),
                        Some(_) => {}
                    }
                }
                local.insert(*id, me);
                events.push(Event::AssertionRecorded { id: *id, assertion: (**assertion).clone() });
                outcomes[i] = Some(Outcome::Created { position: next });
                next += 1;
            }
            Item::Retract(r) => {
                let target = match local.get(&r.id) {
                    Some(e) => Some(*e),
                    None => look.get(&r.id).map_err(unavailable)?,
                };
                let Some(t) = target else {
                    errors.push(ItemError {
                        index: i,
                        field: "id".into(),
                        reason: format!("no assertion {} is in the log", r.id),
                        status: 404,
                    });
                    continue;
                };
                if t.agent != id_index::agent_fingerprint(&r.agent) {
                    errors.push(ItemError {
                        index: i,
                        field: "agent".into(),
                        reason: "only the agent that made an assertion may retract it".into(),
                        status: 403,
                    });
                    continue;
                }
                let earlier = match local_retractions.get(&r.id) {
                    Some(p) => Some(*p),
                    None => look.retraction(&r.id).map_err(unavailable)?,
                };
                if let Some(p) = earlier {
                    outcomes[i] = Some(Outcome::Duplicate { position: p });
                    continue;
                }
                local_retractions.insert(r.id, next);
                events.push(Event::AssertionRetracted(r.clone()));
                outcomes[i] = Some(Outcome::Created { position: next });
                next += 1;
            }
        }
    }
    if !errors.is_empty() {
        return Err(IngestError::Rejected(errors));
    }
    if !events.is_empty() {
        let records = writer.append(events, recorded_at).map_err(|e: WalError| IngestError::Unavailable(e.to_string()))?;
        debug_assert_eq!(records.last().map(|r| r.position), Some(next - 1));
    }
    for (id, e) in local {
        group.ids.insert(id, e);
        group.new_ids.push((id, e));
    }
    for (id, p) in local_retractions {
        group.retractions.insert(id, p);
        group.new_retractions.push((id, p));
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Duplicate { position: 0 })).collect())
}
