//! The read side: projections that tail the log and build queryable state.
//!
//! A projection is a deterministic function of the log. Each one owns its
//! store under the DB directory and keeps its **checkpoint** (last applied
//! position) in the same transaction as its data, so a crash can neither
//! apply an event twice nor skip one. [`worker`] runs one thread per
//! projection: catch up from the checkpoint, then follow the committed
//! position broadcast, applying events in batches. kv and lenses stage
//! each batch in memory, where readers see it at once, and `staged`'s
//! committer thread writes it with the checkpoint behind them.
//!
//! Projections know the log and the model, never HTTP. Stores:
//! [`kv`] (assertions by id, by subject/predicate/agent, history) and
//! [`lenses`] (live sets and materialized lens answers per pair) and
//! [`search`] (tantivy: text and attribute search, committed on a cadence).

pub(crate) mod chunked;
pub mod kv;
pub mod lenses;
pub mod read_side;
pub mod rebuild;
pub mod search;
pub mod slot;
pub(crate) mod staged;
pub mod verify;
pub mod worker;

use crate::model::LogRecord;

/// A storage error in a projection (redb, encoding or I/O).
#[derive(Debug, thiserror::Error)]
#[error("projection {projection}: {message}")]
pub struct ProjectionError {
    /// Which projection.
    pub projection: &'static str,
    /// What failed.
    pub message: String,
}

/// Page cache of each projection store in the offline tools unless
/// `STEMEDB_STORE_CACHE_MB` says otherwise. An offline rebuild only
/// appends, so a cache beyond the few pages it rereads only holds written
/// pages back until the load's last, durable commit writes them, alone at
/// the end; in a virtual machine every fresh page of it also costs a fault
/// and a zeroing. 64 MiB rebuilt kv + lenses about 6% faster than 256 MiB,
/// in half the memory (`docs/performance.md`). `serve` sets its own, larger,
/// cache with [`tune_stores`]: reads are fastest when the stores fit.
pub const STORE_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// How often a live store's commit is made durable (fsynced) unless
/// `serve` says otherwise (`STEMEDB_PROJECTION_SYNC_INTERVAL`). The commit
/// that syncs writes every page the commits since the last one copied; it
/// runs on the store's committer thread (see `staged`), so readers never
/// wait for it; its fsync shares the disk with the WAL's, which every
/// acknowledgement waits for, so fewer is better (at 2,000 writes/s,
/// 1 s gave a lower write → visible p99 than 100 ms). The interval bounds
/// what a crash makes the worker re-apply.
pub const DEFAULT_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How this process's projection stores trade memory and fsyncs for
/// read and write latency. One setting per process: `serve` sets it from
/// its options before it opens a store; the offline tools keep the
/// defaults, which bound their memory.
#[derive(Clone, Copy, Debug)]
pub struct StoreTuning {
    /// Page cache of each store (redb's cache; up to half of it buffers
    /// pages until the next durable commit).
    pub cache_bytes: usize,
    /// Longest time between two durable commits of a live store.
    pub sync_interval: std::time::Duration,
}

static TUNING: std::sync::OnceLock<StoreTuning> = std::sync::OnceLock::new();

/// Sets the tuning of every store this process opens from now on; the
/// first call (or the first store opened) wins, so call it before opening
/// any.
pub fn tune_stores(tuning: StoreTuning) {
    let _ = TUNING.set(StoreTuning { cache_bytes: tuning.cache_bytes.max(1024 * 1024), ..tuning });
}

/// The tuning: what [`tune_stores`] set, else a cache of
/// `STEMEDB_STORE_CACHE_MB` mebibytes (default [`STORE_CACHE_BYTES`]) and
/// [`DEFAULT_SYNC_INTERVAL`].
pub fn store_tuning() -> StoreTuning {
    *TUNING.get_or_init(|| StoreTuning {
        cache_bytes: env_mib("STEMEDB_STORE_CACHE_MB", STORE_CACHE_BYTES),
        sync_interval: DEFAULT_SYNC_INTERVAL,
    })
}

/// Memory a bulk load may hold in rows it sorts, per store, before it
/// spills a sorted run to disk, unless `STEMEDB_REBUILD_BUFFER_MB` says
/// otherwise. A rebuild of kv + lenses holds about this much per store
/// plus the redb caches, so it stays far under 1 GiB whatever the log's
/// size; more memory only means fewer runs to merge.
pub const BULK_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// [`BULK_BUFFER_BYTES`], or `STEMEDB_REBUILD_BUFFER_MB` mebibytes.
pub fn bulk_buffer_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| env_mib("STEMEDB_REBUILD_BUFFER_MB", BULK_BUFFER_BYTES))
}

/// A size in MiB from the environment variable `name`, or `default` bytes.
/// Read deep inside stores, so a bad value cannot stop the start; it is
/// said loudly and ignored instead.
fn env_mib(name: &str, default: usize) -> usize {
    let Ok(v) = std::env::var(name) else { return default };
    match v.trim().parse::<usize>() {
        Ok(mb) if mb > 0 => mb.saturating_mul(1024 * 1024),
        _ => {
            tracing::warn!(value = %v, "{name} is not a positive whole number of MiB; using the default {}", default / (1024 * 1024));
            default
        }
    }
}

/// A rough count of the heap bytes an assertion and its copies take while
/// a bulk load holds it (for [`BULK_BUFFER_BYTES`]; not exact).
pub(crate) fn approx_bytes(a: &crate::model::Assertion) -> usize {
    let object = match &a.object {
        crate::model::Object::Text(t) | crate::model::Object::Entity(t) => t.len(),
        _ => 0,
    };
    let source = a.source.as_ref().map(|s| s.uri.len() + s.hash.as_ref().map_or(0, |h| h.len()) + 64).unwrap_or(0);
    256 + a.subject.len()
        + a.predicate.len()
        + a.agent.len()
        + object
        + source
        + a.signature.as_ref().map_or(0, |s| s.len())
        + 32 * a.supersedes.len()
}

/// Applies the log to a fresh store that nobody reads yet (an offline or
/// shadow rebuild). A store's `apply` writes every batch's rows (in place,
/// several batches per commit at most), because readers see each batch;
/// a bulk load instead
/// sorts the whole log's rows (an external sort within
/// [`BULK_BUFFER_BYTES`] of memory) and appends every table in key order
/// in one transaction, which is what makes a rebuild fast. The rows
/// written are the same as `apply`'s, so readers and verification cannot
/// tell how a store was built.
pub trait BulkLoad: Send {
    /// Applies the next records (consecutive, right after the previous ones).
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError>;

    /// [`push`](Self::push) of `batch[skip..]`, a batch the log reader
    /// shares between the loads of one replay: a load that hands part of
    /// its work to a thread of its own can keep the batch without copying.
    fn push_shared(&mut self, batch: &std::sync::Arc<Vec<LogRecord>>, skip: usize) -> Result<(), ProjectionError> {
        self.push(batch.get(skip..).unwrap_or_default())
    }

    /// Writes everything held with the checkpoint, durably; returns the
    /// checkpoint. Until this returns, a crash may lose any part of the
    /// load (the store is a shadow, which is deleted at the next start).
    fn finish(self: Box<Self>) -> Result<u64, ProjectionError>;
}

/// Receives every row of a store during verification: table number, key
/// bytes, value bytes; returns false to stop.
pub type RowVisitor<'a> = dyn FnMut(u8, &[u8], &[u8]) -> bool + 'a;

/// What the worker needs from a projection store.
pub trait Projection: Send + Sync + 'static {
    /// Stable name: metric label, file name, API name.
    fn name(&self) -> &'static str;

    /// The last position whose effects are visible to readers and will
    /// survive a restart's catch-up (0 when empty).
    fn checkpoint(&self) -> Result<u64, ProjectionError>;

    /// Applies `records` (consecutive, starting right after the last
    /// applied one) and returns the position now visible to readers. kv
    /// and lenses stage them (visible at once, written behind) and return
    /// the last position; a store that commits on a cadence (search) may
    /// return an older one.
    fn apply(&self, records: &[LogRecord]) -> Result<u64, ProjectionError>;

    /// Makes everything applied so far visible and durable; returns the
    /// visible position. Called when the worker goes idle, at a rebuild's
    /// hand-over and at shutdown.
    fn flush(&self) -> Result<u64, ProjectionError>;

    /// Finishes, before a rebuilt store is installed, the work it would
    /// otherwise leave to the background once serving: the search index
    /// merges the segments its bulk load left (closing the writer would
    /// cancel those merges, and searches ran at half speed until the
    /// server redid them). A rebuild calls it after its bulk load, before
    /// catching up with the writes of the meantime and handing over.
    fn settle(&self) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// A bulk loader for this store, if it has one (see [`BulkLoad`]); the
    /// caller guarantees nobody reads the store until `finish` returns.
    /// Stores without one are rebuilt through [`apply`](Self::apply).
    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        Ok(None)
    }

    /// If set, the worker calls [`flush`](Self::flush) after this long
    /// without new events, so deferred commits become visible.
    fn idle_flush(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the worker runs at background CPU priority
    /// ([`crate::priority`]). True for a store whose readers wait for its
    /// commits on a cadence anyway (search), so that its indexing yields
    /// the cores to writes and to the stores readers see at once.
    fn background(&self) -> bool {
        false
    }

    /// Visits every stored row, table by table in a fixed order and keys
    /// in order, from one consistent snapshot; returns that snapshot's
    /// checkpoint. Verification compares two stores through this, so two
    /// stores built from the same log must visit identical rows.
    fn visit_rows(&self, visit: &mut RowVisitor<'_>) -> Result<u64, ProjectionError> {
        let _ = visit;
        Err(ProjectionError { projection: self.name(), message: "this projection does not support verification".into() })
    }
}

/// Visits every row of one redb table for [`Projection::visit_rows`];
/// returns false if the visitor asked to stop.
pub(crate) fn visit_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    def: redb::TableDefinition<K, V>,
    table: u8,
    visit: &mut RowVisitor<'_>,
) -> Result<bool, String> {
    use redb::ReadableTable;
    let t = tx.open_table(def).map_err(|e| e.to_string())?;
    for row in t.iter().map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        let (kv, vv) = (k.value(), v.value());
        if !visit(table, K::as_bytes(&kv).as_ref(), V::as_bytes(&vv).as_ref()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The key of a `(subject, predicate)` pair in projection tables:
/// `subject ‖ 0x00 ‖ predicate`. Subjects cannot contain control
/// characters, so the separator is unambiguous and all predicates of one
/// subject are contiguous.
pub fn pair_key(subject: &str, predicate: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(subject.len() + predicate.len() + 1);
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k.extend_from_slice(predicate.as_bytes());
    k
}

/// Splits a [`pair_key`] back into subject and predicate.
pub fn split_pair_key(k: &[u8]) -> Option<(&str, &str)> {
    let i = k.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&k[..i]).ok()?, std::str::from_utf8(&k[i + 1..]).ok()?))
}

/// A durable, empty commit: makes every earlier non-durable redb commit
/// durable (redb persists them only with the next durable one).
pub(crate) fn flush_redb(db: &redb::Database, err: fn(String) -> ProjectionError) -> Result<(), ProjectionError> {
    let mut tx = db.begin_write().map_err(|x| err(x.to_string()))?;
    tx.set_durability(redb::Durability::Immediate).map_err(|x| err(x.to_string()))?;
    tx.commit().map_err(|x| err(x.to_string()))
}

/// Checks that a batch starting at `first` continues the pending bulk-load
/// work that ended at `last` (or records it as the start), so buffered rows
/// never skip or repeat an event.
pub fn check_continues(started: &mut Option<u64>, last: u64, first: u64) -> Result<(), String> {
    match started {
        Some(_) if first != last + 1 => Err(format!("batch starts at {first} but the previous one ended at {last}")),
        Some(_) => Ok(()),
        None => {
            *started = Some(first);
            Ok(())
        }
    }
}
