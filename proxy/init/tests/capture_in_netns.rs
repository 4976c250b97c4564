//! The real rules in real network namespaces, with real traffic.
//!
//! Each test builds a "pod" namespace and a "peer" namespace joined by a veth pair, applies
//! the rules inside the pod with the real `iptables-*-restore`, opens listeners where the proxy
//! and the application would, and connects as an application UID, as the proxy UID and from
//! the peer. Which listener accepts — and the original destination it recovers with
//! `SO_ORIGINAL_DST` — shows what the rules did.
//!
//! They need root, iproute2 and iptables, so they are `#[ignore]`d in plain `cargo test` and
//! run by `make test-init` (which installs iptables); there they fail loudly if anything is
//! missing, they never skip.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Uid, setfsuid};
use tandem_init::{
    InitArgs, InitConfig, IpFamily, IptablesMode, Outcome, apply, parse_cidr_list, parse_port_list,
};

/// An application UID: anything that is not the proxy's.
const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 2102;

// ---------------------------------------------------------------------------------------------
// Namespaces

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Self> {
        sh("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread), with the
    /// file-system UID `uid`, which is what iptables' owner match sees on the sockets it makes.
    fn run<T: Send>(&self, uid: u32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).with_context(|| format!("open {path}"))?;
                    setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                    // setfsuid changes only this thread's credentials (it is not broadcast to
                    // the process like setuid), and the thread ends with `f`.
                    setfsuid(Uid::from_raw(uid));
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
        })
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not run {program} (is it installed? are we root?)"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A pod and a peer, joined by a veth pair, with IPv4 and IPv6 addresses.
struct PodNet {
    pod: Netns,
    peer: Netns,
    pod_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    pod_ip6: Ipv6Addr,
    peer_ip6: Ipv6Addr,
}

impl PodNet {
    fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        let octet = u8::try_from(index).context("too many test namespaces")?;
        let tag = format!("{}-{index}", std::process::id());
        let pod = Netns::create(format!("tandem-init-pod-{tag}"))?;
        let peer = Netns::create(format!("tandem-init-peer-{tag}"))?;
        let net = Self {
            pod_ip: Ipv4Addr::new(10, 77, octet, 2),
            peer_ip: Ipv4Addr::new(10, 77, octet, 1),
            pod_ip6: format!("fd77:{octet}::2").parse()?,
            peer_ip6: format!("fd77:{octet}::1").parse()?,
            pod,
            peer,
        };
        net.pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &net.peer.name,
        ])?;
        for (ns, v4, v6) in [
            (&net.pod, net.pod_ip, net.pod_ip6),
            (&net.peer, net.peer_ip, net.peer_ip6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn apply(&self, config: &InitConfig, family: IpFamily, mode: IptablesMode) -> Result<()> {
        self.pod.run(0, || Ok(apply(config, family, mode)?))?;
        Ok(())
    }

    fn listen(ns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
        ns.run(0, || {
            let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    }

    fn connect(ns: &Netns, uid: u32, to: SocketAddr) -> Result<TcpStream> {
        ns.run(uid, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connect to {to} as uid {uid}"))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners

/// Named listeners; `landed` says which one a connection reached.
struct Listeners(Vec<(&'static str, TcpListener)>);

impl Listeners {
    fn open(net: &PodNet, any: IpAddr) -> Result<Self> {
        let at = |port| SocketAddr::new(any, port);
        Ok(Self(vec![
            ("pod outbound 15001", PodNet::listen(&net.pod, at(15001))?),
            ("pod inbound 15006", PodNet::listen(&net.pod, at(15006))?),
            ("pod admin 15020", PodNet::listen(&net.pod, at(15020))?),
            ("pod app 8080", PodNet::listen(&net.pod, at(8080))?),
            ("pod app 8081", PodNet::listen(&net.pod, at(8081))?),
            ("peer 9000", PodNet::listen(&net.peer, at(9000))?),
            ("peer 5432", PodNet::listen(&net.peer, at(5432))?),
        ]))
    }

    /// Connects as `uid` from `from` to `to`, and returns the listener that accepted the
    /// connection and the accepted stream. A byte is sent and echoed so the connection is
    /// known to be through end to end.
    fn landed(&self, from: &Netns, uid: u32, to: SocketAddr) -> Result<(&'static str, TcpStream)> {
        let mut client = PodNet::connect(from, uid, to)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            for (name, listener) in &self.0 {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false)?;
                        client.write_all(b"x")?;
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte)?;
                        return Ok((name, stream));
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => bail!("accept on {name}: {error}"),
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no listener accepted the connection to {to}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn original_dst_v4(stream: &TcpStream) -> Result<SocketAddr> {
    let raw = getsockopt(stream, sockopt::OriginalDst).context("SO_ORIGINAL_DST")?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddr::new(ip.into(), u16::from_be(raw.sin_port)))
}

fn original_dst_v6(stream: &TcpStream) -> Result<SocketAddr> {
    let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).context("IP6T_SO_ORIGINAL_DST")?;
    let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
    Ok(SocketAddr::new(ip.into(), u16::from_be(raw.sin6_port)))
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The nat table as saved, without the timestamps and counters that change between saves.
fn saved_rules(net: &PodNet, save: &str) -> Result<String> {
    let text = net.pod.exec(save, &["-t", "nat"])?;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split(" [").next().unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n"))
}

// ---------------------------------------------------------------------------------------------
// Outbound

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn application_outbound_lands_on_15001_with_its_original_destination() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    net.apply(&InitConfig::default(), IpFamily::V4, IptablesMode::Auto)?;

    let target = v4(net.peer_ip, 9000);
    let (landed, stream) = listeners.landed(&net.pod, APP_UID, target)?;
    assert_eq!(landed, "pod outbound 15001");
    assert_eq!(original_dst_v4(&stream)?, target);
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn proxy_uid_outbound_goes_straight_to_its_destination() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    net.apply(&InitConfig::default(), IpFamily::V4, IptablesMode::Auto)?;

    let (landed, _) = listeners.landed(&net.pod, PROXY_UID, v4(net.peer_ip, 9000))?;
    assert_eq!(landed, "peer 9000");
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn skipped_outbound_ports_and_cidrs_go_straight_to_their_destination() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    let config = InitConfig {
        skip_outbound_ports: parse_port_list("5432")?,
        ..InitConfig::default()
    };
    net.apply(&config, IpFamily::V4, IptablesMode::Auto)?;
    let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(net.peer_ip, 5432))?;
    assert_eq!(landed, "peer 5432", "skipped port");
    let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(net.peer_ip, 9000))?;
    assert_eq!(
        landed, "pod outbound 15001",
        "other ports are still captured"
    );

    let config = InitConfig {
        skip_outbound_cidrs: parse_cidr_list(&format!("{}/32", net.peer_ip))?,
        ..InitConfig::default()
    };
    net.apply(&config, IpFamily::V4, IptablesMode::Auto)?;
    let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(net.peer_ip, 9000))?;
    assert_eq!(landed, "peer 9000", "skipped CIDR");
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn loopback_traffic_is_never_captured() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    net.apply(&InitConfig::default(), IpFamily::V4, IptablesMode::Auto)?;

    let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(Ipv4Addr::LOCALHOST, 8080))?;
    assert_eq!(landed, "pod app 8080", "127.0.0.1");
    let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(net.pod_ip, 8080))?;
    assert_eq!(landed, "pod app 8080", "the pod's own IP, routed over lo");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inbound

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn inbound_lands_on_15006_with_its_original_destination() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    net.apply(&InitConfig::default(), IpFamily::V4, IptablesMode::Auto)?;

    let target = v4(net.pod_ip, 8080);
    let (landed, stream) = listeners.landed(&net.peer, 0, target)?;
    assert_eq!(landed, "pod inbound 15006");
    assert_eq!(original_dst_v4(&stream)?, target);
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn the_admin_port_and_skipped_inbound_ports_are_not_captured() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
    let config = InitConfig {
        skip_inbound_ports: parse_port_list("8081")?,
        ..InitConfig::default()
    };
    net.apply(&config, IpFamily::V4, IptablesMode::Auto)?;

    let (landed, _) = listeners.landed(&net.peer, 0, v4(net.pod_ip, 15020))?;
    assert_eq!(landed, "pod admin 15020");
    let (landed, _) = listeners.landed(&net.peer, 0, v4(net.pod_ip, 8081))?;
    assert_eq!(landed, "pod app 8081");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Applying

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn applying_twice_leaves_the_same_rules_with_either_backend() -> Result<()> {
    for (mode, save) in [
        (IptablesMode::Nft, "iptables-nft-save"),
        (IptablesMode::Legacy, "iptables-legacy-save"),
    ] {
        let net = PodNet::new()?;
        let listeners = Listeners::open(&net, Ipv4Addr::UNSPECIFIED.into())?;
        net.apply(&InitConfig::default(), IpFamily::V4, mode)?;
        let once = saved_rules(&net, save)?;
        net.apply(&InitConfig::default(), IpFamily::V4, mode)?;
        let twice = saved_rules(&net, save)?;
        assert_eq!(once, twice, "{mode:?}");
        assert_eq!(twice.matches("-j TANDEM_OUTPUT").count(), 1, "{twice}");
        assert!(twice.contains("--to-ports 15001"), "{twice}");

        let (landed, _) = listeners.landed(&net.pod, APP_UID, v4(net.peer_ip, 9000))?;
        assert_eq!(landed, "pod outbound 15001", "{mode:?}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn dry_run_prints_the_rules_and_changes_nothing() -> Result<()> {
    let net = PodNet::new()?;
    let args = init_args(&["--dry-run", "--ipv6=never"])?;
    let mut printed = Vec::new();
    let outcome = net
        .pod
        .run(0, || Ok(tandem_init::run_to(&args, &mut printed)?))?;
    assert_eq!(outcome, Outcome::Printed);
    let printed = String::from_utf8(printed)?;
    assert!(
        printed.contains("-j REDIRECT --to-ports 15001"),
        "{printed}"
    );
    let saved = saved_rules(&net, "iptables-nft-save")?;
    assert!(!saved.contains("TANDEM"), "{saved}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPv6

#[test]
#[ignore = "needs root, iproute2 and iptables: run by `make test-init`"]
fn a_pod_with_an_ipv6_address_gets_ip6tables_rules_too() -> Result<()> {
    let net = PodNet::new()?;
    let listeners = Listeners::open(&net, Ipv6Addr::UNSPECIFIED.into())?;
    let args = init_args(&[])?;
    let outcome = net.pod.run(0, || Ok(tandem_init::run(&args)?))?;
    let Outcome::Applied(applied) = outcome else {
        bail!("expected rules to be applied")
    };
    let families: Vec<IpFamily> = applied.iter().map(|(family, _)| *family).collect();
    assert_eq!(families, [IpFamily::V4, IpFamily::V6]);

    let target = v6(net.peer_ip6, 9000);
    let (landed, stream) = listeners.landed(&net.pod, APP_UID, target)?;
    assert_eq!(landed, "pod outbound 15001");
    assert_eq!(original_dst_v6(&stream)?, target);
    let (landed, _) = listeners.landed(&net.pod, PROXY_UID, target)?;
    assert_eq!(landed, "peer 9000");
    let target = v6(net.pod_ip6, 8080);
    let (landed, stream) = listeners.landed(&net.peer, 0, target)?;
    assert_eq!(landed, "pod inbound 15006");
    assert_eq!(original_dst_v6(&stream)?, target);
    Ok(())
}

fn init_args(flags: &[&str]) -> Result<InitArgs> {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }
    Ok(Cli::try_parse_from(std::iter::once("init").chain(flags.iter().copied()))?.init)
}
