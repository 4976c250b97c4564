//! `tandem-bench`: `run` measures every topology and writes the report; `capture` measures the
//! two hops behind real iptables rules in network namespaces; `resilience` measures success
//! rates while an endpoint fails; `upstream`, `pingora` and `load` are the pieces they start
//! (and can be run by hand).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tandem_bench::loadgen::{self, ClosedLoop, OpenLoop, Protocol, Target};
use tandem_bench::report::{self, Machine};
use tandem_bench::run::{self, Plan, SelectError};
use tandem_bench::topology::{Program, Tools, Topology};
use tandem_bench::{capture, chart, netns, otlp_sink, pingora_floor, resilience, upstream};

#[derive(Parser)]
#[command(about = "Tandem's benchmark: load generator, upstream, bare Pingora and orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure every topology and write the report and chart.
    Run(RunArgs),
    /// Serve a fixed body over HTTP/1.1 and h2c.
    Upstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Size of the body.
        #[arg(long, default_value_t = 32)]
        body_bytes: usize,
        /// Answer every Nth request with 503 (the resilience run's misbehaving endpoint).
        #[arg(long)]
        fail_every: Option<u64>,
    },
    /// The OTLP/HTTP load sink the tracing topologies export to: answers `POST /v1/traces`
    /// with 200, counts the POSTs and bytes (`GET /stats`).
    OtlpSink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Success rate through tandem-proxy while one of three endpoints fails, per policy.
    Resilience(ResilienceArgs),
    /// What capture costs: the two hops behind real iptables rules in network namespaces, side
    /// by side with the same two hops without them and with direct (needs root; skipped
    /// with a message otherwise).
    Capture(CaptureArgs),
    /// The bare Pingora proxy: forwards everything to one upstream.
    Pingora {
        /// Address to listen on (HTTP/1.1 and h2c).
        #[arg(long)]
        listen: SocketAddr,
        /// The upstream.
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Drive load at one loopback target and print the latency summary.
    Load(LoadArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The short run (under five minutes).
    #[arg(long, env = "QUICK", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    quick: bool,
    /// Rounds (overrides the mode's default).
    #[arg(long)]
    rounds: Option<usize>,
    /// The tandem-proxy binary; without it the tandem topologies cannot run, so the run is
    /// refused unless they are left out with --skip.
    #[arg(long, env = "TANDEM_PROXY_BIN")]
    tandem_proxy: Option<PathBuf>,
    /// Folder for the report, chart and raw results.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only these topologies (default: all); the others are reported as left out.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Topology>,
    /// Leave this topology out (repeatable, or comma-separated). Any topology asked for that
    /// cannot run here (a program missing) refuses the run, exit code 64, unless left out.
    #[arg(long, value_enum, value_delimiter = ',')]
    skip: Vec<Topology>,
}

#[derive(clap::Args)]
struct ResilienceArgs {
    /// The short run (10 s per policy instead of 60 s).
    #[arg(long, env = "QUICK", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    quick: bool,
    /// The tandem-proxy binary.
    #[arg(long, env = "TANDEM_PROXY_BIN")]
    tandem_proxy: PathBuf,
    /// Folder for the report.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Requests per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
}

#[derive(clap::Args)]
struct CaptureArgs {
    /// The short run (2 rounds of 1.5-second runs).
    #[arg(long, env = "QUICK", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    quick: bool,
    /// Rounds (overrides the mode's default).
    #[arg(long)]
    rounds: Option<usize>,
    /// The tandem-proxy binary.
    #[arg(long, env = "TANDEM_PROXY_BIN")]
    tandem_proxy: PathBuf,
    /// Folder for the report.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Http1,
    H2c,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Target address (loopback only).
    #[arg(long)]
    target: SocketAddr,
    /// Host / :authority to send (default: the target).
    #[arg(long)]
    authority: Option<String>,
    /// Protocol.
    #[arg(long, value_enum, default_value = "http1")]
    protocol: ProtocolArg,
    /// Constant rate in requests/second; without it, closed loop at maximum throughput.
    #[arg(long)]
    rate: Option<u64>,
    /// Requests in flight (connections for HTTP/1.1).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Length in seconds (at most 600).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Exit code of a run refused before it started, as for bad config (EX_USAGE).
const EXIT_REFUSED: u8 = 64;

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // A refusal is an answer to what the user asked for, not a failure of the program:
        // the message alone, without a backtrace.
        Err(e) if e.downcast_ref::<SelectError>().is_some() => {
            eprintln!("Error: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            // Printed as `fn main() -> anyhow::Result` would, with the cause chain.
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pingora { listen, upstream } => {
            // Pingora builds and owns its runtimes, so it runs outside tokio.
            pingora_floor::run(listen, upstream)?;
            Ok(())
        }
        Command::Upstream {
            listen,
            body_bytes,
            fail_every,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("bind {listen}"))?;
                println!("listening on {}", listener.local_addr()?);
                upstream::serve_failing(listener, upstream::fixed_body(body_bytes), fail_every)
                    .await;
                Ok(())
            })
        }
        Command::OtlpSink { listen } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("bind {listen}"))?;
                println!("listening on {}", listener.local_addr()?);
                otlp_sink::serve(listener).await;
                Ok(())
            })
        }
        Command::Load(args) => client_runtime()?.block_on(load(args)),
        Command::Resilience(args) => client_runtime()?.block_on(resilience(args)),
        Command::Run(args) => run_all(args),
        Command::Capture(args) => client_runtime()?.block_on(capture_run(args)),
    }
}

/// The client side runs on one thread, like the proxies it measures.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn resilience(args: ResilienceArgs) -> anyhow::Result<()> {
    let bench = std::env::current_exe().context("find this program")?;
    let plan = resilience::Plan {
        rate: args.rate.clamp(1, 5_000),
        length: Duration::from_secs(if args.quick { 10 } else { 60 }),
    };
    let results = resilience::run(&bench, &args.tandem_proxy, plan).await?;
    let command = format!(
        "make bench-resilience{}",
        if args.quick { " QUICK=1" } else { "" }
    );
    let tools = Tools {
        bench: bench.clone(),
        haproxy: Program::Missing("not part of the resilience run".into()),
        nginx: Program::Missing("not part of the resilience run".into()),
        tandem: Program::Found(args.tandem_proxy.clone()),
    };
    let m = machine(&tools);
    let mut text = format!(
        "# Tandem resilience benchmark\n\n{}; {}; {}\n\n",
        m.date, m.description, m.versions
    );
    text.push_str(&resilience::markdown(&results, plan, &command));
    std::fs::create_dir_all(&args.out)?;
    let path = resilience::report_path(&args.out, args.quick);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    println!("resilience report: {}", path.display());
    Ok(())
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let target = Target {
        addr: args.target,
        authority: args.authority.unwrap_or_else(|| args.target.to_string()),
        protocol: match args.protocol {
            ProtocolArg::Http1 => Protocol::Http1,
            ProtocolArg::H2c => Protocol::H2c,
        },
    };
    let length = Duration::from_secs(args.seconds.clamp(1, 600));
    let outcome = match args.rate {
        Some(rate) => {
            let params = OpenLoop {
                rate,
                length,
                in_flight: args.connections,
                h2_connections: 4,
                timeout: Duration::from_secs(10),
            };
            loadgen::open_loop(&target, &params).await?
        }
        None => {
            let params = ClosedLoop {
                in_flight: args.connections,
                h2_connections: 4,
                length,
                timeout: Duration::from_secs(10),
            };
            loadgen::closed_loop(&target, &params).await?
        }
    };
    let s = outcome.summary;
    println!(
        "{:.0} req/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ok {}  errors {}",
        outcome.throughput(),
        s.p50,
        s.p90,
        s.p99,
        s.p999,
        s.max,
        s.ok,
        s.errors
    );
    Ok(())
}

/// `tandem-bench run`: decides what to measure before anything starts (refusing a run that
/// would leave out a topology the user did not), then measures and writes the report.
fn run_all(args: RunArgs) -> anyhow::Result<()> {
    let tools = Tools {
        bench: std::env::current_exe().context("find this binary")?,
        haproxy: Program::find("haproxy", "`make bench-deps` installs it"),
        nginx: Program::find("nginx", "`make bench-deps` installs it"),
        tandem: Program::tandem_proxy(args.tandem_proxy.as_deref()),
    };
    let selection = run::select(&Topology::ALL, &args.only, &args.skip, |t| tools.missing(t))?;
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(rounds) = args.rounds {
        plan.rounds = rounds.max(1);
    }
    plan.topologies = selection.measure;
    plan.excluded = selection.excluded;
    client_runtime()?.block_on(measure_all(&plan, &tools, args.quick, &args.out))
}

async fn measure_all(
    plan: &Plan,
    tools: &Tools,
    quick: bool,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    // 10,000 client connections need more descriptors than the usual soft limit; the proxies
    // started from here inherit the raised limit.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    eprintln!("descriptor limit: {nofile}");
    let load_before = load_average();
    let result = run::run(plan, tools).await?;
    let machine = machine_after(tools, &load_before);
    let prefix = if quick { "quick-" } else { "" };
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let chart_name = format!("{prefix}latency.svg");
    let svg = chart::render_svg(&result)?;
    std::fs::write(out.join(&chart_name), svg)?;
    let markdown = report::render(&result, &machine, &chart_name);
    let report_path = out.join(format!("{prefix}report.md"));
    std::fs::write(&report_path, &markdown)?;
    std::fs::write(
        out.join(format!("{prefix}results.json")),
        serde_json::to_string_pretty(&result)?,
    )?;
    eprintln!(
        "report: {} ({:.1} min)",
        report_path.display(),
        result.elapsed.as_secs_f64() / 60.0
    );
    Ok(())
}

async fn capture_run(args: CaptureArgs) -> anyhow::Result<()> {
    if let Some(why) = netns::missing_prerequisites() {
        println!("capture run skipped: {why}");
        return Ok(());
    }
    let tandem = args
        .tandem_proxy
        .canonicalize()
        .with_context(|| format!("tandem-proxy at {}", args.tandem_proxy.display()))?;
    let bench = std::env::current_exe().context("find this program")?;
    let mut plan = Plan::capture(args.quick);
    if let Some(rounds) = args.rounds {
        plan.rounds = rounds.max(1);
    }
    for name in netns::remove_stale() {
        eprintln!("removed the network namespace {name} of a benchmark run that is gone");
    }
    let pods = netns::Pods::create().context("create the pods' network namespaces")?;
    let paths = pods.paths();
    let upstream = capture::start_upstream(&bench, &paths, plan.body_bytes)?;
    let stage = capture::CaptureStage {
        tandem: tandem.clone(),
        pods: paths,
    };
    let load_before = load_average();
    let (done, finished) = tokio::sync::oneshot::channel();
    let measured_plan = plan.clone();
    std::thread::spawn(move || {
        let _ = done.send(capture::measure(measured_plan, stage));
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = finished => result.context("the measuring thread ended without a result")??,
        _ = tokio::signal::ctrl_c() => {
            drop(upstream);
            drop(pods);
            anyhow::bail!("interrupted: the network namespaces were deleted");
        }
        _ = terminate.recv() => {
            drop(upstream);
            drop(pods);
            anyhow::bail!("terminated: the network namespaces were deleted");
        }
    };
    drop(upstream);
    drop(pods);
    let tools = Tools {
        bench,
        haproxy: Program::Missing("not part of the capture run".into()),
        nginx: Program::Missing("not part of the capture run".into()),
        tandem: Program::Found(tandem),
    };
    let machine = machine_after(&tools, &load_before);
    let prefix = if args.quick { "quick-" } else { "" };
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let chart_name = format!("{prefix}capture-latency.svg");
    std::fs::write(args.out.join(&chart_name), chart::render_svg(&result)?)?;
    let command = format!(
        "make bench-capture{}",
        if args.quick { " QUICK=1" } else { "" }
    );
    let markdown = report::render_capture(&result, &machine, &chart_name, &command);
    let report_path = args.out.join(format!("{prefix}capture.md"));
    std::fs::write(&report_path, markdown)?;
    std::fs::write(
        args.out.join(format!("{prefix}capture.json")),
        serde_json::to_string_pretty(&result)?,
    )?;
    let failures: usize = result.topologies.iter().map(|t| t.failures.len()).sum();
    eprintln!(
        "capture report: {} ({:.1} min, {failures} failed rounds)",
        report_path.display(),
        result.elapsed.as_secs_f64() / 60.0
    );
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The machine, with how busy it was before the run (`load_before`) and is now: other work on
/// the machine moves every figure.
fn machine_after(tools: &Tools, load_before: &str) -> Machine {
    let mut machine = machine(tools);
    machine.description.push_str(&format!(
        "; load average (1 min) {load_before} before the run, {} after",
        load_average()
    ));
    machine
}

fn machine(tools: &Tools) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = tandem_bench::procfs::parse_status_kib(&meminfo, "MemTotal")
        .map_or(0.0, |k| k as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut versions = vec![format!(
        "commit {}",
        command_output("git", &["rev-parse", "--short", "HEAD"])
    )];
    if let Some(h) = tools.haproxy.path() {
        versions.push(command_output(&h.to_string_lossy(), &["-v"]));
    }
    if let Some(n) = tools.nginx.path() {
        versions.push(command_output(&n.to_string_lossy(), &["-v"]));
    }
    versions.push("Pingora 0.9".into());
    Machine {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        description: format!(
            "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
            kernel.trim()
        ),
        versions: versions.join("; "),
    }
}
