//! The resilience benchmark: does the caller keep succeeding while a destination misbehaves?
//!
//! Three endpoints serve one service behind one tandem-proxy (one hop, as the client's
//! sidecar). One endpoint answers 503 to every second request from the start and is killed
//! outright (SIGKILL: connections reset, then refused) halfway through. A constant-rate load
//! runs the whole time. The run is repeated for each [`Mode`] of the service's policy, and for
//! each the caller's success rate is reported with the retries the budget granted per request
//! (the extra load the proxy put on the endpoints) and the ejections outlier detection made,
//! both read from the proxy's own `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tandem_crds::contract::ProxyConfig;
use tempfile::TempDir;

use crate::admin;
use crate::loadgen::{self, OpenLoop, Protocol, Target};
use crate::tandem::Ports;
use crate::topology::{TopologyError, free_port, spawn, tandem_child};

/// The policy the service runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No policy: every failure reaches the caller.
    NoPolicy,
    /// Retries (5xx, connect failure, reset), within the default retry budget.
    Retries,
    /// Retries and outlier detection.
    RetriesAndOutlierDetection,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Self; 3] = [
        Self::NoPolicy,
        Self::Retries,
        Self::RetriesAndOutlierDetection,
    ];

    /// How the report names the mode.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoPolicy => "no policy",
            Self::Retries => "retries",
            Self::RetriesAndOutlierDetection => "retries + outlier detection",
        }
    }

    /// The fields this mode adds to the service in the proxy config.
    fn policy(self) -> Value {
        let retries = json!({
            "routes": [{
                "name": "all",
                "retries": {
                    "attempts": 2,
                    "retryOn": ["5xx", "connectFailure", "reset"],
                    "backoffBaseMs": 5,
                    "backoffMaxMs": 50,
                },
            }],
        });
        match self {
            Self::NoPolicy => json!({}),
            Self::Retries => retries,
            Self::RetriesAndOutlierDetection => {
                let mut policy = retries;
                policy["circuitBreaker"] = json!({
                    "outlierDetection": {
                        "consecutive5xx": 3,
                        "consecutiveGatewayErrors": 0,
                        "intervalMs": 1000,
                        "baseEjectionTimeMs": 5000,
                        "maxEjectionTimeMs": 30000,
                        "maxEjectionPercent": 50,
                    },
                });
                policy
            }
        }
    }
}

/// How the proxy balances over the three endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// The default: peak-EWMA power of two choices, which already steers away from an endpoint
    /// whose failures make it look slow.
    PeakEwma,
    /// Round-robin: every endpoint gets its turn, so the policy alone shields the caller.
    RoundRobin,
}

impl Balancer {
    /// Both, in report order.
    pub const ALL: [Self; 2] = [Self::PeakEwma, Self::RoundRobin];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::PeakEwma => "peak-EWMA (default)",
            Self::RoundRobin => "round-robin",
        }
    }

    fn config_value(self) -> &'static str {
        match self {
            Self::PeakEwma => "peakEwma",
            Self::RoundRobin => "roundRobin",
        }
    }
}

/// Errors of the resilience benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ResilienceError {
    /// A process or file could not be set up.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The config the benchmark wrote is not a valid proxy config.
    #[error("proxy config: {0}")]
    Config(String),
    /// The load generator failed as a whole.
    #[error(transparent)]
    Load(#[from] loadgen::LoadError),
    /// The proxy's admin port did not answer.
    #[error("admin {addr}: {message}")]
    Admin {
        /// The admin address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// What one mode's run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// The policy.
    pub mode: Mode,
    /// The load balancer.
    pub balancer: Balancer,
    /// Requests the caller sent.
    pub requests: u64,
    /// Requests that got a 2xx.
    pub ok: u64,
    /// Success rate, in percent.
    pub success_percent: f64,
    /// Retries the proxy sent.
    pub retries: u64,
    /// Retries the budget refused.
    pub budget_exhausted: u64,
    /// Endpoint ejections.
    pub ejections: u64,
    /// Caller's p99 latency in milliseconds (successful requests, from intended send time).
    pub p99_ms: f64,
}

impl ModeResult {
    /// Retries per request, in percent: the extra load the proxy added.
    pub fn extra_load_percent(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.retries as f64 * 100.0 / self.requests as f64
        }
    }
}

/// The shape of one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Requests per second.
    pub rate: u64,
    /// Length of each mode's run; the failing endpoint is killed at half of it.
    pub length: Duration,
}

/// Runs every mode and returns their results in [`Mode::ALL`] order.
pub async fn run(
    bench: &Path,
    proxy: &Path,
    plan: Plan,
) -> Result<Vec<ModeResult>, ResilienceError> {
    let mut results = Vec::new();
    for (balancer, mode) in Balancer::ALL
        .into_iter()
        .flat_map(|b| Mode::ALL.map(|m| (b, m)))
    {
        println!(
            "resilience: {}, {} — {} req/s for {} s, the failing endpoint killed at {} s",
            balancer.label(),
            mode.label(),
            plan.rate,
            plan.length.as_secs(),
            plan.length.as_secs() / 2
        );
        let result = run_mode(bench, proxy, plan, balancer, mode).await?;
        println!(
            "  success {:.3}% ({} of {}), retries {} (+{:.1}% load), budget refusals {}, ejections {}",
            result.success_percent,
            result.ok,
            result.requests,
            result.retries,
            result.extra_load_percent(),
            result.budget_exhausted,
            result.ejections
        );
        results.push(result);
    }
    Ok(results)
}

/// Processes of one mode's run, killed when dropped.
struct Fleet {
    children: Vec<Child>,
    dir: TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_endpoint(
    bench: &Path,
    dir: &Path,
    name: &str,
    fail_every: Option<u64>,
) -> Result<(Child, SocketAddr), TopologyError> {
    let addr = free_port()?;
    let mut command = Command::new(bench);
    command
        .arg("upstream")
        .arg("--listen")
        .arg(addr.to_string());
    if let Some(every) = fail_every {
        command.arg("--fail-every").arg(every.to_string());
    }
    Ok((spawn(dir, &format!("{name}.log"), &mut command)?, addr))
}

/// The client proxy's config: one service on a made-up cluster address whose three endpoints
/// are the upstreams.
fn config(
    cluster: SocketAddr,
    endpoints: &[SocketAddr],
    balancer: Balancer,
    mode: Mode,
) -> Result<String, String> {
    let mut service = json!({
        "name": "upstream",
        "namespace": "bench",
        "clusterIps": [cluster.ip()],
        "ports": [{
            "name": "http",
            "port": cluster.port(),
            "protocol": "http",
            "endpoints": endpoints.iter().map(|e| json!({"address": e})).collect::<Vec<_>>(),
        }],
        "loadBalancer": balancer.config_value(),
    });
    if let (Some(s), Value::Object(policy)) = (service.as_object_mut(), mode.policy()) {
        s.extend(policy);
    }
    let config = json!({
        "apiVersion": tandem_crds::contract::PROXY_CONFIG_API_VERSION,
        "version": "bench-resilience",
        "workload": {"namespace": "bench", "serviceAccount": "client"},
        "services": [service],
    });
    let text = config.to_string();
    ProxyConfig::from_json(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(text)
}

async fn run_mode(
    bench: &Path,
    proxy: &Path,
    plan: Plan,
    balancer: Balancer,
    mode: Mode,
) -> Result<ModeResult, ResilienceError> {
    let mut fleet = Fleet {
        children: Vec::new(),
        dir: TempDir::new().map_err(|source| TopologyError::Io {
            what: "create a temp dir".into(),
            source,
        })?,
    };
    let dir = fleet.dir.path().to_path_buf();
    let mut endpoints = Vec::new();
    for (name, fail_every) in [("good-1", None), ("good-2", None), ("flaky", Some(2))] {
        let (child, addr) = start_endpoint(bench, &dir, name, fail_every)?;
        fleet.children.push(child);
        endpoints.push(addr);
    }
    let flaky = fleet.children.len() - 1;
    // Any address works as the service's: the proxy matches the Host header against it.
    let cluster = free_port()?;
    let config = config(cluster, &endpoints, balancer, mode).map_err(ResilienceError::Config)?;
    let ports = Ports::free()?;
    fleet
        .children
        .push(tandem_child(&dir, proxy, "tandem", &ports, &config)?);

    let target = Target {
        addr: ports.outbound,
        authority: cluster.to_string(),
        protocol: Protocol::Http1,
    };
    for endpoint in &endpoints {
        let direct = Target {
            addr: *endpoint,
            authority: endpoint.to_string(),
            protocol: Protocol::Http1,
        };
        // The flaky endpoint's readiness probe may draw a 503; only reachability matters.
        let _ = loadgen::wait_ready(&direct, Duration::from_secs(10)).await;
    }
    loadgen::wait_ready(&target, Duration::from_secs(10)).await?;
    let before = PolicyCounters::read(ports.admin).await?;

    let params = OpenLoop {
        rate: plan.rate,
        length: plan.length,
        in_flight: 64,
        h2_connections: 1,
        timeout: Duration::from_secs(5),
    };
    let load = loadgen::open_loop(&target, &params);
    let kill = async {
        tokio::time::sleep(plan.length / 2).await;
        if let Some(child) = fleet.children.get_mut(flaky) {
            let _ = child.kill();
            let _ = child.wait();
        }
    };
    let (outcome, ()) = tokio::join!(load, kill);
    let outcome = outcome?;
    let after = PolicyCounters::read(ports.admin).await?;
    let s = outcome.summary;
    let requests = s.ok + s.errors;
    Ok(ModeResult {
        mode,
        balancer,
        requests,
        ok: s.ok,
        success_percent: if requests == 0 {
            0.0
        } else {
            s.ok as f64 * 100.0 / requests as f64
        },
        retries: after.retries.saturating_sub(before.retries),
        budget_exhausted: after
            .budget_exhausted
            .saturating_sub(before.budget_exhausted),
        ejections: after.ejections.saturating_sub(before.ejections),
        p99_ms: s.p99,
    })
}

/// The resilience engine's counters for the benchmark's service, from `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PolicyCounters {
    retries: u64,
    budget_exhausted: u64,
    ejections: u64,
}

impl PolicyCounters {
    async fn read(admin: SocketAddr) -> Result<Self, ResilienceError> {
        let text = admin::get(admin, "/metrics")
            .await
            .map_err(|e| ResilienceError::Admin {
                addr: admin,
                message: e.to_string(),
            })?;
        Ok(Self::parse(&text))
    }

    /// Sums each counter over its series (a service without a policy has none: zero).
    fn parse(text: &str) -> Self {
        let sum = |name: &str| admin::counter_sum(text, name, &[]);
        Self {
            retries: sum("tandem_retries_total"),
            budget_exhausted: sum("tandem_retry_budget_exhausted_total"),
            ejections: sum("tandem_ejections_total"),
        }
    }
}

/// The Markdown section of the report.
pub fn markdown(results: &[ModeResult], plan: Plan, command: &str) -> String {
    let mut out = String::new();
    out.push_str("## Resilience: success rate while an endpoint misbehaves\n\n");
    out.push_str(&format!(
        "Three endpoints behind one tandem-proxy; one answers 503 to every second request and is \
         killed (SIGKILL) at {} s. Constant load of {} req/s for {} s per policy, HTTP/1.1, 64 \
         connections. Each policy runs under the default balancer (peak-EWMA, which by itself \
         steers away from an endpoint whose failures make it look slow) and under round-robin \
         (every endpoint gets its turn, so the policy alone shields the caller). Retries: 2 attempts on 5xx, connect failure and reset, the default budget \
         (20% of requests + 10/s over 10 s). Outlier detection: 3 consecutive 5xx, 5 s base \
         ejection, at most 50% ejected. Retries and ejections are the proxy's own counters.\n\n",
        plan.length.as_secs() / 2,
        plan.rate,
        plan.length.as_secs()
    ));
    out.push_str("| load balancer | policy | requests | succeeded | success rate | p99 (ms) | retries | extra load | budget refusals | ejections |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3}% | {:.2} | {} | {:.1}% | {} | {} |\n",
            r.balancer.label(),
            r.mode.label(),
            r.requests,
            r.ok,
            r.success_percent,
            r.p99_ms,
            r.retries,
            r.extra_load_percent(),
            r.budget_exhausted,
            r.ejections
        ));
    }
    out.push_str(&format!("\nReproduce: `{command}`\n"));
    out
}

/// Where the report goes: `resilience.md`, or `quick-resilience.md` for the short run.
pub fn report_path(out: &Path, quick: bool) -> PathBuf {
    out.join(if quick {
        "quick-resilience.md"
    } else {
        "resilience.md"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_renders_a_config_the_proxy_contract_accepts() {
        let endpoints: Vec<SocketAddr> = ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let cluster: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        for (balancer, mode) in Balancer::ALL
            .into_iter()
            .flat_map(|b| Mode::ALL.map(|m| (b, m)))
        {
            let text = config(cluster, &endpoints, balancer, mode).unwrap();
            let parsed = ProxyConfig::from_json(text.as_bytes()).unwrap();
            let service = &parsed.services[0];
            assert_eq!(service.ports[0].endpoints.len(), 3);
            assert_eq!(service.routes.is_empty(), mode == Mode::NoPolicy);
            assert_eq!(
                service.circuit_breaker.is_some(),
                mode == Mode::RetriesAndOutlierDetection
            );
        }
    }

    #[test]
    fn counters_are_summed_over_their_series_and_absent_ones_are_zero() {
        let text = "# HELP tandem_retries Retries\n\
            tandem_retries_total{dst_service=\"bench/upstream\"} 12\n\
            tandem_retries_total{dst_service=\"bench/other\"} 3\n\
            tandem_ejections_total{dst_service=\"bench/upstream\",port=\"80\"} 2\n\
            tandem_requests_total{direction=\"outbound\",dst_service=\"bench/upstream\"} 900\n";
        assert_eq!(
            PolicyCounters::parse(text),
            PolicyCounters {
                retries: 15,
                budget_exhausted: 0,
                ejections: 2
            }
        );
    }

    #[test]
    fn extra_load_is_retries_per_request() {
        let r = ModeResult {
            mode: Mode::Retries,
            balancer: Balancer::RoundRobin,
            requests: 1000,
            ok: 999,
            success_percent: 99.9,
            retries: 150,
            budget_exhausted: 0,
            ejections: 0,
            p99_ms: 1.0,
        };
        assert!((r.extra_load_percent() - 15.0).abs() < 1e-9);
    }
}
