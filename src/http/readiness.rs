//! When `/v1/ready` calls a projection lagging.
//!
//! Counting only events behind the head made a busy, healthy server flap:
//! the search index becomes visible at commits on a cadence (every 500 ms
//! by default), so at 10,000 writes/s it is routinely 5,000–10,000 events
//! behind between two commits, and a bulk load of one 10,000-assertion
//! batch puts every projection that far behind for a moment. A load
//! balancer then took the only writer out of rotation during exactly the
//! load it was built for.
//!
//! What a reader cares about is staleness in time. So a projection is
//! compared not with the head now but with the head as it stood
//! `STEMEDB_READY_MAX_DELAY` ago: it is lagging when it is more than
//! `STEMEDB_READY_MAX_LAG` events behind *that*, i.e. when events
//! committed longer ago than the delay are still missing from it. A
//! projection that is stuck, or catching up after a restart or a rebuild,
//! still fails; a delay of 0 restores the plain event count.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the head is sampled: the resolution of the delay.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The readiness rule and the recent heads it needs.
pub struct Readiness {
    max_lag: u64,
    max_delay: Duration,
    /// (when, head) samples, oldest first; kept just long enough to answer
    /// for `now - max_delay`.
    heads: Mutex<VecDeque<(Instant, u64)>>,
}

impl Readiness {
    /// A projection is ready while it is at most `max_lag` events behind
    /// the head of `max_delay` ago.
    pub fn new(max_lag: u64, max_delay: Duration) -> Readiness {
        Readiness { max_lag, max_delay, heads: Mutex::new(VecDeque::new()) }
    }

    /// The configured event allowance (reported in the 503).
    pub fn max_lag(&self) -> u64 {
        self.max_lag
    }

    /// The configured delay (reported in the 503).
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Records that the head was `head` at `now`. Samples arrive every
    /// [`SAMPLE_EVERY`]; the ones no answer can need any more are dropped.
    pub fn observe(&self, now: Instant, head: u64) {
        let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        heads.push_back((now, head));
        // Keep the newest sample at or before the cutoff, and everything after it.
        if let Some(cutoff) = now.checked_sub(self.max_delay) {
            while heads.get(1).is_some_and(|(t, _)| *t <= cutoff) {
                heads.pop_front();
            }
        }
    }

    /// The head projections are held to at `now`: the newest sample taken
    /// at least the delay ago. Until the server has run that long, the
    /// oldest sample (the head at start, which a restarted projection must
    /// catch up with). With no sample at all, `head`.
    pub fn reference(&self, now: Instant, head: u64) -> u64 {
        if self.max_delay.is_zero() {
            return head;
        }
        let heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        let cutoff = now.checked_sub(self.max_delay);
        let due = heads.iter().rev().find(|(t, _)| cutoff.is_some_and(|c| *t <= c));
        due.or(heads.front()).map_or(head, |(_, h)| (*h).min(head))
    }

    /// Whether a projection at `position` lags the `reference` head.
    pub fn lagging(&self, reference: u64, position: u64) -> bool {
        reference.saturating_sub(position) > self.max_lag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_projection_is_held_to_the_head_of_the_delay_ago() {
        let r = Readiness::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        for (ms, head) in [(0, 100), (500, 5_000), (1_000, 10_000), (1_500, 15_000)] {
            r.observe(at(t0, ms), head);
        }
        // At 1.5 s the head of 1 s ago (0.5 s) was 5,000.
        let reference = r.reference(at(t0, 1_500), 15_000);
        assert_eq!(reference, 5_000);
        assert!(!r.lagging(reference, 4_990), "10 behind the head of 1 s ago is allowed");
        assert!(r.lagging(reference, 4_989), "11 behind is not");
        // 10,000 events behind the head now, but none of them older than 1 s: ready.
        assert!(!r.lagging(reference, 5_000));
    }

    #[test]
    fn before_the_delay_has_passed_the_head_at_start_counts() {
        let r = Readiness::new(0, Duration::from_secs(2));
        let t0 = Instant::now();
        r.observe(t0, 1_000);
        r.observe(at(t0, 100), 1_200);
        // A projection restarting at 0 must catch up with the log it started with.
        let reference = r.reference(at(t0, 100), 1_200);
        assert_eq!(reference, 1_000);
        assert!(r.lagging(reference, 0));
        assert!(!r.lagging(reference, 1_000));
        // Nothing sampled yet: the head itself.
        assert_eq!(Readiness::new(0, Duration::from_secs(2)).reference(t0, 7), 7);
    }

    #[test]
    fn no_delay_is_the_plain_event_count() {
        let r = Readiness::new(5, Duration::ZERO);
        let t0 = Instant::now();
        r.observe(t0, 1);
        assert_eq!(r.reference(at(t0, 10), 100), 100);
        assert!(r.lagging(100, 94));
        assert!(!r.lagging(100, 95));
    }

    #[test]
    fn old_samples_are_dropped_but_the_one_answering_the_cutoff_stays() {
        let r = Readiness::new(0, Duration::from_millis(300));
        let t0 = Instant::now();
        for i in 0..100u64 {
            r.observe(at(t0, i * 100), i);
        }
        let kept = r.heads.lock().map(|h| h.len()).unwrap_or(0);
        assert!(kept <= 5, "kept {kept} samples for a 300 ms delay");
        assert_eq!(r.reference(at(t0, 9_900), 99), 96);
    }

    #[test]
    fn the_reference_never_exceeds_the_head_now() {
        // A follower re-initialised from an older archive can move its head back.
        let r = Readiness::new(0, Duration::from_millis(100));
        let t0 = Instant::now();
        r.observe(t0, 500);
        assert_eq!(r.reference(at(t0, 1_000), 20), 20);
    }
}
