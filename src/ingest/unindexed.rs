//! Ids that are committed to the WAL but not yet in the id index.
//!
//! The id index is written by its own thread so that its B-tree inserts and
//! its once-a-second fsync never delay an acknowledgement. Until the
//! indexer has caught up, the committer answers "seen before?" from this
//! in-memory layer. Entries are dropped only once a snapshot of the index
//! that the committer itself opened covers them (its checkpoint), so the
//! union of this layer and that snapshot is always complete.

use std::collections::{HashMap, VecDeque};

use super::id_index::{IdEntry, IndexReader};
use crate::model::AssertionId;

/// The committed-but-unindexed layer.
#[derive(Default)]
pub struct Unindexed {
    ids: HashMap<AssertionId, IdEntry>,
    retractions: HashMap<AssertionId, u64>,
    /// Per committed group: its last position and what it added.
    groups: VecDeque<(u64, Vec<AssertionId>, Vec<AssertionId>)>,
}

impl Unindexed {
    /// Forgets everything `reader`'s snapshot covers.
    pub fn prune(&mut self, reader: &IndexReader) {
        let upto = reader.checkpoint();
        while self.groups.front().is_some_and(|(p, _, _)| *p <= upto) {
            if let Some((_, ids, retractions)) = self.groups.pop_front() {
                for id in ids {
                    self.ids.remove(&id);
                }
                for id in retractions {
                    self.retractions.remove(&id);
                }
            }
        }
    }

    /// Records a group staged for commit (before its fsync: a failed fsync
    /// stops the writer for good, so nothing later can be misled).
    pub fn add(&mut self, position: u64, ids: &[(AssertionId, IdEntry)], retractions: &[(AssertionId, u64)]) {
        for (id, e) in ids {
            self.ids.insert(*id, *e);
        }
        for (id, p) in retractions {
            self.retractions.insert(*id, *p);
        }
        self.groups.push_back((position, ids.iter().map(|(i, _)| *i).collect(), retractions.iter().map(|(i, _)| *i).collect()));
    }

    /// What this layer knows of `id`.
    pub fn get(&self, id: &AssertionId) -> Option<IdEntry> {
        self.ids.get(id).copied()
    }

    /// The first retraction of `id`, if this layer has it.
    pub fn retraction(&self, id: &AssertionId) -> Option<u64> {
        self.retractions.get(id).copied()
    }

    /// Ids waiting for the indexer (a gauge of its lag).
    pub fn len(&self) -> usize {
        self.ids.len() + self.retractions.len()
    }

    /// Whether the indexer has caught up.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
