//! Lens reads: `GET /v1/lenses/{lens}` and `GET /v1/subjects/{subject}`.
//!
//! Plain queries are answered from the materialized summaries. `decay`
//! recomputes from the pair's live set (the reference time is now); `as_of`
//! replays the pair's history from the KV view up to that transaction time.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;
use super::consistency;
use super::kv::{blocking, point};
use super::problem::Problem;
use super::query::Params;
use crate::lens::{self, Lens, LiveSet, Resolution, Weighting};
use crate::model::time;
use crate::projection::kv::EventKind;

fn unknown_lens(name: &str) -> Problem {
    let names: Vec<&str> = Lens::ALL.iter().map(|l| l.as_str()).collect();
    Problem::new(StatusCode::NOT_FOUND, "unknown-lens", "No such lens", format!("{name:?} is not a lens; lenses are {}", names.join(", ")))
        .with("lenses", names)
}

/// A lens answer: the envelope and the resolution's fields side by side.
/// Serialized straight into the response body (not through a
/// `serde_json::Value`), because lens reads are the hottest path there is.
#[derive(Serialize)]
pub struct Answer {
    subject: String,
    predicate: String,
    lens: &'static str,
    as_of: Option<String>,
    decay: bool,
    position: u64,
    #[serde(flatten)]
    resolution: Resolution,
}

/// The answer of `GET /v1/subjects/{subject}`.
#[derive(Serialize)]
pub struct SubjectAnswer {
    subject: String,
    lens: &'static str,
    position: u64,
    predicates: BTreeMap<String, Resolution>,
}

/// `GET /v1/lenses/{lens}?subject=S&predicate=P[&as_of=T][&decay=true]`
pub async fn query(State(st): State<AppState>, Path(name): Path<String>, RawQuery(q): RawQuery) -> Result<Json<Answer>, Problem> {
    let lens = Lens::parse(&name).ok_or_else(|| unknown_lens(&name))?;
    let params = Params::parse(q.as_deref(), &["subject", "predicate", "as_of", "decay"])?;
    let subject = params.required("subject")?.to_string();
    let predicate = params.required("predicate")?.to_string();
    let as_of = params.time("as_of")?;
    let decay = params.bool("decay")?.unwrap_or(false);
    // as_of replays the KV history with the current definitions, so it does
    // not depend on the (possibly stale) materialized lenses.
    let needs = if as_of.is_some() { ["kv"].as_slice() } else { ["lenses"].as_slice() };
    consistency::wait(&st, &params, needs).await?;
    let (resolution, position) = resolve(&st, lens, &subject, &predicate, as_of, decay).await?;
    Ok(Json(Answer { subject, predicate, lens: lens.as_str(), as_of: as_of.map(|t| time::format(&t)), decay, position, resolution }))
}

async fn resolve(
    st: &AppState,
    lens: Lens,
    subject: &str,
    predicate: &str,
    as_of: Option<DateTime<Utc>>,
    decay: bool,
) -> Result<(Resolution, u64), Problem> {
    let (s, p) = (subject.to_string(), predicate.to_string());
    let defs = st.read.lenses.load().definitions().clone();
    match as_of {
        Some(t) => {
            let kv = st.read.kv.load();
            let t_ns = t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 { i64::MIN } else { i64::MAX });
            blocking(move || {
                let (events, _) = kv.history(&s, &p, Some(t_ns))?;
                let mut set = LiveSet::default();
                for ev in &events {
                    match ev.kind {
                        EventKind::AssertionRecorded => set.record(ev.assertion.id, ev.position, ev.recorded_at, &ev.assertion.assertion),
                        EventKind::AssertionRetracted => {
                            set.retract(&ev.assertion.id);
                        }
                    }
                }
                let position = kv.position_at(t_ns)?;
                Ok((lens::resolve(lens, &set, &defs, Weighting { decay, reference: t }), position))
            })
            .await
        }
        None if decay => {
            let store = st.read.lenses.load();
            blocking(move || {
                let (set, position) = store.live_set(&s, &p)?;
                Ok((lens::resolve(lens, &set, &defs, Weighting { decay: true, reference: Utc::now() }), position))
            })
            .await
        }
        None => {
            let store = st.read.lenses.load();
            point(move || store.resolution(&s, &p, lens))
        }
    }
}

/// `GET /v1/subjects/{subject}?lens=L`
pub async fn subject(
    State(st): State<AppState>,
    Path(subject): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<SubjectAnswer>, Problem> {
    let params = Params::parse(q.as_deref(), &["lens"])?;
    let name = params.str("lens").unwrap_or("consensus");
    let lens = Lens::parse(name).ok_or_else(|| unknown_lens(name))?;
    consistency::wait(&st, &params, &["lenses"]).await?;
    let store = st.read.lenses.load();
    let s = subject.clone();
    let (rows, position) = blocking(move || store.subject(&s)).await?;
    let predicates = rows.into_iter().map(|(p, summary)| (p, summary.into_resolution(lens))).collect();
    Ok(Json(SubjectAnswer { subject, lens: lens.as_str(), position, predicates }))
}
