//! The transparent path for real: two "pods" (network namespaces joined by a veth pair), iptables
//! REDIRECT rules in each, the proxy running as UID 2102 in both, and applications that know
//! nothing of the mesh. Needs root; fails (never skips) without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::netns::{Netns, Pods, SERVER_IP};
use support::upstream;
use support::{ConfigDir, Proxy, ProxyOptions, config, service};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// An unprivileged application user in the client pod.
const APP_UID: u32 = 2103;

fn start_proxy(ns: &Netns, dir: &ConfigDir) -> Proxy {
    let mut opts = ProxyOptions::loopback(dir.path());
    opts.outbound = "0.0.0.0:15001".into();
    opts.inbound = "0.0.0.0:15006".into();
    opts.admin = "0.0.0.0:15020".into();
    opts.wrapper = ns.as_uid(tandem_crds::names::PROXY_UID);
    Proxy::start_with(opts)
}

/// `curl` run by an unprivileged user inside `ns`.
fn curl(ns: &Netns, url: &str) -> String {
    let mut argv = ns.as_uid(APP_UID);
    argv.extend(["curl", "-sS", "--max-time", "10", url].map(String::from));
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn admin(ns: &Netns, path: &'static str) -> String {
    ns.block_on(move || async move {
        support::get("127.0.0.1:15020".parse().unwrap(), "localhost", path, &[])
            .await
            .unwrap()
            .body
    })
}

fn uid_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_are_routed_by_their_original_destination() {
    let pods = Pods::new();
    pods.capture();
    let app = upstream::http("app", pods.server.bind("0.0.0.0:8080"));
    upstream::tcp_echo(pods.server.bind("0.0.0.0:7000"));
    upstream::server_first(pods.server.bind("0.0.0.0:2525"));
    let endpoint = |port: u16| SocketAddr::new(SERVER_IP.parse().unwrap(), port);

    let mut client_cfg = ConfigDir::new();
    client_cfg.publish(&config(
        "client",
        vec![
            service("app", "10.96.0.10", 80, "detect", &[endpoint(app.port())]),
            service("smtp", "10.96.0.25", 25, "detect", &[endpoint(2525)]),
        ],
    ));
    let mut server_cfg = ConfigDir::new();
    server_cfg.publish(&config("server", vec![]));
    let client_proxy = start_proxy(&pods.client, &client_cfg);
    let server_proxy = start_proxy(&pods.server, &server_cfg);
    assert_eq!(uid_of(client_proxy.child.id()), "2102");
    assert_eq!(uid_of(server_proxy.child.id()), "2102");

    // HTTP to a service's cluster IP, by an unprivileged app: outbound (SO_ORIGINAL_DST picks
    // the service, round-robin picks the endpoint), then inbound, then the app.
    assert_eq!(
        curl(&pods.client, "http://10.96.0.10/hello"),
        "app GET /hello"
    );
    // HTTP to an address the config does not know: passed through unchanged.
    assert_eq!(
        curl(&pods.client, &format!("http://{SERVER_IP}:8080/direct")),
        "app GET /direct"
    );

    // A server-first protocol, to a service with an undeclared protocol and to a plain address:
    // the greeting arrives although the client says nothing first.
    for target in ["10.96.0.25:25".to_owned(), format!("{SERVER_IP}:2525")] {
        let reply = pods.client.block_on(move || async move {
            let tcp = TcpStream::connect(&target).await.unwrap();
            let mut lines = BufReader::new(tcp);
            let mut greeting = String::new();
            lines.read_line(&mut greeting).await.unwrap();
            lines.get_mut().write_all(b"EHLO tandem\r\n").await.unwrap();
            let mut answer = String::new();
            lines.read_line(&mut answer).await.unwrap();
            (greeting, answer)
        });
        assert_eq!(reply.0, "220 tandem-test ready\r\n");
        assert_eq!(reply.1, "250 EHLO tandem\r\n");
    }

    // Opaque bytes (a TLS ClientHello prefix and binary) are relayed byte for byte.
    let echoed = pods.client.block_on(|| async move {
        let mut tcp = TcpStream::connect(format!("{SERVER_IP}:7000"))
            .await
            .unwrap();
        let payload: Vec<u8> = [0x16, 0x03, 0x01, 0x00, 0xa5]
            .into_iter()
            .chain((0..=255u8).cycle().take(100_000))
            .collect();
        tcp.write_all(&payload).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.unwrap();
        back == payload
    });
    assert!(echoed, "echoed bytes differ");

    // The admin port of the server pod is not reachable through its capture listener.
    let leaked = pods.client.block_on(|| async move {
        let mut tcp = TcpStream::connect(format!("{SERVER_IP}:15020"))
            .await
            .unwrap();
        let _ = tcp
            .write_all(b"GET /config HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut back = Vec::new();
        let _ = tcp.read_to_end(&mut back).await;
        String::from_utf8_lossy(&back).into_owned()
    });
    assert!(
        leaked.is_empty(),
        "admin answered through the inbound listener: {leaked}"
    );

    let metrics = admin(&pods.client, "/metrics");
    let sum = |name, labels: &[(&str, &str)]| support::series_sum(&metrics, name, labels);
    let app = [
        ("reporter", "source"),
        ("destination_service", "app.test.svc.cluster.local"),
        ("response_code", "200"),
    ];
    assert_eq!(sum("tandem_requests_total", &app), Some(1), "{metrics}");
    let smtp = [
        ("destination_service", "smtp.test.svc.cluster.local"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        sum("tandem_tcp_connections_opened_total", &smtp),
        Some(1),
        "{metrics}"
    );
    // Passthrough: a destination the config does not know.
    let passthrough = [("reporter", "source"), ("destination_service", "unknown")];
    assert!(
        sum("tandem_tcp_received_bytes_total", &passthrough).is_some(),
        "{metrics}"
    );
    let metrics = admin(&pods.server, "/metrics");
    assert_eq!(
        support::series_sum(
            &metrics,
            "tandem_requests_total",
            &[("reporter", "destination")]
        ),
        Some(2),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_rules_of_tandem_proxy_init_an_app_reaches_a_service_through_both_sidecars() {
    let pods = Pods::new();
    pods.init();
    let app = upstream::http("app", pods.server.bind("0.0.0.0:8080"));
    upstream::server_first(pods.server.bind("0.0.0.0:2525"));
    let endpoint = |port: u16| SocketAddr::new(SERVER_IP.parse().unwrap(), port);
    let mut client_cfg = ConfigDir::new();
    client_cfg.publish(&config(
        "client",
        vec![service(
            "app",
            "10.96.0.10",
            80,
            "http",
            &[endpoint(app.port())],
        )],
    ));
    let mut server_cfg = ConfigDir::new();
    server_cfg.publish(&config("server", vec![]));
    let _client_proxy = start_proxy(&pods.client, &client_cfg);
    let server_proxy = start_proxy(&pods.server, &server_cfg);

    assert_eq!(
        curl(&pods.client, "http://10.96.0.10/via-init"),
        "app GET /via-init"
    );
    let greeting = pods.client.block_on(move || async move {
        let tcp = TcpStream::connect(format!("{SERVER_IP}:2525"))
            .await
            .unwrap();
        let mut lines = BufReader::new(tcp);
        let mut greeting = String::new();
        lines.read_line(&mut greeting).await.unwrap();
        greeting
    });
    assert_eq!(greeting, "220 tandem-test ready\r\n");
    // tandem-init leaves the admin port out of capture, so probes reach it directly.
    assert_eq!(
        curl(&pods.client, &format!("http://{SERVER_IP}:15020/live")),
        "live\n"
    );
    support::eventually(
        "the inbound request is logged",
        std::time::Duration::from_secs(5),
        async || {
            server_proxy
                .access_log()
                .iter()
                .any(|l| l["path"] == "/via-init")
        },
    )
    .await;
}
