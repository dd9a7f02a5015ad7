//! The canonical encoding of an assertion, the input of its BLAKE3 id.
//!
//! The encoding must be reproducible in any language from
//! `docs/wire-format.md` alone, so it is deliberately plain: a fixed prefix,
//! then tag-length-value fields in ascending tag order, omitting fields the
//! client did not submit. JSON is never hashed directly because JSON has many
//! spellings of one document.

use super::Assertion;

/// Domain-separation prefix, so an assertion hash never equals any other
/// BLAKE3 hash StemeDB computes.
pub const PREFIX: &[u8] = b"stemedb/assertion/v1";

/// Field tags, in the order they appear.
pub mod tag {
    /// Subject, UTF-8.
    pub const SUBJECT: u8 = 0x01;
    /// Predicate, UTF-8.
    pub const PREDICATE: u8 = 0x02;
    /// Object type name, ASCII.
    pub const OBJECT_TYPE: u8 = 0x03;
    /// Object value, by type (see docs/wire-format.md).
    pub const OBJECT_VALUE: u8 = 0x04;
    /// Confidence, f64 big-endian, if submitted.
    pub const CONFIDENCE: u8 = 0x05;
    /// Agent, UTF-8.
    pub const AGENT: u8 = 0x06;
    /// Source URI, UTF-8, if a source was submitted.
    pub const SOURCE_URI: u8 = 0x07;
    /// Source tier name, ASCII, if submitted.
    pub const SOURCE_TIER: u8 = 0x08;
    /// Source hash, 32 raw bytes, if submitted.
    pub const SOURCE_HASH: u8 = 0x09;
    /// Valid time in normal form, ASCII, if submitted.
    pub const VALID_TIME: u8 = 0x0A;
    /// Superseded ids, 32 raw bytes each, ascending, if any.
    pub const SUPERSEDES: u8 = 0x0B;
}

/// Appends one `tag ‖ u32be(len) ‖ bytes` field.
pub fn push_field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    // Every field is bounded far below 4 GiB by validation.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The canonical bytes of `a` (the signature is not part of them).
pub fn encode(a: &Assertion) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX.len() + 64 + a.subject.len() + a.predicate.len() + a.agent.len());
    out.extend_from_slice(PREFIX);
    push_field(&mut out, tag::SUBJECT, a.subject.as_bytes());
    push_field(&mut out, tag::PREDICATE, a.predicate.as_bytes());
    out.extend_from_slice(&a.object.canonical_bytes());
    if let Some(c) = a.confidence {
        let c = if c == 0.0 { 0.0 } else { c };
        push_field(&mut out, tag::CONFIDENCE, &c.to_be_bytes());
    }
    push_field(&mut out, tag::AGENT, a.agent.as_bytes());
    if let Some(src) = &a.source {
        push_field(&mut out, tag::SOURCE_URI, src.uri.as_bytes());
        if let Some(t) = src.tier {
            push_field(&mut out, tag::SOURCE_TIER, t.as_str().as_bytes());
        }
        if let Some(h) = &src.hash {
            let mut raw = [0u8; 32];
            // Validation guarantees 64 hex chars; fall back to the text if not.
            match hex::decode_to_slice(h, &mut raw) {
                Ok(()) => push_field(&mut out, tag::SOURCE_HASH, &raw),
                Err(_) => push_field(&mut out, tag::SOURCE_HASH, h.as_bytes()),
            }
        }
    }
    if let Some(t) = &a.valid_time {
        push_field(&mut out, tag::VALID_TIME, super::time::format(t).as_bytes());
    }
    if !a.supersedes.is_empty() {
        let mut ids: Vec<u8> = Vec::with_capacity(32 * a.supersedes.len());
        for id in &a.supersedes {
            ids.extend_from_slice(id.as_bytes());
        }
        push_field(&mut out, tag::SUPERSEDES, &ids);
    }
    out
}
