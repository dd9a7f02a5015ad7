//! `stemedb bench ingest`: concurrent writers against a live server.

use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use super::data::Generator;
use super::report;

/// Options of `bench ingest`.
#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:18180")]
    pub url: String,
    /// Concurrent connections (one writer each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Assertions per request: 1 posts to /v1/assertions, more to /v1/assertions/batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Distinct subjects to draw from.
    #[arg(long, default_value_t = 100_000)]
    pub subjects: u64,
}

struct WorkerResult {
    ops: u64,
    items: u64,
    errors: u64,
    hist: Histogram<u64>,
}

/// Runs the load and prints the report.
pub async fn run(args: IngestArgs) -> anyhow::Result<i32> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections).tcp_nodelay(true).build()?;
    let nonce = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0);
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.connections {
        let client = client.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut gen_ = Generator::new(w as u64, nonce ^ ((w as u64) << 48), args.subjects);
            let mut r = WorkerResult { ops: 0, items: 0, errors: 0, hist: report::new_histogram() };
            let (url, single) = if args.batch <= 1 {
                (format!("{}/v1/assertions", args.url), true)
            } else {
                (format!("{}/v1/assertions/batch", args.url), false)
            };
            while Instant::now() < deadline {
                let body = if single {
                    gen_.next_assertion()
                } else {
                    serde_json::json!({"assertions": (0..args.batch).map(|_| gen_.next_assertion()).collect::<Vec<_>>()})
                };
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                let t = Instant::now();
                let resp = client.post(&url).header("content-type", "application/json").body(bytes).send().await;
                let ok = match resp {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                let us = t.elapsed().as_micros() as u64;
                let _ = r.hist.record(us.max(1));
                r.ops += 1;
                if ok {
                    r.items += args.batch.max(1) as u64;
                } else {
                    r.errors += 1;
                }
            }
            r
        }));
    }
    let mut hist = report::new_histogram();
    let (mut ops, mut items, mut errors) = (0, 0, 0);
    for t in tasks {
        let r = t.await?;
        ops += r.ops;
        items += r.items;
        errors += r.errors;
        hist.add(&r.hist)?;
    }
    let secs = started.elapsed().as_secs_f64();
    report::print(&format!("ingest c={} batch={}", args.connections, args.batch), ops, items, errors, secs, &hist);
    Ok(if errors > 0 { 1 } else { 0 })
}
