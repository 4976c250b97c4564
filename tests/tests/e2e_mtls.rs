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
//! - d: with the operator (and its signer) stopped across a renewal, the renewal fails and
//!   traffic between the meshed pods goes on; once it is back, both proxies renew again;
//! - e: the trust anchor rotated with an overlap (new root beside the old, then the issuer
//!   switched, then the old root dropped) under continuous load: nothing fails.
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
async fn meshed_pods_talk_only_mutual_tls_on_the_wire_through_strict_mode_renewals_an_operator_outage_and_a_root_rotation()
 {
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start_with(InstallOptions {
        operator_env: vec![("TANDEM_CERT_TTL".into(), "1m".into())],
        ..InstallOptions::default()
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
    scenario_e(&mesh, &pods).await;
    eprintln!(
        "all scenarios a-e: {:.0} s from the apply",
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
    // Through a Service no policy governs: rendered for its meshed endpoints, so mTLS too.
    let direct = format!(
        "http://{}/{}",
        mesh.cluster_ip(NS, "server-direct").await.unwrap(),
        marker("direct")
    );
    let ungoverned = mesh
        .burst(&pods.client, &direct, 100, 2, None)
        .await
        .unwrap();
    assert_eq!(ungoverned.total, 100);
    assert_eq!(
        ungoverned.ok, ungoverned.total,
        "an ungoverned Service of a strict workload is reached over mTLS: {ungoverned:?}"
    );

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

/// Runs bounded, paced bursts (`n` requests at 20/s, 2 at once) from the meshed client until
/// `done` is set; returns what they observed, summed.
async fn load_until(mesh: &Mesh, client: &Pod, target: &str, n: u64, done: &AtomicBool) -> Load {
    let mut load = Load::default();
    while !done.load(Ordering::Relaxed) {
        let stats = mesh.burst(client, target, n, 2, Some(20)).await.unwrap();
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
        tokio::join!(load_until(mesh, &pods.client, &target, 100, &done), watch);
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

/// Scenario d: the operator (and its signer) down across a proxy's renewal: the renewal fails
/// and is retried, traffic between the meshed pods goes on, and once the operator is back both
/// proxies renew.
async fn scenario_d(mesh: &mut Mesh, pods: &Pods) {
    // A one-minute certificate is renewed at 39-45 s, so 15-21 s of it remain when the renewal
    // first fails; the outage ends 5 s after that failure, and the retries (1, 2, 4, 8 s apart)
    // reach the restarted signer well before the certificate expires.
    const AFTER_FAILURE: Duration = Duration::from_secs(5);
    let target = server_url(mesh, "operator-down").await;
    let proxies = [&pods.server, &pods.client];
    // Stop the operator a few seconds before the earlier of the two proxies' renewals.
    let (lead, _) = eventually(
        "a proxy's renewal due in 2-6 s",
        Duration::from_secs(60),
        || async {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs_f64();
            let mut next = f64::MAX;
            for pod in proxies {
                let metrics = mesh.proxy_metrics(pod).await?;
                next = next.min(counter(
                    &metrics,
                    "tandem_identity_next_renewal_timestamp_seconds",
                    &[],
                ));
            }
            Ok((2.0..=6.0).contains(&(next - now)).then_some(next - now))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut before = Vec::new();
    for pod in proxies {
        before.push(mesh.proxy_metrics(pod).await.unwrap());
    }
    let stopping = Instant::now();
    mesh.tandem.stop_operator();
    let stopped_in = stopping.elapsed();

    let done = AtomicBool::new(false);
    let watch = async {
        let (failed, after) = eventually(
            "a renewal failed with the operator down",
            Duration::from_secs(30),
            || async {
                for (i, pod) in proxies.into_iter().enumerate() {
                    let now = mesh.proxy_metrics(pod).await?;
                    if renewals(&now, "error") > renewals(&before[i], "error") {
                        return Ok(Some(i));
                    }
                }
                Ok(None)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        tokio::time::sleep(AFTER_FAILURE).await;
        done.store(true, Ordering::Relaxed);
        (failed, after)
    };
    let (down, (first_failed, failed_after)) = {
        let mesh = &*mesh;
        tokio::join!(load_until(mesh, &pods.client, &target, 40, &done), watch)
    };
    let mut during = Vec::new();
    for pod in proxies {
        during.push(mesh.proxy_metrics(pod).await.unwrap());
    }
    let down_for = stopping.elapsed();
    let restarting = Instant::now();
    let Mesh {
        tandem, cluster, ..
    } = &mut *mesh;
    tandem.start_operator(cluster).await.unwrap();
    let restarted_in = restarting.elapsed();
    assert!(down.total > 0);
    assert_eq!(
        down.ok,
        down.total,
        "with the operator down, no request failed: {}",
        down.describe()
    );
    let failed_renewals: Vec<f64> = during
        .iter()
        .zip(&before)
        .map(|(d, b)| renewals(d, "error") - renewals(b, "error"))
        .collect();

    // Both proxies renew with the operator back, while traffic goes on.
    let done = AtomicBool::new(false);
    let mesh = &*mesh;
    let watch = async {
        let result = eventually(
            "both proxies renewed after the operator came back",
            Duration::from_secs(120),
            || async {
                let mut all = true;
                for (i, pod) in proxies.into_iter().enumerate() {
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
    let (load, renewed) = tokio::join!(load_until(mesh, &pods.client, &target, 40, &done), watch);
    let (_, renewed_after) = renewed.unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    assert_eq!(
        load.ok,
        load.total,
        "no request failed after the restart: {}",
        load.describe()
    );
    let name = pods.server.metadata.name.clone().unwrap();
    let pod = Api::<Pod>::namespaced(mesh.client(), NS)
        .get(&name)
        .await
        .unwrap();
    assert!(
        e2e_support::is_ready(&pod),
        "the strict server stayed Ready: {:?}",
        pod.status
    );
    eprintln!(
        "scenario d: operator stopped {lead:.1} s before a renewal was due (stopping took {:.1} s); {}'s renewal failed {:.1} s later; down {:.1} s in all, renewals failed meanwhile: server {}, client {}; while down {}; started again in {:.1} s; both proxies renewed {:.1} s after that; meanwhile {}",
        stopped_in.as_secs_f64(),
        ["server", "client"][first_failed],
        failed_after.as_secs_f64(),
        down_for.as_secs_f64(),
        failed_renewals[0],
        failed_renewals[1],
        down.describe(),
        restarted_in.as_secs_f64(),
        renewed_after.as_secs_f64(),
        load.describe()
    );
}

/// A root and an issuer under it, as a user (or cert-manager) would supply them: ECDSA P-256
/// CAs, the issuer constrained to sign leaves only.
struct Authority {
    root_pem: String,
    issuer_pem: String,
    key_pem: String,
    /// The issuer's expiry (Unix seconds): the operator's `tandem_identity_issuer_expiry_
    /// timestamp_seconds` shows it once the operator has loaded this issuer.
    issuer_not_after: i64,
}

fn new_authority() -> Authority {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let params = |cn: &str, constraint| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "tandem-e2e");
        name.push(DnType::CommonName, cn);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(constraint);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params
    };
    let mut root_params = params("tandem-e2e-root-2", BasicConstraints::Unconstrained);
    root_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let root = CertifiedIssuer::self_signed(root_params, KeyPair::generate().unwrap()).unwrap();
    let mut issuer_params = params("tandem-e2e-issuer-2", BasicConstraints::Constrained(0));
    let not_after = rcgen::date_time_ymd(2031, 6, 15);
    issuer_params.not_after = not_after;
    issuer_params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let issuer = issuer_params.signed_by(&key, &root).unwrap();
    Authority {
        root_pem: root.pem(),
        issuer_pem: issuer.pem(),
        key_pem: key.serialize_pem(),
        issuer_not_after: not_after.unix_timestamp(),
    }
}

/// `GET path` on a process on the machine's loopback (the operator's `/metrics`).
async fn host_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange).await??;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The trust roots' fingerprints a proxy has loaded.
async fn trust_roots(mesh: &Mesh, pod: &Pod) -> anyhow::Result<Vec<String>> {
    let identity = mesh.proxy_admin_config(pod).await?["identity"].clone();
    Ok(serde_json::from_value(identity["trustRoots"].clone())?)
}

/// Scenario e: the trust anchor rotated with an overlap, under continuous load: a new root
/// added beside the old one, then the issuer switched to one under the new root, then the old
/// root dropped. No request fails, and both proxies renew under the new root alone.
async fn scenario_e(mesh: &Mesh, pods: &Pods) {
    use k8s_openapi::api::core::v1::Secret;
    use tandem_crds::identity::{ISSUER_CERT_KEY, ISSUER_KEY_KEY, ISSUER_ROOTS_KEY, ISSUER_SECRET};
    let target = server_url(mesh, "rotate-roots").await;
    let proxies = [("server", &pods.server), ("client", &pods.client)];
    let secrets: Api<Secret> = Api::namespaced(mesh.client(), tandem_crds::names::SYSTEM_NAMESPACE);
    let secret = secrets.get(ISSUER_SECRET).await.unwrap();
    let data = secret.data.unwrap_or_default();
    let old_roots = String::from_utf8(data[ISSUER_ROOTS_KEY].0.clone()).unwrap();
    let old_fingerprints = trust_roots(mesh, &pods.server).await.unwrap();
    assert_eq!(old_fingerprints.len(), 1, "{old_fingerprints:?}");
    let new = new_authority();
    let both = format!("{}\n{}", old_roots.trim_end(), new.root_pem);
    let mut metrics_before = Vec::new();
    for (_, pod) in proxies {
        metrics_before.push(mesh.proxy_metrics(pod).await.unwrap());
    }
    let patch = |string_data: serde_json::Value| {
        let secrets = secrets.clone();
        async move {
            secrets
                .patch(
                    ISSUER_SECRET,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "stringData": string_data })),
                )
                .await
                .unwrap();
        }
    };

    let done = AtomicBool::new(false);
    let steps = async {
        let began = Instant::now();
        // 1. Both roots trusted.
        patch(json!({ ISSUER_ROOTS_KEY: both })).await;
        let (two, _) = eventually("both proxies trust two roots", PROPAGATION, || async {
            let mut all = Vec::new();
            for (_, pod) in proxies {
                let roots = trust_roots(mesh, pod).await?;
                if roots.len() != 2 || !roots.contains(&old_fingerprints[0]) {
                    return Ok(None);
                }
                all = roots;
            }
            Ok(Some(all))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
        let new_fingerprint = two
            .iter()
            .find(|f| **f != old_fingerprints[0])
            .unwrap()
            .clone();
        let trusted_both = began.elapsed();

        // 2. The issuer switched to the new root's; wait for the operator to load it, then for
        // a renewal of each proxy after that.
        patch(json!({ ISSUER_CERT_KEY: new.issuer_pem, ISSUER_KEY_KEY: new.key_pem })).await;
        let operator = mesh.tandem.operator_addr();
        eventually(
            "the operator loaded the new issuer",
            PROPAGATION,
            || async {
                let metrics = host_get(operator, "/metrics").await?;
                let expiry = counter(
                    &metrics,
                    "tandem_identity_issuer_expiry_timestamp_seconds",
                    &[],
                );
                Ok((expiry == new.issuer_not_after as f64).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
        let switched = began.elapsed();
        let mut at_switch = Vec::new();
        for (_, pod) in proxies {
            at_switch.push(renewals(&mesh.proxy_metrics(pod).await.unwrap(), "ok"));
        }
        let renewed_since = |marks: Vec<f64>, what: &'static str| async move {
            eventually(what, Duration::from_secs(120), || {
                let marks = marks.clone();
                async move {
                    for (i, (_, pod)) in proxies.iter().enumerate() {
                        let now = renewals(&mesh.proxy_metrics(pod).await?, "ok");
                        if now <= marks[i] {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
        };
        renewed_since(at_switch, "both proxies renewed under the new issuer").await;
        let renewed_new_issuer = began.elapsed();

        // 3. The old root dropped: only the new one is trusted, and both proxies renew again
        // (their signer, too, is verified under the new root alone).
        patch(json!({ ISSUER_ROOTS_KEY: new.root_pem })).await;
        eventually(
            "both proxies trust only the new root",
            PROPAGATION,
            || async {
                for (_, pod) in proxies {
                    if trust_roots(mesh, pod).await? != [new_fingerprint.clone()] {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
        let dropped_old = began.elapsed();
        let mut at_drop = Vec::new();
        for (_, pod) in proxies {
            at_drop.push(renewals(&mesh.proxy_metrics(pod).await.unwrap(), "ok"));
        }
        renewed_since(at_drop, "both proxies renewed under the new root alone").await;
        let renewed_new_root = began.elapsed();
        done.store(true, Ordering::Relaxed);
        (
            new_fingerprint,
            [
                trusted_both,
                switched,
                renewed_new_issuer,
                dropped_old,
                renewed_new_root,
            ],
        )
    };
    let (load, (new_fingerprint, times)) =
        tokio::join!(load_until(mesh, &pods.client, &target, 100, &done), steps);
    assert!(load.total > 0);
    assert_eq!(
        load.ok,
        load.total,
        "no request failed across the root rotation: {}",
        load.describe()
    );
    let mut report = Vec::new();
    for (i, (name, pod)) in proxies.iter().enumerate() {
        let after = mesh.proxy_metrics(pod).await.unwrap();
        let direction = if *name == "server" {
            "inbound"
        } else {
            "outbound"
        };
        report.push(format!(
            "{name}: {} renewals ok, {} errors, {direction} handshakes {:?}",
            renewals(&after, "ok") - renewals(&metrics_before[i], "ok"),
            renewals(&after, "error") - renewals(&metrics_before[i], "error"),
            difference(
                &handshake_results(&after, direction),
                &handshake_results(&metrics_before[i], direction)
            )
        ));
    }
    let [both_at, switched_at, issuer_at, dropped_at, root_at] = times.map(|t| t.as_secs_f64());
    eprintln!(
        "scenario e: root {} added to {}: both proxies trusted both at {both_at:.1} s; issuer switched (loaded by the operator) at {switched_at:.1} s; both renewed under it at {issuer_at:.1} s; old root dropped, both proxies trusting only the new one at {dropped_at:.1} s; both renewed again at {root_at:.1} s; load: {}; {}",
        &new_fingerprint[..16.min(new_fingerprint.len())],
        &old_fingerprints[0][..16.min(old_fingerprints[0].len())],
        load.describe(),
        report.join("; ")
    );
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
