//! The log in object storage, against the real binary and a real S3 server
//! (moto) on loopback: shipping and restoring to the latest state gives the
//! same answers on every endpoint; point-in-time restores by time and by
//! position; corrupted and missing objects are named by `backup verify` and
//! `restore`; an outage of the store loses nothing; a follower serves the
//! writer's answers and refuses writes; a second writer on one prefix is
//! refused, and a takeover fences the old writer.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::corpus::{self, Corpus};
use common::s3::S3Server;
use serde_json::{Value, json};

/// Environment of a writer shipping to `prefix` every 200 ms, with small
/// segments so that a test spans many of them.
fn writer_env(s3: &S3Server, prefix: &str) -> Vec<(&'static str, String)> {
    let mut env = s3.env();
    env.push(("STEMEDB_S3_URL", s3.url(prefix)));
    env.push(("STEMEDB_S3_SHIP_INTERVAL", "200ms".into()));
    env.push(("STEMEDB_WAL_SEGMENT_BYTES", "65536".into()));
    env
}

/// Environment of a follower of `prefix`, polling every 100 ms.
fn follower_env(s3: &S3Server, prefix: &str) -> Vec<(&'static str, String)> {
    let mut env = s3.env();
    env.push(("STEMEDB_FOLLOW", s3.url(prefix)));
    env.push(("STEMEDB_FOLLOW_POLL_INTERVAL", "100ms".into()));
    env
}

fn start(data: &Path, env: &[(&'static str, String)]) -> common::Server {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::Server::start(data, &pairs)
}

async fn ready(c: &reqwest::Client, server: &common::Server) -> Value {
    common::get_json(c, &server.url("/v1/ready")).await.2
}

/// Waits until the writer reports everything up to `position` shipped.
async fn wait_shipped(c: &reqwest::Client, server: &common::Server, position: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ready(c, server).await;
        if r["shipping"]["shipped_position"].as_u64().unwrap_or(0) >= position {
            return r;
        }
        assert!(Instant::now() < deadline, "position {position} not shipped within 60 s: {r}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of an unlabelled series in Prometheus text (0 if absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn cli(data: &Path, args: &[&str], s3: &S3Server) -> (i32, String, String) {
    common::run_cli_env(data, args, &s3.env())
}

fn restore(s3: &S3Server, data: &Path, prefix: &str, extra: &[&str]) -> Value {
    let url = s3.url(prefix);
    let mut args = vec!["restore", "--from", url.as_str(), "--quiet"];
    args.extend_from_slice(extra);
    let (code, out, err) = cli(data, &args, s3);
    assert_eq!(code, 0, "restore {extra:?} failed: {err}\n{out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("restore prints JSON ({e}): {out}"))
}

fn positions(data: &Path) -> Vec<u64> {
    common::wal_dump(data).iter().map(|r| r["position"].as_u64().expect("position")).collect()
}

fn verify_projections(data: &Path) {
    let (code, out, err) = common::run_cli(data, &["admin", "verify-projections"]);
    assert_eq!(code, 0, "verify-projections after restore: {out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ship_then_restore_latest_answers_the_same() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let mut writer = start(&dir.path().join("writer"), &writer_env(&s3, "db1"));
    let corpus: Corpus = corpus::load(&c, &writer, 6, 400, 40, Some(9)).await;
    let r = wait_shipped(&c, &writer, corpus.last).await;
    assert_eq!(r["shipping"]["state"], "shipping", "{r}");
    assert!(r["shipping"]["lag_seconds"].as_f64().expect("lag") < 60.0, "{r}");
    let before = corpus::snapshot(&c, &writer, &corpus, 30, 5).await;
    let metrics = c.get(writer.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    for m in ["stemedb_wal_shipped_position", "stemedb_wal_shipping_lag_seconds"] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }

    // The archive: many segments, listed and verified.
    let (code, out, err) = cli(dir.path(), &["backup", "list", "--from", &s3.url("db1")], &s3);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).expect("list JSON");
    assert_eq!((list["first_position"].as_u64(), list["last_position"].as_u64()), (Some(1), Some(corpus.last)), "{list}");
    assert!(list["segments"].as_u64().unwrap_or(0) > 3, "small segments ship as many objects: {list}");
    let (code, out, err) = cli(dir.path(), &["backup", "verify", "--from", &s3.url("db1")], &s3);
    assert_eq!(code, 0, "backup verify of a sound archive: {out}{err}");

    // Restore into a new directory: the same log, the same answers.
    let restored = dir.path().join("restored");
    let summary = restore(&s3, &restored, "db1", &[]);
    assert_eq!(summary["position"].as_u64(), Some(corpus.last), "{summary}");
    assert!(restored.join("db/ids.redb").exists(), "restore builds the write path's id index too");
    verify_projections(&restored);
    assert_eq!(common::wal_dump(&restored), {
        writer.terminate();
        common::wal_dump(&dir.path().join("writer"))
    });
    let copy = common::Server::start(&restored, &[]);
    let after = corpus::snapshot(&c, &copy, &corpus, 30, 5).await;
    corpus::assert_same(&before, &after, "writer vs. its restore");
    // The restored id index knows every id: re-posting old assertions is
    // answered as a duplicate of the original, from the first request on.
    for k in [1, 1_201, corpus.ids.len() - 3] {
        assert!(!k.is_multiple_of(11), "item {k} may carry a supersedes");
        let (body, _) = corpus::item(k, corpus.subjects);
        let (st, _, r) = common::post_json(&c, &copy.url("/v1/assertions"), &body).await;
        assert_eq!((st, r["status"].as_str()), (200, Some("duplicate")), "item {k}: {r}");
        assert_eq!((r["id"].as_str(), r["position"].as_u64()), (Some(corpus.ids[k].0.as_str()), Some(corpus.ids[k].1)), "item {k}: {r}");
    }

    // A non-empty target is refused unless --force.
    let url = s3.url("db1");
    let (code, _, err) = cli(&restored, &["restore", "--from", &url, "--quiet"], &s3);
    assert_ne!(code, 0);
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    drop(copy);
    let again = restore(&s3, &restored, "db1", &["--force", "--projection", "kv"]);
    assert_eq!(again["position"].as_u64(), Some(corpus.last), "--force replaces the contents: {again}");
    assert!(!restored.join("db/lenses.redb").exists(), "nothing of the old contents is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_by_time_and_by_position() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let writer = start(&dir.path().join("writer"), &writer_env(&s3, "pitr"));
    let first = corpus::load(&c, &writer, 3, 200, 20, Some(7)).await;
    wait_shipped(&c, &writer, first.last).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The second burst: other subjects, one batch per request.
    let mut last = first.last;
    for b in 0..3 {
        let items: Vec<Value> =
            (0..200).map(|i| common::assertion(&format!("later:{b}:{i}"), "dose", json!(format!("x{i}")), "agent-late")).collect();
        let (st, _, r) = common::post_json(&c, &writer.url("/v1/assertions/batch"), &json!({"assertions": items})).await;
        assert_eq!(st, 200, "{r}");
        last = r["results"][199]["position"].as_u64().expect("position");
    }
    wait_shipped(&c, &writer, last).await;

    // By time: exactly the first burst.
    let by_time = dir.path().join("by-time");
    let s = restore(&s3, &by_time, "pitr", &["--until-time", &between]);
    assert_eq!(s["position"].as_u64(), Some(first.last), "{s}");
    assert_eq!(positions(&by_time), (1..=first.last).collect::<Vec<_>>());
    verify_projections(&by_time);
    let server = common::Server::start(&by_time, &[]);
    let (st, _, v) = common::get_json(&c, &server.url("/v1/assertions?subject=later:0:1")).await;
    assert_eq!((st, v["items"].as_array().map(Vec::len)), (200, Some(0)), "second burst absent: {v}");
    let (id, _) = &first.ids[first.ids.len() - 1];
    let (st, _, _) = common::get_json(&c, &server.url(&format!("/v1/assertions/{id}"))).await;
    assert_eq!(st, 200, "the first burst's last assertion is present");
    drop(server);

    // By position at a batch boundary: exactly that prefix.
    let by_pos = dir.path().join("by-position");
    let s = restore(&s3, &by_pos, "pitr", &["--until-position", &(first.last + 200).to_string()]);
    assert_eq!((s["position"].as_u64(), &s["note"]), (Some(first.last + 200), &Value::Null), "{s}");
    assert_eq!(positions(&by_pos).last(), Some(&(first.last + 200)));
    verify_projections(&by_pos);

    // Inside a batch: batches are atomic, so the state before it, said so.
    let inside = dir.path().join("inside");
    let s = restore(&s3, &inside, "pitr", &["--until-position", &(first.last + 250).to_string()]);
    assert_eq!(s["position"].as_u64(), Some(first.last + 200), "{s}");
    assert!(s["note"].as_str().unwrap_or("").contains("atomically"), "{s}");

    // Beyond the archive, or before its first event: a clear refusal.
    let url = s3.url("pitr");
    let (code, _, err) = cli(&dir.path().join("x"), &["restore", "--from", &url, "--until-position", &(last + 1).to_string()], &s3);
    assert!(code != 0 && err.contains("not in the archive"), "{err}");
    let (code, _, err) = cli(&dir.path().join("y"), &["restore", "--from", &url, "--until-time", "2001-01-01T00:00:00Z"], &s3);
    assert!(code != 0 && err.contains("first event was recorded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_missing_segments_are_named() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let writer = start(&dir.path().join("writer"), &writer_env(&s3, "bad"));
    let corpus = corpus::load(&c, &writer, 4, 300, 20, None).await;
    wait_shipped(&c, &writer, corpus.last).await;
    drop(writer);
    let segments = s3.keys("bad/segments/");
    assert!(segments.len() >= 3, "{segments:?}");
    let url = s3.url("bad");

    // One flipped byte in the middle of a segment.
    let victim = &segments[1];
    let mut bytes = s3.get_object(victim);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    s3.put_object(victim, &bytes);
    let (code, out, err) = cli(dir.path(), &["backup", "verify", "--from", &url], &s3);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(victim.trim_start_matches("bad/")), "verify names {victim}: {err}");
    let target = dir.path().join("r1");
    let (code, _, err) = cli(&target, &["restore", "--from", &url, "--quiet"], &s3);
    assert_ne!(code, 0);
    assert!(err.contains(victim.trim_start_matches("bad/")), "restore names {victim}: {err}");

    // A missing segment.
    let gone = &segments[2];
    s3.delete_object(gone);
    let (code, _, err) = cli(dir.path(), &["backup", "verify", "--from", &url], &s3);
    assert_eq!(code, 1);
    assert!(err.contains(gone.trim_start_matches("bad/")) && err.contains("missing"), "{err}");

    // A missing manifest entry is a gap in the log.
    let manifest = s3.keys("bad/manifest/");
    s3.delete_object(&manifest[0]);
    let (code, _, err) = cli(dir.path(), &["backup", "verify", "--from", &url], &s3);
    assert_eq!(code, 1);
    assert!(err.contains("missing or overlaps"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_store_loses_nothing() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let mut writer = start(&dir.path().join("writer"), &writer_env(&s3, "outage"));
    let first = corpus::load(&c, &writer, 1, 200, 10, None).await;
    wait_shipped(&c, &writer, first.last).await;
    // kill -9 and restart: shipping resumes after what is already there.
    let shipped_before = s3.keys("outage/manifest/").len();
    writer.kill9();
    writer.restart();
    let (st, _, r) = common::post_json(&c, &writer.url("/v1/assertions"), &common::assertion("after", "restart", json!("1"), "a")).await;
    assert_eq!(st, 201, "{r}");
    wait_shipped(&c, &writer, r["position"].as_u64().expect("position")).await;
    let (segments, manifest) = (s3.keys("outage/segments/"), s3.keys("outage/manifest/"));
    assert_eq!(segments.len(), manifest.len(), "no segment uploaded twice or left half-shipped: {segments:?} {manifest:?}");
    let metrics = c.get(writer.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let uploads = metric(&metrics, "stemedb_wal_shipped_segments_total");
    assert_eq!(uploads as usize, manifest.len() - shipped_before, "after a restart only new segments are uploaded");

    s3.pause();
    // Writes keep being acknowledged while the store is down...
    let mut last = first.last;
    for b in 0..5 {
        let items: Vec<Value> =
            (0..100).map(|i| common::assertion(&format!("o:{b}:{i}"), "dose", json!(format!("{i}")), "agent-o")).collect();
        let (st, _, r) = common::post_json(&c, &writer.url("/v1/assertions/batch"), &json!({"assertions": items})).await;
        assert_eq!(st, 200, "writes do not depend on the archive: {r}");
        last = r["results"][99]["position"].as_u64().expect("position");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ...and readiness reports the growing shipping lag.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ready(&c, &writer).await;
        if r["shipping"]["state"] == "retrying" && r["shipping"]["lag_seconds"].as_f64().unwrap_or(0.0) > 0.5 {
            assert!(r["shipping"]["last_error"].is_string(), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "shipping never reported the outage: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.resume();

    let r = wait_shipped(&c, &writer, last).await;
    assert!(r["shipping"]["shipped_position"].as_u64() >= Some(last), "{r}");
    let metrics = c.get(writer.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metric(&metrics, "stemedb_wal_ship_errors_total") >= 1.0, "failed attempts are counted");
    let restored = dir.path().join("restored");
    let s = restore(&s3, &restored, "outage", &["--projection", "kv"]);
    assert!(s["position"].as_u64() >= Some(last), "{s}");
    let got = positions(&restored);
    assert_eq!(got[..last as usize], (1..=last).collect::<Vec<_>>()[..], "every acknowledged write is in the archive");
}

/// Fetches every lens for `pairs` pairs of the corpus at `min_position`.
async fn lens_answers(c: &reqwest::Client, server: &common::Server, corpus: &Corpus, pairs: usize, at: u64) -> corpus::Snapshot {
    let mp = at.to_string();
    let mut paths = Vec::new();
    for n in 0..pairs {
        let subject = format!("drug:{}", n % corpus.subjects);
        let predicate = corpus::PREDICATES[n % 3];
        for lens in corpus::LENSES {
            let q = [("subject", subject.as_str()), ("predicate", predicate), ("min_position", &mp), ("wait_ms", "10000")];
            paths.push(corpus::query(&format!("/v1/lenses/{lens}"), &q));
        }
    }
    let mut snap = corpus::Snapshot::new();
    corpus::fetch_all(c, server, &paths, &mut snap).await;
    snap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_serves_the_writers_answers_and_refuses_writes() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let writer = start(&dir.path().join("writer"), &writer_env(&s3, "follow"));
    let mut follower = start(&dir.path().join("follower"), &follower_env(&s3, "follow"));

    let corpus = corpus::load(&c, &writer, 4, 300, 30, Some(8)).await;
    let on_writer = lens_answers(&c, &writer, &corpus, 30, corpus.last).await;
    let on_follower = lens_answers(&c, &follower, &corpus, 30, corpus.last).await;
    corpus::assert_same(&on_writer, &on_follower, "writer vs. follower");

    let (st, _, r) = common::get_json(&c, &follower.url("/v1/ready")).await;
    assert_eq!((st, &r["role"]), (200, &json!("follower")), "{r}");
    assert!(r["follow"]["position"].as_u64() >= Some(corpus.last), "{r}");
    let (st, ct, p) = common::post_json(&c, &follower.url("/v1/assertions"), &common::assertion("s", "p", json!("v"), "a")).await;
    assert_eq!((st, ct.as_str(), &p["type"]), (405, "application/problem+json", &json!("urn:stemedb:problem:read-only-replica")), "{p}");
    assert!(p["detail"].as_str().unwrap_or("").contains(&s3.url("follow")), "{p}");

    // kill -9, more writes, restart: the follower resumes where it was.
    follower.kill9();
    let items: Vec<Value> = (0..100).map(|i| common::assertion(&format!("more:{i}"), "dose", json!("m"), "agent-m")).collect();
    let (st, _, r) = common::post_json(&c, &writer.url("/v1/assertions/batch"), &json!({"assertions": items})).await;
    assert_eq!(st, 200, "{r}");
    let head = r["results"][99]["position"].as_u64().expect("position");
    follower.restart();
    let q = format!("/v1/assertions?limit=1&min_position={head}&wait_ms=10000");
    let (st, _, v) = common::get_json(&c, &follower.url(&q)).await;
    assert_eq!(st, 200, "follower caught up after a restart: {v}\n{}", follower.log());
    let on_follower = lens_answers(&c, &follower, &corpus, 30, head).await;
    let on_writer = lens_answers(&c, &writer, &corpus, 30, head).await;
    corpus::assert_same(&on_writer, &on_follower, "writer vs. restarted follower");

    // A writer refuses a follower's directory.
    follower.terminate();
    let (code, _, err) = cli(&dir.path().join("follower"), &["serve", "--bind", "127.0.0.1:0"], &s3);
    assert_ne!(code, 0);
    assert!(err.contains("follower's data directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_and_a_takeover_fences_the_first() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let mut first = start(&dir.path().join("first"), &writer_env(&s3, "one"));
    let corpus = corpus::load(&c, &first, 2, 100, 10, None).await;
    wait_shipped(&c, &first, corpus.last).await;

    // Another data directory shipping to the same prefix does not start.
    let mut env = writer_env(&s3, "one");
    env.push(("STEMEDB_BIND_ADDR", "127.0.0.1:0".into()));
    let (code, _, err) = common::run_cli_env(&dir.path().join("second"), &["serve"], &s3_env_plus(&s3, &env));
    assert_ne!(code, 0);
    assert!(err.contains("owned by another writer"), "{err}");

    // Disaster drill: the first writer is cut off (still running, as in a
    // network partition); a restore of the archive takes the prefix over.
    let restored = dir.path().join("restored");
    restore(&s3, &restored, "one", &[]);
    let url = s3.url("one");
    let (code, out, err) = cli(&restored, &["backup", "takeover", "--from", &url], &s3);
    assert_eq!(code, 0, "{out}{err}");
    let t: Value = serde_json::from_str(&out).expect("takeover JSON");
    assert_eq!(t["writer"]["generation"], 2, "{t}");
    let second = start(&restored, &writer_env(&s3, "one"));
    let (st, _, r) = common::post_json(&c, &second.url("/v1/assertions"), &common::assertion("after", "takeover", json!("1"), "a")).await;
    assert_eq!(st, 201, "{r}");
    let pos = r["position"].as_u64().expect("position");
    wait_shipped(&c, &second, pos).await;

    // The old writer writes again: its shipping is fenced, loudly, and the
    // new writer's history stays the archive's.
    let (st, _, r) = common::post_json(&c, &first.url("/v1/assertions"), &common::assertion("stale", "writer", json!("1"), "a")).await;
    assert_eq!(st, 201, "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ready(&c, &first).await;
        if r["shipping"]["state"] == "fenced" {
            assert!(r["shipping"]["last_error"].as_str().unwrap_or("").contains("taken over"), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "the old writer was not fenced: {r}\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _, r) = common::post_json(&c, &second.url("/v1/assertions"), &common::assertion("after", "fence", json!("2"), "a")).await;
    assert_eq!(st, 201, "{r}");
    let pos = r["position"].as_u64().expect("position");
    let r = wait_shipped(&c, &second, pos).await;
    assert_eq!(r["shipping"]["state"], "shipping", "{r}");
    let (code, out, err) = cli(dir.path(), &["backup", "verify", "--from", &url], &s3);
    assert_eq!(code, 0, "the archive stays sound: {out}{err}");

    // Restarted, the old writer refuses to start on the prefix at all.
    first.terminate();
    let (code, _, err) = common::run_cli_env(&dir.path().join("first"), &["serve"], &s3_env_plus(&s3, &env));
    assert_ne!(code, 0);
    assert!(err.contains("owned by another writer"), "{err}");
}

fn s3_env_plus(s3: &S3Server, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = s3.env();
    env.extend(extra.iter().cloned());
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_config_routes_writes_to_the_writer_and_reads_to_followers() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = common::client();
    let writer = start(&dir.path().join("writer"), &writer_env(&s3, "proxy"));
    let mut follower = start(&dir.path().join("follower"), &follower_env(&s3, "proxy"));
    // The second follower of the config is down: nginx must route around it.
    let down = common::free_addr().port();
    let listen = common::free_addr().port();
    let conf = common::nginx::config(&dir.path().join("nginx"), listen, writer.addr.port(), [follower.addr.port(), down]);
    let _nginx = common::nginx::Nginx::start(&conf, listen);
    let proxy = format!("http://127.0.0.1:{listen}");

    for _ in 0..4 {
        let (st, _, h) = common::get_json(&c, &format!("{proxy}/v1/health")).await;
        assert_eq!((st, &h["role"]), (200, &json!("follower")), "reads go to a follower: {h}");
    }
    let (st, _, r) = common::post_json(&c, &format!("{proxy}/v1/assertions"), &common::assertion("via", "proxy", json!("x"), "a")).await;
    assert_eq!(st, 201, "writes go to the writer: {r}");
    let (id, pos) = (r["id"].as_str().expect("id"), r["position"].as_u64().expect("position"));
    let (st, _, v) = common::get_json(&c, &format!("{proxy}/v1/assertions/{id}?min_position={pos}&wait_ms=10000")).await;
    assert_eq!(st, 200, "read-your-write through the proxy: {v}");
    let (st, _, _) = common::get_json(&c, &format!("{proxy}/v1/admin/projections")).await;
    assert_eq!(st, 404, "the admin API is not exposed through the proxy");

    follower.kill9();
    let (st, _, h) = common::get_json(&c, &format!("{proxy}/v1/health")).await;
    assert_eq!((st, &h["role"]), (200, &json!("writer")), "with every follower down the writer serves reads: {h}");
}
