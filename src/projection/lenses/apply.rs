//! Applying log events to the lenses store, and the view readers share.
//!
//! Each batch loads every touched pair's live set once (from the staged
//! chunks or the last commit), applies its events, recomputes the pair's
//! summary once (in log order, so results are reproducible bit for bit)
//! and encodes both rows into a [`Chunk`]. The chunk is staged, so readers
//! see it at once (see [`staged`](crate::projection::staged)); the
//! committer thread writes chunks with the checkpoint, several per
//! transaction when behind. (A fresh store is bulk-loaded by
//! [`build`](super::build) instead.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use redb::{Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase};

use super::*;
use crate::projection::staged;

/// Encoded rows of the pairs a batch touched, and the owners it added.
#[derive(Default)]
pub(super) struct Chunk {
    /// The events applied.
    extent: staged::Extent,
    /// pair key → (packed summary, live set), as written to [`PAIRS`].
    pub(super) pairs: BTreeMap<Vec<u8>, (Vec<u8>, Vec<u8>)>,
    /// [`pair_hash`] of every key of `pairs`. A lookup walks every staged
    /// chunk (under a steady load about a hundred: one per batch until
    /// the next commit), and a B-tree search in each was a third of the
    /// worker's CPU at 10,000 writes/s; this probe costs a fraction of one.
    pair_hashes: HashSet<u64, Hasher>,
    /// id → pair key of the assertions recorded.
    owners: HashMap<AssertionId, Vec<u8>, Hasher>,
}

type Hasher = foldhash::fast::RandomState;

/// A hash of a pair key, the same for every chunk of this process.
fn pair_hash(pk: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static STATE: OnceLock<Hasher> = OnceLock::new();
    STATE.get_or_init(Hasher::default).hash_one(pk)
}

impl staged::Chunk for Chunk {
    fn extent(&self) -> staged::Extent {
        self.extent
    }
}

/// The store as of one moment: its last commit plus the chunks staged
/// beyond it.
pub(super) struct Snapshot {
    tx: ReadTransaction,
    committed: u64,
    chunks: Arc<Vec<Arc<Chunk>>>,
    skip: usize,
    pairs: ReadOnlyTable<&'static [u8], (&'static [u8], &'static [u8])>,
}

impl Snapshot {
    /// Takes the staged chunks, *then* the redb snapshot (the order the
    /// consistency argument of [`staged`] needs).
    pub(super) fn take(store: &LensStore) -> Result<Snapshot, ProjectionError> {
        let chunks = store.staged.snapshot();
        let tx = store.db.begin_read().map_err(e)?;
        let committed = checkpoint_in(&tx)?;
        let skip = staged::committed_prefix(&chunks, committed);
        let pairs = tx.open_table(PAIRS).map_err(e)?;
        Ok(Snapshot { tx, committed, chunks, skip, pairs })
    }

    fn staged(&self) -> &[Arc<Chunk>] {
        &self.chunks[self.skip..]
    }

    /// The last position this view reflects.
    pub(super) fn position(&self) -> u64 {
        staged::view_position(self.staged(), self.committed)
    }

    /// Calls `f` with the pair's two encoded rows (summary, live set), or
    /// `None` if the pair has none.
    pub(super) fn with_row<T>(&self, pk: &[u8], f: impl FnOnce(Option<(&[u8], &[u8])>) -> T) -> Result<T, ProjectionError> {
        let h = pair_hash(pk);
        for c in self.staged().iter().rev().filter(|c| c.pair_hashes.contains(&h)) {
            if let Some((s, l)) = c.pairs.get(pk) {
                return Ok(f(Some((s, l))));
            }
        }
        match self.pairs.get(pk).map_err(e)? {
            Some(v) => {
                let (s, l) = v.value();
                Ok(f(Some((s, l))))
            }
            None => Ok(f(None)),
        }
    }

    /// Every pair whose key starts with `from` and sorts before `to`, with
    /// its summary row, in key order.
    pub(super) fn summaries_in(&self, from: &[u8], to: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ProjectionError> {
        let mut out = BTreeMap::new();
        for row in self.pairs.range(from..to).map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(k.value().to_vec(), v.value().0.to_vec());
        }
        // Staged rows replace committed ones, later chunks earlier ones.
        for c in self.staged() {
            for (k, (s, _)) in c.pairs.range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Excluded(to))) {
                out.insert(k.clone(), s.clone());
            }
        }
        Ok(out)
    }

    /// The pair key of assertion `id`'s pair, if recorded.
    fn owner(
        &self,
        owners: &mut Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
        id: &AssertionId,
    ) -> Result<Option<Vec<u8>>, ProjectionError> {
        for c in self.staged().iter().rev() {
            if let Some(pk) = c.owners.get(id) {
                return Ok(Some(pk.clone()));
            }
        }
        if owners.is_none() {
            *owners = Some(self.tx.open_table(OWNERS).map_err(e)?);
        }
        let Some(t) = owners.as_ref() else { return Ok(None) };
        Ok(t.get(id.0.as_slice()).map_err(e)?.map(|v| v.value().to_vec()))
    }
}

impl Chunk {
    /// Applies `records` (which must follow `before`'s position) on top
    /// of the state `before` shows, summarizing with `defs`.
    pub(super) fn apply(before: &Snapshot, defs: &Definitions, records: &[LogRecord]) -> Result<Chunk, ProjectionError> {
        let extent = staged::Extent::of(records, before.position(), e)?;
        let mut owners_table = None;
        let mut touched: HashMap<Vec<u8>, LiveSet, Hasher> = HashMap::default();
        let mut owners: HashMap<AssertionId, Vec<u8>, Hasher> = HashMap::default();
        for r in records {
            let (pk, id) = match &r.event {
                Event::AssertionRecorded { id, assertion } => (pair_key(&assertion.subject, &assertion.predicate), *id),
                Event::AssertionRetracted(rt) => match owners.get(&rt.id) {
                    Some(pk) => (pk.clone(), rt.id),
                    None => match before.owner(&mut owners_table, &rt.id)? {
                        Some(pk) => (pk, rt.id),
                        None => continue,
                    },
                },
            };
            let set = match touched.entry(pk) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let set = before.with_row(v.key(), |row| match row {
                        Some((_, live)) => rmp_serde::from_slice(live).map_err(e),
                        None => Ok(LiveSet::default()),
                    })??;
                    v.insert(set)
                }
            };
            match &r.event {
                Event::AssertionRecorded { assertion, .. } => {
                    set.record(id, r.position, r.recorded_at, assertion);
                    owners.insert(id, pair_key(&assertion.subject, &assertion.predicate));
                }
                Event::AssertionRetracted(_) => {
                    set.retract(&id);
                }
            }
        }
        let mut pairs = BTreeMap::new();
        let mut pair_hashes = HashSet::with_capacity_and_hasher(touched.len(), Hasher::default());
        for (pk, set) in touched {
            let (mut summary, mut live) = (Vec::new(), Vec::new());
            encode_pair(&set, defs, &mut summary, &mut live)?;
            pair_hashes.insert(pair_hash(&pk));
            pairs.insert(pk, (summary, live));
        }
        Ok(Chunk { extent, pairs, pair_hashes, owners })
    }
}

/// Writes consecutive `chunks` (the newest row of each pair) and the
/// checkpoint in one transaction, in key order.
pub(super) fn write_chunks(db: &Database, chunks: &[Arc<Chunk>], durability: Durability) -> Result<(), ProjectionError> {
    staged::write_redb(db, chunks, durability, e, |tx| {
        {
            let mut owners = tx.open_table(OWNERS).map_err(e)?;
            let mut rows: Vec<(&AssertionId, &Vec<u8>)> = chunks.iter().flat_map(|c| &c.owners).collect();
            rows.sort_unstable();
            for (id, pk) in rows {
                owners.insert(id.0.as_slice(), pk.as_slice()).map_err(e)?;
            }
        }
        let mut pairs = tx.open_table(PAIRS).map_err(e)?;
        let mut latest: BTreeMap<&[u8], &(Vec<u8>, Vec<u8>)> = BTreeMap::new();
        for c in chunks {
            latest.extend(c.pairs.iter().map(|(k, v)| (k.as_slice(), v)));
        }
        for (pk, (summary, live)) in latest {
            pairs.insert(pk, (summary.as_slice(), live.as_slice())).map_err(e)?;
        }
        Ok(())
    })
}
