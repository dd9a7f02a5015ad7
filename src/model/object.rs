//! The object of an assertion: a typed value.
//!
//! Lenses group claims by value, so two objects are "the same claim" exactly
//! when their canonical encodings ([`Object::canonical_bytes`]) are equal.
//! That is why `number` normalizes `-0.0` to `0.0` and `time` is normalized to
//! UTC: equal meaning, equal bytes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A typed object value, as `{"type": T, "value": V}` on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum Object {
    /// Free text, at most [`MAX_TEXT_BYTES`] bytes of UTF-8.
    Text(String),
    /// A finite IEEE 754 double.
    Number(f64),
    /// A signed 64-bit integer.
    Integer(i64),
    /// True or false.
    Boolean(bool),
    /// The id of another entity (same rules as a subject).
    Entity(String),
    /// An instant, normalized to UTC.
    Time(#[serde(with = "super::time::serde_normal")] DateTime<Utc>),
}

/// Largest `text` value accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

impl Object {
    /// The type name used on the wire and in the canonical encoding.
    pub fn type_name(&self) -> &'static str {
        match self {
            Object::Text(_) => "text",
            Object::Number(_) => "number",
            Object::Integer(_) => "integer",
            Object::Boolean(_) => "boolean",
            Object::Entity(_) => "entity",
            Object::Time(_) => "time",
        }
    }

    /// The canonical bytes of the value alone (see docs/wire-format.md).
    pub fn value_bytes(&self) -> Vec<u8> {
        match self {
            Object::Text(s) | Object::Entity(s) => s.as_bytes().to_vec(),
            Object::Number(n) => {
                let n = if *n == 0.0 { 0.0 } else { *n };
                n.to_be_bytes().to_vec()
            }
            Object::Integer(i) => i.to_be_bytes().to_vec(),
            Object::Boolean(b) => vec![u8::from(*b)],
            Object::Time(t) => super::time::format(t).into_bytes(),
        }
    }

    /// Type and value, the key lenses group claims by.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        super::canonical::push_field(&mut out, super::canonical::tag::OBJECT_TYPE, self.type_name().as_bytes());
        super::canonical::push_field(&mut out, super::canonical::tag::OBJECT_VALUE, &self.value_bytes());
        out
    }
}
