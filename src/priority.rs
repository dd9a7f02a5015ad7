//! Background threads yield the CPU to the threads clients wait for.
//!
//! On a small machine the threads that acknowledge a write (HTTP, the WAL
//! committer) and make it visible (the kv and lenses workers and their
//! committers) share the cores with the search index: tantivy's indexing
//! threads and its merges, which come in bursts of whole cores. At 2,000
//! writes/s the WAL's fsync p99 was ~5 ms but the acknowledgement's ~24 ms:
//! the rest was waiting for a core. The search worker and every thread
//! tantivy starts therefore run `STEMEDB_BACKGROUND_NICE` (default 10) nice
//! levels below the process, so the scheduler prefers the foreground
//! whenever both want a core; alone, indexing still gets all of it.
//!
//! The kv and lenses committers are *not* lowered, although nobody waits
//! for a commit directly: staging is bounded, so a starved committer stops
//! its worker, and at 10,000 writes/s (the cores saturated) lowering them
//! took the write → visible p99 from ~0.2 s to 1.8–2.6 s. The id indexer
//! is not lowered either: until it catches up, ids wait in memory.
//!
//! Linux applies nice values per thread, and a thread inherits its
//! creator's: lowering a thread also lowers every thread it starts later.
//! Elsewhere this does nothing.

use std::sync::OnceLock;

/// How many nice levels background threads run below the process.
pub const DEFAULT_BACKGROUND_NICE: i32 = 10;

/// [`DEFAULT_BACKGROUND_NICE`], or `STEMEDB_BACKGROUND_NICE` (0 to 19; 0
/// turns the lowering off). A bad value is reported and ignored: priority
/// is an optimization, never a reason not to start.
pub fn background_nice() -> i32 {
    static NICE: OnceLock<i32> = OnceLock::new();
    *NICE.get_or_init(|| match std::env::var("STEMEDB_BACKGROUND_NICE") {
        Err(_) => DEFAULT_BACKGROUND_NICE,
        Ok(v) => match v.trim().parse::<i32>() {
            Ok(n) if (0..=19).contains(&n) => n,
            _ => {
                tracing::warn!(value = %v, "STEMEDB_BACKGROUND_NICE must be 0 to 19; using {DEFAULT_BACKGROUND_NICE}");
                DEFAULT_BACKGROUND_NICE
            }
        },
    })
}

/// Lowers the calling thread's CPU priority by [`background_nice`] levels
/// (at most to nice 19). Call it first thing in a background thread.
pub fn lower_current_thread() {
    lower_by(background_nice());
}

/// Runs `f` on a new thread at background priority and waits for it: the
/// threads `f` starts inherit the lower priority (tantivy starts its own).
pub fn in_background<T: Send>(f: impl FnOnce() -> T + Send) -> std::thread::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            lower_current_thread();
            f()
        })
        .join()
    })
}

#[cfg(target_os = "linux")]
fn lower_by(levels: i32) {
    use rustix::process::{getpriority_process, setpriority_process};
    if levels == 0 {
        return;
    }
    // `None` is the calling thread on Linux.
    let result = getpriority_process(None).and_then(|now| setpriority_process(None, (now + levels).min(19)));
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot lower a background thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_by(_levels: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn current_nice() -> Option<i32> {
        rustix::process::getpriority_process(None).ok()
    }

    /// Lowering one thread leaves its creator alone, and a thread it
    /// starts afterwards inherits the lower priority.
    #[cfg(target_os = "linux")]
    #[test]
    fn lowers_only_the_calling_thread_and_its_children() {
        let before = current_nice().expect("nice");
        let (lowered, child) = std::thread::spawn(|| {
            lower_by(3);
            let lowered = current_nice().expect("nice");
            let child = std::thread::spawn(|| current_nice().expect("nice")).join().expect("child");
            (lowered, child)
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before + 3).min(19));
        assert_eq!(child, lowered);
        assert_eq!(current_nice().expect("nice"), before, "the creator keeps its priority");
    }
}
