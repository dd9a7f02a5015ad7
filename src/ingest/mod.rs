//! The write path, after validation and before the log: idempotency,
//! write-time checks, and group commit.
//!
//! HTTP handlers hand validated items to an [`Ingest`] handle; one committer
//! thread ([`committer`]) owns the [`WalWriter`](crate::wal::WalWriter) and
//! the [`id_index`], so every duplicate check, supersession check and
//! position assignment happens in one order, the log's order. Acknowledgement
//! waits for the group's fdatasync.

pub mod committer;
pub mod id_index;
pub mod unindexed;

pub use committer::{Committed, Ingest, IngestError, IngestOptions, Item, ItemError, Outcome};
