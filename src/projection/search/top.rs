//! One pass that finds a page of best hits and counts every match.
//!
//! Every sort order ranks by a key and breaks ties by the newest log
//! position. tantivy's `TopDocs` can tweak scores into such pairs, but then
//! reads the position column of *every* matching document; with a `Count`
//! beside it, each document also goes through two collectors. Here a
//! document's position is read only when its key could still enter the
//! page (rarely, once the page is full), and the count is a field of the
//! same collector. On a million documents this is most of a search's cost.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::Column;
use tantivy::{DocAddress, DocId, Score, SegmentOrdinal, SegmentReader};

/// What a page is ranked by, before the position tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rank {
    /// BM25 relevance.
    Score,
    /// The `confidence` fast field.
    Confidence,
    /// Nothing: the position alone (newest first).
    Position,
}

/// A hit's place in the order: higher key first, then higher position.
#[derive(Clone, Copy, Debug)]
pub struct Ranked {
    /// The rank key (score, confidence, or 0).
    pub key: f64,
    /// The log position of the assertion.
    pub position: u64,
    /// Where the document is.
    pub address: DocAddress,
}

impl Ranked {
    fn cmp_rank(&self, other: &Self) -> Ordering {
        self.key.total_cmp(&other.key).then(self.position.cmp(&other.position))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp_rank(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_rank(other)
    }
}

/// A range filter checked on each candidate's fast field instead of by a
/// range query. When the query already has a posting list to drive it (a
/// word, a subject, a tier), reading the column of each of its matches is
/// far cheaper than intersecting with a range that scans the column in
/// blocks: `q=dose&tier=clinical&min_confidence=0.5` went from 7.0 to
/// 4.5 ms. Bounds are inclusive; `None` is open.
#[derive(Clone, Copy, Debug)]
pub enum Within {
    /// The `confidence` field.
    Confidence(Option<f64>, Option<f64>),
    /// A date fast field (by name), in nanoseconds since the epoch.
    Date(&'static str, Option<i64>, Option<i64>),
}

fn inside<T: PartialOrd>(v: T, lo: Option<T>, hi: Option<T>) -> bool {
    lo.is_none_or(|lo| v >= lo) && hi.is_none_or(|hi| v <= hi)
}

/// [`Within`] with the segment's column opened.
enum SegmentWithin {
    Confidence(Option<Column<f64>>, Option<f64>, Option<f64>),
    Date(Option<Column<tantivy::DateTime>>, Option<i64>, Option<i64>),
}

impl SegmentWithin {
    fn open(w: &Within, reader: &SegmentReader) -> SegmentWithin {
        match *w {
            Within::Confidence(lo, hi) => SegmentWithin::Confidence(reader.fast_fields().f64("confidence").ok(), lo, hi),
            Within::Date(name, lo, hi) => SegmentWithin::Date(reader.fast_fields().date(name).ok(), lo, hi),
        }
    }

    /// A document without a value is outside, as with a range query.
    fn accepts(&self, doc: DocId) -> bool {
        match self {
            SegmentWithin::Confidence(col, lo, hi) => col.as_ref().and_then(|c| c.first(doc)).is_some_and(|v| inside(v, *lo, *hi)),
            SegmentWithin::Date(col, lo, hi) => {
                col.as_ref().and_then(|c| c.first(doc)).is_some_and(|v| inside(v.into_timestamp_nanos(), *lo, *hi))
            }
        }
    }
}

/// Collects the best `offset + limit` hits by [`Rank`] then position, and
/// counts all matches. The fruit is (the hits after `offset`, best first;
/// the number of matching documents).
pub struct TopNewest {
    rank: Rank,
    keep: usize,
    offset: usize,
    filters: Vec<Within>,
}

impl TopNewest {
    /// A page of `limit` hits after skipping the best `offset`.
    pub fn new(rank: Rank, limit: usize, offset: usize) -> TopNewest {
        TopNewest { rank, keep: limit.saturating_add(offset).max(1), offset, filters: Vec::new() }
    }

    /// Only documents inside every one of `filters` match (and count).
    pub fn within(mut self, filters: Vec<Within>) -> TopNewest {
        self.filters = filters;
        self
    }
}

/// [`TopNewest`] within one segment.
pub struct SegmentTop {
    rank: Rank,
    keep: usize,
    segment: SegmentOrdinal,
    position: Option<Column<u64>>,
    confidence: Option<Column<f64>>,
    filters: Vec<SegmentWithin>,
    heap: BinaryHeap<Reverse<Ranked>>,
    count: usize,
}

impl Collector for TopNewest {
    type Fruit = (Vec<Ranked>, usize);
    type Child = SegmentTop;

    fn for_segment(&self, segment: SegmentOrdinal, reader: &SegmentReader) -> tantivy::Result<SegmentTop> {
        let fast = reader.fast_fields();
        let confidence = if self.rank == Rank::Confidence { fast.f64("confidence").ok() } else { None };
        Ok(SegmentTop {
            rank: self.rank,
            keep: self.keep,
            segment,
            position: fast.u64("position").ok(),
            confidence,
            filters: self.filters.iter().map(|w| SegmentWithin::open(w, reader)).collect(),
            heap: BinaryHeap::with_capacity(self.keep.min(4096) + 1),
            count: 0,
        })
    }

    fn requires_scoring(&self) -> bool {
        self.rank == Rank::Score
    }

    fn merge_fruits(&self, fruits: Vec<(Vec<Ranked>, usize)>) -> tantivy::Result<(Vec<Ranked>, usize)> {
        let count = fruits.iter().map(|(_, n)| n).sum();
        let mut all: Vec<Ranked> = fruits.into_iter().flat_map(|(hits, _)| hits).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        all.truncate(self.keep);
        Ok((all.into_iter().skip(self.offset).collect(), count))
    }
}

impl SegmentCollector for SegmentTop {
    type Fruit = (Vec<Ranked>, usize);

    fn collect(&mut self, doc: DocId, score: Score) {
        if !self.filters.iter().all(|f| f.accepts(doc)) {
            return;
        }
        self.count += 1;
        let key = match self.rank {
            Rank::Score => f64::from(score),
            Rank::Confidence => self.confidence.as_ref().and_then(|c| c.first(doc)).unwrap_or(0.0),
            Rank::Position => 0.0,
        };
        if self.heap.len() >= self.keep
            && let Some(Reverse(worst)) = self.heap.peek()
            && key < worst.key
        {
            return; // cannot enter the page: no position read
        }
        let position = self.position.as_ref().and_then(|c| c.first(doc)).unwrap_or(0);
        let hit = Ranked { key, position, address: DocAddress::new(self.segment, doc) };
        if self.heap.len() < self.keep {
            self.heap.push(Reverse(hit));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && hit > worst.0
        {
            *worst = Reverse(hit);
        }
    }

    fn harvest(self) -> (Vec<Ranked>, usize) {
        (self.heap.into_iter().map(|Reverse(h)| h).collect(), self.count)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use tantivy::collector::TopDocs;
    use tantivy::query::{AllQuery, Query, QueryParser};
    use tantivy::schema::{FAST, INDEXED, Schema, TEXT};
    use tantivy::{Index, doc};

    use super::*;

    /// The page every rank must give: all matches sorted by (key, position)
    /// descending, computed the slow way (every match scored and read).
    fn naive(
        searcher: &tantivy::Searcher,
        query: &dyn Query,
        rank: Rank,
        limit: usize,
        offset: usize,
        filters: &[Within],
    ) -> (Vec<(u64, u64)>, usize) {
        let all = searcher.search(query, &TopDocs::with_limit(100_000).order_by_score()).expect("search");
        let mut rows: Vec<(f64, u64)> = all
            .iter()
            .filter_map(|(score, addr)| {
                let reader = searcher.segment_reader(addr.segment_ord);
                let pos = reader.fast_fields().u64("position").expect("col").first(addr.doc_id).expect("pos");
                let conf = reader.fast_fields().f64("confidence").expect("col").first(addr.doc_id).expect("conf");
                let when = reader.fast_fields().date("when").expect("col").first(addr.doc_id).expect("when").into_timestamp_nanos();
                let keep = filters.iter().all(|f| match *f {
                    Within::Confidence(lo, hi) => lo.is_none_or(|lo| conf >= lo) && hi.is_none_or(|hi| conf <= hi),
                    Within::Date(_, lo, hi) => lo.is_none_or(|lo| when >= lo) && hi.is_none_or(|hi| when <= hi),
                });
                let key = match rank {
                    Rank::Score => f64::from(*score),
                    Rank::Confidence => conf,
                    Rank::Position => 0.0,
                };
                keep.then_some((key, pos))
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        let n = rows.len();
        (rows.into_iter().skip(offset).take(limit).map(|(k, p)| (k.to_bits(), p)).collect(), n)
    }

    #[test]
    fn pages_equal_a_full_sort_with_newest_first_on_ties() {
        let mut b = Schema::builder();
        let text = b.add_text_field("text", TEXT);
        let position = b.add_u64_field("position", FAST | INDEXED);
        let confidence = b.add_f64_field("confidence", FAST | INDEXED);
        let when = b.add_date_field("when", FAST | INDEXED);
        let index = Index::create_in_ram(b.build());
        let mut writer = index.writer_with_num_threads(1, 15_000_000).expect("writer");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let words = ["dose", "liver", "trial", "renal"];
        for p in 1..=600u64 {
            // Few distinct words and confidences: many ties on every key.
            let t = (0..rng.gen_range(1..4)).map(|_| words[rng.gen_range(0..words.len())]).collect::<Vec<_>>().join(" ");
            let c = f64::from(rng.gen_range(0..5u32)) / 4.0;
            let w = tantivy::DateTime::from_timestamp_nanos(rng.gen_range(0..10i64) * 1_000_000_000);
            writer.add_document(doc!(text => t, position => p, confidence => c, when => w)).expect("add");
            if p % 150 == 0 {
                writer.commit().expect("commit"); // several segments
            }
        }
        writer.commit().expect("commit");
        let searcher = index.reader().expect("reader").searcher();
        assert!(searcher.segment_readers().len() > 1);
        let parser = QueryParser::for_index(&index, vec![text]);
        let queries: Vec<Box<dyn Query>> =
            vec![Box::new(AllQuery), parser.parse_query("dose").expect("q"), parser.parse_query("liver OR renal").expect("q")];
        let filter_sets = [
            vec![],
            vec![Within::Confidence(Some(0.25), Some(0.75))],
            vec![Within::Confidence(Some(0.5), None), Within::Date("when", None, Some(4_000_000_000))],
            vec![Within::Date("when", Some(3_000_000_000), Some(3_000_000_000))],
        ];
        for query in &queries {
            for rank in [Rank::Score, Rank::Confidence, Rank::Position] {
                for (limit, offset) in [(1, 0), (7, 0), (7, 7), (20, 35), (1000, 0)] {
                    for filters in &filter_sets {
                        let top = TopNewest::new(rank, limit, offset).within(filters.clone());
                        let (hits, count) = searcher.search(query.as_ref(), &top).expect("search");
                        let got: Vec<(u64, u64)> = hits.iter().map(|h| (h.key.to_bits(), h.position)).collect();
                        let (want, n) = naive(&searcher, query.as_ref(), rank, limit, offset, filters);
                        assert_eq!(count, n, "{rank:?} count {filters:?}");
                        assert_eq!(got, want, "{rank:?} limit {limit} offset {offset} {filters:?}");
                    }
                }
            }
        }
    }
}
