//! The sampling decision: parent-based, with a probability for new traces.
//!
//! A request that carries a decision (W3C's sampled flag, B3's sampling state) follows it, so
//! a trace is recorded by every proxy on its path or by none. A request without one starts a
//! trace with probability `samplingPercent` (Istio's default, 1 %; Linkerd never starts one).
//! The draw is `fastrand`'s thread-local generator: no lock, no system call.

use super::context::{Context, Incoming};

/// A probability, kept as the threshold a uniform `u64` is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    /// Sample when a draw is below this; `u64::MAX` means always.
    threshold: u64,
}

impl Sampler {
    /// Samples `percent` % of new traces (validated to be within 0..=100; out of range is
    /// clamped).
    pub fn new(percent: f64) -> Self {
        let p = (percent / 100.0).clamp(0.0, 1.0);
        // `as` saturates, so 100 % becomes u64::MAX.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a probability in 0..=1 scaled to u64, saturating"
        )]
        let threshold = (p * u64::MAX as f64) as u64;
        Self { threshold }
    }

    /// Whether a new trace is started.
    pub fn sample_new(&self) -> bool {
        match self.threshold {
            0 => false,
            u64::MAX => true,
            t => fastrand::u64(..) < t,
        }
    }

    /// The decision for a request that carried `incoming`.
    pub fn decide(&self, incoming: &Incoming) -> bool {
        match incoming {
            Incoming::Context(Context {
                sampled: Some(sampled),
                ..
            })
            | Incoming::Decision(sampled) => *sampled,
            Incoming::Context(Context { sampled: None, .. }) | Incoming::None => self.sample_new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::context::Format;

    fn context(sampled: Option<bool>) -> Incoming {
        Incoming::Context(Context {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled,
            format: Format::W3c,
        })
    }

    #[test]
    fn the_parent_decides_whatever_the_probability() {
        for percent in [0.0, 1.0, 100.0] {
            let s = Sampler::new(percent);
            assert!(s.decide(&context(Some(true))));
            assert!(!s.decide(&context(Some(false))));
            assert!(s.decide(&Incoming::Decision(true)));
            assert!(!s.decide(&Incoming::Decision(false)));
        }
    }

    #[test]
    fn new_traces_follow_the_probability() {
        assert!((0..10_000).all(|_| Sampler::new(100.0).decide(&Incoming::None)));
        assert!((0..10_000).all(|_| !Sampler::new(0.0).decide(&Incoming::None)));
        // A deferred B3 context is a new decision too.
        assert!(Sampler::new(100.0).decide(&context(None)));
        // 10 % of 100,000 draws: 10,000 expected, sd ~95; ±800 is over 8 sd.
        let s = Sampler::new(10.0);
        let n = (0..100_000).filter(|_| s.sample_new()).count();
        assert!((9_200..=10_800).contains(&n), "{n}");
    }
}
