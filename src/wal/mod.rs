//! The write-ahead log: the source of truth.
//!
//! A directory of append-only segment files. Each segment starts with a
//! [`segment::Header`] and holds [`frame`]s; a frame is one atomic group of
//! [`LogRecord`](crate::model::LogRecord)s (one request's events) with a
//! length, its positions and a CRC32C. Because a frame is all-or-nothing, a
//! batch of 10,000 assertions is atomic across crashes.
//!
//! Layering: this module knows events and bytes, nothing of HTTP,
//! deduplication or projections. [`writer::WalWriter`] appends and syncs,
//! [`recovery`] makes a directory consistent at start, [`reader::WalReader`]
//! iterates from any position, and [`verify`] checks everything offline.

pub mod error;
pub mod frame;
pub mod lock;
pub mod reader;
pub mod recovery;
pub mod segment;
pub mod verify;
pub mod writer;

pub use error::WalError;
pub use reader::WalReader;
pub use writer::{SyncMode, WalWriter, WriterOptions};
