//! `stemedb bench lag`: write → visible latency under a steady write rate.
//!
//! Writers post single assertions (or batches of `--batch`) at a fixed
//! total rate of assertions. For every write the tool then reads the
//! assertion back (the last of a batch) with `min_position` set to the
//! acknowledged position; the time from sending the write to receiving
//! that read is the write → visible latency a client experiences.
//!
//! With `--read-url` pointing at a follower, the reads go there instead, so
//! the same number measures replication: write → shipped → downloaded →
//! projected on the follower (the follower lag bound of the archive).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::time::MissedTickBehavior;

use super::conn::Conn;
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
    /// Total assertions written per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Assertions per request: 1 posts to `/v1/assertions`, more to
    /// `/v1/assertions/batch` (how a busy agent writes several claims at
    /// once; the HTTP and fsync costs are shared by the batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// Concurrent writers sharing the rate.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Read back one write in this many (1: every write). Every read-back
    /// is a request the server must also serve; sampling measures the
    /// same latency distribution with less load added by the tool.
    #[arg(long, default_value_t = 1)]
    pub read_every: u64,
    /// How long to run, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// One acknowledged write whose read-back is due.
struct Written {
    id: String,
    position: u64,
    sent: Instant,
}

/// Runs the benchmark.
pub async fn run(args: LagArgs) -> anyhow::Result<i32> {
    let nonce = u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0);
    let batch = args.batch.max(1) as usize;
    let per_writer = Duration::from_secs_f64(args.connections as f64 * batch as f64 / args.rate.max(1) as f64);
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.connections {
        let url = args.url.clone();
        let read_url = args.read_url.clone().unwrap_or_else(|| args.url.clone());
        let read_every = args.read_every.max(1);
        tasks.push(tokio::spawn(async move {
            let mut gen_ = Generator::new(w as u64, nonce ^ ((w as u64 + 1) << 40), 10_000);
            let mut acked = report::new_histogram();
            let mut errors = 0u64;
            let mut writer = Conn::open(&url).await?;
            // The read-backs run on their own connection beside the next
            // writes, so a slow reader (a follower seconds behind) does not
            // slow the write rate down. Positions only grow, so reading
            // them back in order never waits behind a later write.
            let (due, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Written>();
            let reader = tokio::spawn(async move {
                let mut visible = report::new_histogram();
                let (mut ops, mut errors) = (0u64, 0u64);
                let mut conn = Conn::open(&read_url).await?;
                let mut path = String::with_capacity(160);
                while let Some(w) = due_rx.recv().await {
                    path.clear();
                    let _ = write!(path, "/v1/assertions/{}?min_position={}&wait_ms=10000", w.id, w.position);
                    match conn.get(&path).await {
                        Ok((status, _)) if status.is_success() => {
                            let _ = visible.record((w.sent.elapsed().as_micros() as u64).max(1));
                            ops += 1;
                        }
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            conn = Conn::open(&read_url).await?;
                        }
                    }
                }
                anyhow::Ok((ops, errors, visible))
            });
            let mut tick = tokio::time::interval(per_writer);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut n = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let (path, body) = if batch == 1 {
                    ("/v1/assertions", serde_json::to_vec(&gen_.next_assertion())?)
                } else {
                    let items: Vec<_> = (0..batch).map(|_| gen_.next_assertion()).collect();
                    ("/v1/assertions/batch", serde_json::to_vec(&serde_json::json!({"assertions": items}))?)
                };
                let sent = Instant::now();
                let written = match writer.post_json(path, body).await {
                    Ok((status, bytes)) if status.is_success() => serde_json::from_slice::<serde_json::Value>(&bytes).ok(),
                    Ok(_) => None,
                    Err(_) => {
                        writer = Conn::open(&url).await?;
                        None
                    }
                };
                let Some(v) = written else {
                    errors += 1;
                    continue;
                };
                let _ = acked.record((sent.elapsed().as_micros() as u64).max(1));
                // A batch answers {"results": [{"id", "position", ...}]}: read back its last item.
                let v = if batch == 1 { &v } else { v["results"].as_array().and_then(|r| r.last()).unwrap_or(&serde_json::Value::Null) };
                let (Some(id), Some(position)) = (v["id"].as_str(), v["position"].as_u64()) else {
                    errors += 1;
                    continue;
                };
                n += 1;
                if n.is_multiple_of(read_every) {
                    let _ = due.send(Written { id: id.to_string(), position, sent });
                }
            }
            drop(due);
            let (ops, read_errors, visible) = reader.await??;
            anyhow::Ok((n, ops, errors + read_errors, visible, acked))
        }));
    }
    let mut visible = report::new_histogram();
    let mut acked = report::new_histogram();
    let (mut writes, mut reads, mut errors) = (0, 0, 0);
    for t in tasks {
        let (n, o, e, v, a) = t.await??;
        writes += n;
        reads += o;
        errors += e;
        visible.add(&v)?;
        acked.add(&a)?;
    }
    let secs = started.elapsed().as_secs_f64();
    report::print(&format!("lag ack rate={}/s batch={batch}", args.rate), writes, writes * batch as u64, errors, secs, &acked);
    report::print(
        &format!("lag write->visible rate={}/s read_every={}", args.rate, args.read_every.max(1)),
        reads,
        reads,
        errors,
        secs,
        &visible,
    );
    Ok(if errors > 0 { 1 } else { 0 })
}
