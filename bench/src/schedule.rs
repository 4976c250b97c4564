//! The open-loop schedule: when each request of a constant-rate run is *meant* to be sent.
//!
//! Latency in an open-loop run is measured from these intended times, not from the moment a
//! connection happened to be free, so a stall shows up in every request it delayed (no
//! coordinated omission).

use std::time::Duration;

/// Number of requests a constant-rate run of `rate` requests/second sends in `length`.
pub fn total_requests(rate: u64, length: Duration) -> u64 {
    let nanos = length.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000;
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

/// Offset from the run's start at which request number `index` (from 0) is due, at `rate`
/// requests/second. A rate of 0 yields no schedule: every offset is zero.
pub fn intended_offset(index: u64, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(index) * 1_000_000_000 / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_evenly_spaced_at_the_given_rate() {
        assert_eq!(intended_offset(0, 1_000), Duration::ZERO);
        assert_eq!(intended_offset(1, 1_000), Duration::from_millis(1));
        assert_eq!(intended_offset(2_500, 5_000), Duration::from_millis(500));
        assert_eq!(intended_offset(3, 3), Duration::from_secs(1));
    }

    #[test]
    fn a_run_sends_rate_times_seconds_requests() {
        assert_eq!(total_requests(1_000, Duration::from_secs(10)), 10_000);
        assert_eq!(total_requests(5_000, Duration::from_millis(1_500)), 7_500);
        assert_eq!(total_requests(0, Duration::from_secs(10)), 0);
    }

    #[test]
    fn the_last_request_is_due_before_the_run_ends() {
        let length = Duration::from_secs(2);
        let n = total_requests(1_000, length);
        assert!(intended_offset(n - 1, 1_000) < length);
    }

    #[test]
    fn a_zero_rate_has_no_spacing() {
        assert_eq!(intended_offset(7, 0), Duration::ZERO);
    }
}
