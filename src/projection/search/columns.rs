//! The attributes every search reads per match, decoded once per segment
//! into plain arrays.
//!
//! A search ranks and filters each match by its log position, confidence,
//! tier, hidden flag and sometimes a date. Read through tantivy's columns,
//! each value costs a dynamic call, a row lookup and a bit-unpacking (a
//! third of a search's time on a million documents); read from an array it
//! is one load. Segments never change their documents (deletes only mark
//! them), so a segment's arrays stay valid for its whole life: they are
//! built when a reload first sees the segment ([`Warmer::warm`], off the
//! query path) and dropped when no searcher holds it any more
//! ([`Warmer::garbage_collect`], which also keeps the segments of searchers
//! pinned by cursors). Memory: about 17 bytes per document, plus 9 per
//! document for each date field a range filter has used.
//!
//! Tier and hidden are read from the inverted index (six and one posting
//! lists), so no index layout change was needed for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tantivy::index::SegmentId;
use tantivy::schema::IndexRecordOption;
use tantivy::{DocId, DocSet, Searcher, SearcherGeneration, SegmentReader, TERMINATED, Term, Warmer};

use crate::model::Tier;

/// Doc ids decoded per `first_vals` call.
const BLOCK: u32 = 1024;

/// A set of doc ids, one bit each.
pub struct DocBits(Box<[u64]>);

impl DocBits {
    fn with_len(max_doc: u32) -> DocBits {
        DocBits(vec![0u64; (max_doc as usize).div_ceil(64)].into_boxed_slice())
    }

    fn insert(&mut self, doc: DocId) {
        if let Some(w) = self.0.get_mut((doc / 64) as usize) {
            *w |= 1 << (doc % 64);
        }
    }

    /// Whether `doc` is in the set.
    #[inline]
    pub fn contains(&self, doc: DocId) -> bool {
        self.0.get((doc / 64) as usize).is_some_and(|w| w & (1 << (doc % 64)) != 0)
    }
}

/// A date fast field as nanoseconds since the epoch.
pub struct DateColumn {
    /// Values (0 where absent).
    pub nanos: Box<[i64]>,
    /// Documents that have a value.
    pub present: DocBits,
}

/// One segment's arrays, indexed by doc id.
pub struct SegmentColumns {
    /// `position` (0 if absent).
    pub position: Box<[u64]>,
    /// `confidence` (NaN if absent, so every range excludes it).
    pub confidence: Box<[f64]>,
    /// 1 + the index in [`Tier::ALL`] of the `tier` term (0: none).
    pub tier: Box<[u8]>,
    /// Documents with `hidden` = 1 (retracted or superseded).
    pub hidden: DocBits,
    /// Whether any document is hidden (most segments have none, and then
    /// visibility needs no check).
    pub any_hidden: bool,
    /// Date fields decoded so far, by name.
    dates: Mutex<Vec<(&'static str, Arc<DateColumn>)>>,
}

fn block_vals<T: Copy + PartialOrd + std::fmt::Debug + Send + Sync + 'static>(
    column: &tantivy::columnar::Column<T>,
    max_doc: u32,
    mut each: impl FnMut(DocId, Option<T>),
) {
    let mut docs = Vec::with_capacity(BLOCK as usize);
    let mut out = vec![None; BLOCK as usize];
    let mut start = 0;
    while start < max_doc {
        let end = (start + BLOCK).min(max_doc);
        docs.clear();
        docs.extend(start..end);
        out.iter_mut().for_each(|v| *v = None);
        column.first_vals(&docs, &mut out[..docs.len()]);
        for (doc, v) in docs.iter().zip(&out) {
            each(*doc, *v);
        }
        start = end;
    }
}

/// Calls `f` with every document of `term`'s posting list (deleted ones
/// too: the collector only sees live documents).
fn for_each_doc(reader: &SegmentReader, term: &Term, mut f: impl FnMut(DocId)) -> tantivy::Result<()> {
    if let Some(mut postings) = reader.inverted_index(term.field())?.read_postings(term, IndexRecordOption::Basic)? {
        let mut doc = postings.doc();
        while doc != TERMINATED {
            f(doc);
            doc = postings.advance();
        }
    }
    Ok(())
}

impl SegmentColumns {
    /// Decodes `reader`'s position, confidence, tier and hidden flag. A
    /// field the schema lacks decodes as absent everywhere.
    pub fn build(reader: &SegmentReader) -> tantivy::Result<SegmentColumns> {
        let max_doc = reader.max_doc();
        let fast = reader.fast_fields();
        let mut position = vec![0u64; max_doc as usize];
        if let Ok(col) = fast.u64("position") {
            block_vals(&col, max_doc, |d, v| position[d as usize] = v.unwrap_or(0));
        }
        let mut confidence = vec![f64::NAN; max_doc as usize];
        if let Ok(col) = fast.f64("confidence") {
            block_vals(&col, max_doc, |d, v| confidence[d as usize] = v.unwrap_or(f64::NAN));
        }
        let schema = reader.schema();
        let mut tier = vec![0u8; max_doc as usize];
        if let Ok(field) = schema.get_field("tier") {
            for (i, t) in Tier::ALL.iter().enumerate() {
                for_each_doc(reader, &Term::from_field_text(field, t.as_str()), |doc| {
                    if let Some(slot) = tier.get_mut(doc as usize) {
                        *slot = i as u8 + 1;
                    }
                })?;
            }
        }
        let mut hidden = DocBits::with_len(max_doc);
        let mut any_hidden = false;
        if let Ok(field) = schema.get_field("hidden") {
            for_each_doc(reader, &Term::from_field_u64(field, 1), |doc| {
                hidden.insert(doc);
                any_hidden = true;
            })?;
        }
        Ok(SegmentColumns {
            position: position.into_boxed_slice(),
            confidence: confidence.into_boxed_slice(),
            tier: tier.into_boxed_slice(),
            hidden,
            any_hidden,
            dates: Mutex::new(Vec::new()),
        })
    }

    /// The tier code of `tier` in [`SegmentColumns::tier`].
    pub fn tier_code(tier: Tier) -> u8 {
        Tier::ALL.iter().position(|t| *t == tier).map_or(0, |i| i as u8 + 1)
    }

    /// The date field `name`, decoded on first use (`None` if the segment
    /// has no such field).
    pub fn date(&self, name: &'static str, reader: &SegmentReader) -> Option<Arc<DateColumn>> {
        if let Ok(dates) = self.dates.lock()
            && let Some((_, col)) = dates.iter().find(|(n, _)| *n == name)
        {
            return Some(col.clone());
        }
        let column = reader.fast_fields().date(name).ok()?;
        let max_doc = reader.max_doc();
        let mut nanos = vec![0i64; max_doc as usize];
        let mut present = DocBits::with_len(max_doc);
        block_vals(&column, max_doc, |d, v| {
            if let Some(v) = v {
                nanos[d as usize] = v.into_timestamp_nanos();
                present.insert(d);
            }
        });
        let col = Arc::new(DateColumn { nanos: nanos.into_boxed_slice(), present });
        if let Ok(mut dates) = self.dates.lock() {
            dates.push((name, col.clone()));
        }
        Some(col)
    }
}

/// Every live segment's [`SegmentColumns`]; registered with the index
/// reader as a [`Warmer`].
#[derive(Default)]
pub struct ColumnCache(Mutex<HashMap<SegmentId, Arc<SegmentColumns>>>);

impl ColumnCache {
    /// The arrays of `reader`'s segment, decoding them now if no reload has
    /// (a reader without the warmer, or a race with the reload).
    pub fn get(&self, reader: &SegmentReader) -> tantivy::Result<Arc<SegmentColumns>> {
        let id = reader.segment_id();
        if let Some(c) = self.0.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(c);
        }
        let built = Arc::new(SegmentColumns::build(reader)?);
        if let Ok(mut m) = self.0.lock() {
            m.insert(id, built.clone());
        }
        Ok(built)
    }

    /// Segments cached (for tests and metrics).
    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Warmer for ColumnCache {
    fn warm(&self, searcher: &Searcher) -> tantivy::Result<()> {
        for reader in searcher.segment_readers() {
            self.get(reader)?;
        }
        Ok(())
    }

    fn garbage_collect(&self, live_generations: &[&SearcherGeneration]) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|id, _| live_generations.iter().any(|g| g.segments().contains_key(id)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;
    use std::time::{Duration, Instant};

    use tantivy::schema::{FAST, INDEXED, STRING, Schema};
    use tantivy::{Index, IndexReader, doc};

    use super::*;

    /// The reader warms every new segment, and the arrays of segments that
    /// no searcher holds any more are dropped (memory follows the index).
    #[test]
    fn warmed_on_reload_and_dropped_with_their_segments() {
        let mut b = Schema::builder();
        let position = b.add_u64_field("position", FAST | INDEXED);
        let confidence = b.add_f64_field("confidence", FAST);
        let tier = b.add_text_field("tier", STRING);
        let hidden = b.add_u64_field("hidden", INDEXED);
        let index = Index::create_in_ram(b.build());
        let cache = Arc::new(ColumnCache::default());
        let warmer: Weak<dyn Warmer> = Arc::downgrade(&cache) as Weak<dyn Warmer>;
        let reader: IndexReader =
            index.reader_builder().reload_policy(tantivy::ReloadPolicy::Manual).warmers(vec![warmer]).try_into().expect("reader");
        let mut writer = index.writer_with_num_threads(1, 15_000_000).expect("writer");
        writer.set_merge_policy(Box::new(tantivy::indexer::NoMergePolicy));
        for p in 1..=30u64 {
            let t = Tier::ALL[(p % 6) as usize].as_str();
            writer
                .add_document(doc!(position => p, confidence => p as f64 / 30.0, tier => t, hidden => u64::from(p % 7 == 0)))
                .expect("add");
            if p % 10 == 0 {
                writer.commit().expect("commit");
            }
        }
        reader.reload().expect("reload");
        let searcher = reader.searcher();
        assert_eq!(searcher.segment_readers().len(), 3);
        assert_eq!(cache.len(), 3, "every segment warmed by the reload");
        // The arrays hold what the columns and postings hold.
        for seg in searcher.segment_readers() {
            let cols = cache.get(seg).expect("columns");
            let positions = seg.fast_fields().u64("position").expect("col");
            for d in 0..seg.max_doc() {
                let p = positions.first(d).expect("position");
                assert_eq!(cols.position[d as usize], p);
                assert_eq!(cols.confidence[d as usize], p as f64 / 30.0);
                assert_eq!(cols.tier[d as usize], SegmentColumns::tier_code(Tier::ALL[(p % 6) as usize]));
                assert_eq!(cols.hidden.contains(d), p % 7 == 0);
            }
        }
        drop(searcher);
        let ids = index.searchable_segment_ids().expect("ids");
        writer.merge(&ids).wait().expect("merge");
        writer.commit().expect("commit");
        reader.reload().expect("reload");
        assert_eq!(reader.searcher().segment_readers().len(), 1);
        // tantivy collects dropped generations on a background thread.
        let deadline = Instant::now() + Duration::from_secs(20);
        while cache.len() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(cache.len(), 1, "the merged-away segments' arrays are dropped");
    }
}
