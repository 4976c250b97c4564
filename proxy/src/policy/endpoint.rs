//! The state the engine keeps per endpoint: requests in flight, the peak-EWMA latency estimate
//! and the outlier-detection state machine. All atomics, shared through an `Arc` by every
//! policy that lists the endpoint, so a config reload keeps it and requests started under the
//! old config still update it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::sources::{Nanos, duration_nanos};

/// Latency assumed for an endpoint before its first response (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the EWMA: older samples weigh `e^(-age/DECAY)` (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// Ceiling on the latency a failure is recorded as; see [`EndpointState::record_rtt`].
pub const FAILURE_PENALTY_MAX: Duration = Duration::from_secs(5);

/// One endpoint's shared state.
#[derive(Debug)]
pub struct EndpointState {
    address: SocketAddr,
    in_flight: AtomicU32,
    /// The RTT estimate in nanoseconds, as `f64` bits.
    rtt_estimate: AtomicU64,
    /// When the estimate was last updated.
    rtt_updated: AtomicU64,
    pub(crate) outlier: OutlierState,
}

/// Outlier detection's per-endpoint state.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    /// [`HEALTHY`], [`EJECTED`] or [`PROBING`].
    pub(crate) phase: AtomicU8,
    /// When the current ejection ends (meaningful while ejected).
    pub(crate) ejected_until: AtomicU64,
    /// How many times the endpoint was ejected, lessened while it stays healthy.
    pub(crate) times_ejected: AtomicU32,
    /// When the endpoint last returned to service (0: never ejected).
    pub(crate) restored_at: AtomicU64,
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway: AtomicU32,
}

/// Serving traffic.
pub(crate) const HEALTHY: u8 = 0;
/// Ejected; once `ejected_until` passes, the next pick may claim it for a probe.
pub(crate) const EJECTED: u8 = 1;
/// Ejection over and one probe request in flight; that probe decides.
pub(crate) const PROBING: u8 = 2;

/// Whether the balancer may send a request to an endpoint now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Serving.
    Ready,
    /// Its ejection is over: the next request may be its single probe.
    ProbeReady,
    /// Ejected, or its probe is in flight.
    Unavailable,
}

impl EndpointState {
    /// Fresh state: nothing in flight, the default RTT estimate, healthy.
    pub fn new(address: SocketAddr, now: Nanos) -> Self {
        Self {
            address,
            in_flight: AtomicU32::new(0),
            rtt_estimate: AtomicU64::new(nanos_f64(DEFAULT_RTT).to_bits()),
            rtt_updated: AtomicU64::new(now.0),
            outlier: OutlierState::default(),
        }
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Requests in flight to this endpoint (from any policy generation).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn start_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end_request(&self) {
        // Saturating: never wrap below zero even if a guard were dropped twice.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    // -----------------------------------------------------------------------------------------
    // Peak EWMA

    /// The RTT estimate decayed to `now`: an idle endpoint's estimate falls towards zero, so a
    /// once-slow endpoint is tried again eventually (as tower's `PeakEwma`).
    pub fn rtt(&self, now: Nanos) -> Duration {
        let estimate = f64::from_bits(self.rtt_estimate.load(Ordering::Relaxed));
        let updated = Nanos(self.rtt_updated.load(Ordering::Relaxed));
        Duration::from_secs_f64(decayed(estimate, now.since(updated)).max(0.0) / 1e9)
    }

    /// The peak-EWMA cost: estimated latency times the requests it would queue behind.
    pub fn cost(&self, now: Nanos) -> f64 {
        nanos_f64(self.rtt(now)) * f64::from(self.in_flight().saturating_add(1))
    }

    /// Folds one attempt's latency into the estimate. Peak-sensitive: a sample above the
    /// estimate replaces it at once, a lower one is blended in by how long ago the last update
    /// was. A failure is recorded as at least [`DEFAULT_RTT`] and twice the current estimate
    /// (capped at [`FAILURE_PENALTY_MAX`]): otherwise an endpoint that fails fast would look
    /// fast and attract more traffic.
    pub fn record_rtt(&self, rtt: Duration, failed: bool, now: Nanos) {
        let sample = nanos_f64(rtt);
        let _ = self
            .rtt_estimate
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let estimate = f64::from_bits(bits);
                let sample = if failed {
                    sample
                        .max(nanos_f64(DEFAULT_RTT))
                        .max(estimate * 2.0)
                        .min(nanos_f64(FAILURE_PENALTY_MAX))
                        .max(sample)
                } else {
                    sample
                };
                let updated = Nanos(self.rtt_updated.load(Ordering::Relaxed));
                let next = if sample > estimate {
                    sample
                } else {
                    let w = decay_weight(now.since(updated));
                    estimate * w + sample * (1.0 - w)
                };
                Some(next.to_bits())
            });
        self.rtt_updated.fetch_max(now.0, Ordering::Relaxed);
    }

    // -----------------------------------------------------------------------------------------
    // Outlier state

    /// Whether the balancer may pick this endpoint at `now`.
    pub fn availability(&self, now: Nanos) -> Availability {
        match self.outlier.phase.load(Ordering::Acquire) {
            HEALTHY => Availability::Ready,
            EJECTED if now.0 >= self.outlier.ejected_until.load(Ordering::Acquire) => {
                Availability::ProbeReady
            }
            _ => Availability::Unavailable,
        }
    }

    /// Claims the single probe of an endpoint whose ejection is over; false if another request
    /// claimed it first.
    pub(crate) fn claim_probe(&self, now: Nanos) -> bool {
        self.availability(now) == Availability::ProbeReady
            && self
                .outlier
                .phase
                .compare_exchange(EJECTED, PROBING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Gives an unanswered probe back (its request ended without a result), so the next request
    /// may probe instead.
    pub(crate) fn release_probe(&self) {
        let _ = self.outlier.phase.compare_exchange(
            PROBING,
            EJECTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Returns the endpoint to service and forgets its failures: outlier detection was turned
    /// off, and nothing else would ever end its ejection.
    pub(crate) fn reset_outlier(&self) {
        let o = &self.outlier;
        o.phase.store(HEALTHY, Ordering::Release);
        o.times_ejected.store(0, Ordering::Relaxed);
        o.consecutive_5xx.store(0, Ordering::Relaxed);
        o.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// Whether the endpoint is out of service (ejected or being probed).
    pub fn is_ejected(&self) -> bool {
        self.outlier.phase.load(Ordering::Acquire) != HEALTHY
    }

    /// A copy of the state for `/config`.
    pub fn snapshot(&self, now: Nanos) -> EndpointSnapshot {
        let phase = self.outlier.phase.load(Ordering::Acquire);
        let until = Nanos(self.outlier.ejected_until.load(Ordering::Acquire));
        let state = match self.availability(now) {
            Availability::Ready => "healthy",
            Availability::ProbeReady => "probe-ready",
            Availability::Unavailable if phase == PROBING => "probing",
            Availability::Unavailable => "ejected",
        };
        EndpointSnapshot {
            address: self.address,
            meshed: false,
            state,
            ejected_for_ms: (phase == EJECTED && until > now)
                .then(|| u64::try_from(until.since(now).as_millis()).unwrap_or(u64::MAX)),
            times_ejected: self.outlier.times_ejected.load(Ordering::Relaxed),
            consecutive_5xx: self.outlier.consecutive_5xx.load(Ordering::Relaxed),
            consecutive_gateway_errors: self.outlier.consecutive_gateway.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
            rtt_ewma_ms: self.rtt(now).as_secs_f64() * 1e3,
        }
    }
}

/// One endpoint as `/config` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSnapshot {
    /// Address and port.
    pub address: SocketAddr,
    /// Whether a Tandem proxy runs beside it.
    pub meshed: bool,
    /// `healthy`, `ejected`, `probe-ready` (ejection over, waiting for its probe) or `probing`.
    pub state: &'static str,
    /// Time left in the current ejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    /// Ejections so far (lessened while healthy), which scales the next ejection's length.
    pub times_ejected: u32,
    /// Consecutive 5xx (or missing responses) so far.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors so far.
    pub consecutive_gateway_errors: u32,
    /// Requests in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency estimate, decayed to now.
    pub rtt_ewma_ms: f64,
}

fn nanos_f64(d: Duration) -> f64 {
    #[allow(
        clippy::cast_precision_loss,
        reason = "nanosecond latencies fit an f64"
    )]
    let n = duration_nanos(d) as f64;
    n
}

/// `e^(-elapsed/DECAY)`: the weight the previous estimate keeps after `elapsed`.
fn decay_weight(elapsed: Duration) -> f64 {
    (-nanos_f64(elapsed) / nanos_f64(DECAY)).exp()
}

fn decayed(estimate: f64, elapsed: Duration) -> f64 {
    estimate * decay_weight(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> EndpointState {
        EndpointState::new("10.0.0.1:80".parse().unwrap(), Nanos(1_000_000_000))
    }

    #[test]
    fn a_slower_sample_raises_the_estimate_at_once() {
        let e = endpoint();
        let now = Nanos(1_000_000_000);
        e.record_rtt(Duration::from_millis(200), false, now);
        assert_eq!(e.rtt(now), Duration::from_millis(200));
    }

    #[test]
    fn faster_samples_pull_the_estimate_down_gradually() {
        let e = endpoint();
        let mut now = Nanos(1_000_000_000);
        e.record_rtt(Duration::from_millis(100), false, now);
        now = now.after(Duration::from_secs(1));
        e.record_rtt(Duration::from_millis(10), false, now);
        let rtt = e.rtt(now);
        assert!(
            rtt < Duration::from_millis(100) && rtt > Duration::from_millis(10),
            "{rtt:?}"
        );
    }

    #[test]
    fn an_idle_estimate_decays_towards_zero() {
        let e = endpoint();
        let now = Nanos(1_000_000_000);
        e.record_rtt(Duration::from_millis(100), false, now);
        let later = now.after(DECAY * 5);
        assert!(e.rtt(later) < Duration::from_millis(1));
    }

    #[test]
    fn a_fast_failure_does_not_look_fast() {
        let e = endpoint();
        let now = Nanos(1_000_000_000);
        e.record_rtt(Duration::from_micros(100), true, now);
        assert!(e.rtt(now) >= DEFAULT_RTT, "{:?}", e.rtt(now));
    }

    #[test]
    fn cost_grows_with_requests_in_flight() {
        let e = endpoint();
        let now = Nanos(1_000_000_000);
        let idle = e.cost(now);
        e.start_request();
        e.start_request();
        assert!((e.cost(now) - 3.0 * idle).abs() < 1.0);
        e.end_request();
        e.end_request();
        e.end_request();
        assert_eq!(e.in_flight(), 0, "never below zero");
    }
}
