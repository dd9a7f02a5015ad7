//! The read side over HTTP, against the real binary: every lens on
//! hand-built examples with exact expected answers, retraction and
//! supersession, `as_of` and `decay`, the KV endpoints (by id, filtered
//! lists with cursors, history), read-your-writes, readiness and metrics,
//! and restarts that must neither lose nor double-count events.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Value, json};

const EPS: f64 = 1e-9;

/// A server on a fresh data directory and a client for it.
struct Env {
    server: common::Server,
    c: reqwest::Client,
    _tmp: tempfile::TempDir,
}

/// What a successful write answered.
#[derive(Clone, Debug)]
struct Written {
    id: String,
    position: u64,
    recorded_at: String,
}

impl Env {
    fn start() -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let server = common::Server::start(&tmp.path().join("data"), &[]);
        Env { server, c: common::client(), _tmp: tmp }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// POSTs one assertion, expecting 201.
    async fn post(&self, body: Value) -> Written {
        let (st, _, v) = common::post_json(&self.c, &self.url("/v1/assertions"), &body).await;
        assert_eq!(st, 201, "POST {body}: {v}");
        Written {
            id: v["id"].as_str().expect("id").to_string(),
            position: v["position"].as_u64().expect("position"),
            recorded_at: v["recorded_at"].as_str().expect("recorded_at").to_string(),
        }
    }

    /// POSTs a retraction by `agent`; returns (status, body).
    async fn retract(&self, id: &str, agent: &str) -> (u16, String, Value) {
        common::post_json(&self.c, &self.url(&format!("/v1/assertions/{id}/retractions")), &json!({"agent": agent, "reason": "test"})).await
    }

    /// GETs `path?query`, returning (status, content type, body).
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, String, Value) {
        let url = if query.is_empty() {
            self.url(path)
        } else {
            format!("{}?{}", self.url(path), serde_urlencoded::to_string(query).expect("encode query"))
        };
        common::get_json(&self.c, &url).await
    }

    /// GETs and expects 200.
    async fn get_ok(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let (st, _, v) = self.get(path, query).await;
        assert_eq!(st, 200, "GET {path} {query:?}: {v}");
        v
    }

    /// A lens answer once every projection has applied `min_position`.
    async fn lens(&self, lens: &str, subject: &str, predicate: &str, min_position: u64, extra: &[(&str, &str)]) -> Value {
        let mp = min_position.to_string();
        let mut q = vec![("subject", subject), ("predicate", predicate), ("min_position", mp.as_str()), ("wait_ms", "10000")];
        q.extend_from_slice(extra);
        let v = self.get_ok(&format!("/v1/lenses/{lens}"), &q).await;
        assert_eq!(v["lens"], lens);
        assert_eq!(v["subject"], subject);
        assert_eq!(v["predicate"], predicate);
        v
    }
}

/// An assertion body with the fields these tests vary.
fn body(subject: &str, predicate: &str, value: &str, agent: &str) -> Value {
    common::assertion(subject, predicate, json!(value), agent)
}

/// Adds fields to an assertion body.
fn with(mut b: Value, fields: Value) -> Value {
    for (k, v) in fields.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

fn tier(t: &str) -> Value {
    json!({"source": {"uri": "https://example.org/src", "tier": t}})
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= EPS
}

fn assert_close(got: &Value, want: f64, what: &str) {
    assert!(close(f(got), want), "{what}: got {got}, want {want}");
}

/// The text value of a claim or winner.
fn text(v: &Value) -> &str {
    v["value"]["value"].as_str().unwrap_or_else(|| panic!("no text value in {v}"))
}

/// Claims as value → (weight, share, agents, assertion ids).
fn claims(v: &Value) -> BTreeMap<String, (f64, f64, u64, Vec<String>)> {
    v["claims"]
        .as_array()
        .expect("claims")
        .iter()
        .map(|c| {
            let ids = c["assertions"].as_array().expect("assertions").iter().map(|i| i.as_str().expect("id").to_string()).collect();
            (text(c).to_string(), (f(&c["weight"]), f(&c["share"]), c["agents"].as_u64().expect("agents"), ids))
        })
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array().expect("array of ids").iter().map(|i| i.as_str().expect("id").to_string()).collect()
}

/// Normalized entropy of shares over k claims.
fn entropy(shares: &[f64]) -> f64 {
    let h: f64 = shares.iter().filter(|s| **s > 0.0).map(|s| -s * s.ln()).sum();
    h / (shares.len() as f64).ln()
}

fn assert_problem(st: u16, ct: &str, v: &Value, status: u16, what: &str) {
    assert_eq!(st, status, "{what}: {v}");
    assert_eq!(ct, "application/problem+json", "{what}");
    assert_eq!(v["status"], status, "{what}: {v}");
    assert!(v["type"].as_str().is_some_and(|t| t.starts_with("urn:stemedb:problem:")), "{what}: {v}");
}

fn parse_time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("RFC 3339").with_timezone(&Utc)
}

// ---------------------------------------------------------------------------
// Lenses
// ---------------------------------------------------------------------------

/// One contested pair, every lens, exact answers.
///
/// | agent | tier          | conf | value | valid time | weight |
/// |-------|---------------|------|-------|------------|--------|
/// | a1    | regulatory    | 0.6  | A     | 2024-01-01 | 0.6    |
/// | a2    | clinical      | 0.9  | B     | 2024-06-01 | 0.81   |
/// | a3    | community     | 1    | B     | 2023-01-01 | 0.4    |
/// | a3    | community     | 1    | C     | 2022-01-01 | (not counted: a3's older) |
/// | a4    | anecdotal     | —    | C     | 2024-09-01 | 0.2    |
/// | a5    | expert        | 0.95 | A     | — (now)    | 0.57   |
///
/// Consensus: B 1.21, A 1.17, C 0.2 of 2.58.
#[tokio::test]
async fn every_lens_on_a_contested_pair() {
    let env = Env::start();
    let (s, p) = ("drug:contested", "max_daily_dose");
    // a1 first claims C (no source, so community) and retracts it below:
    // retracted assertions count for no lens.
    let retracted = env.post(body(s, p, "C", "a1")).await;
    let w1 = env
        .post(with(
            body(s, p, "A", "a1"),
            json!({"confidence": 0.6, "valid_time": "2024-01-01T00:00:00Z", "source": {"uri": "https://fda.example", "tier": "regulatory"}}),
        ))
        .await;
    let w2 = env
        .post(with(with(body(s, p, "B", "a2"), tier("clinical")), json!({"confidence": 0.9, "valid_time": "2024-06-01T00:00:00Z"})))
        .await;
    let w3 = env
        .post(with(with(body(s, p, "B", "a3"), tier("community")), json!({"confidence": 1.0, "valid_time": "2023-01-01T00:00:00Z"})))
        .await;
    env.post(with(body(s, p, "C", "a3"), json!({"confidence": 1.0, "valid_time": "2022-01-01T00:00:00Z"}))).await;
    let w4 = env.post(with(with(body(s, p, "C", "a4"), tier("anecdotal")), json!({"valid_time": "2024-09-01T00:00:00Z"}))).await;
    let w5 = env.post(with(with(body(s, p, "A", "a5"), tier("expert")), json!({"confidence": 0.95}))).await;
    let (st, _, r) = env.retract(&retracted.id, "a1").await;
    assert_eq!(st, 201, "{r}");
    let last = r["position"].as_u64().expect("position");
    assert_eq!(last, w5.position + 1);

    let total = 0.6 + 0.81 + 0.4 + 0.2 + 0.57;
    let (wa, wb, wc) = (0.6 + 0.57, 0.81 + 0.4, 0.2);
    let check_claims = |v: &Value| {
        let cl = claims(v);
        assert_eq!(cl.len(), 3, "{v}");
        // Heaviest first.
        let order: Vec<&str> = v["claims"].as_array().expect("claims").iter().map(text).collect();
        assert_eq!(order, ["B", "A", "C"], "{v}");
        assert!(close(cl["B"].0, wb) && close(cl["A"].0, wa) && close(cl["C"].0, wc), "{cl:?}");
        assert!(close(cl["B"].1, wb / total) && close(cl["A"].1, wa / total) && close(cl["C"].1, wc / total), "{cl:?}");
        assert_eq!((cl["A"].2, cl["B"].2, cl["C"].2), (2, 2, 1), "{cl:?}");
        // Counted assertions in log order; a3's older C does not count.
        assert_eq!(cl["A"].3, vec![w1.id.clone(), w5.id.clone()]);
        assert_eq!(cl["B"].3, vec![w2.id.clone(), w3.id.clone()]);
        assert_eq!(cl["C"].3, vec![w4.id.clone()]);
        assert_eq!(v["conflict"]["status"], "contested", "{v}");
        assert_close(&v["conflict"]["score"], entropy(&[wb / total, wa / total, wc / total]), "score");
    };

    let recency = env.lens("recency", s, p, last, &[]).await;
    check_claims(&recency);
    assert_eq!(text(&recency["winner"]), "A", "a5 has no valid time, so it counts as recorded now: {recency}");
    assert_eq!(ids(&recency["winner"]["assertions"]), vec![w5.id.clone()]);
    assert_close(&recency["winner"]["confidence"], 0.95, "recency confidence");
    assert_eq!(recency["position"], last);
    assert!(recency.get("tiers").is_none(), "{recency}");

    let confidence = env.lens("confidence", s, p, last, &[]).await;
    check_claims(&confidence);
    // a3 (B, 2023), a3 (C, 2022) and a4 (C, 2024-09) all have confidence 1: the newest wins.
    assert_eq!(text(&confidence["winner"]), "C");
    assert_eq!(ids(&confidence["winner"]["assertions"]), vec![w4.id.clone()]);
    assert_close(&confidence["winner"]["confidence"], 1.0, "confidence confidence");

    let authority = env.lens("authority", s, p, last, &[]).await;
    check_claims(&authority);
    assert_eq!(text(&authority["winner"]), "A");
    assert_eq!(ids(&authority["winner"]["assertions"]), vec![w1.id.clone()]);
    assert_close(&authority["winner"]["confidence"], 0.6, "authority confidence");

    for lens in ["consensus", "skeptic"] {
        let v = env.lens(lens, s, p, last, &[]).await;
        check_claims(&v);
        assert_eq!(text(&v["winner"]), "B", "{lens}: {v}");
        assert_eq!(ids(&v["winner"]["assertions"]), vec![w2.id.clone(), w3.id.clone()]);
        assert_close(&v["winner"]["confidence"], wb / total, lens);
    }

    let layered = env.lens("layered", s, p, last, &[]).await;
    check_claims(&layered);
    let tiers = layered["tiers"].as_object().expect("tiers");
    let names: Vec<&str> = tiers.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ["regulatory", "clinical", "expert", "community", "anecdotal"].into();
    assert_eq!(names.iter().copied().collect::<BTreeSet<_>>(), want, "observational has nothing live: {layered}");
    let expect_tier = |t: &str, value: &str, weight: f64, id: &str| {
        let r = &tiers[t];
        assert_eq!(text(&r["winner"]), value, "{t}: {r}");
        assert_close(&r["winner"]["confidence"], 1.0, t);
        assert_eq!(ids(&r["winner"]["assertions"]), vec![id.to_string()], "{t}");
        let cl = claims(r);
        assert_eq!(cl.len(), 1, "{t}: {r}");
        assert_close(&json!(cl[value].0), weight, t);
        assert_eq!(r["conflict"]["status"], "unanimous", "{t}");
        assert_close(&r["conflict"]["score"], 0.0, t);
    };
    expect_tier("regulatory", "A", 0.6, &w1.id);
    expect_tier("clinical", "B", 0.81, &w2.id);
    expect_tier("expert", "A", 0.57, &w5.id);
    // Within community, a3 has one voice: its newest (B, 2023), not C (2022)
    // and not the retracted first POST.
    expect_tier("community", "B", 0.4, &w3.id);
    expect_tier("anecdotal", "C", 0.2, &w4.id);
    // The overall winner is the strongest tier's.
    assert_eq!(text(&layered["winner"]), "A");
    assert_eq!(ids(&layered["winner"]["assertions"]), vec![w1.id.clone()]);
    assert_close(&layered["winner"]["confidence"], 1.0, "layered confidence");

    // The subject view answers the same for each lens.
    for lens in ["recency", "confidence", "authority", "consensus", "skeptic", "layered"] {
        let v = env.get_ok(&format!("/v1/subjects/{s}"), &[("lens", lens)]).await;
        let single = env.lens(lens, s, p, last, &[]).await;
        let row = &v["predicates"][p];
        for k in ["winner", "claims", "conflict", "tiers"] {
            assert_eq!(row.get(k), single.get(k), "{lens}: {k}");
        }
    }
}

/// Consensus ties go to the claim holding the newest counted assertion;
/// agreed / unanimous statuses and their scores.
#[tokio::test]
async fn consensus_ties_and_statuses() {
    let env = Env::start();
    let tie = ("q:tie", "p");
    env.post(with(body(tie.0, tie.1, "old", "t1"), json!({"valid_time": "2020-01-01T00:00:00Z"}))).await;
    let newer = env.post(with(body(tie.0, tie.1, "new", "t2"), json!({"valid_time": "2021-01-01T00:00:00Z"}))).await;
    // Later in the log but older in valid time: position does not beat valid time.
    let last =
        env.post(with(body(tie.0, tie.1, "older-later", "t3"), json!({"valid_time": "2019-01-01T00:00:00Z", "confidence": 0.0}))).await;
    let v = env.lens("consensus", tie.0, tie.1, last.position, &[]).await;
    assert_eq!(text(&v["winner"]), "new", "{v}");
    assert_eq!(ids(&v["winner"]["assertions"]), vec![newer.id]);
    assert_close(&v["winner"]["confidence"], 0.5, "tie share");
    let cl = claims(&v);
    assert_eq!(cl["older-later"].0, 0.0, "confidence 0 weighs nothing");
    assert_eq!(v["conflict"]["status"], "contested");
    // Shares 0.5, 0.5, 0 over k = 3 claims (no score above 1 or below 0, not even by rounding).
    assert_close(&v["conflict"]["score"], 2.0f64.ln() / 3.0f64.ln(), "tie score");

    // Ties in exact arithmetic are ties, whatever f64 says: X = 0.4 + 0.2
    // (older), Y = 0.6 (newer) → Y. And 0.9 of 1.2 is exactly 0.75: agreed.
    let f_tie = ("q:float-tie", "p");
    env.post(with(with(body(f_tie.0, f_tie.1, "X", "fc"), tier("community")), json!({"valid_time": "2020-01-01T00:00:00Z"}))).await;
    env.post(with(with(body(f_tie.0, f_tie.1, "X", "fa"), tier("anecdotal")), json!({"valid_time": "2020-01-01T00:00:00Z"}))).await;
    let y = env.post(with(with(body(f_tie.0, f_tie.1, "Y", "fe"), tier("expert")), json!({"valid_time": "2024-01-01T00:00:00Z"}))).await;
    let v = env.lens("consensus", f_tie.0, f_tie.1, y.position, &[]).await;
    assert_eq!(text(&v["winner"]), "Y", "{v}");
    assert_close(&v["winner"]["confidence"], 0.5, "float tie share");
    assert!(f(&v["conflict"]["score"]) <= 1.0, "{v}");
    // All the weight on one of two claims: score 0, serialized as 0.0, not -0.0.
    let zero = ("q:zero-score", "p");
    env.post(body(zero.0, zero.1, "heavy", "z1")).await;
    let z = env.post(with(body(zero.0, zero.1, "weightless", "z2"), json!({"confidence": 0.0}))).await;
    let v = env.lens("consensus", zero.0, zero.1, z.position, &[]).await;
    assert_eq!(v["conflict"]["score"].to_string(), "0.0", "{v}");
    assert_eq!(v["conflict"]["status"], "agreed");
    let f_agree = ("q:float-agreed", "p");
    env.post(with(with(body(f_agree.0, f_agree.1, "X", "gr"), tier("regulatory")), json!({"confidence": 0.9}))).await;
    env.post(with(with(body(f_agree.0, f_agree.1, "Y", "gc"), tier("community")), json!({"confidence": 0.5}))).await;
    let last = env.post(with(with(body(f_agree.0, f_agree.1, "Y", "ga"), tier("anecdotal")), json!({"confidence": 0.5}))).await;
    let v = env.lens("skeptic", f_agree.0, f_agree.1, last.position, &[]).await;
    assert_close(&v["winner"]["confidence"], 0.75, "share of exactly 0.75");
    assert_eq!(v["conflict"]["status"], "agreed", "{v}");

    let agreed = ("q:agreed", "p");
    let mut pos = 0;
    for i in 0..4 {
        pos = env.post(body(agreed.0, agreed.1, "yes", &format!("g{i}"))).await.position;
    }
    pos = pos.max(env.post(body(agreed.0, agreed.1, "no", "g4")).await.position);
    let v = env.lens("skeptic", agreed.0, agreed.1, pos, &[]).await;
    assert_eq!(text(&v["winner"]), "yes");
    assert_close(&v["winner"]["confidence"], 0.8, "agreed share");
    assert_eq!(v["conflict"]["status"], "agreed", "{v}");
    assert_close(&v["conflict"]["score"], entropy(&[0.8, 0.2]), "agreed score");

    let one = ("q:one", "p");
    let a = env.post(body(one.0, one.1, "only", "u1")).await;
    let b = env.post(with(body(one.0, one.1, "only", "u2"), json!({"confidence": 0.5}))).await;
    let v = env.lens("consensus", one.0, one.1, b.position, &[]).await;
    assert_eq!(v["conflict"]["status"], "unanimous");
    assert_close(&v["conflict"]["score"], 0.0, "unanimous score");
    assert_close(&v["winner"]["confidence"], 1.0, "unanimous share");
    assert_eq!(ids(&v["winner"]["assertions"]), vec![a.id, b.id]);
    assert_close(&v["claims"][0]["weight"], 0.4 + 0.2, "weight");
    assert_eq!(v["claims"][0]["agents"], 2);
}

/// A pair with nothing live: every lens answers 200 with no winner.
/// An unknown lens is a 404 that lists the lenses.
#[tokio::test]
async fn empty_pair_and_unknown_lens() {
    let env = Env::start();
    let w = env.post(body("drug:other", "p", "x", "a")).await;
    for lens in ["recency", "confidence", "authority", "consensus", "skeptic", "layered"] {
        for extra in [&[][..], &[("decay", "true")][..], &[("as_of", w.recorded_at.as_str())][..]] {
            let v = env.lens(lens, "drug:nothing", "p", w.position, extra).await;
            assert!(v["winner"].is_null(), "{lens} {extra:?}: {v}");
            assert_eq!(v["claims"], json!([]), "{lens}: {v}");
            assert_eq!(v["conflict"]["status"], "empty", "{lens}: {v}");
            assert_close(&v["conflict"]["score"], 0.0, lens);
            if lens == "layered" {
                assert_eq!(v["tiers"], json!({}), "{v}");
            }
        }
    }
    let lenses = json!(["recency", "confidence", "authority", "consensus", "skeptic", "layered"]);
    let (st, ct, v) = env.get("/v1/lenses/majority", &[("subject", "drug:other"), ("predicate", "p")]).await;
    assert_problem(st, &ct, &v, 404, "unknown lens");
    assert_eq!(v["lenses"], lenses, "{v}");
    let (st, ct, v) = env.get("/v1/subjects/drug:other", &[("lens", "majority")]).await;
    assert_problem(st, &ct, &v, 404, "unknown lens on subjects");
    assert_eq!(v["lenses"], lenses, "{v}");
    // Missing or unknown parameters are 400s naming the parameter.
    let (st, ct, v) = env.get("/v1/lenses/consensus", &[("subject", "drug:other")]).await;
    assert_problem(st, &ct, &v, 400, "missing predicate");
    assert_eq!(v["parameter"], "predicate");
    let (st, ct, v) = env.get("/v1/lenses/consensus", &[("subject", "s"), ("predicate", "p"), ("colour", "red")]).await;
    assert_problem(st, &ct, &v, 400, "unknown parameter");
    assert_eq!(v["parameter"], "colour");
    let (st, ct, v) = env.get("/v1/lenses/consensus", &[("subject", "s"), ("predicate", "p"), ("as_of", "yesterday")]).await;
    assert_problem(st, &ct, &v, 400, "bad as_of");
    assert_eq!(v["parameter"], "as_of");
    let (st, ct, v) = env.get("/v1/lenses/consensus", &[("subject", "s"), ("predicate", "p"), ("decay", "maybe")]).await;
    assert_problem(st, &ct, &v, 400, "bad decay");
    assert_eq!(v["parameter"], "decay");
}

// ---------------------------------------------------------------------------
// Retraction and supersession
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retraction_rules_and_effects() {
    let env = Env::start();
    let (s, p) = ("drug:r", "dose");
    let old = env.post(with(body(s, p, "10 mg", "alice"), json!({"valid_time": "2024-01-01T00:00:00Z"}))).await;
    let new = env.post(with(body(s, p, "20 mg", "alice"), json!({"valid_time": "2025-01-01T00:00:00Z"}))).await;
    let bob = env.post(with(body(s, p, "30 mg", "bob"), json!({"confidence": 0.5}))).await;

    let v = env.lens("consensus", s, p, bob.position, &[]).await;
    let cl = claims(&v);
    assert_eq!(cl.keys().collect::<Vec<_>>(), ["20 mg", "30 mg"], "alice has one voice, her newest: {v}");
    assert_eq!(text(&v["winner"]), "20 mg");

    // Only the agent that made an assertion may retract it.
    let (st, ct, r) = env.retract(&new.id, "bob").await;
    assert_problem(st, &ct, &r, 403, "retraction by another agent");
    // Unknown (well-formed) and malformed ids are 404s.
    let unknown = "0".repeat(64);
    let (st, ct, r) = env.retract(&unknown, "alice").await;
    assert_problem(st, &ct, &r, 404, "retraction of an unknown id");
    let (st, ct, r) = env.retract("not-an-id", "alice").await;
    assert_problem(st, &ct, &r, 404, "retraction of a malformed id");
    let (st, _, v) = env.get(&format!("/v1/assertions/{unknown}"), &[]).await;
    assert_eq!(st, 404, "{v}");

    let (st, _, r) = env.retract(&new.id, "alice").await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["status"], "created");
    let retraction_pos = r["position"].as_u64().expect("position");
    assert_eq!(retraction_pos, bob.position + 1, "rejected retractions append nothing");
    let (st, _, again) = env.retract(&new.id, "alice").await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["position"], retraction_pos, "a repeat answers with the first retraction's position");

    let got = env.get_ok(&format!("/v1/assertions/{}", new.id), &[("min_position", &retraction_pos.to_string())]).await;
    assert_eq!(got["retracted"], true, "{got}");
    assert_eq!(got["retraction"]["position"], retraction_pos);
    assert_eq!(got["retraction"]["agent"], "alice");
    assert_eq!(got["retraction"]["reason"], "test");
    assert_eq!(got["position"], new.position);
    let untouched = env.get_ok(&format!("/v1/assertions/{}", old.id), &[]).await;
    assert_eq!(untouched["retracted"], false);
    assert!(untouched["retraction"].is_null());

    // With her newest retracted, alice's older assertion counts again.
    for lens in ["consensus", "recency"] {
        let v = env.lens(lens, s, p, retraction_pos, &[]).await;
        let cl = claims(&v);
        assert_eq!(cl.keys().collect::<Vec<_>>(), ["10 mg", "30 mg"], "{lens}: {v}");
        assert_eq!(cl["10 mg"].3, vec![old.id.clone()]);
    }
    let v = env.lens("consensus", s, p, retraction_pos, &[]).await;
    assert_eq!(text(&v["winner"]), "10 mg");
    assert_close(&v["winner"]["confidence"], 0.4 / 0.6, "share after retraction");

    // Retract everything: the pair is empty again.
    for (id, agent) in [(&old.id, "alice"), (&bob.id, "bob")] {
        let (st, _, r) = env.retract(id, agent).await;
        assert_eq!(st, 201, "{r}");
    }
    let v = env.lens("authority", s, p, retraction_pos + 2, &[]).await;
    assert!(v["winner"].is_null(), "{v}");
    assert_eq!(v["conflict"]["status"], "empty");
}

#[tokio::test]
async fn supersession_rules_and_effects() {
    let env = Env::start();
    let (s, p) = ("drug:sup", "dose");
    let x = env.post(body(s, p, "X", "alice")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let y_body = with(body(s, p, "Y", "alice"), json!({"supersedes": [x.id], "valid_time": "2000-01-01T00:00:00Z"}));
    let y = env.post(y_body).await;
    let z = env.post(body(s, p, "Z", "bob")).await;

    // The superseded assertion no longer counts, even though the one that
    // replaced it is older in valid time (so would lose "newest" otherwise).
    let v = env.lens("consensus", s, p, z.position, &[]).await;
    let cl = claims(&v);
    assert_eq!(cl.keys().collect::<Vec<_>>(), ["Y", "Z"], "{v}");
    for lens in ["recency", "confidence", "authority"] {
        let v = env.lens(lens, s, p, z.position, &[]).await;
        assert_ne!(ids(&v["winner"]["assertions"]), vec![x.id.clone()], "{lens}: {v}");
    }
    let v = env.lens("recency", s, p, z.position, &[]).await;
    assert_eq!(text(&v["winner"]), "Z");

    let got = env.get_ok(&format!("/v1/assertions/{}", x.id), &[("min_position", &z.position.to_string())]).await;
    assert_eq!(got["superseded_by"], json!([y.id]), "{got}");
    assert_eq!(got["retracted"], false);
    let got = env.get_ok(&format!("/v1/assertions/{}", y.id), &[]).await;
    assert_eq!(got["superseded_by"], json!([]));
    assert_eq!(got["assertion"]["supersedes"], json!([x.id]));

    // Superseding another agent's assertion, or one about another pair: 422.
    let (st, ct, r) =
        common::post_json(&env.c, &env.url("/v1/assertions"), &with(body(s, p, "W", "bob"), json!({"supersedes": [y.id]}))).await;
    assert_problem(st, &ct, &r, 422, "superseding another agent's assertion");
    assert_eq!(r["errors"][0]["field"], "supersedes", "{r}");
    let elsewhere = env.post(body(s, "other_predicate", "Q", "alice")).await;
    let (st, ct, r) =
        common::post_json(&env.c, &env.url("/v1/assertions"), &with(body(s, p, "W", "alice"), json!({"supersedes": [elsewhere.id]}))).await;
    assert_problem(st, &ct, &r, 422, "superseding an assertion of another pair");
    let (st, ct, r) =
        common::post_json(&env.c, &env.url("/v1/assertions"), &with(body(s, p, "W", "alice"), json!({"supersedes": ["1".repeat(64)]})))
            .await;
    assert_problem(st, &ct, &r, 422, "superseding an unknown assertion");

    // Supersession is permanent: retracting Y does not revive X.
    let (st, _, r) = env.retract(&y.id, "alice").await;
    assert_eq!(st, 201, "{r}");
    let pos = r["position"].as_u64().expect("position");
    assert_eq!(pos, elsewhere.position + 1, "rejected writes append nothing");
    let v = env.lens("consensus", s, p, pos, &[]).await;
    assert_eq!(claims(&v).keys().collect::<Vec<_>>(), ["Z"], "{v}");
    assert_eq!(v["conflict"]["status"], "unanimous");
    // The same holds for a replay through as_of.
    let v = env.lens("consensus", s, p, pos, &[("as_of", "2999-01-01T00:00:00Z")]).await;
    assert_eq!(claims(&v).keys().collect::<Vec<_>>(), ["Z"], "{v}");
    // As of before Y was recorded, X was still live.
    let v = env.lens("consensus", s, p, pos, &[("as_of", &x.recorded_at)]).await;
    assert_eq!(claims(&v).keys().collect::<Vec<_>>(), ["X"], "{v}");
    assert_eq!(ids(&v["winner"]["assertions"]), vec![x.id.clone()]);
}

// ---------------------------------------------------------------------------
// as_of and decay
// ---------------------------------------------------------------------------

#[tokio::test]
async fn as_of_is_transaction_time() {
    let env = Env::start();
    let (s, p) = ("drug:asof", "dose");
    let x1 = env.post(body(s, p, "X", "a1")).await;
    let x2 = env.post(body(s, p, "X", "a2")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let y3 = env.post(body(s, p, "Y", "a3")).await;
    let y4 = env.post(body(s, p, "Y", "a4")).await;
    let y5 = env.post(body(s, p, "Y", "a5")).await;
    let (st, _, r) = env.retract(&x1.id, "a1").await;
    assert_eq!(st, 201, "{r}");
    let last = r["position"].as_u64().expect("position");
    let last_at = r["recorded_at"].as_str().expect("recorded_at").to_string();
    assert!(parse_time(&x2.recorded_at) < parse_time(&y3.recorded_at), "bursts have distinct recorded_at");

    // Between the bursts: only X, by two agents, and the retraction does not count yet.
    let v = env.lens("consensus", s, p, last, &[("as_of", &x2.recorded_at)]).await;
    assert_eq!(v["position"], x2.position, "{v}");
    assert_eq!(v["as_of"], x2.recorded_at);
    let cl = claims(&v);
    assert_eq!(cl.keys().collect::<Vec<_>>(), ["X"], "{v}");
    assert_eq!(cl["X"].3, vec![x1.id.clone(), x2.id.clone()]);
    assert_close(&json!(cl["X"].0), 0.8, "X weight as of the first burst");
    assert_eq!(v["conflict"]["status"], "unanimous");

    // After everything: Y (3 agents) against X (a2 only).
    for as_of in [last_at.as_str(), "2999-01-01T00:00:00Z"] {
        let v = env.lens("consensus", s, p, last, &[("as_of", as_of)]).await;
        assert_eq!(v["position"], last, "{v}");
        let cl = claims(&v);
        assert_eq!(cl["Y"].3, vec![y3.id.clone(), y4.id.clone(), y5.id.clone()], "{v}");
        assert_eq!(cl["X"].3, vec![x2.id.clone()], "{v}");
        assert_eq!(text(&v["winner"]), "Y");
        assert_close(&v["winner"]["confidence"], 0.75, "Y share");
        assert_eq!(v["conflict"]["status"], "agreed");
        // The replay answers exactly what the materialized view answers.
        let plain = env.lens("consensus", s, p, last, &[]).await;
        for k in ["winner", "claims", "conflict"] {
            assert_eq!(v[k], plain[k], "{k}");
        }
    }

    // Before the first event: empty, position 0.
    let before = parse_time(&x1.recorded_at) - chrono::Duration::milliseconds(1);
    let before = before.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    for lens in ["consensus", "recency", "layered"] {
        let v = env.lens(lens, s, p, last, &[("as_of", &before)]).await;
        assert_eq!(v["position"], 0, "{v}");
        assert!(v["winner"].is_null(), "{v}");
        assert_eq!(v["claims"], json!([]));
        assert_eq!(v["conflict"]["status"], "empty");
    }
    // Any RFC 3339 offset names the same instant.
    let shifted = parse_time(&x2.recorded_at).with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("offset"));
    let v = env.lens("recency", s, p, last, &[("as_of", &shifted.to_rfc3339_opts(chrono::SecondsFormat::Nanos, false))]).await;
    assert_eq!(v["position"], x2.position, "{v}");
    assert_eq!(ids(&v["winner"]["assertions"]), vec![x2.id.clone()], "{v}");
}

#[tokio::test]
async fn decay_weights_old_claims_down() {
    let env = Env::start();
    let (s, p) = ("drug:decay", "dose");
    let old_time = "2024-11-24T00:00:00Z";
    env.post(with(with(body(s, p, "OLD", "c1"), tier("community")), json!({"valid_time": old_time}))).await;
    env.post(with(with(body(s, p, "OLD", "c2"), tier("community")), json!({"valid_time": old_time}))).await;
    let fresh = env.post(with(body(s, p, "NEW", "c3"), tier("community"))).await;
    let (r, rp) = ("drug:decay-reg", "dose");
    let reg_time = "2016-01-01T00:00:00Z";
    let reg = env.post(with(with(body(r, rp, "R", "r1"), tier("regulatory")), json!({"valid_time": reg_time, "confidence": 0.5}))).await;
    let last = reg.position;

    // Without decay two old voices beat one fresh one.
    let v = env.lens("consensus", s, p, last, &[]).await;
    assert_eq!(text(&v["winner"]), "OLD", "{v}");
    assert_close(&json!(claims(&v)["OLD"].0), 0.8, "undecayed");
    assert_eq!(v["decay"], false);

    // With decay (reference: now) the old claim has lost ~8 half-lives.
    let v = env.lens("consensus", s, p, last, &[("decay", "true")]).await;
    assert_eq!(v["decay"], true);
    assert_eq!(text(&v["winner"]), "NEW", "{v}");
    let cl = claims(&v);
    assert!(cl["OLD"].0 < 0.01, "{cl:?}");
    assert!(cl["NEW"].0 > 0.399 && cl["NEW"].0 <= 0.4, "a fresh claim keeps its weight: {cl:?}");

    // With as_of the reference is as_of: exact numbers.
    let reference = (parse_time(&fresh.recorded_at) + chrono::Duration::seconds(2)).trunc_subsecs(0);
    let as_of = reference.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let v = env.lens("consensus", s, p, last, &[("decay", "true"), ("as_of", &as_of)]).await;
    let half_life = 90.0 * 86_400.0;
    let age_old = (reference - parse_time(old_time)).num_milliseconds() as f64 / 1000.0;
    let age_new = (reference - parse_time(&fresh.recorded_at)).num_milliseconds() as f64 / 1000.0;
    let (w_old, w_new) = (2.0 * 0.4 * 0.5f64.powf(age_old / half_life), 0.4 * 0.5f64.powf(age_new / half_life));
    let cl = claims(&v);
    assert!((cl["OLD"].0 - w_old).abs() <= 1e-9, "{} vs {w_old}", cl["OLD"].0);
    assert!((cl["NEW"].0 - w_new).abs() <= 1e-9, "{} vs {w_new}", cl["NEW"].0);
    assert_close(&v["winner"]["confidence"], w_new / (w_old + w_new), "decayed share");

    // Regulatory never decays, however old.
    for extra in [&[("decay", "true")][..], &[("decay", "true"), ("as_of", as_of.as_str())][..], &[][..]] {
        let v = env.lens("consensus", r, rp, last, extra).await;
        assert_eq!(f(&v["claims"][0]["weight"]), 0.5, "{extra:?}: {v}");
    }
}

// ---------------------------------------------------------------------------
// Subjects and the KV endpoints
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subject_lists_its_predicates() {
    let env = Env::start();
    env.post(body("drug:a", "dose", "1", "x")).await;
    env.post(body("drug:a", "dose", "2", "y")).await;
    env.post(body("drug:a", "colour", "white", "x")).await;
    // Subjects that share a prefix stay apart.
    env.post(body("drug:ab", "dose", "9", "x")).await;
    let last = env.post(body("drug:a-b", "dose", "8", "x")).await.position;
    let v = env.get_ok("/v1/subjects/drug:a", &[("min_position", &last.to_string())]).await;
    assert_eq!(v["subject"], "drug:a");
    assert_eq!(v["lens"], "consensus", "consensus is the default");
    assert_eq!(v["position"], last);
    let preds = v["predicates"].as_object().expect("predicates");
    assert_eq!(preds.keys().collect::<Vec<_>>(), ["colour", "dose"], "{v}");
    assert_eq!(text(&preds["colour"]["winner"]), "white");
    assert_eq!(preds["dose"]["conflict"]["status"], "contested");
    let v = env.get_ok("/v1/subjects/drug:a", &[("lens", "recency")]).await;
    assert_eq!(v["lens"], "recency");
    assert_eq!(text(&v["predicates"]["dose"]["winner"]), "2", "{v}");
    let v = env.get_ok("/v1/subjects/drug:none", &[]).await;
    assert_eq!(v["predicates"], json!({}));
}

#[tokio::test]
async fn get_assertion_by_id() {
    let env = Env::start();
    let b = with(
        body("drug:g", "dose", "5 mg", "agent-g"),
        json!({"confidence": 0.7, "valid_time": "2024-02-03T04:05:06.789Z", "source": {"uri": "https://x.example", "tier": "expert"}}),
    );
    let w = env.post(b).await;
    let v = env.get_ok(&format!("/v1/assertions/{}", w.id), &[("min_position", &w.position.to_string())]).await;
    assert_eq!(v["id"], w.id);
    assert_eq!(v["position"], w.position);
    assert_eq!(v["recorded_at"], w.recorded_at);
    assert_eq!(v["assertion"]["subject"], "drug:g");
    assert_eq!(v["assertion"]["object"], json!({"type": "text", "value": "5 mg"}));
    assert_eq!(v["assertion"]["confidence"], 0.7);
    assert_eq!(v["assertion"]["valid_time"], "2024-02-03T04:05:06.789Z");
    assert_eq!(v["assertion"]["source"]["tier"], "expert");
    assert_eq!(v["retracted"], false);
    assert!(v["retraction"].is_null());
    assert_eq!(v["superseded_by"], json!([]));
    let (st, ct, e) = env.get(&format!("/v1/assertions/{}", w.id), &[("limit", "3")]).await;
    assert_problem(st, &ct, &e, 400, "unknown parameter on get");
}

/// Lists every page of `GET /v1/assertions` with `filters` and `limit`,
/// checking that pages are within the limit and cursors only move forward.
async fn all_pages(env: &Env, filters: &[(&str, &str)], limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let limit_s = limit.to_string();
    for _ in 0..1000 {
        let mut q: Vec<(&str, &str)> = filters.to_vec();
        q.push(("limit", &limit_s));
        if let Some(c) = &cursor {
            q.push(("cursor", c));
        }
        let v = env.get_ok("/v1/assertions", &q).await;
        let items = v["items"].as_array().expect("items");
        assert!(items.len() <= limit, "{filters:?}: page of {} > {limit}", items.len());
        out.extend(items.iter().cloned());
        match v["next"].as_str() {
            None => {
                assert!(v["next"].is_null(), "{v}");
                return out;
            }
            Some(n) => {
                assert!(!items.is_empty() || cursor.is_some(), "empty first page with a next cursor");
                if let (Some(prev), Ok(n)) = (cursor.as_deref().and_then(|c| c.parse::<u64>().ok()), n.parse::<u64>()) {
                    assert!(n > prev, "cursor must advance");
                }
                cursor = Some(n.to_string());
            }
        }
    }
    panic!("pagination did not end");
}

#[tokio::test]
async fn list_filters_and_pagination() {
    let env = Env::start();
    // 3 subjects × 2 predicates × 3 agents, interleaved with retractions
    // (which list endpoints never return) and a superseding assertion.
    let mut written: Vec<(String, u64, String, String, String)> = Vec::new(); // (id, position, subject, predicate, agent)
    let mut last = 0;
    for round in 0..2 {
        for s in ["s:1", "s:2", "s:10"] {
            for p in ["p", "q"] {
                for a in ["ag-a", "ag-b", "ag-c"] {
                    let w = env.post(body(s, p, &format!("v{round}"), a)).await;
                    written.push((w.id.clone(), w.position, s.into(), p.into(), a.into()));
                    last = w.position;
                    if round == 0 && a == "ag-b" {
                        let (st, _, r) = env.retract(&w.id, a).await;
                        assert_eq!(st, 201, "{r}");
                        last = r["position"].as_u64().expect("position");
                    }
                }
            }
        }
    }
    assert_eq!(written.len(), 36);
    let mp = last.to_string();
    // Catch up once; later reads see at least this.
    env.get_ok("/v1/assertions", &[("min_position", &mp), ("limit", "1")]).await;

    let combos: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("subject", "s:1")],
        vec![("subject", "s:10")],
        vec![("predicate", "q")],
        vec![("agent", "ag-b")],
        vec![("subject", "s:2"), ("predicate", "p")],
        vec![("subject", "s:2"), ("agent", "ag-c")],
        vec![("predicate", "p"), ("agent", "ag-a")],
        vec![("subject", "s:10"), ("predicate", "q"), ("agent", "ag-a")],
        vec![("subject", "s:none")],
        vec![("agent", "nobody")],
    ];
    for filters in &combos {
        let get = |k: &str| filters.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let want: Vec<(String, u64)> = written
            .iter()
            .filter(|(_, _, s, p, a)| {
                get("subject").is_none_or(|x| x == s) && get("predicate").is_none_or(|x| x == p) && get("agent").is_none_or(|x| x == a)
            })
            .map(|(id, pos, ..)| (id.clone(), *pos))
            .collect();
        for limit in [1usize, 2, 7, 100, 1000] {
            let got: Vec<(String, u64)> = all_pages(&env, filters, limit)
                .await
                .iter()
                .map(|v| (v["id"].as_str().expect("id").to_string(), v["position"].as_u64().expect("position")))
                .collect();
            assert_eq!(got, want, "filters {filters:?} limit {limit}: every item once, in log order");
        }
        // Items carry their state.
        let page = env.get_ok("/v1/assertions", filters).await;
        for item in page["items"].as_array().expect("items") {
            let retracted = item["assertion"]["agent"] == "ag-b" && item["assertion"]["object"]["value"] == "v0";
            assert_eq!(item["retracted"], retracted, "{item}");
        }
    }

    // The default page is 100 items; at most 1000 per page.
    let batch: Vec<Value> = (0..150).map(|i| body("s:many", "p", &format!("v{i}"), "bulk")).collect();
    let (st, _, r) = common::post_json(&env.c, &env.url("/v1/assertions/batch"), &json!({"assertions": batch})).await;
    assert_eq!(st, 200, "{r}");
    let bulk_last = r["results"][149]["position"].as_u64().expect("position").to_string();
    let v = env.get_ok("/v1/assertions", &[("agent", "bulk"), ("min_position", &bulk_last)]).await;
    assert_eq!(v["items"].as_array().expect("items").len(), 100);
    assert!(v["next"].is_string(), "{v}");
    let v = env.get_ok("/v1/assertions", &[("limit", "1000")]).await;
    assert_eq!(v["items"].as_array().expect("items").len(), 186);
    assert!(v["next"].is_null());

    for (k, bad) in [("limit", "0"), ("limit", "1001"), ("limit", "-1"), ("limit", "ten"), ("cursor", "abc"), ("cursor", "-5")] {
        let (st, ct, v) = env.get("/v1/assertions", &[(k, bad)]).await;
        assert_problem(st, &ct, &v, 400, &format!("{k}={bad}"));
        assert_eq!(v["parameter"], k, "{v}");
    }
    let (st, ct, v) = env.get("/v1/assertions", &[("tier", "expert")]).await;
    assert_problem(st, &ct, &v, 400, "unknown filter");
}

#[tokio::test]
async fn history_in_log_order_with_retractions() {
    let env = Env::start();
    let (s, p) = ("drug:h", "dose");
    let a = env.post(body(s, p, "1", "x")).await;
    env.post(body(s, "other", "1", "x")).await;
    let b = env.post(body(s, p, "2", "y")).await;
    env.post(body("drug:h2", p, "1", "x")).await;
    let (st, _, r) = env.retract(&a.id, "x").await;
    assert_eq!(st, 201, "{r}");
    let ra = r["position"].as_u64().expect("position");
    let c = env.post(with(body(s, p, "3", "y"), json!({"supersedes": [b.id]}))).await;

    let v = env.get_ok("/v1/history", &[("subject", s), ("predicate", p), ("min_position", &c.position.to_string())]).await;
    assert_eq!(v["subject"], s);
    assert_eq!(v["predicate"], p);
    assert_eq!(v["position"], c.position);
    let events = v["events"].as_array().expect("events");
    let got: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| (e["position"].as_u64().expect("position"), e["type"].as_str().expect("type"), e["assertion"]["id"].as_str().expect("id")))
        .collect();
    assert_eq!(
        got,
        vec![
            (a.position, "assertion_recorded", a.id.as_str()),
            (b.position, "assertion_recorded", b.id.as_str()),
            (ra, "assertion_retracted", a.id.as_str()),
            (c.position, "assertion_recorded", c.id.as_str()),
        ],
        "{v}"
    );
    assert_eq!(events[0]["recorded_at"], a.recorded_at);
    assert_eq!(events[2]["recorded_at"], r["recorded_at"]);
    assert_eq!(events[2]["assertion"]["retracted"], true);
    assert_eq!(events[1]["assertion"]["superseded_by"], json!([c.id]));
    let v = env.get_ok("/v1/history", &[("subject", s), ("predicate", "never")]).await;
    assert_eq!(v["events"], json!([]));
    let (st, ct, v) = env.get("/v1/history", &[("subject", s)]).await;
    assert_problem(st, &ct, &v, 400, "history without predicate");
}

// ---------------------------------------------------------------------------
// Read-your-writes, readiness, metrics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn read_your_writes() {
    let env = Env::start();
    for i in 0..200u32 {
        let subject = format!("ryw:{}", i % 7);
        let w = env.post(body(&subject, "p", &format!("v{i}"), &format!("agent-{i}"))).await;
        let mp = w.position.to_string();
        match i % 4 {
            0 | 1 => {
                // The newest assertion (no valid time: recorded now, highest position) wins recency.
                let v = env.lens("recency", &subject, "p", w.position, &[]).await;
                assert_eq!(ids(&v["winner"]["assertions"]), vec![w.id.clone()], "write {i}: {v}");
                assert!(v["position"].as_u64().expect("position") >= w.position);
            }
            2 => {
                let v = env.get_ok(&format!("/v1/assertions/{}", w.id), &[("min_position", &mp)]).await;
                assert_eq!(v["id"], w.id, "write {i}");
            }
            _ => {
                let v = env.get_ok("/v1/history", &[("subject", &subject), ("predicate", "p"), ("min_position", &mp)]).await;
                let last = v["events"].as_array().and_then(|e| e.last()).expect("an event");
                assert_eq!(last["assertion"]["id"], w.id, "write {i}");
            }
        }
    }

    // A position the log has not reached: 503 with Retry-After after wait_ms.
    let url = format!("{}?subject=ryw:0&predicate=p&min_position=1000000000&wait_ms=100", env.url("/v1/lenses/consensus"));
    let resp = env.c.get(&url).send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().get("retry-after").is_some(), "Retry-After header");
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
    let v: Value = resp.json().await.expect("problem body");
    assert_eq!(v["status"], 503);
    for path in ["/v1/assertions?min_position=1000000000&wait_ms=100", "/v1/subjects/ryw:0?min_position=1000000000&wait_ms=100"] {
        let (st, ct, v) = common::get_json(&env.c, &env.url(path)).await;
        assert_problem(st, &ct, &v, 503, path);
    }
    let (st, ct, v) = env.get("/v1/assertions", &[("min_position", "1"), ("wait_ms", "10001")]).await;
    assert_problem(st, &ct, &v, 400, "wait_ms above the maximum");
}

#[tokio::test]
async fn ready_and_metrics() {
    let env = Env::start();
    let mut last = 0;
    for i in 0..5 {
        last = env.post(body("m:1", "p", "v", &format!("a{i}"))).await.position;
    }
    env.lens("consensus", "m:1", "p", last, &[]).await;
    env.get_ok("/v1/assertions", &[("min_position", &last.to_string())]).await;
    let v = env.get_ok("/v1/ready", &[]).await;
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(v["position"], last);
    for name in ["kv", "lenses"] {
        let p = &v["projections"][name];
        assert_eq!(p["position"], last, "{name}: {v}");
        assert_eq!(p["lag"], 0, "{name}");
        assert_eq!(p["failing"], false, "{name}");
    }
    let text = env.c.get(env.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    for needle in [
        "stemedb_projection_position{projection=\"kv\"}",
        "stemedb_projection_position{projection=\"lenses\"}",
        "stemedb_projection_lag_events",
        "stemedb_projection_apply_seconds_bucket",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    let kv_line = text.lines().find(|l| l.starts_with("stemedb_projection_position{projection=\"kv\"}")).expect("kv position line");
    assert_eq!(kv_line.split_whitespace().last().and_then(|n| n.parse::<f64>().ok()), Some(last as f64), "{kv_line}");
}

/// Readiness counts only what a projection misses beyond
/// STEMEDB_READY_MAX_DELAY: a search index that shows writes at its next
/// commit (here once an hour) is ready while the write is younger than the
/// delay (5 s, so that a slow machine still checks in time), and not
/// ready, by name, once it is older.
#[tokio::test]
async fn readiness_allows_events_younger_than_the_delay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let defs = tmp.path().join("defs");
    std::fs::create_dir_all(&defs).expect("mkdir");
    std::fs::write(defs.join("lenses.toml"), stemedb::lens::definitions::DEFAULT_LENSES_TOML).expect("write lenses.toml");
    let search = stemedb::projection::search::schema::DEFAULT_SEARCH_TOML.replace("interval_ms = 500", "interval_ms = 3600000");
    assert_ne!(search, stemedb::projection::search::schema::DEFAULT_SEARCH_TOML);
    std::fs::write(defs.join("search.toml"), search).expect("write search.toml");
    let defs_s = defs.to_string_lossy().into_owned();
    let env_vars = [("STEMEDB_PROJECTIONS_DIR", defs_s.as_str()), ("STEMEDB_READY_MAX_LAG", "0"), ("STEMEDB_READY_MAX_DELAY", "5s")];
    let env = Env { server: common::Server::start(&tmp.path().join("data"), &env_vars), c: common::client(), _tmp: tmp };

    let written = std::time::Instant::now();
    let w = env.post(body("ready:1", "p", "v", "a")).await;
    env.lens("consensus", "ready:1", "p", w.position, &[]).await;
    env.get_ok("/v1/assertions", &[("min_position", &w.position.to_string())]).await;
    let (st, _, v) = env.get("/v1/ready", &[]).await;
    assert!(written.elapsed() < Duration::from_secs(5), "the first check must come within the delay");
    assert_eq!(st, 200, "a write younger than the delay does not count: {v}");
    assert_eq!(v["projections"]["search"]["lag"], 1, "search has not shown the write yet: {v}");
    assert_eq!(v["projections"]["kv"]["lag"], 0, "{v}");

    tokio::time::sleep(Duration::from_secs(6).saturating_sub(written.elapsed())).await;
    let (st, ct, v) = env.get("/v1/ready", &[]).await;
    assert_problem(st, &ct, &v, 503, "search misses a write older than the delay");
    assert_eq!(v["type"], "urn:stemedb:problem:not-ready");
    assert_eq!(v["lagging"], json!(["search"]), "only search lags: {v}");
    assert_eq!(v["projections"]["search"]["lag"], 1, "{v}");
    assert!(v["detail"].as_str().is_some_and(|d| d.contains("search") && d.contains("of 5s ago")), "{v}");
}

// ---------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------

/// Consensus claims as (value, weight, agents, assertions), for exact comparison.
fn claim_state(v: &Value) -> Vec<(String, f64, u64, Vec<String>)> {
    v["claims"]
        .as_array()
        .expect("claims")
        .iter()
        .map(|c| (text(c).to_string(), f(&c["weight"]), c["agents"].as_u64().expect("agents"), ids(&c["assertions"])))
        .collect()
}

#[tokio::test]
async fn restart_resumes_from_checkpoints_without_double_counting() {
    let mut env = Env::start();
    let (s, p) = ("drug:restart", "dose");
    let tiers = ["regulatory", "clinical", "observational", "expert", "community", "anecdotal"];
    let mut last = 0;
    for i in 0..30 {
        let value = ["A", "B", "C"][i % 3];
        let b = with(with(body(s, p, value, &format!("agent-{i}")), tier(tiers[i % 6])), json!({"confidence": 0.5 + (i as f64) / 100.0}));
        last = env.post(b).await.position;
    }
    let before = env.lens("consensus", s, p, last, &[]).await;
    let state = claim_state(&before);
    assert_eq!(state.iter().map(|c| c.2).sum::<u64>(), 30, "{before}");
    let history_len = |v: &Value| v["events"].as_array().expect("events").len();
    let h = env.get_ok("/v1/history", &[("subject", s), ("predicate", p), ("min_position", &last.to_string())]).await;
    assert_eq!(history_len(&h), 30);

    // SIGTERM, restart.
    assert!(env.server.terminate().success(), "clean exit; log:\n{}", env.server.log());
    env.server.restart();
    env.c = common::client(); // pooled connections died with the old process
    let after = env.lens("consensus", s, p, last, &[]).await;
    assert_eq!(claim_state(&after), state, "after SIGTERM and restart");
    assert_eq!(after["position"], last);
    let h = env.get_ok("/v1/history", &[("subject", s), ("predicate", p), ("min_position", &last.to_string())]).await;
    assert_eq!(history_len(&h), 30, "KV not double-applied");

    // kill -9, restart: non-durable projection commits may be lost and are re-applied.
    env.server.kill9();
    env.server.restart();
    env.c = common::client(); // pooled connections died with the old process
    let after = env.lens("consensus", s, p, last, &[]).await;
    assert_eq!(claim_state(&after), state, "after kill -9 and restart");
    let h = env.get_ok("/v1/history", &[("subject", s), ("predicate", p), ("min_position", &last.to_string())]).await;
    assert_eq!(history_len(&h), 30, "KV not double-applied after kill -9");
    let page = env.get_ok("/v1/assertions", &[("subject", s), ("limit", "1000")]).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 30);

    // One more assertion adds exactly its own weight: 0.5 × 0.7 (observational).
    let extra = env.post(with(with(body(s, p, "A", "agent-new"), tier("observational")), json!({"confidence": 0.5}))).await;
    assert_eq!(extra.position, last + 1, "positions continue after restarts");
    let more = env.lens("consensus", s, p, extra.position, &[]).await;
    let weight_of = |st: &[(String, f64, u64, Vec<String>)], v: &str| st.iter().find(|c| c.0 == v).map(|c| c.1).expect("claim");
    let new_state = claim_state(&more);
    assert!(
        close(weight_of(&new_state, "A"), weight_of(&state, "A") + 0.35),
        "{} vs {}",
        weight_of(&new_state, "A"),
        weight_of(&state, "A")
    );
    assert_eq!(weight_of(&new_state, "B"), weight_of(&state, "B"));
    assert_eq!(weight_of(&new_state, "C"), weight_of(&state, "C"));
    assert_eq!(new_state.iter().map(|c| c.2).sum::<u64>(), 31);
}

/// Changing `lenses.toml` makes the lenses projection stale: it is not
/// served (503 naming the projection) until an online rebuild replays the
/// log with the new weights, after which every event counts exactly once.
#[tokio::test]
async fn changed_definitions_require_a_rebuild() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (s, p) = ("drug:defs", "dose");
    let mut last = 0;
    {
        let env = Env { server: common::Server::start(&data, &[]), c: common::client(), _tmp: tempfile::tempdir().expect("tempdir") };
        for (i, value) in ["A", "A", "B"].iter().enumerate() {
            last = env.post(with(with(body(s, p, value, &format!("d{i}")), tier("community")), json!({"confidence": 0.5}))).await.position;
        }
        let v = env.lens("consensus", s, p, last, &[]).await;
        assert_close(&v["claims"][0]["weight"], 0.4, "default community weight 0.4 × 0.5 × 2");
        let mut server = env.server;
        assert!(server.terminate().success());
    }
    let defs = tmp.path().join("defs");
    std::fs::create_dir_all(&defs).expect("mkdir");
    let toml = stemedb::lens::definitions::DEFAULT_LENSES_TOML.replace("community = 0.4", "community = 0.8");
    assert_ne!(toml, stemedb::lens::definitions::DEFAULT_LENSES_TOML);
    std::fs::write(defs.join("lenses.toml"), toml).expect("write lenses.toml");
    let defs_s = defs.to_string_lossy().into_owned();
    let env = Env { server: common::Server::start(&data, &[("STEMEDB_PROJECTIONS_DIR", &defs_s)]), c: common::client(), _tmp: tmp };

    // Stale: refused, with the projection named; the KV view still serves.
    let url = env.server.url(&format!("/v1/lenses/consensus?subject={s}&predicate={p}"));
    let (st, ct, v) = common::get_json(&env.c, &url).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(ct, "application/problem+json");
    assert_eq!(v["projection"], "lenses");
    let (st, _, _) = common::get_json(&env.c, &env.server.url(&format!("/v1/history?subject={s}&predicate={p}"))).await;
    assert_eq!(st, 200);
    let (_, _, status) = common::get_json(&env.c, &env.server.url("/v1/admin/projections")).await;
    let lenses = status["projections"].as_array().expect("list").iter().find(|p| p["name"] == "lenses").expect("lenses").clone();
    assert_eq!(lenses["state"], "stale", "{status}");

    // Rebuild online, wait for the job, and read the new answers.
    let (st, _, job) =
        common::post_json(&env.c, &env.server.url("/v1/admin/projections/rebuild"), &json!({"projections": ["lenses"]})).await;
    assert_eq!(st, 202, "{job}");
    let id = job["job"].as_str().expect("job id").to_string();
    let mut state = Value::Null;
    for _ in 0..600 {
        let (_, _, j) = common::get_json(&env.c, &env.server.url(&format!("/v1/admin/projections/rebuild/{id}"))).await;
        state = j["state"].clone();
        if state != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, "completed");
    let v = env.lens("consensus", s, p, last, &[]).await;
    let cl = claims(&v);
    assert_close(&json!(cl["A"].0), 0.8, "A rebuilt with community = 0.8");
    assert_close(&json!(cl["B"].0), 0.4, "B rebuilt with community = 0.8");
    assert_eq!(cl["A"].2 + cl["B"].2, 3, "each event applied once");
}
