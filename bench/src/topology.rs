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
    /// One tandem-proxy: the client-side sidecar's outbound listener.
    #[value(name = "tandem1")]
    TandemOneHop,
    /// Two tandem-proxies, the mesh path: client sidecar outbound → server sidecar inbound.
    #[value(name = "tandem2")]
    TandemTwoHops,
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
    pub const ALL: [Topology; 6] = [
        Topology::Direct,
        Topology::BarePingora,
        Topology::Haproxy,
        Topology::Nginx,
        Topology::TandemOneHop,
        Topology::TandemTwoHops,
    ];

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
            Self::TandemOneHop => "tandem 1 hop",
            Self::TandemTwoHops => "tandem 2 hops",
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
            Self::TandemOneHop => "tandem1",
            Self::TandemTwoHops => "tandem2",
            Self::DirectNetns | Self::TandemCaptured | Self::TandemNetns => self.name(),
        }
    }

    /// Whether this is a run's baseline: the client talks to the upstream itself.
    pub fn is_direct(self) -> bool {
        matches!(self, Self::Direct | Self::DirectNetns)
    }

    /// Whether there is a proxy process to measure.
    pub fn has_proxy(self) -> bool {
        !self.is_direct()
    }
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
            Topology::Nginx => self.nginx.missing(),
            Topology::TandemOneHop
            | Topology::TandemTwoHops
            | Topology::TandemCaptured
            | Topology::TandemNetns => self.tandem.missing(),
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
    children: Vec<Child>,
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
            children: Vec::new(),
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
        Topology::TandemOneHop => {
            let program = tools.tandem.path().unwrap_or(Path::new("tandem-proxy"));
            let a = tandem::Ports::free()?;
            let config = tandem::client_config(upstream, upstream, false)?;
            let child = tandem_child(&dir, program, "tandem-a", &a, &config)?;
            running.add(child, a.outbound, a.outbound);
            running.probes = vec![tandem::outbound_probe(None, a.admin)];
        }
        Topology::TandemTwoHops => {
            let program = tools.tandem.path().unwrap_or(Path::new("tandem-proxy"));
            let (a, b) = (tandem::Ports::free()?, tandem::Ports::free()?);
            let server = tandem::server_config()?;
            let child_b = tandem_child(&dir, program, "tandem-b", &b, &server)?;
            running.add(child_b, b.outbound, b.outbound);
            let client = tandem::client_config(upstream, b.inbound, true)?;
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

impl Running {
    /// Adds a process; the last one added is where clients connect.
    fn add(&mut self, child: Child, http1: SocketAddr, h2c: SocketAddr) {
        self.add_proxy(child);
        self.http1 = http1;
        self.h2c = h2c;
    }
}

pub(crate) fn tandem_child(
    dir: &Path,
    program: &Path,
    name: &str,
    ports: &tandem::Ports,
    config: &str,
) -> Result<Child, TopologyError> {
    tandem_child_with(dir, Command::new(program), name, ports, config)
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
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    upstream up {{
        server {upstream};
        keepalive 128;
        keepalive_requests 100000000;
    }}
    server {{
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
    )
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
