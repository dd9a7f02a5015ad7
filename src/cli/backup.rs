//! `stemedb restore` and `stemedb backup …`: the archive from the command
//! line. Restore turns a shipped log into a normal data directory; `backup
//! verify` and `backup list` inspect an archive without restoring it;
//! `backup takeover` hands a prefix to a restored writer after a disaster.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::json;

use crate::archive::fetch::{self, Target};
use crate::archive::layout::{self, WriterRecord};
use crate::archive::shipper::{self, read_writer};
use crate::archive::{ArchiveError, Remote};
use crate::config::{DataArgs, S3Args};
use crate::model::LogRecord;
use crate::projection::{BulkLoad, Projection, ProjectionError};
use crate::wal::lock::DirLock;
use crate::wal::segment;

/// `stemedb restore` options.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The archive: `s3://bucket/prefix`.
    #[arg(long)]
    pub from: String,
    /// Restore the last state recorded at or before this time (RFC 3339).
    #[arg(long, conflicts_with = "until_position", value_parser = parse_time)]
    pub until_time: Option<DateTime<Utc>>,
    /// Restore the last state at or before this log position.
    #[arg(long)]
    pub until_position: Option<u64>,
    /// Replace the contents of a non-empty data directory.
    #[arg(long)]
    pub force: bool,
    /// Projections to rebuild after the download: `kv`, `lenses`, `search` or `all`.
    #[arg(long, default_value = "all")]
    pub projection: String,
    /// Directory holding `lenses.toml` and `search.toml` [default: built-in definitions].
    #[arg(long, env = "STEMEDB_PROJECTIONS_DIR")]
    pub projections_dir: Option<std::path::PathBuf>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// The archive's store.
    #[command(flatten)]
    pub s3: S3Args,
}

/// Which archive.
#[derive(Args, Debug)]
pub struct FromArgs {
    /// The archive: `s3://bucket/prefix`.
    #[arg(long)]
    pub from: String,
    /// The archive's store.
    #[command(flatten)]
    pub s3: S3Args,
}

/// `stemedb backup` subcommands.
#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Check the whole shipped log (checksums, continuity, manifest); exit 0 if sound, 1 if not.
    Verify(FromArgs),
    /// Show the restorable range: first/last position and time.
    List(FromArgs),
    /// Make this (stopped, restored) data directory the writer of the archive,
    /// fencing the previous writer. Only after a restore to the latest state.
    Takeover(FromArgs),
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s.trim()).map(|t| t.with_timezone(&Utc)).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Runs `stemedb restore`.
pub fn restore(data: &DataArgs, a: RestoreArgs) -> anyhow::Result<i32> {
    let remote = Remote::connect(&a.s3.remote(&a.from))?;
    let target = match (a.until_time, a.until_position) {
        (Some(t), _) => Target::Time(t),
        (None, Some(p)) => Target::Position(p),
        (None, None) => Target::Latest,
    };
    let names = crate::cli::admin::projection_names(&a.projection)?;
    prepare_target(data, a.force)?;
    let lock = DirLock::acquire(&data.wal_dir()).map_err(|e| anyhow::anyhow!("{e}; is a server running on this data directory?"))?;
    let _stores = DirLock::acquire(&data.db_dir()).map_err(|e| anyhow::anyhow!("{e}; is a server running on this data directory?"))?;
    let started = Instant::now();
    let rt = runtime()?;
    let (entries, downloaded, cut) = rt.block_on(async {
        let all = fetch::read_manifest(&remote).await?;
        let entries = fetch::plan(&all, target).map_err(|e| anyhow::anyhow!("{}: {e}", remote.url()))?;
        let total: u64 = entries.iter().map(|e| e.size).sum();
        let bar = progress_bar(total, a.quiet, "download", "{prefix:>8} [{bar:40}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}");
        let b = bar.clone();
        let bytes = fetch::fetch_into(&remote, &entries, &data.wal_dir(), &move |n| b.inc(n)).await?;
        bar.finish();
        let Some(last) = entries.last() else { bail!("nothing to restore") };
        let mut cut = fetch::cut(&data.wal_dir(), last, target)?;
        if cut.recorded_at.is_none() && entries.len() > 1 {
            cut.recorded_at = Some(entries[entries.len() - 2].last_recorded_at);
        }
        Ok::<_, anyhow::Error>((entries, bytes, cut))
    })?;
    // A writer started here appends to a new segment, so every restored
    // segment stays byte-identical to the archive's (see `backup takeover`).
    crate::wal::recovery::create_segment(&data.wal_dir(), cut.position + 1)?;
    let download_secs = started.elapsed().as_secs_f64();
    // Headers, checksums and frame positions of the cut log; payloads are
    // not decoded here because the rebuild below decodes every one (and
    // fails on any that does not decode or continue the positions).
    let report = crate::wal::verify::verify_with(&data.wal_dir(), false).context("the restored log does not verify")?;
    if report.last_position != cut.position {
        bail!("the restored log ends at {}, expected {}", report.last_position, cut.position);
    }
    let t = Instant::now();
    // The write path's id index is built from the same log pass as the
    // projections, so the restored directory accepts writes as soon as it
    // starts.
    std::fs::create_dir_all(data.db_dir())?;
    let ids = IdIndexLoad::open(&data.id_index_path())?;
    let (rebuilt, extra) =
        crate::cli::admin::rebuild_offline_projections(data, a.projections_dir.as_deref(), &names, !a.quiet, Some(cut.position), &[&ids])?;
    let id_index_secs = extra.first().map(|d| d.as_secs_f64()).unwrap_or_default();
    let rebuild_secs = t.elapsed().as_secs_f64();
    let summary = json!({
        "restored_from": remote.url(),
        "target": match target { Target::Latest => json!("latest"), Target::Position(p) => json!({"position": p}), Target::Time(t) => json!({"time": t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)}) },
        "position": cut.position,
        "recorded_at": cut.recorded_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        "dropped_events": cut.dropped_events,
        "note": cut.note,
        "segments": entries.len(),
        "bytes": downloaded,
        "download_seconds": download_secs,
        "rebuild_seconds": rebuild_secs,
        "rebuild": rebuilt,
        "id_index_seconds": id_index_secs,
        "seconds": started.elapsed().as_secs_f64(),
        "restored_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    });
    let marker = data.data_dir.join("RESTORED.json");
    std::fs::write(&marker, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("cannot write {}", marker.display()))?;
    drop(lock);
    if let Some(note) = &cut.note {
        eprintln!("note: {note}");
    }
    println!("{summary}");
    Ok(0)
}

fn progress_bar(total: u64, quiet: bool, prefix: &'static str, template: &str) -> indicatif::ProgressBar {
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix);
    bar
}

fn non_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Refuses a non-empty target unless `force`, in which case it empties it
/// (only when no server holds it).
fn prepare_target(data: &DataArgs, force: bool) -> anyhow::Result<()> {
    let dirs = [data.data_dir.clone(), data.wal_dir(), data.db_dir()];
    let busy: Vec<&std::path::PathBuf> = dirs.iter().filter(|d| non_empty(d)).collect();
    if busy.is_empty() {
        return Ok(());
    }
    if !force {
        bail!("{} is not empty; restore into an empty directory, or pass --force to replace its contents", busy[0].display());
    }
    if data.wal_dir().exists() {
        let _held =
            DirLock::acquire(&data.wal_dir()).map_err(|e| anyhow::anyhow!("{e}; stop the server before restoring over its data"))?;
    }
    for d in busy {
        if !d.exists() {
            continue; // inside a directory emptied just before
        }
        for entry in std::fs::read_dir(d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = entry?.path();
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            r.with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// Runs a `stemedb backup` subcommand.
pub fn backup(data: &DataArgs, cmd: BackupCommand) -> anyhow::Result<i32> {
    let rt = runtime()?;
    match cmd {
        BackupCommand::List(a) => rt.block_on(list(&Remote::connect(&a.s3.remote(&a.from))?)),
        BackupCommand::Verify(a) => rt.block_on(verify(&Remote::connect(&a.s3.remote(&a.from))?)),
        BackupCommand::Takeover(a) => rt.block_on(takeover(data, &Remote::connect(&a.s3.remote(&a.from))?)),
    }
}

async fn list(remote: &Remote) -> anyhow::Result<i32> {
    let writer = read_writer(remote).await?;
    let entries = fetch::read_manifest(remote).await?;
    let (first, last) = (entries.first(), entries.last());
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "archive": remote.url(),
            "writer": writer,
            "segments": entries.len(),
            "bytes": entries.iter().map(|e| e.size).sum::<u64>(),
            "first_position": first.map(|e| e.first_position),
            "last_position": last.map(|e| e.last_position),
            "first_recorded_at": first.map(|e| e.first_recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            "last_recorded_at": last.map(|e| e.last_recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            "last_shipped_at": last.map(|e| e.shipped_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        }))?
    );
    Ok(0)
}

/// Checks everything and reports every problem, each naming its object.
async fn verify(remote: &Remote) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    match read_writer(remote).await {
        Ok(Some(_)) => {}
        Ok(None) => problems.push(format!("{}/{}: missing (no writer has claimed this prefix)", remote.url(), layout::WRITER_KEY)),
        Err(e) => problems.push(e.to_string()),
    }
    let entries = match fetch::read_manifest(remote).await {
        Ok(e) => e,
        Err(e) => {
            problems.push(e.to_string());
            return report(remote, &problems, 0, 0, started);
        }
    };
    let results: Vec<Result<u64, ArchiveError>> =
        futures::stream::iter(entries.iter().map(|e| async move { fetch::download(remote, e).await.map(|b| b.len() as u64) }))
            .buffered(fetch::DOWNLOAD_CONCURRENCY)
            .collect()
            .await;
    let mut bytes = 0;
    for r in results {
        match r {
            Ok(n) => bytes += n,
            Err(e) => problems.push(e.to_string()),
        }
    }
    // Segment objects without a manifest entry are uploads that never
    // finished (harmless, restore ignores them) or debris: say so.
    let listed: std::collections::BTreeSet<String> = entries.iter().map(|e| e.object.clone()).collect();
    let orphans: Vec<String> =
        remote.list(layout::SEGMENTS_DIR, None).await?.into_iter().map(|(k, _)| k).filter(|k| !listed.contains(k)).collect();
    for o in &orphans {
        eprintln!("warning: {}/{o} has no manifest entry (an unfinished upload); restore ignores it", remote.url());
    }
    report(remote, &problems, entries.len(), bytes, started)
}

fn report(remote: &Remote, problems: &[String], segments: usize, bytes: u64, started: Instant) -> anyhow::Result<i32> {
    for p in problems {
        eprintln!("error: {p}");
    }
    println!(
        "{}",
        json!({"archive": remote.url(), "ok": problems.is_empty(), "segments": segments, "bytes": bytes, "problems": problems, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(if problems.is_empty() { 0 } else { 1 })
}

/// Claims the archive for this data directory's log, after checking that
/// the log is exactly the archive's (a restore to the latest state).
async fn takeover(data: &DataArgs, remote: &Remote) -> anyhow::Result<i32> {
    let wal = data.wal_dir();
    let _lock = DirLock::acquire(&wal).map_err(|e| anyhow::anyhow!("{e}; stop the server first"))?;
    let entries = fetch::read_manifest(remote).await?;
    let Some(last) = entries.last() else { bail!("{} holds no segment; a new writer can simply ship to it", remote.url()) };
    let local = crate::wal::verify::verify(&wal).context("the local log does not verify")?;
    if local.last_position != last.last_position {
        bail!(
            "this log ends at position {} but the archive at {}: only a data directory restored to the archive's latest state \
             (and not written to since) can take it over; ship a point-in-time restore to a new prefix instead",
            local.last_position,
            last.last_position
        );
    }
    let path = wal.join(segment::file_name(last.first_position));
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if blake3::hash(&bytes).to_hex().as_str() != last.blake3 {
        bail!("{} differs from the archive's {}: this log is not a copy of the archive", path.display(), last.object);
    }
    let old = read_writer(remote).await?;
    let id = shipper::writer_id(&wal)?;
    let rec = WriterRecord {
        format: layout::FORMAT,
        writer_id: id,
        generation: old.as_ref().map(|o| o.generation + 1).unwrap_or(1),
        claimed_at: Utc::now(),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
    };
    remote.overwrite(layout::WRITER_KEY, serde_json::to_vec_pretty(&rec)?).await?;
    println!("{}", json!({"archive": remote.url(), "previous": old, "writer": rec}));
    Ok(0)
}

/// The write path's id index as one more consumer of the restore's single
/// log pass: it is only ever bulk-loaded here (see
/// [`SortedLoad`](crate::ingest::id_index::SortedLoad)).
struct IdIndexLoad {
    index: std::sync::Mutex<crate::ingest::id_index::IdIndex>,
    path: std::path::PathBuf,
}

impl IdIndexLoad {
    /// Opens the index at `path`, emptied if it holds anything (a forced
    /// restore over an old directory).
    fn open(path: &std::path::Path) -> anyhow::Result<IdIndexLoad> {
        let mut index = crate::ingest::id_index::IdIndex::open(path)?;
        if index.checkpoint()? != 0 {
            index.clear()?;
        }
        Ok(IdIndexLoad { index: std::sync::Mutex::new(index), path: path.to_path_buf() })
    }
}

fn ids_err(e: impl std::fmt::Display) -> ProjectionError {
    ProjectionError { projection: "ids", message: e.to_string() }
}

impl Projection for IdIndexLoad {
    fn name(&self) -> &'static str {
        "ids"
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.index.lock().map_err(ids_err)?.checkpoint().map_err(ids_err)
    }

    fn apply(&self, _: &[LogRecord]) -> Result<u64, ProjectionError> {
        Err(ids_err("the id index is only bulk-loaded by a restore"))
    }

    fn flush(&self) -> Result<u64, ProjectionError> {
        self.checkpoint()
    }

    fn bulk_load(&self) -> Result<Option<Box<dyn BulkLoad + '_>>, ProjectionError> {
        Ok(Some(Box::new(IdIndexBulk { index: &self.index, load: crate::ingest::id_index::SortedLoad::new(&self.path) })))
    }
}

/// [`IdIndexLoad`]'s bulk load.
struct IdIndexBulk<'a> {
    index: &'a std::sync::Mutex<crate::ingest::id_index::IdIndex>,
    load: crate::ingest::id_index::SortedLoad,
}

impl BulkLoad for IdIndexBulk<'_> {
    fn push(&mut self, records: &[LogRecord]) -> Result<(), ProjectionError> {
        records.iter().try_for_each(|r| self.load.push(r)).map_err(ids_err)
    }

    fn finish(self: Box<Self>) -> Result<u64, ProjectionError> {
        let mut index = self.index.lock().map_err(ids_err)?;
        self.load.finish(&mut index).map_err(ids_err)
    }
}
