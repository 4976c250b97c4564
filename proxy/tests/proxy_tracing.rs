//! Tracing through the real proxy binary over real sockets: the W3C context crosses two hops,
//! each proxy exports its spans over OTLP/HTTP to a receiver in the test (decoding the
//! protobuf with `opentelemetry-proto`), and the access log carries the ids.
//!
//! "Nothing was exported" is observed with a marker: after the request that must export
//! nothing, a sampled request goes through the same proxies; spans leave a proxy in order, so
//! once the marker's spans arrived, any span of the first request would have too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::otlp::{Mode, Receiver};
use support::upstream::{self, bind_local};
use support::{ConfigDir, Proxy, ProxyOptions, get, service};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A config for ServiceAccount `sa` in namespace `test`, tracing to `collector` at `percent`.
fn config(sa: &str, services: Vec<Value>, tracing: Option<(&str, f64)>) -> String {
    let mut config = json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": "v1",
        "workload": {"namespace": "test", "serviceAccount": sa},
        "services": services,
    });
    if let Some((collector, percent)) = tracing {
        config["telemetry"] = json!({
            "tracing": {"collector": collector, "samplingPercent": percent}
        });
    }
    config.to_string()
}

fn start(dir: &ConfigDir, extra: &[&str]) -> Proxy {
    let mut opts = ProxyOptions::loopback(dir.path());
    opts.extra = ["--trace-flush", "50ms"]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
    Proxy::start_with(opts)
}

/// A client sidecar whose service `app` is reached through a server sidecar's inbound
/// listener, both tracing to `collector`.
struct TwoHops {
    app: std::net::SocketAddr,
    client: Proxy,
    server: Proxy,
    _dirs: (ConfigDir, ConfigDir),
}

impl TwoHops {
    async fn start(collector: &str, percent: f64) -> Self {
        let app = upstream::http("app", bind_local());
        let mut server_dir = ConfigDir::new();
        server_dir.publish(&config("server", vec![], Some((collector, percent))));
        let server = start(&server_dir, &[]);
        let mut client_dir = ConfigDir::new();
        client_dir.publish(&config(
            "client",
            vec![service(
                "app",
                "127.0.0.1",
                app.port(),
                "http",
                &[server.inbound],
            )],
            Some((collector, percent)),
        ));
        let client = start(&client_dir, &[]);
        client.wait_config_version("v1").await;
        server.wait_config_version("v1").await;
        Self {
            app,
            client,
            server,
            _dirs: (client_dir, server_dir),
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> support::Reply {
        let authority = format!("127.0.0.1:{}", self.app.port());
        get(self.client.outbound, &authority, path, headers)
            .await
            .unwrap()
    }
}

/// The `traceparent` the app received, split: (trace id, parent id, flags).
fn received_traceparent(reply: &support::Reply) -> (String, String, String) {
    let tp = reply.headers["echo-traceparent"].to_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_across_two_proxies_is_one_trace_client_span_then_server_span() {
    let collector = Receiver::start(Mode::Accept);
    // 0 %: the incoming sampled flag decides, not the probability.
    let mesh = TwoHops::start(&collector.url(), 0.0).await;
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let reply = mesh
        .get(
            "/orders?id=7",
            &[("traceparent", TP), ("tracestate", tracestate)],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers["echo-tracestate"], tracestate,
        "tracestate passes through"
    );

    let spans = collector.wait_trace(TRACE, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = spans.iter().find(|s| s.is_client()).unwrap();
    let server = spans.iter().find(|s| s.is_server()).unwrap();
    assert_eq!(
        client.parent_id(),
        PARENT,
        "the caller's span is the CLIENT span's parent"
    );
    assert_eq!(
        server.parent_id(),
        client.span_id(),
        "the CLIENT span is the SERVER's parent"
    );
    let (trace, parent, flags) = received_traceparent(&reply);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_eq!(
        parent,
        server.span_id(),
        "the app's parent is the SERVER span"
    );

    let port = mesh.app.port().to_string();
    assert_eq!(client.service, "client.test");
    assert_eq!(server.service, "server.test");
    assert_eq!(client.span.name, format!("app.test:{port}/*"));
    assert_eq!(server.span.name, format!("server.test:{port}/*"));
    for span in [client, server] {
        assert_eq!(
            span.attribute("http.request.method").as_deref(),
            Some("GET")
        );
        assert_eq!(span.attribute("url.path").as_deref(), Some("/orders"));
        assert_eq!(
            span.attribute("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            span.attribute("server.port").as_deref(),
            Some(port.as_str())
        );
        assert_eq!(
            span.attribute("network.protocol.version").as_deref(),
            Some("1.1")
        );
        assert_eq!(span.span.trace_state, tracestate);
        assert!(span.attribute("error.type").is_none());
        assert!(span.span.end_time_unix_nano >= span.span.start_time_unix_nano);
    }
    assert_eq!(client.attribute("tandem.attempt").as_deref(), Some("1"));
    assert_eq!(
        client.attribute("network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        server.attribute("tandem.policy").as_deref(),
        Some("default:all-unauthenticated")
    );
    assert!(
        collector
            .requests
            .lock()
            .unwrap()
            .iter()
            .all(|r| r == "/v1/traces application/x-protobuf")
    );

    // Each hop's access log names the trace and the span it made.
    support::eventually(
        "access logs on both hops",
        Duration::from_secs(5),
        async || mesh.client.access_log().len() == 1 && mesh.server.access_log().len() == 1,
    )
    .await;
    let out = &mesh.client.access_log()[0];
    assert_eq!(
        (out["trace_id"].as_str(), out["span_id"].as_str()),
        (Some(TRACE), Some(client.span_id().as_str()))
    );
    let inb = &mesh.server.access_log()[0];
    assert_eq!(
        (inb["trace_id"].as_str(), inb["span_id"].as_str()),
        (Some(TRACE), Some(server.span_id().as_str()))
    );

    let (_, metrics) = mesh.client.admin("/metrics").await;
    assert!(
        metrics.contains("tandem_trace_spans_exported_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tandem_trace_spans_dropped_total{reason="queue-full"} 0"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_off_context_exports_nothing_and_reaches_the_app_unchanged() {
    let collector = Receiver::start(Mode::Accept);
    let mesh = TwoHops::start(&collector.url(), 100.0).await;
    let off = TP.replace("-01", "-00");
    let reply = mesh.get("/", &[("traceparent", &off)]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["echo-traceparent"], off.as_str());

    let marker = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    mesh.get("/", &[("traceparent", marker)]).await;
    collector
        .wait_trace("0af7651916cd43dd8448eb211c80319c", 2)
        .await;
    assert!(
        collector.trace(TRACE).is_empty(),
        "{:#?}",
        collector.trace(TRACE)
    );
    assert_eq!(collector.spans().len(), 2);
    // Not sampled, the log shows the incoming ids.
    let inb = &mesh.server.access_log()[0];
    assert_eq!(
        (inb["trace_id"].as_str(), inb["span_id"].as_str()),
        (Some(TRACE), Some(PARENT))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_100_percent_a_request_without_context_starts_a_trace_at_its_first_proxy() {
    let collector = Receiver::start(Mode::Accept);
    let mesh = TwoHops::start(&collector.url(), 100.0).await;
    let reply = mesh.get("/new", &[]).await;
    assert_eq!(reply.status, 200);
    let (trace, parent, flags) = received_traceparent(&reply);
    assert_eq!(flags, "01");
    let spans = collector.wait_trace(&trace, 2).await;
    let client = spans.iter().find(|s| s.is_client()).unwrap();
    let server = spans.iter().find(|s| s.is_server()).unwrap();
    assert!(
        client.span.parent_span_id.is_empty(),
        "the CLIENT span is the root"
    );
    assert_eq!(server.parent_id(), client.span_id());
    assert_eq!(parent, server.span_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_0_percent_a_request_without_context_exports_nothing_and_the_decision_travels() {
    let collector = Receiver::start(Mode::Accept);
    let mesh = TwoHops::start(&collector.url(), 0.0).await;
    let reply = mesh.get("/", &[]).await;
    assert_eq!(reply.status, 200);
    let (trace, _, flags) = received_traceparent(&reply);
    assert_eq!(
        flags, "00",
        "the inbound proxy followed the outbound one's decision"
    );

    let marker = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    mesh.get("/", &[("traceparent", marker)]).await;
    collector
        .wait_trace("0af7651916cd43dd8448eb211c80319c", 2)
        .await;
    assert!(collector.trace(&trace).is_empty());
    assert_eq!(collector.spans().len(), 2);
    let out = &mesh.client.access_log()[0];
    assert_eq!(
        out["trace_id"].as_str(),
        Some(trace.as_str()),
        "the log names the trace it started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_is_a_client_span_of_its_own_under_the_same_parent() {
    let collector = Receiver::start(Mode::Accept);
    let bad = upstream::status(503, bind_local());
    let good = upstream::http("good", bind_local());
    let mut web = service("web", "10.96.0.10", 80, "http", &[bad, good]);
    web["routes"] = json!([{
        "name": "all",
        "retries": {"attempts": 1, "retryOn": ["5xx"], "backoffBaseMs": 1, "backoffMaxMs": 5},
    }]);
    let mut dir = ConfigDir::new();
    dir.publish(&config("client", vec![web], Some((&collector.url(), 0.0))));
    let proxy = start(&dir, &[]);
    proxy.wait_config_version("v1").await;
    // Round robin: one of two requests goes to the failing endpoint first and is retried.
    let traces = [
        "00-11111111111111111111111111111111-00f067aa0ba902b7-01",
        "00-22222222222222222222222222222222-00f067aa0ba902b7-01",
    ];
    for tp in traces {
        let r = get(proxy.outbound, "10.96.0.10:80", "/", &[("traceparent", tp)])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    collector.wait_trace(&"1".repeat(32), 1).await;
    collector.wait_trace(&"2".repeat(32), 1).await;
    support::eventually(
        "both access-log lines",
        Duration::from_secs(5),
        async || proxy.access_log().len() == 2,
    )
    .await;
    // One span per attempt, as many as the access log counts.
    let attempts: u64 = proxy
        .access_log()
        .iter()
        .map(|l| l["attempts"].as_u64().unwrap())
        .sum();
    assert!(attempts >= 3, "one request at least was retried");
    support::eventually("a span per attempt", Duration::from_secs(10), async || {
        collector.spans().len() as u64 == attempts
    })
    .await;
    let retried = ["1", "2"]
        .map(|d| collector.trace(&d.repeat(32)))
        .into_iter()
        .find(|t| t.len() == 2)
        .unwrap();
    let first = retried
        .iter()
        .find(|s| s.attribute("tandem.attempt").as_deref() == Some("1"))
        .unwrap();
    let second = retried
        .iter()
        .find(|s| s.attribute("tandem.attempt").as_deref() == Some("2"))
        .unwrap();
    assert!(first.is_client() && second.is_client());
    assert_eq!(first.parent_id(), PARENT);
    assert_eq!(
        second.parent_id(),
        PARENT,
        "retries are siblings, not children"
    );
    assert_ne!(first.span_id(), second.span_id());
    assert_eq!(
        first.attribute("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(first.attribute("error.type").as_deref(), Some("503"));
    assert_eq!(first.span.status.as_ref().unwrap().code, 2, "error status");
    assert_eq!(
        second.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(second.span.status.as_ref().unwrap().code, 0);
    assert_eq!(first.span.name, "web.test:80/all");
    assert_eq!(first.attribute("tandem.route").as_deref(), Some("all"));
    assert_eq!(
        first.attribute("network.peer.port").as_deref(),
        Some(bad.port().to_string().as_str())
    );
    assert_eq!(
        second.attribute("network.peer.port").as_deref(),
        Some(good.port().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_while_requests_succeed() {
    // A collector that never answers holds the export task in its first call (10 s), so the
    // two-span queue fills and every later span is dropped.
    let collector = Receiver::start(Mode::Hang);
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "client",
        vec![service("app", "127.0.0.1", app.port(), "http", &[app])],
        Some((&collector.url(), 100.0)),
    ));
    let proxy = start(&dir, &["--trace-queue", "2"]);
    proxy.wait_config_version("v1").await;
    let authority = format!("127.0.0.1:{}", app.port());
    // The first span's export is sent, and hangs.
    assert_eq!(
        get(proxy.outbound, &authority, "/", &[])
            .await
            .unwrap()
            .status,
        200
    );
    support::eventually(
        "the first export under way",
        Duration::from_secs(10),
        async || !collector.requests.lock().unwrap().is_empty(),
    )
    .await;
    for _ in 0..20 {
        let r = get(proxy.outbound, &authority, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let (_, metrics) = proxy.admin("/metrics").await;
    let dropped = metric(
        &metrics,
        r#"tandem_trace_spans_dropped_total{reason="queue-full"}"#,
    );
    // 20 spans while the export hangs: 2 fit in the queue, 18 are dropped (16 should the
    // export's 10 s timeout pass and free the queue once).
    assert!(dropped >= 16, "{metrics}");
    assert_eq!(metric(&metrics, "tandem_trace_spans_exported_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_is_counted_and_its_spans_dropped() {
    let collector = Receiver::start(Mode::Fail(500));
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "client",
        vec![service("app", "127.0.0.1", app.port(), "http", &[app])],
        Some((&collector.url(), 100.0)),
    ));
    let proxy = start(&dir, &[]);
    proxy.wait_config_version("v1").await;
    let authority = format!("127.0.0.1:{}", app.port());
    assert_eq!(
        get(proxy.outbound, &authority, "/", &[])
            .await
            .unwrap()
            .status,
        200
    );
    support::eventually(
        "the export error counted",
        Duration::from_secs(10),
        async || {
            let (_, metrics) = proxy.admin("/metrics").await;
            metric(&metrics, "tandem_trace_export_errors_total") == 1
        },
    )
    .await;
    let (_, metrics) = proxy.admin("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"tandem_trace_spans_dropped_total{reason="export-failed"}"#
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_nothing_is_exported_until_a_reload_turns_it_on() {
    let collector = Receiver::start(Mode::Accept);
    let app = upstream::http("app", bind_local());
    let services = vec![service("app", "127.0.0.1", app.port(), "http", &[app])];
    let mut dir = ConfigDir::new();
    dir.publish(&config("client", services.clone(), None));
    let proxy = start(&dir, &[]);
    proxy.wait_config_version("v1").await;
    let authority = format!("127.0.0.1:{}", app.port());
    let r = get(proxy.outbound, &authority, "/", &[("traceparent", TP)])
        .await
        .unwrap();
    assert_eq!(
        r.headers["echo-traceparent"], TP,
        "untouched without tracing"
    );
    let r = get(proxy.outbound, &authority, "/", &[]).await.unwrap();
    assert!(
        r.headers.get("echo-traceparent").is_none(),
        "nothing added without tracing"
    );

    // The same proxy, tracing turned on by a new config version.
    let mut on: Value =
        serde_json::from_str(&config("client", services, Some((&collector.url(), 0.0)))).unwrap();
    on["version"] = json!("v2");
    dir.publish(&on.to_string());
    proxy.wait_config_version("v2").await;
    let marker = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    get(proxy.outbound, &authority, "/", &[("traceparent", marker)])
        .await
        .unwrap();
    collector
        .wait_trace("0af7651916cd43dd8448eb211c80319c", 1)
        .await;
    assert_eq!(collector.spans().len(), 1, "nothing from before the reload");
    let log = proxy.access_log();
    assert_eq!(
        (log[0]["trace_id"].as_str(), log[0]["span_id"].as_str()),
        (Some(TRACE), Some(PARENT))
    );
    assert_eq!(
        (log[1]["trace_id"].as_str(), log[1]["span_id"].as_str()),
        (Some(""), Some(""))
    );
}

/// A sample's value in a Prometheus exposition (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}
