//! Reading a whole segment held in memory: what the manifest says about
//! it, and where a point-in-time restore may cut it.
//!
//! Both the shipper (before upload) and restore (after download) go through
//! [`summarize`], so a segment is checked frame by frame, CRC by CRC, at
//! both ends of its trip.

use chrono::{DateTime, Utc};

use crate::wal::frame::{self, FrameScanner, ScanStop};
use crate::wal::segment::{self, Header};

/// What a complete segment holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// From the header.
    pub first_position: u64,
    /// Position after the last record (`first_position` if empty).
    pub next_position: u64,
    /// `recorded_at` of the first and last records, if any.
    pub recorded: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Number of frames.
    pub frames: u64,
}

/// One frame's extent and time, for cutting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameExtent {
    /// Offset just after the frame.
    pub end: u64,
    /// Its first and last positions.
    pub first_position: u64,
    /// Last position.
    pub last_position: u64,
    /// The group's `recorded_at` (every record of a frame shares it).
    pub recorded_at: DateTime<Utc>,
}

fn recorded_at(payload: &[u8]) -> Result<DateTime<Utc>, String> {
    let records = frame::decode_payload(payload)?;
    records.first().map(|r| r.recorded_at).ok_or_else(|| "a frame holds no record".to_string())
}

/// Checks `bytes` as one complete segment (header, every frame's CRC,
/// position continuity, clean end) and calls `each` per frame.
fn scan(bytes: &[u8], mut each: impl FnMut(&frame::RawFrame) -> Result<(), String>) -> Result<(Header, u64, u64), String> {
    let header = Header::decode(bytes)?;
    let body = bytes.get(segment::HEADER_LEN as usize..).unwrap_or_default();
    let mut scanner = FrameScanner::new(body, segment::HEADER_LEN);
    let mut next = header.first_position;
    let mut frames = 0;
    loop {
        match scanner.next_frame().map_err(|e| e.to_string())? {
            Ok(f) => {
                if f.header.first_position != next {
                    return Err(format!("frame at offset {} starts at position {}, expected {next}", f.offset, f.header.first_position));
                }
                each(&f)?;
                next = f.header.next_position();
                frames += 1;
            }
            Err(ScanStop::Clean) => break,
            Err(ScanStop::Bad { offset, reason }) => return Err(format!("offset {offset}: {reason}")),
        }
    }
    Ok((header, next, frames))
}

/// Summarizes a complete segment, checking it on the way.
pub fn summarize(bytes: &[u8]) -> Result<SegmentSummary, String> {
    let mut first_payload: Option<Vec<u8>> = None;
    let mut last_payload: Option<Vec<u8>> = None;
    let (header, next_position, frames) = scan(bytes, |f| {
        if first_payload.is_none() {
            first_payload = Some(f.payload.clone());
        } else {
            last_payload = Some(f.payload.clone());
        }
        Ok(())
    })?;
    let recorded = match &first_payload {
        None => None,
        Some(first) => {
            let a = recorded_at(first)?;
            let b = match &last_payload {
                Some(last) => recorded_at(last)?,
                None => a,
            };
            Some((a, b))
        }
    };
    Ok(SegmentSummary { first_position: header.first_position, next_position, recorded, frames })
}

/// Every frame's extent, decoding each frame for its time.
pub fn extents(bytes: &[u8]) -> Result<Vec<FrameExtent>, String> {
    let mut out = Vec::new();
    scan(bytes, |f| {
        out.push(FrameExtent {
            end: f.offset + (frame::HEADER_LEN + f.header.len as usize) as u64,
            first_position: f.header.first_position,
            last_position: f.header.next_position() - 1,
            recorded_at: recorded_at(&f.payload)?,
        });
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, LogRecord, Retraction};

    fn segment(first: u64, groups: &[(usize, i64)]) -> Vec<u8> {
        let mut out = Header { first_position: first }.encode().to_vec();
        let mut pos = first;
        for (n, secs) in groups {
            let t = DateTime::from_timestamp(*secs, 0).unwrap();
            let records: Vec<LogRecord> = (0..*n)
                .map(|i| LogRecord {
                    position: pos + i as u64,
                    recorded_at: t,
                    event: Event::AssertionRetracted(Retraction {
                        id: crate::model::AssertionId([i as u8; 32]),
                        agent: "a".into(),
                        reason: String::new(),
                        signature: None,
                    }),
                })
                .collect();
            frame::encode(&records, &mut out).unwrap();
            pos += *n as u64;
        }
        out
    }

    #[test]
    fn summary_and_extents_follow_the_frames() {
        let bytes = segment(10, &[(2, 100), (3, 200)]);
        let s = summarize(&bytes).unwrap();
        assert_eq!((s.first_position, s.next_position, s.frames), (10, 15, 2));
        let (a, b) = s.recorded.unwrap();
        assert_eq!((a.timestamp(), b.timestamp()), (100, 200));
        let x = extents(&bytes).unwrap();
        assert_eq!((x[0].first_position, x[0].last_position, x[1].last_position), (10, 11, 14));
        assert_eq!(x[1].end, bytes.len() as u64);
    }

    #[test]
    fn a_flipped_byte_or_torn_tail_is_refused() {
        let mut bytes = segment(1, &[(2, 100)]);
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        assert!(summarize(&bytes).unwrap_err().contains("checksum"));
        let bytes = segment(1, &[(2, 100)]);
        assert!(summarize(&bytes[..bytes.len() - 1]).is_err());
    }
}
