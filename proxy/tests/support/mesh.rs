//! Proxies embedded in the test process (`tandem_proxy::server::serve`), so a test can hand
//! each one an `IdentityState` filled from a [`super::ca::TestCa`] and swap its credentials
//! while traffic flows. Each runs on its own thread and runtime, optionally inside a network
//! namespace; its access log is captured and its metrics read directly.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proxy::access_log::AccessLog;
use tandem_proxy::cli::{AccessLogFormat, LogFormat, RunArgs};
use tandem_proxy::identity::IdentityState;
use tandem_proxy::metrics::Metrics;
use tandem_proxy::server::{OwnAddrs, Parts};
use tandem_proxy::tls::probes::AppProbes;

use super::netns::Netns;

/// A writer the test reads back.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A proxy running in this process; stopped on drop.
pub struct MeshProxy {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub identity: Arc<IdentityState>,
    pub metrics: Arc<Metrics>,
    log: Captured,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MeshProxy {
    /// On loopback ports chosen by the kernel.
    pub fn start(config: &Path, identity: Arc<IdentityState>) -> Self {
        Self::start_at(config, identity, "127.0.0.1:0", None, AppProbes::default())
    }

    /// On loopback, letting the pod's HTTP `probes` through in plaintext when strict.
    pub fn start_with_probes(
        config: &Path,
        identity: Arc<IdentityState>,
        probes: AppProbes,
    ) -> Self {
        Self::start_at(config, identity, "127.0.0.1:0", None, probes)
    }

    /// Inside `ns`, listening on `bind` (e.g. `0.0.0.0:0`).
    pub fn start_in(ns: &Netns, config: &Path, identity: Arc<IdentityState>) -> Self {
        Self::start_at(
            config,
            identity,
            "0.0.0.0:0",
            Some(ns.path()),
            AppProbes::default(),
        )
    }

    fn start_at(
        config: &Path,
        identity: Arc<IdentityState>,
        bind: &str,
        netns: Option<String>,
        probes: AppProbes,
    ) -> Self {
        let addr: SocketAddr = bind.parse().unwrap();
        let args = RunArgs {
            config: config.to_path_buf(),
            outbound_addr: addr,
            inbound_addr: addr,
            admin_addr: addr,
            drain_grace: Duration::from_millis(200),
            config_poll: Duration::from_millis(50),
            worker_threads: 1,
            log_format: LogFormat::Json,
            access_log: AccessLogFormat::Json,
            identity: Default::default(),
            config_stream: tandem_proxy::cli::Switch::Off,
            app_probes: probes,
            trace: Default::default(),
            workload_name: "unknown".into(),
        };
        let metrics = Arc::new(Metrics::new());
        let log = Captured::default();
        let (own_tx, own_rx) = std::sync::mpsc::channel::<OwnAddrs>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let parts_metrics = metrics.clone();
        let parts_identity = identity.clone();
        let parts_log = log.clone();
        std::thread::spawn(move || {
            if let Some(path) = netns {
                let file = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            let (writer, _thread) = tandem_proxy::log_writer::spawn(parts_log).unwrap();
            let parts = Parts {
                metrics: parts_metrics,
                access_log: AccessLog::to(writer),
                identity: parts_identity,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let served = runtime.block_on(tandem_proxy::server::serve(
                args,
                parts,
                move |own| {
                    let _ = own_tx.send(own);
                },
                async move {
                    let _ = stop_rx.await;
                    "test"
                },
            ));
            runtime.shutdown_timeout(Duration::from_millis(100));
            served.unwrap();
        });
        let own = own_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("embedded proxy did not start");
        Self {
            outbound: own.outbound,
            inbound: own.inbound,
            admin: own.admin,
            identity,
            metrics,
            log,
            stop: Some(stop_tx),
        }
    }

    /// Access-log lines so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let bytes = self.log.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The Prometheus text of every metric.
    pub fn metrics(&self) -> String {
        self.metrics.encode(None)
    }

    /// The value of one series (0 when absent).
    pub fn counter(&self, series: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MeshProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A service whose endpoints are meshed with these identities.
pub fn meshed_service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(SocketAddr, &str)],
) -> serde_json::Value {
    let endpoints = endpoints
        .iter()
        .map(|(address, identity)| {
            serde_json::json!({"address": address.to_string(), "meshed": true, "identity": identity})
        })
        .collect();
    super::service_with(name, cluster_ip, port, protocol, endpoints)
}

/// A config for workload `test/<service_account>` in this mTLS mode.
pub fn config(
    version: &str,
    service_account: &str,
    mtls: &str,
    services: Vec<serde_json::Value>,
) -> String {
    serde_json::json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": version,
        "workload": {"namespace": "test", "serviceAccount": service_account, "mtls": mtls},
        "services": services,
    })
    .to_string()
}

/// A TCP relay that records every byte the client sent through it (a wiretap between hops).
pub struct Wiretap {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<u8>>>,
}

impl Wiretap {
    /// Listens on `listener`, forwards each connection to `to`.
    pub fn start(listener: std::net::TcpListener, to: SocketAddr) -> Self {
        Self::start_at(listener, to, None)
    }

    /// The same, inside `ns` (the connections to `to` are made there).
    pub fn start_in(ns: &Netns, listener: std::net::TcpListener, to: SocketAddr) -> Self {
        Self::start_at(listener, to, Some(ns.path()))
    }

    fn start_at(listener: std::net::TcpListener, to: SocketAddr, netns: Option<String>) -> Self {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        std::thread::spawn(move || {
            if let Some(path) = netns {
                let file = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(tap(listener, to, recorded));
        });
        Self { addr, seen }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

async fn tap(listener: std::net::TcpListener, to: SocketAddr, recorded: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    while let Ok((client, _)) = listener.accept().await {
        let recorded = recorded.clone();
        tokio::spawn(async move {
            let Ok(upstream) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let up = async move {
                let mut buf = [0u8; 4096];
                loop {
                    match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = uw.shutdown().await;
            };
            let down = async move {
                let _ = tokio::io::copy(&mut ur, &mut cw).await;
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
