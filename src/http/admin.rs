//! Admin endpoints under `/v1/admin/`: projection status, online rebuilds
//! and verification.
//!
//! Until API keys exist they are served only when the server listens on a
//! loopback address, or when `STEMEDB_ADMIN_ENABLED=true` says so
//! explicitly; otherwise they answer 403.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::problem::Problem;
use crate::projection::read_side::PROJECTIONS;
use crate::projection::rebuild::{JobState, StartError};

fn gate(st: &AppState) -> Result<(), Problem> {
    if st.admin_enabled {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        "admin-disabled",
        "Admin API disabled",
        "the admin API is served only on a loopback bind address or with STEMEDB_ADMIN_ENABLED=true",
    ))
}

/// Reads `{"projections": [...]}`; `"all"` (or an absent list) means every projection.
async fn projection_names(headers: &HeaderMap, body: Body) -> Result<Vec<String>, Problem> {
    let v = super::body::read_json(headers, body, 64 * 1024).await?;
    let bad = |reason: &str| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request", reason.to_string())
            .with("errors", vec![json!({"field": "projections", "reason": reason})])
    };
    let Value::Object(map) = v else { return Err(bad("the body is {\"projections\": [\"kv\", \"lenses\", ...]}")) };
    if let Some(k) = map.keys().find(|k| *k != "projections") {
        return Err(bad(&format!("unknown field {k:?}")));
    }
    let names: Vec<String> = match map.get("projections") {
        None | Some(Value::Null) => vec!["all".into()],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad("projection names are strings"))).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad("projections is a list of names")),
    };
    let mut out = Vec::new();
    for n in names {
        if n == "all" {
            out.extend(PROJECTIONS.iter().map(|p| p.to_string()));
        } else if PROJECTIONS.contains(&n.as_str()) {
            out.push(n);
        } else {
            return Err(bad(&format!("unknown projection {n:?}; projections are {}", PROJECTIONS.join(", "))));
        }
    }
    out.dedup();
    Ok(out)
}

/// `POST /v1/admin/projections/rebuild`
pub async fn rebuild(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, Problem> {
    gate(&st)?;
    let names = projection_names(&headers, body).await?;
    match st.read.start_rebuild(&names) {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(json!({"job": job.id, "projections": job.projections}))).into_response()),
        Err(StartError::Busy(p, id)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "rebuild-running",
            "A rebuild is already running",
            format!("projection {p} is being rebuilt by job {id}"),
        )
        .with("job", id)),
        Err(e) => Err(Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "Invalid request", e.to_string())),
    }
}

/// `GET /v1/admin/projections`
pub async fn projections(State(st): State<AppState>) -> Result<Json<Value>, Problem> {
    gate(&st)?;
    let head = st.head();
    let list: Vec<Value> = st
        .read
        .status()
        .into_iter()
        .map(|p| {
            let job = st.read.jobs.running_for(p.name);
            let state = if job.is_some() {
                "rebuilding"
            } else if p.stale.is_some() {
                "stale"
            } else {
                "live"
            };
            json!({
                "name": p.name,
                "position": p.position,
                "head": head,
                "lag": head.saturating_sub(p.position),
                "state": state,
                "failing": p.failing,
                "stale": p.stale,
                "rebuild": job.and_then(|j| j.view(p.name)),
            })
        })
        .collect();
    let jobs: Vec<Value> = st.read.jobs.all().iter().map(|j| job_json(j)).collect();
    Ok(Json(json!({"head": head, "projections": list, "jobs": jobs})))
}

fn job_json(j: &crate::projection::rebuild::Job) -> Value {
    let progress: serde_json::Map<String, Value> =
        j.projections.iter().map(|p| (p.to_string(), serde_json::to_value(j.view(p)).unwrap_or(Value::Null))).collect();
    let (state, error) = match j.state() {
        JobState::Failed(e) => ("failed", Some(e)),
        JobState::Running => ("running", None),
        JobState::Completed => ("completed", None),
        JobState::Cancelled => ("cancelled", None),
    };
    json!({"job": j.id, "state": state, "error": error, "projections": j.projections,
           "started_at": crate::model::time::format(&j.started_at), "progress": progress})
}

fn no_job(id: &str) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "No such job", format!("no rebuild job {id:?}"))
}

/// `GET /v1/admin/projections/rebuild/{job}`
pub async fn job(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    gate(&st)?;
    let j = st.read.jobs.get(&id).ok_or_else(|| no_job(&id))?;
    Ok(Json(job_json(&j)))
}

/// `DELETE /v1/admin/projections/rebuild/{job}`
pub async fn cancel(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    gate(&st)?;
    let j = st.read.jobs.get(&id).ok_or_else(|| no_job(&id))?;
    if j.state() != JobState::Running {
        return Err(Problem::new(StatusCode::CONFLICT, "job-finished", "Job is not running", format!("job {id} has already finished"))
            .with("job", job_json(&j)));
    }
    j.cancel();
    Ok((StatusCode::ACCEPTED, Json(json!({"job": j.id, "state": "cancelling"}))).into_response())
}

/// `POST /v1/admin/projections/verify`
pub async fn verify(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<Value>, Problem> {
    gate(&st)?;
    let names = projection_names(&headers, body).await?;
    let read = st.read.clone();
    let results = tokio::task::spawn_blocking(move || {
        let wal = read.feed().wal_dir.clone();
        read.rebuildable()
            .into_iter()
            .filter(|s| names.iter().any(|n| n == s.name()))
            .map(|s| s.verify(&wal))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| Problem::unavailable(e.to_string()))?
    .map_err(super::kv::storage)?;
    let ok = results.iter().all(|c| c.equal);
    Ok(Json(json!({"ok": ok, "projections": results})))
}
