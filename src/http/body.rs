//! Reading JSON request bodies with the checks every write endpoint shares:
//! content type (415), size (413) and syntax (400), each as a problem.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::Value;

use super::problem::Problem;

/// Reads and parses a JSON body of at most `limit` bytes.
pub async fn read_json(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, Problem> {
    check_content_type(headers)?;
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large(limit));
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let is_limit = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return Err(if is_limit { too_large(limit) } else { Problem::malformed_json(format!("could not read the body: {e}")) });
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| Problem::malformed_json(format!("{e}")))
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Request body too large",
        format!("the body exceeds {limit} bytes; split it into smaller requests"),
    )
    .with("limit_bytes", limit)
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        return Ok(());
    }
    let shown = if ct.is_empty() { "no Content-Type".to_string() } else { format!("Content-Type {ct:?}") };
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        format!("{shown} was sent; send the body as application/json"),
    ))
}
