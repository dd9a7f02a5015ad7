//! Iterating the log from any position.
//!
//! Projections, `wal dump` and shipping all read the log through
//! [`WalReader`]. A reader may run while the writer appends: it never reads
//! past `until`, which callers set to a committed position, so it never
//! sees a half-written frame. Frames before the start position are skipped
//! by their headers, without decoding.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::WalError;
use super::frame::{self, FrameScanner, ScanStop};
use super::segment::{self, Header, SegmentFile};
use crate::model::LogRecord;

/// A cursor over the records of a WAL directory.
pub struct WalReader {
    dir: PathBuf,
    current: Option<(SegmentFile, FrameScanner<BufReader<File>>)>,
    pending: VecDeque<LogRecord>,
    /// The position of the next record to return.
    next_position: u64,
    /// Position of the first record of the next frame to read.
    frame_position: u64,
    until: u64,
    /// Set when the current segment ended where no segment starts but a
    /// later one exists; cleared by the next frame read.
    rechecked: bool,
}

impl WalReader {
    /// A reader whose first record is `from` (1 for the whole log).
    pub fn open(dir: &Path, from: u64) -> Result<WalReader, WalError> {
        let from = from.max(1);
        let segments = segment::list(dir)?;
        let seg = segments.iter().rev().find(|s| s.first_position <= from).cloned().ok_or(WalError::NoSuchPosition(from))?;
        let mut r = WalReader {
            dir: dir.to_path_buf(),
            current: None,
            pending: VecDeque::new(),
            next_position: from,
            frame_position: seg.first_position,
            until: u64::MAX,
            rechecked: false,
        };
        r.open_segment(seg)?;
        Ok(r)
    }

    /// Never return records after `until` (a committed position).
    pub fn set_until(&mut self, until: u64) {
        self.until = until;
    }

    /// The position the next returned record will have.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    fn open_segment(&mut self, seg: SegmentFile) -> Result<(), WalError> {
        let file = File::open(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
        let mut br = BufReader::with_capacity(1 << 20, file);
        let mut hb = [0u8; segment::HEADER_LEN as usize];
        std::io::Read::read_exact(&mut br, &mut hb).map_err(|e| WalError::io(&seg.path, e))?;
        let h = Header::decode(&hb).map_err(|reason| WalError::Corrupt { path: seg.path.clone(), offset: 0, reason })?;
        if h.first_position != self.frame_position {
            return Err(WalError::Gap { path: seg.path.clone(), offset: 0, expected: self.frame_position, found: h.first_position });
        }
        self.current = Some((seg, FrameScanner::new(br, segment::HEADER_LEN)));
        Ok(())
    }

    /// The next record, or `None` when the reader has reached `until` or the
    /// end of what is written.
    pub fn next_record(&mut self) -> Result<Option<LogRecord>, WalError> {
        loop {
            if self.next_position > self.until {
                return Ok(None);
            }
            if let Some(r) = self.pending.pop_front() {
                if r.position < self.next_position {
                    continue;
                }
                self.next_position = r.position + 1;
                return Ok(Some(r));
            }
            let Some((seg, scanner)) = self.current.as_mut() else { return Ok(None) };
            match scanner.next_frame().map_err(|e| WalError::io(&seg.path, e))? {
                Ok(f) => {
                    if f.header.first_position != self.frame_position {
                        return Err(WalError::Gap {
                            path: seg.path.clone(),
                            offset: f.offset,
                            expected: self.frame_position,
                            found: f.header.first_position,
                        });
                    }
                    self.frame_position = f.header.next_position();
                    self.rechecked = false;
                    if self.frame_position <= self.next_position {
                        continue; // wholly before the start: skip undecoded
                    }
                    let records = frame::decode_payload(&f.payload).map_err(|reason| WalError::Corrupt {
                        path: seg.path.clone(),
                        offset: f.offset,
                        reason,
                    })?;
                    self.pending.extend(records);
                }
                Err(ScanStop::Clean) => {
                    // An empty segment ends where it starts: the file named
                    // after `frame_position` is then this one, not a next one.
                    let empty = seg.first_position == self.frame_position;
                    let next = self.dir.join(segment::file_name(self.frame_position));
                    if !empty && next.exists() {
                        self.open_segment(SegmentFile { first_position: self.frame_position, path: next })?;
                        continue;
                    }
                    // No segment starts here. If a later one exists, this
                    // segment was complete before that one was created, so
                    // one more read sees all of it; if it still ends here,
                    // positions are missing and must not be skipped silently.
                    let later = segment::list(&self.dir)?.into_iter().find(|s| s.first_position > self.frame_position);
                    match later {
                        None => return Ok(None),
                        Some(_) if !self.rechecked => self.rechecked = true,
                        Some(s) => {
                            return Err(WalError::Gap { path: s.path, offset: 0, expected: self.frame_position, found: s.first_position });
                        }
                    }
                }
                Err(ScanStop::Bad { offset, reason }) => {
                    return Err(WalError::Corrupt { path: seg.path.clone(), offset, reason });
                }
            }
        }
    }
}

impl Iterator for WalReader {
    type Item = Result<LogRecord, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
