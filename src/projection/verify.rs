//! Verifying a projection: replay the log into a temporary store and
//! compare it, row by row, with the live one.
//!
//! The live store's rows are digested from one consistent snapshot, whose
//! checkpoint tells exactly how far to replay the temporary store, so
//! verification works on a running server under writes. Only if the
//! digests differ is a second pass made to name the differing rows.

use std::sync::Arc;

use serde::Serialize;

use super::slot::{Slot, sibling};
use super::worker::{DEFAULT_BATCH, replay_into};
use super::{Projection, ProjectionError};

/// Most differing rows reported.
pub const MAX_DIFFERENCES: usize = 10;

/// The outcome of verifying one projection.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Which projection.
    pub projection: &'static str,
    /// The log position both stores reflect.
    pub position: u64,
    /// Whether every row is identical.
    pub equal: bool,
    /// BLAKE3 over the live store's rows.
    pub live_digest: String,
    /// BLAKE3 over the replayed store's rows.
    pub replayed_digest: String,
    /// Rows in the live store.
    pub rows: u64,
    /// Up to [`MAX_DIFFERENCES`] rows that differ (table number and key in hex).
    pub differences: Vec<String>,
}

struct Digest {
    hasher: blake3::Hasher,
    rows: u64,
}

impl Digest {
    fn new() -> Digest {
        Digest { hasher: blake3::Hasher::new(), rows: 0 }
    }

    fn add(&mut self, table: u8, key: &[u8], value: &[u8]) {
        self.hasher.update(&[table]);
        self.hasher.update(&(key.len() as u64).to_le_bytes());
        self.hasher.update(key);
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
        self.rows += 1;
    }
}

fn digest<T: Projection + ?Sized>(store: &T) -> Result<(u64, String, u64), ProjectionError> {
    let mut d = Digest::new();
    let position = store.visit_rows(&mut |t, k, v| {
        d.add(t, k, v);
        true
    })?;
    Ok((position, d.hasher.finalize().to_hex().to_string(), d.rows))
}

fn row_hash(table: u8, key: &[u8], value: &[u8]) -> [u8; 16] {
    let mut d = Digest::new();
    d.add(table, key, value);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.hasher.finalize().as_bytes()[..16]);
    out
}

/// Replays the log in `wal_dir` into a temporary store next to the live
/// one and compares them. The temporary store is deleted afterwards.
pub fn verify_slot<T: Projection>(slot: &Slot<T>, wal_dir: &std::path::Path) -> Result<Comparison, ProjectionError> {
    let name = slot.name();
    let live = slot.load();
    let temp_path = sibling(slot.live_path(), "verify");
    let _ = remove(&temp_path);
    let result = (|| {
        let (position, live_digest, rows) = digest(&*live)?;
        let temp = Arc::new(slot.open_at(&temp_path)?);
        replay_into(&*temp, wal_dir, position, DEFAULT_BATCH, |_| true)?;
        let (_, replayed_digest, _) = digest(&*temp)?;
        let equal = live_digest == replayed_digest;
        let differences = if equal { Vec::new() } else { differences(&*live, &*temp, wal_dir)? };
        Ok(Comparison { projection: name, position, equal, live_digest, replayed_digest, rows, differences })
    })();
    let _ = remove(&temp_path);
    result
}

/// Names up to [`MAX_DIFFERENCES`] differing rows: snapshots the live
/// store's row hashes, brings the replay to the same position, and walks
/// both in step.
fn differences<T: Projection>(live: &T, temp: &T, wal_dir: &std::path::Path) -> Result<Vec<String>, ProjectionError> {
    let mut hashes = Vec::new();
    let position = live.visit_rows(&mut |t, k, v| {
        hashes.push(row_hash(t, k, v));
        true
    })?;
    replay_into(temp, wal_dir, position, DEFAULT_BATCH, |_| true)?;
    let mut out = Vec::new();
    let mut i = 0usize;
    temp.visit_rows(&mut |t, k, v| {
        if hashes.get(i) != Some(&row_hash(t, k, v)) {
            out.push(format!("table {t} key {} (row {i})", hex::encode(&k[..k.len().min(64)])));
        }
        i += 1;
        out.len() < MAX_DIFFERENCES
    })?;
    if out.len() < MAX_DIFFERENCES && i < hashes.len() {
        out.push(format!("the live store has {} more rows after row {i}", hashes.len() - i));
    }
    Ok(out)
}

fn remove(path: &std::path::Path) -> std::io::Result<()> {
    if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
}
