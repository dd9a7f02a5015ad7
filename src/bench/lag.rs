//! `stemedb bench lag`: write → visible latency under a steady write rate.
//!
//! Writers post single assertions at a fixed total rate. For every write
//! the tool then reads the assertion back with `min_position` set to the
//! acknowledged position; the time from sending the write to receiving
//! that read is the write → visible latency a client experiences.
//!
//! With `--read-url` pointing at a follower, the reads go there instead, so
//! the same number measures replication: write → shipped → downloaded →
//! projected on the follower (the follower lag bound of the archive).

use std::time::{Duration, Instant};

use clap::Args;
use tokio::time::MissedTickBehavior;

use super::data::Generator;
use super::report;

/// Options of `bench lag`.
#[derive(Args, Debug, Clone)]
pub struct LagArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:18180")]
    pub url: String,
    /// Read the writes back from this server instead (a follower)
    /// [default: --url].
    #[arg(long)]
    pub read_url: Option<String>,
    /// Total writes per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Concurrent writers sharing the rate.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Runs the benchmark.
pub async fn run(args: LagArgs) -> anyhow::Result<i32> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.connections * 2).tcp_nodelay(true).build()?;
    let nonce = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0);
    let per_writer = Duration::from_secs_f64(args.connections as f64 / args.rate.max(1) as f64);
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.connections {
        let client = client.clone();
        let url = args.url.clone();
        let read_url = args.read_url.clone().unwrap_or_else(|| args.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut gen_ = Generator::new(w as u64, nonce ^ ((w as u64 + 1) << 40), 10_000);
            let mut visible = report::new_histogram();
            let mut acked = report::new_histogram();
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut reads = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(per_writer);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            while Instant::now() < deadline {
                tick.tick().await;
                let body = gen_.next_assertion();
                let t = Instant::now();
                let resp = client.post(format!("{url}/v1/assertions")).json(&body).send().await;
                let Ok(resp) = resp else {
                    errors += 1;
                    continue;
                };
                let Ok(v) = resp.json::<serde_json::Value>().await else {
                    errors += 1;
                    continue;
                };
                let _ = acked.record((t.elapsed().as_micros() as u64).max(1));
                let (Some(id), Some(pos)) = (v["id"].as_str(), v["position"].as_u64()) else {
                    errors += 1;
                    continue;
                };
                // The read-back runs beside the next writes, so a slow
                // reader (a follower seconds behind) does not slow the
                // write rate down.
                let (client, url) = (client.clone(), format!("{read_url}/v1/assertions/{id}?min_position={pos}&wait_ms=10000"));
                reads.spawn(async move {
                    match client.get(url).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            Some(t.elapsed())
                        }
                        _ => None,
                    }
                });
            }
            while let Some(r) = reads.join_next().await {
                match r {
                    Ok(Some(d)) => {
                        let _ = visible.record((d.as_micros() as u64).max(1));
                        ops += 1;
                    }
                    _ => errors += 1,
                }
            }
            (ops, errors, visible, acked)
        }));
    }
    let mut visible = report::new_histogram();
    let mut acked = report::new_histogram();
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        let (o, e, v, a) = t.await?;
        ops += o;
        errors += e;
        visible.add(&v)?;
        acked.add(&a)?;
    }
    let secs = started.elapsed().as_secs_f64();
    report::print(&format!("lag ack rate={}/s", args.rate), ops, ops, errors, secs, &acked);
    report::print(&format!("lag write->visible rate={}/s", args.rate), ops, ops, errors, secs, &visible);
    Ok(if errors > 0 { 1 } else { 0 })
}
