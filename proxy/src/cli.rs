//! Command-line flags, each with an environment fallback.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tandem_crds::{identity, names};

use crate::identity::{SignerAddr, SignerName};
use crate::tls::probes::AppProbes;

/// Tandem's sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "tandem-proxy", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: outbound, inbound and admin listeners.
    Run(Box<RunArgs>),
    /// Program the pod's iptables so its TCP flows through the sidecar (the tandem-init
    /// container).
    Init(tandem_init::InitArgs),
}

/// Flags of `tandem-proxy run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The proxy config file (the kubelet's ConfigMap mount).
    #[arg(long, env = "TANDEM_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where the outbound capture listener binds.
    #[arg(long, env = "TANDEM_OUTBOUND_ADDR", default_value_t = any(names::OUTBOUND_PORT))]
    pub outbound_addr: SocketAddr,
    /// Where the inbound capture listener binds.
    #[arg(long, env = "TANDEM_INBOUND_ADDR", default_value_t = any(names::INBOUND_PORT))]
    pub inbound_addr: SocketAddr,
    /// Where the admin server binds.
    #[arg(long, env = "TANDEM_ADMIN_ADDR", default_value_t = any(names::ADMIN_PORT))]
    pub admin_addr: SocketAddr,
    /// How long requests in flight may finish after SIGTERM (e.g. `20s`).
    #[arg(long, env = "TANDEM_DRAIN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,
    /// How often the config file is checked for a new version (e.g. `500ms`).
    #[arg(long, env = "TANDEM_CONFIG_POLL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub config_poll: Duration,
    /// Worker threads of the async runtime.
    #[arg(long, env = "TANDEM_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Log format on stdout.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Access log on stdout: one JSON line per HTTP request, or none.
    #[arg(long, env = "TANDEM_ACCESS_LOG", value_enum, default_value_t = AccessLogFormat::Json)]
    pub access_log: AccessLogFormat,
    /// The pod's HTTP probes (JSON `[{"port":8080,"path":"/healthz"}]`, written by the
    /// webhook): served in plaintext even when the workload is strict.
    #[arg(long, env = "TANDEM_APP_PROBES", default_value = "", value_parser = AppProbes::parse)]
    pub app_probes: AppProbes,
    /// The operator's config stream (on the signer's address, so only with identity on):
    /// configs within a second of a change, beside the mounted file.
    #[arg(long, env = "TANDEM_CONFIG_STREAM", value_enum, default_value_t = Switch::On)]
    pub config_stream: Switch,
    /// Span export (tracing is turned on by the config).
    #[command(flatten)]
    pub trace: TraceArgs,
    /// This pod's workload (its controller's name: the Deployment of a ReplicaSet's pod, as
    /// Istio derives it), which the webhook sets; the `*_workload` label of this proxy's side
    /// in the standard metrics and the access log.
    #[arg(long, env = "TANDEM_WORKLOAD_NAME", default_value = "unknown")]
    pub workload_name: String,
    /// Workload identity (certificate and trust anchors for mutual TLS).
    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// Flags of the span exporter.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Spans waiting for export at most; a full queue drops new spans (counted).
    #[arg(long, env = "TANDEM_TRACE_QUEUE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub trace_queue: u32,
    /// Longest a span waits before its batch is sent (a batch also goes at 512 spans).
    #[arg(long, env = "TANDEM_TRACE_FLUSH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub trace_flush: Duration,
}

impl Default for TraceArgs {
    fn default() -> Self {
        Self {
            trace_queue: 2048,
            trace_flush: Duration::from_secs(5),
        }
    }
}

/// A feature switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// Flags of the identity client.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// `host:port` of the identity signer; empty or absent turns identity off (the proxy runs
    /// plaintext).
    #[arg(long, env = "TANDEM_IDENTITY_ADDR", default_value = "", value_parser = IdentityAddr::parse)]
    pub identity_addr: IdentityAddr,
    /// The name the signer's certificate must carry.
    #[arg(long, env = "TANDEM_IDENTITY_NAME", default_value_t = default_identity_name(), value_parser = SignerName::parse)]
    pub identity_name: SignerName,
    /// The projected ServiceAccount token presented to the signer (read afresh on each call).
    #[arg(long, env = "TANDEM_IDENTITY_TOKEN", default_value_os_t = Path::new(identity::TOKEN_DIR).join(identity::TOKEN_FILE))]
    pub identity_token: PathBuf,
    /// The trust anchors (PEM, one or more roots), polled like the config file.
    #[arg(long, env = "TANDEM_TRUST_ROOTS", default_value_os_t = Path::new(identity::TRUST_ROOTS_DIR).join(identity::TRUST_ROOTS_KEY))]
    pub trust_roots: PathBuf,
}

impl Default for IdentityArgs {
    /// Identity off, every path at its default (what an embedded proxy without a signer runs).
    fn default() -> Self {
        Self {
            identity_addr: IdentityAddr(None),
            identity_name: default_identity_name(),
            identity_token: Path::new(identity::TOKEN_DIR).join(identity::TOKEN_FILE),
            trust_roots: Path::new(identity::TRUST_ROOTS_DIR).join(identity::TRUST_ROOTS_KEY),
        }
    }
}

/// `--identity-addr`: the signer's address, or none (identity off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAddr(pub Option<SignerAddr>);

impl IdentityAddr {
    /// Parses `host:port`; an empty (or blank) value is identity off.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self(None));
        }
        SignerAddr::parse(s).map(|addr| Self(Some(addr)))
    }
}

fn default_identity_name() -> SignerName {
    // The fixed service name is a valid DNS name; fall back to the IP form only to avoid a panic.
    SignerName::parse(&identity::signer_dns_name()).unwrap_or(SignerName(
        rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ))
}

/// Whether each HTTP request gets an access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessLogFormat {
    /// One JSON object per request (target `tandem::access`), whatever `--log-format` says.
    Json,
    /// No access log (Linkerd's and Istio's default; metrics still count every request).
    Off,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (the cluster default).
    Json,
    /// Human-readable text.
    Text,
}

/// `names::CONFIG_DIR` + `/` + `names::CONFIG_KEY` (a test below keeps them in step).
const DEFAULT_CONFIG: &str = "/etc/tandem/config.json";

fn any(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_fixed_ports_and_config_path() {
        let cli = Cli::try_parse_from(["tandem-proxy", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.outbound_addr.port(), 15001);
        assert_eq!(args.inbound_addr.port(), 15006);
        assert_eq!(args.admin_addr.port(), 15020);
        assert_eq!(
            args.config,
            PathBuf::from(names::CONFIG_DIR).join(names::CONFIG_KEY)
        );
        assert_eq!(args.drain_grace, Duration::from_secs(20));
        assert_eq!(args.config_stream, Switch::On);
    }

    fn run(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["tandem-proxy", "run"].iter().chain(argv))?;
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        Ok(*args)
    }

    #[test]
    fn identity_is_off_by_default_and_defaults_to_the_fixed_paths_and_name() {
        let args = run(&[]).unwrap();
        assert_eq!(args.identity.identity_addr, IdentityAddr(None));
        assert_eq!(
            args.identity.identity_name.to_string(),
            identity::signer_dns_name()
        );
        assert_eq!(
            args.identity.identity_token,
            PathBuf::from("/var/run/secrets/tandem.dev/identity/token")
        );
        assert_eq!(
            args.identity.trust_roots,
            PathBuf::from("/var/run/secrets/tandem.dev/trust/roots.pem")
        );
        let blank = run(&["--identity-addr", ""]).unwrap();
        assert_eq!(blank.identity.identity_addr, IdentityAddr(None));
    }

    #[test]
    fn identity_addresses_are_host_and_port() {
        let args = run(&["--identity-addr", "tandem-identity.tandem-system.svc:15030"]).unwrap();
        assert_eq!(
            args.identity.identity_addr.0,
            Some(SignerAddr {
                host: "tandem-identity.tandem-system.svc".into(),
                port: 15030
            })
        );
        let v6 = run(&["--identity-addr", "[::1]:15030"]).unwrap();
        let addr = v6.identity.identity_addr.0.unwrap();
        assert_eq!(addr.host, "::1");
        assert_eq!(addr.to_string(), "[::1]:15030");
        for bad in ["tandem-identity", "host:port", ":15030", "host:0", "a b:1"] {
            assert!(run(&["--identity-addr", bad]).is_err(), "{bad} accepted");
        }
        assert!(run(&["--identity-name", "not a name"]).is_err());
    }
}
