//! Where the policy engine gets time and randomness.
//!
//! Both are injected so that every decision is reproducible in a unit test: tests drive a
//! [`ManualClock`] and a seeded [`SeededRandom`]; the proxy uses [`MonotonicClock`] and
//! [`ThreadRandom`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A point in time: nanoseconds since the clock's own origin. Plain `u64`s fit in atomics, so
/// per-endpoint state can record times without a lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The time `d` after `self`, saturating.
    pub fn after(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_nanos(d)))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Whole nanoseconds of a duration, saturating at `u64::MAX` (about 584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A monotonic clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Nanos;
}

/// A source of uniformly distributed random numbers.
pub trait Random: Send + Sync + std::fmt::Debug {
    /// A uniformly distributed `u64`.
    fn next_u64(&self) -> u64;
}

/// Helpers derived from [`Random::next_u64`].
pub(crate) trait RandomExt: Random {
    /// A number in `0..n` (`n` must be positive). The modulo bias is below 2⁻³² for any `n`
    /// that fits a `u32`, far beneath what a load balancer could notice.
    fn below(&self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl<R: Random + ?Sized> RandomExt for R {}

/// Time and randomness, shared by every policy built from one config and its successors.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The random numbers.
    pub random: Arc<dyn Random>,
}

impl Sources {
    /// The real clock and a thread-local fast generator, as the proxy runs.
    pub fn system() -> Self {
        Self {
            clock: Arc::new(MonotonicClock),
            random: Arc::new(ThreadRandom),
        }
    }

    /// The current time.
    pub fn now(&self) -> Nanos {
        self.clock.now()
    }
}

impl Default for Sources {
    fn default() -> Self {
        Self::system()
    }
}

/// `std::time::Instant`, counted from the first time the clock is read in this process.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Nanos {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        // Start at one second rather than zero so that "zero" can mean "never" in atomics.
        Nanos(duration_nanos(origin.elapsed()).saturating_add(1_000_000_000))
    }
}

/// `fastrand`'s thread-local generator: no shared state, no lock, no syscall per number.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadRandom;

impl Random for ThreadRandom {
    fn next_u64(&self) -> u64 {
        fastrand::u64(..)
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading one second (zero is reserved to mean "never").
    pub fn new() -> Self {
        Self(AtomicU64::new(1_000_000_000))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(duration_nanos(d), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        Nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A reproducible generator (SplitMix64) for tests.
#[derive(Debug)]
pub struct SeededRandom(AtomicU64);

impl SeededRandom {
    /// A generator that yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }
}

impl Random for SeededRandom {
    fn next_u64(&self) -> u64 {
        // SplitMix64 (Steele, Lea, Flood 2014): one atomic add per number, so it is usable from
        // many threads, and each state yields a well-mixed output.
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_random_repeats_its_sequence() {
        let a = SeededRandom::new(7);
        let b = SeededRandom::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_millis(5));
        assert_eq!(clock.now().since(t0), Duration::from_millis(5));
    }
}
