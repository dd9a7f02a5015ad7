//! Operational endpoints: health and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// `GET /v1/health`: the process is up and the log is writable. After a
/// failed write or fsync the writer refuses work until a restart, and
/// health says so with a 503.
pub async fn health(State(st): State<AppState>) -> Response {
    let body = |status: &str| json!({"status": status, "version": env!("CARGO_PKG_VERSION"), "position": st.ingest.committed_position()});
    match st.ingest.failure() {
        None => Json(body("healthy")).into_response(),
        Some(why) => {
            let mut b = body("unhealthy");
            b["reason"] = json!(why);
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(b)).into_response()
        }
    }
}

/// `GET /v1/ready`: 200 when every projection is within the configured lag
/// of the committed head and none is failing; otherwise 503 naming the
/// lagging projection, so a load balancer stops routing reads here.
pub async fn ready(State(st): State<AppState>) -> Response {
    let head = st.ingest.committed_position();
    let status = st.read.status();
    let lagging: Vec<&str> =
        status.iter().filter(|p| p.failing || head.saturating_sub(p.position) > st.ready_max_lag).map(|p| p.name).collect();
    let projections: serde_json::Map<String, serde_json::Value> = status
        .iter()
        .map(|p| (p.name.to_string(), json!({"position": p.position, "lag": head.saturating_sub(p.position), "failing": p.failing})))
        .collect();
    if lagging.is_empty() {
        Json(json!({"status": "ready", "position": head, "projections": projections})).into_response()
    } else {
        super::problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            format!("projection(s) {} are more than {} events behind the log head {head} or failing", lagging.join(", "), st.ready_max_lag),
        )
        .with("lagging", lagging)
        .with("position", head)
        .with("projections", projections)
        .retry_after(1)
        .into_response()
    }
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let mut resp = st.metrics.render().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}
