//! `GET /v1/search` against the real binary: text relevance, every filter
//! alone and combined, retraction and supersession, cursor pagination while
//! writes go on, malformed queries, restart resume from the commit payload
//! and definition-change detection.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// Query-string pairs.
type Q = Vec<(&'static str, &'static str)>;

struct Env {
    server: common::Server,
    c: reqwest::Client,
    _tmp: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let server = common::Server::start(&tmp.path().join("data"), &[]);
        Env { server, c: common::client(), _tmp: tmp }
    }

    /// POSTs one assertion; returns (id, position).
    async fn post(&self, body: Value) -> (String, u64) {
        let (st, _, v) = common::post_json(&self.c, &self.server.url("/v1/assertions"), &body).await;
        assert_eq!(st, 201, "POST {body}: {v}");
        (v["id"].as_str().expect("id").to_string(), v["position"].as_u64().expect("position"))
    }

    /// POSTs a batch; returns the ids and the last position.
    async fn batch(&self, items: Vec<Value>) -> (Vec<String>, u64) {
        let (st, _, v) = common::post_json(&self.c, &self.server.url("/v1/assertions/batch"), &json!({"assertions": items})).await;
        assert_eq!(st, 200, "{v}");
        let results = v["results"].as_array().expect("results");
        let ids = results.iter().map(|r| r["id"].as_str().expect("id").to_string()).collect();
        (ids, results.iter().filter_map(|r| r["position"].as_u64()).max().unwrap_or(0))
    }

    /// GET /v1/search with `query`.
    async fn search(&self, query: &[(&str, &str)]) -> (u16, String, Value) {
        let qs = serde_urlencoded::to_string(query).expect("query string");
        let r = self.c.get(format!("{}?{qs}", self.server.url("/v1/search"))).send().await.expect("request");
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = r.bytes().await.expect("body");
        (status, ct, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// A successful search after `pos` is visible; returns the body.
    async fn ok(&self, pos: u64, query: &[(&str, &str)]) -> Value {
        let p = pos.to_string();
        let mut q = query.to_vec();
        q.push(("min_position", &p));
        q.push(("wait_ms", "10000"));
        let (st, _, v) = self.search(&q).await;
        assert_eq!(st, 200, "{query:?}: {v}");
        v
    }
}

fn ids(v: &Value) -> Vec<String> {
    v["hits"].as_array().expect("hits").iter().map(|h| h["id"].as_str().expect("id").to_string()).collect()
}

fn set(v: &Value) -> BTreeSet<String> {
    ids(v).into_iter().collect()
}

fn text(subject: &str, predicate: &str, value: &str, agent: &str) -> Value {
    json!({"subject": subject, "predicate": predicate, "object": {"type": "text", "value": value}, "agent": agent})
}

#[tokio::test]
async fn relevance_and_every_filter() {
    let env = Env::start();
    let mut a =
        text("drug:aspirin", "side_effects", "gastric bleeding reported in elderly patients; bleeding risk rises with dose", "agent-a");
    a["confidence"] = json!(0.9);
    a["source"] = json!({"uri": "https://example.org/a", "tier": "clinical"});
    a["valid_time"] = json!("2024-01-01T00:00:00Z");
    let (ida, _) = env.post(a).await;
    let mut b = text("drug:ibuprofen", "side_effects", "renal impairment and some gastric discomfort", "agent-b");
    b["confidence"] = json!(0.5);
    b["source"] = json!({"uri": "https://example.org/b", "tier": "anecdotal"});
    b["valid_time"] = json!("2025-06-01T00:00:00Z");
    let (idb, _) = env.post(b).await;
    let (idc, _) =
        env.post(json!({"subject": "drug:aspirin", "predicate": "max_daily_dose_mg", "object": {"type": "integer", "value": 4000}, "agent": "agent-a", "confidence": 0.7, "source": {"uri": "https://example.org/c", "tier": "regulatory"}})).await;
    let (idd, _) = env.post(json!({"subject": "city:paris", "predicate": "mayor", "object": {"type": "entity", "value": "person:hidalgo"}, "agent": "agent-c"})).await;
    let (ide, pe) = env.post(json!({"subject": "drug:aspirin", "predicate": "approved", "object": {"type": "boolean", "value": true}, "agent": "agent-b", "confidence": 0.3, "valid_time": "2020-01-01T00:00:00Z"})).await;

    // Relevance: "bleeding" twice beats once; stemming matches "bleeds".
    let v = env.ok(pe, &[("q", "bleeding gastric")]).await;
    assert_eq!(ids(&v), vec![ida.clone()], "{v}");
    let v = env.ok(pe, &[("q", "gastric")]).await;
    assert_eq!(v["total"], 2);
    let v = env.ok(pe, &[("q", "gastric OR bleeds")]).await;
    assert_eq!(ids(&v), vec![ida.clone(), idb.clone()], "{v}");
    assert!(v["hits"][0]["score"].as_f64().unwrap() > v["hits"][1]["score"].as_f64().unwrap());
    assert_eq!(v["hits"][0]["assertion"]["assertion"]["subject"], "drug:aspirin");
    assert_eq!(v["hits"][0]["retracted"], false);
    // The score is the text relevance alone: attribute filters select, they
    // do not add to it.
    let score = |v: &Value| v["hits"][0]["score"].as_f64().unwrap_or(f64::NAN);
    let alone = score(&v);
    for filter in [("subject", "drug:aspirin"), ("tier", "clinical"), ("agent", "agent-a"), ("object_type", "text")] {
        let f = env.ok(pe, &[("q", "gastric OR bleeds"), filter]).await;
        assert_eq!(ids(&f)[0], ida, "{filter:?}: {f}");
        assert_eq!(score(&f), alone, "{filter:?}: {f}");
    }
    // Subject/predicate words are searchable too, and entity values.
    assert_eq!(set(&env.ok(pe, &[("q", "hidalgo")]).await), BTreeSet::from([idd.clone()]));
    assert_eq!(env.ok(pe, &[("q", "aspirin")]).await["total"], 3);
    // Words are looked up across the subject, the predicate and the object
    // together: each may come from another part of the assertion.
    assert_eq!(ids(&env.ok(pe, &[("q", "aspirin gastric")]).await), vec![ida.clone()]);
    assert_eq!(set(&env.ok(pe, &[("q", "dose")]).await), BTreeSet::from([ida.clone(), idc.clone()]));
    // One part alone, by its field.
    assert_eq!(env.ok(pe, &[("q", "subject_text:aspirin")]).await["total"], 3);
    assert_eq!(env.ok(pe, &[("q", "object_text:aspirin")]).await["total"], 0);
    assert_eq!(set(&env.ok(pe, &[("q", "predicate_text:dose")]).await), BTreeSet::from([idc.clone()]));
    // Field syntax of tantivy.
    assert_eq!(set(&env.ok(pe, &[("q", "agent:agent-b")]).await), BTreeSet::from([idb.clone(), ide.clone()]));

    // Each filter alone.
    let all = BTreeSet::from([ida.clone(), idb.clone(), idc.clone(), idd.clone(), ide.clone()]);
    assert_eq!(set(&env.ok(pe, &[]).await), all);
    let cases: Vec<(Q, Vec<&String>)> = vec![
        (vec![("subject", "drug:aspirin")], vec![&ida, &idc, &ide]),
        (vec![("predicate", "side_effects")], vec![&ida, &idb]),
        (vec![("agent", "agent-a")], vec![&ida, &idc]),
        (vec![("tier", "clinical")], vec![&ida]),
        (vec![("tier", "community")], vec![&idd, &ide]),
        (vec![("object_type", "integer")], vec![&idc]),
        (vec![("object_type", "entity")], vec![&idd]),
        (vec![("object_type", "boolean")], vec![&ide]),
        (vec![("min_confidence", "0.7")], vec![&ida, &idc, &idd]),
        (vec![("max_confidence", "0.5")], vec![&idb, &ide]),
        (vec![("valid_from", "2024-06-01T00:00:00Z")], vec![&idb, &idc, &idd]),
        (vec![("valid_to", "2024-01-01T00:00:00Z")], vec![&ida, &ide]),
        (vec![("recorded_from", "2000-01-01T00:00:00Z"), ("recorded_to", "2001-01-01T00:00:00Z")], vec![]),
        (vec![("recorded_from", "2000-01-01T00:00:00Z")], vec![&ida, &idb, &idc, &idd, &ide]),
        // Combined.
        (vec![("subject", "drug:aspirin"), ("agent", "agent-a"), ("min_confidence", "0.8")], vec![&ida]),
        (vec![("q", "gastric"), ("tier", "anecdotal")], vec![&idb]),
        (vec![("q", "gastric"), ("valid_to", "2024-12-31T00:00:00Z"), ("predicate", "side_effects")], vec![&ida]),
        // Ranges beside a term or words are checked per match, not by a
        // range query: the same answers.
        (vec![("tier", "community"), ("max_confidence", "0.5")], vec![&ide]),
        (vec![("q", "aspirin"), ("min_confidence", "0.7")], vec![&ida, &idc]),
        (vec![("subject", "drug:aspirin"), ("recorded_from", "2000-01-01T00:00:00Z"), ("recorded_to", "2001-01-01T00:00:00Z")], vec![]),
        (vec![("agent", "agent-a"), ("valid_from", "2024-06-01T00:00:00Z")], vec![&idc]),
    ];
    for (q, want) in cases {
        let v = env.ok(pe, &q).await;
        let got = set(&v);
        let want: BTreeSet<String> = want.into_iter().cloned().collect();
        assert_eq!(v["total"].as_u64(), Some(want.len() as u64), "total of {q:?}");
        assert_eq!(got, want, "filter {q:?}");
    }

    // Sorts without q: recent (default) and confidence.
    let v = env.ok(pe, &[]).await;
    assert_eq!(ids(&v), vec![ide.clone(), idd.clone(), idc.clone(), idb.clone(), ida.clone()]);
    let v = env.ok(pe, &[("sort", "confidence")]).await;
    assert_eq!(ids(&v), vec![idd.clone(), ida.clone(), idc.clone(), idb.clone(), ide.clone()]);
    let v = env.ok(pe, &[("q", "aspirin"), ("sort", "recent")]).await;
    assert_eq!(ids(&v), vec![ide.clone(), idc.clone(), ida.clone()]);

    // Metrics.
    let m = env.c.get(env.server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(m.contains("stemedb_search_latency_seconds"), "{m}");
    assert!(m.lines().any(|l| l.starts_with("stemedb_search_queue_seconds_count") && !l.ends_with(" 0")), "{m}");
    assert!(m.lines().any(|l| l.starts_with("stemedb_search_index_docs") && l.ends_with(" 5")), "{m}");
    assert!(m.contains("projection=\"search\""), "{m}");
}

#[tokio::test]
async fn retraction_and_supersession_update_documents() {
    let env = Env::start();
    let (id1, _) = env.post(text("s:1", "note", "zebra crossing observed", "ag")).await;
    let (id2, _) = env.post(text("s:2", "note", "zebra stripes counted", "ag")).await;
    let (st, _, v) = common::post_json(
        &env.c,
        &env.server.url(&format!("/v1/assertions/{id1}/retractions")),
        &json!({"agent": "ag", "reason": "wrong"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let pr = v["position"].as_u64().expect("position");
    let mut sup = text("s:2", "note", "zebra stripes recounted", "ag");
    sup["supersedes"] = json!([id2.clone()]);
    let (id3, p3) = env.post(sup).await;
    let v = env.ok(p3.max(pr), &[("q", "zebra")]).await;
    assert_eq!(ids(&v), vec![id3.clone()], "{v}");
    assert_eq!(v["total"], 1);
    let v = env.ok(p3, &[("q", "zebra"), ("include_retracted", "true"), ("sort", "recent")]).await;
    assert_eq!(ids(&v), vec![id3.clone(), id2.clone(), id1.clone()], "{v}");
    assert_eq!(v["hits"][2]["retracted"], true);
    assert_eq!(v["hits"][2]["assertion"]["retraction"]["reason"], "wrong");
    assert_eq!(v["hits"][1]["retracted"], false);
    assert_eq!(v["hits"][1]["superseded"], true);
    assert_eq!(v["hits"][1]["assertion"]["superseded_by"], json!([id3.clone()]));
    // Retracting in the same batch of the worker as the record (pending doc).
    let (id4, _) = env.post(text("s:4", "note", "okapi sighted", "ag")).await;
    let (_, _, v) = common::post_json(&env.c, &env.server.url(&format!("/v1/assertions/{id4}/retractions")), &json!({"agent": "ag"})).await;
    let pr = v["position"].as_u64().expect("position");
    assert_eq!(env.ok(pr, &[("q", "okapi")]).await["total"], 0);
    let v = env.ok(pr, &[("q", "okapi"), ("include_retracted", "true")]).await;
    assert_eq!(v["total"], 1, "one document per assertion, not two: {v}");

    // The index equals a replay of the log (flags included).
    let (st, _, v) = common::post_json(&env.c, &env.server.url("/v1/admin/projections/verify"), &json!({"projections": ["search"]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["projections"][0]["rows"], 4, "{v}");
}

#[tokio::test]
async fn cursors_are_stable_across_concurrent_writes() {
    let env = Env::start();
    let items: Vec<Value> = (0..300)
        .map(|i| {
            let mut a = text(&format!("page:{i}"), "note", &format!("walrus {}", "tusk ".repeat(i % 7 + 1)), &format!("agent-{}", i % 5));
            a["confidence"] = json!(((i * 37) % 10) as f64 / 10.0);
            a
        })
        .collect();
    let (original, last) = env.batch(items).await;
    let original: BTreeSet<String> = original.into_iter().collect();
    for sort in ["recent", "confidence", "relevance"] {
        // A writer adds matching assertions while the pages are read.
        let c = env.c.clone();
        let url = env.server.url("/v1/assertions/batch");
        let sort_tag = sort.to_string();
        let writer = tokio::spawn(async move {
            for round in 0..10 {
                let items: Vec<Value> = (0..20)
                    .map(|i| {
                        let mut a = text(&format!("new:{sort_tag}:{round}:{i}"), "note", "walrus tusk tusk", "agent-new");
                        a["confidence"] = json!(0.5);
                        a
                    })
                    .collect();
                let r = c.post(&url).json(&json!({"assertions": items})).send().await.expect("write");
                assert!(r.status().is_success());
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        });
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut total = None;
        let last_s = last.to_string();
        loop {
            let mut q: Vec<(&str, &str)> =
                vec![("q", "walrus"), ("sort", sort), ("limit", "17"), ("min_position", &last_s), ("wait_ms", "10000")];
            if let Some(c) = &cursor {
                q.push(("cursor", c));
            }
            let (st, _, v) = env.search(&q).await;
            assert_eq!(st, 200, "{v}");
            if total.is_none() {
                total = v["total"].as_u64();
            }
            assert_eq!(v["total"].as_u64(), total, "total is pinned");
            seen.extend(ids(&v));
            if sort == "confidence" {
                let c: Vec<f64> = v["hits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["assertion"]["assertion"]["confidence"].as_f64().unwrap_or(1.0))
                    .collect();
                assert!(c.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            match v["next"].as_str() {
                Some(n) => cursor = Some(n.to_string()),
                None => break,
            }
        }
        writer.await.expect("writer");
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{sort}: a hit came twice");
        assert_eq!(unique.len() as u64, total.unwrap(), "{sort}");
        // Everything written before the first page, exactly once (later
        // writes of earlier rounds are also included, never twice).
        assert!(original.is_subset(&unique), "{sort}: missing {:?}", original.difference(&unique).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn malformed_queries_are_problems() {
    let env = Env::start();
    let (_, p) = env.post(text("x:1", "note", "hello world", "ag")).await;
    let _ = env.ok(p, &[]).await;
    let cases: Vec<(Q, u16, &str)> = vec![
        (vec![("q", "hello AND (world")], 400, "q"),
        (vec![("q", "nosuchfield:abc")], 400, "q"),
        (vec![("q", "position:abc")], 400, "q"),
        (vec![("q", "   ")], 400, "q"),
        (vec![("tier", "gossip")], 400, "tier"),
        (vec![("object_type", "blob")], 400, "object_type"),
        (vec![("min_confidence", "high")], 400, "min_confidence"),
        (vec![("max_confidence", "1.5")], 400, "max_confidence"),
        (vec![("valid_from", "yesterday")], 400, "valid_from"),
        (vec![("recorded_to", "2024-13-01T00:00:00Z")], 400, "recorded_to"),
        (vec![("include_retracted", "maybe")], 400, "include_retracted"),
        (vec![("sort", "random")], 400, "sort"),
        (vec![("sort", "relevance")], 400, "sort"),
        (vec![("limit", "0")], 400, "limit"),
        (vec![("limit", "1001")], 400, "limit"),
        (vec![("limit", "-3")], 400, "limit"),
        (vec![("cursor", "garbage")], 400, "cursor"),
        (vec![("subject", "")], 400, "subject"),
        (vec![("bogus", "1")], 400, "bogus"),
        (vec![("min_confidence", "0.9"), ("max_confidence", "0.1")], 422, "min_confidence"),
        (vec![("valid_from", "2025-01-01T00:00:00Z"), ("valid_to", "2024-01-01T00:00:00Z")], 422, "valid_from"),
    ];
    for (q, status, param) in cases {
        let (st, ct, v) = env.search(&q).await;
        assert_eq!(st, status, "{q:?}: {v}");
        assert_eq!(ct, "application/problem+json", "{q:?}");
        assert_eq!(v["parameter"], param, "{q:?}: {v}");
        let detail = v["detail"].as_str().expect("detail");
        if let Some((_, value)) = q.iter().find(|(k, _)| *k == param)
            && !value.trim().is_empty()
            && status == 400
            && param != "bogus"
        {
            assert!(detail.contains(value.trim()), "{q:?}: the detail should quote {value:?}: {detail}");
        }
    }
    // A cursor of another sort order.
    let (_, _, v) = env.search(&[("limit", "1")]).await;
    let _ = v;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(env.post(text(&format!("x:{}", i + 2), "note", "hello again", "ag")).await);
    }
    let last = ids.last().unwrap().1.to_string();
    let (_, _, v) = env.search(&[("limit", "1"), ("min_position", &last)]).await;
    let next = v["next"].as_str().expect("next").to_string();
    let (st, _, v) = env.search(&[("limit", "1"), ("sort", "confidence"), ("cursor", &next)]).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["parameter"], "cursor");
}

#[tokio::test]
async fn restart_resumes_from_the_commit_payload() {
    let mut env = Env::start();
    let items: Vec<Value> = (0..500).map(|i| text(&format!("r:{i}"), "note", "narwhal horn", "ag")).collect();
    let (_, last) = env.batch(items).await;
    assert_eq!(env.ok(last, &[("q", "narwhal")]).await["total"], 500);
    // Clean stop: the final flush commits; a restart indexes nothing twice.
    env.server.terminate();
    env.server.restart();
    env.c = common::client(); // no pooled connection to the old process
    let v = env.ok(last, &[("q", "narwhal")]).await;
    assert_eq!(v["total"], 500);
    assert_eq!(v["position"], last, "resumed from the committed position");
    // Crash right after writes: the index resumes from its last commit and
    // re-indexes the rest exactly once.
    let items: Vec<Value> = (500..1500).map(|i| text(&format!("r:{i}"), "note", "narwhal horn", "ag")).collect();
    let (_, last) = env.batch(items).await;
    env.server.kill9();
    env.server.restart();
    env.c = common::client();
    let v = env.ok(last, &[("q", "narwhal"), ("include_retracted", "true")]).await;
    assert_eq!(v["total"], 1500, "{}", env.server.log());
    let m = env.c.get(env.server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(m.lines().any(|l| l.starts_with("stemedb_search_index_docs") && l.ends_with(" 1500")), "{m}");
}

#[tokio::test]
async fn changed_definition_is_stale_until_rebuilt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = common::Server::start(&data, &[]);
    let c = common::client();
    let (st, _, v) = common::post_json(&c, &server.url("/v1/assertions"), &text("d:1", "note", "Running quickly", "ag")).await;
    assert_eq!(st, 201, "{v}");
    let pos = v["position"].as_u64().unwrap().to_string();
    let env = Env { server, c, _tmp: tmp };
    // en_stem: "run" matches "Running".
    assert_eq!(env.ok(pos.parse().unwrap(), &[("q", "run")]).await["total"], 1);
    let Env { mut server, c, _tmp: tmp } = env;
    server.terminate();
    drop(server);

    let defs = tmp.path().join("defs");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(defs.join("lenses.toml"), stemedb::lens::definitions::DEFAULT_LENSES_TOML).unwrap();
    let toml = stemedb::projection::search::schema::DEFAULT_SEARCH_TOML.replace("tokenizer = \"en_stem\"", "tokenizer = \"default\"");
    assert_ne!(toml, stemedb::projection::search::schema::DEFAULT_SEARCH_TOML);
    std::fs::write(defs.join("search.toml"), toml).unwrap();
    let defs_s = defs.to_string_lossy().into_owned();
    let server = common::Server::start(&data, &[("STEMEDB_PROJECTIONS_DIR", &defs_s)]);
    let env = Env { server, c, _tmp: tmp };
    let (st, ct, v) = env.search(&[("q", "run")]).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(ct, "application/problem+json");
    assert_eq!(v["type"], "urn:stemedb:problem:stale-projection");
    assert_eq!(v["projection"], "search");
    assert!(v["detail"].as_str().unwrap().contains("rebuild"), "{v}");

    // An online rebuild installs an index built with the new definition.
    let (st, _, job) =
        common::post_json(&env.c, &env.server.url("/v1/admin/projections/rebuild"), &json!({"projections": ["search"]})).await;
    assert_eq!(st, 202, "{job}");
    let mut ok = false;
    for _ in 0..400 {
        let (st, _, v) = env.search(&[("q", "running")]).await;
        if st == 200 {
            assert_eq!(v["total"], 1, "{v}");
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ok, "the rebuilt search index was never served; log:\n{}", env.server.log());
    // The job reports the merge before the swap apart from the replay.
    let job_id = job["job"].as_str().expect("job id");
    let mut done = json!(null);
    for _ in 0..400 {
        let (_, _, v) = common::get_json(&env.c, &env.server.url(&format!("/v1/admin/projections/rebuild/{job_id}"))).await;
        if v["state"] == "completed" {
            done = v;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let p = &done["progress"]["search"];
    assert_eq!(p["swapped"], true, "{done}");
    assert_eq!(p["settling"], false, "{done}");
    assert!(p["settle_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{done}");
    // No stemming any more: "run" does not match "Running".
    let (_, _, v) = env.search(&[("q", "run")]).await;
    assert_eq!(v["total"], 0, "{v}");
    let _ = BTreeMap::<u8, u8>::new();
}

/// With one search slot, concurrent searches queue and every one answers;
/// a search that fails (a malformed query) gives its slot back.
#[tokio::test]
async fn searches_beyond_the_slots_queue_and_all_answer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = common::Server::start(&tmp.path().join("data"), &[("STEMEDB_SEARCH_THREADS", "1")]);
    let env = Env { server, c: common::client(), _tmp: tmp };
    let items = (0..200).map(|i| text(&format!("drug:d{i}"), "note", "renal dose observed", "agent-q")).collect();
    let (_, last) = env.batch(items).await;
    let pos = last.to_string();
    let (st, ct, _) = env.search(&[("q", "renal AND (dose"), ("min_position", &pos)]).await;
    assert_eq!((st, ct.as_str()), (400, "application/problem+json"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let c = env.c.clone();
        let qs = serde_urlencoded::to_string([("q", if i % 2 == 0 { "renal" } else { "dose observed" }), ("min_position", &pos)])
            .expect("query string");
        let url = format!("{}?{qs}", env.server.url("/v1/search"));
        tasks.spawn(async move {
            let r = c.get(url).send().await.expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        });
    }
    let mut answered = 0;
    while let Some(joined) = tasks.join_next().await {
        let (status, v) = joined.expect("task");
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["total"], 200, "{v}");
        answered += 1;
    }
    assert_eq!(answered, 24);
    let m = env.c.get(env.server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let queued: f64 =
        m.lines().find_map(|l| l.strip_prefix("stemedb_search_queue_seconds_count ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
    assert!(queued >= 25.0, "every search took a slot: {queued}\n{m}");
}
