//! Per-request metrics, labelled by route template (never by raw path, so
//! that ids in paths cannot explode the label cardinality).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Records `stemedb_http_requests_total{route,status}` and
/// `stemedb_http_request_duration_seconds{route}`.
pub async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("stemedb_http_requests_total", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("stemedb_http_request_duration_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    resp
}
