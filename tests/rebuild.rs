//! Rebuilding projections, against the real binary: an offline rebuild
//! gives byte-for-byte the same answers on every endpoint; an online
//! rebuild under concurrent writes and reads fails no read and loses no
//! write; a `kill -9` in the middle of an offline or an online rebuild
//! leaves the old projections serving and the rebuild can run again; the
//! admin API's gating, `STEMEDB_AUTO_REBUILD` and the rebuild metrics.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

// The corpus and the byte-for-byte snapshots live in tests/common/corpus.rs
// (the archive tests compare a writer with its restore the same way).
use common::corpus::{LENSES, PREDICATES, assert_same, load, raw, snapshot};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn db_dir(data: &Path) -> PathBuf {
    data.join("db")
}

/// Files in the projection directory that a rebuild or verification leaves
/// behind while it runs (`*.shadow`, `*.verify`, `*.old`, and the sort runs
/// of bulk loads, `*.sort`).
fn leftovers(data: &Path) -> Vec<String> {
    std::fs::read_dir(db_dir(data))
        .expect("read the db dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".shadow") || n.ends_with(".verify") || n.ends_with(".old") || n.ends_with(".sort"))
        .collect()
}

fn shadows(data: &Path) -> Vec<String> {
    leftovers(data).into_iter().filter(|n| n.ends_with(".shadow")).collect()
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).ino()
}

/// Runs the CLI and expects exit 0.
fn cli_ok(data: &Path, args: &[&str]) -> String {
    let (code, out, err) = common::run_cli(data, args);
    assert_eq!(code, 0, "stemedb {}: exit {code}\nstdout: {out}\nstderr: {err}", args.join(" "));
    out
}

/// Starts an online rebuild; returns the job id.
async fn start_rebuild(c: &reqwest::Client, server: &common::Server, projections: &[&str]) -> String {
    let (st, _, v) = common::post_json(c, &server.url("/v1/admin/projections/rebuild"), &json!({"projections": projections})).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["projections"], json!(projections), "{v}");
    v["job"].as_str().expect("job id").to_string()
}

/// Polls a job until it is no longer running; returns its final state.
async fn wait_job(c: &reqwest::Client, server: &common::Server, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (st, _, j) = common::get_json(c, &server.url(&format!("/v1/admin/projections/rebuild/{job}"))).await;
        assert_eq!(st, 200, "{j}");
        if j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {job} still running after 120 s: {j}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn assert_problem(st: u16, ct: &str, v: &Value, status: u16, what: &str) {
    assert_eq!(st, status, "{what}: {v}");
    assert_eq!(ct, "application/problem+json", "{what}");
    assert_eq!(v["status"], status, "{what}: {v}");
}

/// A metric's value (the first line starting with `series`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.split_whitespace().last()).and_then(|n| n.parse().ok())
}

// ---------------------------------------------------------------------------
// 1. Offline rebuild
// ---------------------------------------------------------------------------

/// A stopped server's projections rebuilt offline (all, `kv` alone,
/// `lenses` alone) answer every endpoint with exactly the same bytes; the
/// offline commands refuse while a server holds the directory.
#[tokio::test]
async fn offline_rebuild_answers_byte_for_byte_the_same() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = common::Server::start(&data, &[]);
    let c = common::client();
    let corpus = load(&c, &server, 4, 1000, 60, Some(23)).await;
    assert!(corpus.retracted.len() > 100 && corpus.superseding.len() > 100, "{} {}", corpus.retracted.len(), corpus.superseding.len());
    let before = snapshot(&c, &server, &corpus, 9, 100).await;
    assert!(before.len() > 300, "{} answers", before.len());

    // A running server holds the directory: offline commands refuse.
    for cmd in ["rebuild-projections", "verify-projections"] {
        let (code, out, err) = common::run_cli(&data, &["admin", cmd]);
        assert_ne!(code, 0, "{cmd} while the server runs: {out}");
        assert!(err.contains("running server") && err.contains("lock"), "{cmd}: the message names the running server and the lock: {err}");
    }
    // Nothing was touched.
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));
    assert_same(&before, &snapshot(&c, &server, &corpus, 9, 100).await, "after the refused rebuild");

    assert!(server.terminate().success(), "clean exit; log:\n{}", server.log());
    let (kv, lenses) = (db_dir(&data).join("kv.redb"), db_dir(&data).join("lenses.redb"));
    let (kv0, lenses0) = (inode(&kv), inode(&lenses));

    // The stores' own lock is honoured too: a server keeps it until its
    // stores are closed, after the log's lock is gone (a slow shutdown).
    {
        let held = std::fs::File::create(db_dir(&data).join("LOCK")).expect("db lock file");
        held.try_lock().expect("take the stores' lock as a stopping server would hold it");
        let (code, out, err) = common::run_cli(&data, &["admin", "rebuild-projections"]);
        assert_ne!(code, 0, "rebuild while the stores are held: {out}");
        assert!(err.contains("running server") && err.contains("LOCK"), "the refusal names the running server and the lock: {err}");
        assert_eq!((inode(&kv), inode(&lenses)), (kv0, lenses0), "the refused rebuild replaced nothing");
    }

    // All projections.
    let out = cli_ok(&data, &["admin", "rebuild-projections"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert!(lines.iter().any(|l| l["projection"] == "kv" && l["events"] == corpus.last), "{out}");
    assert!(lines.iter().any(|l| l["projection"] == "lenses" && l["events"] == corpus.last), "{out}");
    assert!(inode(&kv) != kv0 && inode(&lenses) != lenses0, "both stores were replaced");
    let out = cli_ok(&data, &["admin", "verify-projections"]);
    for name in ["kv", "lenses"] {
        let line: Value =
            out.lines().map(|l| serde_json::from_str::<Value>(l).expect("JSON")).find(|l| l["projection"] == name).expect(name);
        assert_eq!(line["equal"], true, "{line}");
        assert_eq!(line["position"], corpus.last, "{line}");
        assert_eq!(line["live_digest"], line["replayed_digest"], "{line}");
    }
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));

    // One projection at a time: only its store is replaced.
    let (kv1, lenses1) = (inode(&kv), inode(&lenses));
    cli_ok(&data, &["admin", "rebuild-projections", "--projection", "kv"]);
    assert!(inode(&kv) != kv1 && inode(&lenses) == lenses1, "--projection kv replaces kv only");
    cli_ok(&data, &["admin", "verify-projections", "--projection", "kv"]);
    let kv2 = inode(&kv);
    cli_ok(&data, &["admin", "rebuild-projections", "--projection", "lenses"]);
    assert!(inode(&kv) == kv2 && inode(&lenses) != lenses1, "--projection lenses replaces lenses only");
    cli_ok(&data, &["admin", "verify-projections", "--projection", "lenses"]);
    // A bulk load with a tiny buffer spills many sorted runs and merges
    // them, and retractions and supersessions are joined to their targets
    // across runs; the result must still equal the worker's (verification
    // replays through `apply`, not the bulk load), and no run is left.
    let (kv3, lenses3) = (inode(&kv), inode(&lenses));
    let (code, out, err) = common::run_cli_env(
        &data,
        &["admin", "rebuild-projections", "--projection", "kv,lenses"],
        &[("STEMEDB_REBUILD_BUFFER_MB", "1".to_string())],
    );
    assert_eq!(code, 0, "chunked rebuild: {out} {err}");
    assert!(inode(&kv) != kv3 && inode(&lenses) != lenses3, "--projection kv,lenses replaces both");
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));
    let out = cli_ok(&data, &["admin", "verify-projections"]);
    for l in out.lines().map(|l| serde_json::from_str::<Value>(l).expect("JSON")) {
        assert_eq!(l["equal"], true, "chunked bulk load differs from apply: {l}");
    }
    let (code, _, err) = common::run_cli(&data, &["admin", "rebuild-projections", "--projection", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");

    server.restart();
    let c = common::client(); // pooled connections died with the old process
    let after = snapshot(&c, &server, &corpus, 9, 100).await;
    assert_same(&before, &after, "after the offline rebuilds");
    // The running server agrees with a replay too.
    let out = cli_ok(&data, &["admin", "verify-projections", "--url", &server.url("")]);
    assert_eq!(serde_json::from_str::<Value>(&out).expect("JSON")["ok"], true, "{out}");
}

// ---------------------------------------------------------------------------
// 2. Online rebuild under load
// ---------------------------------------------------------------------------

/// Shared state of the writers and readers.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// Acknowledged writes: id, position, subject.
    acked: Mutex<Vec<(String, u64, String)>>,
    /// Every failed request, described.
    failures: Mutex<Vec<String>>,
    reads: AtomicU64,
}

impl Load {
    fn fail(&self, what: String) {
        if let Ok(mut f) = self.failures.lock() {
            f.push(what);
        }
    }

    fn latest(&self) -> Option<(String, u64, String)> {
        self.acked.lock().ok().and_then(|a| a.last().cloned())
    }
}

/// Keeps writing until stopped: writer 0 posts single assertions, writer 1
/// batches of 10.
async fn writer(c: reqwest::Client, base: String, w: usize, load: Arc<Load>) {
    let mut n = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        n += 1;
        let subject = format!("live:{}", n % 40);
        let agent = format!("writer-{w}");
        if w == 0 {
            let body = common::assertion(&subject, "p", json!(format!("w{w}-{n}")), &agent);
            match c.post(format!("{base}/v1/assertions")).json(&body).send().await {
                Ok(r) if r.status().as_u16() == 201 => {
                    let v: Value = r.json().await.expect("JSON");
                    let (id, pos) = (v["id"].as_str().expect("id").to_string(), v["position"].as_u64().expect("position"));
                    load.acked.lock().expect("lock").push((id, pos, subject));
                }
                Ok(r) => load.fail(format!("POST /v1/assertions: {} {}", r.status(), r.text().await.unwrap_or_default())),
                Err(e) => load.fail(format!("POST /v1/assertions: {e}")),
            }
        } else {
            let items: Vec<Value> = (0..10).map(|i| common::assertion(&subject, "p", json!(format!("w{w}-{n}-{i}")), &agent)).collect();
            match c.post(format!("{base}/v1/assertions/batch")).json(&json!({"assertions": items})).send().await {
                Ok(r) if r.status().as_u16() == 200 => {
                    let v: Value = r.json().await.expect("JSON");
                    let mut acked = load.acked.lock().expect("lock");
                    for res in v["results"].as_array().expect("results") {
                        acked.push((
                            res["id"].as_str().expect("id").to_string(),
                            res["position"].as_u64().expect("position"),
                            subject.clone(),
                        ));
                    }
                }
                Ok(r) => load.fail(format!("POST /v1/assertions/batch: {} {}", r.status(), r.text().await.unwrap_or_default())),
                Err(e) => load.fail(format!("POST /v1/assertions/batch: {e}")),
            }
        }
    }
}

/// What a reader requires of a 200 answer.
type Check = Box<dyn Fn(&Value) -> bool + Send>;

fn has_items(v: &Value) -> bool {
    v.as_array().is_some_and(|a| !a.is_empty())
}

/// Keeps reading until stopped: lenses and history on preloaded pairs,
/// preloaded assertions by id, and the latest acknowledged write by id and
/// through a lens, with `min_position` (read-your-writes across the swap).
async fn reader(c: reqwest::Client, base: String, r: u64, ids: Arc<Vec<String>>, subjects: usize, load: Arc<Load>) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(r);
    let mut i = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let subject = format!("drug:{}", rng.gen_range(0..subjects));
        let predicate = PREDICATES[rng.gen_range(0..3)];
        let pq = format!("subject={subject}&predicate={predicate}");
        // Each read names what a complete projection must answer: an empty
        // or partial store would fail the check even with a 200.
        let (path, check): (String, Check) = match i % 5 {
            0 => (format!("/v1/lenses/{}?{pq}", LENSES[rng.gen_range(0..LENSES.len())]), Box::new(|v| has_items(&v["claims"]))),
            1 => {
                let id = ids[rng.gen_range(0..ids.len())].clone();
                (format!("/v1/assertions/{id}"), Box::new(move |v| v["id"] == id.as_str()))
            }
            2 => (format!("/v1/history?{pq}"), Box::new(|v| has_items(&v["events"]))),
            3 => match load.latest() {
                Some((id, pos, _)) => {
                    (format!("/v1/assertions/{id}?min_position={pos}&wait_ms=10000"), Box::new(move |v| v["id"] == id.as_str()))
                }
                None => continue,
            },
            _ => match load.latest() {
                // (A newer write of the same agent may have replaced it in the answer.)
                Some((_, pos, s)) => (
                    format!("/v1/lenses/consensus?subject={s}&predicate=p&min_position={pos}&wait_ms=10000"),
                    Box::new(move |v| has_items(&v["claims"]) && v["position"].as_u64() >= Some(pos)),
                ),
                None => continue,
            },
        };
        match c.get(format!("{base}{path}")).send().await {
            Ok(resp) if resp.status().is_success() => {
                let body = resp.bytes().await.unwrap_or_default();
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if !check(&v) {
                    load.fail(format!("GET {path}: 200 but incomplete: {v}"));
                }
            }
            Ok(resp) => load.fail(format!("GET {path}: {} {}", resp.status(), resp.text().await.unwrap_or_default())),
            Err(e) => load.fail(format!("GET {path}: {e}")),
        }
        load.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// An online rebuild of kv and lenses while writers and readers keep
/// going: no read fails, no acknowledged write is lost, verification
/// passes, the metrics count the replay. Then the admin API's errors (409,
/// 404, 422) and cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_rebuild_under_writes_and_reads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = common::Server::start(&data, &[]);
    let c = common::client();
    let corpus = load(&c, &server, 3, 8000, 300, None).await;
    let ids: Arc<Vec<String>> = Arc::new(corpus.ids.iter().map(|(id, _)| id.clone()).collect());
    // Everything preloaded is visible (in kv and lenses) before the readers start.
    let mp = corpus.last.to_string();
    for path in
        [format!("/v1/subjects/drug:0?min_position={mp}&wait_ms=10000"), format!("/v1/assertions?limit=1&min_position={mp}&wait_ms=10000")]
    {
        let (st, _, v) = common::get_json(&c, &server.url(&path)).await;
        assert_eq!(st, 200, "{path}: {v}");
    }

    let load = Arc::new(Load::default());
    let base = server.url("");
    let mut tasks = Vec::new();
    for w in 0..2 {
        tasks.push(tokio::spawn(writer(common::client(), base.clone(), w, load.clone())));
    }
    for r in 0..3 {
        tasks.push(tokio::spawn(reader(common::client(), base.clone(), r, ids.clone(), corpus.subjects, load.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let job = start_rebuild(&c, &server, &["kv", "lenses"]).await;
    // A second rebuild of a projection being rebuilt is refused.
    for p in [&["kv"][..], &["lenses"][..], &["all"][..]] {
        let (st, ct, v) = common::post_json(&c, &server.url("/v1/admin/projections/rebuild"), &json!({"projections": p})).await;
        assert_problem(st, &ct, &v, 409, &format!("second rebuild of {p:?}"));
        assert_eq!(v["job"], job, "{v}");
    }
    // While it runs, the status shows it with its progress.
    let mut seen_rebuilding = 0;
    let done = loop {
        let (st, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
        assert_eq!(st, 200, "{status}");
        let (_, _, j) = common::get_json(&c, &server.url(&format!("/v1/admin/projections/rebuild/{job}"))).await;
        for p in status["projections"].as_array().expect("projections") {
            assert!(p["position"].as_u64().is_some() && p["head"].as_u64().is_some() && p["lag"].as_u64().is_some(), "{p}");
            if p["state"] == "rebuilding" {
                seen_rebuilding += 1;
                let r = &p["rebuild"];
                assert_eq!(r["job"], job, "{p}");
                for k in ["position", "head", "progress", "events_per_sec", "started_at", "swapped"] {
                    assert!(r.get(k).is_some_and(|v| !v.is_null()), "rebuild progress lacks {k}: {p}");
                }
                assert!(r.get("eta_seconds").is_some(), "{p}");
                let progress = r["progress"].as_f64().expect("progress");
                assert!((0.0..=1.0).contains(&progress), "{p}");
                assert!(r["position"].as_u64() <= r["head"].as_u64(), "{p}");
            } else {
                assert_eq!(p["state"], "live", "{status}");
            }
        }
        if j["state"] != "running" {
            break j;
        }
        let progress = j["progress"].as_object().expect("progress");
        assert_eq!(progress.len(), 2, "{j}");
        for (name, p) in progress {
            // Nothing replayed yet (kv first, then lenses): 0 %, not 100 %.
            if p["swapped"] == false && p["position"] == 0 {
                assert_eq!(p["progress"], 0.0, "{name}: {j}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["state"], "completed", "{done}");
    for p in ["kv", "lenses"] {
        assert_eq!(done["progress"][p]["swapped"], true, "{done}");
    }
    eprintln!("online rebuild: status showed 'rebuilding' {seen_rebuilding} times");
    // Writes keep flowing into the installed stores for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("task");
    }
    let failures = load.failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "{} requests failed, e.g.:\n{}", failures.len(), failures[..failures.len().min(5)].join("\n"));
    let acked = load.acked.lock().expect("lock").clone();
    let reads = load.reads.load(Ordering::Relaxed);
    eprintln!("online rebuild: {} acknowledged writes, {reads} reads", acked.len());
    assert!(!acked.is_empty() && reads > 0);

    // No lost write: every acknowledged id reads back at its position.
    let max = acked.iter().map(|a| a.1).max().expect("writes");
    let acked = Arc::new(acked);
    let mut checks = Vec::new();
    for part in 0..8 {
        let (c, base, acked) = (common::client(), base.clone(), acked.clone());
        checks.push(tokio::spawn(async move {
            for (id, pos, _) in acked.iter().skip(part).step_by(8) {
                let url = format!("{base}/v1/assertions/{id}?min_position={max}&wait_ms=10000");
                let (st, _, v) = common::get_json(&c, &url).await;
                assert_eq!(st, 200, "acknowledged write {id} at {pos}: {v}");
                assert_eq!((v["id"].as_str(), v["position"].as_u64()), (Some(id.as_str()), Some(*pos)), "{v}");
            }
        }));
    }
    for t in checks {
        t.await.expect("no lost write");
    }

    // Verification, through the CLI and the API.
    let out = cli_ok(&data, &["admin", "verify-projections", "--url", &base]);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["ok"], true, "{v}");
    let (st, _, v) = common::post_json(&c, &server.url("/v1/admin/projections/verify"), &json!({"projections": ["kv", "lenses"]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    for p in v["projections"].as_array().expect("projections") {
        assert_eq!(p["equal"], true, "{p}");
        assert!(p["position"].as_u64() >= Some(max), "{p}");
    }
    let out = cli_ok(&data, &["admin", "projections", "--url", &base]);
    let status: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(status["jobs"][0]["state"], "completed", "{status}");

    // Metrics.
    let text = c.get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let kv_events = metric(&text, "stemedb_projection_rebuild_events_total{projection=\"kv\"}");
    assert!(kv_events.is_some_and(|n| n >= corpus.last as f64), "{kv_events:?}\n{text}");
    let lens_events = metric(&text, "stemedb_projection_rebuild_events_total{projection=\"lenses\"}");
    assert!(lens_events.is_some_and(|n| n >= corpus.last as f64), "{lens_events:?}");
    for p in ["kv", "lenses"] {
        let series = format!("stemedb_projection_rebuild_in_progress{{projection=\"{p}\"}}");
        assert_eq!(metric(&text, &series), Some(0.0), "{series}\n{text}");
    }

    // Errors: unknown job, bad projection names, cancelling a finished job.
    for path in ["/v1/admin/projections/rebuild/nope", "/v1/admin/projections/rebuild/rebuild-999"] {
        let (st, ct, v) = common::get_json(&c, &server.url(path)).await;
        assert_problem(st, &ct, &v, 404, path);
        let r = c.delete(server.url(path)).send().await.expect("delete");
        assert_eq!(r.status().as_u16(), 404, "DELETE {path}");
    }
    for body in
        [json!({"projections": ["nope"]}), json!({"projections": ["kv", "search-index"]}), json!({"projections": [1]}), json!({"x": 1})]
    {
        let (st, ct, v) = common::post_json(&c, &server.url("/v1/admin/projections/rebuild"), &body).await;
        assert_problem(st, &ct, &v, 422, &body.to_string());
    }
    let r = c.delete(server.url(&format!("/v1/admin/projections/rebuild/{job}"))).send().await.expect("delete");
    assert_eq!(r.status().as_u16(), 409, "a finished job cannot be cancelled");

    // Cancel: the old store keeps serving and nothing is left behind.
    let probe = format!("/v1/assertions/{}", acked[acked.len() / 2].0);
    let probe_before = raw(&c, &server.url(&probe)).await;
    let cancelled = start_rebuild(&c, &server, &["kv"]).await;
    let r = c.delete(server.url(&format!("/v1/admin/projections/rebuild/{cancelled}"))).send().await.expect("delete");
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["state"], "cancelling", "{v}");
    let j = wait_job(&c, &server, &cancelled).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(j["progress"]["kv"]["swapped"], false, "{j}");
    assert_eq!(raw(&c, &server.url(&probe)).await, probe_before, "the old store still serves");
    let (_, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
    assert!(status["projections"].as_array().expect("list").iter().all(|p| p["state"] == "live"), "{status}");
    assert!(shadows(&data).is_empty(), "a cancelled rebuild leaves no shadow: {:?}", shadows(&data));
    let text = c.get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(metric(&text, "stemedb_projection_rebuild_in_progress{projection=\"kv\"}"), Some(0.0));

    // A later rebuild succeeds (through the CLI this time).
    let out = cli_ok(&data, &["admin", "rebuild-projections", "--projection", "kv", "--url", &base]);
    let j: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!((&j["state"], &j["projections"]), (&json!("completed"), &json!(["kv"])), "{j}");
    assert_eq!(raw(&c, &server.url(&probe)).await, probe_before);
    let (st, _, v) = common::post_json(&c, &server.url("/v1/admin/projections/verify"), &json!({"projections": ["kv"]})).await;
    assert_eq!((st, &v["ok"]), (200, &json!(true)), "{v}");
}

// ---------------------------------------------------------------------------
// 3. kill -9 in the middle of a rebuild
// ---------------------------------------------------------------------------

/// Waits until an offline rebuild has opened its shadow store (or exited),
/// then a short random while more.
fn wait_for_shadow(data: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shadows(data).is_empty() && child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "no shadow store appeared in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(50..400)));
}

/// A `kill -9` in the middle of an offline rebuild, then in the middle of
/// an online one: each time the old projections answer exactly as before,
/// the partial shadow is gone after the next start, and the rebuild then
/// runs to completion and verifies.
#[tokio::test]
async fn kill_9_during_offline_and_online_rebuilds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = common::Server::start(&data, &[]);
    let c = common::client();
    let corpus = load(&c, &server, 3, 10_000, 500, None).await;
    let before = snapshot(&c, &server, &corpus, 4, 3).await;
    assert!(server.terminate().success(), "clean exit; log:\n{}", server.log());

    // (a) Offline: kill -9 the rebuild while it replays.
    let mut child = Command::new(common::bin())
        .args(["admin", "rebuild-projections"])
        .env("STEMEDB_DATA_DIR", &data)
        // Small sort runs, so that some are on disk when it dies.
        .env("STEMEDB_REBUILD_BUFFER_MB", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the rebuild");
    wait_for_shadow(&data, &mut child);
    let running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    eprintln!("offline rebuild killed while running: {running} ({status}); left behind: {:?}", leftovers(&data));

    server.restart();
    let c = common::client();
    assert!(leftovers(&data).is_empty(), "start removes the partial shadow and its sort runs: {:?}", leftovers(&data));
    assert_same(&before, &snapshot(&c, &server, &corpus, 4, 3).await, "after a killed offline rebuild");
    assert!(server.terminate().success());

    // It can be run again, to completion.
    let out = cli_ok(&data, &["admin", "rebuild-projections"]);
    assert!(out.lines().any(|l| l.contains("\"projections\"")), "{out}");
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));
    cli_ok(&data, &["admin", "verify-projections"]);

    // (b) Online: kill -9 the server while it rebuilds.
    server.restart();
    let c = common::client();
    assert_same(&before, &snapshot(&c, &server, &corpus, 4, 3).await, "after the offline rebuild");
    let job = start_rebuild(&c, &server, &["kv", "lenses"]).await;
    let job_url = server.url(&format!("/v1/admin/projections/rebuild/{job}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while shadows(&data).is_empty() && common::get_json(&c, &job_url).await.2["state"] == "running" {
        assert!(Instant::now() < deadline, "no shadow store appeared in 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(rand::thread_rng().gen_range(50..400))).await;
    let (_, _, j) = common::get_json(&c, &job_url).await;
    server.kill9();
    eprintln!("online rebuild at the kill: {j}; left behind: {:?}", leftovers(&data));

    server.restart();
    let c = common::client();
    assert!(shadows(&data).is_empty(), "start removes the partial shadow: {:?}", leftovers(&data));
    assert_same(&before, &snapshot(&c, &server, &corpus, 4, 3).await, "after a server killed mid-rebuild");
    let (_, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
    assert_eq!(status["jobs"], json!([]), "jobs do not survive a restart: {status}");
    for p in status["projections"].as_array().expect("projections") {
        assert_eq!(p["state"], "live", "{status}");
        if p["name"] == "kv" || p["name"] == "lenses" {
            assert_eq!(p["position"], corpus.last, "{status}");
        }
    }

    // A new rebuild completes and verifies.
    let job = start_rebuild(&c, &server, &["kv", "lenses"]).await;
    let j = wait_job(&c, &server, &job).await;
    assert_eq!(j["state"], "completed", "{j}");
    let out = cli_ok(&data, &["admin", "verify-projections", "--url", &server.url("")]);
    assert_eq!(serde_json::from_str::<Value>(&out).expect("JSON")["ok"], true, "{out}");
    assert_same(&before, &snapshot(&c, &server, &corpus, 4, 3).await, "after the online rebuild");
    assert!(leftovers(&data).is_empty(), "{:?}", leftovers(&data));
}

// ---------------------------------------------------------------------------
// 4. Admin gating
// ---------------------------------------------------------------------------

/// A server process started by hand (the harness binds loopback only).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `stemedb serve` bound to `bind` and waits until `base` answers `/v1/health`.
async fn serve_bound(data: &Path, bind: &str, base: &str, env: &[(&str, &str)]) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).expect("log");
    let mut cmd = Command::new(common::bin());
    cmd.arg("serve")
        .env("STEMEDB_DATA_DIR", data)
        .env("STEMEDB_BIND_ADDR", bind)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc(cmd.spawn().expect("spawn stemedb serve"));
    let c = common::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = p.0.try_wait().expect("try_wait") {
            panic!("server exited with {st}: {}", std::fs::read_to_string(data.with_extension("log")).unwrap_or_default());
        }
        if c.get(format!("{base}/v1/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return p;
        }
        assert!(Instant::now() < deadline, "server not healthy in 60 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// On a non-loopback bind address the admin API answers 403 unless
/// `STEMEDB_ADMIN_ENABLED=true`.
#[tokio::test]
async fn admin_api_is_gated_off_loopback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let port = common::free_addr().port();
    let bind = format!("0.0.0.0:{port}");
    let base = format!("http://127.0.0.1:{port}");
    {
        let _server = serve_bound(&data, &bind, &base, &[]).await;
        let c = common::client();
        let (st, ct, v) = common::get_json(&c, &format!("{base}/v1/admin/projections")).await;
        assert_problem(st, &ct, &v, 403, "GET /v1/admin/projections on 0.0.0.0");
        let (st, ct, v) = common::post_json(&c, &format!("{base}/v1/admin/projections/rebuild"), &json!({"projections": ["kv"]})).await;
        assert_problem(st, &ct, &v, 403, "POST rebuild on 0.0.0.0");
        let (st, ct, v) = common::post_json(&c, &format!("{base}/v1/admin/projections/verify"), &json!({})).await;
        assert_problem(st, &ct, &v, 403, "POST verify on 0.0.0.0");
        let (st, ct, v) = common::get_json(&c, &format!("{base}/v1/admin/projections/rebuild/rebuild-1")).await;
        assert_problem(st, &ct, &v, 403, "GET job on 0.0.0.0");
        // The rest of the API is served.
        let (st, _, _) = common::get_json(&c, &format!("{base}/v1/ready")).await;
        assert_eq!(st, 200);
        // And the CLI reports the refusal.
        let (code, _, err) = common::run_cli(&data, &["admin", "rebuild-projections", "--url", &base]);
        assert_ne!(code, 0);
        assert!(err.contains("403"), "{err}");
    }
    let _server = serve_bound(&data, &bind, &base, &[("STEMEDB_ADMIN_ENABLED", "true")]).await;
    let c = common::client();
    let (st, _, v) = common::get_json(&c, &format!("{base}/v1/admin/projections")).await;
    assert_eq!(st, 200, "{v}");
    let names: Vec<&str> = v["projections"].as_array().expect("projections").iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(names.contains(&"kv") && names.contains(&"lenses"), "{v}");
}

// ---------------------------------------------------------------------------
// 5. Changed definitions with STEMEDB_AUTO_REBUILD
// ---------------------------------------------------------------------------

/// With changed lens definitions, offline verification fails (exit 1),
/// and `STEMEDB_AUTO_REBUILD=true` rebuilds the lenses projection online by
/// itself: it becomes live with the new weights, every event counted once.
#[tokio::test]
async fn auto_rebuild_applies_changed_definitions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (s, p) = ("drug:auto", "dose");
    let mut server = common::Server::start(&data, &[]);
    let c = common::client();
    let mut last = 0;
    for (i, value) in ["A", "A", "B"].iter().enumerate() {
        let mut b = common::assertion(s, p, json!(value), &format!("d{i}"));
        b["confidence"] = json!(0.5);
        b["source"] = json!({"uri": "https://example.org/src", "tier": "community"});
        let (st, _, v) = common::post_json(&c, &server.url("/v1/assertions"), &b).await;
        assert_eq!(st, 201, "{v}");
        last = v["position"].as_u64().expect("position");
    }
    // Other pairs, so the rebuild has something besides this one.
    let others = load(&c, &server, 1, 2000, 50, Some(50)).await;
    let lens_url = |server: &common::Server| server.url(&format!("/v1/lenses/consensus?subject={s}&predicate={p}&min_position={last}"));
    let (st, _, v) = common::get_json(&c, &lens_url(&server)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["claims"][0]["weight"], json!(0.4), "default community 0.4 × 0.5 × 2: {v}");
    let kv_probe = format!("/v1/history?subject=drug:1&predicate=dose&min_position={}", others.last);
    let kv_before = raw(&c, &server.url(&kv_probe)).await;
    assert!(server.terminate().success());

    let defs = tmp.path().join("defs");
    std::fs::create_dir_all(&defs).expect("mkdir");
    let toml = stemedb::lens::definitions::DEFAULT_LENSES_TOML.replace("community = 0.4", "community = 0.8");
    assert_ne!(toml, stemedb::lens::definitions::DEFAULT_LENSES_TOML);
    std::fs::write(defs.join("lenses.toml"), toml).expect("write lenses.toml");
    let defs_s = defs.to_string_lossy().into_owned();

    // The stored lenses no longer match a replay under the new definitions.
    let (code, out, err) = common::run_cli(&data, &["admin", "verify-projections", "--projection", "lenses", "--projections-dir", &defs_s]);
    assert_eq!(code, 1, "{out}\n{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(v["equal"], false, "{v}");
    assert!(v["differences"].as_array().is_some_and(|d| !d.is_empty()), "{v}");
    // Under the old ones they do.
    cli_ok(&data, &["admin", "verify-projections"]);

    let mut server = common::Server::start(&data, &[("STEMEDB_PROJECTIONS_DIR", &defs_s), ("STEMEDB_AUTO_REBUILD", "true")]);
    let c = common::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let (st, ct, v) = common::get_json(&c, &lens_url(&server)).await;
        if st == 200 {
            break v;
        }
        // Until the rebuild swaps in, the stale projection is refused, by name.
        assert_problem(st, &ct, &v, 503, "stale lenses");
        assert_eq!(v["projection"], "lenses", "{v}");
        assert!(Instant::now() < deadline, "the lenses projection did not come back in 60 s: {v}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let claims = v["claims"].as_array().expect("claims");
    let weight = |val: &str| claims.iter().find(|c| c["value"]["value"] == val).map(|c| c["weight"].as_f64().expect("weight"));
    assert!(weight("A").is_some_and(|w| (w - 0.8).abs() < 1e-9), "A with community = 0.8: {v}");
    assert!(weight("B").is_some_and(|w| (w - 0.4).abs() < 1e-9), "B with community = 0.8: {v}");
    assert_eq!(claims.iter().map(|c| c["agents"].as_u64().expect("agents")).sum::<u64>(), 3, "each event once: {v}");

    // The job rebuilt only the stale projection; kv answers as before.
    let (_, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
    let jobs = status["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{status}");
    assert_eq!(jobs[0]["projections"], json!(["lenses"]), "{status}");
    let job = jobs[0]["job"].as_str().expect("job").to_string();
    assert_eq!(wait_job(&c, &server, &job).await["state"], "completed");
    assert_eq!(raw(&c, &server.url(&kv_probe)).await, kv_before);
    let (_, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
    assert!(status["projections"].as_array().expect("list").iter().all(|p| p["state"] == "live"), "{status}");

    // The rebuilt store remembers its definitions: a restart serves it at once.
    assert!(server.terminate().success());
    server.restart();
    let c = common::client();
    let (st, _, v2) = common::get_json(&c, &lens_url(&server)).await;
    assert_eq!(st, 200, "{v2}");
    assert_eq!(v2["claims"], v["claims"]);
    let (_, _, status) = common::get_json(&c, &server.url("/v1/admin/projections")).await;
    assert_eq!(status["jobs"], json!([]), "no rebuild needed after the restart: {status}");
}
