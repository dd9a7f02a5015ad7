//! `stemedb admin …`: projection rebuilds, status and verification, offline
//! (on a stopped server's data directory) or online (`--url`).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config::DataArgs;
use crate::lens::Definitions;
use crate::projection::read_side::{PROJECTIONS, kv_slot, lenses_slot, search_slot};
use crate::projection::rebuild::{Rebuildable, rebuild_offline_many};
use crate::wal::lock::DirLock;

/// Admin subcommands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Replay the log into fresh projections and swap them in.
    RebuildProjections(RebuildArgs),
    /// Show each projection's position, lag and rebuild progress (online).
    Projections(UrlArgs),
    /// Replay the log into temporary stores and compare them with the live
    /// projections; exit 0 if identical, 1 if not.
    VerifyProjections(RebuildArgs),
}

/// Which projections, and where.
#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// `kv`, `lenses`, `search`, a comma list such as `kv,lenses`, or `all`.
    #[arg(long, default_value = "all")]
    pub projection: String,
    /// A running server's URL; without it, work offline on --data-dir.
    #[arg(long)]
    pub url: Option<String>,
    /// Directory holding `lenses.toml` [default: built-in definitions].
    #[arg(long, env = "STEMEDB_PROJECTIONS_DIR")]
    pub projections_dir: Option<std::path::PathBuf>,
}

/// A running server.
#[derive(Args, Debug)]
pub struct UrlArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:18180")]
    pub url: String,
}

/// Parses `--projection` (`kv`, `lenses`, `search` or `all`).
pub fn projection_names(p: &str) -> anyhow::Result<Vec<String>> {
    names(p)
}

fn names(p: &str) -> anyhow::Result<Vec<String>> {
    if p == "all" {
        return Ok(PROJECTIONS.iter().map(|s| s.to_string()).collect());
    }
    // A comma list (`kv,lenses`), kept in start order without repeats.
    let asked: Vec<&str> = p.split(',').map(str::trim).collect();
    if let Some(bad) = asked.iter().find(|n| !PROJECTIONS.contains(n)) {
        bail!("unknown projection {bad:?}; use one or more of {} (comma-separated), or all", PROJECTIONS.join(", "));
    }
    Ok(PROJECTIONS.iter().filter(|n| asked.contains(n)).map(|s| s.to_string()).collect())
}

/// Runs an admin subcommand.
pub fn run(data: &DataArgs, cmd: AdminCommand) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cmd {
        AdminCommand::RebuildProjections(a) => match &a.url {
            Some(url) => rt.block_on(rebuild_online(url, &names(&a.projection)?)),
            None => rebuild_offline(data, &a),
        },
        AdminCommand::Projections(a) => rt.block_on(async {
            let v: Value = client()?.get(format!("{}/v1/admin/projections", a.url)).send().await?.error_for_status()?.json().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }),
        AdminCommand::VerifyProjections(a) => match &a.url {
            Some(url) => rt.block_on(verify_online(url, &names(&a.projection)?)),
            None => verify_offline(data, &a),
        },
    }
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(3600)).build()?)
}

fn open_slots(data: &DataArgs, projections_dir: Option<&std::path::Path>, names: &[String]) -> anyhow::Result<Vec<Box<dyn Rebuildable>>> {
    let defs = Definitions::load(projections_dir).map_err(|e| anyhow::anyhow!("invalid lens definitions: {e}"))?;
    let db = data.db_dir();
    let mut out: Vec<Box<dyn Rebuildable>> = Vec::new();
    for n in names {
        match n.as_str() {
            "kv" => out.push(Box::new(kv_slot(&db)?)),
            "search" => {
                let def = crate::projection::search::SearchDefinition::load(projections_dir)
                    .map_err(|e| anyhow::anyhow!("invalid search definition: {e}"))?;
                out.push(Box::new(search_slot(&db, def)?))
            }
            _ => out.push(Box::new(lenses_slot(&db, defs.clone())?)),
        }
    }
    Ok(out)
}

/// The last position of the log (checks it end to end on the way).
/// The log's last position, after checking every header, frame checksum
/// and position. Payloads are not decoded here: the replay decodes every
/// one and fails on any that does not, leaving the old projections as they
/// were, so decoding them twice would only add a single-threaded pass
/// (1–1.5 s per million events) before the parallel one.
fn log_head(data: &DataArgs) -> anyhow::Result<u64> {
    let report = crate::wal::verify::verify_with(&data.wal_dir(), false).context("the WAL does not verify; fix it before rebuilding")?;
    Ok(report.last_position)
}

/// The locks of the log and of the stores. A server takes the stores' at
/// start and drops it only once its stores are closed, after the log's.
fn lock(data: &DataArgs) -> anyhow::Result<(DirLock, DirLock)> {
    let held =
        |e| anyhow::anyhow!("{e}. A running server holds this data directory: use `--url` to rebuild online, or stop the server first");
    Ok((DirLock::acquire(&data.wal_dir()).map_err(held)?, DirLock::acquire(&data.db_dir()).map_err(held)?))
}

fn rebuild_offline(data: &DataArgs, a: &RebuildArgs) -> anyhow::Result<i32> {
    let _lock = lock(data)?;
    // `--projection kv,lenses` rebuilds several (in one pass over the log).
    let mut chosen: Vec<String> = Vec::new();
    for p in a.projection.split(',') {
        for n in names(p.trim())? {
            if !chosen.contains(&n) {
                chosen.push(n);
            }
        }
    }
    let (summary, _) = rebuild_offline_projections(data, a.projections_dir.as_deref(), &chosen, true, None, &[])?;
    // One JSON line per projection, then the total.
    for p in summary["projections"].as_array().into_iter().flatten() {
        println!("{p}");
    }
    let names: Vec<&Value> = summary["projections"].as_array().into_iter().flatten().map(|p| &p["projection"]).collect();
    println!(
        "{}",
        json!({"projections": names, "events": summary["events"], "seconds": summary["seconds"], "events_per_sec": summary["events_per_sec"]})
    );
    Ok(0)
}

/// Rebuilds `names` on the data directory `data` from its whole log in one
/// pass (decoded once, each projection bulk-loaded by its own thread; see
/// `projection::rebuild::rebuild_offline_many`); returns a JSON summary (events, seconds,
/// events/s). The caller holds the WAL lock: `admin rebuild-projections`
/// and `restore` both end here. `verified_head` is the log's last position
/// when the caller has just verified the whole log itself (restore does);
/// otherwise the log is verified here first.
pub fn rebuild_offline_projections(
    data: &DataArgs,
    projections_dir: Option<&std::path::Path>,
    names: &[String],
    show_progress: bool,
    verified_head: Option<u64>,
    extra: &[&dyn crate::projection::Projection],
) -> anyhow::Result<(serde_json::Value, Vec<std::time::Duration>)> {
    let head = match verified_head {
        Some(h) => h,
        None => log_head(data)?,
    };
    let slots = open_slots(data, projections_dir, names)?;
    let multi = if show_progress {
        indicatif::MultiProgress::new()
    } else {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let style = indicatif::ProgressStyle::with_template("{prefix:>7} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Vec<indicatif::ProgressBar> = slots
        .iter()
        .map(|slot| {
            let bar = multi.add(indicatif::ProgressBar::new(head));
            bar.set_style(style.clone());
            bar.set_prefix(slot.name());
            bar
        })
        .collect();
    let started = std::time::Instant::now();
    // One pass over the log feeds every projection (decoded once), each
    // bulk-loaded by its own thread.
    let chosen: Vec<&dyn Rebuildable> = slots.iter().map(|s| &**s).collect();
    let mut times = rebuild_offline_many(&chosen, extra, &data.wal_dir(), head, &|i, p| {
        if let Some(bar) = bars.get(i) {
            bar.set_position(p);
        }
    })?;
    let extra_times = times.split_off(slots.len().min(times.len()));
    let per_projection: Vec<Value> = slots
        .iter()
        .zip(times)
        .zip(&bars)
        .map(|((slot, t), bar)| {
            bar.finish();
            let secs = t.as_secs_f64();
            json!({"projection": slot.name(), "events": head, "seconds": secs, "events_per_sec": head as f64 / secs.max(1e-9)})
        })
        .collect();
    let secs = started.elapsed().as_secs_f64();
    let summary = json!({
        "projections": per_projection,
        "events": head,
        "seconds": secs,
        "events_per_sec": head as f64 / secs.max(1e-9),
    });
    Ok((summary, extra_times))
}

fn verify_offline(data: &DataArgs, a: &RebuildArgs) -> anyhow::Result<i32> {
    let _lock = lock(data)?;
    let mut ok = true;
    let mut chosen: Vec<String> = Vec::new();
    for p in a.projection.split(',') {
        for n in names(p.trim())? {
            if !chosen.contains(&n) {
                chosen.push(n);
            }
        }
    }
    for slot in open_slots(data, a.projections_dir.as_deref(), &chosen)? {
        let c = slot.verify(&data.wal_dir())?;
        ok &= c.equal;
        println!("{}", serde_json::to_string(&c)?);
    }
    Ok(if ok { 0 } else { 1 })
}

async fn rebuild_online(url: &str, names: &[String]) -> anyhow::Result<i32> {
    let c = client()?;
    let resp = c.post(format!("{url}/v1/admin/projections/rebuild")).json(&json!({"projections": names})).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("the server refused the rebuild ({status}): {}", v["detail"].as_str().unwrap_or(""));
    }
    let job = v["job"].as_str().unwrap_or_default().to_string();
    eprintln!("rebuild job {job} started");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let j: Value = c.get(format!("{url}/v1/admin/projections/rebuild/{job}")).send().await?.json().await?;
        for (name, p) in j["progress"].as_object().into_iter().flatten() {
            eprintln!(
                "{name:>7}: {:>5.1}%  {}/{} events  {:.0} events/s  ETA {:.0}s{}",
                p["progress"].as_f64().unwrap_or(0.0) * 100.0,
                p["position"],
                p["head"],
                p["events_per_sec"].as_f64().unwrap_or(0.0),
                p["eta_seconds"].as_f64().unwrap_or(0.0),
                if p["swapped"].as_bool() == Some(true) {
                    "  swapped in"
                } else if p["settling"].as_bool() == Some(true) {
                    "  merging segments before the swap"
                } else {
                    ""
                }
            );
        }
        match j["state"].as_str() {
            Some("running") => continue,
            Some("completed") => {
                println!("{j}");
                return Ok(0);
            }
            _ => {
                println!("{j}");
                return Ok(1);
            }
        }
    }
}

async fn verify_online(url: &str, names: &[String]) -> anyhow::Result<i32> {
    let resp = client()?.post(format!("{url}/v1/admin/projections/verify")).json(&json!({"projections": names})).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("verification failed to run ({status}): {}", v["detail"].as_str().unwrap_or(""));
    }
    println!("{v}");
    Ok(if v["ok"].as_bool() == Some(true) { 0 } else { 1 })
}
