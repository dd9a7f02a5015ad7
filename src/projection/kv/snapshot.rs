//! One consistent view of the KV store: its last redb commit plus the
//! chunks staged beyond it (see [`staged`](crate::projection::staged)).
//! Readers and the worker applying the next batch both look through it.

use std::sync::Arc;

use redb::{ReadOnlyTable, ReadTransaction, ReadableDatabase};

use super::apply::Chunk;
use super::*;
use crate::projection::staged;

/// The store as of one moment.
pub(crate) struct Snapshot {
    pub(super) tx: ReadTransaction,
    /// The last committed position.
    pub(super) committed: u64,
    chunks: Arc<Vec<Arc<Chunk>>>,
    /// How many leading `chunks` the commit already contains.
    skip: usize,
    pub(super) ids: ReadOnlyTable<&'static [u8], u64>,
    pub(super) records: ReadOnlyTable<u64, &'static [u8]>,
}

impl Snapshot {
    /// Takes the staged chunks, *then* the redb snapshot (the order the
    /// consistency argument needs).
    pub(crate) fn take(store: &KvStore) -> Result<Snapshot, ProjectionError> {
        let chunks = store.staged.snapshot();
        let tx = store.db.begin_read().map_err(kerr)?;
        let committed = {
            let meta = tx.open_table(META).map_err(kerr)?;
            meta.get("checkpoint").map_err(kerr)?.map(|v| v.value()).unwrap_or(0)
        };
        let skip = staged::committed_prefix(&chunks, committed);
        let ids = tx.open_table(IDS).map_err(kerr)?;
        let records = tx.open_table(RECORDS).map_err(kerr)?;
        Ok(Snapshot { tx, committed, chunks, skip, ids, records })
    }

    /// The chunks beyond the commit, oldest first.
    pub(super) fn staged(&self) -> &[Arc<Chunk>] {
        &self.chunks[self.skip..]
    }

    /// The last position this view reflects.
    pub(crate) fn position(&self) -> u64 {
        staged::view_position(self.staged(), self.committed)
    }

    /// The position of assertion `id`, if known.
    pub(super) fn position_of(&self, id: &AssertionId) -> Result<Option<u64>, ProjectionError> {
        for c in self.staged().iter().rev() {
            if let Some(p) = c.new_ids.get(id) {
                return Ok(Some(*p));
            }
        }
        Ok(self.ids.get(id.0.as_slice()).map_err(kerr)?.map(|v| v.value()))
    }

    /// The current state of the assertion at `position`, if any.
    pub(super) fn state(&self, position: u64) -> Result<Option<StoredAssertion>, ProjectionError> {
        for c in self.staged().iter().rev() {
            if let Some(s) = c.dirty.get(&position) {
                return Ok(Some(s.clone()));
            }
        }
        match self.records.get(position).map_err(kerr)? {
            Some(v) => Ok(Some(rmp_serde::from_slice(v.value()).map_err(kerr)?)),
            None => Ok(None),
        }
    }

    /// The current state of assertion `id`, if known.
    pub(super) fn by_id(&self, id: &AssertionId) -> Result<Option<StoredAssertion>, ProjectionError> {
        match self.position_of(id)? {
            Some(p) => self.state(p),
            None => Ok(None),
        }
    }
}
