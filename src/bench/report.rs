//! Latency histograms and the summary a load run prints.

use hdrhistogram::Histogram;
use serde_json::json;

/// A latency recorder in microseconds (1 µs to 60 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants within hdrhistogram's limits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Prints a human line and a JSON line for a finished run.
pub fn print(name: &str, ops: u64, items: u64, errors: u64, secs: f64, h: &Histogram<u64>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: {ops} requests ({items} items) in {secs:.1}s = {:.0} req/s, {:.0} items/s, {errors} errors; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        ops as f64 / secs,
        items as f64 / secs,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    println!(
        "{}",
        json!({
            "bench": name, "requests": ops, "items": items, "errors": errors, "seconds": secs,
            "requests_per_sec": ops as f64 / secs, "items_per_sec": items as f64 / secs,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0}
        })
    );
}
