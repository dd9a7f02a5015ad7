//! Reads from the KV view: `GET /v1/assertions/{id}`, `GET /v1/assertions`,
//! `GET /v1/history`.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::consistency;
use super::problem::Problem;
use super::query::Params;
use crate::model::AssertionId;
use crate::projection::ProjectionError;
use crate::projection::kv::ListFilter;

/// Most items one page of `GET /v1/assertions` returns.
pub const MAX_LIMIT: u64 = 1000;

/// Storage failures of a projection are 500s that say which one.
pub fn storage(e: ProjectionError) -> Problem {
    tracing::error!(error = %e, "projection read failed");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "storage-error", "Storage error", e.to_string())
}

/// Runs a short point read (one B-tree lookup) on the async worker itself:
/// handing it to the blocking pool costs two context switches, which
/// profiled as the largest cost of a lens read.
pub fn point<T>(f: impl FnOnce() -> Result<T, ProjectionError>) -> Result<T, Problem> {
    f().map_err(storage)
}

/// Runs a blocking projection read (range scans, replays) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ProjectionError> + Send + 'static) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Problem::unavailable(e.to_string()))?.map_err(storage)
}

/// `GET /v1/assertions/{id}`
pub async fn get(State(st): State<AppState>, Path(id): Path<String>, RawQuery(q): RawQuery) -> Result<Json<Value>, Problem> {
    let params = Params::parse(q.as_deref(), &[])?;
    let not_found = || Problem::new(StatusCode::NOT_FOUND, "not-found", "No such assertion", format!("no assertion {id} is known"));
    let parsed: AssertionId = id.parse().map_err(|_| not_found())?;
    consistency::wait(&st, &params, &["kv"]).await?;
    let kv = st.read.kv.load();
    let (view, _) = point(move || kv.get(&parsed))?;
    let view = view.ok_or_else(not_found)?;
    Ok(Json(serde_json::to_value(view).unwrap_or(Value::Null)))
}

/// `GET /v1/assertions?subject=&predicate=&agent=&limit=&cursor=`
pub async fn list(State(st): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>, Problem> {
    let params = Params::parse(q.as_deref(), &["subject", "predicate", "agent", "limit", "cursor"])?;
    let limit = params.u64("limit")?.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "Invalid query parameter",
            format!("limit: must be 1 to {MAX_LIMIT}"),
        )
        .with("parameter", "limit"));
    }
    let after = match params.str("cursor") {
        None | Some("") => 0,
        Some(c) => c.parse::<u64>().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-parameter",
                "Invalid query parameter",
                format!("cursor: {c:?} is not a cursor returned by this endpoint"),
            )
            .with("parameter", "cursor")
        })?,
    };
    let f = ListFilter {
        subject: params.str("subject").map(str::to_string),
        predicate: params.str("predicate").map(str::to_string),
        agent: params.str("agent").map(str::to_string),
        after,
        limit: limit as usize,
    };
    consistency::wait(&st, &params, &["kv"]).await?;
    let kv = st.read.kv.load();
    let (items, next) = blocking(move || kv.list(&f)).await?;
    Ok(Json(json!({"items": items, "next": next.map(|n| n.to_string())})))
}

/// `GET /v1/history?subject=S&predicate=P`
pub async fn history(State(st): State<AppState>, RawQuery(q): RawQuery) -> Result<Json<Value>, Problem> {
    let params = Params::parse(q.as_deref(), &["subject", "predicate"])?;
    let subject = params.required("subject")?.to_string();
    let predicate = params.required("predicate")?.to_string();
    consistency::wait(&st, &params, &["kv"]).await?;
    let kv = st.read.kv.load();
    let (s, p) = (subject.clone(), predicate.clone());
    let (events, position) = blocking(move || kv.history(&s, &p, None)).await?;
    Ok(Json(json!({"subject": subject, "predicate": predicate, "position": position, "events": events})))
}
