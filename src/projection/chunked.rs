//! A bulk load's writes, cut into transactions that fit redb's write buffer.
//!
//! redb keeps a transaction's dirty pages in a write buffer of half its
//! cache. Pages beyond that are written to the file at once, and the
//! commit reads every one of them back to compute its checksum: a load
//! that wrote a gigabyte in one transaction wrote it, read it back and
//! wrote it again (two thirds of the kv rebuild's redb time, profiled).
//! Committing (non-durably) before the buffer fills checksums the pages
//! while they are still in memory; appends only copy the right edge of
//! each tree again, so the extra commits cost almost nothing. Only the
//! last commit is durable and carries the checkpoint: until then the
//! store is a shadow that nobody reads, and a crash discards it.

use redb::{Database, Durability, WriteTransaction};

/// Most bytes written into one transaction before it is committed: a
/// quarter of the write buffer (half the cache) of a store with a 256 MiB
/// cache, which serves an online rebuild well. Stores with a smaller cache
/// commit sooner: see [`commit_bytes`].
pub(crate) const COMMIT_BYTES: usize = 32 * 1024 * 1024;

/// Bytes written into one transaction before it is committed: a quarter of
/// the write buffer of this process's stores (so even a large row cannot
/// push a transaction over it), at most [`COMMIT_BYTES`].
///
/// The buffer also holds the pages of the non-durable commits until the
/// load's last, durable commit writes them all, with every other thread of
/// the load finished; a smaller cache (the offline tools') keeps that tail
/// short and the load's memory low.
pub(crate) fn commit_bytes() -> usize {
    (super::store_tuning().cache_bytes / 8).clamp(1024 * 1024, COMMIT_BYTES)
}

/// The current transaction of a bulk load and what it has written so far.
pub(crate) struct Chunked<'db> {
    db: &'db Database,
    tx: WriteTransaction,
    written: usize,
    limit: usize,
}

impl<'db> Chunked<'db> {
    /// Starts the first transaction on `db`; each one is committed once
    /// about `limit` bytes (at most [`commit_bytes`]) are written into it.
    /// A store's sort budget is its limit too when smaller, so the tests'
    /// tiny budgets exercise many transactions.
    pub(crate) fn begin(db: &'db Database, limit: usize) -> Result<Chunked<'db>, redb::Error> {
        Ok(Chunked { db, tx: begin(db)?, written: 0, limit: limit.clamp(1, commit_bytes()) })
    }

    /// The transaction to write into. Tables opened on it must be closed
    /// before the transaction is rotated or committed.
    pub(crate) fn tx(&self) -> &WriteTransaction {
        &self.tx
    }

    /// Counts `bytes` written.
    pub(crate) fn wrote(&mut self, bytes: usize) {
        self.written += bytes;
    }

    /// Whether the transaction has reached its size.
    pub(crate) fn full(&self) -> bool {
        self.written >= self.limit
    }

    /// Commits the current transaction without syncing and starts the next.
    pub(crate) fn rotate(self) -> Result<Chunked<'db>, redb::Error> {
        let Chunked { db, tx, limit, .. } = self;
        tx.commit()?;
        Chunked::begin(db, limit)
    }

    /// Calls `fill` with the current transaction and the bytes it may write
    /// into it, rotating after every call that says more is left (`true`);
    /// gives back the last transaction, still open. `fill` closes the
    /// tables it opens before returning.
    pub(crate) fn fill<E>(
        mut self,
        mut fill: impl FnMut(&WriteTransaction, usize) -> Result<bool, E>,
        err: impl Fn(redb::Error) -> E,
    ) -> Result<Chunked<'db>, E> {
        while fill(&self.tx, self.limit)? {
            self = self.rotate().map_err(&err)?;
        }
        Ok(self)
    }

    /// [`rotate`](Self::rotate)s if the transaction is [`full`](Self::full).
    pub(crate) fn rotate_if_full(self) -> Result<Chunked<'db>, redb::Error> {
        if self.full() { self.rotate() } else { Ok(self) }
    }

    /// Commits the last transaction durably, which makes every earlier one
    /// durable too.
    pub(crate) fn commit(self) -> Result<(), redb::Error> {
        let mut tx = self.tx;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
    }
}

fn begin(db: &Database) -> Result<WriteTransaction, redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None)?;
    Ok(tx)
}
