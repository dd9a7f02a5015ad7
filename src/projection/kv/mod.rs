//! The `kv` projection (redb): every assertion by id with its retraction
//! and supersession state, plus secondary indexes for listing by subject,
//! predicate, agent, pair and log order.
//!
//! Secondary index keys are `prefix ‖ 0x00 ‖ position (u64 big-endian)`, so
//! a range scan returns one prefix's events in log order and a cursor is
//! just a position.

mod apply;
mod build;
mod query;
mod snapshot;

pub use query::{EventKind, HistoryEvent, ListFilter, StoredView};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use super::ProjectionError;
use crate::model::{Assertion, AssertionId};

pub(crate) const NAME: &str = "kv";

// Records are keyed by position, not id: positions arrive in order, so
// inserts append at the right edge of the B-tree instead of copying a
// random page per insert (which profiled as the dominant apply cost).

/// assertion position → msgpack [`StoredAssertion`].
pub(crate) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// id → assertion position.
pub(crate) const IDS: TableDefinition<&[u8], u64> = TableDefinition::new("ids");
/// position → (id, kind, recorded_at as ns since epoch), for every event.
pub(crate) const LOG: TableDefinition<u64, (&[u8], u8, i64)> = TableDefinition::new("log");
/// pair ‖ 0 ‖ position → (kind, assertion position): assertions and
/// retractions of a pair.
pub(crate) const BY_PAIR: TableDefinition<&[u8], (u8, u64)> = TableDefinition::new("by_pair");
/// subject ‖ 0 ‖ position → ().
pub(crate) const BY_SUBJECT: TableDefinition<&[u8], ()> = TableDefinition::new("by_subject");
/// predicate ‖ 0 ‖ position → ().
pub(crate) const BY_PREDICATE: TableDefinition<&[u8], ()> = TableDefinition::new("by_predicate");
/// agent ‖ 0 ‖ position → ().
pub(crate) const BY_AGENT: TableDefinition<&[u8], ()> = TableDefinition::new("by_agent");
/// "checkpoint" → last applied position.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(crate) const KIND_ASSERTED: u8 = 1;
pub(crate) const KIND_RETRACTED: u8 = 2;

/// A retraction as the KV view keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRetraction {
    /// Log position of the retraction.
    pub position: u64,
    /// When it was recorded.
    #[serde(with = "crate::model::time::serde_normal")]
    pub recorded_at: DateTime<Utc>,
    /// Who retracted.
    pub agent: String,
    /// Why.
    pub reason: String,
    /// Its signature, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// An assertion with its current state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredAssertion {
    /// Log position.
    pub position: u64,
    /// When it was recorded.
    #[serde(with = "crate::model::time::serde_normal")]
    pub recorded_at: DateTime<Utc>,
    /// As submitted.
    pub assertion: Assertion,
    /// The first retraction, if retracted.
    pub retraction: Option<StoredRetraction>,
    /// Later assertions that supersede it, in log order.
    pub superseded_by: Vec<AssertionId>,
}

/// The KV store; shared by its worker (writes) and the HTTP readers.
pub struct KvStore {
    pub(crate) db: Arc<Database>,
    /// The store's file, beside which a bulk load spills its sort runs.
    pub(crate) path: PathBuf,
    /// Memory a bulk load may hold before it spills a sorted run.
    pub(crate) sort_budget: usize,
    /// Batches applied but not yet written, which readers see; written by
    /// its committer thread (see [`staged`](super::staged)).
    pub(crate) staged: super::staged::Staged<apply::Chunk>,
}

impl KvStore {
    /// Opens or creates the store file at `path` (normally `<db>/kv.redb`).
    pub fn open(path: &Path) -> Result<KvStore, ProjectionError> {
        let db = redb::Builder::new().set_cache_size(super::store_tuning().cache_bytes).create(path).map_err(kerr)?;
        let tx = db.begin_write().map_err(kerr)?;
        {
            tx.open_table(RECORDS).map_err(kerr)?;
            tx.open_table(IDS).map_err(kerr)?;
            tx.open_table(LOG).map_err(kerr)?;
            tx.open_table(BY_PAIR).map_err(kerr)?;
            tx.open_table(BY_SUBJECT).map_err(kerr)?;
            tx.open_table(BY_PREDICATE).map_err(kerr)?;
            tx.open_table(BY_AGENT).map_err(kerr)?;
            tx.open_table(META).map_err(kerr)?;
        }
        tx.commit().map_err(kerr)?;
        let db = Arc::new(db);
        let staged = super::staged::start_redb(NAME, &db, apply::write_chunks, kerr)?;
        Ok(KvStore { db, path: path.to_path_buf(), sort_budget: super::bulk_buffer_bytes(), staged })
    }

    /// Sets the memory a bulk load of this store may hold before it
    /// spills a sorted run to disk (default `STEMEDB_REBUILD_BUFFER_MB`):
    /// less memory means more runs to merge and, below 32 MiB, smaller
    /// transactions (see `projection::chunked`), never a
    /// different result.
    pub fn with_sort_budget(mut self, bytes: usize) -> Self {
        self.sort_budget = bytes.max(1);
        self
    }

    /// Pauses (true) or resumes (false) writing staged batches to the
    /// store file, after the write in progress. Readers keep seeing every
    /// applied batch either way: tests use it to check reads that merge
    /// staged batches with the store, and an operator never needs it.
    #[doc(hidden)]
    pub fn hold_commits(&self, held: bool) {
        self.staged.hold(held);
    }
}

/// `prefix ‖ 0x00 ‖ position_be`.
pub(crate) fn index_key(prefix: &[u8], position: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 9);
    k.extend_from_slice(prefix);
    k.push(0);
    k.extend_from_slice(&position.to_be_bytes());
    k
}

pub(crate) fn ns(t: &DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Maps any storage error to a [`ProjectionError`] naming this projection.
pub(crate) fn kerr<E: std::fmt::Display>(x: E) -> ProjectionError {
    ProjectionError { projection: NAME, message: x.to_string() }
}
