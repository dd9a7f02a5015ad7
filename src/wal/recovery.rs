//! Making a WAL directory consistent at start.
//!
//! The rules, from the durability contract: a torn or corrupt tail of the
//! *last* segment can only hold unacknowledged frames (acknowledgement
//! follows fdatasync), so it is truncated and logged. Anything wrong
//! elsewhere — a sealed segment, a header, a gap in positions — is
//! corruption of acknowledged data and stops the server with the file and
//! offset; it is never skipped.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::WalError;
use super::frame::{self, FrameScanner, ScanStop};
use super::segment::{self, Header, SegmentFile};

/// What scanning one segment found.
#[derive(Debug)]
pub struct SegmentScan {
    /// The segment's header.
    pub header: Header,
    /// Offset after the last good frame.
    pub valid_len: u64,
    /// File length on disk.
    pub file_len: u64,
    /// Position after the last good record.
    pub next_position: u64,
    /// Number of good frames.
    pub frames: u64,
    /// Payload of the last good frame (to recover the last `recorded_at`).
    pub last_payload: Option<Vec<u8>>,
    /// Why the scan stopped.
    pub stop: ScanStop,
}

/// Reads `seg` completely, checking the header, every frame's CRC and the
/// continuity of positions from `expected_first` (if known). With `decode`,
/// every payload is also decoded and its records' positions checked.
pub fn scan_segment(seg: &SegmentFile, expected_first: Option<u64>, decode: bool) -> Result<SegmentScan, WalError> {
    let path = &seg.path;
    let file = File::open(path).map_err(|e| WalError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| WalError::io(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut hb = [0u8; segment::HEADER_LEN as usize];
    let n = read_up_to(&mut r, &mut hb).map_err(|e| WalError::io(path, e))?;
    let header = Header::decode(&hb[..n]).map_err(|reason| WalError::Corrupt { path: path.clone(), offset: 0, reason })?;
    if header.first_position != seg.first_position {
        return Err(WalError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason: format!("header says first position {}, file name says {}", header.first_position, seg.first_position),
        });
    }
    if let Some(expected) = expected_first
        && header.first_position != expected
    {
        return Err(WalError::Gap { path: path.clone(), offset: 0, expected, found: header.first_position });
    }
    let mut scanner = FrameScanner::new(r, segment::HEADER_LEN);
    let mut next = header.first_position;
    let mut frames = 0;
    let mut last_payload = None;
    let stop = loop {
        match scanner.next_frame().map_err(|e| WalError::io(path, e))? {
            Err(stop) => break stop,
            Ok(f) => {
                if f.header.first_position != next {
                    // The checksum is valid, so this is no torn write: a
                    // frame out of sequence is corruption, wherever it is.
                    return Err(WalError::Gap { path: path.clone(), offset: f.offset, expected: next, found: f.header.first_position });
                }
                if decode {
                    let records = frame::decode_payload(&f.payload).map_err(|reason| WalError::Corrupt {
                        path: path.clone(),
                        offset: f.offset,
                        reason,
                    })?;
                    let ok =
                        records.len() == f.header.count as usize && records.iter().enumerate().all(|(i, r)| r.position == next + i as u64);
                    if !ok {
                        return Err(WalError::Corrupt {
                            path: path.clone(),
                            offset: f.offset,
                            reason: "records inside the frame do not match its header positions".into(),
                        });
                    }
                }
                next = f.header.next_position();
                frames += 1;
                last_payload = Some(f.payload);
            }
        }
    };
    Ok(SegmentScan { header, valid_len: scanner.offset(), file_len, next_position: next, frames, last_payload, stop })
}

/// What was cut from the tail at recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// The last segment.
    pub path: PathBuf,
    /// Where the cut happened.
    pub offset: u64,
    /// How many bytes were dropped.
    pub bytes: u64,
    /// The first position that was not kept (positions from here on were
    /// never acknowledged).
    pub first_dropped_position: u64,
    /// Why the tail was bad.
    pub reason: String,
}

/// The consistent state of a WAL directory.
#[derive(Debug)]
pub struct Recovered {
    /// Every segment, sorted.
    pub segments: Vec<SegmentFile>,
    /// The segment to append to (the last one).
    pub active: SegmentFile,
    /// Its valid length (after any truncation).
    pub active_len: u64,
    /// The position the next record gets.
    pub next_position: u64,
    /// `recorded_at` of the last record, so time never goes backwards.
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// What was truncated, if anything.
    pub truncation: Option<Truncation>,
}

/// Scans `dir`, truncates a bad tail of the last segment, creates the first
/// segment of an empty directory, and returns where to append.
pub fn recover(dir: &Path) -> Result<Recovered, WalError> {
    std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
    segment::remove_temporaries(dir)?;
    let mut segments = segment::list(dir)?;
    if segments.is_empty() {
        segments.push(create_segment(dir, 1)?);
    }
    let mut expected = None;
    let mut last_scan = None;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        let scan = scan_segment(seg, expected, false)?;
        if !is_last && let ScanStop::Bad { offset, reason } = &scan.stop {
            return Err(WalError::Corrupt { path: seg.path.clone(), offset: *offset, reason: format!("{reason} (in a sealed segment)") });
        }
        expected = Some(scan.next_position);
        last_scan = Some(scan);
    }
    let (Some(scan), Some(active)) = (last_scan, segments.last().cloned()) else {
        return Err(WalError::NoSuchPosition(1));
    };
    let mut truncation = None;
    if let ScanStop::Bad { offset, reason } = &scan.stop {
        let t = Truncation {
            path: active.path.clone(),
            offset: *offset,
            bytes: scan.file_len - offset,
            first_dropped_position: scan.next_position,
            reason: reason.clone(),
        };
        let f = OpenOptions::new().write(true).open(&active.path).map_err(|e| WalError::io(&active.path, e))?;
        f.set_len(*offset).and_then(|_| f.sync_all()).map_err(|e| WalError::io(&active.path, e))?;
        tracing::warn!(
            segment = %t.path.display(),
            offset = t.offset,
            bytes_dropped = t.bytes,
            first_dropped_position = t.first_dropped_position,
            reason = %t.reason,
            "truncated a torn or corrupt WAL tail; the dropped bytes held positions from {} on, none of which was acknowledged",
            t.first_dropped_position
        );
        truncation = Some(t);
    }
    let last_recorded_at = match &scan.last_payload {
        Some(p) => {
            let recs = frame::decode_payload(p).map_err(|reason| WalError::Corrupt { path: active.path.clone(), offset: 0, reason })?;
            recs.last().map(|r| r.recorded_at)
        }
        None if segments.len() > 1 => last_recorded_at_of(&segments[segments.len() - 2])?,
        None => None,
    };
    Ok(Recovered { active_len: scan.valid_len, next_position: scan.next_position, segments, active, last_recorded_at, truncation })
}

fn last_recorded_at_of(seg: &SegmentFile) -> Result<Option<DateTime<Utc>>, WalError> {
    let scan = scan_segment(seg, None, false)?;
    match scan.last_payload {
        Some(p) => {
            let recs = frame::decode_payload(&p).map_err(|reason| WalError::Corrupt { path: seg.path.clone(), offset: 0, reason })?;
            Ok(recs.last().map(|r| r.recorded_at))
        }
        None => Ok(None),
    }
}

/// Creates a new empty segment starting at `first_position`: written under a
/// temporary name, synced, renamed, and the directory synced, so a crash
/// never leaves a segment without a complete header.
pub fn create_segment(dir: &Path, first_position: u64) -> Result<SegmentFile, WalError> {
    use std::io::Write;
    let path = dir.join(segment::file_name(first_position));
    let tmp = dir.join(format!("{first_position:020}.{}", segment::TMP_EXT));
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&tmp).map_err(|e| WalError::io(&tmp, e))?;
    f.write_all(&Header { first_position }.encode()).and_then(|_| f.sync_all()).map_err(|e| WalError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| WalError::io(&path, e))?;
    segment::sync_dir(dir)?;
    Ok(SegmentFile { first_position, path })
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
