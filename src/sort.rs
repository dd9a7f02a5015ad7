//! External merge sort for bulk loads.
//!
//! A B-tree built from keys in random order copies (and checksums) a leaf
//! every time a transaction touches it again, so a rebuild that writes its
//! rows as the log produces them rewrites most of the tree many times. A
//! [`Sorter`] instead takes the rows in any order, keeps up to a memory
//! budget of them, spills each full buffer to disk as a sorted *run*, and
//! finally merges the runs and the last buffer into one stream in key
//! order, so every table is built by appends and every page is written
//! once. Memory stays bounded by the budget whatever the log's size; the
//! disk needs about the size of the rows while the load runs.
//!
//! Runs are temporary files in a directory of the caller's (beside the
//! store being built, on the same disk) that [`Sorter`] removes when it is
//! dropped; a crash leaves them to the projection slot's clean-up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Buffer size of each run's reader and writer.
const RUN_IO_BUFFER: usize = 256 * 1024;

/// Sorts `(key, value)` rows by key, spilling to disk beyond a budget.
/// Keys are expected to be unique; equal keys come out in push order.
pub(crate) struct Sorter<K, V> {
    dir: PathBuf,
    name: &'static str,
    budget: usize,
    rows: Vec<(K, V)>,
    bytes: usize,
    runs: Vec<Run>,
}

/// A spilled, sorted run: its file and how many rows it holds.
struct Run {
    path: PathBuf,
    rows: usize,
}

impl<K, V> Sorter<K, V>
where
    K: Ord + Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// A sorter whose runs are named `<name>-<n>.run` in `dir` (created on
    /// the first spill) and which spills once its rows take `budget` bytes.
    pub(crate) fn new(dir: &Path, name: &'static str, budget: usize) -> Sorter<K, V> {
        Sorter { dir: dir.to_path_buf(), name, budget: budget.max(1), rows: Vec::new(), bytes: 0, runs: Vec::new() }
    }

    /// Adds a row whose heap and inline size is about `bytes`.
    pub(crate) fn push(&mut self, key: K, value: V, bytes: usize) -> std::io::Result<()> {
        self.rows.push((key, value));
        self.bytes += bytes;
        if self.bytes >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    /// Rows pushed so far.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.rows.len() + self.runs.iter().map(|r| r.rows).sum::<usize>()
    }

    /// Sorts and writes the buffered rows as a run now, whatever the budget.
    pub(crate) fn spill(&mut self) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{}-{}.run", self.name, self.runs.len()));
        self.rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut w = BufWriter::with_capacity(RUN_IO_BUFFER, File::create(&path)?);
        for row in &self.rows {
            rmp_serde::encode::write(&mut w, row).map_err(std::io::Error::other)?;
        }
        w.flush()?;
        self.runs.push(Run { path, rows: self.rows.len() });
        self.rows = Vec::new();
        self.bytes = 0;
        Ok(())
    }

    /// Every row pushed, in key order.
    pub(crate) fn finish(mut self) -> std::io::Result<Merge<K, V>> {
        // The last buffer is merged from memory, never written.
        self.rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sources = Vec::with_capacity(self.runs.len() + 1);
        for run in std::mem::take(&mut self.runs) {
            let file = File::open(&run.path)?;
            sources.push(Source::Run { reader: BufReader::with_capacity(RUN_IO_BUFFER, file), left: run.rows, path: run.path });
        }
        sources.push(Source::Memory(std::mem::take(&mut self.rows).into_iter()));
        let mut merge = Merge { sources, heap: BinaryHeap::new(), dir: self.dir.clone() };
        for i in 0..merge.sources.len() {
            merge.refill(i)?;
        }
        Ok(merge)
    }
}

impl<K, V> Drop for Sorter<K, V> {
    fn drop(&mut self) {
        for run in &self.runs {
            let _ = std::fs::remove_file(&run.path);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One input of a [`Merge`].
enum Source<K, V> {
    Run { reader: BufReader<File>, left: usize, path: PathBuf },
    Memory(std::vec::IntoIter<(K, V)>),
}

/// The head row of one source, ordered by key and then by source, so that
/// equal keys keep push order (earlier runs hold earlier rows).
struct Head<K, V> {
    key: K,
    source: usize,
    value: V,
}

impl<K: Ord, V> PartialEq for Head<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.source == other.source
    }
}
impl<K: Ord, V> Eq for Head<K, V> {}
impl<K: Ord, V> PartialOrd for Head<K, V> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord, V> Ord for Head<K, V> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key).then(self.source.cmp(&other.source))
    }
}

/// The merged, sorted rows of a [`Sorter`]; deletes its runs as it is dropped.
pub(crate) struct Merge<K, V> {
    sources: Vec<Source<K, V>>,
    heap: BinaryHeap<Reverse<Head<K, V>>>,
    dir: PathBuf,
}

impl<K, V> Merge<K, V>
where
    K: Ord + DeserializeOwned,
    V: DeserializeOwned,
{
    /// Moves the next row of source `i` into the heap, if it has one.
    fn refill(&mut self, i: usize) -> std::io::Result<()> {
        let next = match &mut self.sources[i] {
            Source::Run { reader, left, path } => {
                if *left == 0 {
                    None
                } else {
                    *left -= 1;
                    let row: (K, V) = rmp_serde::decode::from_read(&mut *reader)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?;
                    Some(row)
                }
            }
            Source::Memory(rows) => rows.next(),
        };
        if let Some((key, value)) = next {
            self.heap.push(Reverse(Head { key, source: i, value }));
        }
        Ok(())
    }

    /// The key of the next row, without taking it.
    pub(crate) fn peek_key(&self) -> Option<&K> {
        self.heap.peek().map(|h| &h.0.key)
    }

    /// The next row if its key satisfies `take`: the step of a merge-join
    /// that consumes this stream up to the other stream's current key.
    pub(crate) fn next_if_key(&mut self, take: impl FnOnce(&K) -> bool) -> Option<std::io::Result<(K, V)>> {
        if self.peek_key().is_some_and(take) { self.next() } else { None }
    }
}

impl<K, V> Iterator for Merge<K, V>
where
    K: Ord + DeserializeOwned,
    V: DeserializeOwned,
{
    type Item = std::io::Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        let Reverse(head) = self.heap.pop()?;
        if let Err(e) = self.refill(head.source) {
            return Some(Err(e));
        }
        Some(Ok((head.key, head.value)))
    }
}

impl<K, V> Drop for Merge<K, V> {
    fn drop(&mut self) {
        for s in &self.sources {
            if let Source::Run { path, .. } = s {
                let _ = std::fs::remove_file(path);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Groups values by byte-string key, for tables whose rows repeat a key
/// with a new position each time (every assertion of a subject, of an
/// agent, of a pair). Sorting the rows themselves compares and moves every
/// row about log₂(n) times, which profiled as a third of the kv rebuild; a
/// hash map gathers each key's values in push order instead, and only the
/// distinct keys are sorted when the buffer is spilled or finished. Memory
/// is bounded by the budget exactly as a [`Sorter`]'s is.
pub(crate) struct Grouper<V> {
    /// Keys are names clients chose; foldhash hashes short keys faster
    /// than the standard SipHash and is still seeded at random per
    /// process, so keys cannot be chosen in advance to collide.
    groups: std::collections::HashMap<Vec<u8>, Vec<V>, foldhash::fast::RandomState>,
    bytes: usize,
    budget: usize,
    sorted: Sorter<serde_bytes::ByteBuf, Vec<V>>,
}

impl<V> Grouper<V>
where
    V: Serialize + DeserializeOwned,
{
    /// A grouper whose runs are named `<name>-<n>.run` in `dir` and which
    /// spills once its groups take `budget` bytes.
    pub(crate) fn new(dir: &Path, name: &'static str, budget: usize) -> Grouper<V> {
        Grouper { groups: Default::default(), bytes: 0, budget: budget.max(1), sorted: Sorter::new(dir, name, usize::MAX) }
    }

    /// Adds `value`, which owns nothing on the heap, to the group of `key`.
    pub(crate) fn push(&mut self, key: &[u8], value: V) -> std::io::Result<()> {
        self.push_sized(key, value, std::mem::size_of::<V>())
    }

    /// Adds `value`, whose inline and heap size is about `bytes`, to the
    /// group of `key`.
    pub(crate) fn push_sized(&mut self, key: &[u8], value: V, bytes: usize) -> std::io::Result<()> {
        self.bytes += bytes;
        match self.groups.get_mut(key) {
            Some(values) => values.push(value),
            None => {
                // The key, its vector and the map's slot.
                self.bytes += key.len() + 64;
                self.groups.insert(key.to_vec(), vec![value]);
            }
        }
        if self.bytes >= self.budget {
            self.move_groups();
            self.sorted.spill()?;
        }
        Ok(())
    }

    fn move_groups(&mut self) {
        for (key, values) in self.groups.drain() {
            // Not counted: the sorter only holds them until the spill or merge.
            self.sorted.rows.push((serde_bytes::ByteBuf::from(key), values));
        }
        self.bytes = 0;
    }

    /// Every group in key order, each key once, its values in push order.
    pub(crate) fn finish(mut self) -> std::io::Result<Groups<V>> {
        self.move_groups();
        let Grouper { sorted, .. } = self;
        Ok(Groups { merge: sorted.finish()? })
    }
}

/// The merged groups of a [`Grouper`]: a key spilled in several runs comes
/// out once, with its values in push order (earlier runs hold earlier ones).
pub(crate) struct Groups<V> {
    merge: Merge<serde_bytes::ByteBuf, Vec<V>>,
}

impl<V: DeserializeOwned> Iterator for Groups<V> {
    type Item = std::io::Result<(Vec<u8>, Vec<V>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let (key, mut values) = match self.merge.next()? {
            Ok(row) => row,
            Err(e) => return Some(Err(e)),
        };
        while let Some(more) = self.merge.next_if_key(|k| *k == key) {
            match more {
                Ok((_, later)) => values.extend(later),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok((key.into_vec(), values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the budget (so however many runs), the merge yields
        /// exactly the rows pushed, sorted by key, equal keys in push order.
        #[test]
        fn merges_runs_into_one_sorted_stream(
            rows in proptest::collection::vec((0u16..500, any::<u32>()), 0..2_000),
            budget in 1usize..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let sort_dir = dir.path().join("s");
            let mut sorter: Sorter<u16, (u32, usize)> = Sorter::new(&sort_dir, "t", budget);
            for (i, (k, v)) in rows.iter().enumerate() {
                sorter.push(*k, (*v, i), 8).unwrap();
            }
            prop_assert_eq!(sorter.len(), rows.len());
            let out: Vec<(u16, (u32, usize))> = sorter.finish().unwrap().map(|r| r.unwrap()).collect();
            let mut expected: Vec<(u16, (u32, usize))> = rows.iter().enumerate().map(|(i, (k, v))| (*k, (*v, i))).collect();
            expected.sort_by_key(|r| r.0); // stable: equal keys keep push order
            prop_assert_eq!(out, expected);
            prop_assert!(!sort_dir.exists(), "runs are removed once merged");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the budget, each key comes out once, in key order, with
        /// every value pushed for it in push order.
        #[test]
        fn groups_values_by_key_across_runs(
            rows in proptest::collection::vec((proptest::collection::vec(0u8..4, 0..4), any::<u32>()), 0..2_000),
            budget in 1usize..2_000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let sort_dir = dir.path().join("g");
            let mut grouper: Grouper<(u32, usize)> = Grouper::new(&sort_dir, "g", budget);
            let mut expected: std::collections::BTreeMap<Vec<u8>, Vec<(u32, usize)>> = Default::default();
            for (i, (k, v)) in rows.iter().enumerate() {
                grouper.push(k, (*v, i)).unwrap();
                expected.entry(k.clone()).or_default().push((*v, i));
            }
            let out: Vec<_> = grouper.finish().unwrap().map(|r| r.unwrap()).collect();
            prop_assert_eq!(out, expected.into_iter().collect::<Vec<_>>());
            prop_assert!(!sort_dir.exists(), "runs are removed once merged");
        }
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let sort_dir = dir.path().join("s");
        let mut sorter: Sorter<u64, String> = Sorter::new(&sort_dir, "t", 1);
        for i in 0..10u64 {
            sorter.push(i, format!("row {i}"), 64).unwrap();
        }
        let run = sort_dir.join("t-3.run");
        std::fs::write(&run, [0xc1u8; 4]).unwrap(); // 0xc1 is never valid msgpack
        let errors = sorter.finish().map(|m| m.filter(|r| r.is_err()).count()).unwrap_or(1);
        assert!(errors >= 1);
    }
}
