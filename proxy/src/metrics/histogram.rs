//! A histogram recorded with atomic adds only.
//!
//! prometheus-client's `Histogram` keeps its buckets behind a `RwLock` and takes the write lock
//! for every observation; on the request path of a proxy serving thousands of requests at once
//! that is a contended lock per request. Here each bucket is its own `AtomicU64`, values are
//! recorded in integer units (nanoseconds, attempts) so the sum is an atomic add too, and the
//! count is the sum of the buckets, read at scrape time, so count and buckets always agree.

use std::iter::once;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Envoy's default buckets (what Istio's `request_duration_milliseconds` uses), in
/// microseconds: 0.5 ms to one hour.
const DURATION_BOUNDS_US: [u64; 19] = [
    500,
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    600_000_000,
    1_800_000_000,
    3_600_000_000,
];

/// Istio's size buckets (`request_bytes`, `response_bytes`): powers of ten, 1 B to 1 GB.
const BYTES_BOUNDS: [u64; 10] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

/// Upper bounds of the attempts-per-request buckets.
const ATTEMPT_BOUNDS: [u64; 5] = [1, 2, 3, 4, 5];

/// A lock-free histogram with fixed bucket bounds.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<Cells>);

#[derive(Debug)]
struct Cells {
    /// Inclusive upper bounds in units, ascending; one more bucket (+Inf) follows.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// Sum of observations in units.
    sum: AtomicU64,
    /// Units per exported unit (1e9 for nanoseconds exported as seconds).
    per_unit: f64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [u64], per_unit: f64) -> Self {
        Self(Arc::new(Cells {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            per_unit,
        }))
    }

    /// Request duration, recorded in microseconds and exported in milliseconds over Envoy's
    /// buckets.
    pub fn duration_ms() -> Self {
        Self::new(&DURATION_BOUNDS_US, 1e3)
    }

    /// Body sizes in bytes, over Istio's powers of ten.
    pub fn bytes() -> Self {
        Self::new(&BYTES_BOUNDS, 1.0)
    }

    /// Attempts per request (1 to 5, then +Inf).
    pub fn attempts() -> Self {
        Self::new(&ATTEMPT_BOUNDS, 1.0)
    }

    /// Records one observation of `units`.
    pub fn observe(&self, units: u64) {
        let bucket = self.0.bounds.partition_point(|&bound| bound < units);
        if let Some(count) = self.0.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.0.sum.fetch_add(units, Ordering::Relaxed);
    }

    /// Records a duration (for histograms in nanoseconds).
    pub fn observe_duration(&self, elapsed: std::time::Duration) {
        self.observe(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Observations per bucket as prometheus-client encodes them: (upper bound, count).
    fn buckets(&self) -> Vec<(f64, u64)> {
        let bounds = self.0.bounds.iter().map(|&b| b as f64 / self.0.per_unit);
        bounds
            .chain(once(f64::MAX))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum.load(Ordering::Relaxed) as f64 / self.0.per_unit;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_whose_bound_covers_it() {
        let h = AtomicHistogram::attempts();
        h.observe(1);
        h.observe(2);
        h.observe(2);
        h.observe(9);
        let counts: Vec<u64> = h.buckets().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [1, 2, 0, 0, 0, 1]);
        assert_eq!(h.0.sum.load(Ordering::Relaxed), 14);
    }

    #[test]
    fn durations_are_exported_in_milliseconds_over_envoys_buckets() {
        let h = AtomicHistogram::duration_ms();
        h.observe(700); // µs
        let buckets = h.buckets();
        assert_eq!(buckets.first().map(|b| b.0), Some(0.5));
        assert_eq!(buckets.get(18).map(|b| b.0), Some(3_600_000.0));
        assert_eq!(buckets.last().map(|b| b.0), Some(f64::MAX));
        // 0.7 ms is above 0.5 ms and within 1 ms.
        assert_eq!(buckets.get(1).map(|b| b.1), Some(1));
    }

    #[test]
    fn the_text_encoding_is_cumulative_and_counts_every_observation() {
        let mut registry = prometheus_client::registry::Registry::default();
        let h = AtomicHistogram::attempts();
        registry.register("attempts", "test", h.clone());
        h.observe(1);
        h.observe(3);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("attempts_bucket{le=\"2.0\"} 1"), "{out}");
        assert!(out.contains("attempts_bucket{le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("attempts_count 2"), "{out}");
        assert!(out.contains("attempts_sum 4.0"), "{out}");
    }
}
