//! Operational endpoints: health and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, Role};

/// `GET /v1/health`: the process is up and the log is writable. After a
/// failed write or fsync the writer refuses work until a restart, and
/// health says so with a 503.
pub async fn health(State(st): State<AppState>) -> Response {
    let body = |status: &str| {
        let mut b = json!({"status": status, "version": env!("CARGO_PKG_VERSION"), "position": st.head()});
        decorate(&st, &mut b);
        b
    };
    let failure = match &st.role {
        Role::Writer(i) => i.failure(),
        Role::Follower(_) => None,
    };
    match failure {
        None => Json(body("healthy")).into_response(),
        Some(why) => {
            let mut b = body("unhealthy");
            b["reason"] = json!(why);
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(b)).into_response()
        }
    }
}

/// `GET /v1/ready`: 200 when no projection is failing and none misses
/// events older than the configured delay (beyond the configured lag; see
/// [`readiness`](super::readiness)); otherwise 503 naming the lagging
/// projection, so a load balancer stops routing reads here.
pub async fn ready(State(st): State<AppState>) -> Response {
    let head = st.head();
    let status = st.read.status();
    let reference = st.readiness.reference(std::time::Instant::now(), head);
    let lagging: Vec<&str> = status.iter().filter(|p| p.failing || st.readiness.lagging(reference, p.position)).map(|p| p.name).collect();
    let projections: serde_json::Map<String, serde_json::Value> = status
        .iter()
        .map(|p| (p.name.to_string(), json!({"position": p.position, "lag": head.saturating_sub(p.position), "failing": p.failing})))
        .collect();
    // A follower that has not heard from the archive for a while serves
    // ever older data: take it out of rotation.
    let silent = match &st.role {
        Role::Follower(f) => f.since_last_poll().is_none_or(|d| d > st.follow_max_silence),
        Role::Writer(_) => false,
    };
    if silent {
        let mut p = super::problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            format!("this follower has not read the archive successfully in the last {} s", st.follow_max_silence.as_secs()),
        )
        .with("position", head)
        .with("projections", &projections)
        .retry_after(1);
        if let Role::Follower(f) = &st.role {
            p = p.with("follow", f.view());
        }
        return p.into_response();
    }
    if lagging.is_empty() {
        let mut b = json!({"status": "ready", "position": head, "projections": projections});
        decorate(&st, &mut b);
        Json(b).into_response()
    } else {
        let mut p = super::problem::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            format!(
                "projection(s) {} are failing, or more than {} events behind {}",
                lagging.join(", "),
                st.readiness.max_lag(),
                match st.readiness.max_delay() {
                    d if d.is_zero() => format!("the log head {head}"),
                    d => format!("the log head of {} ago ({reference}; now {head})", humantime::format_duration(d)),
                }
            ),
        )
        .with("lagging", lagging)
        .with("position", head)
        .with("projections", projections)
        .retry_after(1);
        let mut extra = json!({});
        decorate(&st, &mut extra);
        for (k, v) in extra.as_object().into_iter().flatten() {
            p = p.with(k, v);
        }
        p.into_response()
    }
}

/// Adds the node's role, and its shipping or following progress, to a
/// health or readiness body.
fn decorate(st: &AppState, b: &mut serde_json::Value) {
    match &st.role {
        Role::Writer(_) => {
            b["role"] = json!("writer");
            if let Some(s) = &st.shipping {
                b["shipping"] = s.view();
            }
        }
        Role::Follower(f) => {
            b["role"] = json!("follower");
            b["follow"] = f.view();
        }
    }
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let mut resp = st.metrics.render().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}
