//! The Markdown report: every topology's figures as median [min..max] over rounds, with its
//! ratio to direct and to bare Pingora computed round by round (paired), and the goals of the
//! benchmark issue checked where tandem-proxy was measured.

use std::fmt::Write as _;

use crate::loadgen::Protocol;
use crate::run::{RoundResult, RunResult, TopologyRun, TraceRound};
use crate::stats::{Spread, paired, ratio};
use crate::topology::Topology;

/// Where and when the run happened.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// UTC date and time the run ended.
    pub date: String,
    /// CPU model, cores, memory, kernel.
    pub description: String,
    /// Versions of the programs compared (git commit, HAProxy, nginx).
    pub versions: String,
}

/// A figure of one round, if that round measured it.
type Figure = fn(&RoundResult) -> Option<f64>;

fn series(run: &TopologyRun, figure: impl Fn(&RoundResult) -> Option<f64>) -> Vec<Option<f64>> {
    run.rounds
        .iter()
        .map(|round| round.as_ref().and_then(&figure))
        .collect()
}

fn flat(values: &[Option<f64>]) -> Vec<f64> {
    values.iter().flatten().copied().collect()
}

/// `median [min..max]`, or `–` when nothing was measured.
pub fn cell(spread: Option<Spread>, decimals: usize) -> String {
    match spread {
        Some(s) if s.rounds > 1 => format!(
            "{:.d$} [{:.d$}..{:.d$}]",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        Some(s) => format!("{:.d$}", s.median, d = decimals),
        None => "–".into(),
    }
}

/// A signed figure such as added latency: `+0.12 [-0.05..+0.30]`.
pub fn signed_cell(spread: Option<Spread>, decimals: usize) -> String {
    match spread {
        Some(s) if s.rounds > 1 => format!(
            "{:+.d$} [{:+.d$}..{:+.d$}]",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        Some(s) => format!("{:+.d$}", s.median, d = decimals),
        None => "–".into(),
    }
}

/// A ratio: `1.23×`, or `–`.
pub fn ratio_cell(spread: Option<Spread>) -> String {
    spread.map_or_else(|| "–".into(), |s| format!("{:.2}×", s.median))
}

struct View<'a> {
    result: &'a RunResult,
}

impl<'a> View<'a> {
    /// The measured run of `topology`; [`Topology::Direct`] stands for the run's baseline,
    /// whichever direct topology it measured (loopback, or the capture run's pods).
    fn find(&self, topology: Topology) -> Option<&'a TopologyRun> {
        self.measured().find(|r| {
            r.topology == topology || (topology == Topology::Direct && r.topology.is_direct())
        })
    }

    /// Every topology of the run: a run measures all it planned or is refused before it
    /// starts ([`crate::run::select`]).
    fn measured(&self) -> impl Iterator<Item = &'a TopologyRun> {
        self.result.topologies.iter()
    }

    /// Median [range] of `figure`, its ratio to the same figure of `base` (paired by round).
    fn versus(
        &self,
        run: &TopologyRun,
        base: Topology,
        figure: &dyn Fn(&RoundResult) -> Option<f64>,
    ) -> Option<Spread> {
        let base = self.find(base)?;
        Spread::of(&paired(&series(run, figure), &series(base, figure), ratio))
    }

    /// Median [range] of `figure` minus the same figure of direct (paired by round).
    fn added(
        &self,
        run: &TopologyRun,
        figure: &dyn Fn(&RoundResult) -> Option<f64>,
    ) -> Option<Spread> {
        let direct = self.find(Topology::Direct)?;
        Spread::of(&paired(
            &series(run, figure),
            &series(direct, figure),
            |a, b| Some(a - b),
        ))
    }

    /// Ratio of this topology's added figure to bare Pingora's, paired by round.
    fn added_versus_floor(
        &self,
        run: &TopologyRun,
        figure: &dyn Fn(&RoundResult) -> Option<f64>,
    ) -> Option<Spread> {
        let direct = series(self.find(Topology::Direct)?, figure);
        let floor = series(self.find(Topology::BarePingora)?, figure);
        let mine = series(run, figure);
        let minus = |a: &[Option<f64>]| -> Vec<Option<f64>> {
            a.iter()
                .zip(&direct)
                .map(|(x, d)| Some((*x)? - (*d)?))
                .collect()
        };
        Spread::of(&paired(&minus(&mine), &minus(&floor), ratio))
    }
}

fn fixed_figure(
    protocol: Protocol,
    rate: u64,
    pick: fn(&crate::stats::LatencySummary) -> f64,
) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .fixed
            .iter()
            .find(|f| f.protocol == protocol && f.rate == rate)
            .map(|f| pick(&f.latency))
    }
}

fn fixed_cores(protocol: Protocol, rate: u64) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .fixed
            .iter()
            .find(|f| f.protocol == protocol && f.rate == rate)
            .and_then(|f| f.proxy_cores)
    }
}

fn max_figure(protocol: Protocol, cpu: bool) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .max
            .iter()
            .find(|m| m.protocol == protocol)
            .and_then(|m| if cpu { m.cpu_per_10k } else { Some(m.rps) })
    }
}

const MANY_P50: Figure = |r| r.many.as_ref().map(|m| m.latency.p50);
const MANY_P99: Figure = |r| r.many.as_ref().map(|m| m.latency.p99);
const MANY_MAX: Figure = |r| r.many.as_ref().map(|m| m.latency.max);
const MANY_ERRORS: Figure = |r| r.many.as_ref().map(|m| m.latency.errors as f64);
const MANY_RSS: Figure = |r| r.many.as_ref().and_then(|m| m.rss_kib).map(mib);
const IDLE_RSS: Figure = |r| r.idle_rss_kib.map(mib);
const LOAD_RSS: Figure = |r| r.load_rss_kib.map(mib);

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Renders the report. `chart` is the SVG's file name, linked from the report.
pub fn render(result: &RunResult, machine: &Machine, chart: &str) -> String {
    let view = View { result };
    let plan = &result.plan;
    let mut out = String::new();
    let minutes = result.elapsed.as_secs_f64() / 60.0;
    let _ = writeln!(out, "# Tandem benchmark: {} run\n", plan.mode);
    let _ = writeln!(out, "- Date: {}", machine.date);
    let _ = writeln!(out, "- Machine: {}", machine.description);
    let _ = writeln!(out, "- Versions: {}", machine.versions);
    let _ = writeln!(
        out,
        "- Length: {minutes:.1} min; {} rounds, topology order reversed every other round; \
         constant-rate runs {} s after a {} s warm-up, throughput runs {} s; {} connections \
         x {} waves in the first {} round(s). Upstream body {} bytes.",
        plan.rounds,
        plan.fixed_length.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.max_length.as_secs_f64(),
        plan.many_connections,
        plan.many_waves,
        plan.many_rounds.min(plan.rounds),
        plan.body_bytes
    );
    let _ = writeln!(
        out,
        "- Reading: each figure is the median over rounds [min..max]. \"Added\" is the \
         topology's figure minus direct's in the same round; ratios are taken round by round, \
         then the median is shown. Only ratios from one run mean anything on a shared machine.\n"
    );
    let _ = writeln!(out, "![latency percentiles per topology]({chart})\n");
    problems_section(&mut out, result);
    fixed_section(&mut out, &view);
    max_section(&mut out, &view);
    many_section(&mut out, &view);
    memory_section(&mut out, &view);
    goals_section(&mut out, &view);
    mtls_section(&mut out, &view);
    authz_section(&mut out, &view);
    tracing_section(&mut out, &view);
    method_section(&mut out);
    out
}

/// The topologies the user left out and the rounds that failed, with why.
fn problems_section(out: &mut String, result: &RunResult) {
    let excluded = &result.plan.excluded;
    if !excluded.is_empty() {
        let _ = writeln!(
            out,
            "## Left out by the user
"
        );
        let _ = writeln!(
            out,
            "Not measured because the run was told to leave them out (`--skip`, `--only`; \
             `make bench BENCH_SKIP=...`), not because they failed:\n"
        );
        for exclusion in excluded {
            let could = match &exclusion.unavailable {
                Some(why) => format!(" (it could not have run here: {why})"),
                None => String::new(),
            };
            let _ = writeln!(out, "- {}: left out{could}", exclusion.topology.name());
        }
        let _ = writeln!(out);
    }
    let failures: Vec<_> = result
        .topologies
        .iter()
        .flat_map(|r| r.failures.iter().map(move |f| (r.topology, f)))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "## Failed rounds\n");
        for (topology, failure) in failures {
            let first = failure.lines().next().unwrap_or_default();
            let _ = writeln!(out, "- {}: {first}", topology.name());
        }
        let _ = writeln!(out);
    }
}

/// Renders the capture run's report: the rows explained, the constant-rate tables (added
/// over direct (netns)), and what capture itself costs: captured minus uncaptured, paired by
/// round. `command` reproduces the run.
pub fn render_capture(result: &RunResult, machine: &Machine, chart: &str, command: &str) -> String {
    let view = View { result };
    let plan = &result.plan;
    let mut out = String::new();
    let _ = writeln!(out, "# Tandem benchmark: capture run ({})\n", plan.mode);
    let _ = writeln!(out, "- Date: {}", machine.date);
    let _ = writeln!(out, "- Machine: {}", machine.description);
    let _ = writeln!(out, "- Versions: {}", machine.versions);
    let _ = writeln!(
        out,
        "- Length: {:.1} min; {} rounds, topology order reversed every other round; \
         constant-rate runs {} s after a {} s warm-up. Upstream body {} bytes.",
        result.elapsed.as_secs_f64() / 60.0,
        plan.rounds,
        plan.fixed_length.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.body_bytes
    );
    let _ = writeln!(out, "- Reproduce: `{command}`");
    let _ = writeln!(
        out,
        "- Reading: each figure is the median over rounds [min..max]; \"added\" is the \
         topology's figure minus direct (netns)'s in the same round.\n"
    );
    let _ = writeln!(
        out,
        "## The rows\n\n\
         Two network namespaces joined by a veth pair stand for a client pod (10.77.7.1) and a \
         server pod (10.77.7.2); the upstream (`tandem-bench upstream`) runs in the server pod \
         on :8080, the load generator on a thread inside the client pod.\n\n\
         - **direct (netns)**: the client pod sends to 10.77.7.2:8080 over the veth. The \
         baseline.\n\
         - **tandem 2 hops, no capture (netns)**: both sidecars run (UID 2102, ports 15001, \
         15006, 15020), no iptables rules: the client sends to its sidecar's 127.0.0.1:15001 \
         with the service (10.96.77.77:8080) in the Host header; the client sidecar sends to \
         the server sidecar's 10.77.7.2:15006, which sends to 127.0.0.1:8080.\n\
         - **tandem 2 hops, captured**: the real mesh path. `tandem-proxy init` (the \
         tandem-init container's program) programs both pods' nat tables; the client sends to \
         the service's cluster IP 10.96.77.77:80 as an unmodified app does (h2c: :81, a port \
         declared `http2`, since a captured connection is served as its port's declared \
         protocol); OUTPUT redirects \
         it to the client sidecar (:15001), which picks the endpoint 10.77.7.2:8080 from the \
         original destination; the server pod's PREROUTING redirects that to its sidecar \
         (:15006), which forwards to 10.77.7.2:8080.\n\n\
         After every measured run each sidecar's `tandem_requests_total` (client: outbound to \
         bench/upstream; server: inbound) must have grown by the requests that succeeded, or \
         that round of the topology fails (listed below): the figures are of traffic that \
         went through both sidecars. The rules exist only while the captured topology runs; \
         the other topologies check they are gone before they start.\n"
    );
    let _ = writeln!(out, "![latency percentiles per topology]({chart})\n");
    problems_section(&mut out, result);
    fixed_section(&mut out, &view);
    capture_cost_section(&mut out, &view);
    let _ = writeln!(
        out,
        "## Method\n\n\
         - Same load generator, upstream and constant-rate method as the loopback run \
         (report.md): latency from each request's intended send time into an HdrHistogram, \
         32 requests in flight (HTTP/1.1: 32 connections; h2c: 4 connections).\n\
         - Proxy cores: utime + stime of both sidecars over the run, per second. The nat \
         rules' own work (conntrack, REDIRECT, the original-destination lookup) is done by the \
         kernel, mostly outside the sidecars' CPU time: it shows in the latencies.\n\
         - Everything shares the machine's cores; compare within one run.\n"
    );
    out
}

/// Captured minus uncaptured, per scenario and percentile, paired by round.
fn capture_cost_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## What capture itself costs (captured − no capture, ms, paired by round)\n"
    );
    let (Some(captured), Some(uncaptured)) = (
        view.find(Topology::TandemCaptured),
        view.find(Topology::TandemNetns),
    ) else {
        let _ = writeln!(out, "Not computed: a two-hop topology was not measured.\n");
        return;
    };
    let top_rate = plan.rates.iter().copied().max().unwrap_or(1);
    let _ = writeln!(
        out,
        "| scenario | p50 | p90 | p99 | p99.9 | max | proxy cores |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let picks: [fn(&crate::stats::LatencySummary) -> f64; 5] =
        [|l| l.p50, |l| l.p90, |l| l.p99, |l| l.p999, |l| l.max];
    for &rate in &plan.rates {
        for &protocol in &plan.fixed_protocols {
            let difference = |figure: &dyn Fn(&RoundResult) -> Option<f64>| {
                Spread::of(&paired(
                    &series(captured, figure),
                    &series(uncaptured, figure),
                    |a, b| Some(a - b),
                ))
            };
            let cells: Vec<String> = picks
                .iter()
                .map(|&pick| signed_cell(difference(&fixed_figure(protocol, rate, pick)), 2))
                .collect();
            let p50 = fixed_figure(protocol, rate, |l| l.p50);
            let median =
                |run: &TopologyRun| Spread::of(&flat(&series(run, &p50))).map(|s| s.median);
            // With every in-flight slot busy for the median request, requests queue in the
            // load generator: latency then measures the queue (Little's law).
            let limit = plan.in_flight as f64 * 1_000.0 / rate.max(1) as f64;
            let saturated = [captured, uncaptured]
                .into_iter()
                .filter_map(median)
                .any(|p| p > limit);
            let _ = writeln!(
                out,
                "| {rate} req/s {}{} | {} | {} |",
                protocol.label(),
                if saturated { " (saturated)" } else { "" },
                cells.join(" | "),
                signed_cell(difference(&fixed_cores(protocol, rate)), 3),
            );
        }
    }
    let _ = writeln!(
        out,
        "\n\"Saturated\": a two-hop median p50 over {} requests in flight ÷ the rate ({:.1} ms \
         at {} req/s): every slot of the load generator was busy and requests queued, because \
         the sidecars, the load generator and the upstream together ran out of the machine's \
         cores. There the difference is queueing, not what capture costs.\n",
        plan.in_flight,
        plan.in_flight as f64 * 1_000.0 / top_rate.max(1) as f64,
        top_rate
    );
}

fn fixed_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    // The floor column only where the floor was measured (the capture run has none).
    let floor = view.find(Topology::BarePingora).is_some();
    for &rate in &plan.rates {
        for &protocol in &plan.fixed_protocols {
            let _ = writeln!(
                out,
                "## {rate} req/s constant rate, {} (latency in ms from the intended send time)\n",
                protocol.label()
            );
            let _ = writeln!(
                out,
                "| topology | p50 | p90 | p99 | p99.9 | max | errors | proxy cores | added p50 | added p99 | p50 × direct |{}",
                if floor {
                    " added p50 × bare Pingora's |"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "|---|---|---|---|---|---|---|---|---|---|---|{}",
                if floor { "---|" } else { "" }
            );
            for run in view.measured() {
                let f = |pick: fn(&crate::stats::LatencySummary) -> f64| {
                    fixed_figure(protocol, rate, pick)
                };
                let p50 = f(|l| l.p50);
                let p99 = f(|l| l.p99);
                let spread =
                    |g: &dyn Fn(&RoundResult) -> Option<f64>| Spread::of(&flat(&series(run, g)));
                let direct = run.topology.is_direct();
                let floor_cell = if !floor {
                    String::new()
                } else if !run.topology.has_proxy() || run.topology == Topology::BarePingora {
                    " – |".into()
                } else {
                    format!(" {} |", ratio_cell(view.added_versus_floor(run, &p50)))
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{floor_cell}",
                    run.topology.name(),
                    cell(spread(&p50), 2),
                    cell(spread(&f(|l| l.p90)), 2),
                    cell(spread(&p99), 2),
                    cell(spread(&f(|l| l.p999)), 2),
                    cell(spread(&f(|l| l.max)), 1),
                    cell(spread(&f(|l| l.errors as f64)), 0),
                    cell(spread(&fixed_cores(protocol, rate)), 2),
                    if direct {
                        "–".into()
                    } else {
                        signed_cell(view.added(run, &p50), 2)
                    },
                    if direct {
                        "–".into()
                    } else {
                        signed_cell(view.added(run, &p99), 2)
                    },
                    if direct {
                        "–".into()
                    } else {
                        ratio_cell(view.versus(run, Topology::Direct, &p50))
                    },
                );
            }
            let _ = writeln!(out);
        }
    }
}

fn max_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## Maximum throughput, {} requests in flight (closed loop)\n",
        plan.max_in_flight
    );
    let _ = writeln!(
        out,
        "| topology | protocol | req/s | × direct | proxy CPU s per 10k requests | µs CPU per request | CPU × bare Pingora | CPU × nginx |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for &protocol in &plan.max_protocols {
        for run in view.measured() {
            let rps = max_figure(protocol, false);
            let cpu = max_figure(protocol, true);
            let cpu_spread = Spread::of(&flat(&series(run, &cpu)));
            let micros = cpu_spread.map(|s| Spread {
                median: s.median * 100.0,
                min: s.min * 100.0,
                max: s.max * 100.0,
                rounds: s.rounds,
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                run.topology.name(),
                protocol.label(),
                cell(Spread::of(&flat(&series(run, &rps))), 0),
                if run.topology == Topology::Direct {
                    "–".into()
                } else {
                    ratio_cell(view.versus(run, Topology::Direct, &rps))
                },
                cell(cpu_spread, 3),
                cell(micros, 1),
                ratio_cell(view.versus(run, Topology::BarePingora, &cpu)),
                ratio_cell(view.versus(run, Topology::Nginx, &cpu)),
            );
        }
    }
    let _ = writeln!(out);
}

fn many_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## {} concurrent connections, each with one request in flight (HTTP/1.1, {} waves; ms from the wave's start)\n",
        plan.many_connections, plan.many_waves
    );
    let _ = writeln!(
        out,
        "| topology | errors (incl. failed connects) | p50 | p99 | max | added p99 | p99 × bare Pingora |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for run in view.measured() {
        let spread = |g: Figure| Spread::of(&flat(&series(run, g)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            run.topology.name(),
            cell(spread(MANY_ERRORS), 0),
            cell(spread(MANY_P50), 1),
            cell(spread(MANY_P99), 1),
            cell(spread(MANY_MAX), 1),
            if run.topology == Topology::Direct {
                "–".into()
            } else {
                signed_cell(view.added(run, &MANY_P99), 1)
            },
            ratio_cell(view.versus(run, Topology::BarePingora, &MANY_P99)),
        );
    }
    let _ = writeln!(out);
}

fn memory_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## Resident memory of the proxy (VmRSS, MiB; summed over its processes)\n"
    );
    let _ = writeln!(
        out,
        "| topology | idle | peak under load (VmHWM) | with {} connections | KiB per connection | {} conns × bare Pingora | × nginx |",
        plan.many_connections, plan.many_connections
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for run in view.measured().filter(|r| r.topology.has_proxy()) {
        let spread = |g: Figure| Spread::of(&flat(&series(run, g)));
        let per_conn = Spread::of(&paired(
            &series(run, MANY_RSS),
            &series(run, IDLE_RSS),
            |many, idle| Some((many - idle) * 1024.0 / plan.many_connections.max(1) as f64),
        ));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            run.topology.name(),
            cell(spread(IDLE_RSS), 1),
            cell(spread(LOAD_RSS), 1),
            cell(spread(MANY_RSS), 1),
            cell(per_conn, 1),
            ratio_cell(view.versus(run, Topology::BarePingora, &MANY_RSS)),
            ratio_cell(view.versus(run, Topology::Nginx, &MANY_RSS)),
        );
    }
    let _ = writeln!(out);
}

/// One goal of the benchmark issue: a figure, its bound, and whether it held.
struct Goal {
    what: String,
    measured: Option<f64>,
    bound: f64,
    unit: &'static str,
}

fn goals_section(out: &mut String, view: &View<'_>) {
    let _ = writeln!(out, "## Goals (issue 4), each from this run\n");
    let one = view.find(Topology::TandemOneHop);
    let two = view.find(Topology::TandemTwoHops);
    if one.is_none() && two.is_none() {
        let _ = writeln!(
            out,
            "Not evaluated: both tandem topologies were left out of this run.\n"
        );
        return;
    }
    let p50 = fixed_figure(Protocol::Http1, 1_000, |l| l.p50);
    let p99 = fixed_figure(Protocol::Http1, 1_000, |l| l.p99);
    let cpu = max_figure(Protocol::Http1, true);
    let median = |s: Option<Spread>| s.map(|s| s.median);
    let mut goals = Vec::new();
    if let Some(run) = one {
        goals.push(Goal {
            what: "1 hop: CPU per request ÷ bare Pingora's".into(),
            measured: median(view.versus(run, Topology::BarePingora, &cpu)),
            bound: 1.2,
            unit: "×",
        });
        goals.push(Goal {
            what: "1 hop: added p50 at 1k req/s ÷ bare Pingora's".into(),
            measured: median(view.added_versus_floor(run, &p50)),
            bound: 1.2,
            unit: "×",
        });
        goals.push(Goal {
            what: "1 hop: CPU per request ÷ nginx's".into(),
            measured: median(view.versus(run, Topology::Nginx, &cpu)),
            bound: 1.0,
            unit: "×",
        });
        goals.push(Goal {
            what: "1 hop: CPU per request ÷ HAProxy's".into(),
            measured: median(view.versus(run, Topology::Haproxy, &cpu)),
            bound: 1.0,
            unit: "×",
        });
        goals.push(Goal {
            what: "1 hop: idle RSS".into(),
            measured: median(Spread::of(&flat(&series(run, IDLE_RSS)))),
            bound: 15.0,
            unit: " MiB",
        });
        goals.push(Goal {
            what: "1 hop: RSS with 10,000 connections".into(),
            measured: median(Spread::of(&flat(&series(run, MANY_RSS)))),
            bound: 128.0,
            unit: " MiB",
        });
        goals.push(Goal {
            what: "1 hop: errors with 10,000 connections".into(),
            measured: median(Spread::of(&flat(&series(run, MANY_ERRORS)))),
            bound: 0.0,
            unit: "",
        });
        goals.push(Goal {
            what: "1 hop: added p99 with 10,000 connections".into(),
            measured: median(view.added(run, &MANY_P99)),
            bound: 5.0,
            unit: " ms",
        });
    }
    if let Some(run) = two {
        goals.push(Goal {
            what: "2 hops: added p99 at 1k req/s".into(),
            measured: median(view.added(run, &p99)),
            bound: 1.0,
            unit: " ms",
        });
    }
    let _ = writeln!(out, "| goal | bound | measured (median) | verdict |");
    let _ = writeln!(out, "|---|---|---|---|");
    for goal in goals {
        let (measured, verdict) = match goal.measured {
            None => ("–".to_string(), "not measured".to_string()),
            Some(v) if v <= goal.bound => (format!("{v:.2}{}", goal.unit), "met".to_string()),
            Some(v) => (
                format!("{v:.2}{}", goal.unit),
                format!("missed by {:.2}{}", v - goal.bound, goal.unit),
            ),
        };
        let _ = writeln!(
            out,
            "| {} | ≤ {}{} | {measured} | {verdict} |",
            goal.what, goal.bound, goal.unit
        );
    }
    let _ = writeln!(out);
}

/// The bound of issue 13: what mutual TLS may add to the p50 of one hop at 1,000 req/s.
pub const MTLS_P50_PER_HOP_BOUND_MS: f64 = 0.1;

/// The rate the mutual-TLS goal is checked at.
const MTLS_GOAL_RATE: u64 = 1_000;

/// A topology with a feature on (mutual TLS, authorization) and its twin without it, both
/// measured in this run.
struct Pair<'a> {
    /// `tandem` or `nginx`; for authorization, the number of rules.
    label: String,
    with: &'a TopologyRun,
    without: &'a TopologyRun,
}

impl Pair<'_> {
    /// `figure` of the mTLS topology combined with the plaintext one's, round by round.
    fn paired(
        &self,
        figure: &dyn Fn(&RoundResult) -> Option<f64>,
        f: impl Fn(f64, f64) -> Option<f64>,
    ) -> Option<Spread> {
        Spread::of(&paired(
            &series(self.with, figure),
            &series(self.without, figure),
            f,
        ))
    }

    /// What mutual TLS adds to `figure` per hop: half of the two hops' difference.
    fn added_per_hop(&self, figure: &dyn Fn(&RoundResult) -> Option<f64>) -> Option<Spread> {
        self.paired(figure, |m, p| Some((m - p) / 2.0))
    }

    fn ratio(&self, figure: &dyn Fn(&RoundResult) -> Option<f64>) -> Option<Spread> {
        self.paired(figure, ratio)
    }

    /// What the feature adds to `figure`, the whole difference (authorization runs on one
    /// hop, the server sidecar).
    fn added(&self, figure: &dyn Fn(&RoundResult) -> Option<f64>) -> Option<Spread> {
        self.paired(figure, |w, wo| Some(w - wo))
    }
}

/// What a feature adds to a figure: [`Pair::added`] or [`Pair::added_per_hop`].
type Added<'a> = fn(&Pair<'a>, &dyn Fn(&RoundResult) -> Option<f64>) -> Option<Spread>;

/// The constant-rate cells a pair's row shares: p50 and p99 without, with and `added` (per hop
/// or whole), then CPU µs per request without, with and their ratio.
fn fixed_cells<'a>(pair: &Pair<'a>, protocol: Protocol, rate: u64, added: Added<'a>) -> String {
    let p50 = fixed_figure(protocol, rate, |l| l.p50);
    let p99 = fixed_figure(protocol, rate, |l| l.p99);
    let cpu = fixed_cpu_micros(protocol, rate);
    let of = |run: &TopologyRun, g: &dyn Fn(&RoundResult) -> Option<f64>| {
        Spread::of(&flat(&series(run, g)))
    };
    [
        cell(of(pair.without, &p50), 2),
        cell(of(pair.with, &p50), 2),
        signed_cell(added(pair, &p50), 3),
        cell(of(pair.without, &p99), 2),
        cell(of(pair.with, &p99), 2),
        signed_cell(added(pair, &p99), 2),
        cell(of(pair.without, &cpu), 1),
        cell(of(pair.with, &cpu), 1),
        ratio_cell(pair.ratio(&cpu)),
    ]
    .join(" | ")
}

/// Authorization (issue 14): the mTLS two hops with the server sidecar authorizing every
/// request against 1, 10 and 100 rules, each against the same two hops with it off.
fn authz_section(out: &mut String, view: &View<'_>) {
    let Some(off) = view.find(Topology::TandemTwoHopsMtls) else {
        return;
    };
    let pairs: Vec<Pair<'_>> = Topology::AUTHZ
        .iter()
        .filter_map(|&(topology, rules)| {
            view.find(topology).map(|with| Pair {
                label: rules.to_string(),
                with,
                without: off,
            })
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## Authorization (issue 14): rules on the server sidecar vs none\n"
    );
    let _ = writeln!(
        out,
        "`tandem2-authz<N>` is `tandem2-mtls` with the server sidecar's default policy `deny` and \
         one Allow policy of N rules, each naming a caller, a path prefix and a method; only the \
         last names the client, so every request is checked against all N (the worst case). \
         Compared round by round with `tandem2-mtls` (no policy: the check is skipped). Added \
         = the whole difference: authorization runs on one hop.\n"
    );
    let _ = writeln!(
        out,
        "| rules | scenario | p50 off | p50 on | added p50 | p99 off | p99 on | added p99 | CPU µs/request off | CPU µs/request on | CPU on ÷ off |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    let of = |run: &TopologyRun, g: &dyn Fn(&RoundResult) -> Option<f64>| {
        Spread::of(&flat(&series(run, g)))
    };
    for pair in &pairs {
        for &rate in &plan.rates {
            for &protocol in &plan.fixed_protocols {
                let _ = writeln!(
                    out,
                    "| {} | {rate} req/s {} | {} |",
                    pair.label,
                    protocol.label(),
                    fixed_cells(pair, protocol, rate, Pair::added),
                );
            }
        }
        for &protocol in &plan.max_protocols {
            let cpu = move |r: &RoundResult| micros_per_request(r, protocol);
            let _ = writeln!(
                out,
                "| {} | max, {} in flight, {} | – | – | – | – | – | – | {} | {} | {} |",
                pair.label,
                plan.max_in_flight,
                protocol.label(),
                cell(of(pair.without, &cpu), 1),
                cell(of(pair.with, &cpu), 1),
                ratio_cell(pair.ratio(&cpu)),
            );
        }
    }
    let _ = writeln!(out);
}

/// Tracing (wave 2, 4/8): the plaintext two hops with tracing at each sampling percentage,
/// side by side with tracing off (`tandem2`), and what each exported.
fn tracing_section(out: &mut String, view: &View<'_>) {
    let Some(off) = view.find(Topology::TandemTwoHops) else {
        return;
    };
    let pairs: Vec<(f64, Pair<'_>)> = Topology::TRACING
        .iter()
        .filter_map(|&(topology, percent)| {
            view.find(topology).map(|with| {
                let label = percent_label(percent);
                (
                    percent,
                    Pair {
                        label,
                        with,
                        without: off,
                    },
                )
            })
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let plan = &view.result.plan;
    let _ = writeln!(out, "## Tracing (wave 2, 4/8): sampled vs off\n");
    let _ = writeln!(
        out,
        "`tandem2-trace<P>` is `tandem2` with `telemetry.tracing` on both sidecars: collector = \
         the bench's OTLP/HTTP load sink (`tandem-bench otlp-sink`, answers 200, decodes \
         nothing), `samplingPercent` P. The load generator sends no trace context, so the \
         client sidecar starts a trace for P % of the requests and the server sidecar follows \
         its `traceparent`; every request pays for reading and writing the trace headers, a \
         sampled one also for its two spans (CLIENT on the client sidecar, SERVER on the \
         server sidecar) and their export. Compared round by round with `tandem2` (tracing \
         off); CPU is both sidecars'.\n"
    );
    let of = |run: &TopologyRun, g: &dyn Fn(&RoundResult) -> Option<f64>| {
        Spread::of(&flat(&series(run, g)))
    };
    let labels: Vec<&str> = pairs.iter().map(|(_, p)| p.label.as_str()).collect();
    let heads = |what: &str| -> String {
        std::iter::once(format!("{what} off"))
            .chain(labels.iter().map(|l| format!("{what} {l}")))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let ratios: Vec<String> = labels.iter().map(|l| format!("CPU {l} ÷ off")).collect();
    let _ = writeln!(
        out,
        "| scenario | {} | {} | {} | {} |",
        heads("p50"),
        heads("p99"),
        heads("CPU µs/request"),
        ratios.join(" | ")
    );
    let columns = 1 + 3 * (labels.len() + 1) + labels.len();
    let _ = writeln!(out, "|{}", "---|".repeat(columns));
    let row = |figure: &dyn Fn(&RoundResult) -> Option<f64>, decimals: usize| -> String {
        std::iter::once(cell(of(off, figure), decimals))
            .chain(
                pairs
                    .iter()
                    .map(|(_, p)| cell(of(p.with, figure), decimals)),
            )
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let cpu_ratios = |figure: &dyn Fn(&RoundResult) -> Option<f64>| -> String {
        pairs
            .iter()
            .map(|(_, p)| ratio_cell(p.ratio(figure)))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let dashes = vec!["–"; labels.len() + 1].join(" | ");
    for &rate in &plan.rates {
        for &protocol in &plan.fixed_protocols {
            let cpu = fixed_cpu_micros(protocol, rate);
            let _ = writeln!(
                out,
                "| {rate} req/s {} | {} | {} | {} | {} |",
                protocol.label(),
                row(&fixed_figure(protocol, rate, |l| l.p50), 2),
                row(&fixed_figure(protocol, rate, |l| l.p99), 2),
                row(&cpu, 1),
                cpu_ratios(&cpu),
            );
        }
    }
    for &protocol in &plan.max_protocols {
        let cpu = move |r: &RoundResult| micros_per_request(r, protocol);
        let _ = writeln!(
            out,
            "| max, {} in flight, {} | {dashes} | {dashes} | {} | {} |",
            plan.max_in_flight,
            protocol.label(),
            row(&cpu, 1),
            cpu_ratios(&cpu),
        );
    }
    let _ = writeln!(
        out,
        "\nSpans per round (since the proxies started: every run of the round, readiness checks \
         and warm-ups included; read {} s after its last request, once the proxies' batches \
         are flushed), both sidecars' \
         `tandem_trace_spans_exported_total` and `tandem_trace_spans_dropped_total` (every \
         reason); spans per request = (exported + dropped) ÷ the requests the client sidecar \
         routed (2 when every request is traced):\n",
        crate::run::TRACE_SETTLE.as_secs()
    );
    let _ = writeln!(
        out,
        "| sampling | spans exported | spans dropped | spans per request | sink POSTs | sink KiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (_, pair) in &pairs {
        let trace = |pick: fn(&TraceRound) -> Option<f64>| {
            move |r: &RoundResult| r.trace.as_ref().and_then(pick)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            pair.label,
            cell(
                of(pair.with, &trace(|t| Some(t.reading.spans.exported as f64))),
                0
            ),
            cell(
                of(pair.with, &trace(|t| Some(t.reading.spans.dropped as f64))),
                0
            ),
            cell(of(pair.with, &trace(TraceRound::spans_per_request)), 3),
            cell(
                of(pair.with, &trace(|t| Some(t.reading.sink_posts as f64))),
                0
            ),
            cell(
                of(
                    pair.with,
                    &trace(|t| Some(t.reading.sink_bytes as f64 / 1024.0))
                ),
                1
            ),
        );
    }
    let _ = writeln!(out);
}

/// `1 %`, `100 %`, `0.5 %`.
fn percent_label(percent: f64) -> String {
    format!("{percent} %")
}

fn fixed_cpu_micros(protocol: Protocol, rate: u64) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .fixed
            .iter()
            .find(|f| f.protocol == protocol && f.rate == rate)
            .and_then(|f| f.proxy_cores)
            .map(|cores| cores * 1e6 / rate.max(1) as f64)
    }
}

fn fixed_handshakes(protocol: Protocol, rate: u64) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .fixed
            .iter()
            .find(|f| f.protocol == protocol && f.rate == rate)
            .and_then(|f| f.handshakes_per_second)
    }
}

fn max_handshakes(protocol: Protocol) -> impl Fn(&RoundResult) -> Option<f64> {
    move |round: &RoundResult| {
        round
            .max
            .iter()
            .find(|m| m.protocol == protocol)
            .and_then(|m| m.handshakes_per_second)
    }
}

const MANY_HANDSHAKES: Figure = |r| r.many.as_ref().and_then(|m| m.handshakes).map(|h| h as f64);

/// CPU seconds per 10,000 requests → µs per request.
fn micros_per_request(round: &RoundResult, protocol: Protocol) -> Option<f64> {
    max_figure(protocol, true)(round).map(|per_10k| per_10k * 100.0)
}

/// Mutual TLS (issue 13): each mTLS two hops against the same two hops in plaintext, paired
/// by round, and the goal "mTLS adds ≤ 0.1 ms p50 per hop at 1k req/s".
fn mtls_section(out: &mut String, view: &View<'_>) {
    let asked = Topology::MTLS_PAIRS
        .iter()
        .any(|(m, p)| view.find(*m).is_some() || view.find(*p).is_some());
    if !asked {
        return;
    }
    let plan = &view.result.plan;
    let _ = writeln!(
        out,
        "## Mutual TLS (issue 13): two hops with mTLS vs the same two hops in plaintext\n"
    );
    let _ = writeln!(
        out,
        "Each mTLS topology against its plaintext twin, round by round. \"Per hop\" is half \
         of what mTLS adds to the two hops: one TLS connection between the two proxies, the \
         client side originating it, the server side terminating it. CPU per request: both \
         proxies' CPU time over the run ÷ its requests. Handshakes: TLS handshakes between \
         the two proxies during the run (tandem: the server sidecar's \
         `tandem_tls_handshakes_total{{direction=\"inbound\",result=\"success\"}}`; nginx: \
         connections the server-side nginx accepted, from `stub_status`, each one handshake, \
         full or resumed). The nginx pair is the anchor: the same mutual TLS \
         (`proxy_ssl_certificate` upstream, `ssl_verify_client on` downstream, TLS 1.3, \
         P-256 certificates from the same test CA, upstream keep-alive).\n"
    );
    let mut pairs = Vec::new();
    for (label, (mtls, plain)) in ["tandem", "nginx"].into_iter().zip(Topology::MTLS_PAIRS) {
        match (view.find(mtls), view.find(plain)) {
            (Some(m), Some(p)) => pairs.push(Pair {
                label: label.to_owned(),
                with: m,
                without: p,
            }),
            (m, p) => {
                let missing: Vec<&str> = [(m.is_none(), mtls), (p.is_none(), plain)]
                    .iter()
                    .filter(|(gone, _)| *gone)
                    .map(|(_, t)| t.name())
                    .collect();
                let _ = writeln!(
                    out,
                    "- {label}: not compared, {} not measured in this run.",
                    missing.join(" and ")
                );
            }
        }
    }
    for pair in &pairs {
        if pair.with.rounds.iter().all(Option::is_none) {
            let _ = writeln!(
                out,
                "- {}: every round failed (see \"Failed rounds\"), nothing measured.",
                pair.with.topology.name()
            );
        }
    }
    let _ = writeln!(out);
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "### Constant rate (latency in ms from the intended send time)\n"
    );
    let _ = writeln!(
        out,
        "| pair | scenario | p50 plaintext | p50 mTLS | added p50 per hop | p99 plaintext | p99 mTLS | added p99 per hop | CPU µs/request plaintext | CPU µs/request mTLS | CPU mTLS ÷ plaintext | handshakes/s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for pair in &pairs {
        for &rate in &plan.rates {
            for &protocol in &plan.fixed_protocols {
                let _ = writeln!(
                    out,
                    "| {} | {rate} req/s {} | {} | {} |",
                    pair.label,
                    protocol.label(),
                    fixed_cells(pair, protocol, rate, Pair::added_per_hop),
                    cell(
                        Spread::of(&flat(&series(pair.with, fixed_handshakes(protocol, rate)))),
                        1
                    ),
                );
            }
        }
    }
    let _ = writeln!(out);
    if !plan.max_protocols.is_empty() {
        let _ = writeln!(
            out,
            "### Maximum throughput, {} requests in flight (closed loop)\n",
            plan.max_in_flight
        );
        let _ = writeln!(
            out,
            "| pair | protocol | req/s plaintext | req/s mTLS | req/s mTLS ÷ plaintext | CPU µs/request plaintext | CPU µs/request mTLS | CPU mTLS ÷ plaintext | handshakes/s |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for pair in &pairs {
            for &protocol in &plan.max_protocols {
                let rps = max_figure(protocol, false);
                let cpu = move |r: &RoundResult| micros_per_request(r, protocol);
                let of = |run: &TopologyRun, g: &dyn Fn(&RoundResult) -> Option<f64>| {
                    Spread::of(&flat(&series(run, g)))
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    pair.label,
                    protocol.label(),
                    cell(of(pair.without, &rps), 0),
                    cell(of(pair.with, &rps), 0),
                    ratio_cell(pair.ratio(&rps)),
                    cell(of(pair.without, &cpu), 1),
                    cell(of(pair.with, &cpu), 1),
                    ratio_cell(pair.ratio(&cpu)),
                    cell(of(pair.with, &max_handshakes(protocol)), 1),
                );
            }
        }
        let _ = writeln!(out);
    }
    if plan.many_rounds > 0 {
        let _ = writeln!(
            out,
            "### {} connections, one request each at once (HTTP/1.1)\n",
            plan.many_connections
        );
        let _ = writeln!(
            out,
            "| pair | errors plaintext | errors mTLS | p99 plaintext (ms) | p99 mTLS (ms) | handshakes (mTLS, whole run) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for pair in &pairs {
            let of = |run: &TopologyRun, g: Figure| Spread::of(&flat(&series(run, g)));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                pair.label,
                cell(of(pair.without, MANY_ERRORS), 0),
                cell(of(pair.with, MANY_ERRORS), 0),
                cell(of(pair.without, MANY_P99), 1),
                cell(of(pair.with, MANY_P99), 1),
                cell(of(pair.with, MANY_HANDSHAKES), 0),
            );
        }
        let _ = writeln!(out);
    }
    mtls_goal(out, &pairs, plan);
}

/// The goal of issue 13, checked on tandem's pair; nginx's figure beside it as the anchor.
fn mtls_goal(out: &mut String, pairs: &[Pair<'_>], plan: &crate::run::Plan) {
    let _ = writeln!(
        out,
        "### Goal (issue 13): mTLS adds ≤ {MTLS_P50_PER_HOP_BOUND_MS} ms p50 per hop at \
         {MTLS_GOAL_RATE} req/s\n"
    );
    if !plan.rates.contains(&MTLS_GOAL_RATE) {
        let _ = writeln!(
            out,
            "Not evaluated: this run had no {MTLS_GOAL_RATE} req/s scenario.\n"
        );
        return;
    }
    let _ = writeln!(
        out,
        "| pair | protocol | added p50 per hop (median) | verdict |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for pair in pairs {
        for &protocol in &plan.fixed_protocols {
            let p50 = fixed_figure(protocol, MTLS_GOAL_RATE, |l| l.p50);
            let added = pair.added_per_hop(&p50).map(|s| s.median);
            let verdict = match (pair.label.as_str(), added) {
                (_, None) => "not measured".to_string(),
                ("tandem", Some(v)) if v <= MTLS_P50_PER_HOP_BOUND_MS => "met".to_string(),
                ("tandem", Some(v)) => {
                    format!("missed by {:.3} ms", v - MTLS_P50_PER_HOP_BOUND_MS)
                }
                (_, Some(_)) => "anchor (no bound)".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {verdict} |",
                pair.label,
                protocol.label(),
                added.map_or_else(|| "–".into(), |v| format!("{v:+.3} ms")),
            );
        }
    }
    let _ = writeln!(out);
}

fn method_section(out: &mut String) {
    let _ = writeln!(
        out,
        "## Method\n\n\
         - Load generator: `tandem-bench` itself (Rust, hyper's client connection API; one \
         tokio thread). Constant rate: a dispatcher thread releases each request at its \
         intended send time and latency is measured from that time into an HdrHistogram, so a \
         stall counts against every request it delayed (no coordinated omission); 32 requests \
         may be in flight (HTTP/1.1: 32 connections; h2c: 4 connections). Maximum throughput: \
         closed loop, each connection (or stream) sends its next request when the previous \
         answer arrives; its latencies understate the tail and are not reported.\n\
         - Upstream: `tandem-bench upstream`, hyper, one thread, HTTP/1.1 and h2c on one port, \
         a fixed body. Every proxy speaks HTTP/1.1 to it with keep-alive.\n\
         - Proxies, one worker each: bare Pingora (stock settings, `tandem-bench pingora`), \
         HAProxy (`nbthread 1`, `http-reuse always`), nginx (`master_process off`, upstream \
         `keepalive 128`), tandem-proxy (`tandem-proxy run`, destination from the Host header, \
         no iptables).\n\
         - Mutual TLS (bench/README.md, \"Mutual TLS\"): tandem 2 hops mTLS gets its \
         certificates from the bench signer over the identity contract (the operator's needs a \
         kube-apiserver for TokenReview; the data plane's cost is what is measured); the nginx \
         pair (`nginx2`, `nginx2-mtls`) is one worker each, TLS 1.3, certificates from the same \
         kind of test CA. Before an mTLS round is measured: both proxies ready, plaintext to \
         the server side refused, a handshake counted.\n\
         - CPU: utime + stime of the proxy's processes from `/proc/<pid>/stat` over the run. \
         Memory: VmRSS (VmHWM for the peak) from `/proc/<pid>/status`.\n\
         - 10,000 connections: opened 256 at a time, then every connection sends one request at \
         the same instant (a wave); latency from that instant, errors include failed connects \
         and timeouts (10 s). This process's descriptor limit is raised to the hard limit.\n\
         - Client, upstream and proxy share the machine's cores, on loopback: absolute figures \
         are inflated by that; compare ratios within one run.\n"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::run::{Exclusion, FixedResult, ManyResult, MaxResult, Plan};
    use crate::stats::LatencySummary;

    fn latency(p50: f64, p99: f64) -> LatencySummary {
        LatencySummary {
            p50,
            p90: p50,
            p99,
            p999: p99,
            max: p99,
            ok: 1_000,
            errors: 0,
        }
    }

    fn round(p50: f64, cpu: f64, rss: u64) -> Option<RoundResult> {
        Some(RoundResult {
            fixed: vec![FixedResult {
                protocol: Protocol::Http1,
                rate: 1_000,
                latency: latency(p50, p50 * 4.0),
                proxy_cores: Some(0.1),
                handshakes_per_second: None,
            }],
            max: vec![MaxResult {
                protocol: Protocol::Http1,
                rps: 10_000.0,
                errors: 0,
                cpu_per_10k: Some(cpu),
                handshakes_per_second: None,
            }],
            many: Some(ManyResult {
                connections: 10_000,
                connect_errors: 0,
                latency: latency(p50 * 10.0, p50 * 40.0),
                rss_kib: Some(rss),
                handshakes: None,
            }),
            idle_rss_kib: Some(rss / 10),
            load_rss_kib: Some(rss / 5),
            trace: None,
        })
    }

    fn run(topology: Topology, rounds: Vec<Option<RoundResult>>) -> TopologyRun {
        TopologyRun {
            topology,
            rounds,
            failures: Vec::new(),
        }
    }

    fn sample() -> RunResult {
        let mut plan = Plan::quick();
        plan.rates = vec![1_000];
        plan.fixed_protocols = vec![Protocol::Http1];
        plan.max_protocols = vec![Protocol::Http1];
        plan.topologies = vec![
            Topology::Direct,
            Topology::BarePingora,
            Topology::TandemOneHop,
        ];
        plan.excluded = vec![
            Exclusion {
                topology: Topology::Nginx,
                unavailable: None,
            },
            Exclusion {
                topology: Topology::TandemTwoHops,
                unavailable: Some("no tandem-proxy at /x".into()),
            },
        ];
        RunResult {
            plan,
            topologies: vec![
                run(
                    Topology::Direct,
                    vec![round(0.10, 0.0, 0), round(0.20, 0.0, 0)],
                ),
                run(
                    Topology::BarePingora,
                    vec![round(0.30, 0.70, 102_400), round(0.40, 0.80, 102_400)],
                ),
                run(
                    Topology::TandemOneHop,
                    vec![round(0.50, 1.40, 204_800), None],
                ),
            ],
            elapsed: Duration::from_secs(90),
        }
    }

    #[test]
    fn ratios_are_paired_by_round_and_to_the_floor() {
        let report = render(&sample(), &Machine::default(), "latency.svg");
        // Tandem measured only round 1: CPU 1.40 vs Pingora's 0.70 in that round.
        let tandem = report
            .lines()
            .find(|l| l.starts_with("| tandem 1 hop | HTTP/1.1"))
            .unwrap();
        assert!(tandem.contains("| 2.00× |"), "{tandem}");
        // Added p50: 0.50 − 0.10 = +0.40; Pingora's added is +0.20 → 2.00×.
        let fixed = report
            .lines()
            .find(|l| l.starts_with("| tandem 1 hop | 0.50"))
            .unwrap();
        assert!(fixed.contains("+0.40"), "{fixed}");
        assert!(fixed.ends_with("| 2.00× |"), "{fixed}");
    }

    #[test]
    fn topologies_the_user_left_out_are_named_as_left_out() {
        let report = render(&sample(), &Machine::default(), "latency.svg");
        assert!(report.contains("## Left out by the user"));
        assert!(report.contains("- nginx: left out\n"), "{report}");
        assert!(report.contains(
            "- tandem 2 hops: left out (it could not have run here: no tandem-proxy at /x)"
        ));
        assert!(!report.contains("| tandem 2 hops |"));
        assert!(!report.contains("| nginx |"));
    }

    #[test]
    fn a_run_with_nothing_left_out_has_no_such_section() {
        let mut result = sample();
        result.plan.excluded.clear();
        let report = render(&result, &Machine::default(), "latency.svg");
        assert!(!report.contains("Left out"), "{report}");
    }

    #[test]
    fn goals_report_how_far_a_miss_is() {
        let report = render(&sample(), &Machine::default(), "latency.svg");
        let cpu = report
            .lines()
            .find(|l| l.contains("CPU per request ÷ bare Pingora's"))
            .unwrap();
        assert!(cpu.contains("missed by 0.80×"), "{cpu}");
        let memory = report
            .lines()
            .find(|l| l.contains("RSS with 10,000 connections"))
            .unwrap();
        assert!(
            memory.contains("| 200.00 MiB | missed by 72.00 MiB |"),
            "{memory}"
        );
        let errors = report
            .lines()
            .find(|l| l.contains("errors with 10,000 connections"))
            .unwrap();
        assert!(errors.contains("| met |"), "{errors}");
    }

    fn capture_sample() -> RunResult {
        let mut plan = Plan::capture(true);
        plan.rates = vec![1_000];
        plan.fixed_protocols = vec![Protocol::Http1];
        RunResult {
            plan,
            topologies: vec![
                run(
                    Topology::DirectNetns,
                    vec![round(0.10, 0.0, 0), round(0.20, 0.0, 0)],
                ),
                run(
                    Topology::TandemNetns,
                    vec![round(0.50, 0.0, 0), round(0.60, 0.0, 0)],
                ),
                TopologyRun {
                    failures: vec!["round 2: client sidecar counted 0 requests".into()],
                    ..run(Topology::TandemCaptured, vec![round(0.70, 0.0, 0), None])
                },
            ],
            elapsed: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_capture_report_shows_what_capture_costs_paired_by_round() {
        let report = render_capture(
            &capture_sample(),
            &Machine::default(),
            "capture.svg",
            "make bench-capture QUICK=1",
        );
        assert!(report.contains("- Reproduce: `make bench-capture QUICK=1`"));
        // Added over direct (netns): 0.70 − 0.10 in round 1; no bare Pingora column.
        let captured = report
            .lines()
            .find(|l| l.starts_with("| tandem 2 hops, captured | 0.70"))
            .unwrap();
        assert!(captured.contains("| +0.60 |"), "{captured}");
        assert!(!report.contains("bare Pingora's"));
        // Capture's cost: captured − uncaptured in the one round both measured, 0.70 − 0.50.
        let cost = report
            .lines()
            .find(|l| l.starts_with("| 1000 req/s HTTP/1.1 |"))
            .unwrap();
        assert!(
            cost.starts_with("| 1000 req/s HTTP/1.1 | +0.20 |"),
            "{cost}"
        );
        assert!(report.contains("- tandem 2 hops, captured: round 2: client sidecar counted 0"));
    }

    #[test]
    fn a_scenario_where_the_two_hops_queued_is_marked_saturated() {
        let mut result = capture_sample();
        // 32 in flight at 1,000 req/s: a p50 over 32 ms means requests queued.
        result.topologies[2].rounds = vec![round(40.0, 0.0, 0), round(40.0, 0.0, 0)];
        let report = render_capture(&result, &Machine::default(), "c.svg", "make");
        assert!(
            report.contains("| 1000 req/s HTTP/1.1 (saturated) |"),
            "{report}"
        );
        let calm = render_capture(&capture_sample(), &Machine::default(), "c.svg", "make");
        assert!(!calm.contains("(saturated) |"));
    }

    /// A round of a two-hop topology: p50 at 1k req/s HTTP/1.1, proxy cores there, CPU s per
    /// 10k at maximum throughput, handshakes per second (mTLS only).
    fn two_hops(p50: f64, cores: f64, cpu: f64, handshakes: Option<f64>) -> Option<RoundResult> {
        let mut r = round(p50, cpu, 40_960)?;
        r.fixed[0].proxy_cores = Some(cores);
        r.fixed[0].handshakes_per_second = handshakes;
        r.max[0].handshakes_per_second = handshakes;
        r.many.as_mut()?.handshakes = handshakes.map(|h| h as u64 * 100);
        Some(r)
    }

    fn mtls_sample() -> RunResult {
        let mut result = sample();
        result.plan.excluded.clear();
        result.topologies = vec![
            run(
                Topology::NginxTwoHops,
                vec![
                    two_hops(0.30, 0.10, 0.50, None),
                    two_hops(0.40, 0.10, 0.50, None),
                ],
            ),
            run(
                Topology::NginxTwoHopsMtls,
                vec![
                    two_hops(0.36, 0.12, 0.60, Some(0.0)),
                    two_hops(0.44, 0.12, 0.70, Some(2.0)),
                ],
            ),
            run(
                Topology::TandemTwoHops,
                vec![
                    two_hops(0.50, 0.20, 1.00, None),
                    two_hops(0.60, 0.20, 1.00, None),
                ],
            ),
            run(
                Topology::TandemTwoHopsMtls,
                vec![
                    two_hops(0.90, 0.25, 1.20, Some(0.0)),
                    two_hops(0.80, 0.30, 1.40, Some(0.0)),
                ],
            ),
        ];
        result.plan.topologies = result.topologies.iter().map(|r| r.topology).collect();
        result
    }

    fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
        report
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{report}"))
    }

    fn traced(p50: f64, cores: f64, cpu: f64, spans: u64, dropped: u64) -> Option<RoundResult> {
        use crate::tandem::{SpanCounts, TraceReading};
        let mut r = two_hops(p50, cores, cpu, None)?;
        r.trace = Some(TraceRound {
            reading: TraceReading {
                spans: SpanCounts {
                    exported: spans,
                    dropped,
                },
                sink_posts: spans / 512 + 1,
                sink_bytes: spans * 100,
            },
            requests: 10_000,
        });
        Some(r)
    }

    fn tracing_sample() -> RunResult {
        let mut result = sample();
        result.plan.excluded.clear();
        result.topologies = vec![
            run(
                Topology::TandemTwoHops,
                vec![
                    two_hops(0.50, 0.20, 1.00, None),
                    two_hops(0.60, 0.20, 1.00, None),
                ],
            ),
            run(
                Topology::TandemTrace1,
                vec![
                    traced(0.50, 0.22, 1.10, 200, 0),
                    traced(0.60, 0.24, 1.10, 180, 0),
                ],
            ),
            run(
                Topology::TandemTrace100,
                vec![
                    traced(0.70, 0.30, 2.00, 20_000, 0),
                    traced(0.80, 0.40, 3.00, 19_000, 1_000),
                ],
            ),
        ];
        result.plan.topologies = result.topologies.iter().map(|r| r.topology).collect();
        result
    }

    #[test]
    fn tracing_is_shown_beside_tracing_off_with_its_spans() {
        let report = render(&tracing_sample(), &Machine::default(), "latency.svg");
        assert!(report.contains("## Tracing (wave 2, 4/8): sampled vs off"));
        let head = line(&report, "| scenario | p50 off | p50 1 % | p50 100 % |");
        assert!(
            head.ends_with("| CPU 1 % ÷ off | CPU 100 % ÷ off |"),
            "{head}"
        );
        // Every row has as many cells as the head.
        let cells = |l: &str| l.matches('|').count();
        let fixed = line(&report, "| 1000 req/s HTTP/1.1 | 0.55 [0.50..0.60] |");
        assert_eq!(cells(fixed), cells(head), "{fixed}");
        // CPU at 1k req/s: off 200 µs; 1 %: 220, 240 → 1.10×, 1.20× (median 1.15);
        // 100 %: 300, 400 → 1.50×, 2.00× (median 1.75).
        assert!(
            fixed.ends_with("| 200.0 [200.0..200.0] | 230.0 [220.0..240.0] | 350.0 [300.0..400.0] | 1.15× | 1.75× |"),
            "{fixed}"
        );
        // Max throughput: 1.00 s per 10k = 100 µs; 100 %: 200, 300 → 2.00×, 3.00×.
        let max = line(&report, "| max, 64 in flight, HTTP/1.1 |");
        assert_eq!(cells(max), cells(head), "{max}");
        assert!(
            max.contains("| 100.0 [100.0..100.0] | 110.0 [110.0..110.0] | 250.0 [200.0..300.0] |"),
            "{max}"
        );
        assert!(max.ends_with("| 1.10× | 2.50× |"), "{max}");
        // Spans: 100 % exported 20,000 and 19,000 of 10,000 requests (+1,000 dropped) → 2.0.
        let spans = line(
            &report,
            "| 100 % | 19500 [19000..20000] | 500 [0..1000] | 2.000 [2.000..2.000] |",
        );
        assert!(spans.contains("| 1904.3 [1855.5..1953.1] |"), "{spans}");
        let one = line(&report, "| 1 % | 190 [180..200] | 0 [0..0] |");
        assert!(
            one.contains("| 0.019 [0.018..0.020] | 1 [1..1] | 18.6 [17.6..19.5] |"),
            "{one}"
        );
    }

    #[test]
    fn without_tracing_off_or_any_traced_run_there_is_no_tracing_section() {
        let mut result = tracing_sample();
        result
            .topologies
            .retain(|r| r.topology != Topology::TandemTwoHops);
        let report = render(&result, &Machine::default(), "latency.svg");
        assert!(!report.contains("## Tracing"));
        let report = render(&mtls_sample(), &Machine::default(), "latency.svg");
        assert!(!report.contains("## Tracing"));
    }

    #[test]
    fn mtls_adds_half_the_two_hops_difference_per_hop_paired_by_round() {
        let report = render(&mtls_sample(), &Machine::default(), "latency.svg");
        assert!(report.contains("## Mutual TLS (issue 13)"));
        // tandem: rounds add 0.40 and 0.20 to two hops → 0.20 and 0.10 per hop, median 0.15.
        let tandem = line(&report, "| tandem | 1000 req/s HTTP/1.1 |");
        assert!(tandem.contains("| +0.150 [+0.100..+0.200] |"), "{tandem}");
        // CPU per request at 1k req/s: 0.20 cores = 200 µs; mTLS 250 and 300 → 1.38×.
        assert!(
            tandem.contains("| 200.0 [200.0..200.0] | 275.0 [250.0..300.0] | 1.38× |"),
            "{tandem}"
        );
        let nginx = line(&report, "| nginx | 1000 req/s HTTP/1.1 |");
        assert!(nginx.contains("| +0.025 [+0.020..+0.030] |"), "{nginx}");
        assert!(nginx.ends_with("| 1.0 [0.0..2.0] |"), "{nginx}");
        // Maximum throughput: CPU 1.0 s per 10k = 100 µs per request; mTLS 1.2 and 1.4.
        let max = line(
            &report,
            "| tandem | HTTP/1.1 | 10000 [10000..10000] | 10000 [10000..10000] | 1.00× |",
        );
        assert!(
            max.contains("| 100.0 [100.0..100.0] | 130.0 [120.0..140.0] | 1.30× |"),
            "{max}"
        );
    }

    #[test]
    fn the_mtls_goal_is_judged_on_tandem_with_nginx_as_the_anchor() {
        let report = render(&mtls_sample(), &Machine::default(), "latency.svg");
        let goal = line(&report, "| tandem | HTTP/1.1 | +0.150 ms |");
        assert!(goal.ends_with("| missed by 0.050 ms |"), "{goal}");
        let anchor = line(&report, "| nginx | HTTP/1.1 | +0.025 ms |");
        assert!(anchor.ends_with("| anchor (no bound) |"), "{anchor}");
        let mut fast = mtls_sample();
        fast.topologies[3].rounds = vec![
            two_hops(0.60, 0.25, 1.2, Some(0.0)),
            two_hops(0.70, 0.25, 1.2, Some(0.0)),
        ];
        let report = render(&fast, &Machine::default(), "latency.svg");
        assert!(line(&report, "| tandem | HTTP/1.1 | +0.050 ms |").ends_with("| met |"));
    }

    #[test]
    fn an_mtls_pair_missing_a_side_or_every_round_is_said_so() {
        let mut result = mtls_sample();
        result.topologies.remove(0);
        result.topologies[2].rounds = vec![None, None];
        let report = render(&result, &Machine::default(), "latency.svg");
        assert!(
            report.contains("- nginx: not compared, nginx 2 hops not measured in this run."),
            "{report}"
        );
        assert!(report.contains(
            "- tandem 2 hops mTLS: every round failed (see \"Failed rounds\"), nothing measured."
        ));
        let goal = line(&report, "| tandem | HTTP/1.1 | – |");
        assert!(goal.ends_with("| not measured |"), "{goal}");
        // A run without any of the four topologies has no such section.
        let plain = render(&sample(), &Machine::default(), "latency.svg");
        assert!(!plain.contains("## Mutual TLS"), "{plain}");
    }

    #[test]
    fn cells_show_median_and_range() {
        let s = Spread::of(&[1.0, 2.0, 4.0]);
        assert_eq!(cell(s, 1), "2.0 [1.0..4.0]");
        assert_eq!(signed_cell(s, 1), "+2.0 [+1.0..+4.0]");
        assert_eq!(cell(Spread::of(&[3.0]), 2), "3.00");
        assert_eq!(cell(None, 2), "–");
        assert_eq!(ratio_cell(Spread::of(&[1.234])), "1.23×");
    }
}
