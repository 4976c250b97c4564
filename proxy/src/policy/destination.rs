//! A destination: one port of one service, with its endpoints, load balancer and breaker.
//!
//! Routes point at destinations; a [`Decision`](super::Decision) holds the `Arc` of the one it
//! chose, so a request keeps its destination across a reload while new requests see the new
//! one. State that must outlive a reload (per-endpoint state, pool counters, totals, the
//! round-robin cursor) is shared between the generations.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use serde::Serialize;
use tandem_crds::contract::{self, LoadBalancer, ServiceRef};

use super::Refusal;
use super::balance;
use super::breaker::{
    BreakerStats, OutlierDetection, Overflow, PoolGuard, PoolLimits, STREAMS_PER_H2_CONNECTION,
};
use super::endpoint::{Availability, EndpointSnapshot, EndpointState};
use super::outcome::Outcome;
use super::sources::{Nanos, Sources};

/// One port of one service, as the engine balances over it.
#[derive(Debug)]
pub struct Destination {
    service: ServiceRef,
    port: u16,
    algorithm: LoadBalancer,
    endpoints: Vec<Arc<EndpointState>>,
    /// Whether a Tandem proxy runs beside each endpoint, by index.
    meshed: Vec<bool>,
    limits: PoolLimits,
    outlier: Option<OutlierDetection>,
    shared: Arc<Shared>,
    sources: Sources,
}

/// What every generation of a destination shares.
#[derive(Debug, Default)]
struct Shared {
    stats: Arc<BreakerStats>,
    cursor: AtomicUsize,
}

/// One attempt in progress: an endpoint chosen and counted as in flight.
///
/// Dropping it without a result (the client went away, the request timed out) gives back the
/// in-flight count and, for a probe, the probe itself.
#[derive(Debug)]
pub struct Attempt {
    endpoint: Arc<EndpointState>,
    index: usize,
    meshed: bool,
    probe: bool,
    panic: bool,
    started: Nanos,
    /// Held until a connection is ready (`maxPendingRequests`).
    pending: Option<PoolGuard>,
    /// The share of an upstream connection the attempt occupies (`maxConnections`), held
    /// until the attempt ends.
    _connection: PoolGuard,
    finished: bool,
}

impl Attempt {
    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.endpoint.address()
    }

    /// Whether a Tandem proxy runs beside the endpoint.
    pub fn meshed(&self) -> bool {
        self.meshed
    }

    /// Whether this attempt is the endpoint's half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Whether the endpoint was picked in panic mode (every endpoint ejected).
    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Releases the pending-request slot: the attempt has its connection.
    pub fn connected(&mut self) {
        self.pending = None;
    }

    /// Moves the attempt's start, so a backoff pause is not counted as endpoint latency.
    pub(crate) fn starts_at(&mut self, at: Nanos) {
        self.started = at;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            self.endpoint.end_request();
            if self.probe {
                self.endpoint.release_probe();
            }
        }
    }
}

impl Destination {
    /// Builds the destination for `port` of `service`, keeping the state of `previous` for the
    /// endpoints both list.
    pub fn build(
        service: &contract::Service,
        port: &contract::ServicePort,
        previous: Option<&Destination>,
        sources: &Sources,
    ) -> Self {
        let now = sources.now();
        let kept: BTreeMap<SocketAddr, &Arc<EndpointState>> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.address(), e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<EndpointState>> = port
            .endpoints
            .iter()
            .map(|e| {
                kept.get(&e.address).map_or_else(
                    || Arc::new(EndpointState::new(e.address, now)),
                    |&state| Arc::clone(state),
                )
            })
            .collect();
        let breaker = service.circuit_breaker.as_ref();
        let outlier = breaker
            .and_then(|b| b.outlier_detection.as_ref())
            .map(OutlierDetection::new);
        if outlier.is_none() {
            endpoints
                .iter()
                .for_each(|e: &Arc<EndpointState>| e.reset_outlier());
        }
        Self {
            service: service.key(),
            port: port.port,
            algorithm: service.load_balancer,
            endpoints,
            meshed: port.endpoints.iter().map(|e| e.meshed).collect(),
            limits: PoolLimits::new(
                breaker.and_then(|b| b.connection_pool.as_ref()),
                match port.protocol {
                    contract::Protocol::Http2 | contract::Protocol::Grpc => {
                        STREAMS_PER_H2_CONNECTION
                    }
                    _ => 1,
                },
            ),
            outlier,
            shared: previous.map_or_else(Arc::default, |p| Arc::clone(&p.shared)),
            sources: sources.clone(),
        }
    }

    /// The service.
    pub fn service(&self) -> &ServiceRef {
        &self.service
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoints' shared state, in config order.
    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// Lifetime counters and pool occupancy.
    pub fn stats(&self) -> &BreakerStats {
        &self.shared.stats
    }

    /// Takes a connection-pool slot of `kind`. The request path takes `maxRequests` through
    /// [`Policy::select`](super::Policy::select), and each attempt `maxConnections` and
    /// `maxPendingRequests` through [`Destination::pick`].
    pub fn try_acquire(&self, kind: Overflow) -> Result<PoolGuard, Overflow> {
        self.shared.stats.try_acquire(kind, &self.limits)
    }

    /// Endpoints ejected now.
    pub fn active_ejections(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_ejected()).count()
    }

    /// Chooses an endpoint for an attempt, avoiding `avoid` when another will do.
    pub fn pick(&self, avoid: Option<SocketAddr>, now: Nanos) -> Result<Attempt, Refusal> {
        if self.endpoints.is_empty() {
            self.shared.stats.count_no_endpoints();
            return Err(Refusal::NoEndpoints);
        }
        let connection = self
            .try_acquire(Overflow::MaxConnections)
            .map_err(Refusal::Overflow)?;
        let pending = self
            .try_acquire(Overflow::MaxPendingRequests)
            .map_err(Refusal::Overflow)?;
        let Some(pick) = balance::pick(
            self.algorithm,
            &self.endpoints,
            avoid,
            &self.shared.cursor,
            now,
            self.sources.random.as_ref(),
        ) else {
            self.shared.stats.count_no_endpoints();
            return Err(Refusal::NoEndpoints);
        };
        if pick.panic {
            self.shared.stats.count_panic();
        }
        let endpoint = Arc::clone(&self.endpoints[pick.index]);
        endpoint.start_request();
        Ok(Attempt {
            endpoint,
            index: pick.index,
            meshed: self.meshed.get(pick.index).copied().unwrap_or(false),
            probe: pick.probe,
            panic: pick.panic,
            started: now,
            pending: Some(pending),
            _connection: connection,
            finished: false,
        })
    }

    /// Records how an attempt ended: its latency for the balancer, its outcome for outlier
    /// detection. Returns whether the endpoint was ejected by it.
    pub fn record(&self, mut attempt: Attempt, outcome: Outcome, now: Nanos) -> bool {
        attempt.finished = true;
        attempt.pending = None;
        let endpoint = &attempt.endpoint;
        endpoint.record_rtt(now.since(attempt.started), outcome.is_failure(), now);
        endpoint.end_request();
        let same_endpoint = self
            .endpoints
            .get(attempt.index)
            .is_some_and(|e| Arc::ptr_eq(e, endpoint));
        match &self.outlier {
            Some(od) if same_endpoint => od.record(
                &self.endpoints,
                attempt.index,
                outcome,
                attempt.probe,
                now,
                &self.shared.stats,
            ),
            _ => {
                if attempt.probe {
                    endpoint.release_probe();
                }
                false
            }
        }
    }

    /// The destination's state for `/config`.
    pub fn snapshot(&self, now: Nanos) -> DestinationSnapshot {
        let endpoints: Vec<EndpointSnapshot> = self
            .endpoints
            .iter()
            .zip(&self.meshed)
            .map(|(e, &meshed)| EndpointSnapshot {
                meshed,
                ..e.snapshot(now)
            })
            .collect();
        let serving = self
            .endpoints
            .iter()
            .any(|e| e.availability(now) != Availability::Unavailable);
        let stats = self.stats();
        DestinationSnapshot {
            service: self.service.to_string(),
            port: self.port,
            load_balancer: match self.algorithm {
                LoadBalancer::PeakEwma => "peak-ewma",
                LoadBalancer::RoundRobin => "round-robin",
                LoadBalancer::LeastRequest => "least-request",
            },
            state: if self.endpoints.is_empty() {
                "no-endpoints"
            } else if serving {
                "serving"
            } else {
                "panic"
            },
            active_ejections: self.active_ejections(),
            ejections_total: stats.ejections_total(),
            panic_total: stats.panic_total(),
            no_endpoints_total: stats.no_endpoints_total(),
            in_use: Overflow::ALL
                .iter()
                .map(|&k| (k.as_str(), stats.in_use(k)))
                .collect(),
            limits: Overflow::ALL
                .iter()
                .filter(|&&k| self.limits.limit(k) != u32::MAX)
                .map(|&k| (k.as_str(), self.limits.limit(k)))
                .collect(),
            overflows_total: Overflow::ALL
                .iter()
                .map(|&k| (k.as_str(), stats.overflows(k)))
                .collect(),
            outlier_detection: self.outlier.is_some(),
            endpoints,
        }
    }
}

/// A destination as `/config` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationSnapshot {
    /// `namespace/name`.
    pub service: String,
    /// The port.
    pub port: u16,
    /// `peak-ewma`, `round-robin` or `least-request`.
    pub load_balancer: &'static str,
    /// `serving`; `panic` when every endpoint is ejected (traffic goes to all of them); or
    /// `no-endpoints` when the service has no ready endpoint at all.
    pub state: &'static str,
    /// Endpoints ejected now.
    pub active_ejections: usize,
    /// Ejections ever.
    pub ejections_total: u64,
    /// Picks made in panic mode ever.
    pub panic_total: u64,
    /// Requests refused for want of endpoints ever.
    pub no_endpoints_total: u64,
    /// Connection-pool slots in use, by limit.
    pub in_use: BTreeMap<&'static str, u32>,
    /// The configured limits (absent: unlimited).
    pub limits: BTreeMap<&'static str, u32>,
    /// Requests refused by each limit ever.
    pub overflows_total: BTreeMap<&'static str, u64>,
    /// Whether outlier detection is on.
    pub outlier_detection: bool,
    /// Every endpoint.
    pub endpoints: Vec<EndpointSnapshot>,
}

impl Destination {
    /// Time now, from the destination's clock.
    pub(crate) fn now(&self) -> Nanos {
        self.sources.now()
    }

    /// The load-balancing algorithm.
    pub fn algorithm(&self) -> LoadBalancer {
        self.algorithm
    }
}
