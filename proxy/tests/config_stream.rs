//! The operator's config stream against a real HTTPS operator on loopback (the contract's
//! watch, discovery and applied calls, see `support::operator`), with the real proxy binary
//! and real upstream sockets: snapshots and deltas applied and routed, file and stream
//! precedence by generation, refusals keeping the last good config, the operator going away
//! and coming back, on-demand discovery of unknown destinations, and the token check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::ca::TestCa;
use support::operator::TestOperator;
use support::upstream::{self, bind_local};
use support::{ConfigDir, Proxy, ProxyOptions, eventually, get, service_with, temp_dir};
use tandem_crds::contract::{AppliedReport, ConfigSource, ProxyConfig, ServiceRef, StreamMessage};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "token-client";

/// A service `test/<name>` on `cluster_ip:port` with plaintext endpoints.
fn plain(name: &str, cluster: SocketAddr, endpoints: &[SocketAddr]) -> serde_json::Value {
    let endpoints = endpoints
        .iter()
        .map(|e| serde_json::json!({"address": e.to_string(), "meshed": false}))
        .collect();
    service_with(
        name,
        &cluster.ip().to_string(),
        cluster.port(),
        "http",
        endpoints,
    )
}

fn config_text(version: &str, services: Vec<serde_json::Value>) -> String {
    support::config(version, services)
}

fn config(version: &str, services: Vec<serde_json::Value>) -> ProxyConfig {
    ProxyConfig::from_json(config_text(version, services).as_bytes()).unwrap()
}

/// An operator, a proxy pointed at it (file, token, trust roots), and the service `web`
/// whose cluster address the tests call.
struct Mesh {
    operator: TestOperator,
    dir: ConfigDir,
    _roots: ConfigDir,
    _token: PathBuf,
    proxy: Proxy,
    web: SocketAddr,
}

impl Mesh {
    /// The file holds `file`, the operator `stream` (none: it refuses `NoConfig`); the proxy
    /// presents `token`.
    async fn start(file: &str, stream: Option<ProxyConfig>, token: &str) -> Self {
        let root = TestCa::root("tandem test root");
        let operator = TestOperator::start(&root, TOKEN).await;
        if let Some(stream) = stream {
            operator.set(stream);
        }
        let token_file = temp_dir("token").join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut roots = ConfigDir::with_file("roots.pem");
        roots.publish(&root.pem);
        let mut dir = ConfigDir::new();
        dir.publish(file);
        let mut opts = ProxyOptions::loopback(dir.path());
        opts.extra = vec![
            "--identity-addr".into(),
            operator.addr.to_string(),
            "--identity-token".into(),
            token_file.display().to_string(),
            "--trust-roots".into(),
            roots.path().display().to_string(),
        ];
        let proxy = Proxy::start_with(opts);
        Self {
            operator,
            dir,
            _roots: roots,
            _token: token_file,
            proxy,
            web: web(),
        }
    }

    async fn config(&self) -> serde_json::Value {
        let (_, body) = self.proxy.admin("/config").await;
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `/config` satisfies `f`, and returns it.
    async fn wait_config(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.config().await;
            if f(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_version(&self, version: &str) -> serde_json::Value {
        self.wait_config(version, |v| v["version"] == version).await
    }

    /// The body of a GET through the outbound listener to `to` (the Host names it).
    async fn call(&self, to: SocketAddr) -> String {
        let reply = get(self.proxy.outbound, &to.to_string(), "/", &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }

    async fn metrics(&self) -> String {
        self.proxy.admin("/metrics").await.1
    }
}

/// The cluster address of `web` (nothing listens there: the proxy routes by it).
fn web() -> SocketAddr {
    "127.0.0.1:18181".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_applied_routed_reported_and_shown_beside_the_file() {
    let (from_file, from_stream) = (
        upstream::http("file", bind_local()),
        upstream::http("stream", bind_local()),
    );
    let file = config_text("100.f", vec![plain("web", web(), &[from_file])]);
    let stream = config("200.s", vec![plain("web", web(), &[from_stream])]);
    let mesh = Mesh::start(&file, Some(stream), TOKEN).await;

    let shown = mesh.wait_version("200.s").await;
    assert_eq!(shown["activeSource"], "stream");
    assert_eq!(shown["generation"], 200);
    let file = &shown["sources"]["file"];
    assert_eq!(
        (file["version"].as_str(), file["generation"].as_u64()),
        (Some("100.f"), Some(100))
    );
    assert!(file["loadedAt"].is_string());
    let stream = &shown["sources"]["stream"];
    assert_eq!(
        (stream["version"].as_str(), stream["generation"].as_u64()),
        (Some("200.s"), Some(200))
    );
    assert_eq!(stream["connected"], true, "{shown:#}");
    assert!(stream["since"].is_string());
    assert_eq!(stream["operator"], mesh.operator.addr.to_string());
    assert!(mesh.call(mesh.web).await.starts_with("stream"));

    let metrics = mesh.metrics().await;
    for series in [
        "tandem_proxy_config_generation 200",
        r#"tandem_proxy_config_source_generation{source="file"} 100"#,
        r#"tandem_proxy_config_source_generation{source="stream"} 200"#,
        "tandem_proxy_config_stream_connected 1",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    let reported = AppliedReport {
        version: "200.s".into(),
        source: ConfigSource::Stream,
    };
    eventually("the applied report", WAIT, async || {
        mesh.operator.applied().contains(&reported)
    })
    .await;
    // The first watch sent the version the proxy held: the file's.
    assert_eq!(mesh.operator.watch_versions()[0].as_deref(), Some("100.f"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_moves_an_endpoint_and_traffic_goes_to_the_new_one() {
    let (old, new) = (
        upstream::http("old", bind_local()),
        upstream::http("new", bind_local()),
    );
    let mesh = Mesh::start(
        &config_text("1.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[old])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;
    assert!(mesh.call(mesh.web).await.starts_with("old"));

    mesh.operator
        .publish(config("300.s", vec![plain("web", web(), &[new])]));
    mesh.wait_version("300.s").await;
    assert!(mesh.call(mesh.web).await.starts_with("new"));
    eventually("the delta's version reported", WAIT, async || {
        mesh.operator.applied().last().map(|r| r.version.as_str()) == Some("300.s")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_generation_wins_between_file_and_stream() {
    let (a, b, c) = (
        upstream::http("a", bind_local()),
        upstream::http("b", bind_local()),
        upstream::http("c", bind_local()),
    );
    let mut mesh = Mesh::start(
        &config_text("100.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[a])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;

    // A newer file wins over the older stream version.
    mesh.dir
        .publish(&config_text("300.f", vec![plain("web", web(), &[b])]));
    let shown = mesh.wait_version("300.f").await;
    assert_eq!(shown["activeSource"], "file");
    assert!(mesh.call(mesh.web).await.starts_with("b"));

    // A newer stream version wins over the file.
    mesh.operator
        .publish(config("400.s", vec![plain("web", web(), &[c])]));
    mesh.wait_version("400.s").await;
    assert!(mesh.call(mesh.web).await.starts_with("c"));

    // A stale file (the kubelet's lag) is loaded as the file's version but not activated.
    mesh.dir
        .publish(&config_text("350.f", vec![plain("web", web(), &[a])]));
    let shown = mesh
        .wait_config("the stale file loaded", |v| {
            v["sources"]["file"]["version"] == "350.f"
        })
        .await;
    assert_eq!(shown["version"], "400.s");
    assert_eq!(shown["activeSource"], "stream");
    assert!(mesh.call(mesh.web).await.starts_with("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_stream_config_is_refused_and_the_last_good_one_keeps_serving() {
    let good = upstream::http("good", bind_local());
    let mesh = Mesh::start(
        &config_text("1.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[good])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;

    let mut invalid = config("300.s", vec![]);
    invalid.workload.service_account = String::new();
    mesh.operator
        .send(&StreamMessage::Snapshot { config: invalid }.to_line());
    let shown = mesh
        .wait_config("the refusal", |v| {
            v["sources"]["stream"]["lastError"].is_object()
        })
        .await;
    let message = shown["sources"]["stream"]["lastError"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("300.s") && message.contains("invalid"),
        "{message}"
    );
    assert_eq!(shown["version"], "200.s");
    assert_eq!(shown["sources"]["stream"]["version"], "200.s");
    assert_eq!(
        shown["sources"]["file"]["lastError"],
        serde_json::Value::Null
    );
    assert!(mesh.call(mesh.web).await.starts_with("good"));

    // A line that is not a message ends the connection (no panic); the proxy reconnects.
    let watches = mesh.operator.watch_versions().len();
    mesh.operator.send("{not json\n");
    eventually("a new watch", WAIT, async || {
        mesh.operator.watch_versions().len() > watches
    })
    .await;
    assert!(mesh.call(mesh.web).await.starts_with("good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operator_gone_the_proxy_keeps_serving_and_reconnects_for_a_new_snapshot() {
    let (old, new) = (
        upstream::http("old", bind_local()),
        upstream::http("new", bind_local()),
    );
    let mesh = Mesh::start(
        &config_text("1.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[old])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;

    mesh.operator.stop();
    let shown = mesh
        .wait_config("the disconnect", |v| {
            v["sources"]["stream"]["connected"] == false
        })
        .await;
    assert!(shown["sources"]["stream"]["lastDisconnect"]["message"].is_string());
    assert_eq!(shown["version"], "200.s");
    assert!(mesh.call(mesh.web).await.starts_with("old"));

    // While it was away the config changed: the reconnect gets a snapshot of the new one.
    mesh.operator
        .set(config("300.s", vec![plain("web", web(), &[new])]));
    mesh.operator.restart().await;
    mesh.wait_version("300.s").await;
    assert!(mesh.call(mesh.web).await.starts_with("new"));
    let versions = mesh.operator.watch_versions();
    assert_eq!(
        versions.last().unwrap().as_deref(),
        Some("200.s"),
        "{versions:?}"
    );
    assert!(
        mesh.metrics()
            .await
            .contains("tandem_proxy_config_stream_connected 1")
    );
    let metrics = mesh.metrics().await;
    assert!(
        !metrics.contains("tandem_proxy_config_stream_reconnects_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_destination_passes_through_at_once_and_is_discovered_once() {
    let (unknown, other, backend) = (
        upstream::http("unknown", bind_local()),
        upstream::http("other", bind_local()),
        upstream::http("backend", bind_local()),
    );
    let mesh = Mesh::start(
        &config_text("1.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[backend])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;
    let service = ServiceRef {
        name: "found".into(),
        namespace: "test".into(),
    };
    mesh.operator.answer(unknown, service);

    for _ in 0..5 {
        assert!(mesh.call(unknown).await.starts_with("unknown"));
    }
    // Asks are answered one at a time, in order: once `other` was asked, every ask for
    // `unknown` before it has been handled (or deduplicated).
    assert!(mesh.call(other).await.starts_with("other"));
    eventually(
        "the discover call for the other address",
        WAIT,
        async || mesh.operator.discovers().contains(&other),
    )
    .await;
    let asked = mesh.operator.discovers();
    assert_eq!(
        asked.iter().filter(|a| **a == unknown).count(),
        1,
        "{asked:?}"
    );

    // The operator puts the Service into the view: it arrives on the stream and is routed.
    mesh.operator.publish(config(
        "300.s",
        vec![
            plain("found", unknown, &[backend]),
            plain("web", web(), &[backend]),
        ],
    ));
    mesh.wait_version("300.s").await;
    assert!(mesh.call(unknown).await.starts_with("backend"));
    // The task counts after it read the answer, a moment after the operator saw the call.
    eventually("the discovery results counted", WAIT, async || {
        let metrics = mesh.metrics().await;
        metrics.contains(r#"tandem_proxy_discovery_requests_total{result="found"} 1"#)
            && metrics.contains(r#"tandem_proxy_discovery_requests_total{result="unknown"} 1"#)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_operator_does_not_accept_gets_no_config_and_the_file_keeps_serving() {
    let (from_file, from_stream) = (
        upstream::http("file", bind_local()),
        upstream::http("stream", bind_local()),
    );
    let mesh = Mesh::start(
        &config_text("100.f", vec![plain("web", web(), &[from_file])]),
        Some(config("200.s", vec![plain("web", web(), &[from_stream])])),
        "token-of-another-service-account",
    )
    .await;
    eventually("a refused watch", WAIT, async || {
        mesh.operator.refused() > 0
    })
    .await;
    let shown = mesh
        .wait_config("the refusal", |v| {
            v["sources"]["stream"]["lastDisconnect"].is_object()
        })
        .await;
    let message = shown["sources"]["stream"]["lastDisconnect"]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("Unauthenticated"), "{message}");
    assert_eq!(shown["sources"]["stream"]["connected"], false);
    assert_eq!(shown["version"], "100.f");
    assert!(mesh.call(mesh.web).await.starts_with("file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_holding_the_operators_version_gets_current_and_builds_deltas_on_its_file() {
    let (old, new) = (
        upstream::http("old", bind_local()),
        upstream::http("new", bind_local()),
    );
    let v200 = config("200.s", vec![plain("web", web(), &[old])]);
    let mesh = Mesh::start(&v200.to_json(), Some(v200.clone()), TOKEN).await;
    mesh.wait_config("the watch", |v| v["sources"]["stream"]["connected"] == true)
        .await;
    assert_eq!(mesh.operator.watch_versions(), [Some("200.s".to_owned())]);

    mesh.operator
        .publish(config("300.s", vec![plain("web", web(), &[new])]));
    let shown = mesh.wait_version("300.s").await;
    assert_eq!(shown["activeSource"], "stream");
    assert!(mesh.call(mesh.web).await.starts_with("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_for_another_base_makes_the_proxy_ask_for_a_snapshot() {
    let (old, new) = (
        upstream::http("old", bind_local()),
        upstream::http("new", bind_local()),
    );
    let mesh = Mesh::start(
        &config_text("1.f", vec![]),
        Some(config("200.s", vec![plain("web", web(), &[old])])),
        TOKEN,
    )
    .await;
    mesh.wait_version("200.s").await;

    let v300 = config("300.s", vec![plain("web", web(), &[new])]);
    let wrong_base = config("250.x", vec![]);
    mesh.operator.set(v300.clone());
    mesh.operator.send(
        &StreamMessage::Delta(tandem_crds::contract::ConfigDelta::between(
            &wrong_base,
            &v300,
        ))
        .to_line(),
    );
    mesh.wait_version("300.s").await;
    assert!(mesh.call(mesh.web).await.starts_with("new"));
    let versions = mesh.operator.watch_versions();
    assert_eq!(versions.last().unwrap(), &None, "{versions:?}");
}

/// The hook on the transparent path: in a "pod" (network namespace) whose outgoing TCP is
/// redirected to the proxy, an application's connection to an address the config does not know
/// is relayed unchanged and asked about once. Needs root; fails (never skips) without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_connection_to_an_unknown_address_is_relayed_and_discovered_once() {
    use support::netns::{Pods, SERVER_IP};
    let pods = Pods::new();
    let proxy_uid = tandem_crds::names::PROXY_UID.to_string();
    for rule in [
        vec![
            "-m",
            "owner",
            "--uid-owner",
            proxy_uid.as_str(),
            "-j",
            "RETURN",
        ],
        vec!["-o", "lo", "-j", "RETURN"],
    ] {
        let mut argv = vec!["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        argv.extend(rule);
        pods.client.exec(&argv);
    }
    pods.client
        .redirect_tcp("OUTPUT", &[], tandem_crds::names::OUTBOUND_PORT);
    let app = upstream::http("app", pods.server.bind("0.0.0.0:8080"));
    let other = upstream::http("other", pods.server.bind("0.0.0.0:8081"));
    let (app, other) = (
        SocketAddr::new(SERVER_IP.parse().unwrap(), app.port()),
        SocketAddr::new(SERVER_IP.parse().unwrap(), other.port()),
    );

    let root = TestCa::root("tandem test root");
    let operator = TestOperator::start_on(&root, TOKEN, pods.client.bind("127.0.0.1:0"));
    operator.set(config("200.s", vec![]));
    let token = temp_dir("token").join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let mut roots = ConfigDir::with_file("roots.pem");
    roots.publish(&root.pem);
    let mut dir = ConfigDir::new();
    dir.publish(&config_text("1.f", vec![]));
    let mut opts = ProxyOptions::loopback(dir.path());
    opts.outbound = "0.0.0.0:15001".into();
    opts.inbound = "0.0.0.0:15006".into();
    opts.admin = "127.0.0.1:15020".into();
    opts.wrapper = pods.client.as_uid(tandem_crds::names::PROXY_UID);
    opts.extra = vec![
        "--identity-addr".into(),
        operator.addr.to_string(),
        "--identity-token".into(),
        token.display().to_string(),
        "--trust-roots".into(),
        roots.path().display().to_string(),
    ];
    let _proxy = Proxy::start_with(opts);
    eventually("the watch", WAIT, async || operator.watches() > 0).await;

    let curl = |url: String| {
        let mut argv = pods.client.as_uid(2103);
        argv.extend(["curl", "-sS", "--max-time", "10", url.as_str()].map(String::from));
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for _ in 0..3 {
        assert_eq!(curl(format!("http://{app}/direct")), "app GET /direct");
    }
    assert_eq!(curl(format!("http://{other}/x")), "other GET /x");
    eventually(
        "the discover call for the other address",
        WAIT,
        async || operator.discovers().contains(&other),
    )
    .await;
    let asked = operator.discovers();
    assert_eq!(asked.iter().filter(|a| **a == app).count(), 1, "{asked:?}");
}
