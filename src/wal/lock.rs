//! The WAL directory lock: one writer per log, enforced by the OS.
//!
//! A second `stemedb serve` on the same directory must fail *before*
//! recovery, since recovery may truncate a tail that the running server is
//! in the middle of writing. The lock is an advisory exclusive `flock` on
//! `<wal>/LOCK`, released by the kernel when the process dies, so a
//! `kill -9` never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::WalError;

/// Name of the lock file inside the WAL directory.
pub const LOCK_FILE: &str = "LOCK";

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` or fails with a message naming the holder's
    /// directory.
    pub fn acquire(dir: &Path) -> Result<DirLock, WalError> {
        std::fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let file =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(|e| WalError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file, path }),
            Err(std::fs::TryLockError::WouldBlock) => Err(WalError::Locked(path)),
            Err(std::fs::TryLockError::Error(e)) => Err(WalError::io(&path, e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
