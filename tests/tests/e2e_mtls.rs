//! Mutual TLS between sidecars, end to end, on one local cluster with Tandem installed as a
//! user installs it, its operator issuing one-minute certificates (`TANDEM_CERT_TTL=1m`, the
//! shortest it allows) so that renewals happen within the test:
//!
//! - a: two meshed pods talk over mTLS, and a packet capture on the server pod's veth proves
//!   it: the request paths' marker is not on the wire, TLS records are; an unmeshed client's
//!   marker, sent to the permissive server, is on the wire in plaintext;
//! - b: the server's ServiceAccount turned `strict`: the unmeshed client is refused and
//!   counted, the meshed client still gets every answer, and the server stays Ready (its
//!   plaintext readiness probe is let through);
//! - c: both proxies renew their certificates at least twice while requests flow, and none
//!   fails;
//! - d: with the operator (and its signer) stopped, traffic between the meshed pods goes on;
//!   once it is back, both proxies renew again.
//!
//! Every burst of requests is bounded in count and sent from inside a pod
//! (`tandem-testapp client`, `GET /burst?n=N`); every wait is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tandem_crds::contract::{MtlsMode, ProxyConfig};
use tandem_crds::identity::{DEFAULT_TRUST_DOMAIN, MTLS_MODE_ANNOTATION, SpiffeId};
use tandem_tests::install::InstallOptions;

use e2e_support::{ClientStats, Mesh, SERIAL, counter, eventually, pod_ip, repo};

/// How long the operator and the proxies may take to carry a change: generous, because the
/// machine is shared; the time it took is reported, never asserted more tightly.
const PROPAGATION: Duration = Duration::from_secs(60);

/// The namespace of the meshed pods.
const NS: &str = "secure";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn meshed_pods_talk_only_mutual_tls_on_the_wire_through_strict_mode_renewals_and_an_operator_outage()
 {
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start_with(InstallOptions {
        operator_env: vec![("TANDEM_CERT_TTL".into(), "1m".into())],
    })
    .await
    .expect("cluster, Tandem and node start");
    let started = Instant::now();
    mesh.apply_file(&repo().join("tests/fixtures/e2e/mtls.yaml"))
        .await
        .expect("the mTLS workloads apply");
    let ready = |ns: &'static str, selector: &'static str| {
        let mesh = &mesh;
        async move {
            mesh.ready_pods(ns, selector, 1, Duration::from_secs(90))
                .await
                .unwrap()
                .remove(0)
        }
    };
    let server = ready(NS, "app=server").await;
    let client = ready(NS, "app=client").await;
    let outsider = ready("outside", "app=outsider").await;
    eprintln!(
        "setup: server, client and outsider Ready {:.1} s after the apply",
        started.elapsed().as_secs_f64()
    );
    let pods = Pods {
        server,
        client,
        outsider,
    };

    scenario_a(&mesh, &pods).await;
    scenario_b(&mesh, &pods).await;
    scenario_c(&mesh, &pods).await;
    scenario_d(&mut mesh, &pods).await;
    eprintln!(
        "all scenarios a-d: {:.0} s from the apply",
        started.elapsed().as_secs_f64()
    );
    mesh.node.shutdown().await;
}

/// The three pods every scenario uses.
struct Pods {
    server: Pod,
    client: Pod,
    outsider: Pod,
}

/// The SPIFFE ID of a ServiceAccount of the meshed namespace.
fn spiffe_id(service_account: &str) -> String {
    SpiffeId::new(DEFAULT_TRUST_DOMAIN, NS, service_account).uri()
}

/// `http://<server's cluster IP>/<path>`.
async fn server_url(mesh: &Mesh, path: &str) -> String {
    format!(
        "http://{}/{path}",
        mesh.cluster_ip(NS, "server").await.unwrap()
    )
}

/// A marker no other bytes of the test contain: `<prefix>-<16 hex digits>`.
fn marker(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{:016x}",
        (nanos as u64) ^ (u64::from(std::process::id()) << 40)
    )
}

/// Scenario a: mTLS between the meshed pods, proven on the wire; the unmeshed client's
/// plaintext is visible on the same wire.
async fn scenario_a(mesh: &Mesh, pods: &Pods) {
    let server_id = spiffe_id("server");
    let server_addr = std::net::SocketAddr::from((pod_ip(&pods.server).unwrap(), 8080));

    // The server's proxy holds the server's identity; the client's proxy has loaded a config
    // that names it for the server's endpoint (the policy governs the Service).
    let (identity, took) = eventually(
        "the server's proxy has a certificate",
        PROPAGATION,
        || async {
            let identity = mesh.proxy_admin_config(&pods.server).await?["identity"].clone();
            Ok(identity["serial"].is_string().then_some(identity))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    assert_eq!(identity["spiffeId"], json!(server_id), "{identity}");
    eprintln!(
        "scenario a: server's proxy identity {} serial {} notAfter {} (after {:.1} s)",
        identity["spiffeId"],
        identity["serial"],
        identity["notAfter"],
        took.as_secs_f64()
    );
    let (_, took) = eventually(
        "the client's proxy names the server endpoint's identity",
        PROPAGATION,
        || async {
            let loaded = mesh.proxy_loaded(&pods.client).await?;
            Ok(loaded
                .filter(|c| endpoint_identity(c, server_addr).as_deref() == Some(&server_id))
                .map(|_| ()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    eprintln!(
        "scenario a: the client's proxy config names {server_addr} as {server_id} ({:.1} s)",
        took.as_secs_f64()
    );
    let client_identity = mesh.proxy_admin_config(&pods.client).await.unwrap()["identity"].clone();
    assert_eq!(
        client_identity["spiffeId"],
        json!(spiffe_id("client")),
        "{client_identity}"
    );

    let server_before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let client_before = mesh.proxy_metrics(&pods.client).await.unwrap();

    // The meshed client's requests, captured on the server pod's veth.
    let secret = marker("mtls-marker");
    let target = server_url(mesh, &secret).await;
    let capture = Capture::start(mesh, &pods.server);
    let meshed = mesh.burst(&pods.client, &target, 200, 4, None).await;
    let wire = capture.finish();
    let meshed = meshed.unwrap();
    assert_eq!(meshed.total, 200);
    assert_eq!(meshed.ok, meshed.total, "{meshed:?}");
    assert_eq!(meshed.share("secure-server"), 1.0, "{meshed:?}");
    assert_eq!(
        wire.count(secret.as_bytes()),
        0,
        "the meshed request paths are not on the wire ({})",
        wire.describe()
    );
    let records = wire.tls_records();
    assert!(
        records.client_hellos >= 1 && records.application_data >= 1,
        "TLS ClientHellos and application-data records on the wire: {records:?} ({})",
        wire.describe()
    );

    let server_metrics = mesh.proxy_metrics(&pods.server).await.unwrap();
    let client_metrics = mesh.proxy_metrics(&pods.client).await.unwrap();
    let handshakes = |m: &str, direction: &str| {
        counter(
            m,
            "tandem_tls_handshakes_total",
            &[("direction", direction), ("result", "success")],
        )
    };
    let inbound = handshakes(&server_metrics, "inbound") - handshakes(&server_before, "inbound");
    let outbound = handshakes(&client_metrics, "outbound") - handshakes(&client_before, "outbound");
    assert!(
        inbound >= 1.0,
        "the server's proxy terminated mTLS:\n{server_metrics}"
    );
    assert!(
        outbound >= 1.0,
        "the client's proxy originated mTLS:\n{client_metrics}"
    );
    let client_id = spiffe_id("client");
    let peers = counter(
        &server_metrics,
        "tandem_tls_peer_connections_total",
        &[("direction", "inbound"), ("peer_identity", &client_id)],
    );
    assert!(
        peers >= 1.0,
        "the server's proxy saw the client's identity:\n{server_metrics}"
    );
    eprintln!(
        "scenario a: meshed {}; on the wire: {}, marker {secret:?} 0 times, {records:?}; handshakes: {inbound} inbound (server), {outbound} outbound (client); {peers} inbound connections from {client_id} in all",
        describe(&meshed),
        wire.describe()
    );

    // The unmeshed client, to the permissive server: plaintext, which the capture can read.
    let plain = marker("plain-marker");
    let target = server_url(mesh, &plain).await;
    let capture = Capture::start(mesh, &pods.server);
    let unmeshed = mesh.burst(&pods.outsider, &target, 50, 1, None).await;
    let wire = capture.finish();
    let unmeshed = unmeshed.unwrap();
    assert_eq!(unmeshed.ok, unmeshed.total, "permissive: {unmeshed:?}");
    let seen = wire.count(plain.as_bytes());
    assert!(
        seen >= 1,
        "the unmeshed client's request paths are on the wire ({})",
        wire.describe()
    );
    eprintln!(
        "scenario a: unmeshed {}; on the wire: {}, marker {plain:?} {seen} times",
        describe(&unmeshed),
        wire.describe()
    );
}

/// The identity the config names for the endpoint `address`, if any.
fn endpoint_identity(config: &ProxyConfig, address: std::net::SocketAddr) -> Option<String> {
    config
        .services
        .iter()
        .filter(|s| s.namespace == NS && s.name == "server")
        .flat_map(|s| &s.ports)
        .flat_map(|p| &p.endpoints)
        .find(|e| e.address == address)
        .and_then(|e| e.identity.clone())
}

/// Scenario b: strict on the server's ServiceAccount.
async fn scenario_b(mesh: &Mesh, pods: &Pods) {
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.client(), NS);
    let annotated = Instant::now();
    accounts
        .patch(
            "server",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {MTLS_MODE_ANNOTATION: "strict"}}})),
        )
        .await
        .unwrap();
    eventually("the server's proxy loaded strict", PROPAGATION, || async {
        Ok(mesh
            .proxy_loaded(&pods.server)
            .await?
            .filter(|c| c.workload.mtls == MtlsMode::Strict))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    let strict_after = annotated.elapsed();
    let client_mode = mesh.proxy_loaded(&pods.client).await.unwrap().unwrap();
    assert_eq!(
        client_mode.workload.mtls,
        MtlsMode::Permissive,
        "only the server's ServiceAccount is strict"
    );

    let refused = |m: &str| {
        counter(
            m,
            "tandem_inbound_connections_refused_total",
            &[("reason", "plaintext")],
        )
    };
    let before = refused(&mesh.proxy_metrics(&pods.server).await.unwrap());
    let target = server_url(mesh, &marker("strict")).await;
    let unmeshed = mesh
        .burst(&pods.outsider, &target, 20, 1, None)
        .await
        .unwrap();
    assert_eq!(unmeshed.total, 20);
    assert_eq!(
        unmeshed.ok, 0,
        "strict refuses the unmeshed client: {unmeshed:?}"
    );
    let after_metrics = mesh.proxy_metrics(&pods.server).await.unwrap();
    let counted = refused(&after_metrics) - before;
    assert!(
        counted >= 1.0,
        "the refusals are counted as plaintext:\n{after_metrics}"
    );

    let meshed = mesh
        .burst(&pods.client, &target, 500, 4, None)
        .await
        .unwrap();
    assert_eq!(meshed.total, 500);
    assert_eq!(meshed.ok, meshed.total, "strict serves mTLS: {meshed:?}");

    // The readiness probe (plaintext httpGet /healthz on 8080, from the node) still passes: the
    // pod stays Ready, and the node's own plaintext GET of that path is answered while another
    // path is refused.
    let health = mesh.get(&pods.server, 8080, "/healthz").await;
    assert_eq!(
        health.as_deref().map(str::trim).ok(),
        Some("ok"),
        "the probe path is let through: {health:?}"
    );
    let other = mesh.get(&pods.server, 8080, "/not-a-probe").await;
    assert!(other.is_err(), "another path is refused: {other:?}");
    let name = pods.server.metadata.name.clone().unwrap();
    let pod = Api::<Pod>::namespaced(mesh.client(), NS)
        .get(&name)
        .await
        .unwrap();
    assert!(
        e2e_support::is_ready(&pod),
        "the strict server stays Ready: {:?}",
        pod.status
    );
    eprintln!(
        "scenario b: strict loaded by the server's proxy {:.2} s after the annotation; unmeshed {} ({counted} plaintext refusals counted); meshed {}; the server Ready throughout ({:.0} s strict), /healthz answered in plaintext, /not-a-probe refused ({})",
        strict_after.as_secs_f64(),
        describe(&unmeshed),
        describe(&meshed),
        annotated.elapsed().as_secs_f64(),
        other.err().map(|e| e.to_string()).unwrap_or_default()
    );
}

/// One proxy's identity as `/config` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Cert {
    serial: String,
    not_after: String,
}

async fn cert(mesh: &Mesh, pod: &Pod) -> anyhow::Result<Cert> {
    let identity = mesh.proxy_admin_config(pod).await?["identity"].clone();
    let text = |k: &str| identity[k].as_str().unwrap_or_default().to_owned();
    Ok(Cert {
        serial: text("serial"),
        not_after: text("notAfter"),
    })
}

fn renewals(metrics: &str, result: &str) -> f64 {
    counter(
        metrics,
        "tandem_identity_renewals_total",
        &[("result", result)],
    )
}

/// Handshakes by result, for one direction.
fn handshake_results(metrics: &str, direction: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("tandem_tls_handshakes_total{"))
        .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
    {
        let Some(result) = line
            .split("result=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(result.to_owned()).or_default() += value;
    }
    out
}

fn difference(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// Runs bounded, paced bursts (100 requests at 20/s, 2 at once) from the meshed client until
/// `done` is set; returns what they observed, summed.
async fn load_until(mesh: &Mesh, client: &Pod, target: &str, done: &AtomicBool) -> Load {
    let mut load = Load::default();
    while !done.load(Ordering::Relaxed) {
        let stats = mesh.burst(client, target, 100, 2, Some(20)).await.unwrap();
        load.add(&stats);
    }
    load
}

/// Requests summed over bursts.
#[derive(Debug, Default)]
struct Load {
    bursts: u64,
    total: u64,
    ok: u64,
    by_status: BTreeMap<String, u64>,
    seconds: f64,
    p99_ms: f64,
}

impl Load {
    fn add(&mut self, stats: &ClientStats) {
        self.bursts += 1;
        self.total += stats.total;
        self.ok += stats.ok;
        for (k, v) in &stats.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        self.seconds += stats.seconds;
        self.p99_ms = self.p99_ms.max(stats.p99_ms);
    }

    fn describe(&self) -> String {
        format!(
            "{} requests in {} bursts over {:.0} s, {} ok, by status {:?}, worst burst p99 {:.1} ms",
            self.total, self.bursts, self.seconds, self.ok, self.by_status, self.p99_ms
        )
    }
}

/// Scenario c: both proxies renew at least twice under continuous load; nothing fails.
async fn scenario_c(mesh: &Mesh, pods: &Pods) {
    // A one-minute certificate is renewed at 70 %, every 42 s: two renewals of both within
    // about 130 s; 240 s bounds the wait on a loaded machine.
    const RENEWALS: usize = 2;
    let target = server_url(mesh, "rotation").await;
    let proxies = [("server", &pods.server), ("client", &pods.client)];
    let mut metrics_before = Vec::new();
    for (_, pod) in proxies {
        metrics_before.push(mesh.proxy_metrics(pod).await.unwrap());
    }
    let done = AtomicBool::new(false);
    let began = Instant::now();
    let watch = async {
        let mut seen: Vec<Vec<Cert>> = vec![Vec::new(); proxies.len()];
        let deadline = Instant::now() + Duration::from_secs(240);
        let result = loop {
            for (i, (_, pod)) in proxies.iter().enumerate() {
                if let Ok(cert) = cert(mesh, pod).await
                    && !cert.serial.is_empty()
                    && seen[i].last() != Some(&cert)
                {
                    seen[i].push(cert);
                }
            }
            if seen.iter().all(|s| s.len() > RENEWALS) {
                break Ok(began.elapsed());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "{RENEWALS} renewals of both proxies not seen: {seen:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        done.store(true, Ordering::Relaxed);
        (result, seen)
    };
    let (load, (renewed, seen)) =
        tokio::join!(load_until(mesh, &pods.client, &target, &done), watch);
    let renewed = renewed.unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
    assert!(load.total > 0);
    assert_eq!(
        load.ok,
        load.total,
        "no request failed across the renewals: {}",
        load.describe()
    );
    let mut report = Vec::new();
    for (i, (name, pod)) in proxies.iter().enumerate() {
        let after = mesh.proxy_metrics(pod).await.unwrap();
        let ok = renewals(&after, "ok") - renewals(&metrics_before[i], "ok");
        let errors = renewals(&after, "error") - renewals(&metrics_before[i], "error");
        assert!(
            ok >= RENEWALS as f64,
            "{name}'s proxy counted {ok} renewals:\n{after}"
        );
        let direction = if *name == "server" {
            "inbound"
        } else {
            "outbound"
        };
        let handshakes = difference(
            &handshake_results(&after, direction),
            &handshake_results(&metrics_before[i], direction),
        );
        report.push(format!(
            "{name}: serials {:?}, {ok} renewals ok, {errors} errors, {direction} handshakes {handshakes:?}",
            seen[i].iter().map(|c| c.serial.as_str()).collect::<Vec<_>>()
        ));
    }
    eprintln!(
        "scenario c: {RENEWALS} renewals of both proxies within {:.0} s; load: {}; {}",
        renewed.as_secs_f64(),
        load.describe(),
        report.join("; ")
    );
}

/// Scenario d: the operator down for a bounded time; traffic between the meshed pods goes on,
/// and once the operator is back both proxies renew again.
async fn scenario_d(mesh: &mut Mesh, pods: &Pods) {
    // Stopped 15 s: a proxy renews at 42 s of its 60 s certificate, so whatever the phase the
    // certificate it holds outlives the outage (a longer one, with one-minute certificates,
    // would let them expire: that is what the TTL is for).
    const DOWN: Duration = Duration::from_secs(15);
    let target = server_url(mesh, "operator-down").await;
    let before: Vec<String> = {
        let mut v = Vec::new();
        for pod in [&pods.server, &pods.client] {
            v.push(mesh.proxy_metrics(pod).await.unwrap());
        }
        v
    };
    let stopping = Instant::now();
    mesh.tandem.stop_operator();
    let stopped_in = stopping.elapsed();
    let down = mesh
        .burst(
            &pods.client,
            &target,
            u64::try_from(DOWN.as_secs()).unwrap() * 20,
            2,
            Some(20),
        )
        .await
        .unwrap();
    let mut during = Vec::new();
    for pod in [&pods.server, &pods.client] {
        during.push(mesh.proxy_metrics(pod).await.unwrap());
    }
    let restarting = Instant::now();
    let Mesh {
        tandem, cluster, ..
    } = &mut *mesh;
    tandem.start_operator(cluster).await.unwrap();
    let restarted_in = restarting.elapsed();
    assert_eq!(
        down.ok, down.total,
        "with the operator down, no request failed: {down:?}"
    );
    let failed_renewals: Vec<f64> = during
        .iter()
        .zip(&before)
        .map(|(d, b)| renewals(d, "error") - renewals(b, "error"))
        .collect();

    // Both proxies renew with the operator back, while traffic goes on.
    let done = AtomicBool::new(false);
    let back = Instant::now();
    let mesh = &*mesh;
    let watch = async {
        let result = eventually(
            "both proxies renewed after the operator came back",
            Duration::from_secs(120),
            || async {
                let mut all = true;
                for (i, pod) in [&pods.server, &pods.client].into_iter().enumerate() {
                    let now = mesh.proxy_metrics(pod).await?;
                    all &= renewals(&now, "ok") > renewals(&during[i], "ok");
                }
                Ok(all.then_some(()))
            },
        )
        .await;
        done.store(true, Ordering::Relaxed);
        result
    };
    let (load, renewed) = tokio::join!(load_until(mesh, &pods.client, &target, &done), watch);
    renewed.unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    assert_eq!(
        load.ok,
        load.total,
        "no request failed after the restart: {}",
        load.describe()
    );
    eprintln!(
        "scenario d: operator stopped in {:.1} s, down {:.1} s (with its start); while down {} (renewals failed meanwhile: server {}, client {}); started again in {:.1} s; both proxies renewed {:.1} s after; meanwhile {}",
        stopped_in.as_secs_f64(),
        (stopped_in + down_seconds(&down) + restarted_in).as_secs_f64(),
        describe(&down),
        failed_renewals[0],
        failed_renewals[1],
        restarted_in.as_secs_f64(),
        back.elapsed().as_secs_f64(),
        load.describe()
    );
}

fn down_seconds(stats: &ClientStats) -> Duration {
    Duration::from_secs_f64(stats.seconds.max(0.0))
}

fn describe(stats: &ClientStats) -> String {
    format!(
        "{} requests in {:.1} s, {} ok, by status {:?}, p50 {:.1} ms, p99 {:.1} ms",
        stats.total, stats.seconds, stats.ok, stats.by_status, stats.p50_ms, stats.p99_ms
    )
}

/// `tcpdump` writing what crosses a pod's host-side veth (in the node's namespace) to a pcap.
struct Capture {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
    stderr: std::sync::mpsc::Receiver<String>,
    started: Instant,
}

impl Capture {
    /// Starts capturing every TCP packet, whole, on `pod`'s veth; returns once tcpdump says it
    /// is listening (at most 10 s).
    fn start(mesh: &Mesh, pod: &Pod) -> Self {
        let node_ns = mesh
            .node
            .netns()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let veth = tandem_tests::node::pod::host_veth(pod);
        let dir = tempfile::Builder::new()
            .prefix("tandem-capture-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("capture.pcap");
        // --immediate-mode: packets handed over as they come, not when the kernel's buffer
        // fills or times out (a short burst would otherwise still be there at SIGINT and never
        // be written); -U: each packet written as it comes; -s 0: whole packets; -Z root: keep
        // writing as root (tcpdump otherwise drops to its own user, which may not write here).
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node_ns,
                "tcpdump",
                "-i",
                &veth,
                "-n",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
            ])
            .args(["-Z", "root", "-w"])
            .arg(&path)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts (make e2e-tools installs it)");
        let (tx, stderr) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stderr.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("tcpdump on {veth} in {node_ns} did not start listening: {said:?}");
                }
            }
        }
        Self {
            child,
            path,
            _dir: dir,
            stderr,
            started: Instant::now(),
        }
    }

    /// Stops tcpdump (SIGINT, then waits for it to exit, at most 10 s) and reads the capture.
    fn finish(mut self) -> Wire {
        // The last packets of the traffic may still be on their way to tcpdump.
        std::thread::sleep(Duration::from_millis(500));
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tcpdump did not exit within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let seconds = self.started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(50));
        let summary: Vec<String> = self.stderr.try_iter().collect();
        let bytes = std::fs::read(&self.path).unwrap();
        assert!(
            status.success() || status.code().is_none(),
            "tcpdump failed ({status}): {summary:?}"
        );
        Wire {
            bytes,
            summary: summary.join("; "),
            seconds,
        }
    }
}

/// A finished capture.
struct Wire {
    bytes: Vec<u8>,
    summary: String,
    seconds: f64,
}

/// TLS records seen in a capture: a record header (type, version 0x0301..0x0303, length),
/// for handshakes only those that open a ClientHello (handshake type 1).
#[derive(Debug, Default)]
#[allow(dead_code)] // read through Debug in the reports
struct Records {
    client_hellos: usize,
    application_data: usize,
}

impl Wire {
    /// How often `needle` occurs in the capture's bytes.
    fn count(&self, needle: &[u8]) -> usize {
        self.bytes
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    fn tls_records(&self) -> Records {
        let header =
            |w: &[u8], kind: u8| w[0] == kind && w[1] == 0x03 && (0x01..=0x03).contains(&w[2]);
        Records {
            client_hellos: self
                .bytes
                .windows(6)
                .filter(|w| header(w, 0x16) && w[5] == 0x01)
                .count(),
            application_data: self.bytes.windows(3).filter(|w| header(w, 0x17)).count(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} bytes captured in {:.1} s ({})",
            self.bytes.len(),
            self.seconds,
            self.summary
        )
    }
}
