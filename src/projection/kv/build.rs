//! Building a fresh KV view from the log by sorting, not by updating.
//!
//! Records and the log table are keyed by position, so they are appended
//! as the log is read. Every other table is keyed by something the log
//! does not arrive sorted by (ids, subjects, predicates, agents, pairs):
//! those rows go through an external [`Sorter`] and are appended in key
//! order at the end, so each page is written once instead of once per
//! transaction that touches it.
//!
//! Retractions and supersessions change an assertion that was appended
//! earlier. They are sorted by the id they target, merged with the sorted
//! ids (which gives the target's position), sorted again by position, and
//! applied to the few records they touch; a retraction's row in the pair
//! index needs the target's pair, which its record tells. Rows are those
//! the incremental path ([`Pending`](super::apply)) writes, so verification
//! cannot tell how a store was built.

use std::ops::Bound;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::*;
use crate::model::{Event, LogRecord};
use crate::projection::chunked::Chunked;
use crate::projection::{BulkLoad, check_continues, pair_key};
use crate::sort::Sorter;

/// Which sorted index table a row belongs to.
const TO_PAIR: u8 = 0;
const TO_SUBJECT: u8 = 1;
const TO_PREDICATE: u8 = 2;
const TO_AGENT: u8 = 3;

/// (table, key) → value of the index-table rows, sorted for appending.
type IndexRows = Sorter<(u8, ByteBuf), (u8, u64)>;

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
    /// id → position.
    ids: Sorter<AssertionId, u64>,
    /// (table, key) → value of the index tables (pair rows' value; zero for the others).
    index: IndexRows,
    /// (target id, position) → change.
    changes: Sorter<(AssertionId, u64), Change>,
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
        Ok(SortedBuild {
            store,
            load: Some(load),
            first: None,
            last: 0,
            encoded: Vec::new(),
            // Four index rows per assertion against one id row.
            index: Sorter::new(&dir, "index", budget / 8 * 6),
            ids: Sorter::new(&dir, "ids", budget / 8 * 2),
            changes: Sorter::new(&dir, "changes", budget / 8),
        })
    }
}

fn io(x: std::io::Error) -> ProjectionError {
    kerr(format!("sorting: {x}"))
}

impl BulkLoad for SortedBuild<'_> {
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        let Some(first) = records.first().map(|r| r.position) else { return Ok(()) };
        check_continues(&mut self.first, self.last, first).map_err(kerr)?;
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
        let SortedBuild { ids, index, changes, last, store, .. } = *self;
        let budget = store.sort_budget / 8;
        let dir = crate::projection::slot::sibling(&store.path, "sort");
        // Ids in order, joined with the changes to find their targets'
        // positions (changes of unknown ids are ignored, as `apply` does).
        let mut by_target: Sorter<(u64, u64), Change> = Sorter::new(&dir, "by-target", budget);
        let mut changes = changes.finish().map_err(io)?;
        let mut ids = ids.finish().map_err(io)?;
        loop {
            let mut more = false;
            {
                let mut table = load.tx().open_table(IDS).map_err(kerr)?;
                let mut table = table.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(kerr)?;
                let mut written = 0;
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
                    if written >= load.limit() {
                        more = true;
                        break;
                    }
                }
                table.close().map_err(kerr)?;
            }
            if !more {
                break;
            }
            load = load.rotate().map_err(kerr)?;
        }
        // Whatever is left changes ids never recorded; still, a damaged
        // run must fail the build, not pass unnoticed.
        for c in changes {
            c.map_err(io)?;
        }
        load = load.rotate().map_err(kerr)?;
        // The changed records, each rewritten once with its changes in log order.
        let index = rewrite_changed(load.tx(), by_target, index)?;
        load = load.rotate().map_err(kerr)?;
        // The index tables, each in key order.
        let mut rows = index.finish().map_err(io)?;
        loop {
            let mut more = false;
            {
                let tx = load.tx();
                let mut by_pair = tx.open_table(BY_PAIR).map_err(kerr)?;
                let mut by_subject = tx.open_table(BY_SUBJECT).map_err(kerr)?;
                let mut by_predicate = tx.open_table(BY_PREDICATE).map_err(kerr)?;
                let mut by_agent = tx.open_table(BY_AGENT).map_err(kerr)?;
                let end = Bound::<&[u8]>::Unbounded;
                let mut by_pair = by_pair.upper_bound_mut(end).map_err(kerr)?;
                let mut by_subject = by_subject.upper_bound_mut(end).map_err(kerr)?;
                let mut by_predicate = by_predicate.upper_bound_mut(end).map_err(kerr)?;
                let mut by_agent = by_agent.upper_bound_mut(end).map_err(kerr)?;
                let mut written = 0;
                for row in rows.by_ref() {
                    let ((table, key), value) = row.map_err(io)?;
                    written += key.len() + INDEX_ROW_OVERHEAD;
                    match table {
                        TO_PAIR => by_pair.insert_before(key.as_slice(), value),
                        TO_SUBJECT => by_subject.insert_before(key.as_slice(), ()),
                        TO_PREDICATE => by_predicate.insert_before(key.as_slice(), ()),
                        _ => by_agent.insert_before(key.as_slice(), ()),
                    }
                    .map_err(kerr)?;
                    if written >= load.limit() {
                        more = true;
                        break;
                    }
                }
                for cursor in [by_subject, by_predicate, by_agent] {
                    cursor.close().map_err(kerr)?;
                }
                by_pair.close().map_err(kerr)?;
            }
            if !more {
                break;
            }
            load = load.rotate().map_err(kerr)?;
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
/// Bytes an index row takes in its leaf besides its key.
const INDEX_ROW_OVERHEAD: usize = 8 + 9;

/// Rewrites each record that later events changed, once, with its changes
/// in log order, and sorts the pair-index rows of its retractions into
/// `index`. Retractions are few next to assertions, so one transaction
/// holds them.
fn rewrite_changed(
    tx: &WriteTransaction,
    by_target: Sorter<(u64, u64), Change>,
    mut index: IndexRows,
) -> Result<IndexRows, ProjectionError> {
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
                    index.push((TO_PAIR, ByteBuf::from(index_key(&pk, at))), (KIND_RETRACTED, target), 96).map_err(io)?;
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
    Ok(index)
}

impl SortedBuild<'_> {
    /// Appends the records and log rows of `records` and sorts the rest.
    /// Returns about how many bytes it wrote into the tables.
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
                    for s in &a.supersedes {
                        self.changes.push((*s, p), Change::SupersededBy(*id), 128).map_err(io)?;
                    }
                    log.insert_before(p, (id.0.as_slice(), KIND_ASSERTED, ns(&r.recorded_at))).map_err(kerr)?;
                    let record = NewRecord { position: p, recorded_at: r.recorded_at, assertion: a, retraction: None, superseded_by: &[] };
                    self.encoded.clear();
                    rmp_serde::encode::write_named(&mut self.encoded, &record).map_err(kerr)?;
                    stored.insert_before(p, self.encoded.as_slice()).map_err(kerr)?;
                    written += self.encoded.len() + LOG_ROW_BYTES;
                    self.ids.push(*id, p, 80).map_err(io)?;
                    let pk = pair_key(&a.subject, &a.predicate);
                    let rows = [
                        (TO_PAIR, index_key(&pk, p), (KIND_ASSERTED, p)),
                        (TO_SUBJECT, index_key(a.subject.as_bytes(), p), (0, 0)),
                        (TO_PREDICATE, index_key(a.predicate.as_bytes(), p), (0, 0)),
                        (TO_AGENT, index_key(a.agent.as_bytes(), p), (0, 0)),
                    ];
                    for (table, key, value) in rows {
                        let bytes = 72 + key.len();
                        self.index.push((table, ByteBuf::from(key)), value, bytes).map_err(io)?;
                    }
                }
                Event::AssertionRetracted(rt) => {
                    log.insert_before(p, (rt.id.0.as_slice(), KIND_RETRACTED, ns(&r.recorded_at))).map_err(kerr)?;
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
            self.last = p;
        }
        log.close().map_err(kerr)?;
        stored.close().map_err(kerr)?;
        Ok(written)
    }
}
