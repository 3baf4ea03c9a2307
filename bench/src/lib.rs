//! Shared pieces of the benchmarks: latency recording and reporting.
//!
//! Benchmarks live here, not in tests: they print numbers for
//! `docs/benchmarks.md` and never assert on timing.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, 1 µs to 60 s at 3 significant figures.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid"))
    }
}

impl Latencies {
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// p50 / p95 / p99 in milliseconds.
    pub fn percentiles_ms(&self) -> (f64, f64, f64) {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        (ms(0.50), ms(0.95), ms(0.99))
    }
}

/// One result line: a scenario, its throughput and latency percentiles.
pub fn report(scenario: &str, items_per_sec: f64, unit: &str, latencies: Option<&Latencies>) {
    match latencies {
        Some(l) => {
            let (p50, p95, p99) = l.percentiles_ms();
            println!(
                "{scenario:<44} {items_per_sec:>12.0} {unit}/s   p50 {p50:>7.2} ms   p95 {p95:>7.2} ms   p99 {p99:>7.2} ms"
            );
        }
        None => println!("{scenario:<44} {items_per_sec:>12.0} {unit}/s"),
    }
}
