//! Typed WAL errors that always say where (file and byte offset), because an
//! operator facing a corrupt log needs to know exactly which bytes to look at.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An operating-system error on a file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bytes that are not what the format says, where they cannot be a torn tail.
    #[error("corrupt WAL segment {path} at byte offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad frame or header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Positions that are not contiguous across or within segments.
    #[error("gap in WAL positions at {path} offset {offset}: expected position {expected}, found {found}")]
    Gap {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the frame or header.
        offset: u64,
        /// The position that should come next.
        expected: u64,
        /// The position found.
        found: u64,
    },
    /// A position was asked for that the log does not (yet) hold.
    #[error("position {0} is not in the log")]
    NoSuchPosition(u64),
    /// A frame larger than the format allows was requested.
    #[error("a group of events encodes to {0} bytes, more than the {1}-byte frame limit")]
    FrameTooLarge(usize, usize),
    /// Another process holds the directory.
    #[error("the directory is in use by another process (lock {0} is held); stop the running server first")]
    Locked(PathBuf),
    /// An earlier write or fsync failed; the writer needs a restart.
    #[error("the WAL writer stopped after an earlier failure ({0}); restart the server to run recovery")]
    Poisoned(String),
    /// Encoding a record failed (never expected).
    #[error("cannot encode a WAL record: {0}")]
    Encode(String),
}

impl WalError {
    /// Wraps an `io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WalError::Io { path: path.into(), source }
    }
}
