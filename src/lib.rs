//! StemeDB: a database for knowledge that AI agents disagree about.
//!
//! The path of an assertion through the crate, in order:
//!
//! - [`http`] — axum routes; reads and validates requests, shapes answers,
//!   turns every error into RFC 9457 problem details.
//! - [`model`] — the event model: assertions, their canonical encoding and
//!   BLAKE3 ids, ed25519 signatures, and the events the log records.
//! - [`ingest`] — the write path: idempotency and write-time checks against
//!   the id index, and group commit.
//! - [`wal`] — the write-ahead log, the source of truth: segments, frames,
//!   recovery, readers and verification. It knows nothing above it.
//!
//! Around them: [`config`] (flags and environment), [`telemetry`] (logs and
//! metrics), [`priority`] (the search index yields the CPU), [`cli`]
//! (subcommands), [`bench`](mod@bench) (load tools) and `sort` (the external
//! merge sort with which rebuilds build stores by appends).

pub mod archive;
pub mod bench;
pub mod cli;
pub mod config;
pub mod http;
pub mod ingest;
pub mod lens;
pub mod model;
pub mod priority;
pub mod projection;
pub(crate) mod sort;
pub mod telemetry;
pub mod wal;
