//! Frames: the unit of atomicity in a segment.
//!
//! ```text
//! frame   = len:u32le ‖ crc:u32le ‖ first_position:u64le ‖ count:u32le ‖ payload[len]
//! crc     = CRC32C(first_position ‖ count ‖ payload)
//! payload = msgpack (rmp-serde, named fields) of [LogRecord; count]
//! ```
//!
//! Positions and count sit in the header so that recovery and `wal verify`
//! check continuity without decoding payloads; the CRC covers them too.

use std::io::{self, Read};

use crate::model::LogRecord;

use super::WalError;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted; anything claiming more is corruption.
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// The fixed part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// CRC32C over positions, count and payload.
    pub crc: u32,
    /// Position of the first record.
    pub first_position: u64,
    /// Number of records (at least 1).
    pub count: u32,
}

impl FrameHeader {
    /// The position after the last record of this frame.
    pub fn next_position(&self) -> u64 {
        self.first_position + u64::from(self.count)
    }

    fn parse(b: &[u8; HEADER_LEN]) -> FrameHeader {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[8..16]);
        FrameHeader { len: u32_at(0), crc: u32_at(4), first_position: u64::from_le_bytes(p), count: u32_at(16) }
    }
}

/// Appends one frame holding `records` (consecutive positions) to `out`.
pub fn encode(records: &[LogRecord], out: &mut Vec<u8>) -> Result<(), WalError> {
    let first_position = records.first().map(|r| r.position).ok_or_else(|| WalError::Encode("empty frame".into()))?;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    rmp_serde::encode::write_named(out, records).map_err(|e| WalError::Encode(e.to_string()))?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(WalError::FrameTooLarge(len, MAX_PAYLOAD));
    }
    out[start + 8..start + 16].copy_from_slice(&first_position.to_le_bytes());
    out[start + 16..start + 20].copy_from_slice(&(records.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start + 8..start + 20]), &out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes a payload whose CRC has been checked.
pub fn decode_payload(payload: &[u8]) -> Result<Vec<LogRecord>, String> {
    rmp_serde::from_slice(payload).map_err(|e| format!("payload does not decode: {e}"))
}

/// One frame read from a segment.
#[derive(Debug)]
pub struct RawFrame {
    /// Byte offset of the frame in its segment.
    pub offset: u64,
    /// The checked header.
    pub header: FrameHeader,
    /// The checked payload (not yet decoded).
    pub payload: Vec<u8>,
}

/// Why scanning stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanStop {
    /// End of file exactly at a frame boundary.
    Clean,
    /// An incomplete or invalid frame at `offset`; `reason` says which.
    Bad {
        /// Byte offset where the bad frame starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Reads frames sequentially from a segment body, checking length, CRC and
/// count. It does not judge position continuity: callers know what to expect.
pub struct FrameScanner<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> FrameScanner<R> {
    /// Scans `inner`, whose first byte is at `offset` in the segment.
    pub fn new(inner: R, offset: u64) -> Self {
        FrameScanner { inner, offset }
    }

    /// Offset of the next unread byte (the end of the last good frame).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, or why there is none. I/O errors other than a short
    /// read are returned as `Err`.
    pub fn next_frame(&mut self) -> io::Result<Result<RawFrame, ScanStop>> {
        let mut hdr = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut hdr)?;
        if got == 0 {
            return Ok(Err(ScanStop::Clean));
        }
        let bad = |reason: String| Ok(Err(ScanStop::Bad { offset: self.offset, reason }));
        if got < HEADER_LEN {
            return bad(format!("torn frame header ({got} of {HEADER_LEN} bytes)"));
        }
        let header = FrameHeader::parse(&hdr);
        if header.len == 0 || header.count == 0 {
            return bad("empty frame (zeroed bytes)".into());
        }
        if header.len as usize > MAX_PAYLOAD {
            return bad(format!("frame length {} exceeds the {MAX_PAYLOAD}-byte limit", header.len));
        }
        let mut payload = vec![0u8; header.len as usize];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < payload.len() {
            return bad(format!("torn frame payload ({got} of {} bytes)", header.len));
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&hdr[8..20]), &payload);
        if crc != header.crc {
            return bad("frame checksum mismatch".into());
        }
        let frame = RawFrame { offset: self.offset, header, payload };
        self.offset += (HEADER_LEN + header.len as usize) as u64;
        Ok(Ok(frame))
    }
}

/// Like `read_exact`, but returns how many bytes were read before EOF.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
