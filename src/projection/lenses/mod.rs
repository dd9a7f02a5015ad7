//! The `lenses` projection (redb): per `(subject, predicate)`, the live set
//! and a materialized [`Summary`] from which every lens answers without
//! `as_of`/`decay` in time proportional to the number of distinct values.
//!
//! Each batch loads every touched pair once, applies its events to the
//! live set, recomputes the pair's summary once (in log order, so results
//! are reproducible bit for bit), and writes both back with the checkpoint.

mod build;
mod packed;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{BulkLoad, DurableEvery, Projection, ProjectionError, pair_key, split_pair_key};
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
        let w = Weighting::plain();
        let consensus = lens::resolve(Lens::Consensus, set, defs, w);
        let layered = lens::resolve(Lens::Layered, set, defs, w);
        Summary {
            recency: lens::resolve(Lens::Recency, set, defs, w).winner,
            confidence: lens::resolve(Lens::Confidence, set, defs, w).winner,
            authority: lens::resolve(Lens::Authority, set, defs, w).winner,
            claims: consensus.claims,
            conflict: consensus.conflict,
            tiers: layered.tiers.unwrap_or_default(),
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
    db: Database,
    /// The store's file, beside which a bulk load spills its sort runs.
    path: PathBuf,
    /// Memory a bulk load may hold before it spills a sorted run.
    sort_budget: usize,
    defs: Definitions,
    durability: DurableEvery,
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
        Ok(LensStore { db, path: path.to_path_buf(), sort_budget: super::bulk_buffer_bytes(), defs, durability: DurableEvery::default() })
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
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(PAIRS).map_err(e)?;
        let s = match t.get(pair_key(subject, predicate).as_slice()).map_err(e)? {
            Some(v) => packed::decode(v.value().0, true).map_err(e)?,
            None => Summary::empty(),
        };
        Ok((s, checkpoint_in(&tx)?))
    }

    /// The answer of `lens` for a pair, and the position it reflects: the
    /// hot path of lens reads, which decodes only what `lens` shows.
    pub fn resolution(&self, subject: &str, predicate: &str, lens: Lens) -> Result<(Resolution, u64), ProjectionError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(PAIRS).map_err(e)?;
        let summary = match t.get(pair_key(subject, predicate).as_slice()).map_err(e)? {
            Some(v) => packed::decode(v.value().0, lens == Lens::Layered).map_err(e)?,
            None => Summary::empty(),
        };
        Ok((summary.into_resolution(lens), checkpoint_in(&tx)?))
    }

    /// The live set of a pair (for `decay` queries), and its position.
    pub fn live_set(&self, subject: &str, predicate: &str) -> Result<(LiveSet, u64), ProjectionError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(PAIRS).map_err(e)?;
        let s = match t.get(pair_key(subject, predicate).as_slice()).map_err(e)? {
            Some(v) => rmp_serde::from_slice(v.value().1).map_err(e)?,
            None => LiveSet::default(),
        };
        Ok((s, checkpoint_in(&tx)?))
    }

    /// Every predicate of `subject` with its summary, and the position.
    pub fn subject(&self, subject: &str) -> Result<(Vec<(String, Summary)>, u64), ProjectionError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(PAIRS).map_err(e)?;
        let mut start = subject.as_bytes().to_vec();
        start.push(0);
        let mut end = subject.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for row in t.range(start.as_slice()..end.as_slice()).map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let Some((_, p)) = split_pair_key(k.value()) else { continue };
            out.push((p.to_string(), packed::decode(v.value().0, true).map_err(e)?));
        }
        Ok((out, checkpoint_in(&tx)?))
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

/// Events applied in memory, not yet written: every touched pair's live
/// set and the ids recorded. `apply` fills and writes one per batch, so a
/// pair touched several times in a batch is decoded, summarized and
/// written once. (A fresh store is bulk-loaded by [`build`] instead.)
#[derive(Default)]
struct Pending {
    /// Position of the first event applied (checked against the checkpoint).
    first: Option<u64>,
    /// Position of the last event applied.
    last: u64,
    /// Live sets of the pairs touched, loaded from the last commit first.
    touched: HashMap<Vec<u8>, LiveSet>,
    /// id → pair key of the assertions recorded.
    owners: HashMap<AssertionId, Vec<u8>>,
}

impl Pending {
    /// Applies `records` in memory; earlier state is read from `db`'s last commit.
    fn push(&mut self, db: &Database, records: &[LogRecord]) -> Result<(), ProjectionError> {
        let Some(first) = records.first().map(|r| r.position) else { return Ok(()) };
        super::check_continues(&mut self.first, self.last, first).map_err(e)?;
        let tx = db.begin_read().map_err(e)?;
        let pairs = tx.open_table(PAIRS).map_err(e)?;
        let owners = tx.open_table(OWNERS).map_err(e)?;
        for r in records {
            self.last = r.position;
            let (pk, id) = match &r.event {
                Event::AssertionRecorded { id, assertion } => (pair_key(&assertion.subject, &assertion.predicate), *id),
                Event::AssertionRetracted(rt) => match self.owners.get(&rt.id) {
                    Some(pk) => (pk.clone(), rt.id),
                    None => match owners.get(rt.id.0.as_slice()).map_err(e)? {
                        Some(v) => (v.value().to_vec(), rt.id),
                        None => continue,
                    },
                },
            };
            let set = match self.touched.entry(pk) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let set = match pairs.get(v.key().as_slice()).map_err(e)? {
                        Some(row) => rmp_serde::from_slice(row.value().1).map_err(e)?,
                        None => LiveSet::default(),
                    };
                    v.insert(set)
                }
            };
            match &r.event {
                Event::AssertionRecorded { assertion, .. } => {
                    set.record(id, r.position, r.recorded_at, assertion);
                    let pk = pair_key(&assertion.subject, &assertion.predicate);
                    self.owners.insert(id, pk);
                }
                Event::AssertionRetracted(_) => {
                    set.retract(&id);
                }
            }
        }
        Ok(())
    }

    /// Writes the touched pairs (live set and summary) and the new owners
    /// in key order with the checkpoint, in one transaction, and empties
    /// `self`; returns the checkpoint.
    fn write(&mut self, db: &Database, defs: &Definitions, durability: Durability) -> Result<u64, ProjectionError> {
        let Some(first) = self.first else { return Err(e("nothing to write")) };
        let last = self.last;
        let mut tx = db.begin_write().map_err(e)?;
        tx.set_durability(durability).map_err(e)?;
        {
            let mut meta = tx.open_table(META).map_err(e)?;
            if let Some(cp) = meta.get("checkpoint").map_err(e)?.map(|v| v.value())
                && first != cp + 1
            {
                return Err(e(format!("batch starts at {first} but the checkpoint is {cp}")));
            }
            {
                let mut owners = tx.open_table(OWNERS).map_err(e)?;
                let mut rows: Vec<(&AssertionId, &Vec<u8>)> = self.owners.iter().collect();
                rows.sort_unstable();
                for (id, pk) in rows {
                    owners.insert(id.0.as_slice(), pk.as_slice()).map_err(e)?;
                }
            }
            let mut pairs = tx.open_table(PAIRS).map_err(e)?;
            let mut keys: Vec<&Vec<u8>> = self.touched.keys().collect();
            keys.sort_unstable();
            let (mut summary, mut live) = (Vec::new(), Vec::new());
            for pk in keys {
                let set = &self.touched[pk];
                encode_pair(set, defs, &mut summary, &mut live)?;
                pairs.insert(pk.as_slice(), (summary.as_slice(), live.as_slice())).map_err(e)?;
            }
            meta.insert("checkpoint", last).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        *self = Pending::default();
        Ok(last)
    }
}

impl Projection for LensStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        let tx = self.db.begin_read().map_err(e)?;
        checkpoint_in(&tx)
    }

    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError> {
        if records.is_empty() {
            return self.checkpoint();
        }
        let mut pending = Pending::default();
        pending.push(&self.db, records)?;
        pending.write(&self.db, &self.defs, if self.durability.due() { Durability::Immediate } else { Durability::None })
    }

    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        // Only a store nobody has written to can be built by appends.
        if self.checkpoint()? != 0 {
            return Ok(None);
        }
        Ok(Some(Box::new(build::SortedBuild::new(self))))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        super::flush_redb(&self.db, e)?;
        self.checkpoint()
    }

    fn visit_rows(&self, visit: &mut super::RowVisitor<'_>) -> Result<u64, ProjectionError> {
        use super::visit_table;
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
