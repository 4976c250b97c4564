//! How big the benchmark is: the full scale, and a quick one that fits a shared 2-core
//! machine in minutes. Every load derived from it is bounded in count.

use std::collections::BTreeSet;
use std::time::Duration;

/// The shape of one run.
#[derive(Clone, Debug)]
pub struct Scale {
    /// `full` or `quick`, as the report names it.
    pub name: &'static str,
    /// Namespaces the Services and workloads are spread over (`bench-0` …).
    pub namespaces: usize,
    /// Services in all (selector-less, each with its own EndpointSlice).
    pub services: usize,
    /// Ready endpoints per Service.
    pub endpoints_per_service: usize,
    /// One Service in this many has a TrafficPolicy (the policy changes pick among them).
    pub policy_every: usize,
    /// Workloads (ServiceAccounts), gateways not counted.
    pub service_accounts: usize,
    /// Injected pods per workload; each runs one simulated stream client.
    pub pods_per_service_account: usize,
    /// Policy changes measured, one at a time.
    pub policy_changes: usize,
    /// Endpoint changes measured, one at a time.
    pub endpoint_changes: usize,
    /// The whole run gives up after this.
    pub budget: Duration,
}

/// The workloads that depend on every namespace (`<ns>/*` for each): they must be refused.
pub const GATEWAYS: usize = 2;

/// Median and p99 of the dependencies a workload names (the figures), and the most any
/// one names.
const DEPENDENCY_QUANTILES: [(f64, f64); 4] =
    [(0.0, 1.0), (0.5, 10.0), (0.99, 100.0), (1.0, 150.0)];

impl Scale {
    /// The scale: 10,000 Services × 5 endpoints, 1,000 ServiceAccounts, 10,000
    /// stream clients.
    pub fn full() -> Self {
        Self {
            name: "full",
            namespaces: 10,
            services: 10_000,
            endpoints_per_service: 5,
            policy_every: 10,
            service_accounts: 1_000,
            pods_per_service_account: 10,
            policy_changes: 10,
            endpoint_changes: 5,
            budget: Duration::from_secs(40 * 60),
        }
    }

    /// A tenth of the workloads and fleet, 4,000 Services (still enough that a gateway's view
    /// passes 1 MiB).
    pub fn quick() -> Self {
        Self {
            name: "quick",
            namespaces: 4,
            services: 4_000,
            endpoints_per_service: 5,
            policy_every: 10,
            service_accounts: 200,
            pods_per_service_account: 5,
            policy_changes: 6,
            endpoint_changes: 3,
            budget: Duration::from_secs(20 * 60),
        }
    }

    /// Simulated stream clients of ordinary workloads.
    pub fn clients(&self) -> usize {
        self.service_accounts * self.pods_per_service_account
    }

    /// Namespace of Service `i`.
    pub fn service_namespace(&self, i: usize) -> String {
        namespace(i % self.namespaces)
    }

    /// Namespace of workload `w`.
    pub fn workload_namespace(&self, w: usize) -> String {
        namespace(w % self.namespaces)
    }

    /// The Services (by index) that workload `w` names in its annotation. Deterministic: the
    /// counts follow [`DEPENDENCY_QUANTILES`] (geometric between the anchors), spread over the
    /// workloads in a shuffled order so the heavy ones are not all in one namespace.
    pub fn dependencies(&self) -> Vec<BTreeSet<usize>> {
        let mut rng = fastrand::Rng::with_seed(0x7a6d_656d);
        let mut ranks: Vec<usize> = (0..self.service_accounts).collect();
        rng.shuffle(&mut ranks);
        ranks
            .iter()
            .map(|&rank| {
                let u = (rank as f64 + 0.5) / self.service_accounts as f64;
                let count = (dependency_count(u).round() as usize).clamp(1, self.services);
                let mut chosen = BTreeSet::new();
                while chosen.len() < count {
                    chosen.insert(rng.usize(..self.services));
                }
                chosen
            })
            .collect()
    }

    /// Whether Service `i` has a TrafficPolicy.
    pub fn has_policy(&self, i: usize) -> bool {
        i.is_multiple_of(self.policy_every)
    }
}

/// `bench-<n>`.
pub fn namespace(n: usize) -> String {
    format!("bench-{n}")
}

/// The dependency count at quantile `u`: geometric interpolation between the anchors.
fn dependency_count(u: f64) -> f64 {
    let pair = DEPENDENCY_QUANTILES
        .windows(2)
        .find(|w| u <= w[1].0)
        .unwrap_or(&DEPENDENCY_QUANTILES[2..4]);
    let ((u0, d0), (u1, d1)) = (pair[0], pair[1]);
    let t = (u - u0) / (u1 - u0);
    (d0.ln() + t * (d1.ln() - d0.ln())).exp()
}

/// The annotation value naming `services` for a workload in `own` namespace.
pub fn annotation(scale: &Scale, own: &str, services: &BTreeSet<usize>) -> String {
    services
        .iter()
        .map(|&i| {
            let ns = scale.service_namespace(i);
            if ns == own {
                format!("svc-{i}")
            } else {
                format!("{ns}/svc-{i}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The gateways' annotation: every namespace, whole.
pub fn gateway_annotation(scale: &Scale) -> String {
    (0..scale.namespaces)
        .map(|n| format!("{}/*", namespace(n)))
        .collect::<Vec<_>>()
        .join(",")
}

/// p50 and p99 (nearest rank) of the dependency counts, and the largest.
pub fn dependency_summary(dependencies: &[BTreeSet<usize>]) -> (usize, usize, usize) {
    let mut counts: Vec<usize> = dependencies.iter().map(BTreeSet::len).collect();
    counts.sort_unstable();
    let at = |p: f64| counts[((counts.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), counts.last().copied().unwrap_or(0))
}
