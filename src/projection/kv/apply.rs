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

    fn apply(&self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        let Some(last) = records.last().map(|r| r.position) else { return Ok(()) };
        let mut tx = self.db.begin_write().map_err(kerr)?;
        // The WAL is the durable copy and the checkpoint lives in the same
        // transaction, so losing a non-durable commit in a crash only means
        // re-applying those events: fsync at most once a second.
        tx.set_durability(if self.durability.due() { Durability::Immediate } else { Durability::None }).map_err(kerr)?;
        {
            let mut assertions = tx.open_table(ASSERTIONS).map_err(kerr)?;
            let mut log = tx.open_table(LOG).map_err(kerr)?;
            let mut by_pair = tx.open_table(BY_PAIR).map_err(kerr)?;
            let mut by_subject = tx.open_table(BY_SUBJECT).map_err(kerr)?;
            let mut by_predicate = tx.open_table(BY_PREDICATE).map_err(kerr)?;
            let mut by_agent = tx.open_table(BY_AGENT).map_err(kerr)?;
            let mut meta = tx.open_table(META).map_err(kerr)?;
            if let Some(cp) = meta.get("checkpoint").map_err(kerr)?.map(|v| v.value()) {
                if records[0].position != cp + 1 {
                    return Err(ProjectionError {
                        projection: NAME,
                        message: format!("batch starts at {} but the checkpoint is {cp}", records[0].position),
                    });
                }
            }
            // Assertions modified in this batch, written once at the end.
            let mut dirty: HashMap<AssertionId, StoredAssertion> = HashMap::new();
            let load = |dirty: &mut HashMap<AssertionId, StoredAssertion>,
                        assertions: &redb::Table<&[u8], &[u8]>,
                        id: &AssertionId|
             -> Result<bool, ProjectionError> {
                if dirty.contains_key(id) {
                    return Ok(true);
                }
                match assertions.get(id.0.as_slice()).map_err(kerr)? {
                    Some(v) => {
                        let s: StoredAssertion = rmp_serde::from_slice(v.value()).map_err(kerr)?;
                        dirty.insert(*id, s);
                        Ok(true)
                    }
                    None => Ok(false),
                }
            };
            for r in records {
                match &r.event {
                    Event::AssertionRecorded { id, assertion } => {
                        let a = assertion;
                        for s in &a.supersedes {
                            if load(&mut dirty, &assertions, s)? {
                                if let Some(t) = dirty.get_mut(s) {
                                    t.superseded_by.push(*id);
                                }
                            }
                        }
                        log.insert(r.position, (id.0.as_slice(), KIND_ASSERTED, ns(&r.recorded_at))).map_err(kerr)?;
                        let pk = pair_key(&a.subject, &a.predicate);
                        by_pair.insert(index_key(&pk, r.position).as_slice(), (id.0.as_slice(), KIND_ASSERTED)).map_err(kerr)?;
                        by_subject.insert(index_key(a.subject.as_bytes(), r.position).as_slice(), id.0.as_slice()).map_err(kerr)?;
                        by_predicate.insert(index_key(a.predicate.as_bytes(), r.position).as_slice(), id.0.as_slice()).map_err(kerr)?;
                        by_agent.insert(index_key(a.agent.as_bytes(), r.position).as_slice(), id.0.as_slice()).map_err(kerr)?;
                        dirty.insert(
                            *id,
                            StoredAssertion {
                                position: r.position,
                                recorded_at: r.recorded_at,
                                assertion: a.clone(),
                                retraction: None,
                                superseded_by: Vec::new(),
                            },
                        );
                    }
                    Event::AssertionRetracted(rt) => {
                        log.insert(r.position, (rt.id.0.as_slice(), KIND_RETRACTED, ns(&r.recorded_at))).map_err(kerr)?;
                        if load(&mut dirty, &assertions, &rt.id)? {
                            if let Some(t) = dirty.get_mut(&rt.id) {
                                let pk = pair_key(&t.assertion.subject, &t.assertion.predicate);
                                by_pair
                                    .insert(index_key(&pk, r.position).as_slice(), (rt.id.0.as_slice(), KIND_RETRACTED))
                                    .map_err(kerr)?;
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
            }
            for (id, s) in &dirty {
                let bytes = rmp_serde::to_vec_named(s).map_err(kerr)?;
                assertions.insert(id.0.as_slice(), bytes.as_slice()).map_err(kerr)?;
            }
            meta.insert("checkpoint", last).map_err(kerr)?;
        }
        tx.commit().map_err(kerr)?;
        Ok(())
    }
}
