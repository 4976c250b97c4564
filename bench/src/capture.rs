//! The capture run: what iptables capture itself costs. Two pods ([`crate::netns::Pods`]),
//! one upstream in the server pod, and three topologies measured side by side, rounds
//! alternating their order as in the loopback run:
//!
//! - `direct (netns)`: the load generator in the client pod sends to the server pod's IP;
//! - `tandem 2 hops, no capture (netns)`: the same two sidecars as below, addressed
//!   explicitly (client → 127.0.0.1:15001 with the service in the Host header → server pod
//!   :15006 → 127.0.0.1:8080), no iptables;
//! - `tandem 2 hops, captured`: `tandem-proxy init` (the tandem-init container's program)
//!   programs both pods' nat tables, both sidecars run as UID 2102 on their standard ports,
//!   and the load generator sends to the service's cluster IP as an unmodified app does:
//!   client pod OUTPUT → REDIRECT :15001 → server pod IP :8080 → PREROUTING → REDIRECT :15006
//!   → upstream.
//!
//! The load generator runs on a thread that entered the client pod's namespace (with the
//! runtime and the dispatcher thread it starts). After every measured run, each sidecar's
//! request counter must have grown by what was sent, or that round of the topology fails: a
//! benchmark that silently measured direct would be worse than none. The capture rules exist
//! only while the captured topology runs; the other two check they are gone.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_crds::contract::Protocol as ContractProtocol;

use crate::loadgen::{self, Protocol, Target};
use crate::netns::{self, NetnsError, PodPaths, SERVER_IP};
use crate::run::{self, Plan, RunResult, Stage};
use crate::tandem::{self, Ports};
use crate::topology::{Running, Topology, TopologyError, spawn, tandem_child_with};

/// The port the upstream listens on in the server pod (every address).
pub const UPSTREAM_PORT: u16 = 8080;
/// The benchmark service's cluster IP.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 77);
/// The service port an HTTP/1.1 app sends to in the captured topology.
pub const SERVICE_PORT: u16 = 80;
/// The service port an h2c app sends to in the captured topology. A redirected connection is
/// served as its port's declared protocol (`http` is HTTP/1.1), so h2c gets a port declared
/// `http2`, as a Kubernetes service declares `appProtocol` for it.
pub const SERVICE_PORT_H2C: u16 = 81;

/// The chains `tandem-proxy init` creates: their presence means capture is on.
const CAPTURE_CHAIN_PREFIX: &str = "TANDEM_";

/// Errors of the capture run's set-up.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A namespace could not be made or entered.
    #[error("network namespace: {0}")]
    Netns(#[from] NetnsError),
    /// A process could not be started.
    #[error("{0}")]
    Topology(#[from] TopologyError),
    /// The upstream in the server pod never answered.
    #[error("upstream in the server pod not ready: {0}")]
    UpstreamNotReady(loadgen::LoadError),
    /// The run's runtime could not be built.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// A planned topology is not one this stage starts.
    #[error(transparent)]
    Select(#[from] run::SelectError),
}

/// The upstream's address in the server pod.
pub fn upstream_addr() -> SocketAddr {
    SocketAddr::from((SERVER_IP, UPSTREAM_PORT))
}

/// Starts `tandem-bench upstream` in the server pod, listening on every address there (the
/// server sidecar forwards to the pod IP when capture redirected the connection, to
/// 127.0.0.1 when it did not).
pub fn start_upstream(
    bench: &Path,
    pods: &PodPaths,
    body_bytes: usize,
) -> Result<Running, TopologyError> {
    let mut running = Running::new(upstream_addr(), upstream_addr().to_string())?;
    let mut command = netns::nsenter(&pods.server, None, bench);
    command
        .arg("upstream")
        .arg("--listen")
        .arg(SocketAddr::from((Ipv4Addr::UNSPECIFIED, UPSTREAM_PORT)).to_string())
        .arg("--body-bytes")
        .arg(body_bytes.to_string());
    let child = spawn(running.dir(), "upstream.log", &mut command)?;
    running.add_helper(child);
    Ok(running)
}

/// Starts the capture run's topologies in the two pods.
pub struct CaptureStage {
    /// The tandem-proxy binary.
    pub tandem: PathBuf,
    /// The pods.
    pub pods: PodPaths,
}

impl Stage for CaptureStage {
    fn missing(&self, topology: Topology) -> Option<String> {
        (!Topology::CAPTURE.contains(&topology)).then(|| "not part of the capture run".to_string())
    }

    fn start(&self, topology: Topology) -> Result<Running, TopologyError> {
        match topology {
            Topology::DirectNetns => {
                self.ensure_no_capture()?;
                Running::new(upstream_addr(), upstream_addr().to_string())
            }
            Topology::TandemNetns => {
                self.ensure_no_capture()?;
                // No iptables: the client sidecar finds the service from the Host header, the
                // server sidecar's inbound sends to 127.0.0.1:<that port>, so the service port
                // is the upstream's.
                let service = SocketAddr::from((CLUSTER_IP, UPSTREAM_PORT));
                let server_inbound =
                    SocketAddr::from((SERVER_IP, tandem_crds::names::INBOUND_PORT));
                let client = Ports::standard();
                let config = tandem::client_config(service, server_inbound, true)?;
                let mut running = self.sidecars(&config)?;
                running.http1 = SocketAddr::from((Ipv4Addr::LOCALHOST, client.outbound.port()));
                running.h2c = running.http1;
                running.authority = service.to_string();
                Ok(running)
            }
            Topology::TandemCaptured => {
                // The init container runs before the sidecar starts; the rules go when the
                // topology stops, after the sidecars are killed (or if they fail to start).
                let rules = CaptureRules::apply(&self.tandem, &self.pods)?;
                let mut running = self.sidecars(&captured_client_config()?)?;
                running.on_stop(move || drop(rules));
                // The app knows only the service: it connects to the cluster IP and names it
                // in the Host header, like any HTTP client given `http://10.96.77.77/`.
                running.http1 = SocketAddr::from((CLUSTER_IP, SERVICE_PORT));
                running.h2c = SocketAddr::from((CLUSTER_IP, SERVICE_PORT_H2C));
                running.authority = CLUSTER_IP.to_string();
                Ok(running)
            }
            other => Err(TopologyError::Unavailable(format!(
                "{} is not part of the capture run",
                other.name()
            ))),
        }
    }
}

impl CaptureStage {
    /// Both sidecars as UID 2102 on their standard ports: the server pod's with no services,
    /// the client pod's with `client_config`. Clients connect to the client sidecar's
    /// outbound port.
    fn sidecars(&self, client_config: &str) -> Result<Running, TopologyError> {
        let ports = Ports::standard();
        let mut running = Running::new(ports.outbound, String::new())?;
        let dir = running.dir().to_path_buf();
        let uid = Some(tandem_crds::names::PROXY_UID);
        let server = tandem_child_with(
            &dir,
            netns::nsenter(&self.pods.server, uid, &self.tandem),
            "server-sidecar",
            &ports,
            &tandem::server_config()?,
        )?;
        running.add_proxy(server);
        let client = tandem_child_with(
            &dir,
            netns::nsenter(&self.pods.client, uid, &self.tandem),
            "client-sidecar",
            &ports,
            client_config,
        )?;
        running.add_proxy(client);
        running.probes = vec![
            tandem::outbound_probe(Some(self.pods.client.clone()), ports.admin),
            tandem::inbound_probe(Some(self.pods.server.clone()), ports.admin),
        ];
        Ok(running)
    }

    fn ensure_no_capture(&self) -> Result<(), TopologyError> {
        for path in [&self.pods.client, &self.pods.server] {
            if let Some(backend) = capture_backend(path) {
                return Err(TopologyError::Unavailable(format!(
                    "capture rules ({backend}) are still in {}: this topology would be captured",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// The client sidecar's config in the captured topology: the service at the cluster IP, HTTP/1.1
/// on :80 and h2c on :81, both sent to the upstream in the server pod (a meshed endpoint).
pub fn captured_client_config() -> Result<String, tandem::ConfigError> {
    tandem::service_config(
        IpAddr::V4(CLUSTER_IP),
        &[
            ("http", SERVICE_PORT, ContractProtocol::Http),
            ("h2c", SERVICE_PORT_H2C, ContractProtocol::Http2),
        ],
        upstream_addr(),
        true,
    )
}

/// The capture rules of both pods, removed on drop.
struct CaptureRules {
    pods: PodPaths,
}

impl CaptureRules {
    /// `tandem-proxy init` in both pods.
    fn apply(tandem: &Path, pods: &PodPaths) -> Result<Self, TopologyError> {
        let rules = Self { pods: pods.clone() };
        for path in [&pods.client, &pods.server] {
            init_capture(tandem, path)?;
        }
        Ok(rules)
    }
}

impl Drop for CaptureRules {
    fn drop(&mut self) {
        for path in [&self.pods.client, &self.pods.server] {
            // The next topology checks the rules are gone and fails loudly if not.
            if let Err(e) = remove_capture(path) {
                eprintln!("capture rules in {}: {e}", path.display());
            }
        }
    }
}

/// Runs `tandem-proxy init` inside the namespace at `path`, as the tandem-init container
/// does in a pod.
fn init_capture(tandem: &Path, path: &Path) -> Result<(), TopologyError> {
    let out = netns::nsenter(path, None, tandem)
        .arg("init")
        .output()
        .map_err(|source| TopologyError::Io {
            what: "run tandem-proxy init".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TopologyError::Unavailable(format!(
            "tandem-proxy init in {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The iptables backends, in the order `tandem-proxy init` tries them.
const BACKENDS: [&str; 2] = ["nft", "legacy"];

/// Whether an `iptables-save` dump holds the capture chains.
pub fn has_capture_chains(dump: &str) -> bool {
    dump.lines().any(|line| {
        line.strip_prefix(':')
            .or_else(|| line.strip_prefix("-A "))
            .is_some_and(|rest| rest.starts_with(CAPTURE_CHAIN_PREFIX))
            || line.contains(&format!("-j {CAPTURE_CHAIN_PREFIX}"))
    })
}

fn in_ns(path: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = netns::nsenter(path, None, Path::new(program))
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The backend whose tables hold capture rules in the namespace at `path`, if any.
fn capture_backend(path: &Path) -> Option<&'static str> {
    BACKENDS.into_iter().find(|backend| {
        // Without `-t`, a save dumps the tables that exist and loads no kernel module.
        in_ns(path, &format!("iptables-{backend}-save"), &[])
            .is_ok_and(|dump| has_capture_chains(&dump))
    })
}

/// Removes the capture rules from the namespace at `path` (its nat table holds nothing else:
/// the benchmark made it) and checks they are gone.
fn remove_capture(path: &Path) -> Result<(), String> {
    while let Some(backend) = capture_backend(path) {
        let tool = format!("iptables-{backend}");
        in_ns(path, &tool, &["-t", "nat", "-F"])?;
        in_ns(path, &tool, &["-t", "nat", "-X"])?;
        if capture_backend(path) == Some(backend) {
            return Err(format!("{tool} could not remove the capture rules"));
        }
    }
    Ok(())
}

/// Runs `plan` in the pods on a thread inside the client pod (the upstream must be started):
/// waits for the upstream, then measures. Blocks until done.
pub fn measure(plan: Plan, stage: CaptureStage) -> Result<RunResult, CaptureError> {
    let client = stage.pods.client.clone();
    netns::in_netns(&client, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CaptureError::Runtime)?;
        runtime.block_on(async {
            let probe = Target {
                addr: upstream_addr(),
                authority: upstream_addr().to_string(),
                protocol: Protocol::Http1,
            };
            loadgen::wait_ready(&probe, Duration::from_secs(15))
                .await
                .map_err(CaptureError::UpstreamNotReady)?;
            Ok(run::run_on(&plan, &stage).await?)
        })
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capture_chains_are_recognised_in_a_save_dump() {
        let with = "*nat\n:PREROUTING ACCEPT [0:0]\n:TANDEM_INBOUND - [0:0]\n\
                    -A PREROUTING -p tcp -j TANDEM_INBOUND\nCOMMIT\n";
        assert!(has_capture_chains(with));
        let without = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert!(!has_capture_chains(without));
        assert!(!has_capture_chains(""));
    }

    #[test]
    fn the_captured_client_config_declares_http1_and_h2c_ports_to_the_server_pod() {
        use tandem_crds::contract::ProxyConfig;
        let config = ProxyConfig::from_json(captured_client_config().unwrap().as_bytes()).unwrap();
        let service = &config.services[0];
        assert_eq!(service.cluster_ips, [IpAddr::V4(CLUSTER_IP)]);
        let ports: Vec<_> = service
            .ports
            .iter()
            .map(|p| {
                (
                    p.port,
                    p.protocol,
                    p.endpoints[0].address,
                    p.endpoints[0].meshed,
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (80, ContractProtocol::Http, upstream_addr(), true),
                (81, ContractProtocol::Http2, upstream_addr(), true)
            ]
        );
    }

    #[test]
    fn the_stage_starts_only_the_capture_topologies() {
        let stage = CaptureStage {
            tandem: PathBuf::from("/nonexistent/tandem-proxy"),
            pods: PodPaths {
                client: PathBuf::from("/run/netns/none-c"),
                server: PathBuf::from("/run/netns/none-s"),
            },
        };
        for topology in Topology::CAPTURE {
            assert_eq!(stage.missing(topology), None);
        }
        assert!(stage.missing(Topology::Nginx).is_some());
        assert!(stage.start(Topology::TandemOneHop).is_err());
    }
}
