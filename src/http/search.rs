//! `GET /v1/search`: text and attribute search over the `search` projection.

use std::time::Instant;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use serde::Serialize;

use super::AppState;
use super::consistency;
use super::kv::storage;
use super::problem::Problem;
use super::query::Params;
use crate::model::Tier;
use crate::projection::kv::StoredView;
use crate::projection::search::query::{Cursor, DEFAULT_LIMIT, MAX_LIMIT, OBJECT_TYPES, SearchError, SearchRequest, Sort};

const PARAMS: &[&str] = &[
    "q",
    "subject",
    "predicate",
    "agent",
    "tier",
    "object_type",
    "min_confidence",
    "max_confidence",
    "valid_from",
    "valid_to",
    "recorded_from",
    "recorded_to",
    "include_retracted",
    "sort",
    "limit",
    "cursor",
];

fn invalid(param: &str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", "Invalid query parameter", format!("{param}: {}", detail.into()))
        .with("parameter", param)
}

fn non_empty<'a>(p: &'a Params, k: &str) -> Result<Option<&'a str>, Problem> {
    match p.str(k) {
        Some("") => Err(invalid(k, "must not be empty (leave the parameter out instead)")),
        v => Ok(v),
    }
}

fn confidence(p: &Params, k: &str) -> Result<Option<f64>, Problem> {
    non_empty(p, k)?
        .map(|v| match v.parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
            _ => Err(invalid(k, format!("{v:?} is not a number from 0 to 1"))),
        })
        .transpose()
}

fn time(p: &Params, k: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, Problem> {
    non_empty(p, k)?.map(|v| crate::model::time::parse(v).map_err(|e| invalid(k, format!("{v:?}: {e}")))).transpose()
}

/// Reads and checks the parameters.
fn request(p: &Params) -> Result<SearchRequest, Problem> {
    let q = match p.str("q") {
        None => None,
        Some(q) if q.trim().is_empty() => return Err(invalid("q", "must not be blank (leave it out to filter by attributes only)")),
        Some(q) => Some(q.to_string()),
    };
    let tier = non_empty(p, "tier")?
        .map(|t| {
            Tier::parse(t).ok_or_else(|| {
                invalid(
                    "tier",
                    format!("{t:?} is not a tier; tiers are {}", Tier::ALL.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")),
                )
            })
        })
        .transpose()?;
    let object_type = non_empty(p, "object_type")?
        .map(|t| {
            if OBJECT_TYPES.contains(&t) {
                Ok(t.to_string())
            } else {
                Err(invalid("object_type", format!("{t:?} is not an object type; types are {}", OBJECT_TYPES.join(", "))))
            }
        })
        .transpose()?;
    let sort = non_empty(p, "sort")?
        .map(|s| Sort::parse(s).ok_or_else(|| invalid("sort", format!("{s:?} is not relevance, recent or confidence"))))
        .transpose()?;
    if sort == Some(Sort::Relevance) && q.is_none() {
        return Err(invalid("sort", "relevance needs a text query q"));
    }
    let limit = p.u64("limit")?.unwrap_or(DEFAULT_LIMIT as u64);
    if limit == 0 || limit > MAX_LIMIT as u64 {
        return Err(invalid("limit", format!("{limit} is not from 1 to {MAX_LIMIT}")));
    }
    let cursor = match p.str("cursor") {
        None | Some("") => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| invalid("cursor", format!("{c:?} is not a cursor returned by this endpoint")))?),
    };
    let req = SearchRequest {
        q,
        subject: non_empty(p, "subject")?.map(str::to_string),
        predicate: non_empty(p, "predicate")?.map(str::to_string),
        agent: non_empty(p, "agent")?.map(str::to_string),
        tier,
        object_type,
        min_confidence: confidence(p, "min_confidence")?,
        max_confidence: confidence(p, "max_confidence")?,
        valid_from: time(p, "valid_from")?,
        valid_to: time(p, "valid_to")?,
        recorded_from: time(p, "recorded_from")?,
        recorded_to: time(p, "recorded_to")?,
        include_retracted: p.bool("include_retracted")?.unwrap_or(false),
        sort,
        limit: limit as usize,
        cursor,
    };
    let unprocessable = |a: &str, b: &str| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-range", "Empty range", format!("{a} is after {b}; nothing can match"))
            .with("parameter", a)
    };
    if let (Some(a), Some(b)) = (req.min_confidence, req.max_confidence)
        && a > b
    {
        return Err(unprocessable("min_confidence", "max_confidence"));
    }
    if let (Some(a), Some(b)) = (req.valid_from, req.valid_to)
        && a > b
    {
        return Err(unprocessable("valid_from", "valid_to"));
    }
    if let (Some(a), Some(b)) = (req.recorded_from, req.recorded_to)
        && a > b
    {
        return Err(unprocessable("recorded_from", "recorded_to"));
    }
    Ok(req)
}

/// `GET /v1/search?q=&subject=&...`
pub async fn search(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Result<Json<SearchAnswer>, Problem> {
    let params = Params::parse(raw.as_deref(), PARAMS)?;
    let req = request(&params)?;
    consistency::wait(&st, &params, &["search"]).await?;
    let store = st.read.search.load();
    // Queue for a slot: a few searches run at full speed instead of every
    // connection's search sharing the cores (see `STEMEDB_SEARCH_THREADS`).
    let queued = Instant::now();
    let permit = st.search_slots.clone().acquire_owned().await.map_err(|e| Problem::unavailable(e.to_string()))?;
    metrics::histogram!("stemedb_search_queue_seconds").record(queued.elapsed().as_secs_f64());
    let started = Instant::now();
    let page = tokio::task::spawn_blocking(move || {
        let page = store.search(&req);
        drop(permit);
        page
    })
    .await
    .map_err(|e| Problem::unavailable(e.to_string()))?;
    metrics::histogram!("stemedb_search_latency_seconds").record(started.elapsed().as_secs_f64());
    let page = page.map_err(|e| match e {
        SearchError::Invalid(param, detail) => {
            let p = Problem::new(StatusCode::BAD_REQUEST, "invalid-query", "Invalid search query", format!("{param}: {detail}"))
                .with("parameter", param);
            match param {
                "q" => p.with("query", params.str("q").unwrap_or_default()),
                _ => p,
            }
        }
        SearchError::Storage(x) => storage(x),
    })?;
    let hits = page
        .hits
        .into_iter()
        .map(|h| SearchHit {
            id: h.id.to_hex(),
            score: h.score,
            position: h.stored.position,
            retracted: h.stored.retraction.is_some(),
            superseded: !h.stored.superseded_by.is_empty(),
            assertion: StoredView::new(h.id, h.stored),
        })
        .collect();
    Ok(Json(SearchAnswer { hits, total: page.total, next: page.next, position: page.position }))
}

/// A page of search hits as served: serialized straight into the body, as
/// the lens answers are (an intermediate `serde_json::Value` copied every
/// string of every hit: ~2 % of the search profile).
#[derive(Serialize)]
pub struct SearchAnswer {
    hits: Vec<SearchHit>,
    total: u64,
    next: Option<String>,
    position: u64,
}

/// One hit of a [`SearchAnswer`].
#[derive(Serialize)]
struct SearchHit {
    id: String,
    score: f32,
    position: u64,
    retracted: bool,
    superseded: bool,
    assertion: StoredView,
}
