//! Tier weights and half-lives, from `projections/lenses.toml`.
//!
//! They are data, not code, so that operators can tune them; because the
//! materialized answers depend on them, their hash is stored with the
//! `lenses` projection and a change is detected at start.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::model::Tier;

/// The embedded default definitions (the repository's `projections/lenses.toml`).
pub const DEFAULT_LENSES_TOML: &str = include_str!("../../projections/lenses.toml");

/// Parsed lens definitions.
#[derive(Clone, Debug, PartialEq)]
pub struct Definitions {
    /// Weight per tier, indexed like [`Tier::ALL`].
    pub tier_weights: [f64; 6],
    /// Half-life in days per tier; `None` never decays.
    pub half_life_days: [Option<f64>; 6],
    /// BLAKE3 of the source text, stored with the projection.
    pub hash: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    tier_weights: BTreeMap<String, f64>,
    #[serde(default)]
    half_life_days: BTreeMap<String, f64>,
}

impl Definitions {
    /// Parses definitions text; errors name the offending key.
    pub fn parse(text: &str) -> Result<Definitions, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut tier_weights = [f64::NAN; 6];
        for (k, v) in &raw.tier_weights {
            let t = Tier::parse(k).ok_or_else(|| format!("tier_weights: unknown tier {k:?}"))?;
            if !v.is_finite() || *v < 0.0 {
                return Err(format!("tier_weights.{k}: must be a finite number ≥ 0"));
            }
            tier_weights[t as usize] = *v;
        }
        if let Some(t) = Tier::ALL.iter().find(|t| tier_weights[**t as usize].is_nan()) {
            return Err(format!("tier_weights: missing tier {:?}", t.as_str()));
        }
        let mut half_life_days = [None; 6];
        for (k, v) in &raw.half_life_days {
            let t = Tier::parse(k).ok_or_else(|| format!("half_life_days: unknown tier {k:?}"))?;
            if !v.is_finite() || *v <= 0.0 {
                return Err(format!("half_life_days.{k}: must be a number of days > 0"));
            }
            half_life_days[t as usize] = Some(*v);
        }
        Ok(Definitions { tier_weights, half_life_days, hash: blake3::hash(text.as_bytes()).to_hex().to_string() })
    }

    /// Loads `lenses.toml` from `dir`, or the embedded defaults when `dir` is `None`.
    pub fn load(dir: Option<&Path>) -> Result<Definitions, String> {
        match dir {
            None => Definitions::parse(DEFAULT_LENSES_TOML),
            Some(d) => {
                let p = d.join("lenses.toml");
                let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                Definitions::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
            }
        }
    }

    /// The weight of `tier`.
    pub fn weight(&self, tier: Tier) -> f64 {
        self.tier_weights[tier as usize]
    }

    /// The half-life of `tier` in seconds, if it decays.
    pub fn half_life_secs(&self, tier: Tier) -> Option<f64> {
        self.half_life_days[tier as usize].map(|d| d * 86_400.0)
    }
}

impl Default for Definitions {
    fn default() -> Self {
        // The embedded file is part of the build and covered by tests.
        Definitions::parse(DEFAULT_LENSES_TOML).unwrap_or_else(|e| panic!("embedded projections/lenses.toml is invalid: {e}"))
    }
}
