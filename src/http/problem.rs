//! RFC 9457 problem details: the one shape every error response has.
//!
//! Clients (agents, mostly) branch on `type` and `status`; people read
//! `title` and `detail`. Extra members such as `errors` carry the per-field
//! findings of validation.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

/// A problem response.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable kind, e.g. `invalid-assertion`.
    pub kind: &'static str,
    /// Short summary of the kind.
    pub title: &'static str,
    /// What happened in this request and what to do about it.
    pub detail: String,
    /// Extension members.
    pub extra: Map<String, Value>,
    /// Seconds for `Retry-After`, when retrying makes sense.
    pub retry_after: Option<u64>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Problem {
    /// A problem with no extension members.
    pub fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: impl Into<String>) -> Problem {
        Problem { status, kind, title, detail: detail.into(), extra: Map::new(), retry_after: None, allow: None }
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Problem {
        self.extra.insert(key.to_string(), serde_json::to_value(value).unwrap_or(Value::Null));
        self
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, secs: u64) -> Problem {
        self.retry_after = Some(secs);
        self
    }

    /// 400: the body is not JSON.
    pub fn malformed_json(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "The request body is not valid JSON", detail)
    }

    /// 404 for a path that does not exist.
    pub fn no_route(path: &str) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "No such resource", format!("{path} is not a StemeDB endpoint; see docs/api.md"))
    }

    /// 405 for a method a route does not serve.
    pub fn method_not_allowed(method: &str, path: &str) -> Problem {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 405 for a write sent to a read-only follower: the detail names the
    /// archive it follows, whose writer takes the write.
    pub fn read_only(archive: &str) -> Problem {
        let mut p = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only-replica",
            "This node is a read-only follower",
            format!("this node is a read-only follower of {archive}; send writes to the writer that ships to that archive"),
        )
        .with("role", "follower")
        .with("archive", archive);
        p.allow = Some("GET, HEAD");
        p
    }

    /// 503: the log is not accepting writes.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail).retry_after(1)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("type".into(), Value::String(format!("urn:stemedb:problem:{}", self.kind)));
        body.insert("title".into(), Value::String(self.title.into()));
        body.insert("status".into(), Value::from(self.status.as_u16()));
        body.insert("detail".into(), Value::String(self.detail));
        body.extend(self.extra);
        let bytes = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(a) = self.allow {
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(a));
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
