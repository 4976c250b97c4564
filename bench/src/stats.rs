//! Percentiles, spreads over rounds and ratios: the arithmetic every figure in the report
//! goes through.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest latency seen.
    pub max: f64,
    /// Requests that completed with a 2xx status.
    pub ok: u64,
    /// Requests that failed (connection error, timeout or non-2xx status).
    pub errors: u64,
}

/// The percentiles a summary holds, in the order charts and tables show them.
pub const PERCENTILE_LABELS: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

impl LatencySummary {
    /// Summarises a histogram recorded in microseconds.
    pub fn from_micros(histogram: &Histogram<u64>, errors: u64) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
        Self {
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1_000.0,
            ok: histogram.len(),
            errors,
        }
    }

    /// The percentiles in [`PERCENTILE_LABELS`] order.
    pub fn percentiles(&self) -> [f64; 5] {
        [self.p50, self.p90, self.p99, self.p999, self.max]
    }
}

/// Median and range of one figure over the rounds of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Median over the rounds (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of rounds.
    pub rounds: usize,
}

impl Spread {
    /// The spread of `values`; `None` when there are none (NaNs are ignored).
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            rounds: n,
        })
    }
}

/// `value / base`, or `None` when the base is not positive.
pub fn ratio(value: f64, base: f64) -> Option<f64> {
    (base > 0.0 && value.is_finite()).then(|| value / base)
}

/// Values of two series paired by round, combined with `f`, skipping rounds either lacks.
pub fn paired(
    a: &[Option<f64>],
    b: &[Option<f64>],
    f: impl Fn(f64, f64) -> Option<f64>,
) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| f((*x)?, (*y)?))
        .collect()
}

/// CPU seconds spent per 10,000 requests; `None` when no request completed.
pub fn cpu_seconds_per_10k(cpu_seconds: f64, requests: u64) -> Option<f64> {
    (requests > 0).then(|| cpu_seconds / requests as f64 * 10_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1_000u64 {
            h.record(us * 10).unwrap();
        }
        let s = LatencySummary::from_micros(&h, 2);
        assert!((s.p50 - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p90 - 9.0).abs() < 0.01, "{s:?}");
        assert!((s.p99 - 9.9).abs() < 0.01, "{s:?}");
        assert!((s.max - 10.0).abs() < 0.01, "{s:?}");
        assert_eq!((s.ok, s.errors), (1_000, 2));
    }

    #[test]
    fn spread_gives_median_and_range() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0, 5.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.rounds), (3.0, 1.0, 10.0, 5));
        let even = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_refuse_a_zero_base() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }

    #[test]
    fn pairing_skips_rounds_missing_on_either_side() {
        let a = [Some(2.0), None, Some(6.0)];
        let b = [Some(1.0), Some(1.0), Some(2.0)];
        assert_eq!(paired(&a, &b, ratio), vec![2.0, 3.0]);
        assert_eq!(paired(&a, &b, |x, y| Some(x - y)), vec![1.0, 4.0]);
    }

    #[test]
    fn cpu_cost_is_scaled_to_ten_thousand_requests() {
        assert_eq!(cpu_seconds_per_10k(1.5, 30_000), Some(0.5));
        assert_eq!(cpu_seconds_per_10k(1.0, 0), None);
    }
}
