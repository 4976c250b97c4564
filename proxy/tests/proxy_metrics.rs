//! The standard metrics (Istio's shape) over real sockets: a client proxy (outbound) and a
//! server proxy (inbound) in front of a real HTTP/1.1 + h2c app, a known mix of 200, 503 and
//! gRPC errors, and the exact count of every full label set on both sides; every sample has
//! every label; `promtool check metrics` (Debian's `prometheus` package) accepts the
//! exposition; the `istio` prefix names the same series `istio_*`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::upstream::bind_local;
use support::{ConfigDir, Proxy, ProxyOptions, get, h2_client, service_with};

/// Labels every standard sample must carry.
const LABELS: [&str; 19] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The app: `/ok` 200, `/fail` 503, `/grpc/trailers` a gRPC response whose trailers say
/// `grpc-status: 14`, `/grpc/only` a trailers-only gRPC response with `grpc-status: 14`.
/// Every response says in `saw-peer` whether the request still carried `x-tandem-peer`.
fn app() -> SocketAddr {
    let listener = bind_local();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

type Body = BoxBody<Bytes, Infallible>;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let saw = if req.headers().contains_key("x-tandem-peer") {
        "yes"
    } else {
        "no"
    };
    let path = req.uri().path().to_owned();
    let _ = req.into_body().collect().await;
    let builder = Response::builder().header("saw-peer", saw);
    let full = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes())).boxed();
    let response = match path.as_str() {
        "/ok" => builder.status(200).body(full("ok")),
        "/fail" => builder.status(503).body(full("down")),
        "/grpc/trailers" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "14".parse().unwrap());
            let frames = futures::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                Ok(Frame::trailers(trailers)),
            ]);
            builder
                .status(200)
                .header("content-type", "application/grpc")
                .body(StreamBody::new(frames).boxed())
        }
        "/grpc/only" => builder
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .body(Empty::new().boxed()),
        _ => builder.status(404).body(full("")),
    };
    Ok(response.unwrap())
}

/// The config of the client proxy: service `test/app` on 127.0.0.1:<app port>, whose one
/// endpoint is the server proxy's inbound listener, of workload `test/server-v1`; a named
/// route `api` that retries 5xx once.
fn client_config(app: SocketAddr, endpoint: SocketAddr, telemetry: Option<Value>) -> String {
    let endpoints = vec![json!({
        "address": endpoint.to_string(),
        "meshed": true,
        "workload": {"name": "server-v1", "namespace": "test"},
    })];
    let mut service = service_with("app", "127.0.0.1", app.port(), "detect", endpoints);
    service["routes"] = json!([{
        "name": "api",
        "retries": {"attempts": 1, "retryOn": ["5xx"], "backoffBaseMs": 1, "backoffMaxMs": 5},
    }]);
    let mut config = json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": "client",
        "workload": {"namespace": "test", "serviceAccount": "client"},
        "services": [service],
    });
    if let Some(telemetry) = telemetry {
        config["telemetry"] = telemetry;
    }
    config.to_string()
}

fn server_config() -> String {
    json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": "server",
        "workload": {"namespace": "test", "serviceAccount": "server"},
    })
    .to_string()
}

fn start(config: &ConfigDir, workload: &str) -> Proxy {
    let mut opts = ProxyOptions::loopback(config.path());
    opts.extra = vec!["--workload-name".into(), workload.into()];
    Proxy::start_with(opts)
}

/// The two proxies and the app.
struct Mesh {
    app: SocketAddr,
    client: Proxy,
    server: Proxy,
    _dirs: (ConfigDir, ConfigDir),
}

async fn mesh(telemetry: Option<Value>) -> Mesh {
    let app = app();
    let mut server_dir = ConfigDir::new();
    server_dir.publish(&server_config());
    let server = start(&server_dir, "server-v1");
    let mut client_dir = ConfigDir::new();
    client_dir.publish(&client_config(app, server.inbound, telemetry));
    let client = start(&client_dir, "client");
    client.wait_config_version("client").await;
    server.wait_config_version("server").await;
    Mesh {
        app,
        client,
        server,
        _dirs: (client_dir, server_dir),
    }
}

impl Mesh {
    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.app.port())
    }

    async fn http(&self, path: &str) -> support::Reply {
        get(self.client.outbound, &self.authority(), path, &[])
            .await
            .unwrap()
    }

    /// One gRPC call over h2c; its HTTP status, and its grpc-status from trailers or headers.
    async fn grpc(&self, path: &str) -> (u16, String) {
        let mut h2 = h2_client(self.client.outbound).await.unwrap();
        let req = Request::post(format!("http://{}{path}", self.authority()))
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")).boxed())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await.unwrap();
        let grpc = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or(headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, grpc)
    }
}

/// The full label set, in the exposition's order.
struct Series<'a> {
    reporter: &'a str,
    code: u16,
    protocol: &'a str,
    grpc: &'a str,
    flags: &'a str,
    route: &'a str,
}

impl Series<'_> {
    fn labels(&self) -> String {
        format!(
            "reporter=\"{}\",source_workload=\"client\",source_workload_namespace=\"test\",\
             source_principal=\"unknown\",source_canonical_service=\"client\",\
             source_canonical_revision=\"latest\",destination_workload=\"server-v1\",\
             destination_workload_namespace=\"test\",destination_principal=\"unknown\",\
             destination_canonical_service=\"server-v1\",destination_canonical_revision=\"latest\",\
             destination_service=\"app.test.svc.cluster.local\",destination_service_name=\"app\",\
             destination_service_namespace=\"test\",request_protocol=\"{}\",response_code=\"{}\",\
             grpc_response_status=\"{}\",response_flags=\"{}\",\
             connection_security_policy=\"none\",route=\"{}\"",
            self.reporter, self.protocol, self.code, self.grpc, self.flags, self.route
        )
    }
}

/// The value of `name{labels}` in the exposition, if that exact series is there.
fn value(text: &str, name: &str, labels: &str) -> Option<u64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// Every sample of the standard families, with its label names.
fn standard_samples<'t>(text: &'t str, prefix: &str) -> Vec<(&'t str, Vec<&'t str>)> {
    let families = [
        "requests_total",
        "request_duration_milliseconds",
        "request_bytes",
        "response_bytes",
        "tcp_connections_opened_total",
        "tcp_connections_closed_total",
        "tcp_sent_bytes_total",
        "tcp_received_bytes_total",
    ];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            families
                .iter()
                .any(|f| l.starts_with(&format!("{prefix}{f}")))
        })
        .map(|l| {
            let labels = l
                .split_once('{')
                .and_then(|(_, rest)| rest.rsplit_once('}'))
                .map_or("", |(labels, _)| labels);
            let names = labels
                .split("\",")
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k))
                .collect();
            (l, names)
        })
        .collect()
}

/// Runs `promtool check metrics` on the exposition: it must parse (exit 1 is a parse error),
/// and the only lint findings (exit 3) allowed are two known ones: `no help text` on counters
/// (prometheus-client writes a counter's `# HELP` under its family name, `x` for samples
/// `x_total`, as OpenMetrics does; the 0.0.4 linter looks for `x_total`) and the unit of
/// `request_duration_milliseconds` (Istio's name, which its dashboards query).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `make proxy-deps` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "promtool check metrics: {}\n{findings}",
        out.status
    );
    for finding in findings.lines() {
        let known = finding.ends_with(" no help text")
            || finding
                == format!(
                    "{}request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"",
                    finding
                        .split_once("request_duration")
                        .map_or("", |(p, _)| p)
                );
        assert!(known, "promtool check metrics: {finding}\n{findings}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_proxies_count_every_request_under_its_full_istio_label_set() {
    let mesh = mesh(None).await;
    for _ in 0..5 {
        let r = mesh.http("/ok").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        // The inbound proxy strips the peer header before the app.
        assert_eq!(r.headers["saw-peer"], "no");
    }
    for _ in 0..3 {
        assert_eq!(mesh.http("/fail").await.status, 503);
    }
    for path in [
        "/grpc/trailers",
        "/grpc/trailers",
        "/grpc/only",
        "/grpc/only",
    ] {
        assert_eq!(mesh.grpc(path).await, (200, "14".to_owned()), "{path}");
    }
    // Each proxy records a request when its access-log line is written, after the response.
    support::eventually("both proxies logged", Duration::from_secs(5), async || {
        mesh.client.access_log().len() == 12 && mesh.server.access_log().len() == 15
    })
    .await;

    let (_, client) = mesh.client.admin("/metrics").await;
    let (_, server) = mesh.server.admin("/metrics").await;
    let requests = "tandem_requests_total";
    let source = |code, protocol, grpc, flags| Series {
        reporter: "source",
        code,
        protocol,
        grpc,
        flags,
        route: "api",
    };
    // Outbound: the route is named; the 503s were retried once and stopped by the limit.
    for (series, count) in [
        (source(200, "http", "", "-"), 5),
        (source(503, "http", "", "URX"), 3),
        (source(200, "grpc", "14", "-"), 4),
    ] {
        assert_eq!(
            value(&client, requests, &series.labels()),
            Some(count),
            "{}\n{client}",
            series.labels()
        );
    }
    // Inbound: every attempt arrives (3 × 2 for the 503s), the caller known from the peer
    // header, no route (routes are outbound).
    let destination = |code, protocol, grpc| Series {
        reporter: "destination",
        code,
        protocol,
        grpc,
        flags: "-",
        route: "unknown",
    };
    for (series, count) in [
        (destination(200, "http", ""), 5),
        (destination(503, "http", ""), 6),
        (destination(200, "grpc", "14"), 4),
    ] {
        assert_eq!(
            value(&server, requests, &series.labels()),
            Some(count),
            "{}\n{server}",
            series.labels()
        );
    }
    // No other request series on either side.
    for text in [&client, &server] {
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("tandem_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, if text == &client { 12 } else { 15 }, "{text}");
    }
    // Durations and sizes are recorded for the same label sets.
    let ok = source(200, "http", "", "-").labels();
    assert_eq!(
        value(&client, "tandem_request_duration_milliseconds_count", &ok),
        Some(5)
    );
    assert!(
        client.contains(&format!("tandem_response_bytes_sum{{{ok}}} 10.0")),
        "{client}"
    );

    for text in [&client, &server] {
        let samples = standard_samples(text, "tandem_");
        assert!(samples.len() > 50, "{text}");
        for (line, names) in &samples {
            for label in LABELS {
                assert!(names.contains(&label), "{label} missing: {line}");
            }
            assert!(!line.contains("=\"\",") || line.contains("grpc_response_status=\"\""));
        }
        promtool_check(text);
    }

    // The access log names both workloads on both sides.
    for line in [&mesh.client.access_log()[0], &mesh.server.access_log()[0]] {
        assert_eq!(line["source_workload"], "client", "{line}");
        assert_eq!(line["source_namespace"], "test", "{line}");
        assert_eq!(line["destination_workload"], "server-v1", "{line}");
        assert_eq!(line["destination_namespace"], "test", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_istio_prefix_names_the_same_series_for_istios_dashboards() {
    let mesh = mesh(Some(json!({"metricsPrefix": "istio"}))).await;
    assert_eq!(mesh.http("/ok").await.status, 200);
    support::eventually("the client logged", Duration::from_secs(5), async || {
        mesh.client.access_log().len() == 1
    })
    .await;
    let (_, client) = mesh.client.admin("/metrics").await;
    let ok = Series {
        reporter: "source",
        code: 200,
        protocol: "http",
        grpc: "",
        flags: "-",
        route: "api",
    };
    assert_eq!(
        value(&client, "istio_requests_total", &ok.labels()),
        Some(1),
        "{client}"
    );
    for family in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
    ] {
        assert!(client.contains(&format!("# TYPE {family} ")), "{family}");
    }
    assert!(!client.contains("tandem_requests_total"), "{client}");
    // The proxy's own series keep their names.
    assert!(client.contains("tandem_config_reloads_total"), "{client}");
    for (line, names) in standard_samples(&client, "istio_") {
        for label in LABELS {
            assert!(names.contains(&label), "{label} missing: {line}");
        }
    }
    promtool_check(&client);
    // The server proxy's config keeps the default prefix.
    let (_, server) = mesh.server.admin("/metrics").await;
    assert!(server.contains("tandem_requests_total{"), "{server}");
}
