//! Latency histograms of atomics, with the bucket bounds `/metrics` declares.

use super::get;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histograms, in seconds.
pub(super) const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram: per-bucket counts (the last is +Inf), count and sum.
#[derive(Debug, Default)]
pub(super) struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one latency.
    pub(super) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The buckets as Prometheus reads them, by upper bound (`+Inf` last), not cumulative.
    pub(super) fn buckets(&self) -> Vec<(f64, u64)> {
        BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(get))
            .collect()
    }

    /// How many latencies were counted.
    pub(super) fn count(&self) -> u64 {
        get(&self.count)
    }

    /// Their sum, in seconds.
    pub(super) fn sum_secs(&self) -> f64 {
        get(&self.sum_micros) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        for ms in [0, 1, 2, 30_000] {
            h.observe(Duration::from_millis(ms));
        }
        let counted: Vec<(f64, u64)> = h.buckets().into_iter().filter(|b| b.1 > 0).collect();
        assert_eq!(
            counted,
            [(0.0005, 1), (0.001, 1), (0.0025, 1), (f64::INFINITY, 1)]
        );
        assert_eq!(h.count(), 4);
        assert!((h.sum_secs() - 30.003).abs() < 1e-9);
    }
}
