//! Applying log events to the KV view.
//!
//! Events are first applied in memory to a [`Pending`] set of rows, which
//! is then written in one redb transaction with the checkpoint, each table
//! in key order: a B-tree leaf touched by several rows of a batch is
//! copied once. (A fresh store is bulk-loaded by [`build`](super::build)
//! instead, which sorts the whole log's rows first.)

use std::collections::HashMap;

use redb::{Durability, ReadableDatabase, ReadableTable};

use super::*;
use crate::model::{Event, LogRecord};
use crate::projection::{BulkLoad, Projection, pair_key};

/// The IDS and RECORDS tables as of the last commit, opened on first need.
type Committed = Option<(redb::ReadOnlyTable<&'static [u8], u64>, redb::ReadOnlyTable<u64, &'static [u8]>)>;

/// Rows produced by applying consecutive events, not yet written.
#[derive(Default)]
pub(crate) struct Pending {
    /// Position of the first event applied (checked against the checkpoint).
    first: Option<u64>,
    /// Position of the last event applied.
    last: u64,
    /// Assertions created or modified, by position, written once at the end.
    dirty: HashMap<u64, StoredAssertion>,
    /// Ids created since the last write.
    new_ids: HashMap<AssertionId, u64>,
    /// position → (id, kind, recorded_at), in log order.
    log_rows: Vec<(u64, AssertionId, u8, i64)>,
    // Secondary-index rows are collected and inserted in key order at the
    // end: a B-tree absorbs sorted inserts touching each leaf once per
    // transaction, instead of once per row.
    pair_rows: Vec<(Vec<u8>, (u8, u64))>,
    subject_rows: Vec<Vec<u8>>,
    predicate_rows: Vec<Vec<u8>>,
    agent_rows: Vec<Vec<u8>>,
}

impl Pending {
    /// Applies `records` in memory; earlier state is read from `db`'s last commit.
    fn push(&mut self, db: &Database, records: &[LogRecord]) -> Result<(), ProjectionError> {
        let Some(first) = records.first().map(|r| r.position) else { return Ok(()) };
        crate::projection::check_continues(&mut self.first, self.last, first).map_err(kerr)?;
        // Opened only when an event refers to an assertion not applied here.
        let mut committed: Committed = None;
        for r in records {
            match &r.event {
                Event::AssertionRecorded { id, assertion: a } => {
                    for s in &a.supersedes {
                        if let Some(t) = self.load_mut(db, &mut committed, s)? {
                            t.superseded_by.push(*id);
                        }
                    }
                    let p = r.position;
                    self.log_rows.push((p, *id, KIND_ASSERTED, ns(&r.recorded_at)));
                    let pk = pair_key(&a.subject, &a.predicate);
                    self.pair_rows.push((index_key(&pk, p), (KIND_ASSERTED, p)));
                    self.subject_rows.push(index_key(a.subject.as_bytes(), p));
                    self.predicate_rows.push(index_key(a.predicate.as_bytes(), p));
                    self.agent_rows.push(index_key(a.agent.as_bytes(), p));
                    self.new_ids.insert(*id, p);
                    self.dirty.insert(
                        p,
                        StoredAssertion {
                            position: p,
                            recorded_at: r.recorded_at,
                            assertion: a.clone(),
                            retraction: None,
                            superseded_by: Vec::new(),
                        },
                    );
                }
                Event::AssertionRetracted(rt) => {
                    self.log_rows.push((r.position, rt.id, KIND_RETRACTED, ns(&r.recorded_at)));
                    let position = r.position;
                    if let Some(t) = self.load_mut(db, &mut committed, &rt.id)? {
                        let pk = pair_key(&t.assertion.subject, &t.assertion.predicate);
                        let row = (index_key(&pk, position), (KIND_RETRACTED, t.position));
                        if t.retraction.is_none() {
                            t.retraction = Some(StoredRetraction {
                                position,
                                recorded_at: r.recorded_at,
                                agent: rt.agent.clone(),
                                reason: rt.reason.clone(),
                                signature: rt.signature.clone(),
                            });
                        }
                        self.pair_rows.push(row);
                    }
                }
            }
            self.last = r.position;
        }
        Ok(())
    }

    /// The stored assertion `id`, loaded into `dirty` (where it will be
    /// written back from) if it is not there yet.
    fn load_mut<'a>(
        &'a mut self,
        db: &Database,
        committed: &mut Committed,
        id: &AssertionId,
    ) -> Result<Option<&'a mut StoredAssertion>, ProjectionError> {
        if committed.is_none() && !self.new_ids.contains_key(id) {
            let tx = db.begin_read().map_err(kerr)?;
            *committed = Some((tx.open_table(IDS).map_err(kerr)?, tx.open_table(RECORDS).map_err(kerr)?));
        }
        let position = match self.new_ids.get(id) {
            Some(p) => *p,
            None => match committed.as_ref().map(|(ids, _)| ids.get(id.0.as_slice())).transpose().map_err(kerr)?.flatten() {
                Some(v) => v.value(),
                None => return Ok(None),
            },
        };
        match self.dirty.entry(position) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(Some(e.into_mut())),
            std::collections::hash_map::Entry::Vacant(slot) => {
                if committed.is_none() {
                    let tx = db.begin_read().map_err(kerr)?;
                    *committed = Some((tx.open_table(IDS).map_err(kerr)?, tx.open_table(RECORDS).map_err(kerr)?));
                }
                let Some((_, stored)) = committed.as_ref() else { return Ok(None) };
                let Some(v) = stored.get(position).map_err(kerr)? else { return Ok(None) };
                let s: StoredAssertion = rmp_serde::from_slice(v.value()).map_err(kerr)?;
                Ok(Some(slot.insert(s)))
            }
        }
    }

    /// Writes every pending row and the checkpoint in one transaction and
    /// empties `self`; returns the checkpoint.
    fn write(&mut self, db: &Database, durability: Durability) -> Result<u64, ProjectionError> {
        let Some(first) = self.first else { return Err(kerr("nothing to write")) };
        let last = self.last;
        let mut tx = db.begin_write().map_err(kerr)?;
        tx.set_durability(durability).map_err(kerr)?;
        {
            let mut meta = tx.open_table(META).map_err(kerr)?;
            if let Some(cp) = meta.get("checkpoint").map_err(kerr)?.map(|v| v.value())
                && first != cp + 1
            {
                return Err(kerr(format!("batch starts at {first} but the checkpoint is {cp}")));
            }
            {
                let mut log = tx.open_table(LOG).map_err(kerr)?;
                for (p, id, kind, t) in &self.log_rows {
                    log.insert(*p, (id.0.as_slice(), *kind, *t)).map_err(kerr)?;
                }
            }
            {
                let mut ids = tx.open_table(IDS).map_err(kerr)?;
                let mut id_rows: Vec<(&AssertionId, &u64)> = self.new_ids.iter().collect();
                id_rows.sort_unstable();
                for (id, p) in id_rows {
                    ids.insert(id.0.as_slice(), *p).map_err(kerr)?;
                }
            }
            {
                let mut by_pair = tx.open_table(BY_PAIR).map_err(kerr)?;
                self.pair_rows.sort_unstable();
                for (k, v) in &self.pair_rows {
                    by_pair.insert(k.as_slice(), *v).map_err(kerr)?;
                }
            }
            for (rows, def) in
                [(&mut self.subject_rows, BY_SUBJECT), (&mut self.predicate_rows, BY_PREDICATE), (&mut self.agent_rows, BY_AGENT)]
            {
                let mut table = tx.open_table(def).map_err(kerr)?;
                rows.sort_unstable();
                for k in rows.iter() {
                    table.insert(k.as_slice(), ()).map_err(kerr)?;
                }
            }
            {
                let mut stored = tx.open_table(RECORDS).map_err(kerr)?;
                let mut positions: Vec<&u64> = self.dirty.keys().collect();
                positions.sort_unstable();
                let mut bytes = Vec::new();
                for p in positions {
                    bytes.clear();
                    rmp_serde::encode::write_named(&mut bytes, &self.dirty[p]).map_err(kerr)?;
                    stored.insert(*p, bytes.as_slice()).map_err(kerr)?;
                }
            }
            meta.insert("checkpoint", last).map_err(kerr)?;
        }
        tx.commit().map_err(kerr)?;
        *self = Pending::default();
        Ok(last)
    }
}

impl Projection for KvStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        let tx = self.db.begin_read().map_err(kerr)?;
        let meta = tx.open_table(META).map_err(kerr)?;
        Ok(meta.get("checkpoint").map_err(kerr)?.map(|v| v.value()).unwrap_or(0))
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        if records.is_empty() {
            return self.checkpoint();
        }
        let mut pending = Pending::default();
        pending.push(&self.db, records)?;
        // The WAL is the durable copy and the checkpoint lives in the same
        // transaction, so losing a non-durable commit in a crash only means
        // re-applying those events: fsync at most once per sync interval.
        pending.write(&self.db, if self.durability.due() { Durability::Immediate } else { Durability::None })
    }

    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        // Only a store nobody has written to can be built by appends.
        if self.checkpoint()? != 0 {
            return Ok(None);
        }
        Ok(Some(Box::new(super::build::SortedBuild::new(self)?)))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        super::super::flush_redb(&self.db, kerr)?;
        self.checkpoint()
    }

    fn visit_rows(&self, visit: &mut crate::projection::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        use crate::projection::visit_table;
        let tx = self.db.begin_read().map_err(kerr)?;
        let _ = visit_table(&tx, RECORDS, 0, visit).map_err(kerr)?
            && visit_table(&tx, IDS, 1, visit).map_err(kerr)?
            && visit_table(&tx, LOG, 2, visit).map_err(kerr)?
            && visit_table(&tx, BY_PAIR, 3, visit).map_err(kerr)?
            && visit_table(&tx, BY_SUBJECT, 4, visit).map_err(kerr)?
            && visit_table(&tx, BY_PREDICATE, 5, visit).map_err(kerr)?
            && visit_table(&tx, BY_AGENT, 6, visit).map_err(kerr)?
            && visit_table(&tx, META, 7, visit).map_err(kerr)?;
        let meta = tx.open_table(META).map_err(kerr)?;
        Ok(meta.get("checkpoint").map_err(kerr)?.map(|v| v.value()).unwrap_or(0))
    }
}
