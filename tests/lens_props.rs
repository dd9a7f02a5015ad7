//! Property tests of the lenses against a naive model.
//!
//! Random event sequences over one `(subject, predicate)` (several agents,
//! every tier, values of mixed object types, absent and present valid
//! times, confidences including 0 and 1, retractions and supersessions)
//! are applied to a real [`LensStore`] in random batches. Every lens's
//! materialized answer must equal what a deliberately naive implementation,
//! written here straight from the lens definitions and run over the raw
//! events, computes. A second property does the same for `decay` with an
//! explicit reference time and for `as_of` (only events recorded by then).
//! A third checks the KV view that `as_of` queries replay: a pair's history
//! up to a time, the position at a time, and each assertion's state.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;

use stemedb::lens::{self, Definitions, Lens, LiveSet, Resolution, Weighting};
use stemedb::model::{Assertion, AssertionId, Event, LogRecord, Object, Retraction, Source, Tier};
use stemedb::projection::Projection;
use stemedb::projection::kv::{EventKind, KvStore, ListFilter};
use stemedb::projection::lenses::LensStore;

const SUBJECT: &str = "drug:aspirin";
const PREDICATE: &str = "max_daily_dose";
const AGENTS: usize = 6;
/// Tolerance of float comparisons between the store and the model.
const EPS: f64 = 1e-9;
/// Two weights (or a share and 0.75) this close are equal in exact
/// arithmetic: they differ only by rounding (0.4 + 0.2 vs 0.6).
const TIE: f64 = 1e-12;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).single().expect("valid time")
}

/// The values claims are made about: mixed types, including two spellings
/// of zero that share a canonical encoding and look-alikes of other types.
fn values() -> Vec<Object> {
    vec![
        Object::Text("4 g".into()),
        Object::Integer(4),
        Object::Number(4.0),
        Object::Number(0.0),
        Object::Number(-0.0),
        Object::Text("4".into()),
        Object::Boolean(true),
        Object::Entity("unit:gram".into()),
        Object::Time(Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).single().expect("valid time")),
    ]
}

// ---------------------------------------------------------------------------
// Generating logs
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Assert {
        agent: usize,
        /// 0..6 index `Tier::ALL`; 6 = no source; 7 = a source without a tier.
        tier: usize,
        value: usize,
        /// Milliseconds from `t0`.
        valid_ms: Option<i64>,
        confidence: Option<f64>,
        /// Earlier assertions of the same agent to supersede.
        supersede: Vec<Index>,
    },
    /// Retract an earlier, not yet retracted assertion (by its own agent).
    Retract(Index),
    /// Advance the clock of `recorded_at` by this many milliseconds
    /// (events between ticks share a `recorded_at`, like a group commit).
    Tick(i64),
}

fn confidence() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(0.0)),
        2 => Just(Some(1.0)),
        2 => prop::sample::select(vec![0.25, 0.5, 0.75, 0.9]).prop_map(Some),
        3 => (0.0f64..=1.0).prop_map(Some),
    ]
}

fn valid_ms() -> impl Strategy<Value = Option<i64>> {
    const DAY: i64 = 86_400_000;
    prop_oneof![
        3 => Just(None),
        2 => prop::sample::select(vec![-DAY, 0, 1_000, 20_000]).prop_map(Some),
        3 => (-800 * DAY..60_000i64).prop_map(Some),
        1 => (60_000..10 * DAY).prop_map(Some),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let nvalues = values().len();
    let assert = (
        0..AGENTS,
        0usize..8,
        prop_oneof![3 => 0usize..3, 1 => 0..nvalues],
        valid_ms(),
        confidence(),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<Index>(), 1..3)],
    )
        .prop_map(|(agent, tier, value, valid_ms, confidence, supersede)| Op::Assert {
            agent,
            tier,
            value,
            valid_ms,
            confidence,
            supersede,
        });
    prop_oneof![
        6 => assert,
        2 => any::<Index>().prop_map(Op::Retract),
        2 => prop_oneof![Just(0i64), 1i64..3_000].prop_map(Op::Tick),
    ]
}

/// Turns ops into a log the write path could have produced: unique ids,
/// supersession only of the agent's own earlier assertions of this pair,
/// each assertion retracted at most once and only by its agent,
/// non-decreasing `recorded_at`.
fn build_log(ops: &[Op]) -> Vec<LogRecord> {
    build_log_with(ops, |_| SUBJECT.to_string())
}

/// [`build_log`] with each agent's assertions about `subject_of(agent)`:
/// several pairs interleaved in one log, while supersessions (of the
/// agent's own assertions) stay within a pair, as the write path demands.
fn build_log_with(ops: &[Op], subject_of: impl Fn(usize) -> String) -> Vec<LogRecord> {
    let values = values();
    let mut now = t0();
    let mut out = Vec::new();
    let mut seen: HashSet<AssertionId> = HashSet::new();
    let mut by_agent: Vec<Vec<AssertionId>> = vec![Vec::new(); AGENTS];
    let mut unretracted: Vec<(AssertionId, String)> = Vec::new();
    for op in ops {
        match op {
            Op::Tick(ms) => now += Duration::milliseconds(*ms),
            Op::Assert { agent, tier, value, valid_ms, confidence, supersede } => {
                let mine = &by_agent[*agent];
                let mut supersedes: Vec<AssertionId> =
                    if mine.is_empty() { Vec::new() } else { supersede.iter().map(|ix| *ix.get(mine)).collect() };
                supersedes.sort();
                supersedes.dedup();
                let source = match *tier {
                    t if t < 6 => Some(Source { uri: "https://example.org/s".into(), tier: Some(Tier::ALL[t]), hash: None }),
                    6 => None,
                    _ => Some(Source { uri: "https://example.org/untiered".into(), tier: None, hash: None }),
                };
                let a = Assertion {
                    subject: subject_of(*agent),
                    predicate: PREDICATE.into(),
                    object: values[*value].clone(),
                    confidence: *confidence,
                    agent: format!("agent-{agent}"),
                    signature: None,
                    source,
                    valid_time: valid_ms.map(|ms| t0() + Duration::milliseconds(ms)),
                    supersedes,
                };
                let id = a.id();
                if !seen.insert(id) {
                    continue; // a duplicate: the write path appends nothing
                }
                by_agent[*agent].push(id);
                unretracted.push((id, a.agent.clone()));
                let position = out.len() as u64 + 1;
                out.push(LogRecord { position, recorded_at: now, event: Event::AssertionRecorded { id, assertion: a } });
            }
            Op::Retract(ix) => {
                if unretracted.is_empty() {
                    continue;
                }
                let (id, agent) = unretracted.remove(ix.index(unretracted.len()));
                let position = out.len() as u64 + 1;
                out.push(LogRecord {
                    position,
                    recorded_at: now,
                    event: Event::AssertionRetracted(Retraction { id, agent, reason: "changed my mind".into(), signature: None }),
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The naive model, straight from the definitions
// ---------------------------------------------------------------------------

/// A live assertion as the naive model sees it.
#[derive(Clone, Debug)]
struct Fact {
    id: AssertionId,
    position: u64,
    agent: String,
    tier: Tier,
    confidence: f64,
    /// Valid time, or recorded_at when absent.
    time: DateTime<Utc>,
    /// Canonical encoding of the value.
    key: Vec<u8>,
}

impl Fact {
    /// "Newer": later valid time, ties by higher position.
    fn newer_than(&self, other: &Fact) -> bool {
        (self.time, self.position) > (other.time, other.position)
    }
}

/// Rank of a tier: 0 is the strongest (regulatory).
fn rank(t: Tier) -> usize {
    const ORDER: [&str; 6] = ["regulatory", "clinical", "observational", "expert", "community", "anecdotal"];
    ORDER.iter().position(|n| *n == t.as_str()).expect("known tier")
}

/// Live assertions (not retracted, not superseded by anything in the log)
/// among events recorded at or before `as_of`, in log order.
fn live(records: &[LogRecord], as_of: Option<DateTime<Utc>>) -> Vec<Fact> {
    let visible: Vec<&LogRecord> = records.iter().filter(|r| as_of.is_none_or(|t| r.recorded_at <= t)).collect();
    let mut dead: HashSet<AssertionId> = HashSet::new();
    for r in &visible {
        match &r.event {
            Event::AssertionRecorded { assertion, .. } => dead.extend(assertion.supersedes.iter().copied()),
            Event::AssertionRetracted(rt) => {
                dead.insert(rt.id);
            }
        }
    }
    visible
        .iter()
        .filter_map(|r| match &r.event {
            Event::AssertionRecorded { id, assertion: a } if !dead.contains(id) => Some(Fact {
                id: *id,
                position: r.position,
                agent: a.agent.clone(),
                tier: a.source.as_ref().and_then(|s| s.tier).unwrap_or(Tier::Community),
                confidence: a.confidence.unwrap_or(1.0),
                time: a.valid_time.unwrap_or(r.recorded_at),
                key: a.object.canonical_bytes(),
            }),
            _ => None,
        })
        .collect()
}

#[derive(Clone, Debug)]
struct NClaim {
    key: Vec<u8>,
    weight: f64,
    share: f64,
    ids: Vec<AssertionId>,
    agents: u32,
    /// (time, position) of its newest counted assertion.
    newest: (DateTime<Utc>, u64),
}

#[derive(Clone, Debug)]
struct NWinner {
    key: Vec<u8>,
    confidence: f64,
    ids: Vec<AssertionId>,
}

#[derive(Clone, Debug)]
struct NRes {
    winner: Option<NWinner>,
    /// Some claim weighs almost, but not clearly, as much as the heaviest.
    winner_ambiguous: bool,
    /// Consensus claims, in no particular order.
    claims: Vec<NClaim>,
    score: f64,
    status: &'static str,
    /// Another acceptable status when the top share is within rounding of 0.75.
    status_alt: Option<&'static str>,
    tiers: Option<Vec<(Tier, NRes)>>,
}

fn single(f: &Fact) -> NWinner {
    NWinner { key: f.key.clone(), confidence: f.confidence, ids: vec![f.id] }
}

/// confidence × tier weight, times 0.5^(age / half-life) when decaying
/// (age = reference − valid time, at least 0, in whole milliseconds here
/// since every generated time is).
fn naive_weight(f: &Fact, defs: &Definitions, decay_reference: Option<DateTime<Utc>>) -> f64 {
    let base = f.confidence * defs.tier_weights[rank(f.tier)];
    match (decay_reference, defs.half_life_days[rank(f.tier)]) {
        (Some(reference), Some(days)) => {
            let age_ms = (reference.timestamp_millis() - f.time.timestamp_millis()).max(0);
            base * 0.5f64.powf((age_ms as f64 / 1000.0) / (days * 86_400.0))
        }
        _ => base,
    }
}

/// Consensus over `facts` (log order): each agent's newest counts once.
fn naive_consensus(facts: &[&Fact], defs: &Definitions, decay: Option<DateTime<Utc>>) -> NRes {
    let counted: Vec<&Fact> = facts.iter().copied().filter(|f| !facts.iter().any(|g| g.agent == f.agent && g.newer_than(f))).collect();
    let mut claims: Vec<NClaim> = Vec::new();
    for f in &counted {
        let w = naive_weight(f, defs, decay);
        match claims.iter_mut().find(|c| c.key == f.key) {
            Some(c) => {
                c.weight += w;
                c.ids.push(f.id);
                c.agents += 1;
                c.newest = c.newest.max((f.time, f.position));
            }
            None => {
                claims.push(NClaim { key: f.key.clone(), weight: w, share: 0.0, ids: vec![f.id], agents: 1, newest: (f.time, f.position) })
            }
        }
    }
    let total: f64 = claims.iter().map(|c| c.weight).sum();
    for c in &mut claims {
        c.share = if total > 0.0 { c.weight / total } else { 0.0 };
    }
    // Heaviest wins; equal weight → the claim holding the newest counted
    // assertion. Weights are sums of decimal products, so "equal" means
    // equal in exact arithmetic: within TIE of each other in floating point.
    let k = claims.len();
    let max = claims.iter().map(|c| c.weight).fold(f64::NEG_INFINITY, f64::max);
    let winner = claims.iter().filter(|c| c.weight >= max - TIE).max_by_key(|c| c.newest).map(|c| NWinner {
        key: c.key.clone(),
        confidence: c.share,
        ids: c.ids.clone(),
    });
    // A claim within (TIE, EPS] of the heaviest is neither clearly tied nor clearly lighter.
    let winner_ambiguous = claims.iter().any(|c| c.weight < max - TIE && c.weight >= max - EPS);
    let score = if k <= 1 {
        0.0
    } else {
        let h: f64 = claims.iter().filter(|c| c.share > 0.0).map(|c| -c.share * c.share.ln()).sum();
        h / (k as f64).ln()
    };
    let top = claims.iter().map(|c| c.share).fold(0.0, f64::max);
    let (status, status_alt) = match k {
        0 => ("empty", None),
        1 => ("unanimous", None),
        _ if top >= 0.75 - TIE => ("agreed", None),
        _ if top >= 0.75 - EPS => ("contested", Some("agreed")),
        _ => ("contested", None),
    };
    NRes { winner, winner_ambiguous, claims, score, status, status_alt, tiers: None }
}

fn naive(lens: Lens, facts: &[Fact], defs: &Definitions, decay: Option<DateTime<Utc>>) -> NRes {
    let all: Vec<&Fact> = facts.iter().collect();
    let mut r = naive_consensus(&all, defs, decay);
    // The best fact under "a beats b" (a strict order on distinct facts).
    let best = |beats: &dyn Fn(&Fact, &Fact) -> bool| -> Option<NWinner> {
        all.iter().copied().find(|f| all.iter().all(|g| g.id == f.id || beats(f, g))).map(single)
    };
    if !matches!(lens, Lens::Consensus | Lens::Skeptic) {
        r.winner_ambiguous = false;
    }
    match lens {
        Lens::Consensus | Lens::Skeptic => {}
        Lens::Recency => r.winner = best(&|a, b| a.newer_than(b)),
        Lens::Confidence => r.winner = best(&|a, b| a.confidence > b.confidence || (a.confidence == b.confidence && a.newer_than(b))),
        Lens::Authority => {
            r.winner = best(&|a, b| {
                rank(a.tier) < rank(b.tier)
                    || (rank(a.tier) == rank(b.tier) && (a.confidence > b.confidence || (a.confidence == b.confidence && a.newer_than(b))))
            })
        }
        Lens::Layered => {
            let mut tiers = Vec::new();
            for t in Tier::ALL {
                let in_tier: Vec<&Fact> = all.iter().copied().filter(|f| f.tier == t).collect();
                if !in_tier.is_empty() {
                    tiers.push((t, naive_consensus(&in_tier, defs, decay)));
                }
            }
            r.winner = tiers.first().and_then(|(_, res)| res.winner.clone());
            r.winner_ambiguous = tiers.first().is_some_and(|(_, res)| res.winner_ambiguous);
            r.tiers = Some(tiers);
        }
    }
    r
}

// ---------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= EPS
}

fn compare(what: &str, got: &Resolution, want: &NRes) -> Result<(), TestCaseError> {
    match (&got.winner, &want.winner) {
        (None, None) => {}
        (Some(g), Some(_)) if want.winner_ambiguous => {
            // The claims the winner was chosen from: layered's winner is
            // its first tier's, not the claims over every tier.
            let pool = match &want.tiers {
                Some(tiers) => tiers.first().map_or(&want.claims, |(_, first)| &first.claims),
                None => &want.claims,
            };
            let top = pool.iter().map(|c| c.weight).fold(f64::NEG_INFINITY, f64::max);
            let c = pool.iter().find(|c| c.key == g.value.canonical_bytes());
            prop_assert!(c.is_some_and(|c| c.weight >= top - EPS), "{}: winner {:?} is not among the heaviest", what, g.value);
        }
        (Some(g), Some(w)) => {
            prop_assert_eq!(g.value.canonical_bytes(), w.key.clone(), "{}: winner value {:?}", what, g.value);
            prop_assert!(close(g.confidence, w.confidence), "{}: winner confidence {} vs naive {}", what, g.confidence, w.confidence);
            prop_assert_eq!(&g.assertions, &w.ids, "{}: winner assertions", what);
        }
        (g, w) => prop_assert!(false, "{}: winner {:?} vs naive {:?}", what, g, w),
    }
    prop_assert_eq!(got.claims.len(), want.claims.len(), "{}: number of claims", what);
    let mut matched: Vec<&NClaim> = Vec::new();
    for (i, g) in got.claims.iter().enumerate() {
        let key = g.value.canonical_bytes();
        let Some(w) = want.claims.iter().find(|w| w.key == key) else {
            return Err(TestCaseError::fail(format!("{what}: claim {i} value {:?} is not a naive claim", g.value)));
        };
        prop_assert!(!matched.iter().any(|m| m.key == key), "{}: value {:?} claimed twice", what, g.value);
        prop_assert!(close(g.weight, w.weight), "{}: claim {} weight {} vs naive {}", what, i, g.weight, w.weight);
        prop_assert!(close(g.share, w.share), "{}: claim {} share {} vs naive {}", what, i, g.share, w.share);
        prop_assert_eq!(g.agents, w.agents, "{}: claim {} agents", what, i);
        prop_assert_eq!(&g.assertions, &w.ids, "{}: claim {} assertions", what, i);
        matched.push(w);
    }
    // Heaviest first; ties (equal up to rounding) → newest first.
    for (i, pair) in matched.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        let d = a.weight - b.weight;
        prop_assert!(d >= -EPS, "{}: claim {} ({}) before a heavier one ({})", what, i, a.weight, b.weight);
        if d.abs() <= TIE {
            prop_assert!(a.newest > b.newest, "{}: tied claims {} and {} not newest first", what, i, i + 1);
        }
    }
    let shares: f64 = got.claims.iter().map(|c| c.share).sum();
    let total: f64 = got.claims.iter().map(|c| c.weight).sum();
    prop_assert!(got.claims.is_empty() || total == 0.0 || close(shares, 1.0), "{}: shares sum to {}", what, shares);
    prop_assert!(close(got.conflict.score, want.score), "{}: conflict score {} vs naive {}", what, got.conflict.score, want.score);
    let score = got.conflict.score;
    prop_assert!((0.0..=1.0).contains(&score) && score.is_sign_positive(), "{}: score {:?} outside [0, 1]", what, score);
    prop_assert!(
        got.conflict.status == want.status || want.status_alt == Some(got.conflict.status.as_str()),
        "{}: status {} vs naive {}",
        what,
        got.conflict.status,
        want.status
    );
    match (&got.tiers, &want.tiers) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            let gt: Vec<Tier> = g.keys().copied().collect();
            let wt: Vec<Tier> = w.iter().map(|(t, _)| *t).collect();
            prop_assert_eq!(gt, wt, "{}: layered tiers", what);
            for (t, wr) in w {
                compare(&format!("{what} tier {}", t.as_str()), &g[t], wr)?;
            }
        }
        (g, w) => prop_assert!(false, "{}: tiers {:?} vs naive {:?}", what, g.is_some(), w.is_some()),
    }
    Ok(())
}

/// Splits `records` into consecutive batches of the given sizes (the rest
/// in one last batch).
fn batches<'a>(records: &'a [LogRecord], sizes: &[usize]) -> Vec<&'a [LogRecord]> {
    let mut out = Vec::new();
    let mut rest = records;
    for s in sizes {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at((*s).min(rest.len()));
        out.push(a);
        rest = b;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The materialized answers of the `lenses` projection equal the naive
    /// model for every lens, however the events are batched.
    #[test]
    fn lens_store_matches_naive_model(
        ops in ops(),
        single_batch in any::<bool>(),
        sizes in prop::collection::vec(1usize..12, 0..12),
        flushed in prop::collection::vec(any::<bool>(), 0..12),
    ) {
        let records = build_log(&ops);
        let defs = Definitions::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LensStore::open(&dir.path().join("lenses.redb"), defs.clone()).expect("open lens store");
        let sizes = if single_batch { Vec::new() } else { sizes };
        // Batches are written behind the reads. Hold the timed commits and
        // flush after random batches, so that reads merge a written prefix
        // with staged batches at every split.
        store.hold_commits(true);
        for (i, b) in batches(&records, &sizes).into_iter().enumerate() {
            store.apply(b).expect("apply");
            if flushed.get(i).copied().unwrap_or(false) {
                store.flush().expect("flush");
            }
        }
        let last = records.last().map(|r| r.position).unwrap_or(0);
        prop_assert_eq!(store.checkpoint().expect("checkpoint"), last);
        let staged = (store.summary(SUBJECT, PREDICATE).expect("summary"), store.subject(SUBJECT).expect("subject"));
        store.hold_commits(false);
        prop_assert_eq!(store.flush().expect("flush"), last);
        // Once everything is written, the answers are the same.
        prop_assert_eq!(&staged.0, &store.summary(SUBJECT, PREDICATE).expect("summary"));
        prop_assert_eq!(&staged.1, &store.subject(SUBJECT).expect("subject"));

        let (summary, position) = store.summary(SUBJECT, PREDICATE).expect("summary");
        prop_assert_eq!(position, last);
        let facts = live(&records, None);
        for l in Lens::ALL {
            compare(l.as_str(), &summary.resolution(l), &naive(l, &facts, &defs, None))?;
        }

        // The stored live set resolves, on demand, to exactly the materialized answers.
        let (set, _) = store.live_set(SUBJECT, PREDICATE).expect("live set");
        let mut live_ids: Vec<AssertionId> = set.entries.iter().map(|e| e.id).collect();
        live_ids.sort();
        let mut want_ids: Vec<AssertionId> = facts.iter().map(|f| f.id).collect();
        want_ids.sort();
        prop_assert_eq!(live_ids, want_ids, "live set");
        for l in Lens::ALL {
            prop_assert_eq!(lens::resolve(l, &set, &defs, Weighting::plain()), summary.resolution(l), "{} on demand", l.as_str());
        }

        // GET /v1/subjects reads the same summaries.
        let (rows, _) = store.subject(SUBJECT).expect("subject");
        if records.iter().any(|r| matches!(r.event, Event::AssertionRecorded { .. })) {
            prop_assert_eq!(rows.len(), 1);
            prop_assert_eq!(rows[0].0.as_str(), PREDICATE);
            prop_assert_eq!(&rows[0].1, &summary);
        } else {
            prop_assert!(rows.is_empty());
        }
    }

    /// `decay` with an explicit reference time, over the events recorded up
    /// to `as_of` (replayed into a live set the way `as_of` queries do),
    /// equals the naive decayed computation.
    #[test]
    fn decay_and_as_of_match_naive_model(
        ops in ops(),
        as_of_ms in prop_oneof![Just(None), (-1_000i64..40_000).prop_map(Some)],
        reference_ms in prop_oneof![-200_000i64..200_000, 0i64..1_500 * 86_400_000],
    ) {
        let records = build_log(&ops);
        let defs = Definitions::default();
        let as_of = as_of_ms.map(|ms| t0() + Duration::milliseconds(ms));
        let reference = t0() + Duration::milliseconds(reference_ms);
        let mut set = LiveSet::default();
        for r in records.iter().filter(|r| as_of.is_none_or(|t| r.recorded_at <= t)) {
            match &r.event {
                Event::AssertionRecorded { id, assertion } => set.record(*id, r.position, r.recorded_at, assertion),
                Event::AssertionRetracted(rt) => {
                    set.retract(&rt.id);
                }
            }
        }
        let facts = live(&records, as_of);
        for l in Lens::ALL {
            let got = lens::resolve(l, &set, &defs, Weighting { decay: true, reference });
            compare(&format!("{} decayed", l.as_str()), &got, &naive(l, &facts, &defs, Some(reference)))?;
            let plain = lens::resolve(l, &set, &defs, Weighting::plain());
            compare(&format!("{} as_of", l.as_str()), &plain, &naive(l, &facts, &defs, None))?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The KV view that `as_of` replays: history up to a time holds exactly
    /// this pair's events recorded by then, in log order; `position_at` is
    /// the last position recorded by then; each assertion knows its first
    /// retraction and every assertion that superseded it.
    #[test]
    fn kv_history_matches_the_log(
        ops in ops(),
        sizes in prop::collection::vec(1usize..12, 0..12),
        probes in prop::collection::vec(-1_000i64..200_000, 1..6),
        flushed in prop::collection::vec(any::<bool>(), 0..12),
        page in 1usize..5,
    ) {
        let records = build_log(&ops);
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = KvStore::open(&dir.path().join("kv.redb")).expect("open kv store");
        // Timed commits held, flushes after random batches: reads merge a
        // written prefix with staged batches at every split.
        kv.hold_commits(true);
        for (i, b) in batches(&records, &sizes).into_iter().enumerate() {
            kv.apply(b).expect("apply");
            if flushed.get(i).copied().unwrap_or(false) {
                kv.flush().expect("flush");
            }
        }
        check_kv(&kv, &records, &probes, page)?;
        kv.hold_commits(false);
        kv.flush().expect("flush");
        check_kv(&kv, &records, &probes, page)?;
    }
}

/// The checks of `kv_history_matches_the_log` on the store as it is now.
fn check_kv(kv: &KvStore, records: &[LogRecord], probes: &[i64], page: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(kv.checkpoint().expect("checkpoint"), records.last().map_or(0, |r| r.position));
    // Every listing, paged, gives the recorded assertions in log order.
    let recorded: Vec<(u64, &Assertion)> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::AssertionRecorded { assertion, .. } => Some((r.position, assertion)),
            Event::AssertionRetracted(_) => None,
        })
        .collect();
    let filters = [
        ListFilter { subject: Some(SUBJECT.into()), predicate: Some(PREDICATE.into()), ..ListFilter::default() },
        ListFilter { subject: Some(SUBJECT.into()), ..ListFilter::default() },
        ListFilter { predicate: Some(PREDICATE.into()), ..ListFilter::default() },
        ListFilter { agent: Some("agent-1".into()), ..ListFilter::default() },
        ListFilter::default(),
    ];
    for f in filters {
        let mut got = Vec::new();
        let mut f = ListFilter { limit: page, ..f };
        loop {
            let (items, next) = kv.list(&f).expect("list");
            prop_assert!(items.len() <= page);
            got.extend(items.into_iter().map(|v| v.position));
            match next {
                Some(n) => f.after = n,
                None => break,
            }
        }
        let want: Vec<u64> = recorded.iter().filter(|(_, a)| f.agent.as_ref().is_none_or(|x| *x == a.agent)).map(|(p, _)| *p).collect();
        prop_assert_eq!(got, want, "list {:?}", f);
    }
    let ns = |t: &DateTime<Utc>| t.timestamp_nanos_opt().expect("in range");
    for ms in probes.iter().copied().map(Some).chain([None]) {
        let until = ms.map(|ms| t0() + Duration::milliseconds(ms));
        let (events, _) = kv.history(SUBJECT, PREDICATE, until.as_ref().map(ns)).expect("history");
        let want: Vec<&LogRecord> = records.iter().filter(|r| until.is_none_or(|t| r.recorded_at <= t)).collect();
        prop_assert_eq!(events.len(), want.len(), "history until {:?}", until);
        for (e, r) in events.iter().zip(&want) {
            prop_assert_eq!(e.position, r.position);
            prop_assert_eq!(e.recorded_at, r.recorded_at);
            match &r.event {
                Event::AssertionRecorded { id, assertion } => {
                    prop_assert_eq!(e.kind, EventKind::AssertionRecorded);
                    prop_assert_eq!(e.assertion.id, *id);
                    prop_assert_eq!(&e.assertion.assertion, assertion);
                }
                Event::AssertionRetracted(rt) => {
                    prop_assert_eq!(e.kind, EventKind::AssertionRetracted);
                    prop_assert_eq!(e.assertion.id, rt.id);
                }
            }
        }
        if let Some(t) = until {
            let want_pos = want.last().map(|r| r.position).unwrap_or(0);
            prop_assert_eq!(kv.position_at(ns(&t)).expect("position_at"), want_pos, "position at {}", t);
        }
    }
    for r in records {
        let Event::AssertionRecorded { id, .. } = &r.event else { continue };
        let (view, _) = kv.get(id).expect("get");
        let view = view.expect("known id");
        let retraction = records.iter().find_map(|x| match &x.event {
            Event::AssertionRetracted(rt) if rt.id == *id => Some(x.position),
            _ => None,
        });
        let superseded_by: Vec<AssertionId> = records
            .iter()
            .filter_map(|x| match &x.event {
                Event::AssertionRecorded { id: by, assertion } if assertion.supersedes.contains(id) => Some(*by),
                _ => None,
            })
            .collect();
        prop_assert_eq!(view.position, r.position);
        prop_assert_eq!(view.retracted, retraction.is_some());
        prop_assert_eq!(view.retraction.as_ref().map(|x| x.position), retraction);
        prop_assert_eq!(&view.superseded_by, &superseded_by);
    }
    Ok(())
}

/// Decay itself, on numbers worked by hand: a community assertion one
/// half-life (90 days) old weighs half; regulatory never decays; an
/// assertion from the future does not gain weight.
#[test]
fn decay_worked_example() {
    let defs = Definitions::default();
    let mut set = LiveSet::default();
    let reference = t0();
    let mk = |agent: &str, tier: Tier, value: &str, valid: DateTime<Utc>| Assertion {
        subject: SUBJECT.into(),
        predicate: PREDICATE.into(),
        object: Object::Text(value.into()),
        confidence: None,
        agent: agent.into(),
        signature: None,
        source: Some(Source { uri: "https://example.org".into(), tier: Some(tier), hash: None }),
        valid_time: Some(valid),
        supersedes: Vec::new(),
    };
    let old = mk("a", Tier::Community, "old", reference - Duration::days(90));
    let reg = mk("b", Tier::Regulatory, "reg", reference - Duration::days(3650));
    let future = mk("c", Tier::Community, "future", reference + Duration::days(10));
    for (i, a) in [old, reg, future].iter().enumerate() {
        set.record(a.id(), i as u64 + 1, reference, a);
    }
    let r = lens::resolve(Lens::Consensus, &set, &defs, Weighting { decay: true, reference });
    let by: BTreeMap<String, f64> = r
        .claims
        .iter()
        .map(|c| match &c.value {
            Object::Text(s) => (s.clone(), c.weight),
            v => panic!("unexpected value {v:?}"),
        })
        .collect();
    assert!(close(by["old"], 0.2), "{by:?}");
    assert!(close(by["reg"], 1.0), "{by:?}");
    assert!(close(by["future"], 0.4), "{by:?}");
    assert_eq!(r.winner.map(|w| w.value), Some(Object::Text("reg".into())));
}

/// Weights equal in exact arithmetic are equal, although f64 disagrees
/// (0.4 + 0.2 > 0.6, and 0.9 / (0.9 + 0.2 + 0.1) < 0.75).
#[test]
fn rounding_does_not_break_ties_or_thresholds() {
    let defs = Definitions::default();
    let mk = |agent: &str, tier: Tier, value: &str, confidence: f64, year: i32| Assertion {
        subject: SUBJECT.into(),
        predicate: PREDICATE.into(),
        object: Object::Text(value.into()),
        confidence: Some(confidence),
        agent: agent.into(),
        signature: None,
        source: Some(Source { uri: "https://example.org".into(), tier: Some(tier), hash: None }),
        valid_time: Some(Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single().expect("valid time")),
        supersedes: Vec::new(),
    };
    let set_of = |list: &[Assertion]| {
        let mut set = LiveSet::default();
        for (i, a) in list.iter().enumerate() {
            set.record(a.id(), i as u64 + 1, t0(), a);
        }
        set
    };
    // X: 0.4 + 0.2 (older); Y: 0.6 (newer). A tie: the newer claim wins.
    let tie = set_of(&[
        mk("c", Tier::Community, "X", 1.0, 2020),
        mk("a", Tier::Anecdotal, "X", 1.0, 2020),
        mk("e", Tier::Expert, "Y", 1.0, 2024),
    ]);
    let r = lens::resolve(Lens::Consensus, &tie, &defs, Weighting::plain());
    assert_eq!(r.winner.map(|w| w.value), Some(Object::Text("Y".into())), "{:?}", r.claims);
    assert_eq!(r.conflict.status, "contested");
    // 0.9 against 0.2 + 0.1: a top share of exactly 0.75 is agreed.
    let agreed = set_of(&[
        mk("r", Tier::Regulatory, "X", 0.9, 2020),
        mk("c", Tier::Community, "Y", 0.5, 2020),
        mk("a", Tier::Anecdotal, "Y", 0.5, 2020),
    ]);
    let r = lens::resolve(Lens::Skeptic, &agreed, &defs, Weighting::plain());
    assert!(close(r.claims[0].share, 0.75), "{:?}", r.claims);
    assert_eq!(r.conflict.status, "agreed", "{:?}", r.claims);
}

/// Every row of a store, in order, for comparing two stores.
fn rows(store: &dyn Projection) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .visit_rows(&mut |t, k, v| {
            out.push((t, k.to_vec(), v.to_vec()));
            true
        })
        .expect("visit rows");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    /// A rebuild's bulk load (an external sort: rows sorted by key, spilled
    /// in runs of a few hundred bytes here so that every load merges many
    /// runs, then appended) writes exactly the rows that applying the same
    /// log event by event writes, for kv and lenses, over logs that
    /// interleave several pairs with retractions and supersessions.
    #[test]
    fn bulk_load_writes_the_rows_apply_writes(
        ops in prop::collection::vec(op(), 0..150),
        sizes in prop::collection::vec(1usize..40, 0..12),
        budget in 200usize..4_000,
    ) {
        let records = build_log_with(&ops, |agent| format!("drug:{}", agent % 3));
        let dir = tempfile::tempdir().expect("tempdir");
        let applied: Vec<Box<dyn Projection>> = vec![
            Box::new(KvStore::open(&dir.path().join("kv-a.redb")).expect("open")),
            Box::new(LensStore::open(&dir.path().join("lenses-a.redb"), Definitions::default()).expect("open")),
        ];
        let loaded: Vec<Box<dyn Projection>> = vec![
            Box::new(KvStore::open(&dir.path().join("kv-b.redb")).expect("open").with_sort_budget(budget)),
            Box::new(LensStore::open(&dir.path().join("lenses-b.redb"), Definitions::default()).expect("open").with_sort_budget(budget)),
        ];
        let last = records.last().map(|r| r.position).unwrap_or(0);
        for (a, b) in applied.iter().zip(&loaded) {
            for batch in batches(&records, &sizes) {
                a.apply(batch).expect("apply");
            }
            let mut bulk = b.bulk_load().expect("bulk load").expect("an empty store offers a bulk load");
            for batch in batches(&records, &sizes) {
                bulk.push(batch).expect("push");
            }
            prop_assert_eq!(bulk.finish().expect("finish"), last);
            prop_assert_eq!(b.checkpoint().expect("checkpoint"), last);
            prop_assert!(rows(&**a) == rows(&**b), "{}: the bulk-loaded rows differ from the applied ones", a.name());
            // A store with data is never bulk-loaded again.
            if last > 0 {
                prop_assert!(b.bulk_load().expect("bulk load").is_none());
            }
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").flatten().map(|e| e.file_name()).collect();
        prop_assert!(leftovers.iter().all(|f| f.to_string_lossy().ends_with(".redb")), "sort runs left behind: {:?}", leftovers);
    }
}

/// A bulk load whose sort runs cannot be written (here the spill
/// directory's name is taken by a file) fails with an error, for kv, whose
/// sorting runs on a thread of its own, and for lenses; it neither hangs
/// nor panics, and the caller can drop it.
#[test]
fn a_bulk_load_that_cannot_spill_fails_cleanly() {
    let ops: Vec<Op> = (0..60)
        .map(|i| Op::Assert { agent: i % AGENTS, tier: i % 8, value: i % 3, valid_ms: None, confidence: Some(0.5), supersede: Vec::new() })
        .collect();
    let records = build_log_with(&ops, |agent| format!("drug:{agent}"));
    assert!(records.len() >= 20, "the log has records to sort");
    let dir = tempfile::tempdir().expect("tempdir");
    let stores: Vec<Box<dyn Projection>> = vec![
        Box::new(KvStore::open(&dir.path().join("kv.redb")).expect("open").with_sort_budget(1)),
        Box::new(LensStore::open(&dir.path().join("lenses.redb"), Definitions::default()).expect("open").with_sort_budget(1)),
    ];
    for store in &stores {
        let blocker = dir.path().join(format!("{}.redb.sort", store.name()));
        std::fs::write(&blocker, b"not a directory").expect("write the blocker");
        let mut bulk = store.bulk_load().expect("bulk load").expect("an empty store offers a bulk load");
        // Every push may be accepted while the sorting thread fails behind
        // it; the failure must surface by `finish` at the latest.
        let pushed = records.chunks(7).try_for_each(|batch| bulk.push(batch));
        let outcome = match pushed {
            Err(e) => Err(e),
            Ok(()) => bulk.finish().map(|_| ()),
        };
        let err = outcome.expect_err("a load that cannot spill must fail");
        assert!(err.to_string().contains("sorting") || err.to_string().contains("stopped"), "{}: {err}", store.name());
    }
}
