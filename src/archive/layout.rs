//! The object layout under `s3://bucket/prefix/` (documented in
//! `docs/wire-format.md`):
//!
//! ```text
//! writer.json                     who may ship here (WriterRecord)
//! segments/<first:020>-<gen>.wal  a sealed WAL segment, byte for byte
//! manifest/<first:020>.json       its ManifestEntry, written after it
//! ```
//!
//! Names sort like positions, so a listing is the log in order and a
//! follower lists only what comes after the last entry it has. A manifest
//! entry exists only for a segment that is completely uploaded, so the
//! manifest is the restorable log and anything else is an unfinished upload.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The writer record's key.
pub const WRITER_KEY: &str = "writer.json";
/// Directory of segment objects.
pub const SEGMENTS_DIR: &str = "segments";
/// Directory of manifest entries.
pub const MANIFEST_DIR: &str = "manifest";
/// Version of the JSON documents below.
pub const FORMAT: u32 = 1;

/// The key of the segment object starting at `first_position`, shipped by
/// writer generation `generation`. The generation is in the name so that a
/// fenced writer's last, unlisted upload can never occupy the key its
/// successor needs.
pub fn segment_key(first_position: u64, generation: u64) -> String {
    format!("{SEGMENTS_DIR}/{first_position:020}-{generation}.wal")
}

/// The key of the manifest entry of the segment starting at `first_position`.
pub fn manifest_key(first_position: u64) -> String {
    format!("{MANIFEST_DIR}/{first_position:020}.json")
}

/// The first position encoded in a manifest key, if it is one.
pub fn manifest_first_position(key: &str) -> Option<u64> {
    let stem = key.strip_prefix(&format!("{MANIFEST_DIR}/"))?.strip_suffix(".json")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok()).flatten()
}

/// One shipped segment: enough to plan a restore (which segments, where
/// to cut) and to check every byte without trusting the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// [`FORMAT`].
    pub format: u32,
    /// The segment object's key, relative to the prefix.
    pub object: String,
    /// Position of its first record.
    pub first_position: u64,
    /// Position of its last record.
    pub last_position: u64,
    /// `recorded_at` of its first record.
    pub first_recorded_at: DateTime<Utc>,
    /// `recorded_at` of its last record.
    pub last_recorded_at: DateTime<Utc>,
    /// Object size in bytes.
    pub size: u64,
    /// BLAKE3 of the object's bytes, hex.
    pub blake3: String,
    /// The writer that shipped it.
    pub writer_id: String,
    /// That writer's generation.
    pub generation: u64,
    /// When it was shipped.
    pub shipped_at: DateTime<Utc>,
}

/// Who ships to this prefix. Created once with `If-None-Match`; a writer
/// with another id is refused, so two servers never interleave segments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterRecord {
    /// [`FORMAT`].
    pub format: u32,
    /// The id stored beside the writer's WAL (`<wal>/WRITER_ID`).
    pub writer_id: String,
    /// 1 for the first writer; a takeover increments it.
    pub generation: u64,
    /// When this generation claimed the prefix.
    pub claimed_at: DateTime<Utc>,
    /// The host name of the claiming server, for the operator.
    pub host: String,
}

/// Checks that `entries` (sorted by first position) form one log from
/// position 1 with no gap or overlap; the error names the object at fault.
pub fn check_continuity(entries: &[ManifestEntry]) -> Result<(), String> {
    let mut expected = 1;
    for e in entries {
        if e.first_position != expected {
            return Err(format!(
                "{}: starts at position {} but the previous segment ends at {} (a segment is missing or overlaps)",
                manifest_key(e.first_position),
                e.first_position,
                expected - 1
            ));
        }
        if e.last_position < e.first_position || e.object != segment_key(e.first_position, e.generation) {
            return Err(format!("{}: inconsistent entry (positions or object name)", manifest_key(e.first_position)));
        }
        expected = e.last_position + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(first: u64, last: u64) -> ManifestEntry {
        let t = Utc::now();
        ManifestEntry {
            format: FORMAT,
            object: segment_key(first, 1),
            first_position: first,
            last_position: last,
            first_recorded_at: t,
            last_recorded_at: t,
            size: 1,
            blake3: String::new(),
            writer_id: "w".into(),
            generation: 1,
            shipped_at: t,
        }
    }

    #[test]
    fn keys_round_trip_and_sort_like_positions() {
        assert_eq!(manifest_first_position(&manifest_key(42)), Some(42));
        assert!(manifest_key(9) < manifest_key(10));
        assert_eq!(manifest_first_position("manifest/12.json"), None);
        assert_eq!(manifest_first_position(&segment_key(1, 1)), None);
    }

    #[test]
    fn continuity_names_the_gap() {
        assert!(check_continuity(&[entry(1, 5), entry(6, 9)]).is_ok());
        let e = check_continuity(&[entry(1, 5), entry(7, 9)]).unwrap_err();
        assert!(e.contains("manifest/00000000000000000007.json"), "{e}");
        assert!(check_continuity(&[entry(2, 5)]).is_err());
    }
}
