//! Resolving a live set through a lens.
//!
//! Every lens shares the consensus claims (one agent, one voice) and the
//! conflict measure computed over them; lenses differ in how they pick the
//! winner. Sums run in log order so results are bit-for-bit reproducible,
//! which lets materialized and recomputed answers be compared exactly.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Definitions, Entry, LiveSet};
use crate::model::{AssertionId, Object, Tier};

/// The lenses, by URL name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lens {
    /// Newest live assertion wins.
    Recency,
    /// Highest confidence wins; ties → newer.
    Confidence,
    /// Highest tier, then confidence, then newer.
    Authority,
    /// Heaviest value, one agent one voice.
    Consensus,
    /// Consensus claims, read for their conflict.
    Skeptic,
    /// Consensus within each tier.
    Layered,
}

impl Lens {
    /// Every lens, in documentation order.
    pub const ALL: [Lens; 6] = [Lens::Recency, Lens::Confidence, Lens::Authority, Lens::Consensus, Lens::Skeptic, Lens::Layered];

    /// The URL name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Lens::Recency => "recency",
            Lens::Confidence => "confidence",
            Lens::Authority => "authority",
            Lens::Consensus => "consensus",
            Lens::Skeptic => "skeptic",
            Lens::Layered => "layered",
        }
    }

    /// Parses a URL name.
    pub fn parse(s: &str) -> Option<Lens> {
        Lens::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// The chosen value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Winner {
    /// The value.
    pub value: Object,
    /// The lens's confidence in it.
    pub confidence: f64,
    /// The assertions behind it.
    pub assertions: Vec<AssertionId>,
}

/// One value and the weight of the agents who currently claim it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The value.
    pub value: Object,
    /// Sum of confidence × tier weight (× decay) of its counted assertions.
    pub weight: f64,
    /// weight / total weight (0 when the total is 0).
    pub share: f64,
    /// The counted assertions, in log order.
    pub assertions: Vec<AssertionId>,
    /// How many agents claim it.
    pub agents: u32,
}

/// How much the claims disagree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Normalized Shannon entropy of the shares, in [0, 1].
    pub score: f64,
    /// `empty`, `unanimous`, `agreed` or `contested`.
    pub status: String,
}

/// A lens's answer for one pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// The winner, if anything is live.
    pub winner: Option<Winner>,
    /// Consensus claims, heaviest first.
    pub claims: Vec<Claim>,
    /// Disagreement over the claims.
    pub conflict: Conflict,
    /// For `layered`: a consensus resolution per tier present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<BTreeMap<Tier, Resolution>>,
}

/// Weighting options of one query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weighting {
    /// Apply half-life decay.
    pub decay: bool,
    /// The time ages are measured from (as_of, or now).
    pub reference: DateTime<Utc>,
}

impl Weighting {
    /// No decay.
    pub fn plain() -> Weighting {
        Weighting { decay: false, reference: DateTime::<Utc>::MIN_UTC }
    }
}

/// Weights are sums of products of decimals, so values equal in exact
/// arithmetic can differ in their last bits (in f64, 0.4 + 0.2 > 0.6 and
/// 0.9 / (0.9 + 0.2 + 0.1) < 0.75). Weights and shares are compared rounded
/// to this quantum, so such values tie and the 0.75 threshold holds.
const QUANTUM: f64 = 1e-9;

fn quantized(x: f64) -> i64 {
    (x / QUANTUM).round() as i64
}

fn weight(e: &Entry, defs: &Definitions, w: Weighting) -> f64 {
    let base = e.confidence * defs.weight(e.tier);
    if !w.decay {
        return base;
    }
    match defs.half_life_secs(e.tier) {
        None => base,
        Some(h) => {
            let age = (w.reference - e.valid_time).num_milliseconds().max(0) as f64 / 1000.0;
            base * 0.5f64.powf(age / h)
        }
    }
}

/// Resolves `set` through `lens`.
pub fn resolve(lens: Lens, set: &LiveSet, defs: &Definitions, w: Weighting) -> Resolution {
    let all: Vec<&Entry> = set.entries.iter().collect();
    let mut r = consensus(set, &all, defs, w);
    match lens {
        Lens::Consensus | Lens::Skeptic => {}
        Lens::Recency | Lens::Confidence | Lens::Authority => r.winner = pick(lens, set),
        Lens::Layered => {
            let tiers = per_tier(set, defs, w, &r);
            // The overall winner is the strongest tier's consensus winner.
            r.winner = tiers.values().next().and_then(|t: &Resolution| t.winner.clone());
            r.tiers = Some(tiers);
        }
    }
    r
}

/// The winner of a lens that picks one assertion (`recency`,
/// `confidence`, `authority`; `None` for the others), without the
/// consensus claims a [`resolve`] also computes: a lens summary stores
/// the claims once and only the winner of each of these.
pub fn pick(lens: Lens, set: &LiveSet) -> Option<Winner> {
    let all = set.entries.iter();
    match lens {
        Lens::Recency => all.max_by_key(|e| e.newness()).map(|e| single(set, e)),
        Lens::Confidence => {
            all.max_by(|a, b| a.confidence.total_cmp(&b.confidence).then(a.newness().cmp(&b.newness()))).map(|e| single(set, e))
        }
        Lens::Authority => all
            // Tier::Regulatory sorts first, so a *smaller* tier is stronger.
            .max_by(|a, b| b.tier.cmp(&a.tier).then(a.confidence.total_cmp(&b.confidence)).then(a.newness().cmp(&b.newness())))
            .map(|e| single(set, e)),
        Lens::Consensus | Lens::Skeptic | Lens::Layered => None,
    }
}

/// The consensus within each tier that has live entries (what `layered`
/// shows), given `overall`, the consensus of the whole set with the same
/// weighting: when every entry is in one tier that tier's consensus is the
/// same computation, so it is copied rather than redone.
pub fn per_tier(set: &LiveSet, defs: &Definitions, w: Weighting, overall: &Resolution) -> BTreeMap<Tier, Resolution> {
    let mut tiers = BTreeMap::new();
    if let Some(first) = set.entries.first()
        && set.entries.iter().all(|e| e.tier == first.tier)
    {
        tiers.insert(first.tier, Resolution { tiers: None, ..overall.clone() });
        return tiers;
    }
    for t in Tier::ALL {
        let in_tier: Vec<&Entry> = set.entries.iter().filter(|e| e.tier == t).collect();
        if !in_tier.is_empty() {
            tiers.insert(t, consensus(set, &in_tier, defs, w));
        }
    }
    tiers
}

fn single(set: &LiveSet, e: &Entry) -> Winner {
    Winner { value: set.value_of(e).clone(), confidence: e.confidence, assertions: vec![e.id] }
}

/// Consensus over `entries` (a subset of `set`, in log order).
fn consensus(set: &LiveSet, entries: &[&Entry], defs: &Definitions, w: Weighting) -> Resolution {
    let mut counted = newest_per_agent(entries);
    counted.sort_by_key(|e| e.position);

    struct Acc {
        value: u32,
        weight: f64,
        ids: Vec<AssertionId>,
        agents: u32,
        newest: (DateTime<Utc>, u64),
    }
    let mut accs: Vec<Acc> = Vec::new();
    for e in &counted {
        let wt = weight(e, defs, w);
        match accs.iter_mut().find(|a| a.value == e.value) {
            Some(a) => {
                a.weight += wt;
                a.ids.push(e.id);
                a.agents += 1;
                a.newest = a.newest.max(e.newness());
            }
            None => accs.push(Acc { value: e.value, weight: wt, ids: vec![e.id], agents: 1, newest: e.newness() }),
        }
    }
    let total: f64 = accs.iter().map(|a| a.weight).sum();
    accs.sort_by(|a, b| quantized(b.weight).cmp(&quantized(a.weight)).then(b.newest.cmp(&a.newest)));
    let claims: Vec<Claim> = accs
        .into_iter()
        .map(|a| Claim {
            value: set.values[a.value as usize].1.clone(),
            weight: a.weight,
            share: if total > 0.0 { a.weight / total } else { 0.0 },
            assertions: a.ids,
            agents: a.agents,
        })
        .collect();
    let conflict = conflict(&claims);
    let winner = claims.first().map(|c| Winner { value: c.value.clone(), confidence: c.share, assertions: c.assertions.clone() });
    Resolution { winner, claims, conflict, tiers: None }
}

/// One agent, one voice: each agent's newest live entry, in no order.
/// Most pairs have a handful of agents, for which a scan of a short list
/// is several times cheaper than hashing every name (consensus runs for
/// every pair a rebuild writes, and for every `as_of`/`decay` read); many
/// agents go through a hash map.
fn newest_per_agent<'e>(entries: &[&'e Entry]) -> Vec<&'e Entry> {
    const SCAN_UP_TO: usize = 16;
    let keep = |cur: &mut &'e Entry, e: &'e Entry| {
        if e.newness() > cur.newness() {
            *cur = e;
        }
    };
    if entries.len() <= SCAN_UP_TO {
        let mut newest: Vec<&Entry> = Vec::with_capacity(entries.len());
        for &e in entries {
            match newest.iter_mut().find(|cur| cur.agent == e.agent) {
                Some(cur) => keep(cur, e),
                None => newest.push(e),
            }
        }
        return newest;
    }
    let mut newest: HashMap<&str, &Entry> = HashMap::new();
    for &e in entries {
        newest.entry(e.agent.as_str()).and_modify(|cur| keep(cur, e)).or_insert(e);
    }
    newest.into_values().collect()
}

/// Normalized entropy and status of a list of claims.
pub fn conflict(claims: &[Claim]) -> Conflict {
    let k = claims.len();
    let status = match k {
        0 => "empty",
        1 => "unanimous",
        _ if quantized(claims.iter().map(|c| c.share).fold(0.0, f64::max)) >= quantized(0.75) => "agreed",
        _ => "contested",
    };
    let score = if k <= 1 {
        0.0
    } else {
        let h: f64 = claims.iter().filter(|c| c.share > 0.0).map(|c| -c.share * c.share.ln()).sum();
        // Rounding can land a hair above 1 (two equal shares of 0.4999…),
        // and one share of 1 gives -0.0; the measure is in [0, 1].
        let s = h / (k as f64).ln();
        if s > 0.0 { s.min(1.0) } else { 0.0 }
    };
    Conflict { score, status: status.to_string() }
}
