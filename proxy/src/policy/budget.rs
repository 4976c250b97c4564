//! The retry budget: retries may add at most `ratio` of the request load over a sliding window,
//! plus a floor of `minRetriesPerSecond` so that a quiet service can still retry (the semantics
//! of Finagle's and Linkerd's `RetryBudget`).
//!
//! The window is cut into [`BUCKETS`] buckets. Each bucket is one `AtomicU64` per counter that
//! packs the bucket's epoch (high 32 bits) with its count (low 32 bits), so a request records
//! itself with one compare-and-swap and a bucket that has aged out resets itself in the same
//! operation: no lock, no background task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::sources::{Nanos, duration_nanos};

/// Buckets per window: the window slides in steps of a tenth of its length.
pub const BUCKETS: usize = 10;

/// The budget used when a service retries but its config names no budget: Linkerd's
/// ServiceProfile defaults (20 % extra load, 10 retries per second, 10 s window). Retries are
/// never unbounded, so they cannot turn a small outage into a large one.
pub const DEFAULT_RATIO: f64 = 0.2;
/// See [`DEFAULT_RATIO`].
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// See [`DEFAULT_RATIO`].
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Requests and retries counted over a sliding window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries always allowed per window: `min_retries_per_second × window`.
    reserve: f64,
    window: Window,
    /// Retries granted, ever.
    retries_total: AtomicU64,
    /// Retries refused because the budget was spent, ever.
    exhausted_total: AtomicU64,
}

impl RetryBudget {
    /// A budget with these parameters.
    pub fn new(ratio: f64, min_retries_per_second: u32, window: Duration) -> Self {
        let window = window.max(Duration::from_millis(BUCKETS as u64));
        Self {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            reserve: f64::from(min_retries_per_second) * window.as_secs_f64(),
            window: Window::new(window),
            retries_total: AtomicU64::new(0),
            exhausted_total: AtomicU64::new(0),
        }
    }

    /// Linkerd's defaults ([`DEFAULT_RATIO`]).
    pub fn default_budget() -> Self {
        Self::new(
            DEFAULT_RATIO,
            DEFAULT_MIN_RETRIES_PER_SECOND,
            DEFAULT_WINDOW,
        )
    }

    /// Whether `self` was built with these parameters (so a reload can keep its counts).
    pub fn same_parameters(&self, other: &Self) -> bool {
        self.ratio.to_bits() == other.ratio.to_bits()
            && self.reserve.to_bits() == other.reserve.to_bits()
            && self.window.bucket == other.window.bucket
    }

    /// Records an original request (not a retry); each one earns `ratio` of a retry.
    pub fn deposit(&self, now: Nanos) {
        self.window.add(&self.window.requests, now);
    }

    /// Spends one retry if the budget allows it; counts the retry or the refusal.
    ///
    /// Concurrent callers may overshoot the budget by at most one retry each, because the
    /// check and the spend are two atomic operations; a budget is a bound on load, and that
    /// slack is far below what it protects against.
    pub fn try_withdraw(&self, now: Nanos) -> bool {
        let requests = self.window.sum(&self.window.requests, now);
        let retries = self.window.sum(&self.window.retries, now);
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let allowed = self.ratio * requests as f64 + self.reserve;
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let granted = (retries as f64) + 1.0 <= allowed;
        if granted {
            self.window.add(&self.window.retries, now);
            self.retries_total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.exhausted_total.fetch_add(1, Ordering::Relaxed);
        }
        granted
    }

    /// Retries granted since the budget was created (carried across reloads).
    pub fn retries_total(&self) -> u64 {
        self.retries_total.load(Ordering::Relaxed)
    }

    /// Retries refused by the budget since it was created.
    pub fn exhausted_total(&self) -> u64 {
        self.exhausted_total.load(Ordering::Relaxed)
    }

    /// Carries the lifetime counters of a budget this one replaces.
    pub(crate) fn inherit_totals(&self, previous: &Self) {
        self.retries_total
            .store(previous.retries_total(), Ordering::Relaxed);
        self.exhausted_total
            .store(previous.exhausted_total(), Ordering::Relaxed);
    }

    /// Carries the window counts too, when the window has the same shape.
    pub(crate) fn inherit_window(&self, previous: &Self) {
        if self.window.bucket != previous.window.bucket {
            return;
        }
        for (mine, theirs) in [
            (&self.window.requests, &previous.window.requests),
            (&self.window.retries, &previous.window.retries),
        ] {
            for (m, t) in mine.iter().zip(theirs.iter()) {
                m.store(t.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }
}

/// Two rows of epoch-stamped buckets.
#[derive(Debug)]
struct Window {
    /// Length of one bucket in nanoseconds.
    bucket: u64,
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            bucket: (duration_nanos(window) / BUCKETS as u64).max(1),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            retries: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The bucket epoch of `now`. Truncated to 32 bits: comparisons use wrapping arithmetic, and
    /// even 1 ms buckets take 49 days to wrap, far longer than a window.
    fn epoch(&self, now: Nanos) -> u32 {
        #[allow(clippy::cast_possible_truncation, reason = "wrapping epoch, see above")]
        let e = (now.0 / self.bucket) as u32;
        e
    }

    fn add(&self, row: &[AtomicU64; BUCKETS], now: Nanos) {
        let epoch = self.epoch(now);
        let cell = &row[epoch as usize % BUCKETS];
        // A stale epoch in the cell means the bucket aged out: start it again at 1.
        let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
            let (e, count) = unpack(packed);
            Some(if e == epoch {
                pack(e, count.saturating_add(1))
            } else {
                pack(epoch, 1)
            })
        });
    }

    fn sum(&self, row: &[AtomicU64; BUCKETS], now: Nanos) -> u64 {
        let epoch = self.epoch(now);
        row.iter()
            .map(|cell| unpack(cell.load(Ordering::Acquire)))
            .filter(|&(e, _)| (epoch.wrapping_sub(e) as usize) < BUCKETS)
            .map(|(_, count)| u64::from(count))
            .sum()
    }
}

fn pack(epoch: u32, count: u32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(count)
}

fn unpack(packed: u64) -> (u32, u32) {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "splitting the packed halves"
    )]
    let parts = ((packed >> 32) as u32, packed as u32);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sources::{Clock, ManualClock};

    #[test]
    fn budget_stops_a_retry_storm_at_the_ratio() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        let mut granted = 0;
        // 1,000 requests in one second, every one failing and asking for a retry.
        for _ in 0..1_000 {
            clock.advance(Duration::from_millis(1));
            budget.deposit(clock.now());
            if budget.try_withdraw(clock.now()) {
                granted += 1;
            }
        }
        assert_eq!(granted, 200, "20 % of 1,000 requests");
        assert_eq!(budget.retries_total(), 200);
        assert_eq!(budget.exhausted_total(), 800);
    }

    #[test]
    fn the_floor_allows_retries_when_traffic_is_quiet() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        // Two requests: 0.4 retries from the ratio, 10 from the floor (1/s over 10 s).
        budget.deposit(clock.now());
        budget.deposit(clock.now());
        let granted = (0..20).filter(|_| budget.try_withdraw(clock.now())).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn spent_budget_returns_as_the_window_slides() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(0.5, 0, Duration::from_secs(1));
        for _ in 0..10 {
            budget.deposit(clock.now());
        }
        assert_eq!(
            (0..10).filter(|_| budget.try_withdraw(clock.now())).count(),
            5
        );
        assert!(!budget.try_withdraw(clock.now()), "spent");
        // A full window later the old requests and retries have aged out together.
        clock.advance(Duration::from_millis(1_100));
        assert!(!budget.try_withdraw(clock.now()), "no requests, no floor");
        budget.deposit(clock.now());
        budget.deposit(clock.now());
        assert!(
            budget.try_withdraw(clock.now()),
            "fresh requests earn fresh retries"
        );
    }

    #[test]
    fn a_ratio_of_zero_and_no_floor_refuses_every_retry() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(0.0, 0, Duration::from_secs(10));
        for _ in 0..100 {
            budget.deposit(clock.now());
        }
        assert!(!budget.try_withdraw(clock.now()));
    }

    #[test]
    fn buckets_older_than_the_window_do_not_count() {
        let clock = ManualClock::new();
        let window = Window::new(Duration::from_secs(1));
        window.add(&window.requests, clock.now());
        clock.advance(Duration::from_millis(500));
        window.add(&window.requests, clock.now());
        assert_eq!(window.sum(&window.requests, clock.now()), 2);
        clock.advance(Duration::from_millis(600));
        assert_eq!(window.sum(&window.requests, clock.now()), 1);
        clock.advance(Duration::from_secs(5));
        assert_eq!(window.sum(&window.requests, clock.now()), 0);
    }
}
