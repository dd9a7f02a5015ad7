//! `stemedb bench query`: lens reads at high concurrency over a dataset it
//! first loads (a mix of contested and unanimous pairs).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::conn::Conn;
use super::report;

/// Options of `bench query`.
#[derive(Args, Debug, Clone)]
pub struct QueryArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:18180")]
    pub url: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to query, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Assertions to load first (0 to query what is already there).
    #[arg(long, default_value_t = 1_000_000)]
    pub assertions: u64,
    /// Assertions per pair (so pairs = assertions / this).
    #[arg(long, default_value_t = 10)]
    pub per_pair: u64,
    /// Pairs to query when the dataset is already loaded (`--assertions 0`).
    #[arg(long, default_value_t = 100_000)]
    pub pairs: u64,
    /// Client threads. One (the default) leaves the other core to the
    /// server when both share a 2-core machine, like `wrk -t1`.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Tag that makes subjects of this run distinct from earlier runs.
    #[arg(long, default_value = "q")]
    pub tag: String,
}

const TIERS: &[&str] = &["regulatory", "clinical", "observational", "expert", "community", "anecdotal"];
const LENSES: &[&str] = &["recency", "confidence", "authority", "consensus", "skeptic", "layered"];

fn pair_subject(tag: &str, i: u64) -> String {
    format!("bench:{tag}:entity-{i}")
}

/// Assertion `k` of pair `i`: even pairs are unanimous (one value), odd
/// pairs contested (three values).
fn assertion(tag: &str, i: u64, k: u64, rng: &mut rand::rngs::SmallRng) -> Value {
    let value = if i.is_multiple_of(2) { 1000 } else { 1000 + (k % 3) as i64 };
    json!({
        "subject": pair_subject(tag, i),
        "predicate": "max_daily_dose_mg",
        "object": {"type": "integer", "value": value},
        "agent": format!("agent-{k}"),
        "confidence": (rng.gen_range(0.3..1.0f64) * 100.0).round() / 100.0,
        "source": {"uri": format!("https://example.org/{tag}/{i}/{k}"), "tier": TIERS[(k as usize) % TIERS.len()]},
    })
}

/// Loads the dataset with 1,000-assertion batches from 8 concurrent writers.
pub async fn load(client: &reqwest::Client, args: &QueryArgs) -> anyhow::Result<u64> {
    let pairs = (args.assertions / args.per_pair.max(1)).max(1);
    let started = Instant::now();
    let writers = 8u64;
    let mut tasks = Vec::new();
    let mut last = 0;
    for w in 0..writers {
        let client = client.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(w);
            let mut batch = Vec::with_capacity(1000);
            let mut last = 0u64;
            let mut i = w;
            while i < pairs {
                for k in 0..args.per_pair {
                    batch.push(assertion(&args.tag, i, k, &mut rng));
                }
                if batch.len() >= 1000 || i + writers >= pairs {
                    let body = json!({"assertions": std::mem::take(&mut batch)});
                    let resp = client.post(format!("{}/v1/assertions/batch", args.url)).json(&body).send().await?;
                    anyhow::ensure!(resp.status().is_success(), "batch load failed: {}", resp.status());
                    let v: Value = resp.json().await?;
                    last = last.max(v["results"].as_array().and_then(|r| r.last()).and_then(|r| r["position"].as_u64()).unwrap_or(0));
                }
                i += writers;
            }
            anyhow::Ok(last)
        }));
    }
    for t in tasks {
        last = last.max(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "loaded {} assertions in {pairs} pairs in {secs:.1}s ({:.0}/s); last position {last}",
        pairs * args.per_pair,
        (pairs * args.per_pair) as f64 / secs
    );
    Ok(last)
}

/// Runs the benchmark.
pub async fn run(args: QueryArgs) -> anyhow::Result<i32> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections.max(8)).tcp_nodelay(true).build()?;
    let pairs = if args.assertions == 0 { args.pairs.max(1) } else { (args.assertions / args.per_pair.max(1)).max(1) };
    if args.assertions > 0 {
        let last = load(&client, &args).await?;
        // Wait until the lenses projection has applied the whole load.
        let t = Instant::now();
        loop {
            let r = client
                .get(format!("{}/v1/lenses/consensus?subject=x&predicate=y&min_position={last}&wait_ms=10000", args.url))
                .send()
                .await?;
            if r.status().is_success() {
                break;
            }
        }
        println!("projections caught up {:.1}s after the last write", t.elapsed().as_secs_f64());
    }
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.connections {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(1000 + w as u64);
            let mut hist = report::new_histogram();
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut conn = Conn::open(&args.url).await?;
            let mut path = String::with_capacity(128);
            while Instant::now() < deadline {
                let i = rng.gen_range(0..pairs);
                let lens = LENSES[rng.gen_range(0..LENSES.len())];
                path.clear();
                let _ = write!(path, "/v1/lenses/{lens}?subject={}&predicate=max_daily_dose_mg", pair_subject(&args.tag, i));
                let t = Instant::now();
                let ok = match conn.get(&path).await {
                    Ok((status, _)) => status.is_success(),
                    Err(_) => {
                        // The connection is gone: count the error, reconnect.
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
            anyhow::Ok((ops, errors, hist))
        }));
    }
    let mut hist = report::new_histogram();
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        let (o, e, h) = t.await??;
        ops += o;
        errors += e;
        hist.add(&h)?;
    }
    report::print(
        &format!("query c={} pairs={pairs}", args.connections),
        ops,
        ops - errors,
        errors,
        started.elapsed().as_secs_f64(),
        &hist,
    );
    Ok(if errors > 0 { 1 } else { 0 })
}
