//! Logging and metrics setup, done once per process.
//!
//! Metric names are declared here with their help text and histogram
//! buckets so that `/metrics` is self-describing and histograms are real
//! Prometheus histograms (not summaries) that alert rules can aggregate.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the tracing subscriber (`RUST_LOG`, default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0];

/// Installs the global Prometheus recorder and returns the handle that
/// renders `/metrics`.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("stemedb_wal_group_commit_size".into()), SIZE_BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!("stemedb_assertions_total", "Assertions appended to the log");
    metrics::describe_counter!("stemedb_events_total", "Events (assertions and retractions) appended to the log");
    metrics::describe_histogram!("stemedb_wal_fsync_latency_seconds", metrics::Unit::Seconds, "Duration of one WAL fdatasync");
    metrics::describe_histogram!("stemedb_wal_group_commit_size", "Events made durable by one group commit");
    metrics::describe_gauge!("stemedb_wal_position", "Highest durable log position");
    metrics::describe_counter!("stemedb_http_requests_total", "HTTP requests by route and status");
    metrics::describe_histogram!("stemedb_http_request_duration_seconds", metrics::Unit::Seconds, "HTTP request latency by route");
    metrics::describe_histogram!(
        "stemedb_search_latency_seconds",
        metrics::Unit::Seconds,
        "Search time, from taking a slot to the ranked page (queue wait excluded)"
    );
    metrics::describe_histogram!(
        "stemedb_search_queue_seconds",
        metrics::Unit::Seconds,
        "Time a search waited for one of STEMEDB_SEARCH_THREADS slots"
    );
    metrics::describe_gauge!("stemedb_search_index_docs", "Documents in the committed search index");
    // Make the counters visible at 0 before the first write.
    metrics::counter!("stemedb_assertions_total").absolute(0);
    metrics::counter!("stemedb_events_total").absolute(0);
    Ok(handle)
}
