//! Lenses: pure functions that resolve the live claims of one
//! `(subject, predicate)` into an answer.
//!
//! Nothing here does I/O. The `lenses` projection calls [`resolve`](fn@resolve) to
//! materialize answers as events arrive; the read path calls it again for
//! `as_of` and `decay` queries over entries it rebuilt from the KV view.
//! One implementation serves both, so materialized and on-demand answers
//! cannot drift apart.

pub mod definitions;
pub mod entry;
pub mod resolve;

pub use definitions::Definitions;
pub use entry::{Entry, LiveSet, Recorded};
pub use resolve::{Claim, Conflict, Lens, Resolution, Weighting, Winner, resolve};
