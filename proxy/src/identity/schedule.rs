//! When to renew and when to retry: pure functions of the certificate's validity and the count
//! of failures, so the tests need no clock.

use std::time::{Duration, SystemTime};

use tandem_crds::identity::RENEW_AT_FRACTION;

/// Half-width of the renewal jitter, as a fraction of the lifetime: renewal lands between 65 %
/// and 75 % of the lifetime, so replicas started together do not renew together.
pub const RENEW_JITTER_FRACTION: f64 = 0.05;
/// First retry delay after a failed attempt.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Shortest wait between two successful renewals, whatever the certificate says (a signer
/// issuing already-stale certificates must not make the proxy spin).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// When to renew a certificate valid from `not_before` to `not_after`: at
/// `RENEW_AT_FRACTION` of its lifetime, moved by `jitter` (in −1..=1, clamped) times
/// [`RENEW_JITTER_FRACTION`] of the lifetime.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let jitter = if jitter.is_finite() {
        jitter.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let fraction = (RENEW_AT_FRACTION + jitter * RENEW_JITTER_FRACTION).clamp(0.0, 1.0);
    not_before + lifetime.mul_f64(fraction)
}

/// How long to sleep from `now` until `renew_at`, at least [`MIN_RENEWAL_INTERVAL`].
pub fn renewal_delay(renew_at: SystemTime, now: SystemTime) -> Duration {
    renew_at
        .duration_since(now)
        .unwrap_or_default()
        .max(MIN_RENEWAL_INTERVAL)
}

/// The backoff after `failures` consecutive failures (1 → 1 s, 2 → 2 s, 3 → 4 s, … capped at
/// [`BACKOFF_MAX`]).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_MIN
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// How long to wait before the next attempt after `failures` consecutive failures, while the
/// certificate in hand expires at `expiry`: the backoff, but never past the expiry, so one
/// attempt lands at the last moment the current certificate is still valid.
pub fn retry_delay(failures: u32, now: SystemTime, expiry: Option<SystemTime>) -> Duration {
    let delay = backoff(failures);
    match expiry.and_then(|expiry| expiry.duration_since(now).ok()) {
        Some(left) if !left.is_zero() => delay.min(left),
        _ => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_lands_at_seventy_percent_of_the_lifetime_without_jitter() {
        assert_eq!(renewal_time(at(1_000), at(2_000), 0.0), at(1_700));
    }

    #[test]
    fn jitter_moves_renewal_by_at_most_five_percent_of_the_lifetime() {
        assert_eq!(renewal_time(at(0), at(1_000), 1.0), at(750));
        assert_eq!(renewal_time(at(0), at(1_000), -1.0), at(650));
        assert_eq!(renewal_time(at(0), at(1_000), 7.0), at(750));
        assert_eq!(renewal_time(at(0), at(1_000), f64::NAN), at(700));
        for i in 0..=100 {
            let jitter = f64::from(i) / 50.0 - 1.0;
            let t = renewal_time(at(0), at(86_400), jitter);
            assert!(t >= at(56_160) && t <= at(64_800), "{t:?}");
        }
    }

    #[test]
    fn a_certificate_ending_before_it_starts_is_renewed_at_once() {
        assert_eq!(renewal_time(at(2_000), at(1_000), 0.0), at(2_000));
        assert_eq!(renewal_delay(at(2_000), at(5_000)), MIN_RENEWAL_INTERVAL);
    }

    #[test]
    fn a_renewal_in_the_future_is_slept_until() {
        assert_eq!(renewal_delay(at(100), at(40)), Duration::from_secs(60));
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(0), BACKOFF_MIN);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn a_retry_never_sleeps_past_the_certificates_expiry() {
        // 60 s backoff, but the certificate expires in 5 s: try again at expiry.
        assert_eq!(
            retry_delay(10, at(100), Some(at(105))),
            Duration::from_secs(5)
        );
        // Already expired, or no certificate: plain backoff.
        assert_eq!(retry_delay(10, at(200), Some(at(105))), BACKOFF_MAX);
        assert_eq!(retry_delay(2, at(200), None), Duration::from_secs(2));
    }
}
