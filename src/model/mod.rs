//! The event model: what an assertion is, how it is validated, how its id is
//! derived and how it is signed, and the events the log records.
//!
//! Nothing here does I/O. The HTTP layer parses client JSON into these types
//! through [`parse`], the write path turns them into [`event::Event`]s, and
//! the log stores those events. Keeping the model free of I/O lets the
//! property tests and the test vectors exercise it directly.

pub mod assertion;
pub mod canonical;
pub mod event;
pub mod id;
pub mod object;
pub mod parse;
pub mod signature;
pub mod time;

pub use assertion::{Assertion, Source, Tier};
pub use event::{Event, LogRecord, Retraction};
pub use id::AssertionId;
pub use object::Object;
pub use parse::{FieldError, parse_assertion};
