//! Searching the index: text query, attribute filters, sort orders and
//! cursors that stay stable while new assertions arrive.
//!
//! A first page pins the searcher it ran on (its commit) and the committed
//! position; the cursor names both. Later pages run on the same searcher
//! while it is cached (every hit exactly once, flags as of the first page);
//! once evicted they fall back to the current searcher restricted to
//! positions up to the pinned one, so new assertions never shift a page.
//! `recent` and `confidence` pages continue after the last hit's sort key
//! (keyset); `relevance` pages continue by offset.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tantivy::query::{AllQuery, BooleanQuery, ConstScoreQuery, Occur, Query, QueryParser, RangeQuery, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Value};
use tantivy::{DocAddress, Searcher, TantivyDocument, Term};

use super::schema::{DEFAULT_TEXT_FIELDS, date};
use super::top::{Rank, TopNewest, Within};
use super::{SearchStore, e};
use crate::model::{AssertionId, Tier};
use crate::projection::ProjectionError;
use crate::projection::kv::StoredAssertion;

/// Largest page.
pub const MAX_LIMIT: usize = 1000;
/// Default page.
pub const DEFAULT_LIMIT: usize = 20;
/// How long a cursor's searcher stays pinned after its last use.
const SNAPSHOT_TTL: Duration = Duration::from_secs(300);
/// Most pinned searchers (each holds its segments' files open).
const MAX_SNAPSHOTS: usize = 64;

/// Object type names accepted by `object_type`.
pub const OBJECT_TYPES: [&str; 6] = ["text", "number", "integer", "boolean", "entity", "time"];

/// Sort orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Best text match first (ties: newest first).
    Relevance,
    /// Newest (highest log position) first.
    Recent,
    /// Highest confidence first (ties: newest first).
    Confidence,
}

impl Sort {
    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Sort> {
        match s {
            "relevance" => Some(Sort::Relevance),
            "recent" => Some(Sort::Recent),
            "confidence" => Some(Sort::Confidence),
            _ => None,
        }
    }

    fn tag(self) -> char {
        match self {
            Sort::Relevance => 'r',
            Sort::Recent => 't',
            Sort::Confidence => 'c',
        }
    }
}

/// Where the next page starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Cursor {
    sort: Sort,
    /// Generation of the pinned searcher.
    generation: u64,
    /// Highest position the pages cover.
    pin: u64,
    /// Relevance: hits already returned.
    offset: u64,
    /// Confidence of the last hit (bits).
    confidence: u64,
    /// Position of the last hit.
    position: u64,
    /// Matches of the first page's query.
    total: u64,
}

impl Cursor {
    /// The opaque wire form.
    pub fn encode(&self) -> String {
        let Cursor { sort, generation, pin, offset, confidence, position, total } = self;
        format!("{}{generation:x}.{pin:x}.{offset:x}.{confidence:x}.{position:x}.{total:x}", sort.tag())
    }

    /// Parses the wire form; `None` if it was not made by [`Cursor::encode`].
    pub fn decode(s: &str) -> Option<Cursor> {
        let mut chars = s.chars();
        let sort = match chars.next()? {
            'r' => Sort::Relevance,
            't' => Sort::Recent,
            'c' => Sort::Confidence,
            _ => return None,
        };
        let parts: Vec<u64> = chars.as_str().split('.').map(|p| u64::from_str_radix(p, 16).ok()).collect::<Option<_>>()?;
        let [generation, pin, offset, confidence, position, total] = parts.as_slice().try_into().ok()?;
        Some(Cursor { sort, generation, pin, offset, confidence, position, total })
    }
}

/// A search request, already validated by the caller where it could be.
#[derive(Clone, Debug, Default)]
pub struct SearchRequest {
    /// tantivy query syntax over the text fields.
    pub q: Option<String>,
    /// Exact subject.
    pub subject: Option<String>,
    /// Exact predicate.
    pub predicate: Option<String>,
    /// Exact agent.
    pub agent: Option<String>,
    /// Source tier (default `community` when absent on the assertion).
    pub tier: Option<Tier>,
    /// Object type name.
    pub object_type: Option<String>,
    /// Inclusive confidence bounds.
    pub min_confidence: Option<f64>,
    /// See `min_confidence`.
    pub max_confidence: Option<f64>,
    /// Inclusive valid-time bounds.
    pub valid_from: Option<DateTime<Utc>>,
    /// See `valid_from`.
    pub valid_to: Option<DateTime<Utc>>,
    /// Inclusive transaction-time bounds.
    pub recorded_from: Option<DateTime<Utc>>,
    /// See `recorded_from`.
    pub recorded_to: Option<DateTime<Utc>>,
    /// Also return retracted and superseded assertions.
    pub include_retracted: bool,
    /// Order (default: relevance with `q`, recent without).
    pub sort: Option<Sort>,
    /// Page size.
    pub limit: usize,
    /// Continuation.
    pub cursor: Option<Cursor>,
}

/// One hit.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The assertion's id.
    pub id: AssertionId,
    /// Text relevance (0 without `q`).
    pub score: f32,
    /// The assertion as stored (with its retraction and supersessions).
    pub stored: StoredAssertion,
}

/// A page of hits.
#[derive(Clone, Debug)]
pub struct SearchPage {
    /// Hits in order.
    pub hits: Vec<Hit>,
    /// Matches in the pinned snapshot (all pages).
    pub total: u64,
    /// The next page's cursor.
    pub next: Option<String>,
    /// The position the answer reflects.
    pub position: u64,
}

/// Why a search failed.
#[derive(Debug)]
pub enum SearchError {
    /// The request is wrong: the parameter and what is wrong with it.
    Invalid(&'static str, String),
    /// The store failed.
    Storage(ProjectionError),
}

impl From<ProjectionError> for SearchError {
    fn from(x: ProjectionError) -> Self {
        SearchError::Storage(x)
    }
}

fn store_err<E: std::fmt::Display>(x: E) -> SearchError {
    SearchError::Storage(e(x))
}

/// Searchers pinned by cursors.
#[derive(Default)]
pub struct Snapshots(Mutex<HashMap<u64, (Searcher, u64, Instant)>>);

impl Snapshots {
    fn get(&self, generation: u64) -> Option<(Searcher, u64)> {
        let mut m = self.0.lock().ok()?;
        let entry = m.get_mut(&generation)?;
        entry.2 = Instant::now();
        Some((entry.0.clone(), entry.1))
    }

    fn put(&self, generation: u64, searcher: &Searcher, position: u64) {
        let Ok(mut m) = self.0.lock() else { return };
        m.retain(|_, (_, _, used)| used.elapsed() < SNAPSHOT_TTL);
        if m.len() >= MAX_SNAPSHOTS
            && let Some(oldest) = m.iter().min_by_key(|(_, (_, _, used))| *used).map(|(k, _)| *k)
        {
            m.remove(&oldest);
        }
        m.entry(generation).or_insert_with(|| (searcher.clone(), position, Instant::now())).2 = Instant::now();
    }
}

fn term_q(t: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(t, IndexRecordOption::Basic))
}

fn range_f64(f: Field, lo: Bound<f64>, hi: Bound<f64>) -> Box<dyn Query> {
    let m = |b: Bound<f64>| match b {
        Bound::Included(v) => Bound::Included(Term::from_field_f64(f, v)),
        Bound::Excluded(v) => Bound::Excluded(Term::from_field_f64(f, v)),
        Bound::Unbounded => Bound::Unbounded,
    };
    Box::new(RangeQuery::new(m(lo), m(hi)))
}

fn range_u64(f: Field, lo: Bound<u64>, hi: Bound<u64>) -> Box<dyn Query> {
    let m = |b: Bound<u64>| match b {
        Bound::Included(v) => Bound::Included(Term::from_field_u64(f, v)),
        Bound::Excluded(v) => Bound::Excluded(Term::from_field_u64(f, v)),
        Bound::Unbounded => Bound::Unbounded,
    };
    Box::new(RangeQuery::new(m(lo), m(hi)))
}

fn range_date(f: Field, lo: Option<DateTime<Utc>>, hi: Option<DateTime<Utc>>) -> Box<dyn Query> {
    let m = |b: Option<DateTime<Utc>>| match b {
        Some(t) => Bound::Included(Term::from_field_date(f, date(&t))),
        None => Bound::Unbounded,
    };
    Box::new(RangeQuery::new(m(lo), m(hi)))
}

impl SearchStore {
    /// Parses `q` against this index (the error quotes the offending part).
    pub fn parse_text(&self, q: &str) -> Result<Box<dyn Query>, SearchError> {
        let defaults: Vec<Field> = DEFAULT_TEXT_FIELDS.iter().filter_map(|n| self.index().schema().get_field(n).ok()).collect();
        let mut parser = QueryParser::for_index(self.index(), defaults);
        parser.set_conjunction_by_default();
        parser.parse_query(q).map_err(|x| SearchError::Invalid("q", format!("cannot parse {q:?}: {x}")))
    }

    /// Runs a search.
    pub fn search(&self, req: &SearchRequest) -> Result<SearchPage, SearchError> {
        self.check_compatible()?;
        let f = *self.fields();
        let sort = req.sort.unwrap_or(if req.q.is_some() { Sort::Relevance } else { Sort::Recent });
        if let Some(c) = &req.cursor
            && c.sort != sort
        {
            return Err(SearchError::Invalid(
                "cursor",
                "the cursor was made for another sort order; repeat the query that returned it".into(),
            ));
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        if let Some(q) = &req.q {
            clauses.push((Occur::Must, self.parse_text(q)?));
        }
        // Attribute clauses only select: they add nothing to a score, so
        // `score` is the text relevance alone.
        let attribute = |t: Term| -> Box<dyn Query> { Box::new(ConstScoreQuery::new(term_q(t), 0.0)) };
        for (field, value) in
            [(f.subject, &req.subject), (f.predicate, &req.predicate), (f.agent, &req.agent), (f.object_type, &req.object_type)]
        {
            if let Some(v) = value {
                clauses.push((Occur::Must, attribute(Term::from_field_text(field, v))));
            }
        }
        // With a posting list to drive the query, attribute ranges and the
        // tier are checked by the collector on each match's decoded
        // attributes (`columns`); alone, they are queries.
        let driven_without_tier =
            req.q.is_some() || req.subject.is_some() || req.predicate.is_some() || req.agent.is_some() || req.object_type.is_some();
        let driven = driven_without_tier || req.tier.is_some();
        let mut within = Vec::new();
        if let Some(t) = req.tier {
            if driven_without_tier {
                within.push(Within::Tier(t));
            } else {
                clauses.push((Occur::Must, attribute(Term::from_field_text(f.tier, t.as_str()))));
            }
        }
        if req.min_confidence.is_some() || req.max_confidence.is_some() {
            if driven {
                within.push(Within::Confidence(req.min_confidence, req.max_confidence));
            } else {
                let lo = req.min_confidence.map_or(Bound::Unbounded, Bound::Included);
                let hi = req.max_confidence.map_or(Bound::Unbounded, Bound::Included);
                clauses.push((Occur::Must, range_f64(f.confidence, lo, hi)));
            }
        }
        let nanos = |t: &Option<DateTime<Utc>>| t.as_ref().map(|t| date(t).into_timestamp_nanos());
        for (field, name, from, to) in [
            (f.valid_time, "valid_time", &req.valid_from, &req.valid_to),
            (f.recorded_at, "recorded_at", &req.recorded_from, &req.recorded_to),
        ] {
            if from.is_some() || to.is_some() {
                if driven {
                    within.push(Within::Date(name, nanos(from), nanos(to)));
                } else {
                    clauses.push((Occur::Must, range_date(field, *from, *to)));
                }
            }
        }
        if !req.include_retracted {
            within.push(Within::Visible);
        }

        // Pin the snapshot: the first page's searcher while it is cached,
        // else the current one restricted to the first page's position.
        let (searcher, pin, generation) = match &req.cursor {
            Some(c) => match self.snapshots.get(c.generation) {
                Some((s, pin)) => (s, pin, c.generation),
                None => {
                    clauses.push((Occur::Must, range_u64(f.position, Bound::Unbounded, Bound::Included(c.pin))));
                    (self.snapshot().0, c.pin, c.generation)
                }
            },
            None => {
                let (s, pin) = self.snapshot();
                let generation = s.generation().generation_id();
                (s, pin, generation)
            }
        };
        // Continue after the cursor.
        let mut offset = 0;
        if let Some(c) = &req.cursor {
            match sort {
                Sort::Relevance => offset = c.offset as usize,
                Sort::Recent => clauses.push((Occur::Must, range_u64(f.position, Bound::Unbounded, Bound::Excluded(c.position)))),
                Sort::Confidence => {
                    let conf = f64::from_bits(c.confidence);
                    let lower = range_f64(f.confidence, Bound::Unbounded, Bound::Excluded(conf));
                    let same = BooleanQuery::new(vec![
                        (Occur::Must, range_f64(f.confidence, Bound::Included(conf), Bound::Included(conf))),
                        (Occur::Must, range_u64(f.position, Bound::Unbounded, Bound::Excluded(c.position))),
                    ]);
                    clauses.push((Occur::Must, Box::new(BooleanQuery::new(vec![(Occur::Should, lower), (Occur::Should, Box::new(same))]))));
                }
            }
        }
        let every_document = clauses.is_empty();
        if !clauses.iter().any(|(o, _)| *o == Occur::Must) {
            clauses.push((Occur::Must, Box::new(AllQuery)));
        }
        // A lone clause is searched as itself, not wrapped: a word or words
        // keep their specialized weights (block-max pruning in `TopNewest`).
        let query: Box<dyn Query> = match clauses.len() {
            1 => clauses.pop().map(|(_, q)| q).unwrap_or_else(|| Box::new(AllQuery)),
            _ => Box::new(BooleanQuery::new(clauses)),
        };
        let want = req.limit.clamp(1, MAX_LIMIT) + 1;
        // The total is counted by the collector (beside the page, or in a
        // pass of its own when relevance prunes); the first page's count is
        // what the cursor carries to later pages.
        let rank = match sort {
            Sort::Relevance => Rank::Score,
            Sort::Recent => Rank::Position,
            Sort::Confidence => Rank::Confidence,
        };
        let (ranked, counted) = searcher
            .search(query.as_ref(), &TopNewest::new(self.columns.clone(), rank, want, offset).within(within).every_document(every_document))
            .map_err(store_err)?;
        let scored: Vec<(f32, DocAddress)> =
            ranked.into_iter().map(|r| (if rank == Rank::Score { r.key as f32 } else { 0.0 }, r.address)).collect();
        let total = match &req.cursor {
            Some(c) => c.total,
            None => counted as u64,
        };
        let more = scored.len() > req.limit;
        let mut hits = Vec::with_capacity(scored.len().min(req.limit));
        for (score, addr) in scored.into_iter().take(req.limit) {
            let doc: TantivyDocument = searcher.doc(addr).map_err(store_err)?;
            let bytes =
                doc.get_first(f.stored).and_then(|v| v.as_bytes()).ok_or_else(|| store_err("a document has no stored assertion"))?;
            let stored: StoredAssertion = rmp_serde::from_slice(bytes).map_err(store_err)?;
            let id = doc
                .get_first(f.id)
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse::<AssertionId>().ok())
                .ok_or_else(|| store_err("a document has no id"))?;
            hits.push(Hit { id, score, stored });
        }
        let next = match (more, hits.last()) {
            (true, Some(last)) => {
                self.snapshots.put(generation, &searcher, pin);
                Some(
                    Cursor {
                        sort,
                        generation,
                        pin,
                        offset: (offset + hits.len()) as u64,
                        confidence: last.stored.assertion.effective_confidence().to_bits(),
                        position: last.stored.position,
                        total,
                    }
                    .encode(),
                )
            }
            _ => None,
        };
        Ok(SearchPage { hits, total, next, position: pin })
    }
}
