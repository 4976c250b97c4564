//! Applying the rules: `iptables-restore` in one transaction, nft backend first, legacy after.

use std::fmt;
use std::io::Write as _;
use std::process::{Command, Stdio};

use tracing::{info, warn};

use crate::config::InitConfig;
use crate::rules::{IpFamily, replacing_jumps, rules};
use crate::{Error, Result};

/// Which iptables implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesMode {
    /// Try nftables (`iptables-nft`) first, then fall back to `iptables-legacy`.
    Auto,
    /// Only `iptables-nft`.
    Nft,
    /// Only `iptables-legacy`.
    Legacy,
}

impl IptablesMode {
    fn candidates(self) -> &'static [Backend] {
        match self {
            Self::Auto => &[Backend::Nft, Backend::Legacy],
            Self::Nft => &[Backend::Nft],
            Self::Legacy => &[Backend::Legacy],
        }
    }
}

/// The iptables implementation that applied a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: the iptables syntax over the nf_tables kernel API.
    Nft,
    /// `iptables-legacy`: the x_tables kernel API.
    Legacy,
}

impl Backend {
    /// The `*-save` program for `family`, e.g. `ip6tables-nft-save`.
    pub fn save_program(self, family: IpFamily) -> String {
        format!("{}-{}-save", tool(family), self)
    }

    /// The `*-restore` program for `family`, e.g. `iptables-legacy-restore`.
    pub fn restore_program(self, family: IpFamily) -> String {
        format!("{}-{}-restore", tool(family), self)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        })
    }
}

fn tool(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// Programs the nat table of the current network namespace for `family`, trying the
/// backends `mode` allows in order. Running it again replaces the rules rather than adding
/// to them. Returns the backend that succeeded.
pub fn apply(config: &InitConfig, family: IpFamily, mode: IptablesMode) -> Result<Backend> {
    let mut attempts = Vec::new();
    for &backend in mode.candidates() {
        match apply_with(config, family, backend) {
            Ok(()) => {
                info!(%family, %backend, "Applied iptables rules");
                return Ok(backend);
            }
            Err(error) => {
                warn!(%family, %backend, %error, "iptables backend failed");
                attempts.push(format!("{backend}: {error}"));
            }
        }
    }
    Err(Error::NoBackend {
        family,
        attempts: attempts.join("; "),
    })
}

/// One transaction with one backend: read the nat table, then restore our chains and jumps.
fn apply_with(config: &InitConfig, family: IpFamily, backend: Backend) -> Result<()> {
    let saved = execute(&backend.save_program(family), &["-t", "nat"], None)?;
    let document = replacing_jumps(&rules(config, family), &saved);
    execute(
        &backend.restore_program(family),
        &["--noflush"],
        Some(&document),
    )?;
    Ok(())
}

/// Runs `program args`, feeding `stdin`, and returns its stdout; a non-zero exit is an error
/// carrying stderr.
fn execute(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let spawn_error = |source| Error::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
        // Dropping the pipe closes it, so the program sees the end of its input.
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(Error::Failed {
            program: program.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether `/proc/net/if_inet6` (its text) lists a global-scope address on an interface other
/// than loopback: the sign that the pod has an IPv6 address and needs ip6tables rules too.
pub fn has_global_ipv6(if_inet6: &str) -> bool {
    // Each line: address, ifindex, prefix length, scope, flags, interface name.
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, _, _, "00", _, name] if *name != "lo")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_global_address_outside_loopback_means_ipv6() {
        let dual_stack = "00000000000000000000000000000001 01 80 10 80       lo\n\
            fe80000000000000a8c1abfffe000001 02 40 20 80     eth0\n\
            fd000000000000000000000000000002 02 40 00 80     eth0\n";
        assert!(has_global_ipv6(dual_stack));
    }

    #[test]
    fn link_local_and_loopback_addresses_do_not_mean_ipv6() {
        let v4_only = "00000000000000000000000000000001 01 80 10 80       lo\n\
            fe80000000000000a8c1abfffe000001 02 40 20 80     eth0\n";
        assert!(!has_global_ipv6(v4_only));
        assert!(!has_global_ipv6(""));
    }

    #[test]
    fn backends_name_their_programs() {
        assert_eq!(
            Backend::Nft.restore_program(IpFamily::V4),
            "iptables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.save_program(IpFamily::V6),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it() {
        let error = execute("tandem-no-such-program", &[], None).unwrap_err();
        assert!(
            error.to_string().contains("tandem-no-such-program"),
            "{error}"
        );
    }

    #[test]
    fn a_failing_program_reports_its_stderr() {
        let error = execute("sh", &["-c", "echo broken >&2; exit 3"], None).unwrap_err();
        assert!(error.to_string().contains("broken"), "{error}");
    }
}
