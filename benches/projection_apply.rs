//! Projection apply throughput: events per second that the `kv` and
//! `lenses` stores absorb in 10,000-event batches (what catch-up and
//! rebuild are bound by). Each batch is applied (staged in memory) and
//! flushed (written by the store's committer thread and synced), so the
//! time is the whole path to the store file, not only the staging.
//!
//! Run: `cargo bench --bench projection_apply`. Results: docs/performance.md.

use std::time::Duration;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stemedb::lens::Definitions;
use stemedb::model::{Assertion, Event, LogRecord, Object, Source, Tier};
use stemedb::projection::Projection;
use stemedb::projection::kv::KvStore;
use stemedb::projection::lenses::LensStore;

const BATCH: u64 = 10_000;

fn record(position: u64) -> LogRecord {
    let pair = position / 10;
    let assertion = Assertion {
        subject: format!("drug:{pair}"),
        predicate: "max_daily_dose_mg".into(),
        object: Object::Integer(1000 + (position % 3) as i64),
        confidence: Some(0.8),
        agent: format!("agent-{}", position % 10),
        signature: None,
        source: Some(Source { uri: format!("https://example.org/{position}"), tier: Some(Tier::ALL[(position % 6) as usize]), hash: None }),
        valid_time: None,
        supersedes: Vec::new(),
    };
    LogRecord { position, recorded_at: Utc::now(), event: Event::AssertionRecorded { id: assertion.id(), assertion } }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("projection_apply");
    g.measurement_time(Duration::from_secs(10)).sample_size(10).throughput(Throughput::Elements(BATCH));
    let dir = tempfile::tempdir().expect("tempdir");
    let stores: Vec<(&str, Box<dyn Projection>)> = vec![
        ("kv", Box::new(KvStore::open(&dir.path().join("kv.redb")).expect("kv"))),
        ("lenses", Box::new(LensStore::open(&dir.path().join("lenses.redb"), Definitions::default()).expect("lenses"))),
    ];
    for (name, store) in stores {
        let mut next = 1u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let batch: Vec<LogRecord> = (next..next + BATCH).map(record).collect();
                    next += BATCH;
                    batch
                },
                |batch| {
                    store.apply(&batch).expect("apply");
                    store.flush().expect("flush")
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
