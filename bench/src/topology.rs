//! The topologies under test: how each is started on loopback, where a client connects and
//! which processes' CPU and memory count as "the proxy". The capture run's topologies (in
//! network namespaces) are started by [`crate::capture`].

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::admin::Probe;
use crate::loadgen::{Protocol, Target};
use crate::mtls::{Handshakes, MtlsCheck};
use crate::signer::{self, BenchIdentity, PROXY_IDENTITY_ENV, SignerError, TestCa};
use crate::tandem;

/// Errors starting a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The topology needs a program that is not there.
    #[error("not available: {0}")]
    Unavailable(String),
    /// The tandem-proxy config could not be written.
    #[error("tandem config: {0}")]
    Config(#[from] tandem::ConfigError),
    /// The test CA or the bench signer failed.
    #[error("identity: {0}")]
    Identity(#[from] SignerError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError::Io { what, source }
}

/// One way of putting something between the client and the upstream.
///
/// The loopback run's topologies are also the values of `tandem-bench run --only` and
/// `--skip` (clap's names below), so the name a user types and the one an error suggests are
/// one and the same; the capture run's are not selectable there.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum Topology {
    /// The client talks to the upstream itself: the baseline.
    Direct,
    /// The minimal Pingora proxy (`tandem-bench pingora`): the floor.
    #[value(name = "pingora")]
    BarePingora,
    /// Debian's HAProxy, one thread.
    Haproxy,
    /// Debian's nginx, one worker process, `proxy_pass` with upstream keep-alive.
    Nginx,
    /// Two nginx in a row, the anchor for the mesh path: a client-side nginx proxying to a
    /// server-side nginx (upstream keep-alive on both), plaintext.
    #[value(name = "nginx2")]
    NginxTwoHops,
    /// The same nginx pair over mutual TLS (TLS 1.3): the client side presents its
    /// certificate (`proxy_ssl_certificate`) and verifies the server's name; the server side
    /// requires a client certificate under the roots (`ssl_verify_client on`).
    #[value(name = "nginx2-mtls")]
    NginxTwoHopsMtls,
    /// One tandem-proxy: the client-side sidecar's outbound listener.
    #[value(name = "tandem1")]
    TandemOneHop,
    /// Two tandem-proxies, the mesh path: client sidecar outbound → server sidecar inbound.
    #[value(name = "tandem2")]
    TandemTwoHops,
    /// The two tandem-proxies with mutual TLS between them (issue 13): both get certificates
    /// from the bench signer; the client sidecar's config names the server endpoint's identity,
    /// the server sidecar is `strict`.
    #[value(name = "tandem2-mtls")]
    TandemTwoHopsMtls,
    /// `tandem2-mtls` with authorization on the server sidecar (issue 14): default `deny` and
    /// one Allow policy of 1 rule, the client's.
    #[value(name = "tandem2-authz1")]
    TandemAuthz1,
    /// The same with 10 rules, only the last naming the client (every request scans all).
    #[value(name = "tandem2-authz10")]
    TandemAuthz10,
    /// The same with 100 rules.
    #[value(name = "tandem2-authz100")]
    TandemAuthz100,
    /// `tandem2` with tracing on both sidecars (wave 2, 4/8): 1 % of the requests (which
    /// arrive without a trace context) start a trace, exported over OTLP/HTTP to the bench's
    /// load sink.
    #[value(name = "tandem2-trace1")]
    TandemTrace1,
    /// The same with every request traced (100 %).
    #[value(name = "tandem2-trace100")]
    TandemTrace100,
    /// The capture run's baseline: the client pod talks to the server pod's IP over the veth.
    #[value(skip)]
    DirectNetns,
    /// The capture run's real mesh path: the app sends to the service's cluster IP, the
    /// `tandem-proxy init` rules redirect it to the client sidecar, which sends to the server
    /// pod, whose rules redirect it to the server sidecar.
    #[value(skip)]
    TandemCaptured,
    /// The same two sidecars in the same pods, addressed explicitly: no iptables.
    #[value(skip)]
    TandemNetns,
}

impl Topology {
    /// Every topology, in report order.
    pub const ALL: [Topology; 14] = [
        Topology::Direct,
        Topology::BarePingora,
        Topology::Haproxy,
        Topology::Nginx,
        Topology::NginxTwoHops,
        Topology::NginxTwoHopsMtls,
        Topology::TandemOneHop,
        Topology::TandemTwoHops,
        Topology::TandemTwoHopsMtls,
        Topology::TandemAuthz1,
        Topology::TandemAuthz10,
        Topology::TandemAuthz100,
        Topology::TandemTrace1,
        Topology::TandemTrace100,
    ];

    /// The tracing topologies and their sampling percentage; each is compared with `tandem2`,
    /// the same path with tracing off.
    pub const TRACING: [(Topology, f64); 2] = [
        (Topology::TandemTrace1, 1.0),
        (Topology::TandemTrace100, 100.0),
    ];

    /// The sampling percentage of a tracing topology (`None`: tracing off).
    pub fn sampling_percent(self) -> Option<f64> {
        Self::TRACING
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, percent)| *percent)
    }

    /// The authorization topologies and how many rules each has; each is compared with
    /// `tandem2-mtls`, the same path with authorization off.
    pub const AUTHZ: [(Topology, usize); 3] = [
        (Topology::TandemAuthz1, 1),
        (Topology::TandemAuthz10, 10),
        (Topology::TandemAuthz100, 100),
    ];

    /// How many authorization rules the server sidecar has (`None`: authorization off).
    pub fn authz_rules(self) -> Option<usize> {
        Self::AUTHZ
            .iter()
            .find(|(t, _)| *t == self)
            .map(|(_, rules)| *rules)
    }

    /// The capture run's topologies, in report order.
    pub const CAPTURE: [Topology; 3] = [
        Topology::DirectNetns,
        Topology::TandemNetns,
        Topology::TandemCaptured,
    ];

    /// Name in tables and progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::BarePingora => "bare Pingora",
            Self::Haproxy => "HAProxy",
            Self::Nginx => "nginx",
            Self::NginxTwoHops => "nginx 2 hops",
            Self::NginxTwoHopsMtls => "nginx 2 hops mTLS",
            Self::TandemOneHop => "tandem 1 hop",
            Self::TandemTwoHops => "tandem 2 hops",
            Self::TandemTwoHopsMtls => "tandem 2 hops mTLS",
            Self::TandemAuthz1 => "tandem 2 hops mTLS, authz 1 rule",
            Self::TandemAuthz10 => "tandem 2 hops mTLS, authz 10 rules",
            Self::TandemAuthz100 => "tandem 2 hops mTLS, authz 100 rules",
            Self::TandemTrace1 => "tandem 2 hops, tracing 1 %",
            Self::TandemTrace100 => "tandem 2 hops, tracing 100 %",
            Self::DirectNetns => "direct (netns)",
            Self::TandemCaptured => "tandem 2 hops, captured",
            Self::TandemNetns => "tandem 2 hops, no capture (netns)",
        }
    }

    /// The name `--only` and `--skip` take (`tandem1`; a test keeps it equal to clap's), or
    /// for the capture run's topologies, which those flags do not select, the table name.
    pub fn arg_name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::BarePingora => "pingora",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
            Self::NginxTwoHops => "nginx2",
            Self::NginxTwoHopsMtls => "nginx2-mtls",
            Self::TandemOneHop => "tandem1",
            Self::TandemTwoHops => "tandem2",
            Self::TandemTwoHopsMtls => "tandem2-mtls",
            Self::TandemAuthz1 => "tandem2-authz1",
            Self::TandemAuthz10 => "tandem2-authz10",
            Self::TandemAuthz100 => "tandem2-authz100",
            Self::TandemTrace1 => "tandem2-trace1",
            Self::TandemTrace100 => "tandem2-trace100",
            Self::DirectNetns | Self::TandemCaptured | Self::TandemNetns => self.name(),
        }
    }

    /// Whether this is a run's baseline: the client talks to the upstream itself.
    pub fn is_direct(self) -> bool {
        matches!(self, Self::Direct | Self::DirectNetns)
    }

    /// Whether tandem-proxy runs in this topology.
    pub fn is_tandem(self) -> bool {
        matches!(
            self,
            Self::TandemOneHop
                | Self::TandemTwoHops
                | Self::TandemTwoHopsMtls
                | Self::TandemAuthz1
                | Self::TandemAuthz10
                | Self::TandemAuthz100
                | Self::TandemTrace1
                | Self::TandemTrace100
                | Self::TandemCaptured
                | Self::TandemNetns
        )
    }

    /// Whether there is a proxy process to measure.
    pub fn has_proxy(self) -> bool {
        !self.is_direct()
    }

    /// The mutual-TLS topologies, each with the same path in plaintext it is compared with.
    pub const MTLS_PAIRS: [(Topology, Topology); 2] = [
        (Topology::TandemTwoHopsMtls, Topology::TandemTwoHops),
        (Topology::NginxTwoHopsMtls, Topology::NginxTwoHops),
    ];
}

/// A program a topology needs: where it is, or why it is not there (said to the user when
/// a topology that needs it was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Found at this path.
    Found(PathBuf),
    /// Not there, and why.
    Missing(String),
}

impl Program {
    /// `name` from the PATH or the usual sbin directories; `install` says how to get it.
    pub fn find(name: &str, install: &str) -> Self {
        match find_program(name) {
            Some(path) => Self::Found(path),
            None => Self::Missing(format!(
                "{name} not installed (not on PATH, nor in /usr/sbin, /usr/local/sbin, /sbin); {install}"
            )),
        }
    }

    /// The tandem-proxy binary the user named (`--tandem-proxy`, `TANDEM_PROXY_BIN`), if it
    /// is a file.
    pub fn tandem_proxy(given: Option<&Path>) -> Self {
        match given {
            Some(path) if path.is_file() => Self::Found(path.to_path_buf()),
            Some(path) => Self::Missing(format!(
                "no tandem-proxy at {} (build it: cargo build --release -p tandem-proxy)",
                path.display()
            )),
            None => Self::Missing(
                "no tandem-proxy given (--tandem-proxy <path> or TANDEM_PROXY_BIN; \
                 `make bench` builds target/release/tandem-proxy and passes it)"
                    .into(),
            ),
        }
    }

    /// The path, when found.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Found(path) => Some(path),
            Self::Missing(_) => None,
        }
    }

    fn missing(&self) -> Option<String> {
        match self {
            Self::Found(_) => None,
            Self::Missing(why) => Some(why.clone()),
        }
    }
}

/// The programs the topologies run.
#[derive(Debug, Clone)]
pub struct Tools {
    /// This benchmark's own binary (it also serves the upstream and the bare Pingora proxy).
    pub bench: PathBuf,
    /// `haproxy`.
    pub haproxy: Program,
    /// `nginx`.
    pub nginx: Program,
    /// `tandem-proxy`.
    pub tandem: Program,
}

impl Tools {
    /// Why `topology` cannot run here, or `None` when it can.
    pub fn missing(&self, topology: Topology) -> Option<String> {
        match topology {
            Topology::Direct | Topology::BarePingora | Topology::DirectNetns => None,
            Topology::Haproxy => self.haproxy.missing(),
            Topology::Nginx | Topology::NginxTwoHops | Topology::NginxTwoHopsMtls => {
                self.nginx.missing()
            }
            t if t.is_tandem() => self.tandem.missing(),
            _ => None,
        }
    }
}

/// Finds `name` on the PATH (or the usual sbin directories, where Debian puts daemons).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A loopback port free right now (bound, then released for the child to bind).
pub fn free_port() -> Result<SocketAddr, TopologyError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    listener.local_addr().map_err(io("read a free port"))
}

/// A started topology. Dropping it kills its processes.
pub struct Running {
    /// Where HTTP/1.1 clients connect.
    pub http1: SocketAddr,
    /// Where h2c clients connect.
    pub h2c: SocketAddr,
    /// Host / `:authority` the client sends.
    pub authority: String,
    /// The proxy processes whose CPU and memory are measured (empty for direct).
    pub pids: Vec<u32>,
    /// Request counters that must grow by what each measured run sent (empty: no proxy).
    pub probes: Vec<Probe>,
    /// For a mutual-TLS topology: what it must show before it is measured, and its handshake
    /// counter.
    pub mtls: Option<MtlsCheck>,
    /// For a tracing topology: the proxies' span counters and the sink they export to.
    pub traced: Option<tandem::Traced>,
    children: Vec<Child>,
    /// The signer and CA of a mutual-TLS topology, stopped with it.
    identity: Option<BenchIdentity>,
    dir: TempDir,
    /// Undone once the processes are gone (the capture run's iptables rules).
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl Running {
    /// Where a client speaking `protocol` sends its requests, and as whom.
    pub fn target(&self, protocol: Protocol) -> Target {
        Target {
            addr: match protocol {
                Protocol::Http1 => self.http1,
                Protocol::H2c => self.h2c,
            },
            authority: self.authority.clone(),
            protocol,
        }
    }

    /// Nothing started yet: clients connect to `addr` with `authority`; files go in a new
    /// temporary directory.
    pub fn new(addr: SocketAddr, authority: String) -> Result<Self, TopologyError> {
        Ok(Self {
            http1: addr,
            h2c: addr,
            authority,
            pids: Vec::new(),
            probes: Vec::new(),
            mtls: None,
            traced: None,
            children: Vec::new(),
            identity: None,
            dir: TempDir::new().map_err(io("create a temp dir"))?,
            cleanup: None,
        })
    }

    /// The directory for this topology's configs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a process whose CPU and memory count as the proxy's.
    pub fn add_proxy(&mut self, child: Child) {
        self.pids.push(child.id());
        self.children.push(child);
    }

    /// Adds a process that is not measured (it is only stopped with the topology).
    pub fn add_helper(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Runs `f` when the topology stops, after its processes are killed.
    pub fn on_stop(&mut self, f: impl FnOnce() + Send + 'static) {
        self.cleanup = Some(Box::new(f));
    }

    /// The last lines each process wrote, to explain a failed start.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(8).collect();
                    out.push_str(&format!("--- {}\n", path.display()));
                    for line in tail.into_iter().rev() {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SIGKILL: graceful drains (Pingora waits seconds) would only lengthen the run.
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
        // The signer outlives the proxies that might still call it.
        self.identity.take();
    }
}

pub(crate) fn spawn(dir: &Path, log: &str, command: &mut Command) -> Result<Child, TopologyError> {
    let out = fs::File::create(dir.join(log)).map_err(io(format!("create {log}")))?;
    let err = out.try_clone().map_err(io(format!("open {log}")))?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(format!("start {:?}", command.get_program())))
}

/// Starts the upstream server (this binary's `upstream` command) and returns it running.
pub fn start_upstream(tools: &Tools, body_bytes: usize) -> Result<Running, TopologyError> {
    let addr = free_port()?;
    let mut running = Running::new(addr, addr.to_string())?;
    let child = spawn(
        running.dir(),
        "upstream.log",
        Command::new(&tools.bench)
            .arg("upstream")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--body-bytes")
            .arg(body_bytes.to_string()),
    )?;
    running.add_proxy(child);
    Ok(running)
}

/// Starts `topology` in front of `upstream`.
pub fn start(
    topology: Topology,
    tools: &Tools,
    upstream: SocketAddr,
) -> Result<Running, TopologyError> {
    if let Some(reason) = tools.missing(topology) {
        return Err(TopologyError::Unavailable(reason));
    }
    let mut running = Running::new(upstream, upstream.to_string())?;
    let dir = running.dir().to_path_buf();
    match topology {
        Topology::Direct => {}
        Topology::DirectNetns | Topology::TandemCaptured | Topology::TandemNetns => {
            return Err(TopologyError::Unavailable(
                "a capture-run topology: `tandem-bench capture` starts it".into(),
            ));
        }
        Topology::BarePingora => {
            let listen = free_port()?;
            let child = spawn(
                &dir,
                "pingora.log",
                Command::new(&tools.bench)
                    .arg("pingora")
                    .arg("--listen")
                    .arg(listen.to_string())
                    .arg("--upstream")
                    .arg(upstream.to_string()),
            )?;
            running.add(child, listen, listen);
        }
        Topology::Haproxy => {
            let (http1, h2c) = (free_port()?, free_port()?);
            let config = dir.join("haproxy.cfg");
            fs::write(&config, haproxy_config(http1, h2c, upstream))
                .map_err(io("write haproxy.cfg"))?;
            let program = tools.haproxy.path().unwrap_or(Path::new("haproxy"));
            let child = spawn(
                &dir,
                "haproxy.log",
                Command::new(program).arg("-db").arg("-f").arg(&config),
            )?;
            running.add(child, http1, h2c);
        }
        Topology::Nginx => {
            let (http1, h2c) = (free_port()?, free_port()?);
            let config = dir.join("nginx.conf");
            fs::write(&config, nginx_config(&dir, http1, h2c, upstream))
                .map_err(io("write nginx.conf"))?;
            let program = tools.nginx.path().unwrap_or(Path::new("nginx"));
            let child = spawn(
                &dir,
                "nginx.log",
                Command::new(program)
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(&config),
            )?;
            running.add(child, http1, h2c);
        }
        Topology::NginxTwoHops | Topology::NginxTwoHopsMtls => {
            start_nginx_pair(
                &mut running,
                tools,
                upstream,
                topology == Topology::NginxTwoHopsMtls,
            )?;
        }
        Topology::TandemTwoHopsMtls
        | Topology::TandemAuthz1
        | Topology::TandemAuthz10
        | Topology::TandemAuthz100 => {
            let program = tools.tandem.path().unwrap_or(Path::new("tandem-proxy"));
            let identity = BenchIdentity::prepare(&dir, &["client", "server"])?;
            let env = |sa: &str| {
                identity.proxy_env(sa).ok_or_else(|| {
                    TopologyError::Unavailable(format!("no token was written for {sa}"))
                })
            };
            let (a, b) = (tandem::Ports::free()?, tandem::Ports::free()?);
            let server = match topology.authz_rules() {
                Some(rules) => tandem::authz_server_config(rules, &identity.id("client").uri())?,
                None => tandem::mtls_server_config()?,
            };
            let child_b =
                tandem_identity_child(&dir, program, "tandem-b", &b, &server, &env("server")?)?;
            running.add(child_b, b.outbound, b.outbound);
            let client = tandem::mtls_client_config(upstream, b.inbound, &identity.id("server"))?;
            let child_a =
                tandem_identity_child(&dir, program, "tandem-a", &a, &client, &env("client")?)?;
            running.add(child_a, a.outbound, a.outbound);
            running.probes = vec![
                tandem::outbound_probe(None, a.admin),
                tandem::inbound_probe(None, b.admin),
            ];
            running.mtls = Some(MtlsCheck {
                ready: vec![b.admin, a.admin],
                plaintext: Target {
                    addr: b.inbound,
                    authority: upstream.to_string(),
                    protocol: Protocol::Http1,
                },
                handshakes: Handshakes::Tandem { admin: b.admin },
            });
            running.identity = Some(identity);
        }
        Topology::TandemOneHop => {
            let program = tools.tandem.path().unwrap_or(Path::new("tandem-proxy"));
            let a = tandem::Ports::free()?;
            let config = tandem::client_config(upstream, upstream, false)?;
            let child = tandem_child(&dir, program, "tandem-a", &a, &config)?;
            running.add(child, a.outbound, a.outbound);
            running.probes = vec![tandem::outbound_probe(None, a.admin)];
        }
        Topology::TandemTwoHops | Topology::TandemTrace1 | Topology::TandemTrace100 => {
            let program = tools.tandem.path().unwrap_or(Path::new("tandem-proxy"));
            let (a, b) = (tandem::Ports::free()?, tandem::Ports::free()?);
            let (server, client) = match topology.sampling_percent() {
                Some(percent) => {
                    let sink = start_otlp_sink(&mut running, tools)?;
                    let collector = format!("http://{sink}");
                    running.traced = Some(tandem::Traced {
                        sink,
                        admins: vec![a.admin, b.admin],
                        sampling_percent: percent,
                    });
                    (
                        tandem::traced_server_config(&collector, percent)?,
                        tandem::traced_client_config(upstream, b.inbound, &collector, percent)?,
                    )
                }
                None => (
                    tandem::server_config()?,
                    tandem::client_config(upstream, b.inbound, true)?,
                ),
            };
            let child_b = tandem_child(&dir, program, "tandem-b", &b, &server)?;
            running.add(child_b, b.outbound, b.outbound);
            let child_a = tandem_child(&dir, program, "tandem-a", &a, &client)?;
            running.add(child_a, a.outbound, a.outbound);
            running.probes = vec![
                tandem::outbound_probe(None, a.admin),
                tandem::inbound_probe(None, b.admin),
            ];
        }
    }
    Ok(running)
}

/// Starts the OTLP load sink (this binary's `otlp-sink` command) as a helper of `running`:
/// stopped with it, its CPU not counted as the proxies'.
fn start_otlp_sink(running: &mut Running, tools: &Tools) -> Result<SocketAddr, TopologyError> {
    let addr = free_port()?;
    let child = spawn(
        running.dir(),
        "otlp-sink.log",
        Command::new(&tools.bench)
            .arg("otlp-sink")
            .arg("--listen")
            .arg(addr.to_string()),
    )?;
    running.add_helper(child);
    Ok(addr)
}

impl Running {
    /// Adds a process; the last one added is where clients connect.
    fn add(&mut self, child: Child, http1: SocketAddr, h2c: SocketAddr) {
        self.add_proxy(child);
        self.http1 = http1;
        self.h2c = h2c;
    }
}

/// Starts a plaintext `tandem-proxy run` (identity off, whatever this process's environment
/// says).
pub(crate) fn tandem_child(
    dir: &Path,
    program: &Path,
    name: &str,
    ports: &tandem::Ports,
    config: &str,
) -> Result<Child, TopologyError> {
    tandem_child_with(dir, without_identity(program), name, ports, config)
}

/// Starts `tandem-proxy run` with its identity client configured by `env` (the bench
/// signer's address and name, its token file, the roots file).
fn tandem_identity_child(
    dir: &Path,
    program: &Path,
    name: &str,
    ports: &tandem::Ports,
    config: &str,
    env: &[(&'static str, String)],
) -> Result<Child, TopologyError> {
    let mut command = without_identity(program);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    tandem_child_with(dir, command, name, ports, config)
}

/// `program` without the identity client's environment variables.
fn without_identity(program: &Path) -> Command {
    let mut command = Command::new(program);
    for key in PROXY_IDENTITY_ENV {
        command.env_remove(key);
    }
    command
}

/// The nginx pair: the server side (in front of the upstream) first, then the client side
/// (where clients connect); with `mtls`, certificates from a fresh test CA, and the server
/// side's status page counts the connections (handshakes) the client side opens.
fn start_nginx_pair(
    running: &mut Running,
    tools: &Tools,
    upstream: SocketAddr,
    mtls: bool,
) -> Result<(), TopologyError> {
    let dir = running.dir().to_path_buf();
    let program = tools.nginx.path().unwrap_or(Path::new("nginx"));
    let (http1, h2c, hop, status) = (free_port()?, free_port()?, free_port()?, free_port()?);
    // nginx reads its certificates from files: the CA's, without the signer.
    let tls = if mtls {
        Some(NginxTls::write(&dir)?)
    } else {
        None
    };
    let server = NginxHop::Server {
        listen: hop,
        status,
        upstream,
    };
    let client = NginxHop::Client { http1, h2c, hop };
    for (name, hop) in [("nginx-b", &server), ("nginx-a", &client)] {
        let prefix = dir.join(name);
        fs::create_dir_all(&prefix).map_err(io(format!("create {}", prefix.display())))?;
        let config = dir.join(format!("{name}.conf"));
        let error_log = dir.join(format!("{name}-error.log"));
        fs::write(
            &config,
            nginx_pair_config(&prefix, &error_log, hop, tls.as_ref()),
        )
        .map_err(io(format!("write {name}.conf")))?;
        let child = spawn(
            &dir,
            &format!("{name}.log"),
            Command::new(program)
                .arg("-p")
                .arg(&prefix)
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&config),
        )?;
        running.add(child, http1, h2c);
    }
    if tls.is_some() {
        running.mtls = Some(MtlsCheck {
            ready: Vec::new(),
            plaintext: Target {
                addr: hop,
                authority: upstream.to_string(),
                protocol: Protocol::Http1,
            },
            handshakes: Handshakes::Nginx { status },
        });
    }
    Ok(())
}

/// Starts `tandem-proxy run` as `command` (the program, or a wrapper such as nsenter that
/// ends with it) with `config` written to `<dir>/<name>.json`, readable by any user (the
/// capture run's proxies run as UID 2102).
pub(crate) fn tandem_child_with(
    dir: &Path,
    mut command: Command,
    name: &str,
    ports: &tandem::Ports,
    config: &str,
) -> Result<Child, TopologyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(format!("{name}.json"));
    fs::write(&path, config).map_err(io(format!("write {name}.json")))?;
    for (file, mode) in [(dir, 0o755), (path.as_path(), 0o644)] {
        fs::set_permissions(file, fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", file.display())))?;
    }
    spawn(
        dir,
        &format!("{name}.log"),
        command
            .arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--outbound-addr")
            .arg(ports.outbound.to_string())
            .arg("--inbound-addr")
            .arg(ports.inbound.to_string())
            .arg("--admin-addr")
            .arg(ports.admin.to_string()),
    )
}

/// The certificate files of the nginx pair, from a fresh test CA: the client side presents
/// `client` (spiffe://cluster.local/ns/bench/sa/client), the server side `server`.
#[derive(Debug, Clone)]
pub struct NginxTls {
    /// The roots (`proxy_ssl_trusted_certificate`, `ssl_client_certificate`).
    pub roots: PathBuf,
    /// The client side's chain (leaf, issuer) and key.
    pub client_chain: PathBuf,
    /// The client side's key.
    pub client_key: PathBuf,
    /// The server side's chain and key.
    pub server_chain: PathBuf,
    /// The server side's key.
    pub server_key: PathBuf,
    /// The name the client side checks the server's certificate for, and sends as SNI.
    pub server_name: String,
}

impl NginxTls {
    /// A fresh CA's roots and the two workloads' chains and keys, written to `dir`.
    pub fn write(dir: &Path) -> Result<Self, TopologyError> {
        use tandem_crds::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
        let ca = TestCa::new()?;
        let write = |name: &str, text: &str| -> Result<PathBuf, TopologyError> {
            let path = dir.join(name);
            fs::write(&path, text).map_err(io(format!("write {name}")))?;
            Ok(path)
        };
        let id = |sa: &str| SpiffeId::new(DEFAULT_TRUST_DOMAIN, signer::NAMESPACE, sa);
        let client = ca.workload(&id("client"))?;
        let server = ca.workload(&id("server"))?;
        Ok(Self {
            roots: write("roots.pem", ca.roots_pem())?,
            client_chain: write("client.pem", &client.chain_pem)?,
            client_key: write("client.key", &client.key_pem)?,
            server_chain: write("server.pem", &server.chain_pem)?,
            server_key: write("server.key", &server.key_pem)?,
            server_name: id("server").dns_name(),
        })
    }
}

/// One nginx of the pair.
#[derive(Debug, Clone, Copy)]
pub enum NginxHop {
    /// The client side: clients connect on `http1` and `h2c`; it proxies to `hop`.
    Client {
        /// HTTP/1.1 listener.
        http1: SocketAddr,
        /// h2c listener.
        h2c: SocketAddr,
        /// The server side's listener.
        hop: SocketAddr,
    },
    /// The server side: listens on `listen` (TLS with the pair's `mtls`), proxies to
    /// `upstream`; its `stub_status` page is on `status`.
    Server {
        /// The listener the client side connects to.
        listen: SocketAddr,
        /// The status page's (plaintext) listener.
        status: SocketAddr,
        /// The upstream.
        upstream: SocketAddr,
    },
}

/// What every nginx here shares: one process, no master, its files under `prefix`.
fn nginx_head(prefix: &Path, error_log: &Path) -> String {
    let (prefix, error_log) = (prefix.display(), error_log.display());
    format!(
        "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {error_log} warn;
events {{ worker_connections 19000; }}
"
    )
}

/// The `http` block's settings every nginx here shares: no access log, temp files under
/// `prefix`, keep-alive without a request cap.
fn nginx_http_common(prefix: &Path) -> String {
    let prefix = prefix.display();
    format!(
        "    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
"
    )
}

/// An upstream block named `name` with a keep-alive pool.
fn nginx_upstream(name: &str, server: SocketAddr) -> String {
    format!(
        "    upstream {name} {{
        server {server};
        keepalive 128;
        keepalive_requests 100000000;
    }}
"
    )
}

/// The config of one nginx of the pair; `tls` makes the hop between them mutual TLS 1.3:
/// the client side presents its certificate and checks the server's chain and name, the
/// server side requires a client certificate under the roots (depth 2: leaf, issuer, root).
pub fn nginx_pair_config(
    prefix: &Path,
    error_log: &Path,
    hop: &NginxHop,
    tls: Option<&NginxTls>,
) -> String {
    let mut out = nginx_head(prefix, error_log);
    out.push_str("http {\n");
    out.push_str(&nginx_http_common(prefix));
    match *hop {
        NginxHop::Client { http1, h2c, hop } => {
            out.push_str(&nginx_upstream("hop", hop));
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut tls_lines = String::new();
            if let Some(tls) = tls {
                tls_lines = format!(
                    "            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {};
            proxy_ssl_certificate_key {};
            proxy_ssl_trusted_certificate {};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_server_name on;
            proxy_ssl_name {};
            proxy_ssl_session_reuse on;
",
                    tls.client_chain.display(),
                    tls.client_key.display(),
                    tls.roots.display(),
                    tls.server_name
                );
            }
            out.push_str(&format!(
                "    server {{
        listen {http1};
        listen {h2c} http2;
        location / {{
            proxy_pass {scheme}://hop;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
{tls_lines}        }}
    }}
"
            ));
        }
        NginxHop::Server {
            listen,
            status,
            upstream,
        } => {
            out.push_str(&nginx_upstream("up", upstream));
            let (ssl, tls_lines) = match tls {
                Some(tls) => (
                    " ssl",
                    format!(
                        "        ssl_protocols TLSv1.3;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_client_certificate {};
        ssl_verify_client on;
        ssl_verify_depth 2;
",
                        tls.server_chain.display(),
                        tls.server_key.display(),
                        tls.roots.display()
                    ),
                ),
                None => ("", String::new()),
            };
            out.push_str(&format!(
                "    server {{
        listen {listen}{ssl};
{tls_lines}        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
    server {{
        listen {status};
        location / {{ stub_status; }}
    }}
"
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// HAProxy: one thread, HTTP mode, upstream connections reused; h2c on its own bind.
pub fn haproxy_config(http1: SocketAddr, h2c: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "global
    nbthread 1
    # HAProxy reserves two descriptors per connection and the machine caps a process at
    # 20,000, so 9,990 is as high as it starts with here: the last of 10,000 clients wait.
    maxconn 9990
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend bench
    bind {http1}
    bind {h2c} proto h2
    default_backend upstream
backend upstream
    server up {upstream}
"
    )
}

/// nginx: one process (no master), `proxy_pass` with an upstream keep-alive pool, no access
/// log, keep-alive without a request cap; h2c on its own listener.
pub fn nginx_config(
    dir: &Path,
    http1: SocketAddr,
    h2c: SocketAddr,
    upstream: SocketAddr,
) -> String {
    let mut out = nginx_head(dir, &dir.join("error.log"));
    out.push_str("http {\n");
    out.push_str(&nginx_http_common(dir));
    out.push_str(&nginx_upstream("up", upstream));
    out.push_str(&format!(
        "    server {{
        listen {http1};
        listen {h2c} http2;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_topology_is_missing_what_its_program_is_missing() {
        let tools = Tools {
            bench: PathBuf::from("/bin/true"),
            haproxy: Program::Missing("haproxy not installed".into()),
            nginx: Program::Found(PathBuf::from("/usr/sbin/nginx")),
            tandem: Program::tandem_proxy(None),
        };
        assert_eq!(tools.missing(Topology::Direct), None);
        assert_eq!(tools.missing(Topology::BarePingora), None);
        assert_eq!(tools.missing(Topology::Nginx), None);
        assert_eq!(
            tools.missing(Topology::Haproxy).as_deref(),
            Some("haproxy not installed")
        );
        for tandem in [Topology::TandemOneHop, Topology::TandemTwoHops] {
            let why = tools.missing(tandem).unwrap();
            assert!(why.contains("--tandem-proxy"), "{why}");
        }
    }

    #[test]
    fn a_tandem_proxy_path_that_is_not_a_file_is_named_in_the_reason() {
        let given = Path::new("/nonexistent/target/release/tandem-proxy");
        let Program::Missing(why) = Program::tandem_proxy(Some(given)) else {
            panic!("a path that does not exist was taken for the binary");
        };
        assert!(
            why.contains("/nonexistent/target/release/tandem-proxy"),
            "{why}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            Program::tandem_proxy(Some(file.path())),
            Program::Found(file.path().to_path_buf())
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(Program::tandem_proxy(Some(dir.path())).path().is_none());
    }

    #[test]
    fn the_names_the_flags_take_are_clap_s() {
        use clap::ValueEnum as _;
        for topology in Topology::ALL {
            let value = topology.to_possible_value().unwrap();
            assert_eq!(value.get_name(), topology.arg_name());
        }
        for topology in Topology::CAPTURE {
            assert!(topology.to_possible_value().is_none(), "{topology:?}");
        }
    }

    #[test]
    fn proxy_configs_point_at_the_upstream() {
        let (a, b, up): (SocketAddr, SocketAddr, SocketAddr) = (
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
        );
        let haproxy = haproxy_config(a, b, up);
        assert!(haproxy.contains("bind 127.0.0.1:1002 proto h2"));
        assert!(haproxy.contains("server up 127.0.0.1:2000"));
        let nginx = nginx_config(Path::new("/tmp/x"), a, b, up);
        assert!(nginx.contains("listen 127.0.0.1:1002 http2;"));
        assert!(nginx.contains("server 127.0.0.1:2000;"));
    }
}
