//! Applying log events to the KV view, one redb transaction per batch.

use std::collections::HashMap;

use redb::{Durability, ReadableTable};

use super::*;
use crate::model::{Event, LogRecord};
use crate::projection::{Projection, pair_key};

impl Projection for KvStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(kerr)?;
        let meta = tx.open_table(META).map_err(kerr)?;
        Ok(meta.get("checkpoint").map_err(kerr)?.map(|v| v.value()).unwrap_or(0))
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        let Some(last) = records.last().map(|r| r.position) else { return self.checkpoint() };
        let mut tx = self.db.begin_write().map_err(kerr)?;
        // The WAL is the durable copy and the checkpoint lives in the same
        // transaction, so losing a non-durable commit in a crash only means
        // re-applying those events: fsync at most once a second.
        tx.set_durability(if self.durability.due() { Durability::Immediate } else { Durability::None }).map_err(kerr)?;
        {
            let mut stored = tx.open_table(RECORDS).map_err(kerr)?;
            let mut ids = tx.open_table(IDS).map_err(kerr)?;
            let mut log = tx.open_table(LOG).map_err(kerr)?;
            let mut by_pair = tx.open_table(BY_PAIR).map_err(kerr)?;
            let mut by_subject = tx.open_table(BY_SUBJECT).map_err(kerr)?;
            let mut by_predicate = tx.open_table(BY_PREDICATE).map_err(kerr)?;
            let mut by_agent = tx.open_table(BY_AGENT).map_err(kerr)?;
            let mut meta = tx.open_table(META).map_err(kerr)?;
            if let Some(cp) = meta.get("checkpoint").map_err(kerr)?.map(|v| v.value())
                && records[0].position != cp + 1
            {
                return Err(kerr(format!("batch starts at {} but the checkpoint is {cp}", records[0].position)));
            }
            // Assertions created or modified in this batch, by position,
            // written once at the end; and the ids this batch created.
            let mut dirty: HashMap<u64, StoredAssertion> = HashMap::new();
            let mut new_ids: HashMap<AssertionId, u64> = HashMap::new();
            // Secondary-index rows are collected and inserted in key order
            // at the end: a B-tree absorbs sorted inserts touching each leaf
            // once per batch, instead of once per row.
            let mut pair_rows: Vec<(Vec<u8>, (u8, u64))> = Vec::new();
            let mut subject_rows: Vec<Vec<u8>> = Vec::new();
            let mut predicate_rows: Vec<Vec<u8>> = Vec::new();
            let mut agent_rows: Vec<Vec<u8>> = Vec::new();
            for r in records {
                match &r.event {
                    Event::AssertionRecorded { id, assertion: a } => {
                        for s in &a.supersedes {
                            if let Some(t) = load_mut(&mut dirty, &new_ids, &ids, &stored, s)? {
                                t.superseded_by.push(*id);
                            }
                        }
                        let p = r.position;
                        log.insert(p, (id.0.as_slice(), KIND_ASSERTED, ns(&r.recorded_at))).map_err(kerr)?;
                        let pk = pair_key(&a.subject, &a.predicate);
                        pair_rows.push((index_key(&pk, p), (KIND_ASSERTED, p)));
                        subject_rows.push(index_key(a.subject.as_bytes(), p));
                        predicate_rows.push(index_key(a.predicate.as_bytes(), p));
                        agent_rows.push(index_key(a.agent.as_bytes(), p));
                        new_ids.insert(*id, p);
                        dirty.insert(
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
                        log.insert(r.position, (rt.id.0.as_slice(), KIND_RETRACTED, ns(&r.recorded_at))).map_err(kerr)?;
                        if let Some(t) = load_mut(&mut dirty, &new_ids, &ids, &stored, &rt.id)? {
                            let pk = pair_key(&t.assertion.subject, &t.assertion.predicate);
                            pair_rows.push((index_key(&pk, r.position), (KIND_RETRACTED, t.position)));
                            if t.retraction.is_none() {
                                t.retraction = Some(StoredRetraction {
                                    position: r.position,
                                    recorded_at: r.recorded_at,
                                    agent: rt.agent.clone(),
                                    reason: rt.reason.clone(),
                                    signature: rt.signature.clone(),
                                });
                            }
                        }
                    }
                }
            }
            let mut id_rows: Vec<(&AssertionId, &u64)> = new_ids.iter().collect();
            id_rows.sort_unstable();
            for (id, p) in id_rows {
                ids.insert(id.0.as_slice(), *p).map_err(kerr)?;
            }
            pair_rows.sort_unstable();
            for (k, v) in &pair_rows {
                by_pair.insert(k.as_slice(), *v).map_err(kerr)?;
            }
            for (rows, table) in
                [(&mut subject_rows, &mut by_subject), (&mut predicate_rows, &mut by_predicate), (&mut agent_rows, &mut by_agent)]
            {
                rows.sort_unstable();
                for k in rows.iter() {
                    table.insert(k.as_slice(), ()).map_err(kerr)?;
                }
            }
            let mut positions: Vec<&u64> = dirty.keys().collect();
            positions.sort_unstable();
            for p in positions {
                let bytes = rmp_serde::to_vec_named(&dirty[p]).map_err(kerr)?;
                stored.insert(*p, bytes.as_slice()).map_err(kerr)?;
            }
            meta.insert("checkpoint", last).map_err(kerr)?;
        }
        tx.commit().map_err(kerr)?;
        Ok(last)
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        super::super::flush_redb(&self.db, kerr)?;
        self.checkpoint()
    }

    fn visit_rows(&self, visit: &mut crate::projection::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        use crate::projection::visit_table;
        use redb::ReadableDatabase;
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

/// The stored assertion `id`, loaded into `dirty` (where it will be
/// written back from) if it is not there yet.
fn load_mut<'a>(
    dirty: &'a mut HashMap<u64, StoredAssertion>,
    new_ids: &HashMap<AssertionId, u64>,
    ids: &redb::Table<&[u8], u64>,
    stored: &redb::Table<u64, &[u8]>,
    id: &AssertionId,
) -> Result<Option<&'a mut StoredAssertion>, ProjectionError> {
    let position = match new_ids.get(id) {
        Some(p) => *p,
        None => match ids.get(id.0.as_slice()).map_err(kerr)? {
            Some(v) => v.value(),
            None => return Ok(None),
        },
    };
    match dirty.entry(position) {
        std::collections::hash_map::Entry::Occupied(e) => Ok(Some(e.into_mut())),
        std::collections::hash_map::Entry::Vacant(slot) => {
            let Some(v) = stored.get(position).map_err(kerr)? else { return Ok(None) };
            let s: StoredAssertion = rmp_serde::from_slice(v.value()).map_err(kerr)?;
            Ok(Some(slot.insert(s)))
        }
    }
}
