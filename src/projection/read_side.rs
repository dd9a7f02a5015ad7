//! The running read side: the projection slots, their workers, and the
//! waits that give clients read-your-writes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::kv::KvStore;
use super::lenses::LensStore;
use super::search::{SearchDefinition, SearchStore};
use super::slot::Slot;
use super::worker::{DEFAULT_BATCH, LogFeed, Worker};
use super::{Projection, ProjectionError};
use crate::ingest::Ingest;
use crate::lens::Definitions;

/// Status of one projection, for `/v1/ready` and admin views.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectionStatus {
    /// Name.
    pub name: &'static str,
    /// Last visible position.
    pub position: u64,
    /// Whether its last apply failed.
    pub failing: bool,
    /// Why it is not served, if it is not (definitions changed).
    pub stale: Option<String>,
}

/// Names of every projection, in start order.
pub const PROJECTIONS: [&str; 3] = ["kv", "lenses", "search"];

/// Opens the KV slot under `db_dir`.
pub fn kv_slot(db_dir: &Path) -> Result<Slot<KvStore>, ProjectionError> {
    Slot::open("kv", db_dir.join("kv.redb"), Box::new(KvStore::open))
}

/// Opens the lenses slot under `db_dir`; marks it stale if it was built
/// with other definitions.
pub fn lenses_slot(db_dir: &Path, defs: Definitions) -> Result<Slot<LensStore>, ProjectionError> {
    let hash = defs.hash.clone();
    let slot = Slot::open("lenses", db_dir.join("lenses.redb"), Box::new(move |p: &Path| LensStore::open(p, defs.clone())))?;
    let built = slot.load().built_with()?;
    if built != hash {
        slot.set_stale(Some(format!(
            "the lens definitions changed (store built with {}, server has {}); rebuild the lenses projection",
            short(&built),
            short(&hash)
        )));
    }
    Ok(slot)
}

/// Opens the search slot (`<db>/search`, a directory); marks it stale if
/// it was built with another index definition.
pub fn search_slot(db_dir: &Path, def: SearchDefinition) -> Result<Slot<SearchStore>, ProjectionError> {
    let hash = def.hash.clone();
    let slot = Slot::open("search", db_dir.join("search"), Box::new(move |p: &Path| SearchStore::open(p, def.clone())))?;
    let built = slot.load().built_with().to_string();
    if built != hash {
        slot.set_stale(Some(format!(
            "the search definition changed (index built with {}, server has {}); rebuild the search projection",
            short(&built),
            short(&hash)
        )));
    }
    Ok(slot)
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Every projection of this process.
pub struct ReadSide {
    /// The KV view.
    pub kv: Arc<Slot<KvStore>>,
    /// Lens materializations.
    pub lenses: Arc<Slot<LensStore>>,
    /// The search index.
    pub search: Arc<Slot<SearchStore>>,
    workers: Mutex<Vec<Worker>>,
    receivers: Vec<(&'static str, tokio::sync::watch::Receiver<u64>)>,
    feed: LogFeed,
    /// Online rebuild jobs.
    pub jobs: super::rebuild::Jobs,
    /// `<db>/LOCK`, held until the read side is dropped, which is after
    /// its workers have closed the stores. The WAL's lock goes with the
    /// writer, earlier in a shutdown, so without this one an offline tool
    /// started during a slow stop got past the lock and met redb's
    /// "Database already open" instead of a clear refusal.
    _lock: crate::wal::lock::DirLock,
}

impl ReadSide {
    /// Opens the stores under `db_dir` and starts one worker each, following
    /// the log that `ingest` writes.
    pub fn start(db_dir: &Path, wal_dir: &Path, ingest: &Ingest, defs: Definitions) -> Result<ReadSide, ProjectionError> {
        // The search definition sits beside lenses.toml.
        let dir = std::env::var_os("STEMEDB_PROJECTIONS_DIR").map(std::path::PathBuf::from);
        let search = SearchDefinition::load(dir.as_deref()).map_err(|message| ProjectionError { projection: "search", message })?;
        Self::start_with(db_dir, ingest.feed(wal_dir), defs, search)
    }

    /// [`ReadSide::start`] with an explicit search definition and any log
    /// feed: the writer's own log, or the copy a follower downloads.
    pub fn start_with(db_dir: &Path, feed: LogFeed, defs: Definitions, search_def: SearchDefinition) -> Result<ReadSide, ProjectionError> {
        let lock = crate::wal::lock::DirLock::acquire(db_dir)
            .map_err(|e| ProjectionError { projection: "stores", message: format!("{e}: another process has these projections open") })?;
        let kv = Arc::new(kv_slot(db_dir)?);
        let lenses = Arc::new(lenses_slot(db_dir, defs)?);
        if let Some(why) = lenses.stale() {
            tracing::warn!(projection = "lenses", "{why}; lens reads answer 503 until it is rebuilt");
        }
        let search = Arc::new(search_slot(db_dir, search_def)?);
        if let Some(why) = search.stale() {
            tracing::warn!(projection = "search", "{why}; searches answer 503 until it is rebuilt");
        }
        let err = |name: &'static str| move |e: std::io::Error| ProjectionError { projection: name, message: e.to_string() };
        let workers = vec![
            Worker::spawn(kv.clone(), feed.clone(), DEFAULT_BATCH).map_err(err("kv"))?,
            Worker::spawn(lenses.clone(), feed.clone(), DEFAULT_BATCH).map_err(err("lenses"))?,
            Worker::spawn(search.clone(), feed.clone(), DEFAULT_BATCH).map_err(err("search"))?,
        ];
        let receivers = workers.iter().map(|w| (w.name, w.subscribe())).collect();
        Ok(ReadSide { kv, lenses, search, workers: Mutex::new(workers), receivers, feed, jobs: Default::default(), _lock: lock })
    }

    /// Every projection as something a rebuild or verification can work on.
    pub fn rebuildable(&self) -> Vec<Arc<dyn super::rebuild::Rebuildable>> {
        vec![self.kv.clone(), self.lenses.clone(), self.search.clone()]
    }

    /// Starts an online rebuild of `names`.
    pub fn start_rebuild(&self, names: &[String]) -> Result<Arc<super::rebuild::Job>, super::rebuild::StartError> {
        self.jobs.start(names, &self.rebuildable(), self.feed.clone())
    }

    /// What workers and rebuilds read the log through.
    pub fn feed(&self) -> &LogFeed {
        &self.feed
    }

    /// Why `name` is not served, if it is not.
    pub fn stale(&self, name: &str) -> Option<String> {
        match name {
            "kv" => self.kv.stale(),
            "lenses" => self.lenses.stale(),
            "search" => self.search.stale(),
            _ => None,
        }
    }

    /// The checkpoint of the current store of `name`.
    pub fn checkpoint(&self, name: &str) -> Result<u64, ProjectionError> {
        match name {
            "kv" => self.kv.load().checkpoint(),
            "search" => self.search.load().checkpoint(),
            _ => self.lenses.load().checkpoint(),
        }
    }

    /// Visible position and health of every projection.
    pub fn status(&self) -> Vec<ProjectionStatus> {
        let workers = self.workers.lock().map(|w| w.iter().map(|w| (w.name, w.failing())).collect::<Vec<_>>()).unwrap_or_default();
        self.receivers
            .iter()
            .map(|(name, rx)| ProjectionStatus {
                name,
                position: *rx.borrow(),
                failing: workers.iter().any(|(n, f)| n == name && *f),
                stale: self.stale(name),
            })
            .collect()
    }

    /// Waits until every projection in `names` has made `position`
    /// visible, or `timeout` passes; on timeout returns the first lagging
    /// projection and its position.
    pub async fn wait_for(&self, names: &[&str], position: u64, timeout: Duration) -> Result<(), (&'static str, u64)> {
        let deadline = tokio::time::Instant::now() + timeout;
        for (name, rx) in self.receivers.iter().filter(|(n, _)| names.contains(n)) {
            let mut rx = rx.clone();
            let reached = matches!(tokio::time::timeout_at(deadline, rx.wait_for(|p| *p >= position)).await, Ok(Ok(_)));
            if !reached {
                return Err((name, *rx.borrow()));
            }
        }
        Ok(())
    }

    /// Waits for the workers to exit (after the write path stopped).
    pub fn join(&self) {
        let workers = self.workers.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
        for w in workers {
            w.join();
        }
    }
}
