//! `tandem-init`: programs a meshed pod's nat table so that its TCP flows through the
//! `tandem-proxy` sidecar. It runs as `tandem-proxy init` in the `tandem-init` container that
//! the webhook injects before the proxy.
//!
//! # What the rules do
//!
//! - Inbound TCP (the `PREROUTING` hook) is redirected to the proxy's inbound port 15006,
//!   except connections to the admin port 15020 and to `--skip-inbound-ports`.
//! - Outbound TCP (the `OUTPUT` hook) is redirected to the outbound port 15001, except traffic
//!   of the proxy's UID/GID 2102, traffic leaving through loopback, and destinations in
//!   `--skip-outbound-ports` or `--skip-outbound-cidrs`.
//!
//! [`rules`] builds them as an `iptables-restore` document (pure, unit-tested); [`apply`] loads
//! it in one transaction with `iptables-nft-restore`, falling back to `iptables-legacy-restore`.
//! Running it twice leaves the same rules. Where the pod has a global IPv6 address the same
//! rules are applied with `ip6tables` as well.
//!
//! # The API the proxy binary calls (stable)
//!
//! ```no_run
//! use clap::Parser;
//!
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// Program iptables for the sidecar (the tandem-init container).
//!     Init(tandem_init::InitArgs),
//! }
//! # #[derive(Parser)] struct Cli { #[command(subcommand)] command: Command }
//! # fn main() -> Result<(), tandem_init::Error> {
//! let Command::Init(args) = Cli::parse().command;
//! tandem_init::run(&args)?; // prints the rules with --dry-run, applies them otherwise
//! # Ok(())
//! # }
//! ```
//!
//! [`InitArgs`] is a `clap::Args` struct; every flag also reads a `TANDEM_INIT_*` variable.
//! [`run`] returns an [`Outcome`]; an [`Error`] means the pod must not start (the init
//! container exits non-zero), because an unmeshed pod that believes it is meshed is worse.

mod apply;
mod args;
mod config;
mod rules;

use std::io::{self, Write};

pub use apply::{Backend, IptablesMode, apply, has_global_ipv6};
pub use args::{InitArgs, Ipv6Mode};
pub use config::{InitConfig, PortRange, parse_cidr, parse_cidr_list, parse_port_list};
pub use rules::{INBOUND_CHAIN, IpFamily, OUTPUT_CHAIN, replacing_jumps, rules};

/// Where the kernel lists the namespace's IPv6 addresses.
// `thread-self`, not `self`: a thread that entered another network namespace must see that
// namespace's addresses (the tests run `run` in such a thread).
const IF_INET6: &str = "/proc/thread-self/net/if_inet6";

/// Why the rules could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A port or port range could not be parsed.
    #[error("invalid port {value:?}: {reason}")]
    InvalidPort {
        /// The text as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A CIDR could not be parsed.
    #[error("invalid CIDR {value:?}: expected an address or a network like 10.0.0.0/8")]
    InvalidCidr {
        /// The text as given.
        value: String,
    },
    /// An iptables program could not be started or fed.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An iptables program exited with an error.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Every allowed backend failed.
    #[error("no iptables backend could apply the {family} rules ({attempts})")]
    NoBackend {
        /// The address family whose rules failed.
        family: IpFamily,
        /// Each backend and its error.
        attempts: String,
    },
    /// The interface addresses could not be read to decide on IPv6.
    #[error("could not read {path} to detect IPv6")]
    ReadInterfaces {
        /// The file.
        path: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The dry-run output could not be written.
    #[error("could not write the rules")]
    Print(#[source] io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `--dry-run`: the rules were printed, nothing was applied.
    Printed,
    /// The rules were applied for each family with the backend shown.
    Applied(Vec<(IpFamily, Backend)>),
}

/// The entry point of `tandem-proxy init`: prints the rules with `--dry-run`, applies them
/// otherwise.
pub fn run(args: &InitArgs) -> Result<Outcome> {
    run_to(args, &mut io::stdout().lock())
}

/// [`run`], printing dry-run output to `out`.
pub fn run_to(args: &InitArgs, out: &mut dyn Write) -> Result<Outcome> {
    let config = args.config();
    let families = families(args.ipv6)?;
    if args.dry_run {
        for &family in &families {
            writeln!(out, "# {family}: {}-restore --noflush", tool_name(family))
                .and_then(|()| out.write_all(rules(&config, family).as_bytes()))
                .map_err(Error::Print)?;
        }
        return Ok(Outcome::Printed);
    }
    let mut applied = Vec::with_capacity(families.len());
    for family in families {
        applied.push((family, apply(&config, family, args.iptables_mode)?));
    }
    Ok(Outcome::Applied(applied))
}

fn tool_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// The families to program: IPv4 always; IPv6 when asked, or in `auto` mode when the
/// namespace has a global IPv6 address.
fn families(mode: Ipv6Mode) -> Result<Vec<IpFamily>> {
    let ipv6 = match mode {
        Ipv6Mode::Always => true,
        Ipv6Mode::Never => false,
        Ipv6Mode::Auto => match std::fs::read_to_string(IF_INET6) {
            Ok(text) => has_global_ipv6(&text),
            // No such file: the kernel has IPv6 disabled, so there is nothing to capture.
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(Error::ReadInterfaces {
                    path: IF_INET6,
                    source,
                });
            }
        },
    };
    Ok(if ipv6 {
        vec![IpFamily::V4, IpFamily::V6]
    } else {
        vec![IpFamily::V4]
    })
}
