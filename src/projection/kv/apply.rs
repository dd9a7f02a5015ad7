//! Applying log events to the KV view.
//!
//! Each batch is applied in memory into a [`Chunk`]: the rows it adds and
//! the new state of every assertion it creates or changes. The chunk is
//! staged (readers see it at once, see [`staged`](crate::projection::staged))
//! and the committer thread writes one or several chunks in one redb
//! transaction with the checkpoint, each table in key order: a B-tree leaf
//! touched by several rows is copied once. (A fresh store is bulk-loaded
//! by [`build`](super::build) instead, which sorts the whole log's rows.)

use std::collections::HashMap;
use std::sync::Arc;

use redb::{Durability, ReadableDatabase};

use super::snapshot::Snapshot;
use super::*;
use crate::model::{Event, LogRecord};
use crate::projection::staged;
use crate::projection::{BulkLoad, Projection, pair_key};

/// The rows and states produced by applying consecutive events.
#[derive(Default)]
pub(crate) struct Chunk {
    /// The events applied.
    extent: staged::Extent,
    /// State after this chunk of every assertion it created or changed, by position.
    pub(super) dirty: HashMap<u64, StoredAssertion, Hasher>,
    /// Ids created here. (Readers probe these maps in every staged chunk,
    /// about a hundred under a steady load: foldhash, not SipHash.)
    pub(super) new_ids: HashMap<AssertionId, u64, Hasher>,
    /// position → (id, kind, recorded_at), in log order.
    pub(super) log_rows: Vec<(u64, AssertionId, u8, i64)>,
    // Index rows, in log order; written sorted.
    pub(super) pair_rows: Vec<(Vec<u8>, (u8, u64))>,
    pub(super) subject_rows: Vec<Vec<u8>>,
    pub(super) predicate_rows: Vec<Vec<u8>>,
    pub(super) agent_rows: Vec<Vec<u8>>,
}

type Hasher = foldhash::fast::RandomState;

impl staged::Chunk for Chunk {
    fn extent(&self) -> staged::Extent {
        self.extent
    }
}

impl Chunk {
    /// Applies `records` (which must follow `before`'s position) on top
    /// of the state `before` shows.
    fn apply(before: &Snapshot, records: &[LogRecord]) -> Result<Chunk, ProjectionError> {
        let mut c = Chunk { extent: staged::Extent::of(records, before.position(), kerr)?, ..Chunk::default() };
        for r in records {
            match &r.event {
                Event::AssertionRecorded { id, assertion: a } => {
                    for s in &a.supersedes {
                        if let Some(t) = c.load_mut(before, s)? {
                            t.superseded_by.push(*id);
                        }
                    }
                    let p = r.position;
                    c.log_rows.push((p, *id, KIND_ASSERTED, ns(&r.recorded_at)));
                    let pk = pair_key(&a.subject, &a.predicate);
                    c.pair_rows.push((index_key(&pk, p), (KIND_ASSERTED, p)));
                    c.subject_rows.push(index_key(a.subject.as_bytes(), p));
                    c.predicate_rows.push(index_key(a.predicate.as_bytes(), p));
                    c.agent_rows.push(index_key(a.agent.as_bytes(), p));
                    c.new_ids.insert(*id, p);
                    c.dirty.insert(
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
                    c.log_rows.push((r.position, rt.id, KIND_RETRACTED, ns(&r.recorded_at)));
                    let position = r.position;
                    if let Some(t) = c.load_mut(before, &rt.id)? {
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
                        c.pair_rows.push(row);
                    }
                }
            }
        }
        Ok(c)
    }

    /// The state of assertion `id`, copied into `dirty` (where it will be
    /// written from) if it is not there yet.
    fn load_mut<'a>(&'a mut self, before: &Snapshot, id: &AssertionId) -> Result<Option<&'a mut StoredAssertion>, ProjectionError> {
        let position = match self.new_ids.get(id) {
            Some(p) => *p,
            None => match before.position_of(id)? {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        match self.dirty.entry(position) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(Some(e.into_mut())),
            std::collections::hash_map::Entry::Vacant(slot) => match before.state(position)? {
                Some(s) => Ok(Some(slot.insert(s))),
                None => Ok(None),
            },
        }
    }
}

/// Writes consecutive `chunks` and the checkpoint in one transaction.
pub(super) fn write_chunks(db: &Database, chunks: &[Arc<Chunk>], durability: Durability) -> Result<(), ProjectionError> {
    staged::write_redb(db, chunks, durability, kerr, |tx| {
        {
            let mut log = tx.open_table(LOG).map_err(kerr)?;
            for (p, id, kind, t) in chunks.iter().flat_map(|c| &c.log_rows) {
                log.insert(*p, (id.0.as_slice(), *kind, *t)).map_err(kerr)?;
            }
        }
        {
            let mut ids = tx.open_table(IDS).map_err(kerr)?;
            let mut rows: Vec<(&AssertionId, &u64)> = chunks.iter().flat_map(|c| &c.new_ids).collect();
            rows.sort_unstable();
            for (id, p) in rows {
                ids.insert(id.0.as_slice(), *p).map_err(kerr)?;
            }
        }
        {
            let mut by_pair = tx.open_table(BY_PAIR).map_err(kerr)?;
            let mut rows: Vec<&(Vec<u8>, (u8, u64))> = chunks.iter().flat_map(|c| &c.pair_rows).collect();
            rows.sort_unstable();
            for (k, v) in rows {
                by_pair.insert(k.as_slice(), *v).map_err(kerr)?;
            }
        }
        type Rows = fn(&Chunk) -> &Vec<Vec<u8>>;
        let names: [(Rows, _); 3] =
            [(|c| &c.subject_rows, BY_SUBJECT), (|c| &c.predicate_rows, BY_PREDICATE), (|c| &c.agent_rows, BY_AGENT)];
        for (rows_of, def) in names {
            let mut table = tx.open_table(def).map_err(kerr)?;
            let mut rows: Vec<&Vec<u8>> = chunks.iter().flat_map(|c| rows_of(c)).collect();
            rows.sort_unstable();
            for k in rows {
                table.insert(k.as_slice(), ()).map_err(kerr)?;
            }
        }
        {
            let mut stored = tx.open_table(RECORDS).map_err(kerr)?;
            // A later chunk's state of an assertion replaces an earlier one's.
            let mut latest: HashMap<u64, &StoredAssertion> = HashMap::new();
            for c in chunks {
                latest.extend(c.dirty.iter().map(|(p, s)| (*p, s)));
            }
            let mut rows: Vec<(u64, &StoredAssertion)> = latest.into_iter().collect();
            rows.sort_unstable_by_key(|(p, _)| *p);
            let mut bytes = Vec::new();
            for (p, s) in rows {
                bytes.clear();
                rmp_serde::encode::write_named(&mut bytes, s).map_err(kerr)?;
                stored.insert(p, bytes.as_slice()).map_err(kerr)?;
            }
        }
        Ok(())
    })
}

impl Projection for KvStore {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The last position applied, staged or written.
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(Snapshot::take(self)?.position())
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        if records.is_empty() {
            return self.checkpoint();
        }
        let chunk = Chunk::apply(&Snapshot::take(self)?, records)?;
        let last = chunk.extent.last;
        self.staged.push(NAME, chunk)?;
        Ok(last)
    }

    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        // Only a store nobody has written to can be built by appends.
        if self.checkpoint()? != 0 {
            return Ok(None);
        }
        Ok(Some(Box::new(super::build::SortedBuild::new(self)?)))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        self.staged.drain(NAME)?;
        super::super::flush_redb(&self.db, kerr)?;
        self.checkpoint()
    }

    fn visit_rows(&self, visit: &mut crate::projection::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        use crate::projection::visit_table;
        self.staged.drain(NAME)?;
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
