//! The stored form of a [`Summary`]: every value and assertion id once,
//! referenced by index.
//!
//! A summary names the winner of each lens, the consensus claims and the
//! consensus of every tier. For a pair with one assertion that is the same
//! value and the same 34-byte id six times over: written as plain structs
//! a summary averaged 881 bytes, two thirds of every lens row, which a
//! rebuild writes and every lens read decodes. Here the values and ids are
//! listed once and the rest refers to them, so a summary is a fraction of
//! that; [`Summary`] itself, and so every answer, is unchanged.
//!
//! A packed summary is a msgpack array of eight elements. The forms
//! written before it were an array of six (positional) or a map (named);
//! [`decode`] reads all three, so a store written by an older version
//! reads as before, and rows are repacked as pairs change (or all at once
//! by a rebuild).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::{Summary, SummaryHead};
use crate::lens::{Claim, Conflict, Resolution, Winner};
use crate::model::{AssertionId, Object, Tier};

/// The first byte of a packed summary: a msgpack array of eight.
const PACKED_MARKER: u8 = 0x98;

/// A winner: value index, confidence, assertion indexes.
#[derive(Serialize, Deserialize)]
struct PackedWinner(u32, f64, Vec<u32>);

/// A claim: value index, weight, share, assertion indexes, agents.
#[derive(Serialize, Deserialize)]
struct PackedClaim(u32, f64, f64, Vec<u32>, u32);

/// A tier's consensus: winner, claims, conflict.
#[derive(Serialize, Deserialize)]
struct PackedResolution(Option<PackedWinner>, Vec<PackedClaim>, Conflict);

/// The eight elements, in stored order; the tiers come last so the reads
/// that do not show them can skip them undecoded.
#[derive(Serialize, Deserialize)]
struct Packed<V, T> {
    values: Vec<V>,
    ids: Vec<AssertionId>,
    claims: Vec<PackedClaim>,
    conflict: Conflict,
    recency: Option<PackedWinner>,
    confidence: Option<PackedWinner>,
    authority: Option<PackedWinner>,
    tiers: T,
}

/// The tables a summary is packed against.
#[derive(Default)]
struct Tables<'a> {
    values: Vec<&'a Object>,
    ids: Vec<AssertionId>,
    id_index: HashMap<AssertionId, u32, foldhash::fast::RandomState>,
}

impl<'a> Tables<'a> {
    fn value(&mut self, value: &'a Object) -> u32 {
        // A handful of distinct values per pair: a scan is cheapest.
        let i = match self.values.iter().position(|v| *v == value) {
            Some(i) => i,
            None => {
                self.values.push(value);
                self.values.len() - 1
            }
        };
        i as u32
    }

    fn ids(&mut self, ids: &[AssertionId]) -> Vec<u32> {
        ids.iter()
            .map(|id| {
                let next = self.ids.len() as u32;
                *self.id_index.entry(*id).or_insert_with(|| {
                    self.ids.push(*id);
                    next
                })
            })
            .collect()
    }

    fn winner(&mut self, w: &'a Winner) -> PackedWinner {
        PackedWinner(self.value(&w.value), w.confidence, self.ids(&w.assertions))
    }

    fn claims(&mut self, claims: &'a [Claim]) -> Vec<PackedClaim> {
        claims.iter().map(|c| PackedClaim(self.value(&c.value), c.weight, c.share, self.ids(&c.assertions), c.agents)).collect()
    }
}

/// Appends the packed form of `summary` to `out`.
pub(super) fn encode(summary: &Summary, out: &mut Vec<u8>) -> Result<(), rmp_serde::encode::Error> {
    let mut t = Tables::default();
    let claims = t.claims(&summary.claims);
    let recency = summary.recency.as_ref().map(|w| t.winner(w));
    let confidence = summary.confidence.as_ref().map(|w| t.winner(w));
    let authority = summary.authority.as_ref().map(|w| t.winner(w));
    let tiers: Vec<(Tier, PackedResolution)> = summary
        .tiers
        .iter()
        .map(|(tier, r)| (*tier, PackedResolution(r.winner.as_ref().map(|w| t.winner(w)), t.claims(&r.claims), r.conflict.clone())))
        .collect();
    let Tables { values, ids, .. } = t;
    let packed = Packed { values, ids, claims, conflict: summary.conflict.clone(), recency, confidence, authority, tiers };
    rmp_serde::encode::write(out, &packed)
}

/// Decodes a stored summary of any form; without its tiers (which only
/// `layered` shows) when `with_tiers` is false.
pub(super) fn decode(bytes: &[u8], with_tiers: bool) -> Result<Summary, String> {
    let unpacked = match (bytes.first() == Some(&PACKED_MARKER), with_tiers) {
        (true, true) => {
            let p: Packed<Object, Vec<(Tier, PackedResolution)>> = rmp_serde::from_slice(bytes).map_err(|e| e.to_string())?;
            let tiers = p.tiers.iter().map(|(tier, r)| Ok((*tier, resolution(&p.values, &p.ids, r)?))).collect::<Result<_, String>>()?;
            unpack(&p, tiers)
        }
        (true, false) => {
            let p: Packed<Object, serde::de::IgnoredAny> = rmp_serde::from_slice(bytes).map_err(|e| e.to_string())?;
            unpack(&p, BTreeMap::new())
        }
        (false, true) => rmp_serde::from_slice::<Summary>(bytes).map_err(|e| e.to_string()),
        (false, false) => rmp_serde::from_slice::<SummaryHead>(bytes).map(SummaryHead::into_summary).map_err(|e| e.to_string()),
    };
    unpacked.map_err(|e| format!("a stored lens summary does not decode: {e}"))
}

fn unpack<T>(p: &Packed<Object, T>, tiers: BTreeMap<Tier, Resolution>) -> Result<Summary, String> {
    let winner = |w: &Option<PackedWinner>| w.as_ref().map(|w| self::winner(&p.values, &p.ids, w)).transpose();
    Ok(Summary {
        claims: claims(&p.values, &p.ids, &p.claims)?,
        conflict: p.conflict.clone(),
        recency: winner(&p.recency)?,
        confidence: winner(&p.confidence)?,
        authority: winner(&p.authority)?,
        tiers,
    })
}

fn value(values: &[Object], i: u32) -> Result<Object, String> {
    values.get(i as usize).cloned().ok_or_else(|| format!("value {i} of {}", values.len()))
}

fn ids(ids: &[AssertionId], at: &[u32]) -> Result<Vec<AssertionId>, String> {
    at.iter().map(|&i| ids.get(i as usize).copied().ok_or_else(|| format!("assertion {i} of {}", ids.len()))).collect()
}

fn winner(values: &[Object], table: &[AssertionId], w: &PackedWinner) -> Result<Winner, String> {
    Ok(Winner { value: value(values, w.0)?, confidence: w.1, assertions: ids(table, &w.2)? })
}

fn claims(values: &[Object], table: &[AssertionId], claims: &[PackedClaim]) -> Result<Vec<Claim>, String> {
    claims
        .iter()
        .map(|c| Ok(Claim { value: value(values, c.0)?, weight: c.1, share: c.2, assertions: ids(table, &c.3)?, agents: c.4 }))
        .collect()
}

fn resolution(values: &[Object], table: &[AssertionId], r: &PackedResolution) -> Result<Resolution, String> {
    Ok(Resolution {
        winner: r.0.as_ref().map(|w| winner(values, table, w)).transpose()?,
        claims: claims(values, table, &r.1)?,
        conflict: r.2.clone(),
        tiers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_index_or_a_cut_row_is_an_error_not_a_panic() {
        let conflict = Conflict { score: 0.0, status: "unanimous".into() };
        let p: Packed<Object, Vec<(Tier, PackedResolution)>> = Packed {
            values: vec![],
            ids: vec![],
            claims: vec![PackedClaim(5, 1.0, 1.0, vec![], 1)],
            conflict,
            recency: None,
            confidence: None,
            authority: None,
            tiers: vec![],
        };
        let bytes = rmp_serde::to_vec(&p).expect("encode");
        assert_eq!(bytes[0], PACKED_MARKER, "the form is recognised by its first byte");
        let err = decode(&bytes, true).expect_err("value 5 of none");
        assert!(err.contains("value 5 of 0"), "{err}");
        assert!(decode(&bytes[..bytes.len() - 3], false).is_err());
    }
}
