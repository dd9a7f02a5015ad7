//! The assertion: an immutable claim `subject / predicate / object`.
//!
//! This struct holds the fields exactly as the client submitted them
//! (optional fields stay `None` rather than being filled with defaults),
//! because the id is a hash of what was submitted. Defaults are applied by
//! the accessors readers use ([`Assertion::effective_confidence`], ...).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{AssertionId, Object};

/// The provenance tier of a source, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Regulators and standards bodies.
    Regulatory,
    /// Clinical or controlled studies.
    Clinical,
    /// Observational data.
    Observational,
    /// A named expert's opinion.
    Expert,
    /// Community knowledge; the default.
    Community,
    /// Hearsay.
    Anecdotal,
}

impl Tier {
    /// Every tier, strongest first.
    pub const ALL: [Tier; 6] = [Tier::Regulatory, Tier::Clinical, Tier::Observational, Tier::Expert, Tier::Community, Tier::Anecdotal];

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Regulatory => "regulatory",
            Tier::Clinical => "clinical",
            Tier::Observational => "observational",
            Tier::Expert => "expert",
            Tier::Community => "community",
            Tier::Anecdotal => "anecdotal",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Where a claim came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Where to find the source (at most 2048 bytes).
    pub uri: String,
    /// The tier as submitted; `None` means community.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// BLAKE3 or SHA-256 of the source document, as submitted (64 hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// An assertion exactly as submitted and validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// What the claim is about.
    pub subject: String,
    /// Which property of the subject.
    pub predicate: String,
    /// The claimed value.
    pub object: Object,
    /// Confidence in [0, 1] as submitted; `None` means 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// Agent name or 64-hex ed25519 public key.
    pub agent: String,
    /// 128-hex ed25519 signature of the id bytes, if signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The time the claim is about; `None` means "when recorded".
    #[serde(default, skip_serializing_if = "Option::is_none", with = "super::time::serde_normal_opt")]
    pub valid_time: Option<DateTime<Utc>>,
    /// Earlier assertions of the same agent on the same subject/predicate
    /// that this one replaces; kept sorted and unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<AssertionId>,
}

impl Assertion {
    /// The content address of this assertion (signature excluded).
    pub fn id(&self) -> AssertionId {
        AssertionId(*blake3::hash(&super::canonical::encode(self)).as_bytes())
    }

    /// Confidence with the default applied.
    pub fn effective_confidence(&self) -> f64 {
        self.confidence.unwrap_or(1.0)
    }

    /// Tier with the default applied.
    pub fn effective_tier(&self) -> Tier {
        self.source.as_ref().and_then(|s| s.tier).unwrap_or(Tier::Community)
    }
}
