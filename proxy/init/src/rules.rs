//! The nat-table rules, as an `iptables-restore` document. Pure: no I/O here.
//!
//! The shape follows linkerd2-proxy-init (research/mission-anchors.md §1.3): two chains of our
//! own, jumped to from `PREROUTING` and `OUTPUT`, every rule tagged with a `tandem/<purpose>`
//! comment so `iptables-save` explains itself. Differences from Linkerd: the proxy's GID is
//! exempt as well as its UID, and outbound destinations can be skipped by CIDR.

use std::fmt::{self, Write as _};

use ipnet::IpNet;

use crate::config::{InitConfig, PortRange};

/// Chain that `PREROUTING` jumps to: inbound TCP goes to the proxy's inbound port.
pub const INBOUND_CHAIN: &str = "TANDEM_INBOUND";
/// Chain that `OUTPUT` jumps to: the application's outbound TCP goes to the outbound port.
pub const OUTPUT_CHAIN: &str = "TANDEM_OUTPUT";

/// `multiport` accepts at most 15 ports per rule (a range counts as two).
const MULTIPORT_LIMIT: usize = 15;

/// Which address family a rule set is for: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    /// IPv4, applied with `iptables-restore`.
    V4,
    /// IPv6, applied with `ip6tables-restore`.
    V6,
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The `iptables-restore --noflush` document that programs the pod's nat table for `family`.
///
/// Declaring our chains flushes them, so the document replaces any earlier version of our
/// rules; the jumps into them are appended here, and [`replacing_jumps`] removes the ones an
/// earlier run left, so that applying twice leaves exactly one of each.
pub fn rules(config: &InitConfig, family: IpFamily) -> String {
    let mut doc = Doc::default();
    doc.line("*nat");
    doc.line(format_args!(":{INBOUND_CHAIN} - [0:0]"));
    doc.line(format_args!(":{OUTPUT_CHAIN} - [0:0]"));

    // Inbound: everything but the admin port and the skipped ports goes to the proxy.
    let mut inbound_skips = vec![PortRange::single_unchecked(config.admin_port)];
    inbound_skips.extend(config.skip_inbound_ports.iter().copied());
    for ports in multiport_lists(&inbound_skips) {
        doc.rule(
            INBOUND_CHAIN,
            format_args!("-p tcp -m multiport --dports {ports}"),
            "skip-inbound-ports",
            "RETURN",
        );
    }
    doc.rule(
        INBOUND_CHAIN,
        "-p tcp",
        "redirect-inbound",
        format_args!("REDIRECT --to-ports {}", config.inbound_port),
    );

    // Outbound: the proxy's own traffic and loopback first, then the user's exclusions.
    doc.rule(
        OUTPUT_CHAIN,
        format_args!("-m owner --uid-owner {}", config.proxy_uid),
        "ignore-proxy-uid",
        "RETURN",
    );
    if let Some(gid) = config.proxy_gid {
        doc.rule(
            OUTPUT_CHAIN,
            format_args!("-m owner --gid-owner {gid}"),
            "ignore-proxy-gid",
            "RETURN",
        );
    }
    // Loopback is the application talking to itself (or the proxy handing inbound traffic
    // to it); as in Linkerd, it is never captured.
    doc.rule(OUTPUT_CHAIN, "-o lo", "ignore-loopback", "RETURN");
    for ports in multiport_lists(&config.skip_outbound_ports) {
        doc.rule(
            OUTPUT_CHAIN,
            format_args!("-p tcp -m multiport --dports {ports}"),
            "skip-outbound-ports",
            "RETURN",
        );
    }
    for net in config
        .skip_outbound_cidrs
        .iter()
        .filter(|net| family_of(net) == family)
    {
        doc.rule(
            OUTPUT_CHAIN,
            format_args!("-d {net}"),
            "skip-outbound-cidrs",
            "RETURN",
        );
    }
    doc.rule(
        OUTPUT_CHAIN,
        "-p tcp",
        "redirect-outbound",
        format_args!("REDIRECT --to-ports {}", config.outbound_port),
    );

    doc.rule("PREROUTING", "-p tcp", "inbound", INBOUND_CHAIN);
    doc.rule("OUTPUT", "-p tcp", "outbound", OUTPUT_CHAIN);
    doc.line("COMMIT");
    doc.0
}

/// Rewrites `document` so that it first deletes every jump into our chains that `saved_nat`
/// (the output of `iptables-save -t nat`) shows. Pure, so idempotence is unit-tested.
pub fn replacing_jumps(document: &str, saved_nat: &str) -> String {
    let deletions: Vec<String> = saved_nat
        .lines()
        .filter(|line| is_jump_into_our_chains(line))
        .map(|line| format!("-D{}", &line[2..]))
        .collect();
    if deletions.is_empty() {
        return document.to_owned();
    }
    let mut out = String::with_capacity(document.len() + deletions.len() * 64);
    let mut inserted = false;
    for line in document.lines() {
        // Deletions go after the chain declarations, before our first rule.
        if !inserted && line.starts_with("-A ") {
            for deletion in &deletions {
                out.push_str(deletion);
                out.push('\n');
            }
            inserted = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether a saved rule is one of our jumps from a built-in chain.
fn is_jump_into_our_chains(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let is_builtin_append =
        words.next() == Some("-A") && matches!(words.next(), Some("PREROUTING" | "OUTPUT"));
    if !is_builtin_append {
        return false;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|pair| pair[0] == "-j" && matches!(pair[1], INBOUND_CHAIN | OUTPUT_CHAIN))
}

fn family_of(net: &IpNet) -> IpFamily {
    match net {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

/// Splits ports into comma lists that each fit one `multiport` match.
fn multiport_lists(ports: &[PortRange]) -> Vec<String> {
    let mut lists: Vec<String> = Vec::new();
    let mut weight = 0;
    for port in ports {
        if lists.is_empty() || weight + port.multiport_weight() > MULTIPORT_LIMIT {
            lists.push(String::new());
            weight = 0;
        }
        if let Some(list) = lists.last_mut() {
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(&port.to_multiport());
        }
        weight += port.multiport_weight();
    }
    lists
}

/// An `iptables-restore` document being written.
#[derive(Default)]
struct Doc(String);

impl Doc {
    fn line(&mut self, text: impl fmt::Display) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "{text}");
    }

    /// `-A <chain> <matches> -m comment --comment "tandem/<purpose>" -j <target>`
    fn rule(
        &mut self,
        chain: &str,
        matches: impl fmt::Display,
        purpose: &str,
        target: impl fmt::Display,
    ) {
        self.line(format_args!(
            "-A {chain} {matches} -m comment --comment \"tandem/{purpose}\" -j {target}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidr_list, parse_port_list};

    fn config() -> InitConfig {
        InitConfig {
            skip_inbound_ports: parse_port_list("4567,9000-9100").unwrap(),
            skip_outbound_ports: parse_port_list("5432").unwrap(),
            skip_outbound_cidrs: parse_cidr_list("10.96.0.0/12,fd00::/8").unwrap(),
            ..InitConfig::default()
        }
    }

    #[test]
    fn default_rules_capture_everything_but_the_proxy_loopback_and_admin_port() {
        let expected = r#"*nat
:TANDEM_INBOUND - [0:0]
:TANDEM_OUTPUT - [0:0]
-A TANDEM_INBOUND -p tcp -m multiport --dports 15020 -m comment --comment "tandem/skip-inbound-ports" -j RETURN
-A TANDEM_INBOUND -p tcp -m comment --comment "tandem/redirect-inbound" -j REDIRECT --to-ports 15006
-A TANDEM_OUTPUT -m owner --uid-owner 2102 -m comment --comment "tandem/ignore-proxy-uid" -j RETURN
-A TANDEM_OUTPUT -m owner --gid-owner 2102 -m comment --comment "tandem/ignore-proxy-gid" -j RETURN
-A TANDEM_OUTPUT -o lo -m comment --comment "tandem/ignore-loopback" -j RETURN
-A TANDEM_OUTPUT -p tcp -m comment --comment "tandem/redirect-outbound" -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -m comment --comment "tandem/inbound" -j TANDEM_INBOUND
-A OUTPUT -p tcp -m comment --comment "tandem/outbound" -j TANDEM_OUTPUT
COMMIT
"#;
        assert_eq!(rules(&InitConfig::default(), IpFamily::V4), expected);
    }

    #[test]
    fn exclusions_become_returns_before_the_redirects() {
        let doc = rules(&config(), IpFamily::V4);
        let inbound_skip = "-A TANDEM_INBOUND -p tcp -m multiport --dports 15020,4567,9000:9100";
        let outbound_port = "-A TANDEM_OUTPUT -p tcp -m multiport --dports 5432 ";
        let outbound_cidr = "-A TANDEM_OUTPUT -d 10.96.0.0/12 ";
        for expected in [inbound_skip, outbound_port, outbound_cidr] {
            let at = doc
                .find(expected)
                .unwrap_or_else(|| panic!("{expected} missing:\n{doc}"));
            assert!(at < doc.find("REDIRECT --to-ports 15001").unwrap());
        }
    }

    #[test]
    fn each_family_gets_only_its_own_cidrs() {
        let v4 = rules(&config(), IpFamily::V4);
        let v6 = rules(&config(), IpFamily::V6);
        assert!(v4.contains("-d 10.96.0.0/12") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8") && !v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn long_port_lists_are_split_at_fifteen_multiport_entries() {
        let ports: Vec<String> = (1000..1020).map(|port| port.to_string()).collect();
        let config = InitConfig {
            skip_outbound_ports: parse_port_list(&ports.join(",")).unwrap(),
            ..InitConfig::default()
        };
        let doc = rules(&config, IpFamily::V4);
        let lists: Vec<&str> = doc
            .lines()
            .filter(|line| line.contains("skip-outbound-ports"))
            .filter_map(|line| line.split_whitespace().nth(7))
            .collect();
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        assert_eq!(lists[1].split(',').count(), 5);
    }

    #[test]
    fn ranges_count_twice_towards_the_multiport_limit() {
        let ranges: Vec<String> = (0..8)
            .map(|i| format!("{}-{}", 2000 + i * 10, 2005 + i * 10))
            .collect();
        let lists = multiport_lists(&parse_port_list(&ranges.join(",")).unwrap());
        assert_eq!(lists.len(), 2, "{lists:?}");
        assert_eq!(lists[0].split(',').count(), 7);
    }

    #[test]
    fn no_gid_means_no_gid_rule() {
        let config = InitConfig {
            proxy_gid: None,
            ..InitConfig::default()
        };
        assert!(!rules(&config, IpFamily::V4).contains("gid-owner"));
    }

    #[test]
    fn replacing_jumps_deletes_the_jumps_a_previous_run_left() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:TANDEM_OUTPUT - [0:0]\n\
            -A PREROUTING -p tcp -m comment --comment \"tandem/inbound\" -j TANDEM_INBOUND\n\
            -A OUTPUT -j KUBE-SERVICES\n\
            -A OUTPUT -p tcp -m comment --comment \"tandem/outbound\" -j TANDEM_OUTPUT\n\
            -A TANDEM_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let doc = replacing_jumps(&rules(&InitConfig::default(), IpFamily::V4), saved);
        let lines: Vec<&str> = doc.lines().collect();
        assert_eq!(
            lines[3],
            "-D PREROUTING -p tcp -m comment --comment \"tandem/inbound\" -j TANDEM_INBOUND"
        );
        assert_eq!(
            lines[4],
            "-D OUTPUT -p tcp -m comment --comment \"tandem/outbound\" -j TANDEM_OUTPUT"
        );
        assert!(!doc.contains("KUBE-SERVICES"));
        assert_eq!(doc.matches("-A OUTPUT ").count(), 1);
    }

    #[test]
    fn replacing_jumps_leaves_a_first_run_unchanged() {
        let doc = rules(&InitConfig::default(), IpFamily::V4);
        assert_eq!(
            replacing_jumps(&doc, "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            doc
        );
    }
}
