//! The running read side: the projection stores, their workers, and the
//! waits that give clients read-your-writes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::kv::KvStore;
use super::lenses::LensStore;
use super::worker::{DEFAULT_BATCH, Worker};
use super::{Projection, ProjectionError};
use crate::ingest::Ingest;
use crate::lens::Definitions;

/// Status of one projection, for `/v1/ready` and admin views.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectionStatus {
    /// Name.
    pub name: &'static str,
    /// Last applied position.
    pub position: u64,
    /// Whether its last apply failed.
    pub failing: bool,
}

/// Every projection of this process.
pub struct ReadSide {
    /// The KV view.
    pub kv: Arc<KvStore>,
    /// Lens materializations.
    pub lenses: Arc<LensStore>,
    workers: Mutex<Vec<Worker>>,
    receivers: Vec<(&'static str, tokio::sync::watch::Receiver<u64>)>,
}

impl ReadSide {
    /// Opens the stores under `db_dir` and starts one worker each, following
    /// the log that `ingest` writes.
    pub fn start(db_dir: &Path, wal_dir: &Path, ingest: &Ingest, defs: Definitions) -> Result<ReadSide, ProjectionError> {
        let kv = Arc::new(KvStore::open(db_dir)?);
        let lenses = Arc::new(LensStore::open(db_dir, defs)?);
        let stores: Vec<Arc<dyn Projection>> = vec![kv.clone(), lenses.clone()];
        let mut workers = Vec::new();
        let mut receivers = Vec::new();
        for p in stores {
            let name = p.name();
            let w = Worker::spawn(p, wal_dir.to_path_buf(), ingest.committed_handle(), ingest.subscribe(), DEFAULT_BATCH)
                .map_err(|e| ProjectionError { projection: name, message: e.to_string() })?;
            receivers.push((name, w.subscribe()));
            workers.push(w);
        }
        Ok(ReadSide { kv, lenses, workers: Mutex::new(workers), receivers })
    }

    /// Applied position and health of every projection.
    pub fn status(&self) -> Vec<ProjectionStatus> {
        let workers = self.workers.lock().map(|w| w.iter().map(|w| (w.name, w.failing())).collect::<Vec<_>>()).unwrap_or_default();
        self.receivers
            .iter()
            .map(|(name, rx)| ProjectionStatus { name, position: *rx.borrow(), failing: workers.iter().any(|(n, f)| n == name && *f) })
            .collect()
    }

    /// Waits until every projection in `names` has applied `position`, or
    /// `timeout` passes; on timeout returns the first lagging projection
    /// and its position.
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
