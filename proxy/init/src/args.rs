//! The command line of `tandem-proxy init`.

use ipnet::IpNet;
use tandem_crds::names;

use crate::apply::IptablesMode;
use crate::config::{InitConfig, PortRange};

/// Flags of `tandem-proxy init`. The defaults are the fixed ports and UID of DESIGN.md; the
/// webhook passes the per-pod exclusions. Lists are comma-separated.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID of the proxy, whose outbound traffic is not captured.
    #[arg(long, env = "TANDEM_INIT_PROXY_UID", default_value_t = names::PROXY_UID)]
    pub proxy_uid: u32,
    /// GID of the proxy, whose outbound traffic is not captured either.
    #[arg(long, env = "TANDEM_INIT_PROXY_GID", default_value_t = names::PROXY_UID)]
    pub proxy_gid: u32,
    /// Port inbound TCP is redirected to.
    #[arg(long, env = "TANDEM_INIT_INBOUND_PORT", default_value_t = names::INBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port the application's outbound TCP is redirected to.
    #[arg(long, env = "TANDEM_INIT_OUTBOUND_PORT", default_value_t = names::OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The proxy's admin port, never captured inbound.
    #[arg(long, env = "TANDEM_INIT_ADMIN_PORT", default_value_t = names::ADMIN_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// Inbound ports (or ranges like 9000-9100) that reach the application directly.
    #[arg(long, env = "TANDEM_INIT_SKIP_INBOUND_PORTS", value_delimiter = ',',
          value_parser = parse_port)]
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports (or ranges) the application reaches directly.
    #[arg(long, env = "TANDEM_INIT_SKIP_OUTBOUND_PORTS", value_delimiter = ',',
          value_parser = parse_port)]
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound networks (CIDRs or addresses) the application reaches directly.
    #[arg(long, env = "TANDEM_INIT_SKIP_OUTBOUND_CIDRS", value_delimiter = ',',
          value_parser = parse_net)]
    pub skip_outbound_cidrs: Vec<IpNet>,
    /// Whether to program ip6tables too: `auto` does when the pod has a global IPv6 address.
    #[arg(long, env = "TANDEM_INIT_IPV6", value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
    /// Which iptables implementation to use.
    #[arg(long, env = "TANDEM_INIT_IPTABLES_MODE", value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables_mode: IptablesMode,
    /// Print the rules instead of applying them.
    #[arg(long, env = "TANDEM_INIT_DRY_RUN")]
    pub dry_run: bool,
}

/// Whether IPv6 rules are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// When the network namespace has a global IPv6 address.
    Auto,
    /// Always (fails if ip6tables is missing).
    Always,
    /// Never.
    Never,
}

impl InitArgs {
    /// The rule inputs these flags describe.
    pub fn config(&self) -> InitConfig {
        InitConfig {
            proxy_uid: self.proxy_uid,
            proxy_gid: Some(self.proxy_gid),
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone(),
        }
    }
}

fn parse_port(text: &str) -> Result<PortRange, String> {
    text.parse()
        .map_err(|error: crate::Error| error.to_string())
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    crate::config::parse_cidr(text).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::rules::{IpFamily, rules};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied())).map(|cli| cli.init)
    }

    #[test]
    fn no_flags_give_the_fixed_ports_and_uid() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.config(), InitConfig::default());
        assert!(!args.dry_run);
    }

    #[test]
    fn the_webhook_arguments_parse_into_exclusions() {
        let args = parse(&[
            "--skip-inbound-ports=4567,9000-9100",
            "--skip-outbound-ports=5432",
            "--skip-outbound-cidrs=10.96.0.0/12,fd00::/8",
            "--dry-run",
        ])
        .unwrap();
        let doc = rules(&args.config(), IpFamily::V4);
        assert!(doc.contains("--dports 15020,4567,9000:9100"), "{doc}");
        assert!(doc.contains("-d 10.96.0.0/12"), "{doc}");
        assert!(args.dry_run);
    }

    #[test]
    fn bad_flags_are_refused_with_a_message() {
        let error = parse(&["--skip-outbound-ports=70000"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("70000"), "{error}");
        let error = parse(&["--skip-outbound-cidrs=10.0.0.0/99"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("10.0.0.0/99"), "{error}");
        assert!(parse(&["--inbound-port=0"]).is_err());
    }
}
