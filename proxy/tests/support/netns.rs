//! Network namespaces made by the test (root required: a test that needs them fails loudly
//! when not run as root, it never skips).

use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and iptables rules: run it as root (make test-proxy does)"
    );
}

/// Runs a command, failing the test with its output if it fails.
pub fn sh(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        require_root();
        let name = format!(
            "tdm-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut argv = vec!["ip", "-n", &self.name];
        argv.extend_from_slice(args);
        sh(&argv);
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        let mut argv = vec!["ip", "netns", "exec", &self.name];
        argv.extend_from_slice(args);
        sh(&argv);
    }

    /// Appends a nat rule redirecting TCP in `chain` (`OUTPUT`: leaving the namespace,
    /// `PREROUTING`: arriving), narrowed by the iptables matches in `only`, to local `port`.
    pub fn redirect_tcp(&self, chain: &str, only: &[&str], port: u16) {
        let port = port.to_string();
        let mut argv = vec!["iptables", "-t", "nat", "-A", chain, "-p", "tcp"];
        argv.extend_from_slice(only);
        argv.extend_from_slice(&["-j", "REDIRECT", "--to-ports", &port]);
        self.exec(&argv);
    }

    /// `nsenter` prefix running a program inside the namespace as `uid`.
    pub fn as_uid(&self, uid: u32) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net={}", self.path()),
            "--setuid".into(),
            uid.to_string(),
            "--setgid".into(),
            uid.to_string(),
            "--".into(),
        ]
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// Runs a future to completion on a thread inside the namespace.
    pub fn block_on<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        self.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }

    /// Binds a listener inside the namespace.
    pub fn bind(&self, addr: &str) -> std::net::TcpListener {
        let addr = addr.to_owned();
        self.enter(move || std::net::TcpListener::bind(&addr).unwrap())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two "pods" joined by a veth pair: `client` (10.77.0.1) and `server` (10.77.0.2), each with a
/// default route over the link, so service cluster IPs (10.96.0.0/12) are routable.
pub struct Pods {
    pub client: Netns,
    pub server: Netns,
}

pub const CLIENT_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";

impl Pods {
    pub fn new() -> Self {
        let client = Netns::new("c");
        let server = Netns::new("s");
        client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0s",
            "netns",
            &server.name,
        ]);
        server.ip(&["link", "set", "eth0s", "name", "eth0"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        server.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        server.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "dev", "eth0"]);
        server.ip(&["route", "add", "default", "dev", "eth0"]);
        Self { client, server }
    }

    /// The real capture rules, as the `tandem-init` container applies them
    /// (`tandem-proxy init`), in both pods.
    pub fn init(&self) {
        for ns in [&self.client, &self.server] {
            ns.exec(&[super::BIN, "init"]);
        }
    }

    /// Minimal capture rules (the real ones come from `tandem-init`): in the client pod, every
    /// outgoing TCP connection except the proxy's own (UID 2102) and loopback goes to :15001; in
    /// the server pod, every incoming TCP connection goes to :15006.
    pub fn capture(&self) {
        let uid = tandem_crds::names::PROXY_UID.to_string();
        for ns in [&self.client, &self.server] {
            ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                "RETURN",
            ]);
            ns.exec(&[
                "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-o", "lo", "-j", "RETURN",
            ]);
            ns.redirect_tcp("OUTPUT", &[], tandem_crds::names::OUTBOUND_PORT);
            ns.redirect_tcp("PREROUTING", &[], tandem_crds::names::INBOUND_PORT);
        }
    }
}
