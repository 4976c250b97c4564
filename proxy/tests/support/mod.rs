//! Test harness: the real `tandem-proxy` binary as a child process, real upstream servers on
//! loopback port 0, small HTTP/1.1 and h2c clients, and the kubelet's atomic config swap.
#![allow(
    dead_code,
    missing_docs,
    reason = "a harness, not an API: each test binary compiles all of it and uses a part"
)]

pub mod ca;
pub mod mesh;
pub mod netns;
pub mod operator;
pub mod otlp;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem-proxy");

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, readable by the proxy's UID.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tandem-proxy-test-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        tag
    ));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    dir
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A config directory laid out as the kubelet lays out a ConfigMap volume:
/// `config.json -> ..data/config.json`, `..data -> ..<version>`; updates swap `..data` atomically.
pub struct ConfigDir {
    pub dir: PathBuf,
    version: usize,
    file: String,
}

impl ConfigDir {
    pub fn new() -> Self {
        Self::with_file("config.json")
    }

    /// A volume holding one key named `file` (e.g. `roots.pem` of the trust-roots ConfigMap).
    pub fn with_file(file: &str) -> Self {
        Self {
            dir: temp_dir("config"),
            version: 0,
            file: file.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.file)
    }

    /// Publishes `contents` the way the kubelet does.
    pub fn publish(&mut self, contents: &str) {
        self.version += 1;
        let versioned = self.dir.join(format!("..v{}", self.version));
        std::fs::create_dir_all(&versioned).unwrap();
        set_mode(&versioned, 0o755);
        std::fs::write(versioned.join(&self.file), contents).unwrap();
        set_mode(&versioned.join(&self.file), 0o644);
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let link = self.dir.join(&self.file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{}", self.file), &link).unwrap();
        }
    }
}

/// A service entry for a config.
pub fn service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    endpoints: &[SocketAddr],
) -> serde_json::Value {
    let endpoints = endpoints
        .iter()
        .map(|e| serde_json::json!({"address": e.to_string(), "meshed": true}))
        .collect();
    service_with(name, cluster_ip, port, protocol, endpoints)
}

/// A service entry for a config, `test/<name>` on `cluster_ip:port`, with these endpoint
/// entries.
pub fn service_with(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    endpoints: Vec<serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "namespace": "test",
        "clusterIps": [cluster_ip],
        "ports": [{
            "port": port,
            "protocol": protocol,
            "endpoints": endpoints,
        }],
        "loadBalancer": "roundRobin",
    })
}

/// A whole config with these services.
pub fn config(version: &str, services: Vec<serde_json::Value>) -> String {
    serde_json::json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": version,
        "workload": {"namespace": "test", "serviceAccount": "client"},
        "services": services,
    })
    .to_string()
}

/// A running proxy process; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

pub struct ProxyOptions {
    pub config: PathBuf,
    pub outbound: String,
    pub inbound: String,
    pub admin: String,
    pub drain_grace: &'static str,
    /// Prefix command (e.g. nsenter into a network namespace as UID 2102).
    pub wrapper: Vec<String>,
    /// More flags for `tandem-proxy run` (e.g. the `--identity-*` ones).
    pub extra: Vec<String>,
}

impl ProxyOptions {
    pub fn loopback(config: PathBuf) -> Self {
        Self {
            config,
            outbound: "127.0.0.1:0".into(),
            inbound: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
            drain_grace: "5s",
            wrapper: Vec::new(),
            extra: Vec::new(),
        }
    }
}

impl Proxy {
    /// A proxy on loopback ports chosen by the kernel.
    pub fn start(config: &Path) -> Proxy {
        Self::start_with(ProxyOptions::loopback(config.to_path_buf()))
    }

    pub fn start_with(opts: ProxyOptions) -> Proxy {
        let mut argv: Vec<String> = opts.wrapper.clone();
        argv.push(BIN.into());
        argv.extend([
            "run".into(),
            "--config".into(),
            opts.config.display().to_string(),
            "--outbound-addr".into(),
            opts.outbound.clone(),
            "--inbound-addr".into(),
            opts.inbound.clone(),
            "--admin-addr".into(),
            opts.admin.clone(),
            "--drain-grace".into(),
            opts.drain_grace.into(),
            "--config-poll".into(),
            "50ms".into(),
        ]);
        argv.extend(opts.extra.iter().cloned());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("\"message\":\"listening\"") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("proxy did not start: {:?}", child.try_wait()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
        Proxy {
            outbound: addr("outbound"),
            inbound: addr("inbound"),
            admin: addr("admin"),
            child,
            logs,
        }
    }

    /// Log lines so far, parsed.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Access-log lines so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["target"] == "tandem::access")
            .collect()
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin port: (status, body).
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let r = get(self.admin, &self.admin.to_string(), path, &[])
            .await
            .unwrap();
        (r.status, r.body)
    }

    /// Waits until `/config` shows this version.
    pub async fn wait_config_version(&self, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = self.admin("/config").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["version"] == version {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "config {version} never applied: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response, flattened.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// One HTTP/1.1 GET over a fresh connection to `addr`, with this Host and extra headers.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// An HTTP/1.1 keep-alive client on one connection.
pub struct H1Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl H1Client {
    pub async fn connect(addr: SocketAddr, host: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            host: host.to_owned(),
        })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Reply> {
        self.send("GET", path, "").await
    }

    /// Sends any method, with `body`.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &'static str,
    ) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// An h2c (prior knowledge) client.
pub async fn h2_client(
    addr: SocketAddr,
) -> anyhow::Result<
    hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    >,
> {
    let tcp = TcpStream::connect(addr).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Retries `f` until it returns true or the deadline passes.
pub async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of `name` whose labels include every `(label, value)` of `labels`;
/// `None` when no sample matches.
pub fn series_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let samples: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}
