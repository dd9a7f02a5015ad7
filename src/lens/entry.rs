//! The live set of one `(subject, predicate)`: what lenses resolve.
//!
//! An assertion is live until it is retracted or superseded. Supersession
//! is permanent: retracting the superseding assertion does not revive the
//! one it replaced (the agent said both "not that" and "not this either").
//! Only what lenses need is kept per entry, so a pair's state stays small.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Assertion, AssertionId, Object, Tier};

/// One live assertion, reduced to what lenses read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The assertion id.
    pub id: AssertionId,
    /// Its log position (the final tie-breaker of "newer").
    pub position: u64,
    /// Its valid time, or its `recorded_at` when none was given.
    #[serde(with = "crate::model::time::serde_normal")]
    pub valid_time: DateTime<Utc>,
    /// Confidence with the default applied.
    pub confidence: f64,
    /// Tier with the default applied.
    pub tier: Tier,
    /// The agent (consensus gives each one voice).
    pub agent: String,
    /// Index into [`LiveSet::values`].
    pub value: u32,
}

impl Entry {
    /// The key "newer" orders by: later valid time, then higher position.
    pub fn newness(&self) -> (DateTime<Utc>, u64) {
        (self.valid_time, self.position)
    }
}

/// A recorded assertion reduced to what a live set keeps of it: what a
/// rebuild sorts by pair and replays, instead of whole assertions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The assertion id.
    pub id: AssertionId,
    /// Its log position.
    pub position: u64,
    /// Its valid time, or its `recorded_at` when none was given.
    #[serde(with = "crate::model::time::serde_spill")]
    pub valid_time: DateTime<Utc>,
    /// Confidence with the default applied.
    pub confidence: f64,
    /// Tier with the default applied.
    pub tier: Tier,
    /// The agent.
    pub agent: String,
    /// The value claimed.
    pub object: Object,
    /// The ids it supersedes.
    pub supersedes: Vec<AssertionId>,
}

impl Recorded {
    /// The reduced form of assertion `a`, recorded at `position`.
    pub fn of(id: AssertionId, position: u64, recorded_at: DateTime<Utc>, a: &Assertion) -> Recorded {
        Recorded {
            id,
            position,
            valid_time: a.valid_time.unwrap_or(recorded_at),
            confidence: a.effective_confidence(),
            tier: a.effective_tier(),
            agent: a.agent.clone(),
            object: a.object.clone(),
            supersedes: a.supersedes.clone(),
        }
    }
}

/// The live entries of a pair and the distinct values they claim.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveSet {
    /// Distinct values, each with its canonical encoding (the grouping key).
    pub values: Vec<(Vec<u8>, Object)>,
    /// Live entries in log order.
    pub entries: Vec<Entry>,
}

impl LiveSet {
    /// Applies a recorded assertion: it becomes live and every id it
    /// supersedes stops being live.
    pub fn record(&mut self, id: AssertionId, position: u64, recorded_at: DateTime<Utc>, a: &Assertion) {
        self.add(Recorded::of(id, position, recorded_at, a));
    }

    /// [`record`](Self::record) from the reduced form a bulk load sorts.
    pub fn add(&mut self, r: Recorded) {
        if !r.supersedes.is_empty() {
            self.entries.retain(|e| !r.supersedes.contains(&e.id));
        }
        let key = r.object.canonical_bytes();
        let value = match self.values.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.values.push((key, r.object));
                self.values.len() - 1
            }
        };
        self.entries.push(Entry {
            id: r.id,
            position: r.position,
            valid_time: r.valid_time,
            confidence: r.confidence,
            tier: r.tier,
            agent: r.agent,
            value: value as u32,
        });
        self.compact_if_sparse();
    }

    /// Applies a retraction; returns whether `id` was live.
    pub fn retract(&mut self, id: &AssertionId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != *id);
        let removed = self.entries.len() != before;
        if removed {
            self.compact_if_sparse();
        }
        removed
    }

    /// The value an entry claims.
    pub fn value_of(&self, e: &Entry) -> &Object {
        &self.values[e.value as usize].1
    }

    /// Drops values no live entry claims any more, once they are at least
    /// half of the list, so state does not grow with dead values.
    fn compact_if_sparse(&mut self) {
        let mut used = vec![false; self.values.len()];
        for e in &self.entries {
            used[e.value as usize] = true;
        }
        let unused = used.iter().filter(|u| !**u).count();
        if unused == 0 || unused * 2 < self.values.len() {
            return;
        }
        let mut remap = vec![u32::MAX; self.values.len()];
        let mut values = Vec::with_capacity(self.values.len() - unused);
        for (i, v) in std::mem::take(&mut self.values).into_iter().enumerate() {
            if used[i] {
                remap[i] = values.len() as u32;
                values.push(v);
            }
        }
        for e in &mut self.entries {
            e.value = remap[e.value as usize];
        }
        self.values = values;
    }
}
