//! `stemedb bench search`: loads a dataset of realistic assertions (text,
//! numbers, entities, tiers, confidences, valid times), measures how fast
//! the `search` projection indexes while catching up, then runs searches at
//! a fixed concurrency (text, filters, sorts, mixes) and reports latency.
//!
//! Indexing throughput is measured by an online rebuild of `search` over
//! the loaded log (the projection replays from position 0 as fast as it
//! can); it needs the admin API (loopback, or `STEMEDB_ADMIN_ENABLED`).

use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::conn::Conn;
use super::data::{Generator, TIERS, WORDS};
use super::report;

/// Options of `bench search`.
#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:18180")]
    pub url: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// How long to search, e.g. `20s`.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Assertions to load first (0 to search what is already there).
    #[arg(long, default_value_t = 1_000_000)]
    pub assertions: u64,
    /// Distinct subjects of the dataset.
    #[arg(long, default_value_t = 100_000)]
    pub subjects: u64,
    /// Skip the indexing (rebuild) measurement.
    #[arg(long, default_value_t = false)]
    pub skip_indexing: bool,
    /// Client threads. One (the default) leaves the other core to the
    /// server when both share a 2-core machine.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Run seed (different seeds load different assertions).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const PREDICATES: &[&str] = &["max_daily_dose_mg", "half_life_hours", "interacts_with", "description", "discovered"];

/// Loads `args.assertions` generated assertions with 1,000-item batches
/// from 8 writers; returns the last position.
async fn load(client: &reqwest::Client, args: &SearchArgs) -> anyhow::Result<u64> {
    let started = Instant::now();
    let writers = 8u64;
    let per_writer = args.assertions.div_ceil(writers);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = client.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut g = Generator::new(args.seed * 1000 + w, nonce ^ w, args.subjects);
            let mut last = 0u64;
            let mut left = per_writer.min(args.assertions.saturating_sub(w * per_writer));
            while left > 0 {
                let n = left.min(1000);
                let items: Vec<Value> = (0..n).map(|_| g.next_assertion()).collect();
                left -= n;
                let resp = client.post(format!("{}/v1/assertions/batch", args.url)).json(&json!({"assertions": items})).send().await?;
                anyhow::ensure!(resp.status().is_success(), "batch load failed: {}", resp.status());
                let v: Value = resp.json().await?;
                last = last.max(v["results"].as_array().and_then(|r| r.last()).and_then(|r| r["position"].as_u64()).unwrap_or(0));
            }
            anyhow::Ok(last)
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    println!("loaded {} assertions in {secs:.1}s ({:.0}/s); last position {last}", args.assertions, args.assertions as f64 / secs);
    Ok(last)
}

/// Waits until a search covers `position`.
async fn wait_visible(client: &reqwest::Client, url: &str, position: u64) -> anyhow::Result<()> {
    loop {
        let r = client.get(format!("{url}/v1/search?limit=1&min_position={position}&wait_ms=10000")).send().await?;
        if r.status().is_success() {
            return Ok(());
        }
        if r.status().as_u16() != 503 {
            anyhow::bail!("search failed: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
    }
}

/// Rebuilds `search` online and reports the replay rate.
async fn indexing(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let r = client.post(format!("{url}/v1/admin/projections/rebuild")).json(&json!({"projections": ["search"]})).send().await?;
    anyhow::ensure!(r.status().as_u16() == 202, "cannot start a rebuild: {} {}", r.status(), r.text().await.unwrap_or_default());
    let job: Value = r.json().await?;
    let id = job["job"].as_str().unwrap_or_default().to_string();
    let started = Instant::now();
    let mut done = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v: Value = client.get(format!("{url}/v1/admin/projections/rebuild/{id}")).send().await?.json().await?;
        if let Some(d) = v["progress"]["search"]["position"].as_u64() {
            done = d;
        }
        match v["state"].as_str() {
            Some("running") => continue,
            Some("completed") => break,
            other => anyhow::bail!("rebuild ended {other:?}: {v}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("indexing (search rebuild from position 0): {done} events in {secs:.1}s = {:.0} events/s", done as f64 / secs);
    println!("{}", json!({"bench": "search-indexing", "events": done, "seconds": secs, "events_per_sec": done as f64 / secs}));
    Ok(())
}

/// One random search query string.
fn query(rng: &mut rand::rngs::SmallRng, subjects: u64) -> String {
    let word = |rng: &mut rand::rngs::SmallRng| WORDS[rng.gen_range(0..WORDS.len())];
    let mut q: Vec<(&str, String)> = Vec::new();
    match rng.gen_range(0..10) {
        // Text only, one or two words (AND).
        0..=2 => q.push(("q", word(rng).to_string())),
        3..=4 => q.push(("q", format!("{} {}", word(rng), word(rng)))),
        // Text and filters.
        5 => {
            q.push(("q", word(rng).to_string()));
            q.push(("tier", TIERS[rng.gen_range(0..TIERS.len())].to_string()));
            q.push(("min_confidence", "0.5".into()));
        }
        6 => {
            q.push(("q", format!("{} OR {}", word(rng), word(rng))));
            q.push(("sort", "confidence".into()));
        }
        // Filters only.
        7 => {
            q.push(("agent", format!("agent-{}", rng.gen_range(0..200))));
            q.push(("predicate", PREDICATES[rng.gen_range(0..PREDICATES.len())].to_string()));
        }
        8 => {
            let kinds = ["drug", "gene", "compound", "city", "company", "protein", "species", "material"];
            let s = rng.gen_range(0..subjects.max(1));
            q.push(("subject", format!("{}:{s}", kinds[(s % kinds.len() as u64) as usize])));
        }
        _ => {
            q.push(("tier", TIERS[rng.gen_range(0..TIERS.len())].to_string()));
            q.push(("valid_from", format!("2026-{:02}-01T00:00:00Z", rng.gen_range(1..12))));
            q.push(("valid_to", "2026-12-31T00:00:00Z".into()));
            q.push(("sort", "confidence".into()));
        }
    }
    serde_urlencoded::to_string(&q).unwrap_or_default()
}

/// What the tool reads of a search answer.
#[derive(serde::Deserialize)]
struct Page {
    hits: Vec<serde::de::IgnoredAny>,
}

/// Runs the benchmark.
pub async fn run(args: SearchArgs) -> anyhow::Result<i32> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections.max(8)).tcp_nodelay(true).build()?;
    if args.assertions > 0 {
        let last = load(&client, &args).await?;
        let t = Instant::now();
        wait_visible(&client, &args.url, last).await?;
        println!("search index caught up {:.1}s after the last write", t.elapsed().as_secs_f64());
    }
    if !args.skip_indexing {
        indexing(&client, &args.url).await?;
    }
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.connections {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(2000 + w as u64);
            let mut hist = report::new_histogram();
            let (mut ops, mut hits, mut errors) = (0u64, 0u64, 0u64);
            let mut conn = Conn::open(&args.url).await?;
            while Instant::now() < deadline {
                let path = format!("/v1/search?{}", query(&mut rng, args.subjects));
                let t = Instant::now();
                let ok = match conn.get(&path).await {
                    // Only the hits are counted: the client's parsing must
                    // not compete with the server for the cores.
                    Ok((status, body)) if status.is_success() => match serde_json::from_slice::<Page>(&body) {
                        Ok(page) => {
                            hits += page.hits.len() as u64;
                            true
                        }
                        Err(_) => false,
                    },
                    Ok(_) => false,
                    Err(_) => {
                        conn = Conn::open(&args.url).await?;
                        false
                    }
                };
                let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
                ops += 1;
                if !ok {
                    errors += 1;
                }
            }
            anyhow::Ok((ops, hits, errors, hist))
        }));
    }
    let mut hist = report::new_histogram();
    let (mut ops, mut hits, mut errors) = (0, 0, 0);
    for t in tasks {
        let (o, h2, e, h) = t.await??;
        ops += o;
        hits += h2;
        errors += e;
        hist.add(&h)?;
    }
    report::print(&format!("search c={}", args.connections), ops, hits, errors, started.elapsed().as_secs_f64(), &hist);
    Ok(if errors > 0 { 1 } else { 0 })
}
