//! The log in object storage: shipping, point-in-time restore, followers.
//!
//! The WAL is the database, so a copy of its sealed segments in an
//! S3-compatible store is the backup, the restore source and the
//! replication stream at once. Data flows one way:
//!
//! ```text
//! writer WAL ──shipper──▶ s3://bucket/prefix ──fetch──▶ restore (new data dir)
//!                                           └─follower─▶ read replica's WAL ─▶ projections
//! ```
//!
//! [`remote`] talks to the store, [`layout`] names the objects,
//! [`summary`] checks segment bytes, [`shipper`] uploads, [`fetch`]
//! downloads and cuts, and [`follower`] keeps a replica's log current.

pub mod fetch;
pub mod follower;
pub mod layout;
pub mod remote;
pub mod shipper;
pub mod summary;

pub use remote::{ArchiveError, Remote, RemoteOptions};
