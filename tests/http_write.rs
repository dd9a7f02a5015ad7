//! The write path over HTTP, against the real `stemedb` binary: what a
//! client sees when it records, deduplicates, batches, signs, supersedes and
//! retracts assertions, what it sees when its input is wrong (and that
//! nothing was written then), the operational endpoints, and a graceful
//! shutdown under load that keeps every acknowledged write.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use reqwest::Method;
use serde_json::{Value, json};

use common::{Server, client, get_json, post_json, wal_dump};

/// (status, content-type, body as JSON or Null)
type Reply = (u16, String, Value);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A valid assertion the bad-input cases are derived from.
fn base() -> Value {
    json!({
        "subject": "drug:aspirin",
        "predicate": "max_daily_dose_mg",
        "object": {"type": "integer", "value": 4000},
        "agent": "agent-1",
    })
}

/// An assertion with an object of the given type and value.
fn typed(subject: &str, predicate: &str, ty: &str, value: Value, agent: &str) -> Value {
    json!({"subject": subject, "predicate": predicate, "object": {"type": ty, "value": value}, "agent": agent})
}

/// `v` with `key` set to `value` (at the top level).
fn with(v: &Value, key: &str, value: Value) -> Value {
    let mut v = v.clone();
    v[key] = value;
    v
}

/// The id the library computes for a valid assertion.
fn lib_id(v: &Value) -> String {
    let (id, _) = stemedb::model::parse::parse_assertion(v, Default::default()).unwrap_or_else(|e| panic!("{v} is valid: {e:?}"));
    id.to_hex()
}

fn is_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// POSTs raw bytes with an optional Content-Type.
async fn post_raw(c: &reqwest::Client, url: &str, content_type: Option<&str>, body: Vec<u8>) -> Reply {
    let mut req = c.post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = r.bytes().await.expect("body");
    (status, ct, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// POSTs `{"assertions": items}` over a raw connection, either with a
/// Content-Length or with `Transfer-Encoding: chunked` (one chunk per item),
/// and reads the answer even if the server stops reading the body early
/// (which an HTTP client library may report as a broken pipe instead).
fn post_streamed(addr: std::net::SocketAddr, path: &str, items: &[Value], chunked: bool) -> Reply {
    let mut parts: Vec<Vec<u8>> = vec![b"{\"assertions\":[".to_vec()];
    for (i, item) in items.iter().enumerate() {
        let mut c = if i == 0 { Vec::new() } else { b",".to_vec() };
        c.extend(serde_json::to_vec(item).expect("encode"));
        parts.push(c);
    }
    parts.push(b"]}".to_vec());
    send_raw(addr, path, Some("application/json"), parts, chunked)
}

/// POSTs `parts` as one body over a raw HTTP/1.1 connection; see [`post_streamed`].
fn send_raw(addr: std::net::SocketAddr, path: &str, content_type: Option<&str>, parts: Vec<Vec<u8>>, chunked: bool) -> Reply {
    use std::io::{Read, Write};
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", parts.iter().map(Vec::len).sum::<usize>())
    };
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let ct = content_type.map(|t| format!("Content-Type: {t}\r\n")).unwrap_or_default();
    let head = format!("POST {path} HTTP/1.1\r\nHost: stemedb\r\n{ct}{framing}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    for part in parts {
        let frame = if chunked {
            let mut f = format!("{:x}\r\n", part.len()).into_bytes();
            f.extend(part);
            f.extend(b"\r\n");
            f
        } else {
            part
        };
        // The server may answer and stop reading before the end: stop writing then.
        if s.write_all(&frame).is_err() {
            break;
        }
    }
    if chunked {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("a full response, got {text:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let ct = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    (status, ct, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Sends `method path` with no body.
async fn request(c: &reqwest::Client, method: Method, url: &str) -> (Reply, reqwest::header::HeaderMap) {
    let r = c.request(method, url).send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = r.bytes().await.expect("body");
    ((status, ct, serde_json::from_slice(&bytes).unwrap_or(Value::Null)), headers)
}

/// The committed log position reported by `/v1/health`.
async fn position(c: &reqwest::Client, s: &Server) -> u64 {
    let (st, _, h) = get_json(c, &s.url("/v1/health")).await;
    assert_eq!(st, 200, "{h}");
    h["position"].as_u64().unwrap_or_else(|| panic!("health has a position: {h}"))
}

/// Asserts a 201 `created` answer and returns (id, position).
fn assert_created(r: &Reply, ctx: &str) -> (String, u64) {
    let (st, ct, b) = r;
    assert_eq!(*st, 201, "{ctx}: {b}");
    assert!(ct.starts_with("application/json"), "{ctx}: content-type {ct}");
    let keys: HashSet<&str> = b.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, HashSet::from(["id", "position", "recorded_at", "status"]), "{ctx}: {b}");
    assert_eq!(b["status"], "created", "{ctx}: {b}");
    assert!(is_id(&b["id"]), "{ctx}: id is 64 lowercase hex: {b}");
    let recorded_at = b["recorded_at"].as_str().expect("recorded_at is a string");
    assert!(chrono::DateTime::parse_from_rfc3339(recorded_at).is_ok(), "{ctx}: recorded_at is RFC 3339: {recorded_at}");
    assert!(recorded_at.ends_with('Z'), "{ctx}: recorded_at is UTC: {recorded_at}");
    let pos = b["position"].as_u64().unwrap_or_else(|| panic!("{ctx}: position is an integer: {b}"));
    (b["id"].as_str().expect("id").to_string(), pos)
}

/// Asserts a 200 `duplicate` answer naming the original id and position.
fn assert_duplicate(r: &Reply, id: &str, pos: u64, ctx: &str) {
    let (st, ct, b) = r;
    assert_eq!(*st, 200, "{ctx}: {b}");
    assert!(ct.starts_with("application/json"), "{ctx}: content-type {ct}");
    assert_eq!(b["status"], "duplicate", "{ctx}: {b}");
    assert_eq!(b["id"], id, "{ctx}: {b}");
    assert_eq!(b["position"], pos, "{ctx}: {b}");
}

/// Asserts an RFC 9457 problem with `status`.
fn assert_problem(r: &Reply, status: u16, ctx: &str) {
    let (st, ct, b) = r;
    assert_eq!(*st, status, "{ctx}: {b}");
    assert!(ct.starts_with("application/problem+json"), "{ctx}: content-type {ct:?}, body {b}");
    assert_eq!(b["status"], status, "{ctx}: {b}");
    assert!(b["detail"].as_str().is_some_and(|d| !d.trim().is_empty()), "{ctx}: non-empty detail: {b}");
    assert!(b["title"].as_str().is_some_and(|t| !t.is_empty()), "{ctx}: title: {b}");
    assert!(b["type"].as_str().is_some_and(|t| t.starts_with("urn:stemedb:problem:")), "{ctx}: type: {b}");
}

/// The `errors` of a 422 problem; each has a field and a non-empty reason.
fn errors(r: &Reply, ctx: &str) -> Vec<Value> {
    let list = r.2["errors"].as_array().unwrap_or_else(|| panic!("{ctx}: 422 has an errors array: {}", r.2)).clone();
    assert!(!list.is_empty(), "{ctx}: errors is not empty");
    for e in &list {
        assert!(e["field"].is_string(), "{ctx}: error names a field: {e}");
        assert!(e["reason"].as_str().is_some_and(|s| !s.is_empty()), "{ctx}: error has a reason: {e}");
    }
    list
}

/// Asserts a 422 problem whose errors name `field`.
fn assert_invalid(r: &Reply, field: &str, ctx: &str) {
    assert_problem(r, 422, ctx);
    let list = errors(r, ctx);
    assert!(list.iter().any(|e| e["field"] == field), "{ctx}: errors name {field:?}: {}", r.2);
}

/// (position, id) of every recorded assertion in a dump.
fn dumped_assertions(events: &[Value]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| {
            let rec = e["event"].get("AssertionRecorded")?;
            Some((e["position"].as_u64()?, rec["id"].as_str()?.to_string()))
        })
        .collect()
}

/// Asserts the dump's positions are exactly 1..=n.
fn assert_gap_free(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["position"], i as u64 + 1, "dump positions are gap-free from 1: {e}");
    }
}

/// The value of one sample (`name` or `name{labels}`) in Prometheus text.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn metrics_text(c: &reqwest::Client, s: &Server) -> String {
    let r = c.get(s.url("/metrics")).send().await.expect("metrics");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ct.starts_with("text/plain"), "metrics content-type {ct}");
    r.text().await.expect("metrics text")
}

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn agent_of(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// `v` signed by `key` over its id (computed by the library).
fn signed(v: &Value, key: &SigningKey) -> Value {
    let (id, _) = stemedb::model::parse::parse_assertion(v, Default::default()).expect("valid assertion");
    with(v, "signature", json!(hex::encode(key.sign(id.as_bytes()).to_bytes())))
}

/// A signature hex with one bit of its first byte flipped.
fn flipped(sig: &str) -> String {
    let mut raw = hex::decode(sig).expect("hex");
    raw[0] ^= 0x01;
    hex::encode(raw)
}

fn new_server() -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    (tmp, data, server)
}

// ---------------------------------------------------------------------------
// 1. Round trip
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_object_type_round_trips_with_gap_free_positions() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    assert_eq!(position(&c, &server).await, 0, "an empty log is at position 0");

    let bodies = vec![
        typed("drug:aspirin", "brand_name", "text", json!("Bayer Aspirin ü ✓"), "agent-1"),
        typed("drug:aspirin", "half_life_hours", "number", json!(3.25), "agent-1"),
        typed("drug:aspirin", "max_daily_dose_mg", "integer", json!(-9_223_372_036_854_775_808i64), "agent-1"),
        typed("drug:aspirin", "otc", "boolean", json!(false), "agent-1"),
        typed("drug:aspirin", "manufacturer", "entity", json!("company:bayer"), "agent-1"),
        typed("drug:aspirin", "first_synthesized", "time", json!("1897-08-10T00:00:00Z"), "agent-1"),
        // Every optional field at once.
        json!({
            "subject": "drug:aspirin",
            "predicate": "max_daily_dose_mg",
            "object": {"type": "integer", "value": i64::MAX},
            "agent": "agent-2",
            "confidence": 0.25,
            "source": {"uri": "https://example.org/label.pdf", "tier": "regulatory", "hash": "AB".repeat(32)},
            "valid_time": "2026-01-31T12:00:00Z",
        }),
        // Size limits are inclusive, in bytes (ü is two bytes).
        typed(&"ü".repeat(256), &"p".repeat(256), "text", json!("x".repeat(64 * 1024)), &"a".repeat(256)),
        typed("s", "p", "entity", json!("e".repeat(512)), "a"),
    ];
    let mut seen = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let r = post_json(&c, &url, body).await;
        let (id, pos) = assert_created(&r, &format!("body {i}"));
        assert_eq!(pos, i as u64 + 1, "positions start at 1 and have no gaps");
        assert_eq!(id, lib_id(body), "the id is the content address of the submitted fields");
        assert_eq!(position(&c, &server).await, pos, "health reports the new position once acknowledged");
        seen.push((pos, id, r.2["recorded_at"].as_str().expect("recorded_at").to_string()));
    }
    let ids: HashSet<&String> = seen.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), bodies.len(), "different assertions have different ids");

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), bodies.len());
    assert_gap_free(&events);
    for ((pos, id, recorded_at), (e, body)) in seen.iter().zip(events.iter().zip(&bodies)) {
        assert_eq!(e["position"], *pos);
        assert_eq!(e["recorded_at"], recorded_at.as_str(), "the log holds the recorded_at the client was given");
        let rec = &e["event"]["AssertionRecorded"];
        assert_eq!(rec["id"], id.as_str());
        assert_eq!(rec["assertion"]["subject"], body["subject"]);
        assert_eq!(rec["assertion"]["object"]["type"], body["object"]["type"]);
    }
    // Values come back as submitted.
    assert_eq!(events[2]["event"]["AssertionRecorded"]["assertion"]["object"]["value"], json!(i64::MIN));
    assert_eq!(events[6]["event"]["AssertionRecorded"]["assertion"]["source"]["hash"], "ab".repeat(32));
}

#[tokio::test]
async fn spellings_of_one_value_share_one_id() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");

    // valid_time: one instant, many RFC 3339 spellings.
    let vt = |t: &str| with(&base(), "valid_time", json!(t));
    let (id, pos) = assert_created(&post_json(&c, &url, &vt("2026-01-31T12:00:00Z")).await, "valid_time Z");
    for t in ["2026-01-31T12:00:00+00:00", "2026-01-31T13:00:00+01:00", "2026-01-31T07:00:00.000-05:00", "2026-02-01T01:45:00+13:45"] {
        assert_duplicate(&post_json(&c, &url, &vt(t)).await, &id, pos, t);
    }
    let (other, _) = assert_created(&post_json(&c, &url, &vt("2026-01-31T12:00:00.001Z")).await, "another instant");
    assert_ne!(other, id);

    // Time objects too.
    let tobj = |t: &str| typed("drug:aspirin", "approved", "time", json!(t), "agent-1");
    let (tid, tpos) = assert_created(&post_json(&c, &url, &tobj("1950-01-01T00:00:00Z")).await, "time Z");
    assert_duplicate(&post_json(&c, &url, &tobj("1949-12-31T19:00:00.000000-05:00")).await, &tid, tpos, "time -05:00");

    // -0.0 and 0.0 are one number; 1 and 1.0 too.
    let num = |n: Value| typed("drug:aspirin", "risk", "number", n, "agent-1");
    let (nid, npos) = assert_created(&post_json(&c, &url, &num(json!(0.0))).await, "0.0");
    assert_duplicate(&post_json(&c, &url, &num(json!(-0.0))).await, &nid, npos, "-0.0");
    let (nid1, npos1) = assert_created(&post_json(&c, &url, &num(json!(1.0))).await, "1.0");
    assert_duplicate(&post_json(&c, &url, &num(json!(1))).await, &nid1, npos1, "number 1");

    // Key order is not part of the content; neither is an explicit null.
    let reordered =
        br#"{"agent":"agent-1","object":{"value":4000,"type":"integer"},"predicate":"max_daily_dose_mg","subject":"drug:aspirin"}"#;
    let (bid, bpos) = assert_created(&post_json(&c, &url, &base()).await, "base");
    assert_duplicate(&post_raw(&c, &url, Some("application/json"), reordered.to_vec()).await, &bid, bpos, "reordered keys");
    let nulls = json!({"subject": "drug:aspirin", "predicate": "max_daily_dose_mg", "object": {"type": "integer", "value": 4000},
        "agent": "agent-1", "confidence": null, "source": null, "valid_time": null, "supersedes": null, "signature": null});
    assert_duplicate(&post_json(&c, &url, &nulls).await, &bid, bpos, "nulls mean absent");
    // Content types with parameters and +json suffixes are JSON.
    let bytes = serde_json::to_vec(&base()).expect("encode");
    assert_duplicate(&post_raw(&c, &url, Some("application/json; charset=utf-8"), bytes.clone()).await, &bid, bpos, "charset");
    assert_duplicate(&post_raw(&c, &url, Some("Application/JSON"), bytes).await, &bid, bpos, "case-insensitive");

    assert!(server.terminate().success());
    let created = [pos, tpos, npos, npos1, bpos];
    assert_eq!(created, [1, 3, 4, 5, 6], "duplicates use no position");
    assert_eq!(wal_dump(&data).len(), 6, "only distinct values were written");
}

#[tokio::test]
async fn confidence_default_is_not_filled_in() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let (plain, p1) = assert_created(&post_json(&c, &url, &base()).await, "no confidence");
    let (explicit, p2) = assert_created(&post_json(&c, &url, &with(&base(), "confidence", json!(1.0))).await, "confidence 1.0");
    assert_ne!(plain, explicit, "confidence 1.0 given is not the same content as confidence omitted");
    assert_duplicate(&post_json(&c, &url, &with(&base(), "confidence", json!(1))).await, &explicit, p2, "1 == 1.0");
    let (zero, _) = assert_created(&post_json(&c, &url, &with(&base(), "confidence", json!(0))).await, "confidence 0");
    assert_ne!(zero, plain);
    // A source without a tier is not a source with the default tier either.
    let src = |s: Value| with(&base(), "source", s);
    let (untiered, p4) = assert_created(&post_json(&c, &url, &src(json!({"uri": "https://e.org"}))).await, "no tier");
    let (tiered, _) = assert_created(&post_json(&c, &url, &src(json!({"uri": "https://e.org", "tier": "community"}))).await, "tier");
    assert_ne!(untiered, tiered);

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    let stored = |pos: u64| events[pos as usize - 1]["event"]["AssertionRecorded"]["assertion"].clone();
    assert!(stored(p1).get("confidence").is_none(), "the log stores what was submitted, no default: {}", stored(p1));
    assert_eq!(stored(p2)["confidence"], 1.0);
    assert!(stored(p4)["source"].get("tier").is_none(), "{}", stored(p4));
}

// ---------------------------------------------------------------------------
// 2. Duplicates
// ---------------------------------------------------------------------------

#[tokio::test]
async fn duplicates_answer_with_the_original_across_restarts() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let first = post_json(&c, &url, &base()).await;
    let (id, pos) = assert_created(&first, "first");
    let second = post_json(&c, &url, &base()).await;
    assert_duplicate(&second, &id, pos, "same body again");
    let keys: HashSet<&str> = second.2.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, HashSet::from(["id", "position", "status"]), "{}", second.2);
    // The same claim by another agent is another assertion.
    let (other, opos) = assert_created(&post_json(&c, &url, &with(&base(), "agent", json!("agent-2"))).await, "other agent");
    assert_ne!(other, id);
    assert_eq!(opos, 2);

    // Clean restart. (A new client: pooled connections died with the old process.)
    assert!(server.terminate().success());
    server.restart();
    let c = client();
    assert_eq!(position(&c, &server).await, 2, "the log position survives a restart");
    assert_duplicate(&post_json(&c, &url, &base()).await, &id, pos, "after SIGTERM + restart");
    let (_, p3) = assert_created(&post_json(&c, &url, &with(&base(), "agent", json!("agent-3"))).await, "new after restart");
    assert_eq!(p3, 3, "positions continue after a restart");

    // Crash restart: an acknowledged write is durable and still deduplicated.
    server.kill9();
    server.restart();
    let c = client();
    assert_eq!(position(&c, &server).await, 3);
    assert_duplicate(&post_json(&c, &url, &base()).await, &id, pos, "after SIGKILL + restart");
    assert_duplicate(
        &post_json(&c, &url, &with(&base(), "agent", json!("agent-3"))).await,
        &lib_id(&with(&base(), "agent", json!("agent-3"))),
        3,
        "the last write before the crash",
    );

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), 3);
    assert_gap_free(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_posts_create_exactly_one() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let body = typed("drug:ibuprofen", "max_daily_dose_mg", "integer", json!(3200), "agent-1");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (c, url, body, barrier) = (c.clone(), url.clone(), body.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            post_json(&c, &url, &body).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("task"));
    }
    let created: Vec<&Reply> = replies.iter().filter(|r| r.0 == 201).collect();
    assert_eq!(created.len(), 1, "exactly one created: {:?}", replies.iter().map(|r| r.0).collect::<Vec<_>>());
    let (id, pos) = assert_created(created[0], "the one created");
    assert_eq!(pos, 1);
    for r in replies.iter().filter(|r| r.0 != 201) {
        assert_duplicate(r, &id, pos, "concurrent duplicate");
    }
    assert_eq!(position(&c, &server).await, 1);
    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(dumped_assertions(&events), vec![(1, id)], "the log holds it once");
}

// ---------------------------------------------------------------------------
// 3. Batches
// ---------------------------------------------------------------------------

fn batch_item(i: usize) -> Value {
    typed(&format!("drug:{i}"), "max_daily_dose_mg", "integer", json!(i), "batcher")
}

#[tokio::test]
async fn batches_commit_atomically_with_consecutive_positions() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions/batch");
    let single = server.url("/v1/assertions");
    let (_, p0) = assert_created(&post_json(&c, &single, &base()).await, "seed");
    assert_eq!(p0, 1);

    // A valid batch.
    let items: Vec<Value> = (0..5).map(batch_item).collect();
    let (st, ct, b) = post_json(&c, &url, &json!({"assertions": items})).await;
    assert_eq!(st, 200, "{b}");
    assert!(ct.starts_with("application/json"));
    let results = b["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    let batch_recorded_at = b["recorded_at"].as_str().expect("recorded_at").to_string();
    assert!(chrono::DateTime::parse_from_rfc3339(&batch_recorded_at).is_ok(), "{b}");
    for (i, (r, item)) in results.iter().zip(&items).enumerate() {
        assert_eq!(r["status"], "created", "{r}");
        assert_eq!(r["position"], 2 + i as u64, "consecutive positions after the log head: {b}");
        assert_eq!(r["id"], lib_id(item), "results are in request order");
    }
    assert_eq!(position(&c, &server).await, 6);
    // Each item is an ordinary assertion: posting it alone is a duplicate.
    assert_duplicate(&post_json(&c, &single, &items[3]).await, &lib_id(&items[3]), 5, "batch item re-posted alone");

    // The same assertion twice in one batch, plus one already in the log.
    let (st, _, b) = post_json(&c, &url, &json!({"assertions": [batch_item(100), base(), batch_item(100), batch_item(101)]})).await;
    assert_eq!(st, 200, "{b}");
    let r = b["results"].as_array().expect("results");
    assert_eq!(r.len(), 4);
    assert_eq!((r[0]["status"].as_str(), r[0]["position"].as_u64()), (Some("created"), Some(7)), "{b}");
    assert_eq!((r[1]["status"].as_str(), r[1]["position"].as_u64()), (Some("duplicate"), Some(1)), "{b}");
    assert_eq!((r[2]["status"].as_str(), r[2]["position"].as_u64()), (Some("duplicate"), Some(7)), "{b}");
    assert_eq!(r[2]["id"], r[0]["id"]);
    assert_eq!((r[3]["status"].as_str(), r[3]["position"].as_u64()), (Some("created"), Some(8)), "duplicates use no position: {b}");

    // A whole batch of duplicates writes nothing.
    let (st, _, b) = post_json(&c, &url, &json!({"assertions": [batch_item(0), batch_item(1)]})).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["results"].as_array().expect("results").iter().all(|r| r["status"] == "duplicate"), "{b}");
    assert_eq!(position(&c, &server).await, 8);

    // The largest batch allowed.
    let big: Vec<Value> = (1000..11_000).map(batch_item).collect();
    let (st, _, b) = post_json(&c, &url, &json!({"assertions": big})).await;
    assert_eq!(st, 200, "10,000 items are allowed: {}", b["detail"]);
    let r = b["results"].as_array().expect("results");
    assert_eq!(r.len(), 10_000);
    assert!(r.iter().enumerate().all(|(i, x)| x["status"] == "created" && x["position"] == 9 + i as u64));
    assert_eq!(position(&c, &server).await, 10_008);

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), 10_008);
    assert_gap_free(&events);
    let ids: HashSet<String> = dumped_assertions(&events).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 10_008, "no assertion is in the log twice");
    for e in &events[1..6] {
        assert_eq!(e["recorded_at"], batch_recorded_at.as_str(), "a batch is one frame with one recorded_at");
    }
}

#[tokio::test]
async fn an_invalid_item_rejects_the_whole_batch() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions/batch");
    let single = server.url("/v1/assertions");
    assert_created(&post_json(&c, &single, &base()).await, "seed");

    // Validation errors: every bad item is listed with its index and field.
    let items = vec![
        batch_item(0),
        with(&batch_item(1), "subject", json!("")),
        batch_item(2),
        with(&with(&batch_item(3), "confidence", json!(2)), "object", json!({"type": "boolean", "value": "yes"})),
        batch_item(4),
    ];
    let r = post_json(&c, &url, &json!({"assertions": items})).await;
    assert_problem(&r, 422, "invalid items");
    let errs = errors(&r, "invalid items");
    let found: HashSet<(u64, String)> =
        errs.iter().map(|e| (e["index"].as_u64().expect("index"), e["field"].as_str().expect("field").to_string())).collect();
    assert_eq!(
        found,
        HashSet::from([(1, "subject".to_string()), (3, "confidence".to_string()), (3, "object.value".to_string())]),
        "{}",
        r.2
    );
    assert_eq!(position(&c, &server).await, 1, "nothing of an invalid batch is written");

    // Write-time errors (here, superseding an id not in the log) also reject everything.
    let unknown = "0".repeat(64);
    let items = vec![batch_item(10), batch_item(11), with(&batch_item(12), "supersedes", json!([unknown])), batch_item(13)];
    let r = post_json(&c, &url, &json!({"assertions": items})).await;
    assert_problem(&r, 422, "write-time rejection");
    let errs = errors(&r, "write-time rejection");
    assert_eq!(errs.len(), 1, "{}", r.2);
    assert_eq!(errs[0]["index"], 2, "{}", r.2);
    assert_eq!(errs[0]["field"], "supersedes", "{}", r.2);
    assert_eq!(position(&c, &server).await, 1, "nothing of a rejected batch is written");

    // The valid items were never written: on their own they are created, not duplicates.
    let (st, _, b) = post_json(&c, &url, &json!({"assertions": [batch_item(0), batch_item(2), batch_item(4), batch_item(10)]})).await;
    assert_eq!(st, 200, "{b}");
    assert!(b["results"].as_array().expect("results").iter().all(|r| r["status"] == "created"), "{b}");

    assert!(server.terminate().success());
    assert_eq!(wal_dump(&data).len(), 5);
}

#[tokio::test]
async fn batch_shape_and_size_limits() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions/batch");
    assert_created(&post_json(&c, &server.url("/v1/assertions"), &base()).await, "seed");

    let r = post_json(&c, &url, &json!({"assertions": []})).await;
    assert_invalid(&r, "assertions", "empty batch");

    let too_many: Vec<Value> = (0..10_001).map(batch_item).collect();
    let r = post_json(&c, &url, &json!({"assertions": too_many})).await;
    assert_invalid(&r, "assertions", "10,001 items");

    let r = post_json(&c, &url, &json!({"assertions": [batch_item(0)], "atomic": true})).await;
    assert_invalid(&r, "atomic", "unknown top-level field");

    let r = post_json(&c, &url, &json!({"items": [batch_item(0)]})).await;
    assert_invalid(&r, "items", "misnamed list");

    let r = post_json(&c, &url, &json!({})).await;
    assert_invalid(&r, "assertions", "no list");

    let r = post_json(&c, &url, &json!({"assertions": batch_item(0)})).await;
    assert_invalid(&r, "assertions", "an object, not a list");

    let r = post_json(&c, &url, &json!([batch_item(0)])).await;
    assert_invalid(&r, "", "a bare array");

    let r = post_json(&c, &url, &json!({"assertions": [batch_item(0), 42, "x"]})).await;
    assert_problem(&r, 422, "non-object items");
    let idx: HashSet<u64> = errors(&r, "non-object items").iter().filter_map(|e| e["index"].as_u64()).collect();
    assert_eq!(idx, HashSet::from([1, 2]));

    let r = post_raw(&c, &url, Some("application/json"), br#"{"assertions": [{"subject": "a",}]}"#.to_vec()).await;
    assert_problem(&r, 400, "malformed JSON");
    let r = post_raw(&c, &url, Some("text/plain"), serde_json::to_vec(&json!({"assertions": [batch_item(0)]})).expect("encode")).await;
    assert_problem(&r, 415, "text/plain");
    let r = post_raw(&c, &url, None, serde_json::to_vec(&json!({"assertions": [batch_item(0)]})).expect("encode")).await;
    assert_problem(&r, 415, "no content type");

    // A body over 16 MiB, however valid, is refused with 413.
    let filler = "x".repeat(60_000);
    let items: Vec<Value> = (0..300).map(|i| typed(&format!("s{i}"), "p", "text", json!(filler), "a")).collect();
    assert!(serde_json::to_vec(&json!({"assertions": items})).expect("encode").len() > 16 * 1024 * 1024);
    let addr = server.addr;
    let (r, chunked) = tokio::task::spawn_blocking(move || {
        (post_streamed(addr, "/v1/assertions/batch", &items, false), post_streamed(addr, "/v1/assertions/batch", &items, true))
    })
    .await
    .expect("streamed");
    assert_problem(&r, 413, "over 16 MiB");
    assert_eq!(r.2["limit_bytes"], 16 * 1024 * 1024, "{}", r.2);
    // The same without a Content-Length: the limit applies while streaming.
    assert_problem(&chunked, 413, "over 16 MiB, chunked");

    assert_eq!(position(&c, &server).await, 1, "no refused batch wrote anything");
    assert!(server.terminate().success());
    assert_eq!(wal_dump(&data).len(), 1);
}

// ---------------------------------------------------------------------------
// 4. Bad input for single assertions
// ---------------------------------------------------------------------------

/// What a bad request must get: a status and, for 422, the field named.
struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    field: Option<&'static str>,
}

fn json_case(name: &'static str, body: Value, field: &'static str) -> Case {
    Case { name, content_type: Some("application/json"), body: serde_json::to_vec(&body).expect("encode"), status: 422, field: Some(field) }
}

/// `base()` without `key`.
fn without(key: &str) -> Value {
    let mut v = base();
    v.as_object_mut().expect("object").remove(key);
    v
}

fn obj(ty: &str, value: Value) -> Value {
    with(&base(), "object", json!({"type": ty, "value": value}))
}

/// A case sent as raw bytes (for what `json!` cannot express); never 422.
fn raw_case(name: &'static str, content_type: Option<&'static str>, body: &[u8], status: u16) -> Case {
    Case { name, content_type, body: body.to_vec(), status, field: None }
}

fn bad_cases() -> Vec<Case> {
    let id_a = "a".repeat(64);
    let mut cases = vec![
        // subject
        json_case("missing subject", without("subject"), "subject"),
        json_case("null subject", with(&base(), "subject", Value::Null), "subject"),
        json_case("empty subject", with(&base(), "subject", json!("")), "subject"),
        json_case("subject of 513 bytes", with(&base(), "subject", json!("s".repeat(513))), "subject"),
        json_case("subject of 513 bytes in 2-byte chars", with(&base(), "subject", json!(format!("{}x", "é".repeat(256)))), "subject"),
        json_case("subject with a bell", with(&base(), "subject", json!("drug:\u{7}aspirin")), "subject"),
        json_case("subject with a C1 control", with(&base(), "subject", json!("drug:\u{85}aspirin")), "subject"),
        json_case("subject is a number", with(&base(), "subject", json!(42)), "subject"),
        json_case("subject is an object", with(&base(), "subject", json!({"id": "x"})), "subject"),
        // predicate
        json_case("missing predicate", without("predicate"), "predicate"),
        json_case("empty predicate", with(&base(), "predicate", json!("")), "predicate"),
        json_case("predicate of 257 bytes", with(&base(), "predicate", json!("p".repeat(257))), "predicate"),
        json_case("predicate with a newline", with(&base(), "predicate", json!("max\ndose")), "predicate"),
        json_case("predicate is a boolean", with(&base(), "predicate", json!(true)), "predicate"),
        // agent
        json_case("missing agent", without("agent"), "agent"),
        json_case("empty agent", with(&base(), "agent", json!("")), "agent"),
        json_case("agent of 257 bytes", with(&base(), "agent", json!("a".repeat(257))), "agent"),
        json_case("agent with a tab", with(&base(), "agent", json!("agent\t1")), "agent"),
        json_case("agent with NUL", with(&base(), "agent", json!("agent\u{0}")), "agent"),
        json_case("agent is an array", with(&base(), "agent", json!(["agent-1"])), "agent"),
        // object
        json_case("missing object", without("object"), "object"),
        json_case("object is a string", with(&base(), "object", json!("4000")), "object"),
        json_case("object without value", with(&base(), "object", json!({"type": "integer"})), "object.value"),
        json_case("object without type", with(&base(), "object", json!({"value": 4000})), "object.type"),
        json_case("unknown object type", obj("color", json!("red")), "object.type"),
        json_case("object type is not a string", with(&base(), "object", json!({"type": 7, "value": 1})), "object.type"),
        json_case("unknown field in object", with(&base(), "object", json!({"type": "integer", "value": 1, "unit": "mg"})), "object.unit"),
        json_case("text with a number", obj("text", json!(4000)), "object.value"),
        json_case("text over 64 KiB", obj("text", json!("x".repeat(64 * 1024 + 1))), "object.value"),
        json_case("number as a string", obj("number", json!("1.5")), "object.value"),
        json_case("number as a boolean", obj("number", json!(true)), "object.value"),
        json_case("integer with a fraction", obj("integer", json!(1.5)), "object.value"),
        json_case("integer in exponent form", obj("integer", json!(1e3)), "object.value"),
        json_case("integer of 2^63", obj("integer", json!(9_223_372_036_854_775_808u64)), "object.value"),
        json_case("integer as a string", obj("integer", json!("12")), "object.value"),
        json_case("boolean as a string", obj("boolean", json!("true")), "object.value"),
        json_case("boolean as a number", obj("boolean", json!(1)), "object.value"),
        json_case("empty entity", obj("entity", json!("")), "object.value"),
        json_case("entity of 513 bytes", obj("entity", json!("e".repeat(513))), "object.value"),
        json_case("entity with a control character", obj("entity", json!("company:\u{1b}bayer")), "object.value"),
        json_case("entity as a number", obj("entity", json!(42)), "object.value"),
        json_case("time that is not RFC 3339", obj("time", json!("yesterday")), "object.value"),
        json_case("time without a zone", obj("time", json!("2026-01-31T12:00:00")), "object.value"),
        json_case("time as epoch seconds", obj("time", json!(1_700_000_000)), "object.value"),
        // valid_time
        json_case("valid_time month 13", with(&base(), "valid_time", json!("2026-13-01T00:00:00Z")), "valid_time"),
        json_case("valid_time date only", with(&base(), "valid_time", json!("2026-01-31")), "valid_time"),
        json_case("valid_time as a number", with(&base(), "valid_time", json!(1_700_000_000)), "valid_time"),
        // confidence
        json_case("confidence -0.1", with(&base(), "confidence", json!(-0.1)), "confidence"),
        json_case("confidence 1.1", with(&base(), "confidence", json!(1.1)), "confidence"),
        json_case("confidence as a string", with(&base(), "confidence", json!("0.5")), "confidence"),
        // unknown fields
        json_case("unknown top-level field", with(&base(), "color", json!("red")), "color"),
        json_case("misspelled field", with(&without("predicate"), "predicat", json!("max_daily_dose_mg")), "predicat"),
        // source
        json_case("source is a string", with(&base(), "source", json!("https://example.org")), "source"),
        json_case("unknown field in source", with(&base(), "source", json!({"uri": "https://e.org", "author": "x"})), "source.author"),
        json_case("bad source tier", with(&base(), "source", json!({"uri": "https://e.org", "tier": "gossip"})), "source.tier"),
        json_case("source tier in capitals", with(&base(), "source", json!({"uri": "https://e.org", "tier": "Clinical"})), "source.tier"),
        json_case("short source hash", with(&base(), "source", json!({"uri": "https://e.org", "hash": "abc"})), "source.hash"),
        json_case("non-hex source hash", with(&base(), "source", json!({"uri": "https://e.org", "hash": "g".repeat(64)})), "source.hash"),
        json_case("source without uri", with(&base(), "source", json!({"tier": "clinical"})), "source.uri"),
        json_case("source with empty uri", with(&base(), "source", json!({"uri": ""})), "source.uri"),
        json_case("source uri over 2048 bytes", with(&base(), "source", json!({"uri": "u".repeat(2049)})), "source.uri"),
        // supersedes
        json_case("supersedes is a string", with(&base(), "supersedes", json!(id_a.clone())), "supersedes"),
        json_case("supersedes id not hex", with(&base(), "supersedes", json!(["xyz"])), "supersedes.0"),
        json_case(
            "supersedes id with non-hex capitals",
            with(&base(), "supersedes", json!([id_a.clone(), "G".repeat(64)])),
            "supersedes.1",
        ),
        json_case("supersedes id of 63 chars", with(&base(), "supersedes", json!(["a".repeat(63)])), "supersedes.0"),
        json_case("supersedes id as a number", with(&base(), "supersedes", json!([1])), "supersedes.0"),
        json_case("supersedes the same id twice", with(&base(), "supersedes", json!([id_a.clone(), id_a])), "supersedes"),
        json_case(
            "supersedes 257 ids",
            with(&base(), "supersedes", json!((0..257).map(|i| format!("{i:064x}")).collect::<Vec<_>>())),
            "supersedes",
        ),
        // signature
        json_case("signature too short", with(&base(), "signature", json!("abcd")), "signature"),
        json_case("signature not hex", with(&base(), "signature", json!("z".repeat(128))), "signature"),
        json_case("signature as a number", with(&base(), "signature", json!(42)), "signature"),
        json_case("signature with a plain-name agent", with(&base(), "signature", json!("ab".repeat(64))), "agent"),
        // the body as a whole
        json_case("body is a string", json!("drug:aspirin"), ""),
        json_case("body is a number", json!(42), ""),
        json_case("body is null", Value::Null, ""),
        json_case("body is a JSON array", json!([base()]), ""),
    ];
    cases.extend([
        raw_case(
            "number 1e400 (not a finite double)",
            Some("application/json"),
            br#"{"subject":"s","predicate":"p","agent":"a","object":{"type":"number","value":1e400}}"#,
            400,
        ),
        Case {
            name: "integer below -2^63",
            content_type: Some("application/json"),
            body: br#"{"subject":"s","predicate":"p","agent":"a","object":{"type":"integer","value":-9223372036854775809}}"#.to_vec(),
            status: 422,
            field: Some("object.value"),
        },
        raw_case(
            "NaN literal",
            Some("application/json"),
            br#"{"subject":"s","predicate":"p","agent":"a","object":{"type":"number","value":NaN}}"#,
            400,
        ),
        raw_case("truncated JSON", Some("application/json"), br#"{"subject": "drug:aspirin","#, 400),
        raw_case("trailing comma", Some("application/json"), br#"{"subject": "s", "predicate": "p",}"#, 400),
        raw_case("trailing garbage", Some("application/json"), br#"{"subject": "s"} {"#, 400),
        raw_case("empty body", Some("application/json"), b"", 400),
        raw_case("invalid UTF-8", Some("application/json"), b"{\"subject\": \"\xff\xfe\"}", 400),
        raw_case("text/plain", Some("text/plain"), &serde_json::to_vec(&base()).expect("encode"), 415),
        raw_case("form content type", Some("application/x-www-form-urlencoded"), b"subject=drug%3Aaspirin", 415),
        raw_case("no content type", None, &serde_json::to_vec(&base()).expect("encode"), 415),
        raw_case("text/json", Some("text/json"), &serde_json::to_vec(&base()).expect("encode"), 415),
        raw_case(
            "body over 1 MiB",
            Some("application/json"),
            &serde_json::to_vec(&obj("text", json!("x".repeat(1024 * 1024)))).expect("encode"),
            413,
        ),
    ]);
    cases
}

#[tokio::test]
async fn bad_assertions_are_refused_and_write_nothing() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    assert_created(&post_json(&c, &url, &base()).await, "seed");

    let cases = bad_cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let names: HashSet<&str> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len(), "case names are distinct");
    for case in &cases {
        let before = position(&c, &server).await;
        let r = if case.status == 413 {
            // Answered before the body is read: a raw connection sees the answer
            // even when the server stops reading (see `send_raw`).
            let (addr, ct, body) = (server.addr, case.content_type, case.body.clone());
            tokio::task::spawn_blocking(move || send_raw(addr, "/v1/assertions", ct, vec![body], false)).await.expect("raw")
        } else {
            post_raw(&c, &url, case.content_type, case.body.clone()).await
        };
        assert_problem(&r, case.status, case.name);
        if case.status == 422 {
            assert_invalid(&r, case.field.expect("422 cases name a field"), case.name);
        }
        assert_eq!(position(&c, &server).await, before, "{}: the log is unchanged", case.name);
    }
    // The next valid write gets the next position: refused requests use none.
    let (_, pos) = assert_created(&post_json(&c, &url, &with(&base(), "agent", json!("agent-2"))).await, "valid after bad");
    assert_eq!(pos, 2);

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), 2, "only the valid writes are in the log");
    assert_gap_free(&events);
}

#[tokio::test]
async fn all_problems_of_an_assertion_are_reported_at_once() {
    let (_tmp, _data, server) = new_server();
    let c = client();
    let body = json!({"subject": "", "predicate": "p".repeat(300), "object": {"type": "integer", "value": "x"}, "agent": 5,
        "confidence": 7, "source": {"uri": "", "tier": "rumour"}, "extra": 1});
    let r = post_json(&c, &server.url("/v1/assertions"), &body).await;
    assert_problem(&r, 422, "many problems");
    let fields: HashSet<String> = errors(&r, "many problems").iter().map(|e| e["field"].as_str().expect("field").to_string()).collect();
    for f in ["subject", "predicate", "object.value", "agent", "confidence", "source.uri", "source.tier", "extra"] {
        assert!(fields.contains(f), "{f} reported: {}", r.2);
    }
    assert_eq!(position(&c, &server).await, 0);
}

// ---------------------------------------------------------------------------
// 5. Signatures
// ---------------------------------------------------------------------------

#[tokio::test]
async fn signatures_are_verified() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let key = signing_key();
    let agent = agent_of(&key);
    let unsigned = with(&base(), "agent", json!(agent));

    let good = signed(&unsigned, &key);
    let (id, pos) = assert_created(&post_json(&c, &url, &good).await, "valid signature");
    assert_eq!(id, lib_id(&unsigned), "the signature is not part of the id");

    // Upper-case hex is the same signature.
    let upper = with(&good, "signature", json!(good["signature"].as_str().expect("sig").to_uppercase()));
    assert_duplicate(&post_json(&c, &url, &upper).await, &id, pos, "upper-case signature");

    let other = typed("drug:aspirin", "otc", "boolean", json!(true), &agent);
    let other_sig = signed(&other, &key)["signature"].as_str().expect("sig").to_string();
    let bad = with(&other, "signature", json!(flipped(&other_sig)));
    assert_invalid(&post_json(&c, &url, &bad).await, "signature", "flipped signature");

    // A signature made for another assertion does not verify for this one.
    let replayed = with(&other, "signature", good["signature"].clone());
    assert_invalid(&post_json(&c, &url, &replayed).await, "signature", "signature of another assertion");

    // Signed by a different key than the agent names.
    let stranger = SigningKey::from_bytes(&[9u8; 32]);
    let forged = with(&other, "signature", signed(&other, &stranger)["signature"].clone());
    assert_invalid(&post_json(&c, &url, &forged).await, "signature", "signed by another key");

    // A signature with an agent that is not a public key cannot be verified.
    let named = with(&base(), "agent", json!("agent-1"));
    let r = post_json(&c, &url, &with(&named, "signature", good["signature"].clone())).await;
    assert_invalid(&r, "agent", "agent is not a key");

    // Unsigned assertions by key agents are fine on a default server.
    let (other_id, p2) = assert_created(&post_json(&c, &url, &other).await, "unsigned, key agent");
    assert_eq!(p2, 2);
    // Signed or not, it is the same assertion; the first one recorded is kept.
    let other_signed = with(&other, "signature", json!(other_sig));
    assert_duplicate(&post_json(&c, &url, &other_signed).await, &other_id, p2, "signed copy of an unsigned assertion");

    // Signed retractions: the signature covers the retraction message, not the id.
    let retract = server.url(&format!("/v1/assertions/{id}/retractions"));
    let msg = stemedb::model::signature::retraction_message(&id.parse().expect("id"));
    let rsig = hex::encode(key.sign(&msg).to_bytes());
    let r = post_json(&c, &retract, &json!({"agent": agent, "reason": "x", "signature": good["signature"]})).await;
    assert_invalid(&r, "signature", "assertion signature replayed as a retraction");
    let r = post_json(&c, &retract, &json!({"agent": agent, "reason": "x", "signature": flipped(&rsig)})).await;
    assert_invalid(&r, "signature", "flipped retraction signature");
    let r = post_json(&c, &retract, &json!({"agent": agent, "reason": "x", "signature": "abc"})).await;
    assert_invalid(&r, "signature", "malformed retraction signature");
    assert_eq!(position(&c, &server).await, 2);
    let r = post_json(&c, &retract, &json!({"agent": agent, "reason": "x", "signature": rsig})).await;
    assert_eq!(r.0, 201, "{}", r.2);
    assert_eq!(r.2["position"], 3);

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["event"]["AssertionRecorded"]["assertion"]["signature"], good["signature"], "the signature is stored");
    assert!(events[1]["event"]["AssertionRecorded"]["assertion"].get("signature").is_none(), "{}", events[1]);
    assert_eq!(events[2]["event"]["AssertionRetracted"]["signature"], rsig);
}

#[tokio::test]
async fn required_signatures_are_enforced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = Server::start(&data, &[("STEMEDB_REQUIRE_SIGNATURES", "true")]);
    let c = client();
    let url = server.url("/v1/assertions");
    let key = signing_key();
    let agent = agent_of(&key);
    let unsigned = with(&base(), "agent", json!(agent));

    assert_invalid(&post_json(&c, &url, &unsigned).await, "signature", "unsigned");
    assert_invalid(&post_json(&c, &url, &base()).await, "agent", "unsigned, plain-name agent");
    let good = signed(&unsigned, &key);
    let r = post_json(&c, &url, &with(&base(), "signature", good["signature"].clone())).await;
    assert_invalid(&r, "agent", "signed, plain-name agent");
    let bad = with(&good, "signature", json!(flipped(good["signature"].as_str().expect("sig"))));
    assert_invalid(&post_json(&c, &url, &bad).await, "signature", "flipped");

    // Batches apply the same policy per item.
    let r = post_json(&c, &server.url("/v1/assertions/batch"), &json!({"assertions": [good, unsigned]})).await;
    assert_problem(&r, 422, "batch with an unsigned item");
    assert!(errors(&r, "batch").iter().all(|e| e["index"] == 1), "{}", r.2);
    assert_eq!(position(&c, &server).await, 0);

    let (id, pos) = assert_created(&post_json(&c, &url, &good).await, "signed");
    assert_eq!((id.as_str(), pos), (lib_id(&unsigned).as_str(), 1));

    assert!(server.terminate().success());
    assert_eq!(dumped_assertions(&wal_dump(&data)), vec![(1, id)]);
}

/// Runs `stemedb serve` with `args` and `env` (every other setting
/// default) and expects it to refuse to start: the exit code and stderr.
async fn refused_start(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = tokio::process::Command::new(common::bin());
    cmd.arg("serve").args(args);
    cmd.env("STEMEDB_DATA_DIR", tmp.path().join("data"))
        .env("STEMEDB_BIND_ADDR", common::free_addr().to_string())
        .env("NO_COLOR", "1")
        .env_remove("STEMEDB_REQUIRE_SIGNATURES")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the server refused to start instead of running")
        .expect("run stemedb");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_bad_require_signatures_value_refuses_to_start() {
    for (env, flag) in [(Some("banana"), None), (None, Some("banana")), (Some("yes please"), None), (Some("2"), None)] {
        let env_vars: Vec<(&str, &str)> = env.map(|v| ("STEMEDB_REQUIRE_SIGNATURES", v)).into_iter().collect();
        let args: Vec<&str> = flag.map(|f| vec!["--require-signatures", f]).unwrap_or_default();
        let (code, stderr) = refused_start(&env_vars, &args).await;
        assert!(code.is_some_and(|c| c != 0), "{env:?}/{flag:?}: non-zero exit, got {code:?}; stderr: {stderr}");
        // The message names what the operator has to fix: the variable, or the flag.
        let named = if env.is_some() { "STEMEDB_REQUIRE_SIGNATURES" } else { "--require-signatures" };
        assert!(stderr.contains(named), "{env:?}/{flag:?}: the message names {named}: {stderr}");
    }
}

#[tokio::test]
async fn bad_store_settings_refuse_to_start() {
    for (var, value) in [
        ("STEMEDB_STORE_CACHE_MB", "0"),
        ("STEMEDB_STORE_CACHE_MB", "lots"),
        ("STEMEDB_PROJECTION_SYNC_INTERVAL", "1ms"),
        ("STEMEDB_PROJECTION_SYNC_INTERVAL", "soon"),
        ("STEMEDB_SEARCH_THREADS", "-1"),
        ("STEMEDB_SEARCH_THREADS", "many"),
    ] {
        let (code, stderr) = refused_start(&[(var, value)], &[]).await;
        assert!(code.is_some_and(|c| c != 0), "{var}={value}: non-zero exit, got {code:?}; stderr: {stderr}");
        assert!(stderr.contains(var), "{var}={value}: the message names the variable: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// 6. Supersedes and retractions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn supersedes_is_limited_to_ones_own_claims_on_the_same_pair() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let v1 = typed("drug:aspirin", "max_daily_dose_mg", "integer", json!(4000), "alice");
    let (x1, _) = assert_created(&post_json(&c, &url, &v1).await, "v1");
    let (bob_x, _) =
        assert_created(&post_json(&c, &url, &typed("drug:aspirin", "max_daily_dose_mg", "integer", json!(3000), "bob")).await, "bob");
    // A pair whose concatenation equals the first one's.
    assert_created(&post_json(&c, &url, &typed("drug:aspirinmax", "_daily_dose_mg", "integer", json!(4000), "alice")).await, "shift");
    assert_eq!(position(&c, &server).await, 3);

    let sup = |subject: &str, predicate: &str, agent: &str, value: i64, ids: Vec<&str>| {
        with(&typed(subject, predicate, "integer", json!(value), agent), "supersedes", json!(ids))
    };
    let expect_rejected = |r: Reply, id: &str, ctx: &str| {
        assert_problem(&r, 422, ctx);
        let errs = errors(&r, ctx);
        assert!(
            errs.iter().any(|e| e["field"] == "supersedes" && e["reason"].as_str().is_some_and(|s| s.contains(id))),
            "{ctx}: the error names supersedes and the id: {}",
            r.2
        );
    };
    expect_rejected(
        post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "alice", 1, vec![&bob_x])).await,
        &bob_x,
        "another agent's",
    );
    expect_rejected(post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "bob", 2, vec![&x1])).await, &x1, "bob supersedes alice");
    expect_rejected(post_json(&c, &url, &sup("drug:ibuprofen", "max_daily_dose_mg", "alice", 3, vec![&x1])).await, &x1, "another subject");
    expect_rejected(post_json(&c, &url, &sup("drug:aspirin", "min_daily_dose_mg", "alice", 4, vec![&x1])).await, &x1, "another predicate");
    expect_rejected(post_json(&c, &url, &sup("drug:aspirinmax", "_daily_dose_mg", "alice", 5, vec![&x1])).await, &x1, "shifted pair");
    let unknown = "f".repeat(64);
    expect_rejected(
        post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "alice", 6, vec![&unknown])).await,
        &unknown,
        "unknown id",
    );

    // One valid and one unknown id: the error points at the unknown one,
    // in the order the client sent them.
    let low = "0".repeat(64);
    let r = post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "alice", 7, vec![&x1, &low])).await;
    assert_problem(&r, 422, "valid + unknown");
    let errs = errors(&r, "valid + unknown");
    assert_eq!(errs.len(), 1, "{}", r.2);
    assert!(errs[0]["reason"].as_str().is_some_and(|s| s.contains(&low)), "{}", r.2);
    // Ids are kept sorted, so write-time errors name the id rather than an index.
    assert_eq!(errs[0]["field"], "supersedes", "never points at the valid id: {}", r.2);
    assert_eq!(position(&c, &server).await, 3, "rejected supersessions write nothing");

    let (x2, p) = assert_created(&post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "alice", 3900, vec![&x1])).await, "own");
    assert_eq!(p, 4);
    // A chain, and several at once (in any order).
    let (x3, _) =
        assert_created(&post_json(&c, &url, &sup("drug:aspirin", "max_daily_dose_mg", "alice", 3800, vec![&x2, &x1])).await, "two");
    assert_eq!(x3, lib_id(&sup("drug:aspirin", "max_daily_dose_mg", "alice", 3800, vec![&x1, &x2])), "supersedes order is not content");
    // Within one batch, an item may supersede an earlier item of the batch.
    let a = typed("drug:x", "p", "integer", json!(1), "alice");
    let b = with(&typed("drug:x", "p", "integer", json!(2), "alice"), "supersedes", json!([lib_id(&a)]));
    let (st, _, body) = post_json(&c, &server.url("/v1/assertions/batch"), &json!({"assertions": [a, b]})).await;
    assert_eq!(st, 200, "{body}");

    assert!(server.terminate().success());
    let events = wal_dump(&data);
    assert_eq!(events.len(), 7);
    let sup_of_x2 = &events[3]["event"]["AssertionRecorded"]["assertion"]["supersedes"];
    assert_eq!(sup_of_x2, &json!([x1]));
}

#[tokio::test]
async fn retractions_by_the_author_only_and_idempotent() {
    let (_tmp, data, mut server) = new_server();
    let c = client();
    let (id, _) = assert_created(&post_json(&c, &server.url("/v1/assertions"), &with(&base(), "agent", json!("alice"))).await, "assert");
    let url = server.url(&format!("/v1/assertions/{id}/retractions"));

    let r = post_json(&c, &url, &json!({"agent": "mallory", "reason": "I disagree"})).await;
    assert_problem(&r, 403, "another agent");
    let r = post_json(&c, &server.url(&format!("/v1/assertions/{}/retractions", "e".repeat(64))), &json!({"agent": "alice"})).await;
    assert_problem(&r, 404, "unknown id");
    for bad in ["xyz", &id.to_uppercase(), &id[..63]] {
        let r = post_json(&c, &server.url(&format!("/v1/assertions/{bad}/retractions")), &json!({"agent": "alice"})).await;
        assert_problem(&r, 404, &format!("malformed id {bad}"));
    }
    assert_invalid(&post_json(&c, &url, &json!({"reason": "no agent"})).await, "agent", "no agent");
    assert_invalid(&post_json(&c, &url, &json!({"agent": ""})).await, "agent", "empty agent");
    assert_invalid(&post_json(&c, &url, &json!({"agent": "alice", "why": "x"})).await, "why", "unknown field");
    assert_invalid(&post_json(&c, &url, &json!({"agent": "alice", "reason": "r".repeat(4097)})).await, "reason", "long reason");
    assert_invalid(&post_json(&c, &url, &json!({"agent": "alice", "reason": 5})).await, "reason", "reason is a number");
    assert_invalid(&post_json(&c, &url, &json!(["alice"])).await, "", "array body");
    assert_problem(&post_raw(&c, &url, Some("text/plain"), br#"{"agent":"alice"}"#.to_vec()).await, 415, "text/plain");
    assert_problem(&post_raw(&c, &url, Some("application/json"), br#"{"agent":"#.to_vec()).await, 400, "malformed");
    assert_eq!(position(&c, &server).await, 1, "refused retractions write nothing");

    let r = post_json(&c, &url, &json!({"agent": "alice", "reason": "dose label was revised"})).await;
    let (rid, rpos) = assert_created(&r, "retraction");
    assert_eq!((rid.as_str(), rpos), (id.as_str(), 2));
    let again = post_json(&c, &url, &json!({"agent": "alice", "reason": "again, differently worded"})).await;
    assert_duplicate(&again, &id, 2, "second retraction");
    // Still forbidden to others, even once retracted.
    assert_problem(&post_json(&c, &url, &json!({"agent": "mallory"})).await, 403, "others after retraction");
    // The assertion itself is still in the log: posting it again is a duplicate.
    assert_duplicate(&post_json(&c, &server.url("/v1/assertions"), &with(&base(), "agent", json!("alice"))).await, &id, 1, "re-assert");

    assert!(server.terminate().success());
    server.restart();
    let c = client();
    assert_duplicate(&post_json(&c, &url, &json!({"agent": "alice"})).await, &id, 2, "retraction after restart");
    assert!(server.terminate().success());

    let events = wal_dump(&data);
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["event"]["AssertionRetracted"], json!({"id": id, "agent": "alice", "reason": "dose label was revised"}));
}

// ---------------------------------------------------------------------------
// 7. Errors, health and metrics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_and_health_reports_position() {
    let (_tmp, _data, server) = new_server();
    let c = client();
    for (method, path) in
        [(Method::GET, "/nope"), (Method::POST, "/v1/assertion"), (Method::POST, "/v1/assertions/batch/x"), (Method::GET, "/")]
    {
        let (r, _) = request(&c, method.clone(), &server.url(path)).await;
        assert_problem(&r, 404, &format!("{method} {path}"));
    }
    let retractions = format!("/v1/assertions/{}/retractions", "a".repeat(64));
    for (method, path, allow) in [
        (Method::PUT, "/v1/assertions", "POST"),
        (Method::DELETE, "/v1/assertions", "POST"),
        (Method::DELETE, "/v1/assertions/batch", "POST"),
        (Method::GET, retractions.as_str(), "POST"),
        (Method::POST, "/v1/health", "GET"),
        (Method::DELETE, "/metrics", "GET"),
    ] {
        let (r, headers) = request(&c, method.clone(), &server.url(path)).await;
        assert_problem(&r, 405, &format!("{method} {path}"));
        let allowed = headers.get("allow").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(allowed.contains(allow), "{method} {path}: Allow names {allow}: {allowed:?}");
    }

    let (st, ct, h) = get_json(&c, &server.url("/v1/health")).await;
    assert_eq!(st, 200);
    assert!(ct.starts_with("application/json"), "{ct}");
    assert_eq!(h, json!({"status": "healthy", "version": env!("CARGO_PKG_VERSION"), "position": 0, "role": "writer"}));
    assert_created(&post_json(&c, &server.url("/v1/assertions"), &base()).await, "one write");
    let (_, _, h) = get_json(&c, &server.url("/v1/health")).await;
    assert_eq!(h["position"], 1);
}

#[tokio::test]
async fn metrics_count_exactly_what_was_created() {
    let (_tmp, _data, server) = new_server();
    let c = client();
    let m0 = metrics_text(&c, &server).await;
    let count = |m: &str, s: &str| metric(m, s).unwrap_or(0.0);
    assert_eq!(metric(&m0, "stemedb_assertions_total"), Some(0.0), "the counter exists from the start:\n{m0}");
    let url = server.url("/v1/assertions");

    for i in 0..3 {
        assert_created(&post_json(&c, &url, &batch_item(i)).await, "new");
    }
    assert_duplicate(&post_json(&c, &url, &batch_item(0)).await, &lib_id(&batch_item(0)), 1, "dup");
    assert_problem(&post_json(&c, &url, &with(&base(), "confidence", json!(9))).await, 422, "invalid");
    let (st, _, b) = post_json(
        &c,
        &server.url("/v1/assertions/batch"),
        &json!({"assertions": [batch_item(10), batch_item(1), batch_item(11), batch_item(10)]}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let r = post_json(&c, &server.url("/v1/assertions/batch"), &json!({"assertions": [batch_item(20), {"subject": ""}]})).await;
    assert_problem(&r, 422, "invalid batch");
    let id0 = lib_id(&batch_item(0));
    let retract = server.url(&format!("/v1/assertions/{id0}/retractions"));
    assert_eq!(post_json(&c, &retract, &json!({"agent": "batcher"})).await.0, 201);
    assert_eq!(post_json(&c, &retract, &json!({"agent": "batcher"})).await.0, 200);

    let m1 = metrics_text(&c, &server).await;
    assert_eq!(count(&m1, "stemedb_assertions_total") - count(&m0, "stemedb_assertions_total"), 5.0, "3 single + 2 batch created:\n{m1}");
    assert_eq!(count(&m1, "stemedb_events_total"), 6.0, "5 assertions + 1 retraction:\n{m1}");
    assert_eq!(count(&m1, "stemedb_wal_position"), 6.0);
    for needle in [
        "stemedb_wal_fsync_latency_seconds_bucket{le=\"+Inf\"}",
        "stemedb_wal_group_commit_size_bucket{le=\"+Inf\"}",
        "stemedb_http_request_duration_seconds_bucket{route=\"/v1/assertions\",le=\"+Inf\"}",
    ] {
        assert!(count(&m1, needle) >= 1.0, "{needle} is a histogram with observations:\n{m1}");
    }
    // Five commits made something durable: 3 singles, 1 batch (2 new), 1 retraction.
    assert_eq!(count(&m1, "stemedb_wal_group_commit_size_count"), 5.0, "{m1}");
    assert_eq!(count(&m1, "stemedb_wal_group_commit_size_sum"), 6.0, "{m1}");
    let req = |route: &str, status: u16| count(&m1, &format!("stemedb_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"));
    assert_eq!(req("/v1/assertions", 201), 3.0, "{m1}");
    assert_eq!(req("/v1/assertions", 200), 1.0, "{m1}");
    assert_eq!(req("/v1/assertions", 422), 1.0, "{m1}");
    assert_eq!(req("/v1/assertions/batch", 200), 1.0, "{m1}");
    assert_eq!(req("/v1/assertions/batch", 422), 1.0, "{m1}");
    assert_eq!(req("/v1/assertions/{id}/retractions", 201), 1.0, "routes are labelled by template, not raw path:\n{m1}");
    assert_eq!(req("/v1/assertions/{id}/retractions", 200), 1.0, "{m1}");
    assert!(!m1.contains(&id0), "no ids in labels");
    assert!(req("/metrics", 200) >= 1.0, "{m1}");
}

// ---------------------------------------------------------------------------
// 8. Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_concurrent_writes_keeps_every_acknowledged_write() {
    let (_tmp, data, server) = new_server();
    let c = client();
    let url = server.url("/v1/assertions");
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut writers = Vec::new();
    for w in 0..32 {
        let (c, url, acked_tx) = (c.clone(), url.clone(), acked_tx.clone());
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, u64)> = Vec::new();
            // Bounded, so a server that ignores SIGTERM cannot hang the test;
            // `stopped` says the shutdown, not the bound, ended the loop.
            let mut stopped = false;
            for i in 0..5_000 {
                let body = typed(&format!("writer:{w}"), "seq", "integer", json!(i), &format!("writer-{w}"));
                let sent = c.post(&url).json(&body).send().await;
                let Ok(resp) = sent else {
                    stopped = true;
                    break;
                };
                let status = resp.status().as_u16();
                let Ok(bytes) = resp.bytes().await else {
                    stopped = true;
                    break;
                };
                match status {
                    201 => {
                        let b: Value = serde_json::from_slice(&bytes).expect("json");
                        acked.push((b["id"].as_str().expect("id").to_string(), b["position"].as_u64().expect("position")));
                        let _ = acked_tx.send(());
                    }
                    503 => {
                        stopped = true;
                        break;
                    }
                    other => panic!("writer {w}: unexpected {other}: {}", String::from_utf8_lossy(&bytes)),
                }
            }
            (acked, stopped)
        }));
    }
    drop(acked_tx);
    // Let the writers get going, then stop the server under their feet.
    for _ in 0..320 {
        acked_rx.recv().await.expect("writers are acknowledged");
    }
    let (mut server, status) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let st = server.terminate();
        (server, st)
    })
    .await
    .expect("terminate");
    assert!(status.success(), "SIGTERM under load exits 0, got {status}; log:\n{}", server.log());

    let mut acked = Vec::new();
    for w in writers {
        let (a, stopped) = w.await.expect("writer");
        assert!(stopped, "every writer was still writing when the server stopped");
        acked.extend(a);
    }
    assert!(acked.len() >= 320);
    let events = wal_dump(&data);
    assert_gap_free(&events);
    let in_log: BTreeMap<u64, String> = dumped_assertions(&events).into_iter().collect();
    assert_eq!(in_log.len(), events.len());
    for (id, pos) in &acked {
        assert_eq!(in_log.get(pos), Some(id), "acknowledged write at {pos} is in the log");
    }
    // And the restarted server agrees.
    server.restart();
    assert_eq!(position(&client(), &server).await, events.len() as u64);
    let _ = server.terminate();
}
