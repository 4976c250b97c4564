//! The Markdown report: every topology's figures as median [min..max] over rounds, with its
//! ratio to direct and to bare Pingora computed round by round (paired), and the goals of the
//! benchmark issue checked where tandem-proxy was measured.

use std::fmt::Write as _;

use crate::loadgen::Protocol;
use crate::run::{RoundResult, RunResult, TopologyRun};
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
    fn find(&self, topology: Topology) -> Option<&'a TopologyRun> {
        self.result
            .topologies
            .iter()
            .find(|r| r.topology == topology && r.not_measured.is_none())
    }

    fn measured(&self) -> impl Iterator<Item = &'a TopologyRun> {
        self.result
            .topologies
            .iter()
            .filter(|r| r.not_measured.is_none())
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

    let missing: Vec<_> = result
        .topologies
        .iter()
        .filter_map(|r| r.not_measured.as_ref().map(|why| (r.topology, why)))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(out, "## Not measured\n");
        for (topology, why) in missing {
            let _ = writeln!(out, "- {}: not measured: {why}", topology.name());
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

    fixed_section(&mut out, &view);
    max_section(&mut out, &view);
    many_section(&mut out, &view);
    memory_section(&mut out, &view);
    goals_section(&mut out, &view);
    method_section(&mut out);
    out
}

fn fixed_section(out: &mut String, view: &View<'_>) {
    let plan = &view.result.plan;
    for &rate in &plan.rates {
        for &protocol in &plan.fixed_protocols {
            let _ = writeln!(
                out,
                "## {rate} req/s constant rate, {} (latency in ms from the intended send time)\n",
                protocol.label()
            );
            let _ = writeln!(
                out,
                "| topology | p50 | p90 | p99 | p99.9 | max | errors | proxy cores | added p50 | added p99 | p50 × direct | added p50 × bare Pingora's |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
            for run in view.measured() {
                let f = |pick: fn(&crate::stats::LatencySummary) -> f64| {
                    fixed_figure(protocol, rate, pick)
                };
                let p50 = f(|l| l.p50);
                let p99 = f(|l| l.p99);
                let spread =
                    |g: &dyn Fn(&RoundResult) -> Option<f64>| Spread::of(&flat(&series(run, g)));
                let direct = run.topology == Topology::Direct;
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
                    if !run.topology.has_proxy() || run.topology == Topology::BarePingora {
                        "–".into()
                    } else {
                        ratio_cell(view.added_versus_floor(run, &p50))
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
            "Not evaluated: tandem-proxy was not measured in this run.\n"
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
    use crate::run::{FixedResult, ManyResult, MaxResult, Plan};
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
            }],
            max: vec![MaxResult {
                protocol: Protocol::Http1,
                rps: 10_000.0,
                errors: 0,
                cpu_per_10k: Some(cpu),
            }],
            many: Some(ManyResult {
                connections: 10_000,
                connect_errors: 0,
                latency: latency(p50 * 10.0, p50 * 40.0),
                rss_kib: Some(rss),
            }),
            idle_rss_kib: Some(rss / 10),
            load_rss_kib: Some(rss / 5),
        })
    }

    fn run(topology: Topology, rounds: Vec<Option<RoundResult>>) -> TopologyRun {
        TopologyRun {
            topology,
            not_measured: None,
            rounds,
            failures: Vec::new(),
        }
    }

    fn sample() -> RunResult {
        let mut plan = Plan::quick();
        plan.rates = vec![1_000];
        plan.fixed_protocols = vec![Protocol::Http1];
        plan.max_protocols = vec![Protocol::Http1];
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
                TopologyRun {
                    topology: Topology::TandemTwoHops,
                    not_measured: Some("proxy not available".into()),
                    rounds: Vec::new(),
                    failures: Vec::new(),
                },
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
    fn unmeasured_topologies_are_named_with_their_reason() {
        let report = render(&sample(), &Machine::default(), "latency.svg");
        assert!(report.contains("- tandem 2 hops: not measured: proxy not available"));
        assert!(!report.contains("| tandem 2 hops |"));
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
