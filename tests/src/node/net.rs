//! Pod networking, as a CNI plugin would do it, with `ip` (iproute2).
//!
//! The node is a network namespace of its own (`node_ns`), not the machine's: every pod gets a
//! namespace with `eth0`, one end of a veth pair whose other end lives in the node namespace.
//! Routing is point to point (as Calico does it): the pod has a /32 address and a default
//! route via 169.254.1.1, which every host-side veth carries; the node namespace has a /32
//! route per pod. All pod traffic therefore crosses the node namespace at layer 3, where the
//! Service rules ([`super::services`]) translate ClusterIPs, and where conntrack sees the
//! replies. The node namespace has no default route and no link to the machine: nothing is
//! routed off it. What pods must reach on the machine (the operator's signer) is carried by the
//! node-local forwarders ([`super::forward`]), which listen on the gateway address.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// The gateway address every pod routes through (link-local, on each host-side veth).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The file a named network namespace is kept in.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs a command, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::io(format!("run {program} {}", args.join(" ")), source))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Unexpected(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Runs `program` inside network namespace `ns` with `stdin`, failing with its stderr.
pub fn run_in_with_stdin(ns: &str, program: &str, args: &[&str], stdin: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| Error::io(format!("run {program} in {ns}"), source))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(|source| Error::io(format!("write to {program}"), source))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| Error::io(format!("wait for {program}"), source))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Unexpected(format!(
            "{program} {} in {ns} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Fails unless we are root: network namespaces, iptables and setuid need it. Tests that need
/// a node call this first, so they fail loudly rather than skip.
pub fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::Unexpected(
            "the node agent needs root (network namespaces, iptables, setuid); run as root".into(),
        ))
    }
}

/// The node's network namespace: created with forwarding on, removed on drop.
#[derive(Debug)]
pub struct NodeNetwork {
    name: String,
}

impl NodeNetwork {
    /// Creates namespace `name` (removing a stale one of that name first).
    pub fn create(name: &str) -> Result<Self> {
        require_root()?;
        let _ = ip(&["netns", "delete", name]);
        ip(&["netns", "add", name])?;
        let node = Self {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // The gateway lives on every host-side veth, and on lo as well, so that the node-local
        // forwarders ([`super::forward`]) can listen on it before the first pod exists.
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{GATEWAY}/32"),
            "dev",
            "lo",
        ])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        Ok(node)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, for `setns`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Creates pod namespace `pod_ns` with `eth0` at `address`, wired to this node through
    /// host-side veth `host_veth`.
    pub fn add_pod(&self, pod_ns: &str, host_veth: &str, address: Ipv4Addr) -> Result<()> {
        let _ = ip(&["netns", "delete", pod_ns]);
        ip(&["netns", "add", pod_ns])?;
        let node = self.name.as_str();
        let addr32 = format!("{address}/32");
        let gateway = GATEWAY.to_string();
        let gateway32 = format!("{GATEWAY}/32");
        let steps: [&[&str]; 10] = [
            &[
                "-n", node, "link", "add", host_veth, "type", "veth", "peer", "name", "eth0",
                "netns", pod_ns,
            ],
            &["-n", pod_ns, "link", "set", "lo", "up"],
            &["-n", pod_ns, "addr", "add", &addr32, "dev", "eth0"],
            &["-n", pod_ns, "link", "set", "eth0", "up"],
            &[
                "-n", pod_ns, "route", "add", &gateway32, "dev", "eth0", "scope", "link",
            ],
            &[
                "-n", pod_ns, "route", "add", "default", "via", &gateway, "dev", "eth0",
            ],
            &["-n", node, "addr", "add", &gateway32, "dev", host_veth],
            &["-n", node, "link", "set", host_veth, "up"],
            &["-n", node, "route", "add", &addr32, "dev", host_veth],
            &["-n", pod_ns, "link", "set", "eth0", "mtu", "1500"],
        ];
        for step in steps {
            if let Err(e) = ip(step) {
                let _ = ip(&["netns", "delete", pod_ns]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes a pod's namespace (its veth pair and the node's route go with it).
    pub fn remove_pod(&self, pod_ns: &str) -> Result<()> {
        ip(&["netns", "delete", pod_ns])
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// The response to an HTTP/1.0 GET.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// `GET path` on `addr`, connecting from inside network namespace `netns` (the node's, as the
/// kubelet probes pods; or a pod's). The socket is made on a thread of its own that joins the
/// namespace ([`connect_in`]), so no other thread's namespace changes.
pub async fn http_get_in(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let netns = netns.to_owned();
    let path = path.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(blocking_get(&netns, addr, &path, timeout));
    });
    rx.await
        .map_err(|_| Error::Unexpected("HTTP probe thread vanished".into()))?
}

fn blocking_get(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let io = |what: &str| {
        let what = format!("{what} http://{addr}{path}");
        move |source| Error::io(what, source)
    };
    let mut stream = connect_in(netns, addr, timeout)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("set timeout on"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("set timeout on"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tandem-node-agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(io("send to"))?;
    // Read until the body announced by Content-Length is complete, or EOF: a server that
    // keeps the connection open must not turn a good answer into a timeout.
    let mut raw = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        if response_complete(&raw) {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(io("read from")(e)),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Error::Unexpected(format!("bad HTTP response from {addr}: {head:?}")))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

/// A TCP listener bound to `addr` inside network namespace `netns`.
pub fn listen_in(netns: &Path, addr: SocketAddr) -> Result<TcpListener> {
    let netns: PathBuf = netns.to_owned();
    let thread = std::thread::spawn(move || -> Result<TcpListener> {
        join_netns(&netns)?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("listen on {addr} in {}", netns.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format!("make {addr} non-blocking"), e))?;
        Ok(listener)
    });
    thread
        .join()
        .map_err(|_| Error::Unexpected(format!("the thread listening on {addr} panicked")))?
}

/// A TCP connection to `addr` made from inside network namespace `netns` (a blocking socket,
/// connected within `timeout`).
pub fn connect_in(netns: &Path, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let netns: PathBuf = netns.to_owned();
    let thread = std::thread::spawn(move || -> Result<TcpStream> {
        join_netns(&netns)?;
        TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| Error::io(format!("connect to {addr} from {}", netns.display()), e))
    });
    thread
        .join()
        .map_err(|_| Error::Unexpected(format!("the thread connecting to {addr} panicked")))?
}

/// Moves the calling thread into network namespace `netns`.
fn join_netns(netns: &Path) -> Result<()> {
    let file = std::fs::File::open(netns)
        .map_err(|source| Error::io(format!("open {}", netns.display()), source))?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::Unexpected(format!("join {}: {e}", netns.display())))
}

/// Whether `raw` holds a whole response with a Content-Length body.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= end + 4 + len)
}

/// Hands out pod addresses from the node's /24, never the network, the first (gateway by
/// convention) or the broadcast address.
#[derive(Debug)]
pub struct AddressPool {
    base: u32,
    size: u32,
    used: std::collections::BTreeSet<u32>,
}

impl AddressPool {
    /// A pool over `cidr` (e.g. `10.244.0.0/24`).
    pub fn new(cidr: &str) -> Result<Self> {
        let (net, len) = cidr
            .split_once('/')
            .ok_or_else(|| Error::Unexpected(format!("pod CIDR {cidr:?} has no prefix length")))?;
        let net: Ipv4Addr = net
            .parse()
            .map_err(|_| Error::Unexpected(format!("pod CIDR {cidr:?} is not IPv4")))?;
        let len: u32 = len
            .parse()
            .ok()
            .filter(|len| (8..=30).contains(len))
            .ok_or_else(|| Error::Unexpected(format!("pod CIDR {cidr:?}: prefix out of range")))?;
        Ok(Self {
            base: u32::from(net),
            size: 1 << (32 - len),
            used: std::collections::BTreeSet::new(),
        })
    }

    /// The next free address, if any.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let offset = (2..self.size - 1).find(|o| !self.used.contains(o))?;
        self.used.insert(offset);
        Some(Ipv4Addr::from(self.base + offset))
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, address: Ipv4Addr) {
        self.used
            .remove(&u32::from(address).wrapping_sub(self.base));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_skips_network_gateway_and_broadcast_and_reuses_released_addresses() {
        let mut pool = AddressPool::new("10.244.3.0/30").unwrap();
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(pool.allocate(), None);
        pool.release(Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 244, 3, 2)));
    }

    #[test]
    fn a_malformed_cidr_is_an_error() {
        assert!(AddressPool::new("10.244.0.0").is_err());
        assert!(AddressPool::new("fd00::/64").is_err());
        assert!(AddressPool::new("10.0.0.0/2").is_err());
    }
}
