//! The `search` projection (tantivy): one document per assertion, so that
//! agents can find claims by words and filter them by attributes.
//!
//! Unlike the redb stores it commits on a cadence ([`SearchDefinition`]:
//! every `interval_ms` or `max_docs`, whichever first, and when writes
//! stop): a tantivy commit is expensive, and documents become searchable
//! only at one. The **checkpoint** is the log position stored in the commit
//! payload (with the definition hash), so a restart resumes from the last
//! commit and no document is indexed twice. [`Projection::apply`] returns
//! the last *committed* position, which is what `min_position` waits for.
//!
//! A retraction or supersession re-creates the affected document with its
//! flags set (delete by id, add), from the stored encoding of the assertion
//! (looked up among uncommitted documents first, then in the index).

pub mod columns;
pub mod query;
pub mod schema;
pub mod top;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::TermQuery;
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

pub use schema::{Fields, SearchDefinition};

use super::kv::{StoredAssertion, StoredRetraction};
use super::{Projection, ProjectionError};
use crate::model::{AssertionId, Event, LogRecord};

const NAME: &str = "search";

fn e<E: std::fmt::Display>(x: E) -> ProjectionError {
    ProjectionError { projection: NAME, message: x.to_string() }
}

/// What a commit payload records.
#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    position: u64,
    definition: String,
}

struct Writer {
    /// `None` only inside [`Projection::settle`], which replaces the
    /// writer under this lock (tantivy waits for merges only by closing one).
    writer: Option<IndexWriter<TantivyDocument>>,
    /// Encoded assertions added since the last commit (not yet findable
    /// through a searcher), by id.
    pending: HashMap<[u8; 32], Vec<u8>>,
    pending_docs: usize,
    last_commit: Instant,
    /// Whether merges are paused because the worker is far behind.
    bulk: bool,
    /// Commit even with nothing pending, so tantivy considers merges.
    merge_due: bool,
}

/// An `apply` this large means the worker is catching up: segments are
/// not merged until it has caught up, so a commit per cadence does not
/// re-merge the growing index over and over (3× faster catch-up).
const BULK_BATCH: usize = 10_000;

impl Writer {
    /// Pauses merging while catching up, resumes it afterwards.
    fn set_bulk(&mut self, bulk: bool) {
        if bulk != self.bulk
            && let Some(w) = self.writer.as_ref()
        {
            if bulk {
                w.set_merge_policy(Box::new(tantivy::indexer::NoMergePolicy));
            } else {
                w.set_merge_policy(Box::new(tantivy::indexer::LogMergePolicy::default()));
                self.merge_due = true;
            }
            self.bulk = bulk;
        }
    }

    fn index_writer(&mut self) -> Result<&mut IndexWriter<TantivyDocument>, ProjectionError> {
        self.writer.as_mut().ok_or_else(|| e("the index writer is closed"))
    }
}

/// An index writer with the definition's threads and memory. Call it at
/// background priority: tantivy's threads inherit the caller's.
fn start_writer(index: &Index, def: &SearchDefinition) -> Result<IndexWriter<TantivyDocument>, ProjectionError> {
    index.writer_with_num_threads(def.writer_threads, def.writer_memory).map_err(e)
}

/// Stored documents are compressed in blocks of this many bytes. A hit
/// decompresses its whole block: with tantivy's default (16 KiB, ~30
/// assertions) each hit of a page cost ~10 µs, a fifth of a cheap search
/// at 20 hits; with 4 KiB, ~5 µs. An index keeps the block size it was
/// created with (a rebuild applies this one).
const DOCSTORE_BLOCK: usize = 4096;

fn index_settings() -> tantivy::IndexSettings {
    tantivy::IndexSettings { docstore_blocksize: DOCSTORE_BLOCK, ..Default::default() }
}

/// The search store.
pub struct SearchStore {
    index: Index,
    reader: IndexReader,
    /// Decoded per-segment attributes; the reader warms and collects it.
    columns: Arc<columns::ColumnCache>,
    fields: Fields,
    /// False for an index of an older layout (see [`SearchStore::open`]).
    compatible: bool,
    def: SearchDefinition,
    built_with: String,
    writer: Mutex<Writer>,
    /// Last committed (visible, durable) position.
    committed: AtomicU64,
    /// Last applied position (may be ahead of `committed`).
    applied: AtomicU64,
    /// Searchers that cursors are pinned to, by searcher generation.
    pub(crate) snapshots: query::Snapshots,
}

impl SearchStore {
    /// Opens or creates the index directory at `path` (normally
    /// `<db>/search`). A new index records the hash of `def` in its first
    /// commit; an existing one keeps the hash it was built with
    /// ([`SearchStore::built_with`]).
    pub fn open(path: &Path, def: SearchDefinition) -> Result<SearchStore, ProjectionError> {
        std::fs::create_dir_all(path).map_err(|x| e(format!("{}: {x}", path.display())))?;
        let dir = MmapDirectory::open(path).map_err(|x| e(format!("{}: {x}", path.display())))?;
        let index = if Index::exists(&dir).map_err(e)? {
            Index::open(dir).map_err(e)?
        } else {
            Index::create(dir, schema::schema(&def.tokenizer), index_settings()).map_err(e)?
        };
        // An index built by an earlier release may lack fields this layout
        // has. Its payload names the older definition, so the slot marks
        // it stale (never searched nor written) until a rebuild replaces
        // it; it must still open, so that the rebuild and the operator's
        // tools can run.
        let (fields, compatible) = match Fields::of(&index.schema()) {
            Ok(f) => (f, true),
            Err(_) => (Fields::of(&schema::schema(&def.tokenizer)).map_err(e)?, false),
        };
        let payload = match index.load_metas().map_err(e)?.payload {
            Some(p) => Some(serde_json::from_str::<Payload>(&p).map_err(|x| e(format!("unreadable commit payload {p:?}: {x}")))?),
            None => None,
        };
        // tantivy's indexing, merge and segment threads inherit the CPU
        // priority of the thread that starts them (the writer starts them,
        // and each commit restarts the indexing threads): start them in
        // the background (`crate::priority`).
        let (writer, payload) = crate::priority::in_background(|| {
            let mut writer = start_writer(&index, &def)?;
            let payload = match payload {
                Some(p) => p,
                None => {
                    // A new index: record the definition it is built with.
                    let p = Payload { position: 0, definition: def.hash.clone() };
                    let mut c = writer.prepare_commit().map_err(e)?;
                    c.set_payload(&serde_json::to_string(&p).map_err(e)?);
                    c.commit().map_err(e)?;
                    p
                }
            };
            if index.searchable_segment_ids().map_err(e)?.len() > 8 {
                // Left unmerged (a rebuild installed before its merges ran):
                // an empty commit with the same payload lets tantivy merge.
                let mut c = writer.prepare_commit().map_err(e)?;
                c.set_payload(&serde_json::to_string(&payload).map_err(e)?);
                c.commit().map_err(e)?;
            }
            Ok::<_, ProjectionError>((writer, payload))
        })
        .map_err(|_| e("starting the index writer panicked"))??;
        let columns = Arc::new(columns::ColumnCache::default());
        let warmer: Weak<dyn tantivy::Warmer> = Arc::downgrade(&columns) as Weak<dyn tantivy::Warmer>;
        let reader: IndexReader =
            index.reader_builder().reload_policy(ReloadPolicy::OnCommitWithDelay).warmers(vec![warmer]).try_into().map_err(e)?;
        if !compatible && payload.definition == def.hash {
            return Err(e(format!("{}: the index lacks fields of its own definition; rebuild the search projection", path.display())));
        }
        let store = SearchStore {
            index,
            reader,
            columns,
            fields,
            compatible,
            def,
            built_with: payload.definition,
            writer: Mutex::new(Writer {
                writer: Some(writer),
                pending: HashMap::new(),
                pending_docs: 0,
                last_commit: Instant::now(),
                bulk: false,
                merge_due: false,
            }),
            committed: AtomicU64::new(payload.position),
            applied: AtomicU64::new(payload.position),
            snapshots: Default::default(),
        };
        store.publish_docs();
        Ok(store)
    }

    /// Refuses to touch an index of an older layout: its field numbers are
    /// not this release's.
    pub(crate) fn check_compatible(&self) -> Result<(), ProjectionError> {
        if self.compatible { Ok(()) } else { Err(e("the index was built with an older layout; rebuild the search projection")) }
    }

    /// The hash of the definition this index was built with.
    pub fn built_with(&self) -> &str {
        &self.built_with
    }

    /// The definition documents are indexed with.
    pub fn definition(&self) -> &SearchDefinition {
        &self.def
    }

    /// The index's fields.
    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    /// The index (for query parsing).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The searcher of the last commit and the position it covers.
    pub fn snapshot(&self) -> (Searcher, u64) {
        // The position first: a commit reloads the reader before it
        // publishes its position, so the searcher covers at least this.
        let position = self.committed.load(Ordering::Acquire);
        (self.reader.searcher(), position)
    }

    fn publish_docs(&self) {
        metrics::gauge!("stemedb_search_index_docs").set(self.reader.searcher().num_docs() as f64);
    }

    /// The encoded assertion `id`, from the uncommitted documents or the index.
    fn find(&self, w: &Writer, id: &AssertionId) -> Result<Option<Vec<u8>>, ProjectionError> {
        if let Some(b) = w.pending.get(&id.0) {
            return Ok(Some(b.clone()));
        }
        let searcher = self.reader.searcher();
        let q = TermQuery::new(Term::from_field_text(self.fields.id, &id.to_hex()), IndexRecordOption::Basic);
        let top = searcher.search(&q, &TopDocs::with_limit(1).order_by_score()).map_err(e)?;
        let Some((_, addr)) = top.first() else { return Ok(None) };
        let doc: TantivyDocument = searcher.doc(*addr).map_err(e)?;
        Ok(doc.get_first(self.fields.stored).and_then(|v| v.as_bytes()).map(<[u8]>::to_vec))
    }

    /// Re-creates the document of `id` after `change` (no-op if unknown).
    fn update(&self, w: &mut Writer, id: &AssertionId, change: impl FnOnce(&mut StoredAssertion)) -> Result<(), ProjectionError> {
        let Some(bytes) = self.find(w, id)? else { return Ok(()) };
        let mut s: StoredAssertion = rmp_serde::from_slice(&bytes).map_err(e)?;
        change(&mut s);
        self.add(w, id, &s, true)
    }

    fn add(&self, w: &mut Writer, id: &AssertionId, s: &StoredAssertion, replace: bool) -> Result<(), ProjectionError> {
        let bytes = rmp_serde::to_vec_named(s).map_err(e)?;
        if replace {
            w.index_writer()?.delete_term(Term::from_field_text(self.fields.id, &id.to_hex()));
        }
        w.index_writer()?.add_document(self.fields.document(id, s, &bytes)).map_err(e)?;
        w.pending.insert(id.0, bytes);
        w.pending_docs += 1;
        Ok(())
    }

    fn commit(&self, w: &mut Writer) -> Result<u64, ProjectionError> {
        let position = self.applied.load(Ordering::Acquire);
        if position == self.committed.load(Ordering::Acquire) && w.pending_docs == 0 && !w.merge_due {
            return Ok(position);
        }
        let payload = serde_json::to_string(&Payload { position, definition: self.built_with.clone() }).map_err(e)?;
        let mut c = w.index_writer()?.prepare_commit().map_err(e)?;
        c.set_payload(&payload);
        c.commit().map_err(e)?;
        self.reader.reload().map_err(e)?;
        w.pending.clear();
        w.pending_docs = 0;
        w.merge_due = false;
        w.last_commit = Instant::now();
        self.committed.store(position, Ordering::Release);
        self.publish_docs();
        Ok(position)
    }
}

impl Projection for SearchStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(self.committed.load(Ordering::Acquire))
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        self.check_compatible()?;
        let mut w = self.writer.lock().map_err(|_| e("the index writer lock is poisoned"))?;
        let applied = self.applied.load(Ordering::Acquire);
        w.set_bulk(records.len() >= BULK_BATCH);
        for r in records {
            // A caller that re-reads from the checkpoint (a shadow being
            // caught up) may hand over events already applied but not yet
            // committed.
            if r.position <= applied {
                continue;
            }
            if r.position != self.applied.load(Ordering::Acquire) + 1 && self.applied.load(Ordering::Acquire) != 0 {
                return Err(e(format!(
                    "event at {} does not follow the applied position {}",
                    r.position,
                    self.applied.load(Ordering::Acquire)
                )));
            }
            match &r.event {
                Event::AssertionRecorded { id, assertion } => {
                    for old in &assertion.supersedes {
                        self.update(&mut w, old, |s| {
                            if !s.superseded_by.contains(id) {
                                s.superseded_by.push(*id);
                            }
                        })?;
                    }
                    let s = StoredAssertion {
                        position: r.position,
                        recorded_at: r.recorded_at,
                        assertion: assertion.clone(),
                        retraction: None,
                        superseded_by: Vec::new(),
                    };
                    self.add(&mut w, id, &s, false)?;
                }
                Event::AssertionRetracted(rt) => {
                    self.update(&mut w, &rt.id, |s| {
                        if s.retraction.is_none() {
                            s.retraction = Some(StoredRetraction {
                                position: r.position,
                                recorded_at: r.recorded_at,
                                agent: rt.agent.clone(),
                                reason: rt.reason.clone(),
                                signature: rt.signature.clone(),
                            });
                        }
                    })?;
                }
            }
            self.applied.store(r.position, Ordering::Release);
        }
        if w.pending_docs >= self.def.commit_docs
            || (w.last_commit.elapsed() >= self.def.commit_interval
                && self.applied.load(Ordering::Acquire) > self.committed.load(Ordering::Acquire))
        {
            if w.bulk {
                // Catching up: report the previous commit as visible, so
                // the worker's idle flush runs when catch-up ends and
                // resumes merging (min_position may wait one commit longer).
                let before = self.committed.load(Ordering::Acquire);
                self.commit(&mut w)?;
                return Ok(before);
            }
            return self.commit(&mut w);
        }
        Ok(self.committed.load(Ordering::Acquire))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        let mut w = self.writer.lock().map_err(|_| e("the index writer lock is poisoned"))?;
        w.set_bulk(false);
        self.commit(&mut w)
    }

    fn idle_flush(&self) -> Option<Duration> {
        Some(self.def.commit_interval)
    }

    /// Waits for the merges of the segments a bulk load left (about 32
    /// per million documents), then starts a new writer: tantivy waits
    /// for merges only by closing one.
    fn settle(&self) -> Result<(), ProjectionError> {
        let mut w = self.writer.lock().map_err(|_| e("the index writer lock is poisoned"))?;
        w.set_bulk(false);
        self.commit(&mut w)?;
        if let Some(writer) = w.writer.take() {
            writer.wait_merging_threads().map_err(e)?;
            let writer = crate::priority::in_background(|| start_writer(&self.index, &self.def))
                .map_err(|_| e("starting the index writer panicked"))??;
            w.writer = Some(writer);
            w.bulk = false;
        }
        Ok(())
    }

    /// Searches see documents at commits on a cadence, not at once, so
    /// indexing yields the cores to writes and to kv and lenses.
    fn background(&self) -> bool {
        true
    }

    /// One row per document: table 0, key = hex id, value = the stored
    /// assertion (with its retraction and supersessions), in id order.
    /// Commits pending documents first so the snapshot is the applied state.
    fn visit_rows(&self, visit: &mut super::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        self.check_compatible()?;
        let (searcher, position) = {
            let mut w = self.writer.lock().map_err(|_| e("the index writer lock is poisoned"))?;
            let position = self.commit(&mut w)?;
            (self.reader.searcher(), position)
        };
        let mut rows = Vec::new();
        for addr in searcher.search(&tantivy::query::AllQuery, &tantivy::collector::DocSetCollector).map_err(e)? {
            let doc: TantivyDocument = searcher.doc(addr).map_err(e)?;
            let id = doc.get_first(self.fields.id).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let stored = doc.get_first(self.fields.stored).and_then(|v| v.as_bytes()).map(<[u8]>::to_vec).unwrap_or_default();
            rows.push((id, stored));
        }
        rows.sort_unstable();
        for (id, stored) in &rows {
            if !visit(0, id.as_bytes(), stored) {
                break;
            }
        }
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use tantivy::schema::{STRING, Schema};

    use super::*;

    /// An index written by an earlier release (here: one that lacks the
    /// fields of this layout) opens as stale, is never written to, and
    /// reports the definition it was built with, so that a rebuild can
    /// replace it.
    #[test]
    fn an_index_of_an_older_layout_opens_stale_and_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("search");
        std::fs::create_dir_all(&path).expect("mkdir");
        {
            let mut b = Schema::builder();
            b.add_text_field("id", STRING);
            let index = Index::create_in_dir(&path, b.build()).expect("create");
            let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000).expect("writer");
            let mut c = writer.prepare_commit().expect("prepare");
            c.set_payload(&serde_json::to_string(&Payload { position: 7, definition: "old-layout".into() }).expect("json"));
            c.commit().expect("commit");
        }
        let store = SearchStore::open(&path, SearchDefinition::default()).expect("an older layout still opens");
        assert_eq!(store.built_with(), "old-layout");
        assert_eq!(store.checkpoint().expect("checkpoint"), 7);
        let err = store.apply(&[]).expect_err("an older layout is never written");
        assert!(err.message.contains("older layout"), "{}", err.message);
    }

    fn records(first: u64, n: u64) -> Vec<LogRecord> {
        (first..first + n)
            .map(|position| {
                let assertion = crate::model::Assertion {
                    subject: format!("s:{position}"),
                    predicate: "p".into(),
                    object: crate::model::Object::Integer(position as i64),
                    confidence: None,
                    agent: "a".into(),
                    signature: None,
                    source: None,
                    valid_time: None,
                    supersedes: Vec::new(),
                };
                let event = Event::AssertionRecorded { id: assertion.id(), assertion };
                LogRecord { position, recorded_at: chrono::Utc::now(), event }
            })
            .collect()
    }

    /// A bulk load leaves one segment per commit; `settle` merges them
    /// and the store goes on taking events, so the installed index opens
    /// merged.
    #[test]
    fn settling_merges_what_a_bulk_load_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("search");
        let store = SearchStore::open(&path, SearchDefinition::default()).expect("open");
        for i in 0..20 {
            store.apply(&records(1 + i * 20, 20)).expect("apply");
            // Small batches, committed as a catching-up worker's large ones are.
            let mut w = store.writer.lock().expect("lock");
            w.set_bulk(true);
            store.commit(&mut w).expect("commit");
        }
        let segments = |index: &Index| index.searchable_segment_ids().expect("segments").len();
        let left = segments(&store.index);
        assert!(left >= 10, "a segment per bulk commit (or per indexing thread): {left}");
        store.flush().expect("flush");
        store.settle().expect("settle");
        // The new writer takes the next events as usual.
        store.apply(&records(401, 1)).expect("apply after settling");
        store.flush().expect("flush");
        drop(store);
        let index = Index::open_in_dir(&path).expect("reopen");
        assert!(segments(&index) <= 3, "merged before closing: {} of {left} segments left", segments(&index));
        let reopened = SearchStore::open(&path, SearchDefinition::default()).expect("open");
        assert_eq!(reopened.checkpoint().expect("checkpoint"), 401);
        assert_eq!(reopened.snapshot().0.num_docs(), 401);
    }
}
