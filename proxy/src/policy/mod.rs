//! The resilience engine: what the request path asks before and after each attempt.
//!
//! Pure and lock-free on the request path. A [`PolicySet`] is compiled once when a config loads
//! (routes, regular expressions, weights, limits), keeping the state of the set it replaces.
//! For each request the proxy finds the [`Policy`] of the destination service and calls
//! [`Policy::select`], which matches a route, picks a weighted backend, takes the connection-pool
//! slots and picks an endpoint. The returned [`Decision`] travels with the request; after each
//! attempt the proxy calls [`Decision::on_attempt_result`] and [`Decision::should_retry`].
//!
//! - [`routes`]: route matching and weighted splits;
//! - [`retry`] and [`budget`]: retry conditions, backoff and the retry budget;
//! - [`balance`] and [`endpoint`]: peak EWMA, least request and round robin over endpoints;
//! - [`breaker`]: connection-pool limits and outlier detection;
//! - [`sources`]: time and randomness, injected so tests are deterministic.
//!
//! # Defaults
//!
//! | what | default |
//! | --- | --- |
//! | request timeout (route `timeoutMs`) | none: a request may take as long as the upstream needs |
//! | per-try timeout (`perTryTimeoutMs`) | none: each try is bounded only by the request timeout |
//! | connect timeout (`defaults.connectTimeoutMs`) | 1 s |
//! | idle timeout of pooled connections (`defaults.idleTimeoutMs`) | 60 s |
//! | retries | none unless a route sets them; never for POST, PATCH or CONNECT unless `retryNonIdempotent` (a connect failure excepted: nothing was sent) |
//! | retry budget | 20 % of requests plus 10 per second over 10 s (Linkerd's), whenever a route retries |
//! | body replay | up to 64 KiB; larger bodies are not retried |
//! | load balancer | peak EWMA, power of two choices, initial RTT 30 ms, decay 10 s |
//! | connection-pool limits | unlimited |
//! | outlier detection | off |

pub mod balance;
pub mod breaker;
pub mod budget;
mod decision;
mod destination;
pub mod endpoint;
pub mod outcome;
pub mod retry;
pub mod routes;
pub mod sources;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use serde::Serialize;
use tandem_crds::contract::{self, ProxyConfig, ServiceRef};

pub use breaker::{OVERFLOW_HEADER, Overflow, STREAMS_PER_H2_CONNECTION};
pub use budget::RetryBudget;
pub use decision::{Decision, RetryDecision};
pub use destination::{Attempt, Destination, DestinationSnapshot};
pub use outcome::Outcome;
pub use retry::{MAX_REPLAY_BODY, NoRetry, RequestBody, RetryPolicy};
pub use sources::Sources;

use routes::RouteTable;

/// The route name of requests no route matched.
pub const DEFAULT_ROUTE: &str = "default";

/// The response header that names why the proxy refused a request other than by a limit.
pub const REFUSAL_HEADER: &str = "x-tandem-error";

/// Why a config could not be compiled into policies. A validated config never produces one;
/// these guard against a config that skipped validation.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A route's match could not be compiled.
    #[error("route {route:?}: {reason}")]
    Route {
        /// The route's name.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// A route's backend names a service port that is not in the config.
    #[error("route {route:?}: backend {backend} port {port} is not a service port in this config")]
    UnknownBackend {
        /// The route's name.
        route: String,
        /// The backend service.
        backend: ServiceRef,
        /// Its port.
        port: u16,
    },
    /// A problem inside one service's policy.
    #[error("service {service}: {source}")]
    Service {
        /// The service.
        service: ServiceRef,
        /// The problem.
        #[source]
        source: Box<PolicyError>,
    },
}

/// Why a request is answered by the proxy itself, with 503, instead of being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The destination has no ready endpoint: its own visible state, not a silent 503.
    NoEndpoints,
    /// A connection-pool limit was reached.
    Overflow(Overflow),
    /// The service has no such port.
    UnknownPort(u16),
}

impl Refusal {
    /// The status to answer with.
    pub fn status(self) -> u16 {
        503
    }

    /// The header saying why: `x-tandem-overflow: max-requests`, `x-tandem-error: no-endpoints`.
    pub fn header(self) -> (&'static str, &'static str) {
        match self {
            Self::Overflow(kind) => (OVERFLOW_HEADER, kind.as_str()),
            Self::NoEndpoints => (REFUSAL_HEADER, "no-endpoints"),
            Self::UnknownPort(_) => (REFUSAL_HEADER, "unknown-port"),
        }
    }
}

/// A route's settings besides its backends.
#[derive(Debug, Default)]
pub(crate) struct RouteSettings {
    timeout: Option<Duration>,
    retries: Option<RetryPolicy>,
}

/// Settings of requests no route matched: no timeout, no retries.
static NO_ROUTE: RouteSettings = RouteSettings {
    timeout: None,
    retries: None,
};

// ---------------------------------------------------------------------------------------------
// Policy

/// The compiled policy of one destination service: its routes, and the retry budget all of
/// them share.
#[derive(Debug)]
pub struct Policy {
    service: ServiceRef,
    routes: RouteTable<Arc<Destination>, RouteSettings>,
    /// The service itself, per port: where requests go when no route matches or a route has
    /// no backends.
    own: Vec<(u16, Arc<Destination>)>,
    budget: Arc<RetryBudget>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    sources: Sources,
}

impl Policy {
    /// Compiles a service's policy. `destinations` holds every service port of the config (route
    /// backends are resolved there); `previous` is this service's policy in the config being
    /// replaced, whose retry budget carries over.
    pub fn build(
        service: &contract::Service,
        defaults: &contract::Defaults,
        destinations: &BTreeMap<(ServiceRef, u16), Arc<Destination>>,
        previous: Option<&Policy>,
        sources: &Sources,
    ) -> Result<Self, PolicyError> {
        let key = service.key();
        let routes = RouteTable::compile(
            &service.routes,
            |route, backend| {
                destinations
                    .get(&(backend.service.clone(), backend.port))
                    .cloned()
                    .ok_or_else(|| PolicyError::UnknownBackend {
                        route: route.name.clone(),
                        backend: backend.service.clone(),
                        port: backend.port,
                    })
            },
            |route| {
                Ok(RouteSettings {
                    timeout: route.timeout_ms.map(Duration::from_millis),
                    retries: route.retries.as_ref().map(RetryPolicy::new),
                })
            },
        )
        .map_err(|e| PolicyError::Service {
            service: key.clone(),
            source: Box::new(e),
        })?;
        let own = service
            .ports
            .iter()
            .filter_map(|p| {
                destinations
                    .get(&(key.clone(), p.port))
                    .map(|d| (p.port, Arc::clone(d)))
            })
            .collect();
        Ok(Self {
            service: key,
            routes,
            own,
            budget: carried_budget(service.retry_budget.as_ref(), previous),
            connect_timeout: Duration::from_millis(defaults.connect_timeout_ms),
            idle_timeout: Duration::from_millis(defaults.idle_timeout_ms),
            sources: sources.clone(),
        })
    }

    /// The service.
    pub fn service(&self) -> &ServiceRef {
        &self.service
    }

    /// The retry budget shared by the service's routes, with its counters.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// Routes a request sent to `port` of the service and picks its first endpoint.
    ///
    /// Fails fast, without sending anything, when the backend has no endpoints or a
    /// connection-pool limit is reached; [`Refusal::header`] says which.
    pub fn select(self: &Arc<Self>, port: u16, request: &Parts) -> Result<Decision, Refusal> {
        let now = self.sources.now();
        let route = self.routes.position(request);
        let destination = route
            .and_then(|i| self.routes.routes().get(i))
            .and_then(|r| r.split.pick(self.sources.random.next_u64()))
            .or_else(|| self.own(port))
            .ok_or(Refusal::UnknownPort(port))?;
        let request_slot = destination
            .try_acquire(Overflow::MaxRequests)
            .map_err(Refusal::Overflow)?;
        let attempt = destination.pick(None, now)?;
        self.budget.deposit(now);
        let timeout = self.route_settings(route).timeout;
        Ok(Decision {
            policy: Arc::clone(self),
            route,
            destination: Arc::clone(destination),
            idempotent: retry::is_idempotent(&request.method),
            deadline: timeout.map(|t| now.after(t)),
            attempts: 1,
            retries: 0,
            current: Some(attempt),
            last: None,
            _request: request_slot,
            retry_permit: None,
            stopped: None,
        })
    }

    fn own(&self, port: u16) -> Option<&Arc<Destination>> {
        self.own.iter().find(|(p, _)| *p == port).map(|(_, d)| d)
    }

    pub(crate) fn route_name(&self, route: Option<usize>) -> &str {
        route
            .and_then(|i| self.routes.routes().get(i))
            .map_or(DEFAULT_ROUTE, |r| r.name.as_str())
    }

    pub(crate) fn route_settings(&self, route: Option<usize>) -> &RouteSettings {
        route
            .and_then(|i| self.routes.routes().get(i))
            .map_or(&NO_ROUTE, |r| &r.extra)
    }

    /// The policy's state for `/config`.
    pub fn snapshot(&self) -> PolicySnapshot {
        PolicySnapshot {
            service: self.service.to_string(),
            routes: self
                .routes
                .routes()
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            retries_total: self.budget.retries_total(),
            retry_budget_exhausted_total: self.budget.exhausted_total(),
        }
    }
}

/// The service's budget: the previous one when its parameters are unchanged, otherwise a new
/// one that inherits the lifetime counters (and the window's counts when it has the same shape).
fn carried_budget(
    config: Option<&contract::RetryBudget>,
    previous: Option<&Policy>,
) -> Arc<RetryBudget> {
    let fresh = config.map_or_else(RetryBudget::default_budget, |b| {
        RetryBudget::new(
            b.ratio,
            b.min_retries_per_second,
            Duration::from_millis(b.window_ms),
        )
    });
    match previous {
        Some(p) if p.budget.same_parameters(&fresh) => Arc::clone(&p.budget),
        Some(p) => {
            fresh.inherit_totals(&p.budget);
            fresh.inherit_window(&p.budget);
            Arc::new(fresh)
        }
        None => Arc::new(fresh),
    }
}

/// A service's policy as `/config` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySnapshot {
    /// `namespace/name`.
    pub service: String,
    /// Route names in match order.
    pub routes: Vec<String>,
    /// Retries granted ever.
    pub retries_total: u64,
    /// Retries refused by the budget ever.
    pub retry_budget_exhausted_total: u64,
}

// ---------------------------------------------------------------------------------------------
// PolicySet

/// Every policy of one config, found by the address a connection was sent to.
#[derive(Debug)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    /// Cluster IP and port → index into `policies`.
    by_address: HashMap<SocketAddr, usize>,
    destinations: BTreeMap<(ServiceRef, u16), Arc<Destination>>,
    sources: Sources,
}

impl PolicySet {
    /// Compiles a config. State of `previous` carries over: per-endpoint state of endpoints that
    /// remain, connection-pool counters, lifetime totals and retry budgets.
    pub fn build(
        config: &ProxyConfig,
        previous: Option<&PolicySet>,
        sources: &Sources,
    ) -> Result<Self, PolicyError> {
        let mut destinations = BTreeMap::new();
        for service in &config.services {
            for port in &service.ports {
                let key = (service.key(), port.port);
                let before = previous.and_then(|p| p.destinations.get(&key));
                let destination = Destination::build(service, port, before.map(|d| &**d), sources);
                destinations.insert(key, Arc::new(destination));
            }
        }
        let mut policies = Vec::with_capacity(config.services.len());
        let mut by_address = HashMap::new();
        for service in &config.services {
            let before = previous.and_then(|p| p.policy(&service.key()));
            let policy = Policy::build(
                service,
                &config.defaults,
                &destinations,
                before.map(|p| &**p),
                sources,
            )?;
            for ip in &service.cluster_ips {
                for port in &service.ports {
                    by_address
                        .entry(SocketAddr::new(*ip, port.port))
                        .or_insert(policies.len());
                }
            }
            policies.push(Arc::new(policy));
        }
        Ok(Self {
            policies,
            by_address,
            destinations,
            sources: sources.clone(),
        })
    }

    /// A set with no services: every destination passes through.
    pub fn empty(sources: &Sources) -> Self {
        Self {
            policies: Vec::new(),
            by_address: HashMap::new(),
            destinations: BTreeMap::new(),
            sources: sources.clone(),
        }
    }

    /// The policy for a connection's original destination (a cluster IP and port), if a
    /// configured service owns it.
    pub fn for_destination(&self, dst: SocketAddr) -> Option<&Arc<Policy>> {
        self.by_address
            .get(&dst)
            .and_then(|&i| self.policies.get(i))
    }

    /// A service's policy.
    pub fn policy(&self, key: &ServiceRef) -> Option<&Arc<Policy>> {
        self.policies.iter().find(|p| p.service() == key)
    }

    /// Every policy, in config order.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// Every destination (service port), sorted by service then port.
    pub fn destinations(&self) -> impl Iterator<Item = &Arc<Destination>> {
        self.destinations.values()
    }

    /// The state of every policy and destination, for `/config`.
    pub fn snapshot(&self) -> PolicySetSnapshot {
        let now = self.sources.now();
        PolicySetSnapshot {
            services: self.policies.iter().map(|p| p.snapshot()).collect(),
            destinations: self.destinations().map(|d| d.snapshot(now)).collect(),
        }
    }
}

/// Everything the engine shows at `/config`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySetSnapshot {
    /// Per service: routes and retry counters.
    pub services: Vec<PolicySnapshot>,
    /// Per service port: endpoints and breaker state.
    pub destinations: Vec<DestinationSnapshot>,
}
