//! Two "pods" for the capture run: network namespaces joined by a veth pair, each with a
//! default route over the link so a service's cluster IP is routable, exactly as a client pod
//! and a server pod see the cluster network.
//!
//! Namespace names carry this process's id (`tbench-<pid>-<n>-client`), so runs never collide
//! and a later run can tell a leftover of a killed run from a live one ([`remove_stale`]).
//! Dropping a [`Netns`] kills whatever still runs in it and deletes it, which covers errors
//! and panics; the capture command also drops them on Ctrl-C and SIGTERM.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::topology::find_program;

/// The client pod's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 1);
/// The server pod's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 2);
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The prefix of every namespace this benchmark makes.
const PREFIX: &str = "tbench-";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Errors making, entering or removing namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("{command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The namespace could not be entered.
    #[error("enter {path}: {message}")]
    Enter {
        /// The namespace's file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Runs `program args` and returns its stdout, or an error with its stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Why the capture run cannot run here (not root, a tool missing), or `None` when it can.
pub fn missing_prerequisites() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("it needs root (network namespaces and iptables rules)".into());
    }
    let missing: Vec<&str> = ["ip", "iptables", "nsenter"]
        .into_iter()
        .filter(|tool| find_program(tool).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("{} not installed", missing.join(", ")))
}

/// The id of the process that made the namespace `name`, if this benchmark made it.
pub fn owner_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes namespaces left behind by benchmark runs that were killed outright (SIGKILL
/// leaves no chance to clean up); the namespaces of live runs are left alone. Returns the
/// names deleted.
pub fn remove_stale() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_of(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete(&name);
        removed.push(name);
    }
    removed
}

/// Kills every process still in the namespace `name` (never this one), then deletes it.
fn delete(name: &str) {
    if let Ok(pids) = run_command("ip", &["netns", "pids", name]) {
        let me = std::process::id();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid as u32 != me {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    if let Err(e) = run_command("ip", &["netns", "del", name]) {
        eprintln!("could not delete network namespace {name}: {e}");
    }
}

/// A network namespace, deleted (with everything still running in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a namespace named after this process and `tag`, with loopback up.
    pub fn create(tag: &str) -> Result<Self, NetnsError> {
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run_command("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that stands for it (for setns and `nsenter --net=`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> args…`
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut argv = vec!["-n", self.name.as_str()];
        argv.extend_from_slice(args);
        run_command("ip", &argv)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// The two pods of the capture run.
#[derive(Debug)]
pub struct Pods {
    /// The client pod (the load generator, the client sidecar).
    pub client: Netns,
    /// The server pod (the upstream, the server sidecar).
    pub server: Netns,
}

impl Pods {
    /// Makes both namespaces and joins them with a veth pair: `eth0` in each, the client at
    /// [`CLIENT_IP`], the server at [`SERVER_IP`], default routes over the link.
    pub fn create() -> Result<Self, NetnsError> {
        let pods = Self {
            client: Netns::create("client")?,
            server: Netns::create("server")?,
        };
        let server = pods.server.name().to_owned();
        pods.client.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0s", "netns", &server,
        ])?;
        pods.server.ip(&["link", "set", "eth0s", "name", "eth0"])?;
        for (ns, ip) in [(&pods.client, CLIENT_IP), (&pods.server, SERVER_IP)] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "dev", "eth0"])?;
        }
        Ok(pods)
    }

    /// The namespaces' files, for the threads and processes that enter them.
    pub fn paths(&self) -> PodPaths {
        PodPaths {
            client: self.client.path(),
            server: self.server.path(),
        }
    }
}

/// Where the pods' namespaces are, without owning them.
#[derive(Debug, Clone)]
pub struct PodPaths {
    /// The client pod's namespace file.
    pub client: PathBuf,
    /// The server pod's namespace file.
    pub server: PathBuf,
}

/// Runs `f` on a new thread that entered the network namespace at `path`: sockets it (and
/// every thread it starts) makes live there. setns is per thread, so the caller stays put.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let owned = path.to_path_buf();
    let enter_error = |message: String| NetnsError::Enter {
        path: path.to_path_buf(),
        message,
    };
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let file = File::open(&owned).map_err(|e| e.to_string())?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            Ok(f())
        })
        .map_err(|e| enter_error(format!("start a thread: {e}")))?
        .join()
        .map_err(|_| enter_error("the thread panicked".into()))?
        .map_err(enter_error)
}

/// `nsenter --net=<path> [--setuid uid --setgid uid] -- program`: the program runs inside
/// the namespace (as `uid` when given). nsenter execs it, so the child's pid is the program's.
pub fn nsenter(path: &Path, uid: Option<u32>, program: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", path.display()));
    if let Some(uid) = uid {
        command
            .arg("--setuid")
            .arg(uid.to_string())
            .arg("--setgid")
            .arg(uid.to_string());
    }
    command.arg("--").arg(program);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_name_tells_which_process_made_it() {
        assert_eq!(owner_of("tbench-4242-0-client"), Some(4242));
        assert_eq!(owner_of("tbench-x-0-client"), None);
        // The proxy's own tests use another prefix: never touched here.
        assert_eq!(owner_of("tdm-4242-0-c"), None);
    }

    #[test]
    fn nsenter_enters_the_namespace_as_the_uid_before_the_program() {
        let command = nsenter(Path::new("/run/netns/x"), Some(2102), Path::new("/bin/p"));
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--net=/run/netns/x",
                "--setuid",
                "2102",
                "--setgid",
                "2102",
                "--",
                "/bin/p"
            ]
        );
    }
}
