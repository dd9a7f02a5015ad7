//! Events: what the log records.
//!
//! The log stores facts that happened, never rows to update. Each committed
//! event becomes a [`LogRecord`] with a gap-free position and the server's
//! `recorded_at`. Retraction is part of the format from the first version so
//! that old logs never need rewriting. `Event` is externally tagged because
//! internally tagged enums make serde buffer content, which loses msgpack's
//! binary-vs-text distinction.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Assertion, AssertionId};

/// A request to withdraw an assertion, by its own agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retraction {
    /// The assertion withdrawn.
    pub id: AssertionId,
    /// Who retracts (must be the assertion's agent).
    pub agent: String,
    /// Why, for humans.
    #[serde(default)]
    pub reason: String,
    /// Optional ed25519 signature, as for assertions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// One event of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A new assertion; `id` is `assertion.id()`, stored so readers need not rehash.
    AssertionRecorded {
        /// The content id.
        id: AssertionId,
        /// The assertion as submitted.
        assertion: Assertion,
    },
    /// An assertion withdrawn by its agent.
    AssertionRetracted(Retraction),
}

/// An event with its place in the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Global, gap-free, starting at 1.
    pub position: u64,
    /// Server time at append (UTC).
    #[serde(with = "super::time::serde_normal")]
    pub recorded_at: DateTime<Utc>,
    /// What happened.
    pub event: Event,
}
