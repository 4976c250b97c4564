//! `tandemctl`: Tandem's command line, also installed as the kubectl plugin `kubectl-tandem`.
//!
//! Each command is a module with its clap arguments, a pure core that turns what was read from
//! the apiserver into a report (tested without a cluster), and thin I/O around it:
//!
//! - [`explain`]: which authorization policies apply to a pod, and whether a caller would get in.
//!
//! The later commands (`check`, `stat`, `proxy-status`, …) slot in as further [`Command`]
//! variants beside `explain`, sharing [`cluster`] (the kube client) and [`output`] (the
//! `-o table|json` choice).
//!
//! # Exit codes
//!
//! A decision is not an error: `explain --from` that finds the caller denied exits with
//! [`exit::DENIED`], distinct from every failure. See [`exit`].

pub mod cluster;
pub mod error;
pub mod explain;
pub mod output;

use std::io::Write;

use clap::{Parser, Subcommand};

pub use error::{Error, Result};

/// The exit codes scripts can rely on (documented in `tandemctl/README.md`).
pub mod exit {
    /// The command did what was asked; with `explain --from`: the caller would be allowed.
    pub const OK: u8 = 0;
    /// `explain --from`: the caller would be denied (an answer, not a failure).
    pub const DENIED: u8 = 1;
    /// The command line is wrong (clap's own code for usage errors is also 2).
    pub const USAGE: u8 = 2;
    /// The object asked about (the pod) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The cluster could not be asked: no usable kubeconfig, the apiserver unreachable, or a
    /// request refused (unauthorized, forbidden) or answered unexpectedly.
    pub const CLUSTER: u8 = 4;
    /// `explain --from`: no decision can be given, because the pod's proxy config is missing or
    /// invalid (the proxy then keeps whatever it loaded last, which the apiserver cannot show).
    pub const UNDECIDABLE: u8 = 5;
}

/// Tandem's command line.
#[derive(Debug, Parser)]
#[command(
    name = "tandemctl",
    version,
    about = "Tandem service mesh: explain what the mesh does"
)]
pub struct Cli {
    /// How to reach the cluster.
    #[command(flatten)]
    pub cluster: cluster::ClusterArgs,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Which authorization policies apply to a pod and, with --from, whether a caller would be
    /// allowed, by which policy and rule, and what the proxy would answer.
    Explain(explain::ExplainArgs),
}

/// What a command concluded, as the process's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (explain --from: allowed).
    Ok,
    /// explain --from: denied.
    Denied,
}

impl Outcome {
    /// The exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Ok => exit::OK,
            Self::Denied => exit::DENIED,
        }
    }
}

/// Runs a parsed command line, writing its report to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<Outcome> {
    match cli.command {
        Command::Explain(args) => explain::run(&cli.cluster, &args, out).await,
    }
}

/// Parses the process's arguments, runs, prints errors to stderr and returns the exit code:
/// the whole `main` of both binaries.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(source) => {
            eprintln!("tandemctl: cannot start the async runtime: {source}");
            return std::process::ExitCode::from(exit::CLUSTER);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(run(cli, &mut stdout)) {
        Ok(outcome) => std::process::ExitCode::from(outcome.exit_code()),
        Err(error) => {
            eprintln!("tandemctl: {}", error::chain(&error));
            std::process::ExitCode::from(error.exit_code())
        }
    }
}
