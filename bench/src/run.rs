//! The orchestrator: starts the upstream once, then, round after round, each topology in turn
//! (order reversed on every other round), drives the loads at it, reads the proxy's CPU time
//! and memory from `/proc`, checks that the proxies counted the requests, and stops it. Only
//! one topology runs at a time. Where the topologies run is a [`Stage`]: loopback here, the
//! capture run's network namespaces in [`crate::capture`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::admin::{self, Probe};
use crate::loadgen::{
    self, ClosedLoop, LoadError, ManyConnections, OpenLoop, Protocol, RunOutcome,
};
use crate::procfs;
use crate::stats::{LatencySummary, cpu_seconds_per_10k};
use crate::tandem::TraceReading;
use crate::topology::{self, Running, Tools, Topology, TopologyError};

/// What to run and for how long.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// `quick` or `full`.
    pub mode: String,
    /// Rounds over all topologies.
    pub rounds: usize,
    /// Constant rates, requests/second.
    pub rates: Vec<u64>,
    /// Protocols of the constant-rate runs.
    pub fixed_protocols: Vec<Protocol>,
    /// Length of each measured constant-rate run.
    pub fixed_length: Duration,
    /// Unmeasured run at the same load before each measured one.
    pub warmup: Duration,
    /// Requests in flight at most during a constant-rate run.
    pub in_flight: usize,
    /// h2c connections the in-flight requests share.
    pub h2_connections: usize,
    /// Protocols of the maximum-throughput runs.
    pub max_protocols: Vec<Protocol>,
    /// Connections (HTTP/1.1) or streams (h2c) of the maximum-throughput run.
    pub max_in_flight: usize,
    /// Length of each maximum-throughput run.
    pub max_length: Duration,
    /// Connections of the many-connections run.
    pub many_connections: usize,
    /// Waves of one request per connection.
    pub many_waves: usize,
    /// The many-connections run happens in the first this-many rounds.
    pub many_rounds: usize,
    /// Per-request limit.
    pub timeout: Duration,
    /// Size of the upstream's answer.
    pub body_bytes: usize,
    /// Topologies to measure.
    pub topologies: Vec<Topology>,
    /// Topologies the user left out (`--skip`, or not named by `--only`): the report says so.
    #[serde(default)]
    pub excluded: Vec<Exclusion>,
}

/// A topology the user left out of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// Which topology.
    pub topology: Topology,
    /// Why it could not have run here anyway, if so.
    pub unavailable: Option<String>,
}

/// Which topologies a run measures and which the user left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// To measure, in report order.
    pub measure: Vec<Topology>,
    /// Left out by the user, in report order.
    pub excluded: Vec<Exclusion>,
}

/// Why a run was refused before anything started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Topologies asked for (not left out) that cannot run here, each with why.
    #[error("{}", unavailable_message(.0))]
    Unavailable(Vec<(Topology, String)>),
    /// `--only` and `--skip` left nothing.
    #[error("every topology is left out (--only, --skip): nothing to measure")]
    NothingToMeasure,
}

fn unavailable_message(missing: &[(Topology, String)]) -> String {
    let mut text = String::from(
        "refusing to run: these topologies cannot run here, and a report without them would \
         hide them:",
    );
    for (topology, why) in missing {
        text.push_str(&format!("\n  {}: {why}", topology.name()));
    }
    let names: Vec<&str> = missing.iter().map(|(t, _)| t.arg_name()).collect();
    let flags: Vec<String> = names.iter().map(|n| format!("--skip {n}")).collect();
    text.push_str(&format!(
        "\nprovide what is missing, or leave them out explicitly: {} (make bench BENCH_SKIP=\"{}\")",
        flags.join(" "),
        names.join(" ")
    ));
    text
}

/// The topologies of `all` to measure: those `only` names (all when it is empty) and `skip`
/// does not. One asked for that cannot run here (`missing` says why) refuses the whole run:
/// a benchmark that quietly dropped its subject would report on something else. What the
/// user left out is kept, with whether it could have run, for the report.
pub fn select(
    all: &[Topology],
    only: &[Topology],
    skip: &[Topology],
    missing: impl Fn(Topology) -> Option<String>,
) -> Result<Selection, SelectError> {
    let mut selection = Selection {
        measure: Vec::new(),
        excluded: Vec::new(),
    };
    let mut unavailable = Vec::new();
    for &topology in all {
        let asked = (only.is_empty() || only.contains(&topology)) && !skip.contains(&topology);
        let why = missing(topology);
        if !asked {
            selection.excluded.push(Exclusion {
                topology,
                unavailable: why,
            });
        } else if let Some(why) = why {
            unavailable.push((topology, why));
        } else {
            selection.measure.push(topology);
        }
    }
    if !unavailable.is_empty() {
        return Err(SelectError::Unavailable(unavailable));
    }
    if selection.measure.is_empty() {
        return Err(SelectError::NothingToMeasure);
    }
    Ok(selection)
}

/// Where a run's topologies are started.
pub trait Stage {
    /// Why `topology` cannot run here, or `None` when it can.
    fn missing(&self, topology: Topology) -> Option<String>;
    /// Starts `topology`; dropping the result stops it.
    fn start(&self, topology: Topology) -> Result<Running, TopologyError>;
}

/// The loopback run: every process on 127.0.0.1, in front of one upstream.
struct Loopback<'a> {
    tools: &'a Tools,
    upstream: SocketAddr,
}

impl Stage for Loopback<'_> {
    fn missing(&self, topology: Topology) -> Option<String> {
        self.tools.missing(topology)
    }

    fn start(&self, topology: Topology) -> Result<Running, TopologyError> {
        topology::start(topology, self.tools, self.upstream)
    }
}

impl Plan {
    /// The full run: 5 rounds of 10-second runs.
    pub fn full() -> Self {
        Self {
            mode: "full".into(),
            rounds: 5,
            rates: vec![1_000, 5_000],
            fixed_protocols: vec![Protocol::Http1, Protocol::H2c],
            fixed_length: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            in_flight: 32,
            h2_connections: 4,
            max_protocols: vec![Protocol::Http1, Protocol::H2c],
            max_in_flight: 64,
            max_length: Duration::from_secs(10),
            many_connections: 10_000,
            many_waves: 3,
            many_rounds: 5,
            timeout: Duration::from_secs(10),
            body_bytes: 32,
            topologies: Topology::ALL.to_vec(),
            excluded: Vec::new(),
        }
    }

    /// The capture run: the constant-rate runs only, over [`Topology::CAPTURE`]; 5 rounds of
    /// 10-second runs, or with `quick` 2 rounds of 1.5-second runs.
    pub fn capture(quick: bool) -> Self {
        let base = if quick { Self::quick() } else { Self::full() };
        Self {
            max_protocols: Vec::new(),
            many_rounds: 0,
            topologies: Topology::CAPTURE.to_vec(),
            ..base
        }
    }

    /// `QUICK=1`: the same scenarios, 2 rounds of short runs, 10,000 connections once.
    pub fn quick() -> Self {
        Self {
            mode: "quick".into(),
            rounds: 2,
            fixed_length: Duration::from_millis(1_500),
            warmup: Duration::from_millis(500),
            max_length: Duration::from_millis(1_500),
            many_waves: 1,
            many_rounds: 1,
            ..Self::full()
        }
    }

    /// Expected wall time, from the scenario lengths plus a few seconds per start, the
    /// many-connections run and the tracing topologies' wait for their last spans.
    pub fn estimate(&self, measured: usize) -> Duration {
        let fixed = (self.fixed_length + self.warmup)
            * (self.rates.len() * self.fixed_protocols.len()) as u32;
        let max = self.max_length * self.max_protocols.len() as u32;
        let start = Duration::from_secs(2);
        let per_round = (fixed + max + start) * measured as u32;
        let many = if self.many_rounds == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(10 + 3 * self.many_waves as u64) * measured as u32
        };
        // A tracing topology waits for its proxies' last batch before its spans are read.
        let traced = self
            .topologies
            .iter()
            .filter(|t| t.sampling_percent().is_some())
            .count() as u32;
        per_round * self.rounds as u32
            + many * self.many_rounds.min(self.rounds) as u32
            + TRACE_SETTLE * traced * self.rounds as u32
    }
}

/// One constant-rate run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FixedResult {
    /// Wire protocol.
    pub protocol: Protocol,
    /// Requests/second.
    pub rate: u64,
    /// Latencies from intended send times.
    pub latency: LatencySummary,
    /// CPU cores the proxy used during the run.
    pub proxy_cores: Option<f64>,
    /// TLS handshakes per second between the hops during the run (mutual-TLS topologies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_per_second: Option<f64>,
}

/// One maximum-throughput run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxResult {
    /// Wire protocol.
    pub protocol: Protocol,
    /// Completed requests/second.
    pub rps: f64,
    /// Failed requests.
    pub errors: u64,
    /// Proxy CPU seconds per 10,000 requests.
    pub cpu_per_10k: Option<f64>,
    /// TLS handshakes per second between the hops during the run (mutual-TLS topologies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_per_second: Option<f64>,
}

/// The many-connections run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManyResult {
    /// Connections asked for.
    pub connections: usize,
    /// Connections that could not be opened.
    pub connect_errors: u64,
    /// Latencies of every wave pooled; errors include failed connects.
    pub latency: LatencySummary,
    /// Proxy VmRSS with the connections open, after the first wave.
    pub rss_kib: Option<u64>,
    /// TLS handshakes between the hops over the whole run, opening included (mutual-TLS
    /// topologies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes: Option<u64>,
}

/// Everything measured of one topology in one round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundResult {
    /// Constant-rate runs.
    pub fixed: Vec<FixedResult>,
    /// Maximum-throughput runs.
    pub max: Vec<MaxResult>,
    /// The many-connections run, in the rounds that have it.
    pub many: Option<ManyResult>,
    /// Proxy VmRSS once started and answered one request.
    pub idle_rss_kib: Option<u64>,
    /// Proxy peak VmRSS (VmHWM) after the constant-rate and throughput runs.
    pub load_rss_kib: Option<u64>,
    /// A tracing topology's spans over the round (since its proxies started: every run of
    /// the round, readiness checks and warm-ups included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceRound>,
}

/// What a tracing topology exported over one round, and the requests it traced them from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceRound {
    /// Spans exported and dropped, sink POSTs and bytes (both proxies).
    pub reading: TraceReading,
    /// Requests the client sidecar routed over the same window.
    pub requests: u64,
}

impl TraceRound {
    /// Spans (exported or dropped) per request: 2 when every request is traced (the client
    /// sidecar's CLIENT span and the server sidecar's SERVER span).
    pub fn spans_per_request(&self) -> Option<f64> {
        let spans = self.reading.spans.exported + self.reading.spans.dropped;
        (self.requests > 0).then(|| spans as f64 / self.requests as f64)
    }
}

/// How long the proxies may hold a span before exporting it: the proxy's `--trace-flush`
/// default (5 s after a batch's first span), plus a second. A round's spans are read that long
/// after its last request, so none is still queued.
pub const TRACE_SETTLE: Duration = Duration::from_secs(6);

/// All rounds of one topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopologyRun {
    /// Which topology.
    pub topology: Topology,
    /// One entry per round; `None` where the round failed (see `failures`).
    pub rounds: Vec<Option<RoundResult>>,
    /// What went wrong in failed rounds.
    pub failures: Vec<String>,
}

/// The whole run, as the report is written from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// What was run.
    pub plan: Plan,
    /// Per topology.
    pub topologies: Vec<TopologyRun>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Errors that end the whole run (a single topology's failure in a round does not).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A planned topology cannot run here.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// Starting the upstream failed.
    #[error("upstream: {0}")]
    Upstream(#[from] topology::TopologyError),
    /// The upstream never answered.
    #[error("upstream not ready: {0}")]
    UpstreamNotReady(LoadError),
}

/// A progress line on stderr, stamped with the time since the run began.
struct Progress {
    start: Instant,
}

impl Progress {
    fn say(&self, line: &str) {
        let t = self.start.elapsed().as_secs();
        eprintln!("[{:02}:{:02}] {line}", t / 60, t % 60);
    }
}

/// Runs `plan` on loopback with `tools` and returns every figure; refused when a planned
/// topology cannot run (see [`select`]).
pub async fn run(plan: &Plan, tools: &Tools) -> Result<RunResult, RunError> {
    let upstream = topology::start_upstream(tools, plan.body_bytes)?;
    loadgen::wait_ready(&upstream.target(Protocol::Http1), Duration::from_secs(15))
        .await
        .map_err(RunError::UpstreamNotReady)?;
    let stage = Loopback {
        tools,
        upstream: upstream.http1,
    };
    let result = run_on(plan, &stage).await;
    drop(upstream);
    Ok(result?)
}

/// Every planned topology can run, or the ones that cannot, with why.
fn check_available(
    plan: &Plan,
    missing: &dyn Fn(Topology) -> Option<String>,
) -> Result<(), SelectError> {
    let unavailable: Vec<_> = plan
        .topologies
        .iter()
        .filter_map(|&t| missing(t).map(|why| (t, why)))
        .collect();
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(SelectError::Unavailable(unavailable))
    }
}

/// Runs `plan`'s rounds over the topologies `stage` starts (its upstream already answers)
/// and returns every figure; refused when `stage` cannot start one of them.
pub async fn run_on(plan: &Plan, stage: &dyn Stage) -> Result<RunResult, SelectError> {
    check_available(plan, &|t| stage.missing(t))?;
    let progress = Progress {
        start: Instant::now(),
    };
    let ticks = procfs::clock_ticks_per_second();
    let mut runs: Vec<TopologyRun> = plan
        .topologies
        .iter()
        .map(|&topology| TopologyRun {
            topology,
            rounds: Vec::new(),
            failures: Vec::new(),
        })
        .collect();
    for excluded in &plan.excluded {
        progress.say(&format!(
            "{}: left out (--skip, --only)",
            excluded.topology.name()
        ));
    }
    progress.say(&format!(
        "{} run: {} rounds over {} topologies, about {} min",
        plan.mode,
        plan.rounds,
        runs.len(),
        plan.estimate(runs.len()).as_secs().div_ceil(60)
    ));
    for round in 0..plan.rounds {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        // Reverse every other round so no topology always runs first (or last) on a warm box.
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let run = &mut runs[index];
            let scene = Scene {
                plan,
                round,
                ticks,
                progress: &progress,
            };
            match scene.measure(run.topology, stage).await {
                Ok(result) => run.rounds.push(Some(result)),
                Err(reason) => {
                    progress.say(&format!(
                        "round {}: {} failed: {reason}",
                        round + 1,
                        run.topology.name()
                    ));
                    run.failures.push(format!("round {}: {reason}", round + 1));
                    run.rounds.push(None);
                }
            }
        }
    }
    Ok(RunResult {
        plan: plan.clone(),
        topologies: runs,
        elapsed: progress.start.elapsed(),
    })
}

/// One topology in one round.
struct Scene<'a> {
    plan: &'a Plan,
    round: usize,
    ticks: f64,
    progress: &'a Progress,
}

impl Scene<'_> {
    fn say(&self, topology: Topology, what: &str) {
        self.progress.say(&format!(
            "round {}/{} {}: {what}",
            self.round + 1,
            self.plan.rounds,
            topology.name()
        ));
    }

    fn cpu(&self, pids: &[u32]) -> Option<f64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter()
            .map(|&pid| procfs::cpu_seconds(pid, self.ticks).ok())
            .sum()
    }

    fn rss(pids: &[u32], read: fn(u32) -> Result<u64, procfs::ProcError>) -> Option<u64> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().map(|&pid| read(pid).ok()).sum()
    }

    async fn measure(&self, topology: Topology, stage: &dyn Stage) -> Result<RoundResult, String> {
        let running = stage.start(topology).map_err(|e| e.to_string())?;
        // A mutual-TLS topology proves it is one before anything is measured through it.
        let baseline = match &running.mtls {
            Some(check) => Some(
                check
                    .before(Duration::from_secs(20))
                    .await
                    .map_err(|e| format!("mutual TLS: {e}\n{}", running.logs()))?,
            ),
            None => None,
        };
        let probe = running.target(Protocol::Http1);
        if let Err(e) = loadgen::wait_ready(&probe, Duration::from_secs(20)).await {
            return Err(format!("not ready: {e}\n{}", running.logs()));
        }
        if let (Some(check), Some(baseline)) = (&running.mtls, baseline) {
            check
                .handshaken(baseline)
                .await
                .map_err(|e| format!("mutual TLS: {e}\n{}", running.logs()))?;
        }
        let mut result = RoundResult {
            idle_rss_kib: Self::rss(&running.pids, procfs::rss_kib),
            ..RoundResult::default()
        };
        for &rate in &self.plan.rates {
            for &protocol in &self.plan.fixed_protocols {
                let fixed = self.fixed(&running, protocol, rate).await?;
                self.say(
                    topology,
                    &format!(
                        "{} {rate} req/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} errors",
                        protocol.label(),
                        fixed.latency.p50,
                        fixed.latency.p99,
                        fixed.latency.p999,
                        fixed.latency.errors
                    ),
                );
                result.fixed.push(fixed);
            }
        }
        for &protocol in &self.plan.max_protocols {
            let max = self.max(&running, protocol).await?;
            let cpu = max
                .cpu_per_10k
                .map(|c| format!(", proxy {c:.3} CPU s per 10k requests"))
                .unwrap_or_default();
            self.say(
                topology,
                &format!(
                    "{} max, {} in flight: {:.0} req/s{cpu}, {} errors",
                    protocol.label(),
                    self.plan.max_in_flight,
                    max.rps,
                    max.errors
                ),
            );
            result.max.push(max);
        }
        result.load_rss_kib = Self::rss(&running.pids, procfs::peak_rss_kib);
        if self.round < self.plan.many_rounds {
            let many = self.many(&running).await?;
            self.say(
                topology,
                &format!(
                    "{} connections x {} waves: p99 {:.1} ms, max {:.1} ms, {} errors, proxy RSS {}",
                    many.connections,
                    self.plan.many_waves,
                    many.latency.p99,
                    many.latency.max,
                    many.latency.errors,
                    many.rss_kib
                        .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into())
                ),
            );
            result.many = Some(many);
        }
        if running.traced.is_some() {
            let trace = trace_round(&running).await?;
            self.say(
                topology,
                &format!(
                    "{} spans exported, {} dropped, {} per request; sink {} POSTs, {:.1} KiB",
                    trace.reading.spans.exported,
                    trace.reading.spans.dropped,
                    trace
                        .spans_per_request()
                        .map_or_else(|| "-".into(), |s| format!("{s:.3}")),
                    trace.reading.sink_posts,
                    trace.reading.sink_bytes as f64 / 1024.0
                ),
            );
            result.trace = Some(trace);
        }
        Ok(result)
    }

    async fn fixed(
        &self,
        running: &Running,
        protocol: Protocol,
        rate: u64,
    ) -> Result<FixedResult, String> {
        let target = running.target(protocol);
        let mut params = OpenLoop {
            rate,
            length: self.plan.warmup,
            in_flight: self.plan.in_flight,
            h2_connections: self.plan.h2_connections,
            timeout: self.plan.timeout,
        };
        loadgen::open_loop(&target, &params)
            .await
            .map_err(|e| format!("warm-up: {e}"))?;
        params.length = self.plan.fixed_length;
        let counted = count(&running.probes).await?;
        let handshakes = handshakes(running).await?;
        let before = self.cpu(&running.pids);
        let outcome = loadgen::open_loop(&target, &params)
            .await
            .map_err(|e| e.to_string())?;
        let after = self.cpu(&running.pids);
        let handshakes = handshakes_since(running, handshakes).await?;
        // Proof that the requests took the topology's path: every proxy on it counted them.
        for (probe, before) in running.probes.iter().zip(counted) {
            let now = probe.read().await.map_err(|e| e.to_string())?;
            admin::check_counted(
                &probe.label,
                now.saturating_sub(before),
                outcome.summary.ok,
                outcome.summary.errors,
            )?;
        }
        let proxy_cores = cpu_delta(before, after).map(|s| s / outcome.elapsed.as_secs_f64());
        Ok(FixedResult {
            protocol,
            rate,
            latency: outcome.summary,
            proxy_cores,
            handshakes_per_second: per_second(handshakes, &outcome),
        })
    }

    async fn max(&self, running: &Running, protocol: Protocol) -> Result<MaxResult, String> {
        let target = running.target(protocol);
        let params = ClosedLoop {
            in_flight: self.plan.max_in_flight,
            h2_connections: self.plan.h2_connections,
            length: self.plan.max_length,
            timeout: self.plan.timeout,
        };
        let handshakes = handshakes(running).await?;
        let before = self.cpu(&running.pids);
        let outcome: RunOutcome = loadgen::closed_loop(&target, &params)
            .await
            .map_err(|e| e.to_string())?;
        let after = self.cpu(&running.pids);
        let handshakes = handshakes_since(running, handshakes).await?;
        Ok(MaxResult {
            protocol,
            rps: outcome.throughput(),
            errors: outcome.summary.errors,
            cpu_per_10k: cpu_delta(before, after)
                .and_then(|s| cpu_seconds_per_10k(s, outcome.summary.ok)),
            handshakes_per_second: per_second(handshakes, &outcome),
        })
    }

    async fn many(&self, running: &Running) -> Result<ManyResult, String> {
        let target = running.target(Protocol::Http1);
        let handshakes_before = handshakes(running).await?;
        let mut conns = ManyConnections::open(&target, self.plan.many_connections, 256)
            .await
            .map_err(|e| e.to_string())?;
        let mut histogram = loadgen::latency_histogram().map_err(|e| e.to_string())?;
        let mut errors = conns.connect_errors;
        let mut rss_kib = None;
        for wave in 0..self.plan.many_waves {
            let outcome = conns
                .wave(self.plan.timeout)
                .await
                .map_err(|e| e.to_string())?;
            errors += outcome.summary.errors;
            merge(&mut histogram, &outcome)?;
            if wave == 0 {
                rss_kib = Self::rss(&running.pids, procfs::rss_kib);
            }
        }
        // Read with the connections still open: closing 10,000 of them first would only
        // add teardown to the wait.
        let handshakes = handshakes_since(running, handshakes_before).await?;
        let connect_errors = conns.connect_errors;
        drop(conns);
        Ok(ManyResult {
            connections: self.plan.many_connections,
            connect_errors,
            latency: LatencySummary::from_micros(&histogram, errors),
            rss_kib,
            handshakes,
        })
    }
}

/// The mutual-TLS topology's handshake counter now (`None`: not a mutual-TLS topology).
async fn handshakes(running: &Running) -> Result<Option<u64>, String> {
    match &running.mtls {
        Some(check) => check.handshakes.read().await.map(Some),
        None => Ok(None),
    }
}

/// A tracing topology's spans over the round: the proxies' totals (each round starts them
/// afresh, so the round is everything since they started, readiness checks and warm-ups
/// included), read [`TRACE_SETTLE`] after the last request so that none is still queued, and
/// the client sidecar's total of requests routed. With every request traced, a round that
/// exported nothing did not trace: it fails, rather than report tracing's cost from proxies
/// that were not tracing.
async fn trace_round(running: &Running) -> Result<TraceRound, String> {
    let Some(traced) = &running.traced else {
        return Err("tracing: the topology has no export path".into());
    };
    tokio::time::sleep(TRACE_SETTLE).await;
    let reading = traced.read().await.map_err(|e| format!("tracing: {e}"))?;
    let requests = match running.probes.first() {
        Some(probe) => probe.read().await.map_err(|e| e.to_string())?,
        None => return Err("tracing: no request counter to relate the spans to".into()),
    };
    let round = TraceRound { reading, requests };
    if traced.sampling_percent >= 100.0 && requests > 0 && reading.spans.exported == 0 {
        return Err(format!(
            "tracing at 100 %: {requests} requests, no span exported ({} dropped)",
            reading.spans.dropped
        ));
    }
    Ok(round)
}

/// Handshakes since the reading `before` (see [`handshakes`]).
async fn handshakes_since(running: &Running, before: Option<u64>) -> Result<Option<u64>, String> {
    let (Some(check), Some(before)) = (&running.mtls, before) else {
        return Ok(None);
    };
    let now = check.handshakes.read().await?;
    Ok(Some(check.handshakes.between(before, now)))
}

fn per_second(count: Option<u64>, outcome: &RunOutcome) -> Option<f64> {
    let secs = outcome.elapsed.as_secs_f64();
    count.filter(|_| secs > 0.0).map(|c| c as f64 / secs)
}

/// Every probe's counter now.
async fn count(probes: &[Probe]) -> Result<Vec<u64>, String> {
    let mut counts = Vec::with_capacity(probes.len());
    for probe in probes {
        counts.push(probe.read().await.map_err(|e| e.to_string())?);
    }
    Ok(counts)
}

/// Pools a wave's recorded latencies into `into`.
fn merge(into: &mut hdrhistogram::Histogram<u64>, outcome: &RunOutcome) -> Result<(), String> {
    into.add(&outcome.histogram).map_err(|e| e.to_string())
}

fn cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?).filter(|d| *d >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the tandem topologies are missing, as on a clone where tandem-proxy is not built.
    fn no_tandem(topology: Topology) -> Option<String> {
        topology
            .is_tandem()
            .then(|| "no tandem-proxy given".to_string())
    }

    #[test]
    fn a_missing_topology_that_was_not_left_out_refuses_the_run() {
        let refused = select(&Topology::ALL, &[], &[], no_tandem).unwrap_err();
        assert_eq!(
            refused,
            SelectError::Unavailable(vec![
                (Topology::TandemOneHop, "no tandem-proxy given".into()),
                (Topology::TandemTwoHops, "no tandem-proxy given".into()),
                (Topology::TandemTwoHopsMtls, "no tandem-proxy given".into()),
                (Topology::TandemAuthz1, "no tandem-proxy given".into()),
                (Topology::TandemAuthz10, "no tandem-proxy given".into()),
                (Topology::TandemAuthz100, "no tandem-proxy given".into()),
                (Topology::TandemTrace1, "no tandem-proxy given".into()),
                (Topology::TandemTrace100, "no tandem-proxy given".into()),
            ])
        );
        let message = refused.to_string();
        assert!(
            message.contains("tandem 1 hop: no tandem-proxy given"),
            "{message}"
        );
        assert!(
            message.contains(
                "--skip tandem1 --skip tandem2 --skip tandem2-mtls --skip tandem2-authz1 \
                 --skip tandem2-authz10 --skip tandem2-authz100 --skip tandem2-trace1 \
                 --skip tandem2-trace100 (make bench BENCH_SKIP=\"tandem1 tandem2 \
                 tandem2-mtls tandem2-authz1 tandem2-authz10 tandem2-authz100 tandem2-trace1 \
                 tandem2-trace100\")"
            ),
            "{message}"
        );
    }

    #[test]
    fn a_missing_topology_left_out_is_recorded_with_why_it_could_not_run() {
        let skip = [
            Topology::TandemOneHop,
            Topology::TandemTwoHops,
            Topology::TandemTwoHopsMtls,
            Topology::TandemAuthz1,
            Topology::TandemAuthz10,
            Topology::TandemAuthz100,
            Topology::TandemTrace1,
            Topology::TandemTrace100,
        ];
        let selection = select(&Topology::ALL, &[], &skip, no_tandem).unwrap();
        assert_eq!(
            selection.measure,
            [
                Topology::Direct,
                Topology::BarePingora,
                Topology::Haproxy,
                Topology::Nginx,
                Topology::NginxTwoHops,
                Topology::NginxTwoHopsMtls,
            ]
        );
        assert_eq!(
            selection.excluded,
            skip.map(|topology| Exclusion {
                topology,
                unavailable: Some("no tandem-proxy given".into()),
            })
        );
    }

    #[test]
    fn skipping_one_of_two_missing_topologies_still_refuses_for_the_other() {
        let refused = select(&Topology::ALL, &[], &[Topology::TandemOneHop], no_tandem);
        assert_eq!(
            refused,
            Err(SelectError::Unavailable(vec![
                (Topology::TandemTwoHops, "no tandem-proxy given".into()),
                (Topology::TandemTwoHopsMtls, "no tandem-proxy given".into()),
                (Topology::TandemAuthz1, "no tandem-proxy given".into()),
                (Topology::TandemAuthz10, "no tandem-proxy given".into()),
                (Topology::TandemAuthz100, "no tandem-proxy given".into()),
                (Topology::TandemTrace1, "no tandem-proxy given".into()),
                (Topology::TandemTrace100, "no tandem-proxy given".into()),
            ]))
        );
    }

    #[test]
    fn only_leaves_the_others_out_in_report_order() {
        let only = [Topology::Nginx, Topology::Direct, Topology::Direct];
        let selection = select(&Topology::ALL, &only, &[], no_tandem).unwrap();
        assert_eq!(selection.measure, [Topology::Direct, Topology::Nginx]);
        let excluded: Vec<_> = selection.excluded.iter().map(|e| e.topology).collect();
        assert_eq!(
            excluded,
            [
                Topology::BarePingora,
                Topology::Haproxy,
                Topology::NginxTwoHops,
                Topology::NginxTwoHopsMtls,
                Topology::TandemOneHop,
                Topology::TandemTwoHops,
                Topology::TandemTwoHopsMtls,
                Topology::TandemAuthz1,
                Topology::TandemAuthz10,
                Topology::TandemAuthz100,
                Topology::TandemTrace1,
                Topology::TandemTrace100,
            ]
        );
        // Left out and available: nothing to explain.
        assert_eq!(selection.excluded[0].unavailable, None);
    }

    #[test]
    fn the_estimate_counts_the_tracing_topologies_wait_for_their_spans() {
        let mut plan = Plan::quick();
        plan.topologies = vec![Topology::TandemTwoHops];
        let untraced = plan.estimate(3);
        plan.topologies = vec![
            Topology::TandemTwoHops,
            Topology::TandemTrace1,
            Topology::TandemTrace100,
        ];
        assert_eq!(
            plan.estimate(3),
            untraced + TRACE_SETTLE * 2 * plan.rounds as u32
        );
    }

    #[test]
    fn everything_available_measures_everything() {
        let selection = select(&Topology::ALL, &[], &[], |_| None).unwrap();
        assert_eq!(selection.measure, Topology::ALL);
        assert!(selection.excluded.is_empty());
    }

    #[test]
    fn leaving_everything_out_is_refused() {
        let refused = select(
            &Topology::ALL,
            &[Topology::Nginx],
            &[Topology::Nginx],
            |_| None,
        );
        assert_eq!(refused, Err(SelectError::NothingToMeasure));
    }

    /// A stage that cannot start nginx.
    struct NoNginx;

    impl Stage for NoNginx {
        fn missing(&self, topology: Topology) -> Option<String> {
            (topology == Topology::Nginx).then(|| "nginx not installed".to_string())
        }

        fn start(&self, topology: Topology) -> Result<Running, TopologyError> {
            Err(TopologyError::Unavailable(format!(
                "{} must not be started",
                topology.name()
            )))
        }
    }

    #[tokio::test]
    async fn a_stage_that_cannot_start_a_planned_topology_refuses_before_any_round() {
        let mut plan = Plan::quick();
        plan.topologies = vec![Topology::Direct, Topology::Nginx];
        let refused = run_on(&plan, &NoNginx).await.err();
        assert_eq!(
            refused,
            Some(SelectError::Unavailable(vec![(
                Topology::Nginx,
                "nginx not installed".into()
            )]))
        );
    }
}
