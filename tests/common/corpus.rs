//! A realistic corpus and byte-for-byte snapshots of every read endpoint,
//! shared by the tests that must prove two servers (before/after a rebuild,
//! a writer and its restore or follower) answer exactly the same.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// Every lens.
pub const LENSES: [&str; 6] = ["recency", "confidence", "authority", "consensus", "skeptic", "layered"];
/// Every source tier.
pub const TIERS: [&str; 6] = ["regulatory", "clinical", "observational", "expert", "community", "anecdotal"];
/// The corpus's predicates.
pub const PREDICATES: [&str; 3] = ["dose", "route", "form"];

/// What a load wrote.
#[derive(Default)]
pub struct Corpus {
    /// Every created assertion: id and position, in log order.
    pub ids: Vec<(String, u64)>,
    /// Retracted assertions.
    pub retracted: Vec<String>,
    /// Assertions that supersede another.
    pub superseding: Vec<String>,
    /// `recorded_at` of each batch, in order.
    pub times: Vec<String>,
    /// The last position written.
    pub last: u64,
    /// Subjects written to.
    pub subjects: usize,
}

/// The k-th assertion of a corpus: its body and its (agent, subject, predicate).
pub fn item(k: usize, subjects: usize) -> (Value, (String, String, String)) {
    let subject = format!("drug:{}", k % subjects);
    let predicate = PREDICATES[(k / subjects) % 3].to_string();
    // Each pair gets one item per round of `3 × subjects`; its agents
    // recur every 7 rounds, so agents supersede their own earlier claims.
    let agent = format!("agent-{}", (k / (3 * subjects) + k % 5) % 7);
    // Unique valid time (or unique value without one): no two items share an id.
    let (value, valid_time) = if k % 10 == 9 {
        (format!("u{k}"), None)
    } else {
        let t = chrono::DateTime::from_timestamp(1_577_836_800 + (k as i64) * 60, 0).expect("time");
        (format!("v{}", (k * 7) % 5), Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
    };
    let mut b = super::assertion(&subject, &predicate, json!(value), &agent);
    if let Some(t) = valid_time {
        b["valid_time"] = json!(t);
    }
    if !k.is_multiple_of(4) {
        b["confidence"] = json!(0.05 + (k % 19) as f64 / 20.0);
    }
    if k % 7 != 6 {
        b["source"] = json!({"uri": format!("https://example.org/{}", k % 5), "tier": TIERS[k % 6]});
    }
    (b, (agent, subject, predicate))
}

/// Writes `batches` batches of `per_batch` assertions over `subjects`
/// subjects (three predicates each). From the second batch on, every 11th
/// item supersedes the same agent's latest assertion on its pair; after
/// each batch, every `retract_every`-th item of it is retracted.
pub async fn load(
    c: &reqwest::Client,
    server: &super::Server,
    batches: usize,
    per_batch: usize,
    subjects: usize,
    retract_every: Option<usize>,
) -> Corpus {
    let mut corpus = Corpus { subjects, ..Default::default() };
    let mut latest: HashMap<(String, String, String), String> = HashMap::new();
    for b in 0..batches {
        let mut items = Vec::with_capacity(per_batch);
        let mut keys = Vec::with_capacity(per_batch);
        let mut supersedes = Vec::with_capacity(per_batch);
        for i in 0..per_batch {
            let k = b * per_batch + i;
            let (mut body, key) = item(k, subjects);
            let sup = k.is_multiple_of(11).then(|| latest.get(&key).cloned()).flatten();
            if let Some(old) = &sup {
                body["supersedes"] = json!([old]);
            }
            supersedes.push(sup.is_some());
            items.push(body);
            keys.push(key);
        }
        let (st, _, r) = super::post_json(c, &server.url("/v1/assertions/batch"), &json!({"assertions": items})).await;
        assert_eq!(st, 200, "batch {b}: {r}");
        corpus.times.push(r["recorded_at"].as_str().expect("recorded_at").to_string());
        let results = r["results"].as_array().expect("results");
        assert_eq!(results.len(), per_batch);
        let mut written = Vec::new();
        for (i, res) in results.iter().enumerate() {
            assert_eq!(res["status"], "created", "batch {b} item {i}: {res}");
            let id = res["id"].as_str().expect("id").to_string();
            let pos = res["position"].as_u64().expect("position");
            corpus.last = corpus.last.max(pos);
            corpus.ids.push((id.clone(), pos));
            if supersedes[i] {
                corpus.superseding.push(id.clone());
            }
            latest.insert(keys[i].clone(), id.clone());
            written.push((id, keys[i].0.clone()));
        }
        if let Some(every) = retract_every {
            for (id, agent) in written.iter().step_by(every) {
                let url = server.url(&format!("/v1/assertions/{id}/retractions"));
                let (st, _, r) = super::post_json(c, &url, &json!({"agent": agent, "reason": "rebuild test"})).await;
                assert_eq!(st, 201, "retract {id}: {r}");
                corpus.last = corpus.last.max(r["position"].as_u64().expect("position"));
                corpus.retracted.push(id.clone());
            }
        }
    }
    corpus
}

// ---------------------------------------------------------------------------
// Snapshots of raw answers
// ---------------------------------------------------------------------------

/// Raw answers by request path: (status, content type, body bytes).
pub type Snapshot = BTreeMap<String, (u16, String, Vec<u8>)>;

pub async fn raw(c: &reqwest::Client, url: &str) -> (u16, String, Vec<u8>) {
    let r = c.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let st = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (st, ct, r.bytes().await.expect("body").to_vec())
}

pub fn query(path: &str, q: &[(&str, &str)]) -> String {
    format!("{path}?{}", serde_urlencoded::to_string(q).expect("encode query"))
}

/// Requests every path and records the answers (each must be 200).
pub async fn fetch_all(c: &reqwest::Client, server: &super::Server, paths: &[String], snap: &mut Snapshot) {
    for p in paths {
        let got = raw(c, &server.url(p)).await;
        assert_eq!(got.0, 200, "GET {p}: {}", String::from_utf8_lossy(&got.2));
        snap.insert(p.clone(), got);
    }
}

/// Follows `next` cursors from `path` with query `q`, recording every page.
pub async fn fetch_pages(c: &reqwest::Client, server: &super::Server, q: &[(&str, &str)], max_pages: usize, snap: &mut Snapshot) {
    let mut cursor: Option<String> = None;
    for _ in 0..max_pages {
        let mut q = q.to_vec();
        if let Some(cur) = &cursor {
            q.push(("cursor", cur.as_str()));
        }
        let p = query("/v1/assertions", &q);
        let got = raw(c, &server.url(&p)).await;
        assert_eq!(got.0, 200, "GET {p}: {}", String::from_utf8_lossy(&got.2));
        let v: Value = serde_json::from_slice(&got.2).expect("JSON page");
        snap.insert(p, got);
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => return,
        }
    }
}

/// Snapshots every read endpoint: assertions by id (a sample, with every
/// retracted and superseding one), list pages with and without filters,
/// history, every lens on several pairs (now, `as_of`, `as_of` with decay)
/// and the subject view under every lens.
pub async fn snapshot(c: &reqwest::Client, server: &super::Server, corpus: &Corpus, pairs: usize, max_pages: usize) -> Snapshot {
    let mp = corpus.last.to_string();
    let wait = [("min_position", mp.as_str()), ("wait_ms", "10000")];
    let mut snap = Snapshot::new();
    let step = (corpus.ids.len() / 150).max(1);
    let mut ids: Vec<&String> = corpus.ids.iter().step_by(step).map(|(id, _)| id).collect();
    ids.extend(corpus.retracted.iter().take(50));
    ids.extend(corpus.superseding.iter().take(50));
    let mut paths: Vec<String> = ids.iter().map(|id| query(&format!("/v1/assertions/{id}"), &wait)).collect();
    let as_of = corpus.times[corpus.times.len() / 2].clone();
    for n in 0..pairs {
        let subject = format!("drug:{}", (n * 7) % corpus.subjects);
        let predicate = PREDICATES[n % 3];
        let pq = [("subject", subject.as_str()), ("predicate", predicate)];
        paths.push(query("/v1/history", &[&pq[..], &wait[..]].concat()));
        for lens in LENSES {
            let path = format!("/v1/lenses/{lens}");
            paths.push(query(&path, &[&pq[..], &wait[..]].concat()));
            paths.push(query(&path, &[&pq[..], &wait[..], &[("as_of", as_of.as_str())][..]].concat()));
            paths.push(query(&path, &[&pq[..], &wait[..], &[("as_of", as_of.as_str()), ("decay", "true")][..]].concat()));
        }
    }
    for n in 0..4 {
        for lens in LENSES {
            paths.push(query(&format!("/v1/subjects/drug:{}", n * 3), &[&[("lens", lens)][..], &wait[..]].concat()));
        }
    }
    fetch_all(c, server, &paths, &mut snap).await;
    fetch_pages(c, server, &[("limit", "1000"), ("min_position", &mp), ("wait_ms", "10000")], max_pages, &mut snap).await;
    fetch_pages(c, server, &[("subject", "drug:1"), ("limit", "7")], 4, &mut snap).await;
    fetch_pages(c, server, &[("subject", "drug:2"), ("predicate", "route"), ("limit", "5")], 100, &mut snap).await;
    fetch_pages(c, server, &[("agent", "agent-3"), ("limit", "50")], max_pages, &mut snap).await;
    snap
}

pub fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "{what}: the same requests");
    let differing: Vec<&String> = before.keys().filter(|k| before.get(*k) != after.get(*k)).collect();
    let shown: Vec<String> = differing
        .iter()
        .take(3)
        .map(|k| {
            let (b, a) = (&before[*k], &after[*k]);
            format!(
                "GET {k}\n  before: {} {} {}\n  after:  {} {} {}",
                b.0,
                b.1,
                String::from_utf8_lossy(&b.2),
                a.0,
                a.1,
                String::from_utf8_lossy(&a.2)
            )
        })
        .collect();
    assert!(differing.is_empty(), "{what}: {} of {} answers differ:\n{}", differing.len(), before.len(), shown.join("\n"));
}

// ---------------------------------------------------------------------------
// Files, processes and admin calls
