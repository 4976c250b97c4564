//! Circuit breaking: connection-pool limits and outlier detection.
//!
//! Limits are atomic counters behind RAII guards: a request takes a slot with one
//! compare-and-swap and gives it back when the guard drops, whatever path the request ends on.
//! Excess requests fail fast with an [`Overflow`] naming the limit, for the
//! `x-tandem-overflow` response header.
//!
//! Outlier detection ejects an endpoint after consecutive failures, for `base × times ejected`
//! (capped at the maximum). When its time is over, the next pick claims it for a single probe
//! request; the probe's result restores or re-ejects it. No more than `maxEjectionPercent` of
//! the endpoints are ejected at once, though at least one may always be (as Envoy).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tandem_crds::contract;

use super::endpoint::{EJECTED, EndpointState, HEALTHY, PROBING};
use super::outcome::Outcome;
use super::sources::Nanos;

/// The response header that says which limit refused a request.
pub const OVERFLOW_HEADER: &str = "x-tandem-overflow";

/// A connection-pool limit that was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// `maxConnections`.
    MaxConnections,
    /// `maxPendingRequests`.
    MaxPendingRequests,
    /// `maxRequests`.
    MaxRequests,
    /// `maxRetries`.
    MaxRetries,
}

impl Overflow {
    /// Every limit, in the order of [`BreakerStats::overflows`].
    pub const ALL: [Self; 4] = [
        Self::MaxConnections,
        Self::MaxPendingRequests,
        Self::MaxRequests,
        Self::MaxRetries,
    ];

    /// The header value and metrics label: `max-requests` and so on.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max-connections",
            Self::MaxPendingRequests => "max-pending-requests",
            Self::MaxRequests => "max-requests",
            Self::MaxRetries => "max-retries",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::MaxConnections => 0,
            Self::MaxPendingRequests => 1,
            Self::MaxRequests => 2,
            Self::MaxRetries => 3,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection-pool limits

/// The configured limits; `u32::MAX` where none is set (Istio's "unlimited").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    limits: [u32; 4],
    /// Attempts one upstream connection carries at once: 1 for HTTP/1.1, the stream limit for
    /// HTTP/2.
    streams_per_connection: u32,
}

/// Streams one upstream HTTP/2 connection carries at once (at or below what servers commonly
/// advertise, Pingora's own h2 server: 100, so streams never queue in the pool).
pub const STREAMS_PER_H2_CONNECTION: u32 = 100;

impl PoolLimits {
    /// No limits.
    pub const UNLIMITED: Self = Self {
        limits: [u32::MAX; 4],
        streams_per_connection: 1,
    };

    /// The limits a service's config sets, for a port whose upstream connections carry
    /// `streams_per_connection` attempts at once.
    pub fn new(pool: Option<&contract::ConnectionPool>, streams_per_connection: u32) -> Self {
        pool.map_or(Self::UNLIMITED, |p| Self {
            limits: [
                p.max_connections,
                p.max_pending_requests,
                p.max_requests,
                p.max_retries,
            ],
            streams_per_connection: streams_per_connection.max(1),
        })
    }

    /// The configured limit of one kind.
    pub fn limit(&self, kind: Overflow) -> u32 {
        self.limits[kind.index()]
    }

    /// How many slots of `kind` may be taken at once. Connection slots are taken per attempt
    /// in flight (Pingora owns the upstream pool and does not report a connection's close), so
    /// `maxConnections` admits as many attempts as that many connections carry: one each over
    /// HTTP/1.1, [`STREAMS_PER_H2_CONNECTION`] each over HTTP/2. Idle kept-alive connections
    /// carry nothing and are bounded by the pool's size instead.
    pub fn admits(&self, kind: Overflow) -> u32 {
        match kind {
            Overflow::MaxConnections => {
                self.limit(kind).saturating_mul(self.streams_per_connection)
            }
            _ => self.limit(kind),
        }
    }
}

/// Counters of one destination, shared by every policy generation that lists it, so that
/// in-flight counts stay right across a reload and lifetime totals keep counting.
#[derive(Debug, Default)]
pub struct BreakerStats {
    in_use: [AtomicU32; 4],
    overflows: [AtomicU64; 4],
    ejections_total: AtomicU64,
    panic_total: AtomicU64,
    no_endpoints_total: AtomicU64,
    /// Held briefly by the request that decides an ejection, so two ejections decided at once
    /// cannot both pass the max-ejection-percent check. Never waited on: a request that finds
    /// it taken skips the ejection, and the endpoint's next failure tries again.
    ejecting: AtomicBool,
}

impl BreakerStats {
    /// Takes a slot of `kind` if its limit allows.
    pub fn try_acquire(
        self: &Arc<Self>,
        kind: Overflow,
        limits: &PoolLimits,
    ) -> Result<PoolGuard, Overflow> {
        let limit = limits.admits(kind);
        let taken =
            self.in_use[kind.index()].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then(|| n + 1)
            });
        match taken {
            Ok(_) => Ok(PoolGuard {
                stats: Arc::clone(self),
                kind,
            }),
            Err(_) => {
                self.overflows[kind.index()].fetch_add(1, Ordering::Relaxed);
                Err(kind)
            }
        }
    }

    /// Slots of `kind` in use now.
    pub fn in_use(&self, kind: Overflow) -> u32 {
        self.in_use[kind.index()].load(Ordering::Relaxed)
    }

    /// Requests refused by the limit of `kind`, ever.
    pub fn overflows(&self, kind: Overflow) -> u64 {
        self.overflows[kind.index()].load(Ordering::Relaxed)
    }

    /// Endpoints ejected, ever.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Picks made in panic mode (every endpoint ejected), ever.
    pub fn panic_total(&self) -> u64 {
        self.panic_total.load(Ordering::Relaxed)
    }

    /// Requests refused because the destination had no endpoints, ever.
    pub fn no_endpoints_total(&self) -> u64 {
        self.no_endpoints_total.load(Ordering::Relaxed)
    }

    pub(crate) fn count_panic(&self) {
        self.panic_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_no_endpoints(&self) {
        self.no_endpoints_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// A slot of a connection-pool limit, given back on drop.
#[derive(Debug)]
pub struct PoolGuard {
    stats: Arc<BreakerStats>,
    kind: Overflow,
}

impl PoolGuard {
    /// Which limit this slot counts against.
    pub fn kind(&self) -> Overflow {
        self.kind
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        let _ = self.stats.in_use[self.kind.index()].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |n| Some(n.saturating_sub(1)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Outlier detection

/// A service's outlier-detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Each interval an endpoint stays healthy forgives one past ejection (as Envoy, which
    /// lowers the ejection multiplier at every interval tick).
    interval: Duration,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejection_percent: u32,
}

impl OutlierDetection {
    /// The settings a service's config gives, if any.
    pub fn new(od: &contract::OutlierDetection) -> Self {
        Self {
            consecutive_5xx: od.consecutive_5xx,
            consecutive_gateway: od.consecutive_gateway_errors,
            interval: Duration::from_millis(od.interval_ms.max(1)),
            base_ejection: Duration::from_millis(od.base_ejection_time_ms),
            max_ejection: Duration::from_millis(od.max_ejection_time_ms),
            max_ejection_percent: od.max_ejection_percent.min(100),
        }
    }

    /// Most endpoints of `n` that may be ejected at once: the percentage, but at least one.
    pub fn max_ejected(&self, n: usize) -> usize {
        let percent = usize::try_from(self.max_ejection_percent).unwrap_or(100);
        (n.saturating_mul(percent) / 100).max(1)
    }

    /// Records an attempt's outcome on endpoint `index` of `endpoints`; returns whether it
    /// ejected the endpoint.
    pub fn record(
        &self,
        endpoints: &[Arc<EndpointState>],
        index: usize,
        outcome: Outcome,
        probe: bool,
        now: Nanos,
        stats: &BreakerStats,
    ) -> bool {
        let Some(endpoint) = endpoints.get(index) else {
            return false;
        };
        let o = &endpoint.outlier;
        if probe {
            return self.decide_probe(endpoint, outcome, now, stats);
        }
        if o.phase.load(Ordering::Acquire) != HEALTHY {
            // A late answer from before the ejection, or panic-mode traffic: the probe decides.
            return false;
        }
        if !outcome.is_failure() {
            o.consecutive_5xx.store(0, Ordering::Relaxed);
            o.consecutive_gateway.store(0, Ordering::Relaxed);
            return false;
        }
        let fives = o.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
        let gateway = if outcome.is_gateway_error() {
            o.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            o.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let tripped = (self.consecutive_5xx > 0 && fives >= self.consecutive_5xx)
            || (self.consecutive_gateway > 0 && gateway >= self.consecutive_gateway);
        tripped && self.try_eject(endpoints, endpoint, now, stats)
    }

    fn decide_probe(
        &self,
        endpoint: &EndpointState,
        outcome: Outcome,
        now: Nanos,
        stats: &BreakerStats,
    ) -> bool {
        let o = &endpoint.outlier;
        if outcome.is_failure() {
            // Still failing: out again, for longer. It already counts as ejected.
            let times = o.times_ejected.fetch_add(1, Ordering::AcqRel) + 1;
            o.ejected_until
                .store(now.after(self.ejection_time(times)).0, Ordering::Release);
            let ejected = o
                .phase
                .compare_exchange(PROBING, EJECTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if ejected {
                stats.ejections_total.fetch_add(1, Ordering::Relaxed);
            }
            ejected
        } else {
            o.consecutive_5xx.store(0, Ordering::Relaxed);
            o.consecutive_gateway.store(0, Ordering::Relaxed);
            o.restored_at.store(now.0, Ordering::Release);
            let _ = o
                .phase
                .compare_exchange(PROBING, HEALTHY, Ordering::AcqRel, Ordering::Acquire);
            false
        }
    }

    fn try_eject(
        &self,
        endpoints: &[Arc<EndpointState>],
        endpoint: &EndpointState,
        now: Nanos,
        stats: &BreakerStats,
    ) -> bool {
        if stats
            .ejecting
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let ejected_now = endpoints.iter().filter(|e| e.is_ejected()).count();
        let allowed = ejected_now < self.max_ejected(endpoints.len());
        let ejected = allowed && self.eject(endpoint, now);
        stats.ejecting.store(false, Ordering::Release);
        if ejected {
            stats.ejections_total.fetch_add(1, Ordering::Relaxed);
        }
        ejected
    }

    fn eject(&self, endpoint: &EndpointState, now: Nanos) -> bool {
        let o = &endpoint.outlier;
        let restored = Nanos(o.restored_at.load(Ordering::Acquire));
        let forgiven = if restored.0 == 0 {
            0
        } else {
            let intervals = now.since(restored).as_nanos() / self.interval.as_nanos().max(1);
            u32::try_from(intervals).unwrap_or(u32::MAX)
        };
        let times = o
            .times_ejected
            .load(Ordering::Acquire)
            .saturating_sub(forgiven)
            .saturating_add(1);
        o.times_ejected.store(times, Ordering::Release);
        o.ejected_until
            .store(now.after(self.ejection_time(times)).0, Ordering::Release);
        o.consecutive_5xx.store(0, Ordering::Relaxed);
        o.consecutive_gateway.store(0, Ordering::Relaxed);
        o.phase
            .compare_exchange(HEALTHY, EJECTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// `base × times`, capped at the maximum.
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection
            .checked_mul(times)
            .unwrap_or(self.max_ejection)
            .min(self.max_ejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::endpoint::Availability;
    use std::net::SocketAddr;

    const T0: Nanos = Nanos(1_000_000_000);

    fn od(consecutive_5xx: u32, max_percent: u32) -> OutlierDetection {
        OutlierDetection::new(&contract::OutlierDetection {
            consecutive_5xx,
            consecutive_gateway_errors: 0,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_time_ms: 100_000,
            max_ejection_percent: max_percent,
        })
    }

    fn endpoints(n: u8) -> Vec<Arc<EndpointState>> {
        (1..=n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    SocketAddr::from(([10, 0, 0, i], 80)),
                    T0,
                ))
            })
            .collect()
    }

    fn fail(d: &OutlierDetection, eps: &[Arc<EndpointState>], i: usize, n: u32, s: &BreakerStats) {
        for _ in 0..n {
            d.record(eps, i, Outcome::Response(503), false, T0, s);
        }
    }

    #[test]
    fn pool_limit_fails_fast_and_frees_its_slot_on_drop() {
        let stats = Arc::new(BreakerStats::default());
        let limits = PoolLimits::new(
            Some(&contract::ConnectionPool {
                max_connections: 10,
                max_pending_requests: 10,
                max_requests: 2,
                max_retries: 1,
            }),
            1,
        );
        let a = stats.try_acquire(Overflow::MaxRequests, &limits).unwrap();
        let _b = stats.try_acquire(Overflow::MaxRequests, &limits).unwrap();
        let refused = stats
            .try_acquire(Overflow::MaxRequests, &limits)
            .unwrap_err();
        assert_eq!(refused.as_str(), "max-requests");
        assert_eq!(stats.overflows(Overflow::MaxRequests), 1);
        drop(a);
        assert_eq!(stats.in_use(Overflow::MaxRequests), 1);
        assert!(stats.try_acquire(Overflow::MaxRequests, &limits).is_ok());
    }

    #[test]
    fn a_max_retries_of_zero_refuses_every_retry() {
        let stats = Arc::new(BreakerStats::default());
        let limits = PoolLimits::new(
            Some(&contract::ConnectionPool {
                max_connections: 1,
                max_pending_requests: 1,
                max_requests: 1,
                max_retries: 0,
            }),
            1,
        );
        assert_eq!(
            stats
                .try_acquire(Overflow::MaxRetries, &limits)
                .unwrap_err(),
            Overflow::MaxRetries
        );
    }

    #[test]
    fn ejection_after_n_consecutive_5xx() {
        let d = od(5, 100);
        let eps = endpoints(3);
        let stats = BreakerStats::default();
        fail(&d, &eps, 0, 4, &stats);
        assert!(!eps[0].is_ejected());
        assert!(d.record(&eps, 0, Outcome::Response(500), false, T0, &stats));
        assert!(eps[0].is_ejected());
        assert_eq!(stats.ejections_total(), 1);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let d = od(3, 100);
        let eps = endpoints(3);
        let stats = BreakerStats::default();
        fail(&d, &eps, 0, 2, &stats);
        d.record(&eps, 0, Outcome::Response(200), false, T0, &stats);
        fail(&d, &eps, 0, 2, &stats);
        assert!(!eps[0].is_ejected());
    }

    #[test]
    fn gateway_errors_eject_on_their_own_count() {
        let d = OutlierDetection::new(&contract::OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 2,
            interval_ms: 1_000,
            base_ejection_time_ms: 1_000,
            max_ejection_time_ms: 1_000,
            max_ejection_percent: 100,
        });
        let eps = endpoints(2);
        let stats = BreakerStats::default();
        for _ in 0..5 {
            d.record(&eps, 0, Outcome::Response(500), false, T0, &stats);
        }
        assert!(!eps[0].is_ejected(), "500 is not a gateway error");
        d.record(&eps, 0, Outcome::ConnectFailure, false, T0, &stats);
        d.record(&eps, 0, Outcome::Response(502), false, T0, &stats);
        assert!(eps[0].is_ejected());
    }

    #[test]
    fn restore_after_the_ejection_time_with_a_single_probe() {
        let d = od(1, 100);
        let eps = endpoints(2);
        let stats = BreakerStats::default();
        fail(&d, &eps, 0, 1, &stats);
        let before = T0.after(Duration::from_secs(29));
        assert_eq!(eps[0].availability(before), Availability::Unavailable);
        let after = T0.after(Duration::from_secs(30));
        assert_eq!(eps[0].availability(after), Availability::ProbeReady);
        assert!(eps[0].claim_probe(after));
        assert!(!eps[0].claim_probe(after), "only one probe");
        assert_eq!(eps[0].availability(after), Availability::Unavailable);
        d.record(&eps, 0, Outcome::Response(200), true, after, &stats);
        assert_eq!(eps[0].availability(after), Availability::Ready);
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer_capped_at_the_maximum() {
        let d = od(1, 100);
        let eps = endpoints(2);
        let stats = BreakerStats::default();
        fail(&d, &eps, 0, 1, &stats);
        let mut now = T0;
        for expected in [60, 90, 100, 100] {
            now = Nanos(eps[0].outlier.ejected_until.load(Ordering::SeqCst));
            assert!(eps[0].claim_probe(now));
            assert!(d.record(&eps, 0, Outcome::Reset, true, now, &stats));
            let until = Nanos(eps[0].outlier.ejected_until.load(Ordering::SeqCst));
            assert_eq!(until.since(now), Duration::from_secs(expected));
        }
        assert_eq!(stats.ejections_total(), 5);
        let _ = now;
    }

    #[test]
    fn healthy_intervals_forgive_past_ejections() {
        let d = od(1, 100);
        let eps = endpoints(2);
        let stats = BreakerStats::default();
        // Ejected twice (30 s, then 60 s), then restored.
        fail(&d, &eps, 0, 1, &stats);
        let t1 = T0.after(Duration::from_secs(30));
        assert!(eps[0].claim_probe(t1));
        d.record(&eps, 0, Outcome::Response(503), true, t1, &stats);
        let t2 = t1.after(Duration::from_secs(60));
        assert!(eps[0].claim_probe(t2));
        d.record(&eps, 0, Outcome::Response(200), true, t2, &stats);
        // Healthy for two 10 s intervals: both past ejections are forgiven.
        let t3 = t2.after(Duration::from_secs(20));
        d.record(&eps, 0, Outcome::Response(503), false, t3, &stats);
        let until = Nanos(eps[0].outlier.ejected_until.load(Ordering::SeqCst));
        assert_eq!(until.since(t3), Duration::from_secs(30));
    }

    #[test]
    fn max_ejection_percent_is_honoured() {
        let d = od(1, 50);
        let eps = endpoints(4);
        let stats = BreakerStats::default();
        for i in 0..4 {
            fail(&d, &eps, i, 3, &stats);
        }
        assert_eq!(eps.iter().filter(|e| e.is_ejected()).count(), 2);
        assert_eq!(stats.ejections_total(), 2);
    }

    #[test]
    fn at_least_one_endpoint_may_always_be_ejected() {
        let d = od(1, 10);
        let eps = endpoints(3);
        let stats = BreakerStats::default();
        for i in 0..3 {
            fail(&d, &eps, i, 1, &stats);
        }
        assert_eq!(eps.iter().filter(|e| e.is_ejected()).count(), 1);
        assert_eq!(d.max_ejected(0), 1);
    }

    #[test]
    fn late_results_do_not_move_an_ejected_endpoint() {
        let d = od(1, 100);
        let eps = endpoints(2);
        let stats = BreakerStats::default();
        fail(&d, &eps, 0, 1, &stats);
        let until = eps[0].outlier.ejected_until.load(Ordering::SeqCst);
        d.record(&eps, 0, Outcome::Response(200), false, T0, &stats);
        fail(&d, &eps, 0, 3, &stats);
        assert!(eps[0].is_ejected());
        assert_eq!(eps[0].outlier.ejected_until.load(Ordering::SeqCst), until);
        assert_eq!(stats.ejections_total(), 1);
    }
}
