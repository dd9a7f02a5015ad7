//! Segment files: naming, the fixed header, and listing a WAL directory.
//!
//! A segment is named after its first position (`00000000000000000001.wal`,
//! zero-padded so names sort like positions). The header repeats that
//! position and carries the format version, so a renamed or foreign file is
//! caught rather than trusted.

use std::fs;
use std::path::{Path, PathBuf};

use super::WalError;

/// Identifies a StemeDB WAL segment.
pub const MAGIC: [u8; 8] = *b"STEMEWAL";
/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header size in bytes: magic, version, first position, CRC32C.
pub const HEADER_LEN: u64 = 24;
/// Extension of sealed and active segments.
pub const EXT: &str = "wal";
/// Extension of a segment being created (never read; removed at recovery).
pub const TMP_EXT: &str = "wal.tmp";

/// The header at the start of every segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Position of the first record this segment holds (or will hold).
    pub first_position: u64,
}

impl Header {
    /// The 24 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut out = [0u8; HEADER_LEN as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..20].copy_from_slice(&self.first_position.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a header; the error string says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN as usize {
            return Err(format!("header is {} bytes, expected {HEADER_LEN}", b.len()));
        }
        if b[0..8] != MAGIC {
            return Err("bad magic: not a StemeDB WAL segment".into());
        }
        let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if crc != crc32c::crc32c(&b[0..20]) {
            return Err("header checksum mismatch".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != FORMAT_VERSION {
            return Err(format!("format version {version}; this build reads version {FORMAT_VERSION}"));
        }
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[12..20]);
        Ok(Header { first_position: u64::from_le_bytes(p) })
    }
}

/// The file name of the segment starting at `first_position`.
pub fn file_name(first_position: u64) -> String {
    format!("{first_position:020}.{EXT}")
}

/// A segment found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    /// First position, from the file name.
    pub first_position: u64,
    /// Full path.
    pub path: PathBuf,
}

/// Lists the segments of `dir`, sorted by first position. Files that are
/// not segments are ignored; names that look like segments but do not parse
/// are an error so that nothing is silently skipped.
pub fn list(dir: &Path) -> Result<Vec<SegmentFile>, WalError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| WalError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(&format!(".{EXT}")) else { continue };
        let well_formed = stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit());
        let first_position = stem.parse::<u64>().ok().filter(|_| well_formed).ok_or(()).map_err(|_| WalError::Corrupt {
            path: entry.path(),
            offset: 0,
            reason: "segment file name is not a zero-padded position".into(),
        })?;
        out.push(SegmentFile { first_position, path: entry.path() });
    }
    out.sort_by_key(|s| s.first_position);
    Ok(out)
}

/// Removes half-created segments left by a crash during a roll.
pub fn remove_temporaries(dir: &Path) -> Result<usize, WalError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let entry = entry.map_err(|e| WalError::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(&format!(".{TMP_EXT}"))) {
            fs::remove_file(entry.path()).map_err(|e| WalError::io(entry.path(), e))?;
            n += 1;
        }
    }
    Ok(n)
}

/// fsyncs a directory so that created, renamed or removed entries are durable.
pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| WalError::io(dir, e))
}
