//! The write side's id index: exact idempotency and write-time checks.
//!
//! Maps every assertion id to its position plus two 64-bit fingerprints
//! (of its agent, and of its subject/predicate pair), and every retracted id
//! to the position of its first retraction. That is all the write path
//! needs to answer "duplicate?", "may this agent supersede or retract it?"
//! without touching the read side.
//!
//! It lives in redb, a B-tree: a lookup at 100M ids is ~4 page reads, almost
//! all cached, and memory stays bounded by redb's cache instead of growing
//! with the log. Inserts use non-durable commits (no fsync; the WAL already
//! made the events durable), with a durable commit at most every second.
//! The index stores the last WAL position it covers in the same
//! transaction, so after a crash it simply re-reads the WAL from there.

use std::ops::Bound;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{Assertion, AssertionId, Event, LogRecord};
use crate::sort::Sorter;

// Keys are byte slices rather than `[u8; 32]`: redb compares slices with
// memcmp but arrays element by element, which profiled as a hot spot.
const IDS: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("ids");
const RETRACTIONS: TableDefinition<&[u8], u64> = TableDefinition::new("retractions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CHECKPOINT: &str = "wal_position";

/// How often the index is made durable.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// What the index knows of one assertion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdEntry {
    /// Where it is in the log.
    pub position: u64,
    /// Fingerprint of its agent.
    pub agent: u64,
    /// Fingerprint of its (subject, predicate).
    pub pair: u64,
}

impl IdEntry {
    /// The entry for `a` recorded at `position`.
    pub fn of(a: &Assertion, position: u64) -> IdEntry {
        IdEntry { position, agent: agent_fingerprint(&a.agent), pair: pair_fingerprint(&a.subject, &a.predicate) }
    }
}

/// 64-bit fingerprint of an agent name.
pub fn agent_fingerprint(agent: &str) -> u64 {
    fingerprint(&[agent.as_bytes()])
}

/// 64-bit fingerprint of a (subject, predicate) pair.
pub fn pair_fingerprint(subject: &str, predicate: &str) -> u64 {
    fingerprint(&[subject.as_bytes(), predicate.as_bytes()])
}

fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(out)
}

/// Errors of the id index (all are storage errors).
#[derive(Debug, thiserror::Error)]
#[error("id index: {0}")]
pub struct IndexError(String);

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

/// The persistent id index. The indexer thread owns it and writes;
/// the committer reads through an [`IndexHandle`].
pub struct IdIndex {
    db: std::sync::Arc<Database>,
    last_durable: Instant,
    dirty: bool,
}

impl IdIndex {
    /// Opens or creates the index file.
    pub fn open(path: &Path) -> Result<IdIndex, IndexError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        // Sort runs of a load that a crash interrupted.
        let runs = crate::projection::slot::sibling(path, "sort");
        if runs.exists() {
            std::fs::remove_dir_all(&runs).map_err(err)?;
        }
        // A bounded cache: the upper B-tree levels stay resident, and memory
        // does not grow with the log.
        let db = redb::Builder::new().set_cache_size(128 * 1024 * 1024).create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(IDS).map_err(err)?;
        tx.open_table(RETRACTIONS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(IdIndex { db: std::sync::Arc::new(db), last_durable: Instant::now(), dirty: false })
    }

    /// The last WAL position the index covers.
    pub fn checkpoint(&self) -> Result<u64, IndexError> {
        let tx = self.db.begin_read().map_err(err)?;
        let meta = tx.open_table(META).map_err(err)?;
        Ok(meta.get(CHECKPOINT).map_err(err)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Empties the index (when it belongs to another log).
    pub fn clear(&mut self) -> Result<(), IndexError> {
        let tx = self.db.begin_write().map_err(err)?;
        tx.delete_table(IDS).map_err(err)?;
        tx.delete_table(RETRACTIONS).map_err(err)?;
        tx.delete_table(META).map_err(err)?;
        tx.open_table(IDS).map_err(err)?;
        tx.open_table(RETRACTIONS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// A read-only handle for another thread.
    pub fn handle(&self) -> IndexHandle {
        IndexHandle { db: self.db.clone() }
    }

    /// Records a committed group and advances the checkpoint to `position`.
    pub fn insert(&mut self, ids: &[(AssertionId, IdEntry)], retractions: &[(AssertionId, u64)], position: u64) -> Result<(), IndexError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        let durable = self.last_durable.elapsed() >= DURABLE_EVERY;
        tx.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(err)?;
        {
            let mut t = tx.open_table(IDS).map_err(err)?;
            for (id, e) in ids {
                t.insert(id.0.as_slice(), (e.position, e.agent, e.pair)).map_err(err)?;
            }
            let mut r = tx.open_table(RETRACTIONS).map_err(err)?;
            for (id, p) in retractions {
                r.insert(id.0.as_slice(), *p).map_err(err)?;
            }
            let mut m = tx.open_table(META).map_err(err)?;
            m.insert(CHECKPOINT, position).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        if durable {
            self.last_durable = Instant::now();
            self.dirty = false;
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    /// Fills an empty index with every id and retraction of a whole log
    /// in one durable transaction, in key order: ids arrive in random
    /// order, and appending them sorted writes each page once instead of
    /// copying a random leaf per insert (a restore's index of 1M ids).
    /// `ids` and `retractions` must be sorted by id; for an id given
    /// twice the later row wins, as with [`insert`](Self::insert).
    pub fn load_sorted(
        &mut self,
        ids: impl Iterator<Item = std::io::Result<(AssertionId, IdEntry)>>,
        retractions: impl Iterator<Item = std::io::Result<(AssertionId, u64)>>,
        position: u64,
    ) -> Result<(), IndexError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        {
            let mut m = tx.open_table(META).map_err(err)?;
            if m.get(CHECKPOINT).map_err(err)?.is_some() {
                return Err(err("a sorted load needs an empty index"));
            }
            let mut t = tx.open_table(IDS).map_err(err)?;
            let mut t = t.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(err)?;
            for row in last_of_each(ids) {
                let (id, e) = row?;
                t.insert_before(id.0.as_slice(), (e.position, e.agent, e.pair)).map_err(err)?;
            }
            t.close().map_err(err)?;
            let mut r = tx.open_table(RETRACTIONS).map_err(err)?;
            let mut r = r.upper_bound_mut(Bound::<&[u8]>::Unbounded).map_err(err)?;
            for row in last_of_each(retractions) {
                let (id, p) = row?;
                r.insert_before(id.0.as_slice(), p).map_err(err)?;
            }
            r.close().map_err(err)?;
            m.insert(CHECKPOINT, position).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.last_durable = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// Makes everything inserted so far durable (at shutdown).
    pub fn flush(&mut self) -> Result<(), IndexError> {
        if !self.dirty {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        tx.commit().map_err(err)?;
        self.dirty = false;
        self.last_durable = Instant::now();
        Ok(())
    }
}

/// Builds an empty index from a whole log in one pass: ids and
/// retractions arrive in random order, so they are sorted (spilling
/// beside the index, `<index>.sort/`, past 64 MiB) and appended in key
/// order by [`IdIndex::load_sorted`], which writes each page once.
pub struct SortedLoad {
    ids: Sorter<AssertionId, (u64, u64, u64)>,
    retractions: Sorter<AssertionId, u64>,
    last: u64,
}

impl SortedLoad {
    /// A load for the index at `index_path`.
    pub fn new(index_path: &Path) -> SortedLoad {
        let dir = crate::projection::slot::sibling(index_path, "sort");
        SortedLoad { ids: Sorter::new(&dir, "ids", 48 << 20), retractions: Sorter::new(&dir, "retractions", 16 << 20), last: 0 }
    }

    /// Takes the next record of the log (in log order).
    pub fn push(&mut self, r: &LogRecord) -> Result<(), IndexError> {
        match &r.event {
            Event::AssertionRecorded { id, assertion } => {
                let e = IdEntry::of(assertion, r.position);
                self.ids.push(*id, (e.position, e.agent, e.pair), 96).map_err(err)?;
            }
            Event::AssertionRetracted(rt) => self.retractions.push(rt.id, r.position, 72).map_err(err)?,
        }
        self.last = r.position;
        Ok(())
    }

    /// Writes everything into `index`, which must be empty; returns the
    /// last position loaded (the index's checkpoint).
    pub fn finish(self, index: &mut IdIndex) -> Result<u64, IndexError> {
        let ids = self.ids.finish().map_err(err)?.map(|r| r.map(|(id, (position, agent, pair))| (id, IdEntry { position, agent, pair })));
        index.load_sorted(ids, self.retractions.finish().map_err(err)?, self.last)?;
        Ok(self.last)
    }
}

/// Rows sorted by id with only the last of equal ids, as repeated
/// [`IdIndex::insert`]s would leave them (appending refuses an equal key).
fn last_of_each<V>(
    rows: impl Iterator<Item = std::io::Result<(AssertionId, V)>>,
) -> impl Iterator<Item = Result<(AssertionId, V), IndexError>> {
    let mut rows = rows.peekable();
    std::iter::from_fn(move || {
        loop {
            let (id, v) = match rows.next()? {
                Ok(row) => row,
                Err(e) => return Some(Err(err(e))),
            };
            match rows.peek() {
                Some(Ok((next, _))) if *next == id => continue,
                _ => return Some(Ok((id, v))),
            }
        }
    })
}

/// Read access to the index from the committer thread.
#[derive(Clone)]
pub struct IndexHandle {
    db: std::sync::Arc<Database>,
}

impl IndexHandle {
    /// A consistent snapshot for one group of lookups.
    pub fn reader(&self) -> Result<IndexReader, IndexError> {
        let tx = self.db.begin_read().map_err(err)?;
        let checkpoint = tx.open_table(META).map_err(err)?.get(CHECKPOINT).map_err(err)?.map(|v| v.value()).unwrap_or(0);
        Ok(IndexReader { ids: tx.open_table(IDS).map_err(err)?, retractions: tx.open_table(RETRACTIONS).map_err(err)?, checkpoint })
    }
}

/// A consistent snapshot for lookups.
pub struct IndexReader {
    ids: redb::ReadOnlyTable<&'static [u8], (u64, u64, u64)>,
    retractions: redb::ReadOnlyTable<&'static [u8], u64>,
    checkpoint: u64,
}

impl IndexReader {
    /// The last WAL position this snapshot covers.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// The entry of `id`, if recorded.
    pub fn get(&self, id: &AssertionId) -> Result<Option<IdEntry>, IndexError> {
        Ok(self.ids.get(id.0.as_slice()).map_err(err)?.map(|v| {
            let (position, agent, pair) = v.value();
            IdEntry { position, agent, pair }
        }))
    }

    /// Position of the first retraction of `id`, if retracted.
    pub fn retraction(&self, id: &AssertionId) -> Result<Option<u64>, IndexError> {
        Ok(self.retractions.get(id.0.as_slice()).map_err(err)?.map(|v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> AssertionId {
        AssertionId([n; 32])
    }

    fn entry(position: u64) -> IdEntry {
        IdEntry { position, agent: position * 7, pair: position * 13 }
    }

    /// A sorted load leaves exactly what inserting the same rows in log
    /// order leaves, including for an id given twice (the later wins).
    #[test]
    fn a_sorted_load_equals_inserts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = [(id(9), entry(1)), (id(3), entry(2)), (id(5), entry(3)), (id(3), entry(4))];
        let retractions = [(id(5), 5), (id(9), 6), (id(5), 7)];
        let mut inserted = IdIndex::open(&dir.path().join("a.redb")).expect("open");
        inserted.insert(&ids, &retractions, 7).expect("insert");
        let mut loaded = IdIndex::open(&dir.path().join("b.redb")).expect("open");
        let mut sorted_ids = ids.to_vec();
        sorted_ids.sort_by_key(|r| r.0); // stable: equal ids keep log order
        let mut sorted_retractions = retractions.to_vec();
        sorted_retractions.sort_by_key(|r| r.0);
        loaded.load_sorted(sorted_ids.into_iter().map(Ok), sorted_retractions.into_iter().map(Ok), 7).expect("load");
        assert_eq!(loaded.checkpoint().expect("checkpoint"), 7);
        let (a, b) = (inserted.handle().reader().expect("reader"), loaded.handle().reader().expect("reader"));
        for n in [3, 5, 9, 4] {
            assert_eq!(a.get(&id(n)).expect("get"), b.get(&id(n)).expect("get"), "id {n}");
            assert_eq!(a.retraction(&id(n)).expect("get"), b.retraction(&id(n)).expect("get"), "retraction {n}");
        }
        assert_eq!(b.get(&id(3)).expect("get"), Some(entry(4)));
        assert!(loaded.load_sorted(std::iter::empty(), std::iter::empty(), 8).is_err(), "only an empty index loads sorted");
    }
}
