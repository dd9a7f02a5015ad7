//! Turning client JSON into a valid [`Assertion`], or a list of precise
//! field errors.
//!
//! Parsing is done by hand from a `serde_json::Value` rather than with
//! `#[derive(Deserialize)]` so that every problem is reported with the field
//! it concerns and a reason a person can act on, and so that all problems of
//! one item are reported at once (a batch reports them per item).

use serde::Serialize;
use serde_json::{Map, Value};

use super::object::MAX_TEXT_BYTES;
use super::signature::{self, SignatureError};
use super::{Assertion, AssertionId, Object, Source, Tier};

/// Longest subject (and entity value), in bytes.
pub const MAX_SUBJECT_BYTES: usize = 512;
/// Longest predicate, in bytes.
pub const MAX_PREDICATE_BYTES: usize = 256;
/// Longest agent, in bytes.
pub const MAX_AGENT_BYTES: usize = 256;
/// Longest source URI, in bytes.
pub const MAX_URI_BYTES: usize = 2048;
/// Most ids one assertion may supersede.
pub const MAX_SUPERSEDES: usize = 256;

const FIELDS: &[&str] = &["subject", "predicate", "object", "confidence", "agent", "signature", "source", "valid_time", "supersedes"];

/// One problem with one field of the input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `source.tier`; empty for the whole item.
    pub field: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { field: field.into(), reason: reason.into() }
    }
}

/// Server policy that affects validation.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParseOptions {
    /// Reject unsigned assertions and agents that are not public keys.
    pub require_signatures: bool,
}

/// Validates one assertion. On success the id has been computed and any
/// signature verified.
pub fn parse_assertion(v: &Value, opts: ParseOptions) -> Result<(AssertionId, Assertion), Vec<FieldError>> {
    let Some(map) = v.as_object() else {
        return Err(vec![FieldError::new("", "an assertion is a JSON object")]);
    };
    let mut errs = Vec::new();
    for key in map.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errs.push(FieldError::new(key.clone(), format!("unknown field; allowed fields are {}", FIELDS.join(", "))));
        }
    }
    let subject = required_name(map, "subject", MAX_SUBJECT_BYTES, &mut errs);
    let predicate = required_name(map, "predicate", MAX_PREDICATE_BYTES, &mut errs);
    let agent = required_name(map, "agent", MAX_AGENT_BYTES, &mut errs);
    let object = match present(map, "object") {
        None => {
            errs.push(FieldError::new("object", "required: {\"type\": T, \"value\": V}"));
            None
        }
        Some(o) => parse_object(o, &mut errs),
    };
    let confidence = present(map, "confidence").and_then(|c| match c.as_f64() {
        Some(x) if (0.0..=1.0).contains(&x) => Some(x),
        _ => {
            errs.push(FieldError::new("confidence", "must be a number from 0 to 1"));
            None
        }
    });
    let signature = present(map, "signature").and_then(|s| match s.as_str() {
        Some(s) if s.len() == 128 && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s.to_ascii_lowercase()),
        _ => {
            errs.push(FieldError::new("signature", SignatureError::Malformed.to_string()));
            None
        }
    });
    let source = present(map, "source").and_then(|s| parse_source(s, &mut errs));
    let valid_time = present(map, "valid_time").and_then(|t| match t.as_str().map(super::time::parse) {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            errs.push(FieldError::new("valid_time", e));
            None
        }
        None => {
            errs.push(FieldError::new("valid_time", "must be an RFC 3339 string"));
            None
        }
    });
    let supersedes = present(map, "supersedes").map(|s| parse_supersedes(s, &mut errs)).unwrap_or_default();

    if opts.require_signatures {
        if let Some(a) = &agent
            && signature::agent_key(a).is_none()
        {
            errs.push(FieldError::new("agent", "this server requires signatures: the agent must be a 64-hex-character ed25519 public key"));
        }
        if signature.is_none() && !errs.iter().any(|e| e.field == "signature") {
            errs.push(FieldError::new(
                "signature",
                "this server requires signatures: sign the 32 raw bytes of the assertion id with the agent's key",
            ));
        }
    }

    let (Some(subject), Some(predicate), Some(object), Some(agent)) = (subject, predicate, object, agent) else {
        return Err(errs);
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let assertion = Assertion { subject, predicate, object, confidence, agent, signature, source, valid_time, supersedes };
    let id = assertion.id();
    if let Some(sig) = &assertion.signature
        && let Err(e) = signature::verify(&assertion.agent, id.as_bytes(), sig)
    {
        return Err(vec![FieldError::new(if e == SignatureError::AgentNotAKey { "agent" } else { "signature" }, e.to_string())]);
    }
    Ok((id, assertion))
}

/// A field that is present and not null (null means "absent").
fn present<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// Checks the rule shared by subjects, predicates, agents and entity values.
pub fn check_name(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("is {} bytes; at most {max} are allowed", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character U+{:04X}", c as u32));
    }
    Ok(())
}

fn required_name(map: &Map<String, Value>, key: &str, max: usize, errs: &mut Vec<FieldError>) -> Option<String> {
    match present(map, key) {
        None => {
            errs.push(FieldError::new(key, format!("required: a string of 1 to {max} bytes")));
            None
        }
        Some(Value::String(s)) => match check_name(s, max) {
            // A public key is one agent whatever the case of its hex.
            Ok(()) if key == "agent" && s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s.to_ascii_lowercase()),
            Ok(()) => Some(s.clone()),
            Err(e) => {
                errs.push(FieldError::new(key, e));
                None
            }
        },
        Some(_) => {
            errs.push(FieldError::new(key, format!("must be a string of 1 to {max} bytes")));
            None
        }
    }
}

fn parse_object(v: &Value, errs: &mut Vec<FieldError>) -> Option<Object> {
    let Some(map) = v.as_object() else {
        errs.push(FieldError::new("object", "must be {\"type\": T, \"value\": V}"));
        return None;
    };
    let before = errs.len();
    for key in map.keys() {
        if key != "type" && key != "value" {
            errs.push(FieldError::new(format!("object.{key}"), "unknown field; an object has only type and value"));
        }
    }
    let ty = map.get("type").and_then(Value::as_str);
    let Some(value) = map.get("value").filter(|v| !v.is_null()) else {
        errs.push(FieldError::new("object.value", "required"));
        return None;
    };
    let bad = |reason: &str| FieldError::new("object.value", reason.to_string());
    let obj = match ty {
        Some("text") => match value.as_str() {
            Some(s) if s.len() <= MAX_TEXT_BYTES => Some(Object::Text(s.to_string())),
            Some(s) => {
                errs.push(bad(&format!("text is {} bytes; at most {MAX_TEXT_BYTES} are allowed", s.len())));
                None
            }
            None => {
                errs.push(bad("a text value is a string"));
                None
            }
        },
        Some("number") => match value.as_f64() {
            Some(n) if n.is_finite() => Some(Object::Number(n)),
            _ => {
                errs.push(bad("a number value is a finite JSON number"));
                None
            }
        },
        // serde_json reads `-0` as a float; it is still the integer 0.
        Some("integer") => match value.as_i64().or_else(|| (value.as_f64() == Some(0.0) && value.is_f64()).then_some(0)) {
            Some(i) => Some(Object::Integer(i)),
            None => {
                errs.push(bad("an integer value is a JSON integer from -2^63 to 2^63-1"));
                None
            }
        },
        Some("boolean") => match value.as_bool() {
            Some(b) => Some(Object::Boolean(b)),
            None => {
                errs.push(bad("a boolean value is true or false"));
                None
            }
        },
        Some("entity") => match value.as_str().map(|s| (s, check_name(s, MAX_SUBJECT_BYTES))) {
            Some((s, Ok(()))) => Some(Object::Entity(s.to_string())),
            Some((_, Err(e))) => {
                errs.push(bad(&format!("an entity id {e}")));
                None
            }
            None => {
                errs.push(bad("an entity value is a string"));
                None
            }
        },
        Some("time") => match value.as_str().map(super::time::parse) {
            Some(Ok(t)) => Some(Object::Time(t)),
            Some(Err(e)) => {
                errs.push(bad(&e));
                None
            }
            None => {
                errs.push(bad("a time value is an RFC 3339 string"));
                None
            }
        },
        _ => {
            errs.push(FieldError::new("object.type", "must be one of text, number, integer, boolean, entity, time"));
            None
        }
    };
    if errs.len() > before { None } else { obj }
}

fn parse_source(v: &Value, errs: &mut Vec<FieldError>) -> Option<Source> {
    let Some(map) = v.as_object() else {
        errs.push(FieldError::new("source", "must be {\"uri\": ..., \"tier\": ..., \"hash\": ...}"));
        return None;
    };
    let before = errs.len();
    for key in map.keys() {
        if !["uri", "tier", "hash"].contains(&key.as_str()) {
            errs.push(FieldError::new(format!("source.{key}"), "unknown field; a source has uri, tier and hash"));
        }
    }
    let uri = match present(map, "uri") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_URI_BYTES && !s.chars().any(char::is_control) => Some(s.clone()),
        _ => {
            errs.push(FieldError::new(
                "source.uri",
                format!("required: a string of 1 to {MAX_URI_BYTES} bytes without control characters"),
            ));
            None
        }
    };
    let tier = present(map, "tier").and_then(|t| match t.as_str().and_then(Tier::parse) {
        Some(t) => Some(t),
        None => {
            errs.push(FieldError::new("source.tier", "must be one of regulatory, clinical, observational, expert, community, anecdotal"));
            None
        }
    });
    let hash = present(map, "hash").and_then(|h| match h.as_str() {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h.to_ascii_lowercase()),
        _ => {
            errs.push(FieldError::new("source.hash", "must be 64 hex characters (a 32-byte digest)"));
            None
        }
    });
    if errs.len() > before {
        return None;
    }
    uri.map(|uri| Source { uri, tier, hash })
}

fn parse_supersedes(v: &Value, errs: &mut Vec<FieldError>) -> Vec<AssertionId> {
    let Some(items) = v.as_array() else {
        errs.push(FieldError::new("supersedes", "must be an array of assertion ids"));
        return Vec::new();
    };
    if items.len() > MAX_SUPERSEDES {
        errs.push(FieldError::new("supersedes", format!("at most {MAX_SUPERSEDES} ids")));
        return Vec::new();
    }
    let mut ids = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.as_str().map(|s| s.to_ascii_lowercase().parse::<AssertionId>()) {
            Some(Ok(id)) => ids.push(id),
            _ => errs.push(FieldError::new(format!("supersedes.{i}"), "an assertion id is 64 lowercase hex characters")),
        }
    }
    ids.sort();
    let n = ids.len();
    ids.dedup();
    if ids.len() != n {
        errs.push(FieldError::new("supersedes", "lists the same id twice"));
    }
    ids
}
