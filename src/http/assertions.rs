//! Write endpoints: `POST /v1/assertions`, `POST /v1/assertions/batch`,
//! `POST /v1/assertions/{id}/retractions`.
//!
//! Handlers validate (nothing reaches the log unless every item is valid),
//! hand items to the write path, and answer only after the group commit.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::problem::Problem;
use crate::ingest::{Committed, IngestError, Item, ItemError, Outcome};
use crate::model::parse::{self, FieldError, MAX_AGENT_BYTES};
use crate::model::signature;
use crate::model::{AssertionId, Retraction, time};

/// Largest single-assertion body.
pub const MAX_SINGLE_BYTES: usize = 1024 * 1024;
/// Largest batch body.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most assertions in one batch.
pub const MAX_BATCH_ITEMS: usize = 10_000;

fn invalid(detail: impl Into<String>, errors: Vec<Value>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-assertion", "The request has invalid fields", detail).with("errors", errors)
}

fn field_errors(index: Option<usize>, errs: &[FieldError]) -> Vec<Value> {
    errs.iter()
        .map(|e| match index {
            Some(i) => json!({"index": i, "field": e.field, "reason": e.reason}),
            None => json!({"field": e.field, "reason": e.reason}),
        })
        .collect()
}

fn ingest_problem(e: IngestError, batch: bool) -> Problem {
    match e {
        IngestError::Unavailable(why) => Problem::unavailable(why),
        IngestError::Rejected(errs) => {
            let status = if batch { 422 } else { errs.first().map(|e| e.status).unwrap_or(422) };
            let list: Vec<Value> = errs
                .iter()
                .map(|e: &ItemError| {
                    if batch {
                        json!({"index": e.index, "field": e.field, "reason": e.reason})
                    } else {
                        json!({"field": e.field, "reason": e.reason})
                    }
                })
                .collect();
            let detail = errs.first().map(|e| format!("{}: {}", e.field, e.reason)).unwrap_or_default();
            match status {
                404 => Problem::new(StatusCode::NOT_FOUND, "not-found", "No such assertion", detail),
                403 => Problem::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail),
                _ => invalid(detail, list),
            }
        }
    }
}

/// `POST /v1/assertions`
pub async fn create(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, Problem> {
    // A follower refuses before reading the body: the write belongs elsewhere.
    st.writer()?;
    let v = super::body::read_json(&headers, body, MAX_SINGLE_BYTES).await?;
    let (id, assertion) = parse::parse_assertion(&v, st.parse_options).map_err(|errs| {
        let detail = errs.iter().map(|e| format!("{}: {}", e.field, e.reason)).collect::<Vec<_>>().join("; ");
        invalid(detail, field_errors(None, &errs))
    })?;
    let Committed { outcomes, recorded_at } =
        st.writer()?.submit(vec![Item::Assert { id, assertion: Box::new(assertion) }]).await.map_err(|e| ingest_problem(e, false))?;
    let Some(outcome) = outcomes.first() else { return Err(Problem::unavailable("no outcome")) };
    Ok(match outcome {
        Outcome::Created { position } => (
            StatusCode::CREATED,
            Json(json!({"id": id, "position": position, "recorded_at": time::format(&recorded_at), "status": "created"})),
        )
            .into_response(),
        Outcome::Duplicate { position } => {
            (StatusCode::OK, Json(json!({"id": id, "position": position, "status": "duplicate"}))).into_response()
        }
    })
}

/// `POST /v1/assertions/batch`
pub async fn create_batch(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, Problem> {
    // A follower refuses before reading the body: the write belongs elsewhere.
    st.writer()?;
    let v = super::body::read_json(&headers, body, MAX_BATCH_BYTES).await?;
    let opts = st.parse_options;
    let validate = move || validate_batch(v, opts);
    // Hashing and checking up to 10,000 items takes milliseconds: keep it
    // off the async workers that serve other requests.
    let items = tokio::task::spawn_blocking(validate).await.map_err(|e| Problem::unavailable(e.to_string()))??;
    let ids: Vec<AssertionId> = items
        .iter()
        .filter_map(|i| match i {
            Item::Assert { id, .. } => Some(*id),
            Item::Retract(_) => None,
        })
        .collect();
    let Committed { outcomes, recorded_at } = st.writer()?.submit(items).await.map_err(|e| ingest_problem(e, true))?;
    let results: Vec<Value> = ids
        .iter()
        .zip(&outcomes)
        .map(|(id, o)| {
            let status = match o {
                Outcome::Created { .. } => "created",
                Outcome::Duplicate { .. } => "duplicate",
            };
            json!({"id": id, "position": o.position(), "status": status})
        })
        .collect();
    Ok((StatusCode::OK, Json(json!({"results": results, "recorded_at": time::format(&recorded_at)}))).into_response())
}

fn validate_batch(v: Value, opts: parse::ParseOptions) -> Result<Vec<Item>, Problem> {
    let Value::Object(mut map) = v else {
        return Err(invalid("a batch is {\"assertions\": [...]}", vec![json!({"field": "", "reason": "must be a JSON object"})]));
    };
    if let Some(k) = map.keys().find(|k| *k != "assertions") {
        return Err(invalid(
            format!("unknown field {k:?}"),
            vec![json!({"field": k, "reason": "unknown field; a batch has only assertions"})],
        ));
    }
    let Some(Value::Array(list)) = map.remove("assertions") else {
        return Err(invalid(
            "a batch is {\"assertions\": [...]}",
            vec![json!({"field": "assertions", "reason": "required: an array of assertions"})],
        ));
    };
    if list.is_empty() || list.len() > MAX_BATCH_ITEMS {
        return Err(invalid(
            format!("a batch holds 1 to {MAX_BATCH_ITEMS} assertions; this one holds {}", list.len()),
            vec![json!({"field": "assertions", "reason": format!("must hold 1 to {MAX_BATCH_ITEMS} items")})],
        ));
    }
    let mut items = Vec::with_capacity(list.len());
    let mut errors = Vec::new();
    for (i, item) in list.iter().enumerate() {
        match parse::parse_assertion(item, opts) {
            Ok((id, a)) => items.push(Item::Assert { id, assertion: Box::new(a) }),
            Err(errs) => errors.extend(field_errors(Some(i), &errs)),
        }
    }
    if !errors.is_empty() {
        let bad: std::collections::BTreeSet<u64> = errors.iter().filter_map(|e| e["index"].as_u64()).collect();
        return Err(invalid(format!("{} of {} items are invalid; nothing was written", bad.len(), list.len()), errors));
    }
    Ok(items)
}

/// `POST /v1/assertions/{id}/retractions`
pub async fn retract(State(st): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Result<Response, Problem> {
    // A follower refuses before reading the body: the write belongs elsewhere.
    st.writer()?;
    let id: AssertionId = id.parse().map_err(|e: crate::model::id::BadId| {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "No such assertion", format!("{id:?} is not an assertion id: {e}"))
    })?;
    let v = super::body::read_json(&headers, body, MAX_SINGLE_BYTES).await?;
    let r = parse_retraction(id, &v, st.parse_options).map_err(|errs| {
        let detail = errs.iter().map(|e| format!("{}: {}", e.field, e.reason)).collect::<Vec<_>>().join("; ");
        invalid(detail, field_errors(None, &errs))
    })?;
    let Committed { outcomes, recorded_at } = st.writer()?.submit(vec![Item::Retract(r)]).await.map_err(|e| ingest_problem(e, false))?;
    let Some(outcome) = outcomes.first() else { return Err(Problem::unavailable("no outcome")) };
    Ok(match outcome {
        Outcome::Created { position } => (
            StatusCode::CREATED,
            Json(json!({"id": id, "position": position, "recorded_at": time::format(&recorded_at), "status": "created"})),
        )
            .into_response(),
        Outcome::Duplicate { position } => {
            (StatusCode::OK, Json(json!({"id": id, "position": position, "status": "duplicate"}))).into_response()
        }
    })
}

fn parse_retraction(id: AssertionId, v: &Value, opts: parse::ParseOptions) -> Result<Retraction, Vec<FieldError>> {
    let fe = |f: &str, r: &str| FieldError { field: f.into(), reason: r.into() };
    let Some(map) = v.as_object() else { return Err(vec![fe("", "a retraction is a JSON object")]) };
    let mut errs = Vec::new();
    for k in map.keys() {
        if !["agent", "reason", "signature"].contains(&k.as_str()) {
            errs.push(fe(k, "unknown field; a retraction has agent, reason and signature"));
        }
    }
    let agent = match map.get("agent").and_then(Value::as_str) {
        Some(a) => match parse::check_name(a, MAX_AGENT_BYTES) {
            Ok(()) if a.len() == 64 && a.bytes().all(|b| b.is_ascii_hexdigit()) => Some(a.to_ascii_lowercase()),
            Ok(()) => Some(a.to_string()),
            Err(e) => {
                errs.push(fe("agent", &e));
                None
            }
        },
        None => {
            errs.push(fe("agent", "required: the agent that made the assertion"));
            None
        }
    };
    let reason = match map.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.len() <= 4096 => s.clone(),
        Some(_) => {
            errs.push(fe("reason", "must be a string of at most 4096 bytes"));
            String::new()
        }
    };
    let signature = match map.get("signature") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
        Some(_) => {
            errs.push(fe("signature", "must be 128 hex characters"));
            None
        }
    };
    let Some(agent) = agent else { return Err(errs) };
    if opts.require_signatures && signature.is_none() {
        errs.push(fe("signature", "this server requires signatures: sign BLAKE3(\"stemedb/retraction/v1\" ‖ id) with the agent's key"));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    if let Some(sig) = &signature {
        signature::verify(&agent, &signature::retraction_message(&id), sig).map_err(|e| vec![fe("signature", &e.to_string())])?;
    }
    Ok(Retraction { id, agent, reason, signature })
}
