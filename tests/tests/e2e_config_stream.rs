//! The config stream, end to end, on the local cluster with Tandem installed as a user installs
//! it. The node refreshes mounted ConfigMaps only every 60 s, as a real kubelet does on its pod
//! sync (`--sync-frequency`, 1 min by default; `NodeOptions::config_map_refresh`): whatever a
//! proxy learns sooner than that, it learned from the operator's stream, not from its file.
//!
//! - a: a pod deleted behind a Service stops receiving traffic once the client's proxy shows
//!   the new generation, no request fails meanwhile, and the client's ConfigMap is not written
//!   for the endpoint change (its proxy is watching); the delay is printed;
//! - b: the operator restarted while traffic flows: no request fails, the proxies watch the new
//!   operator, and the unchanged configs keep their versions;
//! - c: a workload calls a Service outside its view: the first request works at once (passed
//!   through), and the Service is then in its proxy's view (from the stream), in its ConfigMap
//!   and in the ConfigMap's `tandem.dev/learned` annotation;
//! - d: watch calls with another ServiceAccount's token, an unbound token, the apiserver's
//!   audience, garbage or none never get the workload's config;
//! - e: a pod's `tandem.dev/dependencies` annotation puts the Services it names (and whole
//!   namespaces) in its config before any call; a pod without it does not get them.
//!
//! Each scenario is its own test with its own cluster and only the pods it needs. Traffic is
//! bounded (20 requests a second, bursts of a few requests), every wait is bounded in time, and
//! no assertion is on a duration: the delays are printed for the notes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};
use tandem_crds::contract::{ProxyConfig, ServiceRef, StreamMessage};
use tandem_crds::identity::TOKEN_AUDIENCE;
use tandem_crds::names::{DEPENDENCIES_ANNOTATION, config_map_name};
use tandem_tests::cluster::SERVICE_ACCOUNT_ISSUER;
use tandem_tests::install::InstallOptions;

use e2e_support::stream::{self, Watched};
use e2e_support::{Burst, Mesh, SERIAL, TESTAPP_IMAGE, apply_value, counter, eventually, pod_ip};

/// The meshed namespace of every scenario.
const NS: &str = "stream";
/// A second namespace, named whole by a dependencies annotation in scenario e.
const BACKEND: &str = "backend";
/// How often the node refreshes mounted ConfigMaps: a real kubelet's default sync period.
const KUBELET_SYNC: Duration = Duration::from_secs(60);
/// Setup waits (pods Ready, first configs): generous, the machine is shared.
const SETUP: Duration = Duration::from_secs(120);
/// What the stream must deliver, bounded below the node's ConfigMap refresh so a file could
/// not be the reason a wait succeeds (the scenarios also check which source is active).
const STREAMED: Duration = Duration::from_secs(30);
/// The annotation the operator keeps a workload's learned Services in.
const LEARNED_ANNOTATION: &str = "tandem.dev/learned";
/// Seconds a server keeps serving after SIGTERM (a `preStop` sleep), so requests a stale proxy
/// still sends to a deleted pod succeed and show up as that pod's answers rather than errors.
const LINGER_SECONDS: u32 = 15;

// === The scenarios ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn a_pod_deleted_behind_a_service_stops_receiving_traffic_once_the_stream_delivers_the_change_without_a_config_map_write()
 {
    let _serial = SERIAL.lock().await;
    let mesh = start().await;
    let pods = servers_and_client(&mesh).await;
    let (client, doomed, kept) = (&pods.client, &pods.servers[0], &pods.servers[1]);
    let doomed_name = name(doomed);
    let kept_name = name(kept);
    let doomed_ip = IpAddr::V4(pod_ip(doomed).unwrap());

    // Steady traffic reaches both endpoints through a proxy that is watching the operator.
    let before = until_streaming(&mesh, client, |c| {
        endpoint_ips(c, "server").contains(&doomed_ip)
    })
    .await;
    or_logs(
        &mesh,
        eventually("traffic reaches both servers", SETUP, || async {
            let stats = mesh.client_stats(client, false).await?;
            Ok(
                (stats.by_body.contains_key(&doomed_name)
                    && stats.by_body.contains_key(&kept_name))
                .then_some(()),
            )
        })
        .await,
    );
    let written = config_map(&mesh, "client").await;
    // A window that starts with both servers answering, so the last request the doomed one
    // got is known whether it came before or after the delete.
    mesh.client_stats(client, true).await.unwrap();
    or_logs(
        &mesh,
        eventually("both servers answer in the new window", SETUP, || async {
            let stats = mesh.client_stats(client, false).await?;
            Ok(
                (stats.by_body.contains_key(&doomed_name)
                    && stats.by_body.contains_key(&kept_name))
                .then_some(()),
            )
        })
        .await,
    );

    let deleted_at = unix_ms();
    let pods_api: Api<Pod> = Api::namespaced(mesh.client(), NS);
    pods_api
        .delete(&doomed_name, &DeleteParams::default())
        .await
        .unwrap();
    let ((after, applied_at), _) = or_logs(
        &mesh,
        eventually(
            "the client's proxy runs a generation without the deleted endpoint",
            STREAMED,
            || async {
                let view = ProxyView::get(&mesh, client).await?;
                let seen_at = unix_ms();
                let gone = view
                    .active
                    .as_ref()
                    .is_some_and(|c| !endpoint_ips(c, "server").contains(&doomed_ip));
                Ok(gone.then_some((view, seen_at)))
            },
        )
        .await,
    );
    // Traffic goes on a while after the change; every request is still answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = mesh.client_stats(client, false).await.unwrap();
    let last_to_doomed = stats.last_sent_by_body.get(&doomed_name).copied();
    eprintln!(
        "scenario a: {doomed_name} deleted; the client's proxy ran generation {} (was {}, from \
         the {}) {} ms after the delete; the last request {doomed_name} got was sent {} ms \
         after the delete (negative: before it); {} requests, by status {:?}, by body {:?}",
        after.active_generation(),
        before.active_generation(),
        after.active_source.as_deref().unwrap_or("?"),
        applied_at.saturating_sub(deleted_at),
        last_to_doomed.map_or(i128::MIN, |t| i128::from(t) - i128::from(deleted_at)),
        stats.total,
        stats.by_status,
        stats.by_body,
    );
    assert!(
        after.active_generation() > before.active_generation(),
        "the change came as a new generation: {after:?}"
    );
    assert_eq!(
        after.active_source.as_deref(),
        Some("stream"),
        "the stream delivered it: {after:?}"
    );
    assert_eq!(stats.ok, stats.total, "no request failed: {stats:?}");
    assert!(stats.total > 0, "{stats:?}");
    assert!(
        last_to_doomed.is_some_and(|t| t <= applied_at),
        "no request sent after the proxy showed the new generation reached the deleted pod: {stats:?}"
    );
    assert!(
        stats
            .last_sent_by_body
            .get(&kept_name)
            .is_some_and(|t| *t > applied_at),
        "the remaining endpoint kept serving: {stats:?}"
    );
    // Endpoint churn is the stream's: the ConfigMap was not written for it.
    let now = config_map(&mesh, "client").await;
    assert_eq!(
        now.metadata.resource_version, written.metadata.resource_version,
        "no ConfigMap write for an endpoint change while the proxy watches"
    );
    mesh.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn an_operator_restart_while_traffic_flows_loses_no_request_and_the_proxies_keep_their_content()
 {
    let _serial = SERIAL.lock().await;
    let mut mesh = start().await;
    let pods = servers_and_client(&mesh).await;
    let client = &pods.client;
    let before = until_streaming(&mesh, client, |c| endpoint_ips(c, "server").len() == 2).await;
    let written = config_map(&mesh, "client").await;
    let watchers = pods.servers.len() + 1;
    or_logs(
        &mesh,
        eventually("every proxy watches the operator", SETUP, || async {
            Ok((operator_watches(&mesh).await? >= watchers as f64).then_some(()))
        })
        .await,
    );
    mesh.client_stats(client, true).await.unwrap();

    let restarting = Instant::now();
    let restart = mesh.tandem.restart_operator(&mesh.cluster).await;
    or_logs(&mesh, restart.map_err(anyhow::Error::from));
    let restarted = restarting.elapsed();
    let (_, rewatched) = or_logs(
        &mesh,
        eventually("every proxy watches the new operator", SETUP, || async {
            Ok((operator_watches(&mesh).await? >= watchers as f64).then_some(()))
        })
        .await,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = mesh.client_stats(client, false).await.unwrap();
    let after = ProxyView::get(&mesh, client).await.unwrap();
    let now = config_map(&mesh, "client").await;
    eprintln!(
        "scenario b: the operator restarted in {:.1} s; the {watchers} proxies watched it again \
         {:.1} s later; over {:.1} s the client sent {} requests, by status {:?}; the client's \
         version {} -> {}",
        restarted.as_secs_f64(),
        rewatched.as_secs_f64(),
        stats.seconds,
        stats.total,
        stats.by_status,
        before.active_version(),
        after.active_version(),
    );
    assert!(stats.total > 0, "{stats:?}");
    assert_eq!(stats.ok, stats.total, "no request failed: {stats:?}");
    // Nothing changed: the proxy runs the same content. The ConfigMap may have lagged behind
    // the stream (endpoint-only changes are not written while every pod watches); if it held
    // that content, it keeps its version, else the new operator wrote it once, while no
    // proxy watched.
    let content = content_hash(&before.active_version());
    assert_eq!(
        content_hash(&after.active_version()),
        content,
        "the proxy runs the same content: {after:?}"
    );
    if content_hash(&config_version(&written)) == content {
        assert_eq!(
            config_version(&now),
            config_version(&written),
            "an unchanged config keeps its version across a restart"
        );
    } else {
        assert_eq!(content_hash(&config_version(&now)), content);
    }
    eprintln!(
        "scenario b: the ConfigMap's version {} -> {}",
        config_version(&written),
        config_version(&now)
    );
    mesh.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn a_call_to_a_service_outside_the_view_works_at_once_and_the_service_joins_the_view_the_config_map_and_the_learned_annotation()
 {
    let _serial = SERIAL.lock().await;
    let mesh = start().await;
    apply_all(
        &mesh,
        &[
            service_account("hidden"),
            service_account("caller"),
            service(NS, "hidden", "hidden"),
            server_pod("hidden-server", "hidden", "hidden"),
            client_pod("caller", "caller", None, 0, None),
        ],
    )
    .await;
    let hidden = ready(&mesh, "app=hidden", 1).await.remove(0);
    let caller = ready(&mesh, "app=caller", 1).await.remove(0);
    let hidden_ip = IpAddr::V4(pod_ip(&hidden).unwrap());
    let before = until_streaming(&mesh, &caller, |_| true).await;
    let key = service_ref(NS, "hidden");
    assert!(
        before.active.as_ref().unwrap().service(&key).is_none(),
        "hidden is not in the caller's view before the call: {before:?}"
    );
    let written = config_map(&mesh, "caller").await;
    assert!(config_of(&written).service(&key).is_none());

    let url = format!("http://{}/", mesh.cluster_ip(NS, "hidden").await.unwrap());
    let first = mesh.burst(&caller, &url, 1, 1, None).await.unwrap();
    eprintln!(
        "scenario c: the first call to hidden, outside the view: {:?} in {:.0} ms",
        first.by_status, first.p50_ms
    );
    assert_eq!(first.ok, 1, "the first call works at once: {first:?}");
    assert_eq!(first.share("hidden-server"), 1.0, "{first:?}");

    let (view, took) = or_logs(
        &mesh,
        eventually("hidden is in the caller's proxy view", STREAMED, || async {
            let view = ProxyView::get(&mesh, &caller).await?;
            Ok(view
                .active
                .as_ref()
                .is_some_and(|c| endpoint_ips(c, "hidden").contains(&hidden_ip))
                .then_some(view))
        })
        .await,
    );
    eprintln!(
        "scenario c: hidden in the caller's view {:.1} s after the call (generation {}, from the {})",
        took.as_secs_f64(),
        view.active_generation(),
        view.active_source.as_deref().unwrap_or("?")
    );
    assert_eq!(view.active_source.as_deref(), Some("stream"), "{view:?}");
    let (learned, took) = or_logs(
        &mesh,
        eventually(
            "the caller's ConfigMap holds hidden and names it learned",
            STREAMED,
            || async {
                let cm = config_map(&mesh, "caller").await;
                let listed = config_of(&cm).service(&key).is_some();
                let learned = annotation(&cm, LEARNED_ANNOTATION);
                Ok(
                    (listed && learned.split(',').any(|s| s.trim() == "stream/hidden"))
                        .then_some(learned),
                )
            },
        )
        .await,
    );
    eprintln!(
        "scenario c: the caller's ConfigMap has hidden {:.1} s later, {LEARNED_ANNOTATION}={learned}",
        took.as_secs_f64()
    );
    let found = operator_counter(&mesh, "tandem_operator_stream_discoveries", "found").await;
    assert!(found >= 1.0, "the operator counted the discovery: {found}");
    let again = mesh.burst(&caller, &url, 10, 1, None).await.unwrap();
    assert_eq!(again.ok, 10, "calls through the view work: {again:?}");
    assert_eq!(again.share("hidden-server"), 1.0, "{again:?}");
    mesh.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn a_stream_client_with_another_service_accounts_token_never_gets_the_workloads_config() {
    let _serial = SERIAL.lock().await;
    let mesh = start().await;
    apply_all(
        &mesh,
        &[
            service_account("x"),
            service_account("y"),
            client_pod("x", "x", None, 0, None),
            client_pod("y", "y", None, 0, None),
        ],
    )
    .await;
    let x = ready(&mesh, "app=x", 1).await.remove(0);
    let y = ready(&mesh, "app=y", 1).await.remove(0);
    // Both workloads have a published view (their ConfigMaps exist).
    let y_version = config_version(&config_map(&mesh, "y").await);
    config_map(&mesh, "x").await;
    let client = mesh.client();
    let roots = or_logs(&mesh, stream::trust_roots(&client, NS).await);
    let signer = mesh.tandem.identity_addr();
    let watch = |token: Option<String>, version: Option<String>| {
        let roots = roots.clone();
        async move {
            stream::watch(
                signer,
                &roots,
                token.as_deref(),
                version.as_deref(),
                Duration::from_secs(3),
                usize::MAX,
            )
            .await
            .unwrap()
        }
    };
    let token = |sa: &'static str, audience: &'static str, pod: Option<&Pod>| {
        let (client, pod) = (client.clone(), pod.cloned());
        async move {
            stream::token(&client, NS, sa, audience, pod.as_ref())
                .await
                .unwrap()
        }
    };

    // y's own token gets y's view: the client and the operator work, so what follows can fail.
    let own = watch(Some(token("y", TOKEN_AUDIENCE, Some(&y)).await), None).await;
    report("y's own token", &own);
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(
        own.workloads().first().map(String::as_str),
        Some("stream/y")
    );

    // x's token, bound to x's pod: x's view only, even when it names y's version.
    let x_token = token("x", TOKEN_AUDIENCE, Some(&x)).await;
    for version in [None, Some(y_version.clone())] {
        let other = watch(Some(x_token.clone()), version.clone()).await;
        report(&format!("x's token, version {version:?}"), &other);
        assert_eq!(other.status, 200, "{other:?}");
        assert!(
            matches!(other.messages.first(), Some(StreamMessage::Snapshot { .. })),
            "a snapshot of its own view, not y's version acknowledged: {other:?}"
        );
        assert_only_x(&other);
    }

    // x's token without a pod binding: refused, or x's view; never y's.
    let unbound = watch(Some(token("x", TOKEN_AUDIENCE, None).await), None).await;
    report("x's unbound token", &unbound);
    assert_only_x(&unbound);

    // Tokens the operator must not accept at all.
    let refused = [
        (
            "x's token for the apiserver's audience",
            Some(token("x", SERVICE_ACCOUNT_ISSUER, Some(&x)).await),
        ),
        ("a garbage token", Some("not-a-token".to_owned())),
        ("no token", None),
    ];
    for (what, token) in refused {
        let watched = watch(token, None).await;
        report(what, &watched);
        assert!(
            matches!(watched.status, 401 | 403),
            "{what} refused: {watched:?}"
        );
        assert!(watched.refusal.is_some() && watched.messages.is_empty());
    }
    mesh.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn the_dependencies_annotation_puts_the_services_it_names_in_the_config_before_any_call() {
    let _serial = SERIAL.lock().await;
    let mesh = start().await;
    apply_all(
        &mesh,
        &[
            namespace(BACKEND, false),
            service_account("server"),
            service_account("annotated"),
            service_account("plain"),
            service(NS, "server", "server"),
            service(BACKEND, "db", "db"),
            server_pod("server-a", "server", "server"),
            client_pod(
                "annotated",
                "annotated",
                None,
                0,
                Some(&format!("server, {BACKEND}/*")),
            ),
            client_pod("plain", "plain", None, 0, None),
        ],
    )
    .await;
    let server = ready(&mesh, "app=server", 1).await.remove(0);
    let annotated = ready(&mesh, "app=annotated", 1).await.remove(0);
    let plain = ready(&mesh, "app=plain", 1).await.remove(0);
    let server_ip = IpAddr::V4(pod_ip(&server).unwrap());
    let (server_key, db_key) = (service_ref(NS, "server"), service_ref(BACKEND, "db"));

    // Nothing has called anything yet.
    let view = until_streaming(&mesh, &annotated, |c| {
        endpoint_ips(c, "server").contains(&server_ip) && c.service(&db_key).is_some()
    })
    .await;
    eprintln!(
        "scenario e: the annotated proxy's view before any call: {:?} (generation {})",
        service_names(view.active.as_ref().unwrap()),
        view.active_generation()
    );
    let written = config_of(&config_map(&mesh, "annotated").await);
    assert!(written.service(&server_key).is_some(), "{written:?}");
    assert!(written.service(&db_key).is_some(), "{written:?}");

    // The control: the same namespace, no annotation, none of them.
    let plain_view = until_streaming(&mesh, &plain, |_| true).await;
    let plain_config = plain_view.active.unwrap();
    assert!(
        plain_config.service(&server_key).is_none() && plain_config.service(&db_key).is_none(),
        "{:?}",
        service_names(&plain_config)
    );

    let url = format!("http://{}/", mesh.cluster_ip(NS, "server").await.unwrap());
    let calls = mesh
        .burst_with(&annotated, &Burst::new(&url, 5))
        .await
        .unwrap();
    assert_eq!(calls.ok, 5, "{calls:?}");
    assert_eq!(calls.share("server-a"), 1.0, "{calls:?}");
    mesh.node.shutdown().await;
}

// === What a proxy shows ===

/// The parts of a proxy's `/config` these scenarios read.
#[derive(Debug)]
struct ProxyView {
    /// The active config.
    active: Option<ProxyConfig>,
    /// Where it came from: `file` or `stream`.
    active_source: Option<String>,
    /// Whether the stream is connected.
    stream_connected: bool,
    /// The whole document, for failure messages.
    #[expect(dead_code, reason = "read through Debug, in failure messages")]
    raw: Value,
}

impl ProxyView {
    async fn get(mesh: &Mesh, pod: &Pod) -> anyhow::Result<Self> {
        let raw = mesh.proxy_admin_config(pod).await?;
        let active = if raw["config"].is_null() {
            None
        } else {
            Some(serde_json::from_value(raw["config"].clone())?)
        };
        let active_source = raw["activeSource"].as_str().map(str::to_owned);
        let stream_connected = raw["sources"]["stream"]["connected"]
            .as_bool()
            .unwrap_or(false);
        Ok(Self {
            active,
            active_source,
            stream_connected,
            raw,
        })
    }

    fn active_generation(&self) -> u64 {
        self.active.as_ref().map_or(0, ProxyConfig::generation)
    }

    fn active_version(&self) -> String {
        self.active
            .as_ref()
            .map(|c| c.version.clone())
            .unwrap_or_default()
    }
}

/// Waits until `pod`'s proxy is connected to the stream and runs a config for which `ready`
/// holds; returns what it showed then.
async fn until_streaming(
    mesh: &Mesh,
    pod: &Pod,
    ready: impl Fn(&ProxyConfig) -> bool,
) -> ProxyView {
    let (view, took) = or_logs(
        mesh,
        eventually(
            &format!("{}'s proxy streams a config as expected", name(pod)),
            SETUP,
            || async {
                let view = ProxyView::get(mesh, pod).await?;
                Ok(
                    (view.stream_connected && view.active.as_ref().is_some_and(&ready))
                        .then_some(view),
                )
            },
        )
        .await,
    );
    eprintln!(
        "  {}'s proxy streams version {} ({:.1} s)",
        name(pod),
        view.active_version(),
        took.as_secs_f64()
    );
    view
}

/// The endpoint addresses of Service `name` in namespace [`NS`] of `config`.
fn endpoint_ips(config: &ProxyConfig, name: &str) -> BTreeSet<IpAddr> {
    config
        .service(&service_ref(NS, name))
        .into_iter()
        .flat_map(|s| &s.ports)
        .flat_map(|p| &p.endpoints)
        .map(|e| e.address.ip())
        .collect()
}

fn service_names(config: &ProxyConfig) -> Vec<String> {
    config
        .services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

fn service_ref(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        name: name.into(),
        namespace: namespace.into(),
    }
}

// === What the operator shows ===

/// A ServiceAccount's ConfigMap in [`NS`], once it exists.
async fn config_map(mesh: &Mesh, service_account: &str) -> ConfigMap {
    let api: Api<ConfigMap> = Api::namespaced(mesh.client(), NS);
    let name = config_map_name(service_account);
    or_logs(
        mesh,
        eventually(&format!("ConfigMap {name}"), SETUP, || async {
            Ok(api.get_opt(&name).await?)
        })
        .await,
    )
    .0
}

fn config_of(cm: &ConfigMap) -> ProxyConfig {
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.get(tandem_crds::names::CONFIG_KEY))
        .expect("a ConfigMap with the config key");
    serde_json::from_str(json).expect("a proxy config")
}

fn config_version(cm: &ConfigMap) -> String {
    config_of(cm).version
}

/// The content hash of a version stamp (`<generation>.<hash>`).
fn content_hash(version: &str) -> String {
    version
        .split_once('.')
        .map_or(version, |(_, hash)| hash)
        .to_owned()
}

fn annotation(cm: &ConfigMap, key: &str) -> String {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

/// The operator's open watches (`tandem_operator_stream_watches`).
async fn operator_watches(mesh: &Mesh) -> anyhow::Result<f64> {
    let metrics = operator_metrics(mesh).await?;
    Ok(counter(&metrics, "tandem_operator_stream_watches", &[]))
}

/// A `result`-labelled counter of the operator.
async fn operator_counter(mesh: &Mesh, name: &str, result: &str) -> f64 {
    let metrics = or_logs(mesh, operator_metrics(mesh).await);
    counter(&metrics, name, &[("result", result)])
}

/// The operator's `/metrics` (plain HTTP on loopback).
async fn operator_metrics(mesh: &Mesh) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr: SocketAddr = mesh.tandem.operator_addr();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange).await??;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!("GET {addr}/metrics: {head}");
    }
    Ok(body.to_owned())
}

fn report(what: &str, watched: &Watched) {
    eprintln!(
        "scenario d: {what}: {} {:?}, {} messages, workloads {:?}",
        watched.status,
        watched.refusal.as_ref().map(|r| r.reason.as_str()),
        watched.messages.len(),
        watched.workloads()
    );
}

/// Refused, or only ever x's config.
fn assert_only_x(watched: &Watched) {
    if watched.status == 200 {
        assert!(
            watched.workloads().iter().all(|w| w == "stream/x"),
            "{watched:?}"
        );
    } else {
        assert!(watched.refusal.is_some() && watched.messages.is_empty());
    }
}

// === The cluster and its workloads ===

/// A cluster whose node refreshes ConfigMap volumes every [`KUBELET_SYNC`], and the meshed
/// namespace [`NS`] with its trust roots published.
///
/// The operator publishes a namespace's trust roots (a ConfigMap every injected pod mounts)
/// once a meshed pod is there, and with the kubelet's refresh the first pods would only see
/// them a sync later: a minute with no certificate and no stream (a real kubelet can do the
/// same to the first pods of a new namespace). So a throwaway pod brings the roots first, and
/// the scenario's pods find them when their volumes are made.
async fn start() -> Mesh {
    let mesh = Mesh::start_with_refresh(InstallOptions::default(), Some(KUBELET_SYNC))
        .await
        .expect("cluster, Tandem and node start");
    apply_all(
        &mesh,
        &[
            namespace(NS, true),
            service_account("warmup"),
            client_pod("warmup", "warmup", None, 0, None),
        ],
    )
    .await;
    let client = mesh.client();
    or_logs(
        &mesh,
        eventually("the trust roots in the namespace", SETUP, || async {
            Ok(stream::trust_roots(&client, NS).await.ok())
        })
        .await,
    );
    let pods: Api<Pod> = Api::namespaced(mesh.client(), NS);
    pods.delete("warmup", &DeleteParams::default())
        .await
        .unwrap();
    mesh
}

/// Two servers behind Service `server` and a client that sends it 20 requests a second and
/// names it in its dependencies annotation.
struct ServersAndClient {
    servers: Vec<Pod>,
    client: Pod,
}

async fn servers_and_client(mesh: &Mesh) -> ServersAndClient {
    apply_all(
        mesh,
        &[
            service_account("server"),
            service_account("client"),
            service(NS, "server", "server"),
            server_pod("server-a", "server", "server"),
            server_pod("server-b", "server", "server"),
            client_pod(
                "client",
                "client",
                Some("http://$(SERVER_SERVICE_HOST):$(SERVER_SERVICE_PORT)/"),
                20,
                Some("server"),
            ),
        ],
    )
    .await;
    let mut servers = ready(mesh, "app=server", 2).await;
    servers.sort_by_key(name);
    let client = ready(mesh, "app=client", 1).await.remove(0);
    ServersAndClient { servers, client }
}

async fn apply_all(mesh: &Mesh, objects: &[Value]) {
    for object in objects {
        or_logs(mesh, apply_value(&mesh.client(), object).await);
    }
}

async fn ready(mesh: &Mesh, selector: &str, count: usize) -> Vec<Pod> {
    let started = Instant::now();
    let pods = or_logs(mesh, mesh.ready_pods(NS, selector, count, SETUP).await);
    eprintln!(
        "  {count} pod(s) {selector} Ready ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    pods
}

fn namespace(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"tandem.dev/inject": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn service_account(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}})
}

fn service(namespace: &str, name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}

/// A `tandem-testapp server` answering with the pod's name and lingering after SIGTERM.
fn server_pod(name: &str, service_account: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
    "spec": {
        "serviceAccountName": service_account,
        "terminationGracePeriodSeconds": LINGER_SECONDS + 5,
        "containers": [{
            "name": "server", "image": TESTAPP_IMAGE,
            "args": ["server", "--listen", "0.0.0.0:8080", "--name", name,
                     "--linger", LINGER_SECONDS.to_string()],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
            "securityContext": unprivileged(),
        }],
    }})
}

/// A `tandem-testapp client` sending `rps` requests a second to `target` (none: nowhere),
/// with a dependencies annotation when given.
fn client_pod(
    name: &str,
    service_account: &str,
    target: Option<&str>,
    rps: u32,
    dependencies: Option<&str>,
) -> Value {
    let annotations = match dependencies {
        Some(d) => json!({DEPENDENCIES_ANNOTATION: d}),
        None => json!({}),
    };
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": NS, "labels": {"app": name}, "annotations": annotations},
    "spec": {
        "serviceAccountName": service_account,
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": "client", "image": TESTAPP_IMAGE,
            "args": ["client", "--target", target.unwrap_or("http://127.0.0.1:1/"),
                     "--rps", rps.to_string(), "--stats-listen", "0.0.0.0:9090"],
            "ports": [{"name": "stats", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "stats"}, "periodSeconds": 1},
            "securityContext": unprivileged(),
        }],
    }})
}

fn unprivileged() -> Value {
    json!({"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": true, "allowPrivilegeEscalation": false})
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The value, or a panic with the error and the components' logs.
fn or_logs<T>(mesh: &Mesh, result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()))
}
