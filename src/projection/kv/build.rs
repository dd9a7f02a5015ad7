//! Building a fresh KV view from the log by sorting, not by updating.
//!
//! Records and the log table are keyed by position, so they are appended
//! as the log is read. Every other table is keyed by something the log
//! does not arrive sorted by: ids go through an external [`Sorter`]; the
//! rows of the subject, predicate, agent and pair indexes, which repeat
//! their key once per event, are gathered per key by a [`Grouper`] (only
//! the distinct keys are sorted). All are appended in key order at the
//! end, so each page is written once instead of once per transaction that
//! touches it.
//!
//! The log pass runs on two threads: the load's own thread encodes and
//! appends the records and log rows, while a sorting thread ([`Sorting`])
//! takes the same shared batches and feeds the sorters and groupers. One
//! thread doing both was the busiest of a kv + lenses rebuild, and it
//! paced the shared log reader while the machine still had idle CPU.
//!
//! Retractions and supersessions change an assertion that was appended
//! earlier. They are sorted by the id they target, merged with the sorted
//! ids (which gives the target's position), sorted again by position, and
//! applied to the few records they touch; a retraction's row in the pair
//! index needs the target's pair, which its record tells. Rows are those
//! the incremental path ([`apply`](super::apply)) writes, so verification
//! cannot tell how a store was built.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::*;
use crate::model::{Event, LogRecord};
use crate::projection::chunked::Chunked;
use crate::projection::{BulkLoad, check_continues, pair_key};
use crate::sort::{Grouper, Groups, Sorter};

/// A pair-index row: (position, kind, assertion position), as in [`BY_PAIR`].
type PairRow = (u64, u8, u64);

/// A later event that changes an earlier assertion's record.
#[derive(Serialize, Deserialize)]
enum Change {
    Retracted(StoredRetraction),
    SupersededBy(AssertionId),
}

/// A [`StoredAssertion`] as first written, borrowing the assertion instead
/// of cloning it: the same fields, so the same bytes.
#[derive(Serialize)]
struct NewRecord<'a> {
    position: u64,
    #[serde(with = "crate::model::time::serde_normal")]
    recorded_at: DateTime<Utc>,
    assertion: &'a crate::model::Assertion,
    retraction: Option<StoredRetraction>,
    superseded_by: &'a [AssertionId],
}

/// A bulk load of an empty [`KvStore`]: see the module documentation.
pub(super) struct SortedBuild<'a> {
    store: &'a KvStore,
    /// The load's current transaction: see [`Chunked`].
    load: Option<Chunked<'a>>,
    first: Option<u64>,
    last: u64,
    /// Reused encoding buffer for records.
    encoded: Vec<u8>,
    /// The sorting thread, until the load finishes.
    sorting: Option<SortingThread>,
}

/// Every row of the log pass that is sorted rather than appended.
struct Sorting {
    /// id → position.
    ids: Sorter<AssertionId, u64>,
    /// pair → its rows in [`BY_PAIR`].
    pairs: Grouper<PairRow>,
    /// subject, predicate, agent → the positions of its assertions, for
    /// [`NAME_TABLES`].
    names: [Grouper<u64>; 3],
    /// (target id, position) → change.
    changes: Sorter<(AssertionId, u64), Change>,
}

/// A [`Sorting`] on a thread of its own, fed the batches the load appends
/// (shared, not copied; with the index of the first record to take). It
/// never outlives the load: dropping it waits for the thread, so a
/// cancelled rebuild cannot spill a run after its files were removed.
struct SortingThread {
    batches: Option<SyncSender<(Arc<Vec<LogRecord>>, usize)>>,
    thread: Option<JoinHandle<Result<Sorting, ProjectionError>>>,
}

impl SortingThread {
    fn start(sorting: Sorting) -> Result<SortingThread, ProjectionError> {
        // Two batches in flight, as the log reader gives each load.
        let (batches, received) = std::sync::mpsc::sync_channel::<(Arc<Vec<LogRecord>>, usize)>(2);
        let thread = std::thread::Builder::new()
            .name("rebuild-kv-sort".into())
            .spawn(move || {
                let mut sorting = sorting;
                for (batch, skip) in received {
                    sorting.push(batch.get(skip..).unwrap_or_default())?;
                }
                Ok(sorting)
            })
            .map_err(|x| kerr(format!("cannot start the sorting thread: {x}")))?;
        Ok(SortingThread { batches: Some(batches), thread: Some(thread) })
    }

    /// Hands a batch over; if the thread has stopped (only an error stops
    /// it early), that error.
    fn send(&mut self, batch: Arc<Vec<LogRecord>>, skip: usize) -> Result<(), ProjectionError> {
        match &self.batches {
            Some(to) if to.send((batch, skip)).is_ok() => Ok(()),
            _ => Err(self.wait().err().unwrap_or_else(|| kerr("the sorting thread stopped"))),
        }
    }

    /// Waits for every batch sent to be sorted; gives the sorters back.
    fn finish(mut self) -> Result<Sorting, ProjectionError> {
        self.wait()
    }

    fn wait(&mut self) -> Result<Sorting, ProjectionError> {
        self.batches = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(kerr("the sorting thread panicked"))),
            None => Err(kerr("the sorting thread is gone")),
        }
    }
}

impl Drop for SortingThread {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.wait();
        }
    }
}

impl<'a> SortedBuild<'a> {
    /// A build into `store`, which must be empty; spills beside it.
    pub(super) fn new(store: &'a KvStore) -> Result<SortedBuild<'a>, ProjectionError> {
        let dir = crate::projection::slot::sibling(&store.path, "sort");
        let budget = store.sort_budget;
        let load = Chunked::begin(&store.db, store.sort_budget).map_err(kerr)?;
        if load.tx().open_table(META).map_err(kerr)?.get("checkpoint").map_err(kerr)?.is_some() {
            return Err(kerr("a sorted build needs an empty store"));
        }
        let sorting = Sorting {
            // Four index rows per assertion against one id row; pair rows
            // are the largest (a long key, repeated least).
            pairs: Grouper::new(&dir, "pairs", budget / 8 * 3),
            names: ["subjects", "predicates", "agents"].map(|name| Grouper::new(&dir, name, budget / 8)),
            ids: Sorter::new(&dir, "ids", budget / 8 * 2),
            changes: Sorter::new(&dir, "changes", budget / 8),
        };
        Ok(SortedBuild {
            store,
            load: Some(load),
            first: None,
            last: 0,
            encoded: Vec::new(),
            sorting: Some(SortingThread::start(sorting)?),
        })
    }
}

fn io(x: std::io::Error) -> ProjectionError {
    kerr(format!("sorting: {x}"))
}

impl BulkLoad for SortedBuild<'_> {
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        // A borrowed slice cannot reach the sorting thread: copy it once.
        // Replays never come this way; they share their batches.
        self.push_shared(&Arc::new(records.to_vec()), 0)
    }

    fn push_shared(&mut self, batch: &Arc<Vec<LogRecord>>, skip: usize) -> Result<(), ProjectionError> {
        let records = batch.get(skip..).unwrap_or_default();
        let Some(first) = records.first().map(|r| r.position) else { return Ok(()) };
        check_continues(&mut self.first, self.last, first).map_err(kerr)?;
        self.sorting.as_mut().ok_or_else(|| kerr("the load is finished"))?.send(batch.clone(), skip)?;
        let mut load = self.load.take().ok_or_else(|| kerr("the load is finished"))?;
        let written = self.append(load.tx(), records)?;
        load.wrote(written);
        self.load = Some(load.rotate_if_full().map_err(kerr)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<u64, ProjectionError> {
        let mut load = self.load.take().ok_or_else(|| kerr("the load is finished"))?;
        if self.first.is_none() {
            drop(load);
            crate::projection::flush_redb(&self.store.db, kerr)?;
            return Ok(0);
        }
        let SortedBuild { sorting, last, store, .. } = *self;
        let Sorting { ids, mut pairs, names, changes } = sorting.ok_or_else(|| kerr("the load is finished"))?.finish()?;
        let budget = store.sort_budget / 8;
        let dir = crate::projection::slot::sibling(&store.path, "sort");
        // Ids in order, joined with the changes to find their targets'
        // positions (changes of unknown ids are ignored, as `apply` does).
        let mut by_target: Sorter<(u64, u64), Change> = Sorter::new(&dir, "by-target", budget);
        let mut changes = changes.finish().map_err(io)?;
        let mut ids = ids.finish().map_err(io)?;
        load = load.fill(
            |tx, limit| {
                let mut table = tx.open_table(IDS).map_err(kerr)?;
                let mut table = table.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(kerr)?;
                let (mut written, mut more) = (0, false);
                for row in ids.by_ref() {
                    let (id, position) = row.map_err(io)?;
                    table.insert_before(id.0.as_slice(), position).map_err(kerr)?;
                    while let Some(change) = changes.next_if_key(|(target, _)| *target <= id) {
                        let ((target, at), change) = change.map_err(io)?;
                        if target == id && at > position {
                            by_target.push((position, at), change, 256).map_err(io)?;
                        }
                    }
                    written += ID_ROW_BYTES;
                    if written >= limit {
                        more = true;
                        break;
                    }
                }
                table.close().map_err(kerr)?;
                Ok(more)
            },
            kerr,
        )?;
        // Whatever is left changes ids never recorded; still, a damaged
        // run must fail the build, not pass unnoticed.
        for c in changes {
            c.map_err(io)?;
        }
        load = load.rotate().map_err(kerr)?;
        // The changed records, each rewritten once with its changes in log order.
        rewrite_changed(load.tx(), by_target, &mut pairs)?;
        load = load.rotate().map_err(kerr)?;
        // The index tables, each in key order.
        load = append_groups(load, BY_PAIR, pairs.finish().map_err(io)?, |&(at, kind, of)| (at, (kind, of)))?;
        for (table, groups) in NAME_TABLES.into_iter().zip(names) {
            load = append_groups(load, table, groups.finish().map_err(io)?, |&at| (at, ()))?;
        }
        load.tx().open_table(META).map_err(kerr)?.insert("checkpoint", last).map_err(kerr)?;
        load.commit().map_err(kerr)?;
        Ok(last)
    }
}

/// Bytes a log row and a record's key take in their leaves.
const LOG_ROW_BYTES: usize = 8 + 16 + 1 + 8 + 8 + 16;
/// Bytes an id row takes in its leaf (key, value and slot), for [`Chunked`].
const ID_ROW_BYTES: usize = 16 + 8 + 8;
/// The index tables of subjects, predicates and agents, in the order of
/// [`SortedBuild::names`].
const NAME_TABLES: [TableDefinition<'static, &'static [u8], ()>; 3] = [BY_SUBJECT, BY_PREDICATE, BY_AGENT];

/// Appends `groups` to `table`, a row `key ‖ 0 ‖ position` per value
/// (`row` gives a value's position and table value), in key order, rotating
/// the transaction as it fills, even inside a group.
///
/// Groups in key order give rows in key order because names never contain
/// a 0 byte (a pair key holds exactly one, between two names): a shorter
/// key's `0` sorts before any byte of a longer one it prefixes. Should that
/// ever not hold, redb refuses the unordered append and the build fails.
fn append_groups<'db, V, T>(
    load: Chunked<'db>,
    table: TableDefinition<'static, &'static [u8], T>,
    mut groups: Groups<V>,
    row: impl Fn(&V) -> (u64, T),
) -> Result<Chunked<'db>, ProjectionError>
where
    V: serde::de::DeserializeOwned,
    T: for<'a> redb::Value<SelfType<'a> = T> + 'static,
{
    let mut key = Vec::new();
    // A group cut by a rotation, and the index of its next value.
    let mut cut: Option<(Vec<u8>, Vec<V>, usize)> = None;
    load.fill(
        |tx, limit| {
            let mut opened = tx.open_table(table).map_err(kerr)?;
            let mut cursor = opened.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(kerr)?;
            let (mut written, mut more) = (0, false);
            'groups: loop {
                let (prefix, values, from) = match cut.take() {
                    Some(group) => group,
                    None => match groups.next() {
                        None => break,
                        Some(group) => {
                            let (prefix, mut values) = group.map_err(io)?;
                            // Retractions' pair rows arrive after every assertion's.
                            values.sort_by_key(|v| row(v).0);
                            (prefix, values, 0)
                        }
                    },
                };
                for i in from..values.len() {
                    let (position, value) = row(&values[i]);
                    key.clear();
                    key.extend_from_slice(&prefix);
                    key.push(0);
                    key.extend_from_slice(&position.to_be_bytes());
                    cursor.insert_before(key.as_slice(), value).map_err(kerr)?;
                    written += key.len() + INDEX_ROW_OVERHEAD;
                    if written >= limit {
                        if i + 1 < values.len() {
                            cut = Some((prefix, values, i + 1));
                        }
                        more = true;
                        break 'groups;
                    }
                }
            }
            cursor.close().map_err(kerr)?;
            Ok(more)
        },
        kerr,
    )
}

/// Bytes an index row takes in its leaf besides its key.
const INDEX_ROW_OVERHEAD: usize = 8 + 9;

/// Rewrites each record that later events changed, once, with its changes
/// in log order, and adds the pair-index rows of its retractions to
/// `pairs`. Retractions are few next to assertions, so one transaction
/// holds them.
fn rewrite_changed(
    tx: &WriteTransaction,
    by_target: Sorter<(u64, u64), Change>,
    pairs: &mut Grouper<PairRow>,
) -> Result<(), ProjectionError> {
    let mut records = tx.open_table(RECORDS).map_err(kerr)?;
    let mut merged = by_target.finish().map_err(io)?;
    let mut bytes = Vec::new();
    while let Some(row) = merged.next() {
        let ((target, at), change) = row.map_err(io)?;
        let Some(v) = records.get(target).map_err(kerr)? else { continue };
        let mut stored: StoredAssertion = rmp_serde::from_slice(v.value()).map_err(kerr)?;
        drop(v);
        let pk = pair_key(&stored.assertion.subject, &stored.assertion.predicate);
        let mut next = Some((at, change));
        while let Some((at, change)) = next.take() {
            match change {
                Change::Retracted(r) => {
                    pairs.push(&pk, (at, KIND_RETRACTED, target)).map_err(io)?;
                    if stored.retraction.is_none() {
                        stored.retraction = Some(r);
                    }
                }
                Change::SupersededBy(by) => stored.superseded_by.push(by),
            }
            if merged.peek_key().is_some_and(|(t, _)| *t == target) {
                let Some(row) = merged.next() else { break };
                let ((_, at), change) = row.map_err(io)?;
                next = Some((at, change));
            }
        }
        bytes.clear();
        rmp_serde::encode::write_named(&mut bytes, &stored).map_err(kerr)?;
        records.insert(target, bytes.as_slice()).map_err(kerr)?;
    }
    Ok(())
}

impl Sorting {
    /// Sorts what the log pass does not append of `records`.
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        for r in records {
            let p = r.position;
            match &r.event {
                Event::AssertionRecorded { id, assertion: a } => {
                    for s in &a.supersedes {
                        self.changes.push((*s, p), Change::SupersededBy(*id), 128).map_err(io)?;
                    }
                    self.ids.push(*id, p, 80).map_err(io)?;
                    self.pairs.push(&pair_key(&a.subject, &a.predicate), (p, KIND_ASSERTED, p)).map_err(io)?;
                    for (names, name) in self.names.iter_mut().zip([&a.subject, &a.predicate, &a.agent]) {
                        names.push(name.as_bytes(), p).map_err(io)?;
                    }
                }
                Event::AssertionRetracted(rt) => {
                    let retraction = StoredRetraction {
                        position: p,
                        recorded_at: r.recorded_at,
                        agent: rt.agent.clone(),
                        reason: rt.reason.clone(),
                        signature: rt.signature.clone(),
                    };
                    let bytes = 160 + rt.reason.len();
                    self.changes.push((rt.id, p), Change::Retracted(retraction), bytes).map_err(io)?;
                }
            }
        }
        Ok(())
    }
}

impl SortedBuild<'_> {
    /// Appends the records and log rows of `records` (the sorting thread
    /// has the rest). Returns about how many bytes it wrote into the tables.
    fn append(&mut self, tx: &WriteTransaction, records: &[LogRecord]) -> Result<usize, ProjectionError> {
        let mut written = 0;
        let mut log = tx.open_table(LOG).map_err(kerr)?;
        let mut log = log.upper_bound_mut(Bound::<u64>::Unbounded).map_err(kerr)?;
        let mut stored = tx.open_table(RECORDS).map_err(kerr)?;
        let mut stored = stored.upper_bound_mut(Bound::<u64>::Unbounded).map_err(kerr)?;
        for r in records {
            let p = r.position;
            match &r.event {
                Event::AssertionRecorded { id, assertion: a } => {
                    log.insert_before(p, (id.0.as_slice(), KIND_ASSERTED, ns(&r.recorded_at))).map_err(kerr)?;
                    let record = NewRecord { position: p, recorded_at: r.recorded_at, assertion: a, retraction: None, superseded_by: &[] };
                    self.encoded.clear();
                    rmp_serde::encode::write_named(&mut self.encoded, &record).map_err(kerr)?;
                    stored.insert_before(p, self.encoded.as_slice()).map_err(kerr)?;
                    written += self.encoded.len() + LOG_ROW_BYTES;
                }
                Event::AssertionRetracted(rt) => {
                    log.insert_before(p, (rt.id.0.as_slice(), KIND_RETRACTED, ns(&r.recorded_at))).map_err(kerr)?;
                }
            }
            self.last = p;
        }
        log.close().map_err(kerr)?;
        stored.close().map_err(kerr)?;
        Ok(written)
    }
}
