//! Realistic, unique synthetic assertions for load tests.
//!
//! Subjects and predicates come from small vocabularies so that pairs
//! repeat (as real contested knowledge does); a per-run nonce and a counter
//! make every assertion unique so none is deduplicated away.

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};

const KINDS: &[&str] = &["drug", "gene", "compound", "city", "company", "protein", "species", "material"];
const PREDICATES: &[&str] = &[
    "max_daily_dose_mg",
    "half_life_hours",
    "interacts_with",
    "approved_in",
    "population",
    "headquartered_in",
    "melting_point_c",
    "expressed_in",
    "description",
    "discovered",
];
/// Vocabulary of generated text (shared by the load tools).
pub const WORDS: &[&str] = &[
    "reported",
    "observed",
    "trial",
    "cohort",
    "significant",
    "adverse",
    "renal",
    "hepatic",
    "dose",
    "response",
    "patients",
    "increase",
    "reduction",
    "baseline",
    "placebo",
    "randomized",
    "study",
    "evidence",
    "suggests",
    "association",
    "risk",
    "outcome",
    "clinical",
    "annual",
    "revenue",
    "growth",
    "region",
    "expansion",
    "regulatory",
    "approval",
    "pending",
];
/// Every source tier.
pub const TIERS: &[&str] = &["regulatory", "clinical", "observational", "expert", "community", "anecdotal"];

/// Generates assertion JSON bodies.
pub struct Generator {
    rng: SmallRng,
    nonce: u64,
    counter: u64,
    subjects: u64,
}

impl Generator {
    /// A generator over `subjects` distinct subjects; `nonce` separates runs.
    pub fn new(seed: u64, nonce: u64, subjects: u64) -> Generator {
        use rand::SeedableRng;
        Generator { rng: SmallRng::seed_from_u64(seed), nonce, counter: 0, subjects: subjects.max(1) }
    }

    /// The next unique assertion.
    pub fn next_assertion(&mut self) -> Value {
        self.counter += 1;
        let s = self.rng.gen_range(0..self.subjects);
        let kind = KINDS[(s % KINDS.len() as u64) as usize];
        let pred = PREDICATES[self.rng.gen_range(0..PREDICATES.len())];
        let object = match self.rng.gen_range(0..4) {
            0 => json!({"type": "number", "value": (self.rng.gen_range(0.0..1000.0f64) * 100.0).round() / 100.0}),
            1 => json!({"type": "integer", "value": self.rng.gen_range(0..100_000i64)}),
            2 => {
                json!({"type": "entity", "value": format!("{}:{}", KINDS[self.rng.gen_range(0..KINDS.len())], self.rng.gen_range(0..self.subjects))})
            }
            _ => {
                let n = self.rng.gen_range(6..24);
                let words: Vec<&str> = (0..n).map(|_| WORDS[self.rng.gen_range(0..WORDS.len())]).collect();
                json!({"type": "text", "value": words.join(" ")})
            }
        };
        let agent = format!("agent-{}", self.rng.gen_range(0..200));
        json!({
            "subject": format!("{kind}:{s}"),
            "predicate": pred,
            "object": object,
            "confidence": (self.rng.gen_range(0.3..1.0f64) * 1000.0).round() / 1000.0,
            "agent": agent,
            "source": {"uri": format!("https://example.org/src/{}/{}", self.nonce, self.counter), "tier": TIERS[self.rng.gen_range(0..TIERS.len())]},
            "valid_time": format!("2026-{:02}-{:02}T{:02}:00:00Z", self.rng.gen_range(1..13), self.rng.gen_range(1..29), self.rng.gen_range(0..24)),
        })
    }
}
