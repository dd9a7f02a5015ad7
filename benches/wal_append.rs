//! WAL append throughput: frames per second for single-event and 1,000-event
//! groups, with and without fdatasync, measured on the real WalWriter.
//!
//! Run: `cargo bench --bench wal_append`. Results: docs/performance.md.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use stemedb::model::{Assertion, Event, Object};
use stemedb::wal::{SyncMode, WalWriter, WriterOptions};

fn event(i: u64) -> Event {
    let assertion = Assertion {
        subject: format!("drug:{}", i % 10_000),
        predicate: "max_daily_dose_mg".into(),
        object: Object::Text(format!("observed in cohort {i} with significant adverse renal response")),
        confidence: Some(0.8),
        agent: format!("agent-{}", i % 200),
        signature: None,
        source: None,
        valid_time: None,
        supersedes: Vec::new(),
    };
    Event::AssertionRecorded { id: assertion.id(), assertion }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    for (sync, name) in [(SyncMode::Never, "nosync"), (SyncMode::Always, "fdatasync")] {
        for group in [1usize, 1000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (mut w, _) = WalWriter::open(dir.path(), WriterOptions { segment_bytes: 64 << 20, sync }).expect("open wal");
            let mut i = 0u64;
            g.throughput(Throughput::Elements(group as u64));
            g.bench_with_input(BenchmarkId::new(name, group), &group, |b, &group| {
                b.iter(|| {
                    let events: Vec<Event> = (0..group)
                        .map(|_| {
                            i += 1;
                            event(i)
                        })
                        .collect();
                    let t = w.next_recorded_at();
                    w.append(events, t).expect("append");
                    w.commit().expect("commit")
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
