//! Query-string parameters with strict checking: unknown or repeated
//! parameters and malformed values are 400 problems naming the parameter,
//! never silently ignored.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};

use super::problem::Problem;

/// Longest a read may wait for `min_position`.
pub const MAX_WAIT_MS: u64 = 10_000;
/// Default wait for `min_position`.
pub const DEFAULT_WAIT_MS: u64 = 1_000;

/// Parsed query parameters of one request.
pub struct Params(HashMap<String, String>);

fn bad(param: &str, reason: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", "Invalid query parameter", format!("{param}: {}", reason.into()))
        .with("parameter", param)
}

impl Params {
    /// Parses `query`, accepting only `allowed` names (plus `min_position`
    /// and `wait_ms`, which every read takes).
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, Problem> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| bad("query", format!("not a valid query string: {e}")))?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) && k != "min_position" && k != "wait_ms" {
                let mut names: Vec<&str> = allowed.to_vec();
                names.extend(["min_position", "wait_ms"]);
                return Err(bad(&k, format!("unknown parameter; this endpoint takes {}", names.join(", "))));
            }
            if map.insert(k.clone(), v).is_some() {
                return Err(bad(&k, "given more than once"));
            }
        }
        Ok(Params(map))
    }

    /// A string parameter, if present.
    pub fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A required, non-empty string parameter.
    pub fn required(&self, k: &str) -> Result<&str, Problem> {
        match self.str(k) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(bad(k, "required")),
        }
    }

    /// An unsigned integer parameter.
    pub fn u64(&self, k: &str) -> Result<Option<u64>, Problem> {
        self.str(k).map(|v| v.parse::<u64>().map_err(|_| bad(k, format!("{v:?} is not a non-negative integer")))).transpose()
    }

    /// A boolean parameter (`true`/`false`).
    pub fn bool(&self, k: &str) -> Result<Option<bool>, Problem> {
        self.str(k)
            .map(|v| match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(bad(k, format!("{v:?} is not true or false"))),
            })
            .transpose()
    }

    /// An RFC 3339 time parameter.
    pub fn time(&self, k: &str) -> Result<Option<DateTime<Utc>>, Problem> {
        self.str(k).map(|v| crate::model::time::parse(v).map_err(|e| bad(k, e))).transpose()
    }

    /// The read-your-writes request: `min_position` and `wait_ms`.
    pub fn consistency(&self) -> Result<Option<(u64, Duration)>, Problem> {
        let wait = self.u64("wait_ms")?.unwrap_or(DEFAULT_WAIT_MS);
        if wait > MAX_WAIT_MS {
            return Err(bad("wait_ms", format!("at most {MAX_WAIT_MS}")));
        }
        Ok(self.u64("min_position")?.map(|p| (p, Duration::from_millis(wait))))
    }
}
