//! Timestamps: one normal form for every instant StemeDB stores or hashes.
//!
//! RFC 3339 allows many spellings of one instant (`Z` or `+00:00`, offsets,
//! trailing zeros). Ids must not depend on the spelling, so every time is
//! normalized to UTC and printed with [`format`](fn@format) before it is hashed, stored
//! or returned.

use chrono::{DateTime, SecondsFormat, Utc};

/// Parses an RFC 3339 timestamp with any offset into UTC. The instant must
/// fall in the years 0000–9999 *in UTC*, because only those have an RFC
/// 3339 normal form that parses back to the same instant (an offset can
/// push `0000-01-01T00:00:00+01:00` into year −1).
pub fn parse(s: &str) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 timestamp ({e}); example: 2026-01-31T12:00:00Z"))?;
    if !(0..=9999).contains(&t.year()) {
        return Err(format!("{s} is outside the years 0000-9999 once converted to UTC"));
    }
    Ok(t)
}

/// The normal form: UTC, `Z`, and a fraction of 0, 3, 6 or 9 digits
/// (the shortest that is exact).
pub fn format(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Serde adapter storing a `DateTime<Utc>` in its normal form.
pub mod serde_normal {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the normal form.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(t))
    }

    /// Reads any RFC 3339 spelling.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for an optional normal-form timestamp.
pub mod serde_normal_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the normal form, or nothing.
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&super::format(t)),
            None => s.serialize_none(),
        }
    }

    /// Reads any RFC 3339 spelling, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| super::parse(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Serde adapter writing an instant as `(seconds, nanoseconds)` since the
/// Unix epoch, for a rebuild's temporary sort runs only: formatting and
/// parsing RFC 3339 cost more than the rest of a spilled row's encoding,
/// and a run never outlives the process that wrote it, so no spelling has
/// to be stable or readable. Stored rows and answers keep [`serde_normal`].
pub mod serde_spill {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes seconds and nanoseconds.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        (t.timestamp(), t.timestamp_subsec_nanos()).serialize(s)
    }

    /// Reads seconds and nanoseconds; a pair no instant has is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let (secs, nanos) = <(i64, u32)>::deserialize(d)?;
        DateTime::from_timestamp(secs, nanos).ok_or_else(|| serde::de::Error::custom(format!("no instant is {secs} s {nanos} ns")))
    }
}
