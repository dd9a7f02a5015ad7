//! Reading the archive back: the manifest, verified segment downloads, and
//! the cut that makes a point-in-time restore end exactly at its target.
//!
//! Nothing from the store is trusted: every segment is checked against its
//! manifest entry (size, BLAKE3, positions, times) and against the object's
//! own checksum metadata, then frame by frame (CRC32C, continuity). An
//! error names the object, so an operator knows which one to look at.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use super::layout::{self, ManifestEntry};
use super::remote::{ArchiveError, Remote};
use super::shipper::read_entry;
use super::summary;
use crate::wal::segment;

/// How many segment downloads run at once. Segments are up to 64 MiB, so
/// this also bounds restore memory.
pub const DOWNLOAD_CONCURRENCY: usize = 4;

/// Where a restore stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Everything shipped.
    Latest,
    /// The last committed state at or before this position.
    Position(u64),
    /// The last committed state whose `recorded_at` is at or before this.
    Time(DateTime<Utc>),
}

/// Reads every manifest entry (in parallel) and checks that they form one
/// log from position 1.
pub async fn read_manifest(remote: &Remote) -> Result<Vec<ManifestEntry>, ArchiveError> {
    let keys: Vec<String> = remote
        .list(layout::MANIFEST_DIR, None)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| layout::manifest_first_position(k).is_some())
        .collect();
    let entries: Vec<ManifestEntry> = futures::stream::iter(keys.into_iter().map(|k| async move {
        read_entry(remote, &k).await?.ok_or_else(|| ArchiveError::Corrupt { key: k.clone(), reason: "listed but cannot be read".into() })
    }))
    .buffered(32)
    .try_collect()
    .await?;
    layout::check_continuity(&entries).map_err(|reason| ArchiveError::Corrupt { key: remote.url().to_string(), reason })?;
    Ok(entries)
}

/// The entries a restore to `target` needs, in order. The last one may
/// hold events after the target; [`cut`] removes them.
pub fn plan(entries: &[ManifestEntry], target: Target) -> Result<Vec<ManifestEntry>, String> {
    let Some(last) = entries.last() else { return Err("the archive holds no shipped segment yet".into()) };
    let selected: Vec<ManifestEntry> = match target {
        Target::Latest => entries.to_vec(),
        Target::Position(0) => return Err("--until-position must be at least 1".into()),
        Target::Position(p) if p > last.last_position => {
            return Err(format!("position {p} is not in the archive, which ends at position {}", last.last_position));
        }
        Target::Position(p) => entries.iter().filter(|e| e.first_position <= p).cloned().collect(),
        Target::Time(t) => entries.iter().filter(|e| e.first_recorded_at <= t).cloned().collect(),
    };
    if selected.is_empty() {
        return Err(format!(
            "nothing in the archive is at or before the target: its first event was recorded at {}",
            entries[0].first_recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ));
    }
    Ok(selected)
}

/// Downloads one segment and checks it against its entry.
pub async fn download(remote: &Remote, e: &ManifestEntry) -> Result<bytes::Bytes, ArchiveError> {
    let key = e.object.clone();
    let bad = |reason: String| ArchiveError::Corrupt { key: format!("{}/{key}", remote.url().trim_end_matches('/')), reason };
    let f = remote.get(&key).await?.ok_or_else(|| bad("the segment object is missing".into()))?;
    if f.bytes.len() as u64 != e.size {
        return Err(bad(format!("{} bytes, the manifest says {}", f.bytes.len(), e.size)));
    }
    let sum = blake3::hash(&f.bytes).to_hex().to_string();
    if sum != e.blake3 {
        return Err(bad(format!("BLAKE3 {sum} does not match the manifest's {}", e.blake3)));
    }
    if let Some(meta) = &f.checksum
        && *meta != sum
    {
        return Err(bad(format!("BLAKE3 {sum} does not match the object's metadata {meta}")));
    }
    let s = summary::summarize(&f.bytes).map_err(|r| bad(format!("does not verify as a WAL segment: {r}")))?;
    let recorded = s.recorded.ok_or_else(|| bad("holds no record".into()))?;
    if s.first_position != e.first_position
        || s.next_position != e.last_position + 1
        || recorded != (e.first_recorded_at, e.last_recorded_at)
    {
        return Err(bad(format!(
            "holds positions {}..{} recorded {}..{}, the manifest says {}..{} recorded {}..{}",
            s.first_position,
            s.next_position - 1,
            recorded.0.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            recorded.1.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            e.first_position,
            e.last_position,
            e.first_recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            e.last_recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        )));
    }
    Ok(f.bytes)
}

/// Writes `bytes` as a segment file of `wal_dir`, durably and atomically
/// (temporary name, fsync, rename).
pub fn write_segment(wal_dir: &Path, first_position: u64, bytes: &[u8]) -> Result<PathBuf, ArchiveError> {
    use std::io::Write;
    let path = wal_dir.join(segment::file_name(first_position));
    let tmp = wal_dir.join(format!("{first_position:020}.{}", segment::TMP_EXT));
    let mut f = std::fs::File::create(&tmp).map_err(|e| ArchiveError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| ArchiveError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| ArchiveError::io(&path, e))?;
    Ok(path)
}

/// Downloads `entries` into `wal_dir` in parallel, verifying each;
/// `progress` gets the bytes of each finished segment.
pub async fn fetch_into(
    remote: &Remote,
    entries: &[ManifestEntry],
    wal_dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, ArchiveError> {
    let total: u64 = futures::stream::iter(entries.iter().map(|e| async move {
        let bytes = download(remote, e).await?;
        let dir = wal_dir.to_path_buf();
        let first = e.first_position;
        let n = bytes.len() as u64;
        tokio::task::spawn_blocking(move || write_segment(&dir, first, &bytes))
            .await
            .map_err(|e| ArchiveError::io(wal_dir, std::io::Error::other(e.to_string())))??;
        progress(n);
        Ok::<u64, ArchiveError>(n)
    }))
    .buffer_unordered(DOWNLOAD_CONCURRENCY)
    .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
    .await?;
    segment::sync_dir(wal_dir).map_err(|e| ArchiveError::io(wal_dir, std::io::Error::other(e.to_string())))?;
    Ok(total)
}

/// Where a restore ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cut {
    /// The last position kept (0 if nothing).
    pub position: u64,
    /// Its `recorded_at`.
    pub recorded_at: Option<DateTime<Utc>>,
    /// Events dropped from the last segment.
    pub dropped_events: u64,
    /// Set when the target position fell inside an atomic batch, which is
    /// restored whole or not at all.
    pub note: Option<String>,
}

/// Cuts the last segment (`entry`, already in `wal_dir`) after the last
/// frame at or before `target`. Frames are atomic batches: a position inside
/// one keeps the state before that batch, the last state that existed.
pub fn cut(wal_dir: &Path, entry: &ManifestEntry, target: Target) -> Result<Cut, ArchiveError> {
    let path = wal_dir.join(segment::file_name(entry.first_position));
    let bytes = std::fs::read(&path).map_err(|e| ArchiveError::io(&path, e))?;
    let frames = summary::extents(&bytes).map_err(|reason| ArchiveError::Corrupt { key: path.display().to_string(), reason })?;
    let keep = |f: &summary::FrameExtent| match target {
        Target::Latest => true,
        Target::Position(p) => f.last_position <= p,
        Target::Time(t) => f.recorded_at <= t,
    };
    let kept = frames.iter().take_while(|f| keep(f)).count();
    let end = if kept == 0 { segment::HEADER_LEN } else { frames[kept - 1].end };
    let note = match (target, frames.get(kept)) {
        (Target::Position(p), Some(f)) if f.first_position <= p => Some(format!(
            "position {p} lies inside a batch committed atomically as positions {}..{}; restored the state before that batch",
            f.first_position, f.last_position
        )),
        _ => None,
    };
    let (position, recorded_at) = match kept {
        0 => (entry.first_position - 1, None),
        k => (frames[k - 1].last_position, Some(frames[k - 1].recorded_at)),
    };
    if kept == 0 {
        // Nothing of this segment is kept: remove it rather than leave an
        // empty segment where the next writer's segment will start.
        std::fs::remove_file(&path).map_err(|e| ArchiveError::io(&path, e))?;
    } else if end < bytes.len() as u64 {
        let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| ArchiveError::io(&path, e))?;
        f.set_len(end).and_then(|_| f.sync_all()).map_err(|e| ArchiveError::io(&path, e))?;
    }
    Ok(Cut { position, recorded_at, dropped_events: entry.last_position - position, note })
}
