//! The `lenses` projection (redb): per `(subject, predicate)`, the live set
//! and a materialized [`Summary`] from which every lens answers without
//! `as_of`/`decay` in time proportional to the number of distinct values.
//!
//! Each batch loads every touched pair once, applies its events to the
//! live set, recomputes the pair's summary once (in log order, so results
//! are reproducible bit for bit), and writes both back with the checkpoint.

mod apply;
mod build;
mod packed;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{BulkLoad, Projection, ProjectionError, pair_key, split_pair_key};
use crate::lens::resolve::Weighting;
use crate::lens::{self, Claim, Conflict, Definitions, Lens, LiveSet, Resolution, Winner};
use crate::model::{AssertionId, Event, LogRecord, Tier};

const NAME: &str = "lenses";
/// pair key → (msgpack [`Summary`], msgpack [`LiveSet`]). One table, one
/// insert per touched pair; a read decodes only the half it needs.
const PAIRS: TableDefinition<&[u8], (&[u8], &[u8])> = TableDefinition::new("pairs");
const OWNERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("owners");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_TEXT: TableDefinition<&str, &str> = TableDefinition::new("meta_text");

/// Materialized answers of one pair for every lens without decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Consensus claims, shared by every lens.
    pub claims: Vec<Claim>,
    /// Conflict over the claims.
    pub conflict: Conflict,
    /// Winners of the single-winner lenses.
    pub recency: Option<Winner>,
    /// See [`Lens::Confidence`].
    pub confidence: Option<Winner>,
    /// See [`Lens::Authority`].
    pub authority: Option<Winner>,
    /// Per-tier consensus for `layered`.
    pub tiers: BTreeMap<Tier, Resolution>,
}

impl Summary {
    /// Computes the summary of a live set.
    pub fn of(set: &LiveSet, defs: &Definitions) -> Summary {
        // The consensus once, and from it the tiers; the other lenses'
        // winners alone (a `resolve` of each would redo the consensus).
        let w = Weighting::plain();
        let consensus = lens::resolve(Lens::Consensus, set, defs, w);
        let tiers = lens::resolve::per_tier(set, defs, w, &consensus);
        Summary {
            recency: lens::resolve::pick(Lens::Recency, set),
            confidence: lens::resolve::pick(Lens::Confidence, set),
            authority: lens::resolve::pick(Lens::Authority, set),
            claims: consensus.claims,
            conflict: consensus.conflict,
            tiers,
        }
    }

    /// The answer of `lens`.
    pub fn resolution(&self, lens: Lens) -> Resolution {
        self.clone().into_resolution(lens)
    }

    /// The answer of `lens`, moving out of the summary instead of cloning.
    pub fn into_resolution(self, lens: Lens) -> Resolution {
        let (winner, tiers) = match lens {
            Lens::Recency => (self.recency, None),
            Lens::Confidence => (self.confidence, None),
            Lens::Authority => (self.authority, None),
            Lens::Consensus | Lens::Skeptic => (
                self.claims.first().map(|c| Winner { value: c.value.clone(), confidence: c.share, assertions: c.assertions.clone() }),
                None,
            ),
            Lens::Layered => (self.tiers.values().next().and_then(|r| r.winner.clone()), Some(self.tiers)),
        };
        Resolution { winner, claims: self.claims, conflict: self.conflict, tiers }
    }

    /// The answer for a pair with no live assertions. Computed once: a
    /// read of an unknown pair (common: agents ask about facts nobody has
    /// asserted yet) must not parse the definitions again.
    pub fn empty() -> Summary {
        static EMPTY: std::sync::OnceLock<Summary> = std::sync::OnceLock::new();
        EMPTY.get_or_init(|| Summary::of(&LiveSet::default(), &Definitions::default())).clone()
    }
}

/// A [`Summary`] without its per-tier resolutions, which only `layered`
/// reads: the other lenses skip them undecoded (about half of a contested
/// pair's row). Field order and names are [`Summary`]'s, so it reads both
/// the positional and the named row forms.
#[derive(Deserialize)]
struct SummaryHead {
    claims: Vec<Claim>,
    conflict: Conflict,
    recency: Option<Winner>,
    confidence: Option<Winner>,
    authority: Option<Winner>,
    #[serde(default, rename = "tiers")]
    _tiers: serde::de::IgnoredAny,
}

impl SummaryHead {
    fn into_summary(self) -> Summary {
        let SummaryHead { claims, conflict, recency, confidence, authority, .. } = self;
        Summary { claims, conflict, recency, confidence, authority, tiers: BTreeMap::new() }
    }
}

/// The lenses store.
pub struct LensStore {
    db: Arc<Database>,
    /// The store's file, beside which a bulk load spills its sort runs.
    path: PathBuf,
    /// Memory a bulk load may hold before it spills a sorted run.
    sort_budget: usize,
    defs: Definitions,
    /// Batches applied but not yet written, which readers see; written by
    /// its committer thread (see [`staged`](super::staged)).
    staged: super::staged::Staged<apply::Chunk>,
}

fn e<E: std::fmt::Display>(x: E) -> ProjectionError {
    ProjectionError { projection: NAME, message: x.to_string() }
}

impl LensStore {
    /// Opens or creates the store file at `path` (normally
    /// `<db>/lenses.redb`) to compute answers with `defs`. A new store
    /// records the hash of `defs`; an existing one keeps the hash it was
    /// built with, which [`LensStore::built_with`] reports so that a change
    /// of definitions is noticed.
    pub fn open(path: &Path, defs: Definitions) -> Result<LensStore, ProjectionError> {
        let db = redb::Builder::new().set_cache_size(super::store_tuning().cache_bytes).create(path).map_err(e)?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(PAIRS).map_err(e)?;
            tx.open_table(OWNERS).map_err(e)?;
            let empty = tx.open_table(META).map_err(e)?.get("checkpoint").map_err(e)?.is_none();
            let mut text = tx.open_table(META_TEXT).map_err(e)?;
            if empty || text.get("definitions").map_err(e)?.is_none() {
                text.insert("definitions", defs.hash.as_str()).map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        let db = Arc::new(db);
        let staged = super::staged::start_redb(NAME, &db, apply::write_chunks, e)?;
        Ok(LensStore { db, path: path.to_path_buf(), sort_budget: super::bulk_buffer_bytes(), defs, staged })
    }

    /// Sets the memory a bulk load of this store may hold before it
    /// spills a sorted run to disk (default `STEMEDB_REBUILD_BUFFER_MB`):
    /// less memory means more runs to merge and, below 32 MiB, smaller
    /// transactions (see `projection::chunked`), never a
    /// different result.
    pub fn with_sort_budget(mut self, bytes: usize) -> Self {
        self.sort_budget = bytes.max(1);
        self
    }

    /// Pauses (true) or resumes (false) writing staged batches to the
    /// store file, after the write in progress. Readers keep seeing every
    /// applied batch either way: tests use it to check reads that merge
    /// staged batches with the store, and an operator never needs it.
    #[doc(hidden)]
    pub fn hold_commits(&self, held: bool) {
        self.staged.hold(held);
    }

    /// The hash of the definitions this store's answers were computed with.
    pub fn built_with(&self) -> Result<String, ProjectionError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(META_TEXT).map_err(e)?;
        Ok(t.get("definitions").map_err(e)?.map(|v| v.value().to_string()).unwrap_or_default())
    }

    /// The definitions answers are computed with.
    pub fn definitions(&self) -> &Definitions {
        &self.defs
    }

    /// The materialized summary of a pair (empty if unknown), and the
    /// position it reflects.
    pub fn summary(&self, subject: &str, predicate: &str) -> Result<(Summary, u64), ProjectionError> {
        let snap = apply::Snapshot::take(self)?;
        let s = snap.with_row(&pair_key(subject, predicate), |row| match row {
            Some((summary, _)) => packed::decode(summary, true).map_err(e),
            None => Ok(Summary::empty()),
        })??;
        Ok((s, snap.position()))
    }

    /// The answer of `lens` for a pair, and the position it reflects: the
    /// hot path of lens reads, which decodes only what `lens` shows.
    pub fn resolution(&self, subject: &str, predicate: &str, lens: Lens) -> Result<(Resolution, u64), ProjectionError> {
        let snap = apply::Snapshot::take(self)?;
        let summary = snap.with_row(&pair_key(subject, predicate), |row| match row {
            Some((summary, _)) => packed::decode(summary, lens == Lens::Layered).map_err(e),
            None => Ok(Summary::empty()),
        })??;
        Ok((summary.into_resolution(lens), snap.position()))
    }

    /// The live set of a pair (for `decay` queries), and its position.
    pub fn live_set(&self, subject: &str, predicate: &str) -> Result<(LiveSet, u64), ProjectionError> {
        let snap = apply::Snapshot::take(self)?;
        let set = snap.with_row(&pair_key(subject, predicate), |row| match row {
            Some((_, live)) => rmp_serde::from_slice(live).map_err(e),
            None => Ok(LiveSet::default()),
        })??;
        Ok((set, snap.position()))
    }

    /// Every predicate of `subject` with its summary, and the position.
    pub fn subject(&self, subject: &str) -> Result<(Vec<(String, Summary)>, u64), ProjectionError> {
        let snap = apply::Snapshot::take(self)?;
        let mut start = subject.as_bytes().to_vec();
        start.push(0);
        let mut end = subject.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for (k, summary) in snap.summaries_in(&start, &end)? {
            let Some((_, p)) = split_pair_key(&k) else { continue };
            out.push((p.to_string(), packed::decode(&summary, true).map_err(e)?));
        }
        Ok((out, snap.position()))
    }
}

/// Encodes a pair's row (its summary and live set) into the two buffers.
/// The summary is [`packed`]; the live set's structs are msgpack arrays,
/// without field names (about half the size of the named form), which
/// matters because every lens read decodes a summary and a rebuild writes
/// every row. Decoding accepts the older forms too, so stores written
/// before these changes still read.
fn encode_pair(set: &LiveSet, defs: &Definitions, summary: &mut Vec<u8>, live: &mut Vec<u8>) -> Result<(), ProjectionError> {
    summary.clear();
    live.clear();
    packed::encode(&Summary::of(set, defs), summary).map_err(e)?;
    rmp_serde::encode::write(live, set).map_err(e)
}

fn checkpoint_in(tx: &redb::ReadTransaction) -> Result<u64, ProjectionError> {
    let meta = tx.open_table(META).map_err(e)?;
    Ok(meta.get("checkpoint").map_err(e)?.map(|v| v.value()).unwrap_or(0))
}

impl Projection for LensStore {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The last position applied, staged or written.
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(apply::Snapshot::take(self)?.position())
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        if records.is_empty() {
            return self.checkpoint();
        }
        let chunk = apply::Chunk::apply(&apply::Snapshot::take(self)?, &self.defs, records)?;
        let last = records.last().map_or(0, |r| r.position);
        self.staged.push(NAME, chunk)?;
        Ok(last)
    }

    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        // Only a store nobody has written to can be built by appends.
        if self.checkpoint()? != 0 {
            return Ok(None);
        }
        Ok(Some(Box::new(build::SortedBuild::new(self))))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        self.staged.drain(NAME)?;
        super::flush_redb(&self.db, e)?;
        self.checkpoint()
    }

    fn visit_rows(&self, visit: &mut super::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        use super::visit_table;
        self.staged.drain(NAME)?;
        let tx = self.db.begin_read().map_err(e)?;
        let _ = visit_table(&tx, PAIRS, 0, visit).map_err(e)?
            && visit_table(&tx, OWNERS, 1, visit).map_err(e)?
            && visit_table(&tx, META, 2, visit).map_err(e)?
            && visit_table(&tx, META_TEXT, 3, visit).map_err(e)?;
        checkpoint_in(&tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Assertion, Object, Source};

    /// Rows are written without field names now; rows of stores written
    /// before (with names) must still decode to the same values.
    #[test]
    fn named_and_positional_rows_decode_alike() {
        let mut set = LiveSet::default();
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("valid time");
        for (i, (agent, object, tier)) in [
            ("a", Object::Integer(4), Some(Tier::Clinical)),
            ("b", Object::Text("4 g".into()), None),
            ("c", Object::Integer(4), Some(Tier::Expert)),
        ]
        .into_iter()
        .enumerate()
        {
            let a = Assertion {
                subject: "drug:aspirin".into(),
                predicate: "max_daily_dose".into(),
                object,
                confidence: Some(0.5 + i as f64 / 10.0),
                agent: agent.into(),
                signature: None,
                source: Some(Source { uri: "https://example.org".into(), tier, hash: None }),
                valid_time: (i == 1).then_some(t),
                supersedes: Vec::new(),
            };
            set.record(a.id(), i as u64 + 1, t, &a);
        }
        let defs = Definitions::default();
        let summary = Summary::of(&set, &defs);
        assert!(summary.tiers.len() >= 2, "the layered lens has per-tier resolutions");
        let (mut s, mut l) = (Vec::new(), Vec::new());
        encode_pair(&set, &defs, &mut s, &mut l).expect("encode");
        let named_summary = rmp_serde::to_vec_named(&summary).expect("encode");
        let positional_summary = rmp_serde::to_vec(&summary).expect("encode");
        let named_set = rmp_serde::to_vec_named(&set).expect("encode");
        assert!(s.len() * 5 < positional_summary.len() * 3, "packed {} bytes, positional {}", s.len(), positional_summary.len());
        assert!(positional_summary.len() < named_summary.len() && l.len() < named_set.len());
        // The packed form and both older ones read back the same summary.
        for bytes in [&s, &positional_summary, &named_summary] {
            assert_eq!(packed::decode(bytes, true).expect("decode"), summary);
            // The reads of every lens but layered skip the tiers undecoded
            // and must still give the same answers.
            let head = packed::decode(bytes, false).expect("decode head");
            assert!(head.tiers.is_empty());
            for lens in Lens::ALL.iter().copied().filter(|l| *l != Lens::Layered) {
                assert_eq!(head.clone().into_resolution(lens), summary.resolution(lens), "{}", lens.as_str());
            }
        }
        for bytes in [&l, &named_set] {
            assert_eq!(rmp_serde::from_slice::<LiveSet>(bytes).expect("decode"), set);
        }
    }
}
