//! Appending to the log.
//!
//! [`WalWriter`] is deliberately synchronous and single-owner: the group
//! committer (in `crate::ingest`) owns it on a dedicated thread, buffers the
//! frames of many requests with [`WalWriter::append`], then makes them all
//! durable with one [`WalWriter::commit`] (one `write` and one `fdatasync`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::recovery::{self, Recovered};
use super::segment::{self, SegmentFile};
use super::{WalError, frame};
use crate::model::{Event, LogRecord};

/// Whether commits call fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// fdatasync before every acknowledgement (the default, and the only
    /// durable mode).
    Always,
    /// Never sync: acknowledged writes can be lost on power failure. For
    /// benchmarks only.
    Never,
}

/// Tunables of the writer.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Roll to a new segment once this many bytes are reached.
    pub segment_bytes: u64,
    /// Sync policy.
    pub sync: SyncMode,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { segment_bytes: 64 * 1024 * 1024, sync: SyncMode::Always }
    }
}

/// The single appender of a WAL directory.
pub struct WalWriter {
    dir: PathBuf,
    opts: WriterOptions,
    file: File,
    active: SegmentFile,
    /// Bytes in the active segment, written (not counting `buf`).
    written_len: u64,
    /// Frames appended but not yet written.
    buf: Vec<u8>,
    /// Position the next appended record gets.
    next_position: u64,
    /// Highest position that is durable.
    committed_position: u64,
    last_recorded_at: Option<DateTime<Utc>>,
    /// Duration of the last fdatasync, for metrics.
    last_sync: Option<std::time::Duration>,
    /// Set after any failed write or sync. After a failed fsync the page
    /// cache can no longer be trusted (the "fsyncgate" lesson), so the
    /// writer refuses all further work until a restart re-runs recovery.
    poisoned: Option<String>,
    /// Held for the writer's lifetime: one writer per directory.
    _lock: super::lock::DirLock,
}

impl WalWriter {
    /// Recovers `dir` and opens its last segment for appending.
    pub fn open(dir: &Path, opts: WriterOptions) -> Result<(WalWriter, Recovered), WalError> {
        let lock = super::lock::DirLock::acquire(dir)?;
        let rec = recovery::recover(dir)?;
        let mut file = OpenOptions::new().write(true).open(&rec.active.path).map_err(|e| WalError::io(&rec.active.path, e))?;
        file.seek(SeekFrom::Start(rec.active_len)).map_err(|e| WalError::io(&rec.active.path, e))?;
        let w = WalWriter {
            dir: dir.to_path_buf(),
            opts,
            file,
            active: rec.active.clone(),
            written_len: rec.active_len,
            buf: Vec::with_capacity(1 << 20),
            next_position: rec.next_position,
            committed_position: rec.next_position - 1,
            last_recorded_at: rec.last_recorded_at,
            last_sync: None,
            poisoned: None,
            _lock: lock,
        };
        Ok((w, rec))
    }

    /// The position the next appended record will get.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// The highest durable position (0 for an empty log).
    pub fn committed_position(&self) -> u64 {
        self.committed_position
    }

    /// How long the last fdatasync took.
    pub fn last_sync_duration(&self) -> Option<std::time::Duration> {
        self.last_sync
    }

    /// A `recorded_at` for the next group: now, but never earlier than the
    /// previous one, so that transaction time is monotonic in position and
    /// "as of time T" is always a prefix of the log.
    pub fn next_recorded_at(&mut self) -> DateTime<Utc> {
        let now = Utc::now();
        let t = match self.last_recorded_at {
            Some(last) if last > now => last,
            _ => now,
        };
        self.last_recorded_at = Some(t);
        t
    }

    /// Buffers one atomic frame of `events` (all or none survive a crash)
    /// and returns the records with their assigned positions. Nothing is
    /// durable until [`commit`](Self::commit).
    pub fn append(&mut self, events: Vec<Event>, recorded_at: DateTime<Utc>) -> Result<Vec<LogRecord>, WalError> {
        self.check_poisoned()?;
        let first = self.next_position;
        let records: Vec<LogRecord> =
            events.into_iter().enumerate().map(|(i, event)| LogRecord { position: first + i as u64, recorded_at, event }).collect();
        if records.is_empty() {
            return Ok(records);
        }
        let mark = self.buf.len();
        frame::encode(&records, &mut self.buf)?;
        let frame_len = (self.buf.len() - mark) as u64;
        let seg_has_data = self.written_len + mark as u64 > segment::HEADER_LEN;
        if seg_has_data && self.written_len + self.buf.len() as u64 > self.opts.segment_bytes {
            // This frame would overflow the segment: make what is buffered
            // durable in the current segment, then start a new one.
            let frame_bytes = self.buf.split_off(mark);
            self.write_and_sync()?;
            self.roll(first)?;
            self.buf = frame_bytes;
            debug_assert_eq!(self.buf.len() as u64, frame_len);
        }
        self.next_position += records.len() as u64;
        Ok(records)
    }

    /// Writes every buffered frame and makes it durable (one fdatasync under
    /// [`SyncMode::Always`]). Returns the highest committed position.
    pub fn commit(&mut self) -> Result<u64, WalError> {
        self.write_and_sync()?;
        Ok(self.committed_position)
    }

    /// Why the writer stopped accepting work, if it did.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn check_poisoned(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(why) => Err(WalError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn write_and_sync(&mut self) -> Result<(), WalError> {
        self.check_poisoned()?;
        let r = self.write_and_sync_inner();
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
            tracing::error!(error = %e, "WAL write failed; refusing further writes until restart");
        }
        r
    }

    fn write_and_sync_inner(&mut self) -> Result<(), WalError> {
        if !self.buf.is_empty() {
            let path = &self.active.path;
            self.file.write_all(&self.buf).map_err(|e| WalError::io(path, e))?;
            self.written_len += self.buf.len() as u64;
            self.buf.clear();
            if self.opts.sync == SyncMode::Always {
                let t = Instant::now();
                self.file.sync_data().map_err(|e| WalError::io(path, e))?;
                self.last_sync = Some(t.elapsed());
            }
        }
        // Positions are assigned contiguously, so everything before the
        // first position still buffered is now durable.
        self.committed_position = self.next_position - 1;
        Ok(())
    }

    /// Seals the active segment and starts a new one at `first_position`.
    fn roll(&mut self, first_position: u64) -> Result<(), WalError> {
        let r = self.roll_inner(first_position);
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }

    fn roll_inner(&mut self, first_position: u64) -> Result<(), WalError> {
        let seg = recovery::create_segment(&self.dir, first_position)?;
        let mut file = OpenOptions::new().write(true).open(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| WalError::io(&seg.path, e))?;
        tracing::debug!(sealed = %self.active.path.display(), active = %seg.path.display(), "rolled WAL segment");
        self.file = file;
        self.active = seg;
        self.written_len = segment::HEADER_LEN;
        Ok(())
    }

    /// Seals the active segment now if it holds any record, so that it can
    /// be shipped; returns whether a roll happened. Commits first.
    pub fn seal_active(&mut self) -> Result<bool, WalError> {
        self.write_and_sync()?;
        if self.written_len <= segment::HEADER_LEN {
            return Ok(false);
        }
        self.roll(self.next_position)?;
        Ok(true)
    }
}
