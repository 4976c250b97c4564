//! What the rules are built from: ports, the proxy's identity and the exclusions.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use tandem_crds::names;

use crate::Error;

/// Everything [`crate::rules`] needs. Built from [`crate::InitArgs`] or directly by tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// UID the proxy runs as; its outbound traffic is never captured.
    pub proxy_uid: u32,
    /// GID the proxy runs as; also exempt when set.
    pub proxy_gid: Option<u32>,
    /// Port the proxy's inbound listener binds; inbound TCP is redirected here.
    pub inbound_port: u16,
    /// Port the proxy's outbound listener binds; the application's outbound TCP goes here.
    pub outbound_port: u16,
    /// The proxy's admin port; inbound connections to it are never captured.
    pub admin_port: u16,
    /// Inbound destination ports that reach the application directly.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports the application reaches directly.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks the application reaches directly.
    pub skip_outbound_cidrs: Vec<IpNet>,
}

impl Default for InitConfig {
    /// The fixed ports and UID of DESIGN.md, with no exclusions.
    fn default() -> Self {
        Self {
            proxy_uid: names::PROXY_UID,
            proxy_gid: Some(names::PROXY_UID),
            inbound_port: names::INBOUND_PORT,
            outbound_port: names::OUTBOUND_PORT,
            admin_port: names::ADMIN_PORT,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

/// A TCP port or an inclusive range of ports, written `8080` or `9000-9100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// A single port.
    pub fn single(port: u16) -> Result<Self, Error> {
        Self::new(port, port)
    }

    /// The ports `first..=last`. Port 0 and reversed ranges are refused.
    pub fn new(first: u16, last: u16) -> Result<Self, Error> {
        let value = format!("{first}-{last}");
        if first == 0 {
            return Err(Error::InvalidPort {
                value,
                reason: "port 0 is not a port",
            });
        }
        if first > last {
            return Err(Error::InvalidPort {
                value,
                reason: "the range runs backwards",
            });
        }
        Ok(Self { first, last })
    }

    /// A single port, not checked: for ports already validated (the fixed admin port).
    pub(crate) fn single_unchecked(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// How many entries this takes in an iptables `multiport` list (a range counts twice).
    pub(crate) fn multiport_weight(self) -> usize {
        if self.first == self.last { 1 } else { 2 }
    }

    /// The `multiport --dports` spelling: `8080` or `9000:9100`.
    pub(crate) fn to_multiport(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

impl fmt::Display for PortRange {
    /// The spelling users write in annotations and flags: `8080` or `9000-9100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        let port = |part: &str| {
            part.trim().parse::<u16>().map_err(|_| Error::InvalidPort {
                value: text.to_owned(),
                reason: "expected a port (1-65535) or a range like 9000-9100",
            })
        };
        match text.split_once('-') {
            Some((first, last)) => Self::new(port(first)?, port(last)?),
            None => Self::single(port(text)?),
        }
        .map_err(|error| match error {
            Error::InvalidPort { reason, .. } => Error::InvalidPort {
                value: text.to_owned(),
                reason,
            },
            other => other,
        })
    }
}

/// Parses a comma-separated list of ports and ranges (`"80, 9000-9100"`); empty items are
/// ignored so that an empty annotation means "none".
pub fn parse_port_list(text: &str) -> Result<Vec<PortRange>, Error> {
    text.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// Parses a comma-separated list of CIDRs (`"10.0.0.0/8, fd00::/8"`). A bare address means
/// that one host. Host bits are cleared, as iptables would.
pub fn parse_cidr_list(text: &str) -> Result<Vec<IpNet>, Error> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_cidr)
        .collect()
}

/// Parses one CIDR or address.
pub fn parse_cidr(text: &str) -> Result<IpNet, Error> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| Error::InvalidCidr {
            value: text.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges_parse_and_print_back() {
        let ports = parse_port_list(" 80, 9000-9100 ,,443").unwrap();
        let printed: Vec<String> = ports.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["80", "9000-9100", "443"]);
        assert_eq!(ports[1].to_multiport(), "9000:9100");
    }

    #[test]
    fn bad_ports_are_refused_with_the_value_named() {
        for bad in ["0", "65536", "http", "10-5", "-3", "5-"] {
            let error = parse_port_list(bad).unwrap_err();
            assert!(error.to_string().contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn cidrs_are_truncated_and_bare_addresses_are_hosts() {
        let nets = parse_cidr_list("10.1.2.3/8, 192.168.0.1, fd00::1/64").unwrap();
        let printed: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["10.0.0.0/8", "192.168.0.1/32", "fd00::/64"]);
    }

    #[test]
    fn bad_cidrs_are_refused_with_the_value_named() {
        let error = parse_cidr_list("10.0.0.0/33").unwrap_err();
        assert!(error.to_string().contains("10.0.0.0/33"));
    }
}
