//! Offline verification of a whole WAL directory (`stemedb wal verify`).
//!
//! Unlike recovery, verification changes nothing and treats a bad tail as a
//! finding too: an operator running it wants to know about every byte that
//! does not check out.

use std::path::Path;

use serde::Serialize;

use super::WalError;
use super::frame::ScanStop;
use super::recovery::scan_segment;
use super::segment;

/// The summary printed by `wal verify`.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// Segments checked.
    pub segments: usize,
    /// Frames checked.
    pub frames: u64,
    /// Records (events) checked.
    pub records: u64,
    /// Last position in the log (0 if empty).
    pub last_position: u64,
}

/// Checks every header, frame, checksum, payload and position of `dir`.
pub fn verify(dir: &Path) -> Result<VerifyReport, WalError> {
    verify_with(dir, true)
}

/// [`verify`], decoding every payload only if `decode_payloads`: without,
/// headers, checksums and frame positions are still all checked. For a
/// caller that decodes every record right after anyway (a restore, whose
/// rebuild fails on any payload that does not decode or continue the
/// positions), decoding twice would only cost time.
pub fn verify_with(dir: &Path, decode_payloads: bool) -> Result<VerifyReport, WalError> {
    let segments = segment::list(dir)?;
    let mut expected = None;
    let mut frames = 0;
    let mut first = None;
    for seg in &segments {
        let scan = scan_segment(seg, expected, decode_payloads)?;
        if let ScanStop::Bad { offset, reason } = scan.stop {
            return Err(WalError::Corrupt { path: seg.path.clone(), offset, reason });
        }
        first.get_or_insert(scan.header.first_position);
        frames += scan.frames;
        expected = Some(scan.next_position);
    }
    let last_position = expected.map(|n| n - 1).unwrap_or(0);
    let records = last_position + 1 - first.unwrap_or(1);
    Ok(VerifyReport { segments: segments.len(), frames, records, last_position })
}
