//! A projection slot: the store readers currently see, and the machinery to
//! replace it with a freshly rebuilt one without readers noticing.
//!
//! Readers take an `Arc` of the current store from an [`ArcSwap`]; a read
//! that started on the old store finishes on it. A rebuild builds a
//! *shadow* store beside the live one (`<file>.shadow`), then hands it to
//! the slot's worker, which catches it up to its own position, makes it
//! durable, renames it over the live file and swaps it in, all between two
//! batches, so no event is applied twice or skipped and no reader ever sees
//! an empty or partial store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{Projection, ProjectionError};

/// Opens a store of type `T` at a path.
pub type Opener<T> = Box<dyn Fn(&Path) -> Result<T, ProjectionError> + Send + Sync>;

/// One projection's current store and its replacement protocol.
pub struct Slot<T: Projection> {
    name: &'static str,
    current: ArcSwap<T>,
    live_path: PathBuf,
    open: Opener<T>,
    handover: Mutex<Option<Arc<T>>>,
    generation: AtomicU64,
    stale: Mutex<Option<String>>,
    /// Wakes the worker when a shadow is handed over.
    pub(crate) wake: tokio::sync::Notify,
}

impl<T: Projection> Slot<T> {
    /// Cleans up what an interrupted rebuild left at `live_path` and opens
    /// the live store.
    pub fn open(name: &'static str, live_path: PathBuf, open: Opener<T>) -> Result<Slot<T>, ProjectionError> {
        let err = |e: std::io::Error| ProjectionError { projection: name, message: format!("{}: {e}", live_path.display()) };
        recover_paths(&live_path).map_err(err)?;
        if let Some(parent) = live_path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let store = open(&live_path)?;
        Ok(Slot {
            name,
            current: ArcSwap::from_pointee(store),
            live_path,
            open,
            handover: Mutex::new(None),
            generation: AtomicU64::new(0),
            stale: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// The projection's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The store readers should use now.
    pub fn load(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Where the live store lives.
    pub fn live_path(&self) -> &Path {
        &self.live_path
    }

    /// Where a rebuild builds its replacement.
    pub fn shadow_path(&self) -> PathBuf {
        sibling(&self.live_path, "shadow")
    }

    /// A fresh, empty shadow store (any earlier shadow is deleted).
    pub fn open_shadow(&self) -> Result<T, ProjectionError> {
        let path = self.shadow_path();
        remove_any(&path).map_err(|e| ProjectionError { projection: self.name, message: format!("{}: {e}", path.display()) })?;
        (self.open)(&path)
    }

    /// Opens a store of this slot's kind at another path (verification).
    pub fn open_at(&self, path: &Path) -> Result<T, ProjectionError> {
        (self.open)(path)
    }

    /// Deletes the shadow store's files (after a cancelled rebuild).
    pub fn discard_shadow(&self) {
        let _ = remove_any(&self.shadow_path());
        let _ = remove_any(&sibling(&self.shadow_path(), "sort"));
    }

    /// Gives a caught-up shadow to the worker, which installs it between
    /// two batches. The caller must hold no other reference to it.
    pub fn hand_over(&self, shadow: Arc<T>) {
        if let Ok(mut h) = self.handover.lock() {
            *h = Some(shadow);
        }
        self.wake.notify_one();
    }

    /// How many shadows have been installed (a rebuild waits for it to move).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Why the live store must not be served, if it must not.
    pub fn stale(&self) -> Option<String> {
        self.stale.lock().ok().and_then(|s| s.clone())
    }

    /// Marks the live store as not to be served (definitions changed).
    pub fn set_stale(&self, why: Option<String>) {
        if let Ok(mut s) = self.stale.lock() {
            *s = why;
        }
    }

    pub(crate) fn take_handover(&self) -> Option<Arc<T>> {
        self.handover.lock().ok().and_then(|mut h| h.take())
    }

    /// Replaces the live store with `shadow` (already caught up and
    /// flushed): closes it, renames its files over the live ones, reopens
    /// them and swaps the new store in for readers.
    pub(crate) fn install(&self, shadow: Arc<T>) -> Result<Arc<T>, ProjectionError> {
        let err = |e: String| ProjectionError { projection: self.name, message: e };
        // The store must be closed before its files move and are reopened.
        let shadow = Arc::try_unwrap(shadow).map_err(|_| err("the shadow store is still in use".into()))?;
        drop(shadow);
        replace_path(&self.shadow_path(), &self.live_path).map_err(|e| err(format!("cannot install the rebuilt store: {e}")))?;
        let store = Arc::new((self.open)(&self.live_path)?);
        self.current.store(store.clone());
        self.set_stale(None);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(store)
    }
}

/// `path` with `.suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) => std::fs::File::open(p)?.sync_all(),
        None => Ok(()),
    }
}

/// Atomically puts `from` in place of `to`. A file is renamed over the
/// old one (atomic). A directory cannot be renamed over a non-empty one,
/// so the old one is first moved to `<to>.old`; [`recover_paths`] finishes
/// the job if a crash interrupts it.
pub fn replace_path(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::metadata(from)?.is_dir() {
        let old = sibling(to, "old");
        remove_any(&old)?;
        if to.exists() {
            std::fs::rename(to, &old)?;
        }
        std::fs::rename(from, to)?;
        sync_parent(to)?;
        remove_any(&old)
    } else {
        std::fs::rename(from, to)?;
        sync_parent(to)
    }
}

/// Undoes or completes an interrupted [`replace_path`] and removes an
/// unfinished shadow, so the live store is always the old one or the new
/// one, never a partial one.
pub fn recover_paths(live: &Path) -> std::io::Result<()> {
    let old = sibling(live, "old");
    if !live.exists() && old.exists() {
        std::fs::rename(&old, live)?;
    }
    remove_any(&old)?;
    // Stores and the sort runs of their bulk loads (`<store>.sort`).
    for leftover in ["verify", "shadow", "sort", "verify.sort", "shadow.sort"] {
        remove_any(&sibling(live, leftover))?;
    }
    Ok(())
}
