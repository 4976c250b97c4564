//! Mutual TLS between two proxies over real sockets: embedded proxies whose identities come
//! from a test CA, a wiretap between the hops recording what crosses the wire, HTTP/1, h2 and
//! opaque TCP, the permissive and strict modes, refused certificates counted by cause, foreign
//! TLS passed through, certificate renewal under load and a two-root bundle.
//!
//! The opaque-TCP and foreign-TLS cases need an original destination, so they run in two
//! network namespaces with iptables REDIRECT rules (root required, like `proxy_transparent`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::ca::{Leaf, TestCa, identity};
use support::mesh::{MeshProxy, Wiretap, config, contains, meshed_service};
use support::netns::{Pods, SERVER_IP};
use support::upstream::{self, bind_local};
use support::{ConfigDir, H1Client, eventually, get, h2_client};
use tandem_proxy::identity::IdentityState;
use tandem_proxy::tls::probes::AppProbes;

const CLIENT: &str = "spiffe://cluster.local/ns/test/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/test/sa/server";
const MARKER: &str = "tandem-plaintext-marker-7f3a";

/// An app behind a server proxy, a wiretap in front of the server proxy's inbound listener, and
/// a client proxy whose config says the app's endpoint (the wiretap) is `test/server`.
struct TwoHops {
    app: SocketAddr,
    server: MeshProxy,
    client: MeshProxy,
    wiretap: Wiretap,
    _dirs: (ConfigDir, ConfigDir),
}

impl TwoHops {
    fn start(
        protocol: &str,
        mode: &str,
        server: Arc<IdentityState>,
        client: Arc<IdentityState>,
    ) -> Self {
        let app = upstream::http("app", bind_local());
        let mut server_dir = ConfigDir::new();
        server_dir.publish(&config("server", "server", mode, vec![]));
        let server = MeshProxy::start(&server_dir.path(), server);
        let wiretap = Wiretap::start(bind_local(), server.inbound);
        let client_dir = client_config("app", "127.0.0.1", app.port(), protocol, wiretap.addr);
        let client = MeshProxy::start(&client_dir.path(), client);
        Self {
            app,
            server,
            client,
            wiretap,
            _dirs: (server_dir, client_dir),
        }
    }

    /// Both sides meshed under one CA.
    fn meshed(protocol: &str, mode: &str) -> (TestCa, Self) {
        let ca = TestCa::root("root");
        let server = identity(ca.issue(Leaf::new("test", "server")), &[&ca]);
        let client = identity(ca.issue(Leaf::new("test", "client")), &[&ca]);
        let hops = Self::start(protocol, mode, server, client);
        (ca, hops)
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.app.port())
    }

    async fn get(&self, path: &str) -> anyhow::Result<support::Reply> {
        get(
            self.client.outbound,
            &self.authority(),
            path,
            &[("x-marker", MARKER)],
        )
        .await
    }
}

/// A permissive `test/client` config whose one service, `test/<name>` on `cluster_ip:port`,
/// has one meshed endpoint, `endpoint`, with the identity [`SERVER`].
fn client_config(
    name: &str,
    cluster_ip: &str,
    port: u16,
    protocol: &str,
    endpoint: SocketAddr,
) -> ConfigDir {
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "client",
        "client",
        "permissive",
        vec![meshed_service(
            name,
            cluster_ip,
            port,
            protocol,
            &[(endpoint, SERVER)],
        )],
    ));
    dir
}

/// What `wiretap` saw is TLS from its first byte, and [`MARKER`] never crossed in plaintext.
fn assert_encrypted(wiretap: &Wiretap) {
    let wire = wiretap.bytes();
    assert_eq!(
        wire.first(),
        Some(&0x16),
        "the hop starts with a TLS record"
    );
    assert!(
        !contains(&wire, MARKER.as_bytes()),
        "plaintext crossed the wire"
    );
}

fn handshakes(proxy: &MeshProxy, direction: &str, result: &str) -> u64 {
    proxy.counter(&format!(
        r#"tandem_tls_handshakes_total{{direction="{direction}",result="{result}"}}"#
    ))
}

fn refused(proxy: &MeshProxy, reason: &str) -> u64 {
    proxy.counter(&format!(
        r#"tandem_inbound_connections_refused_total{{reason="{reason}"}}"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_between_meshed_proxies_is_mutual_tls_and_the_server_logs_the_client_identity() {
    let (_ca, hops) = TwoHops::meshed("http", "permissive");
    const REQUESTS: u64 = 20;
    for i in 0..REQUESTS {
        let r = hops.get(&format!("/{MARKER}/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, format!("app GET /{MARKER}/{i}"));
    }

    assert_encrypted(&hops.wiretap);

    eventually(
        "access logs on both hops",
        Duration::from_secs(5),
        async || {
            hops.server.access_log().len() == REQUESTS as usize
                && hops.client.access_log().len() == REQUESTS as usize
        },
    )
    .await;
    for line in hops.server.access_log() {
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["peer_identity"], CLIENT);
        assert_eq!(line["connection_security_policy"], "mutual_tls");
    }
    for line in hops.client.access_log() {
        assert_eq!(line["peer_identity"], SERVER);
        assert_eq!(line["connection_security_policy"], "mutual_tls");
    }
    assert!(hops.server.metrics().contains(&format!(
        r#"tandem_tls_peer_connections_total{{direction="inbound",peer_identity="{CLIENT}"}}"#
    )));
    let inbound_mtls = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", CLIENT),
    ];
    assert!(
        support::series_sum(
            &hops.server.metrics(),
            "tandem_requests_total",
            &inbound_mtls
        )
        .is_some_and(|n| n > 0),
        "{}",
        hops.server.metrics()
    );

    // The client's pool keeps the upstream connection: handshakes are rare, not per request.
    let outbound = handshakes(&hops.client, "outbound", "success");
    let inbound = handshakes(&hops.server, "inbound", "success");
    eprintln!("{REQUESTS} HTTP/1.1 requests: {outbound} outbound, {inbound} inbound handshakes");
    assert!((1..=2).contains(&outbound), "{outbound} handshakes");
    assert_eq!(inbound, outbound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_between_meshed_proxies_is_mutual_tls_on_one_connection() {
    let (_ca, hops) = TwoHops::meshed("http2", "permissive");
    let sender = h2_client(hops.client.outbound).await.unwrap();
    let call = |i: usize| {
        let mut sender = sender.clone();
        let uri = format!("http://{}/{MARKER}/{i}", hops.authority());
        tokio::spawn(async move {
            let req = hyper::Request::get(uri)
                .header("x-marker", MARKER)
                .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
        })
    };
    // One request first: until an upstream h2 connection is up, Pingora opens one per request;
    // after that, concurrent requests share it.
    call(0).await.unwrap();
    let calls: Vec<_> = (1..=10).map(call).collect();
    for c in calls {
        c.await.unwrap();
    }
    assert_encrypted(&hops.wiretap);
    eventually("server access log", Duration::from_secs(5), async || {
        hops.server.access_log().len() == 11
    })
    .await;
    for line in hops.server.access_log() {
        assert_eq!(line["peer_identity"], CLIENT);
        assert_eq!(line["connection_security_policy"], "mutual_tls");
    }
    let inbound_mtls = [
        ("reporter", "destination"),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", CLIENT),
    ];
    assert!(
        support::series_sum(
            &hops.server.metrics(),
            "tandem_requests_total",
            &inbound_mtls
        )
        .is_some_and(|n| n > 0),
        "{}",
        hops.server.metrics()
    );
    assert_eq!(handshakes(&hops.client, "outbound", "success"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_server_refuses_a_plaintext_client_and_accepts_a_meshed_one() {
    let (_ca, hops) = TwoHops::meshed("http", "strict");
    let plain = get(hops.server.inbound, &hops.authority(), "/", &[]).await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");
    assert_eq!(refused(&hops.server, "plaintext"), 1);

    let r = hops.get("/meshed").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(handshakes(&hops.server, "inbound", "success"), 1);
    // The admin port is never subject to the mode.
    let live = get(hops.server.admin, "localhost", "/live", &[])
        .await
        .unwrap();
    assert_eq!(live.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_server_lets_the_kubelets_plaintext_probes_through_and_nothing_else() {
    let ca = TestCa::root("root");
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config("server", "server", "strict", vec![]));
    let probes =
        AppProbes::parse(&format!(r#"[{{"port":{},"path":"/healthz"}}]"#, app.port())).unwrap();
    let server = MeshProxy::start_with_probes(
        &dir.path(),
        identity(ca.issue(Leaf::new("test", "server")), &[&ca]),
        probes,
    );
    let authority = format!("127.0.0.1:{}", app.port());
    let probe = get(server.inbound, &authority, "/healthz", &[])
        .await
        .unwrap();
    assert_eq!(probe.status, 200, "{probe:?}");
    let other = get(server.inbound, &authority, "/secret", &[])
        .await
        .unwrap();
    assert_eq!(other.status, 403, "{other:?}");
    let wrong_port = get(server.inbound, "127.0.0.1:1", "/healthz", &[])
        .await
        .unwrap();
    assert_eq!(wrong_port.status, 403, "{wrong_port:?}");
    assert_eq!(refused(&server, "plaintext"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_server_accepts_plaintext_and_mutual_tls() {
    let (_ca, hops) = TwoHops::meshed("http", "permissive");
    let plain = get(hops.server.inbound, &hops.authority(), "/plain", &[])
        .await
        .unwrap();
    assert_eq!(plain.status, 200);
    let meshed = hops.get("/meshed").await.unwrap();
    assert_eq!(meshed.status, 200);
    eventually("server access log", Duration::from_secs(5), async || {
        hops.server.access_log().len() == 2
    })
    .await;
    let log = hops.server.access_log();
    let by_path = |p: &str| log.iter().find(|l| l["path"] == p).unwrap().clone();
    assert_eq!(by_path("/plain")["connection_security_policy"], "none");
    assert_eq!(by_path("/plain")["peer_identity"], "");
    assert_eq!(
        by_path("/meshed")["connection_security_policy"],
        "mutual_tls"
    );
    assert_eq!(refused(&hops.server, "plaintext"), 0);
}

/// A client proxy presenting `leaf` (from `issuer`) to a server meshed under `ca`.
async fn refused_client_cert(ca: &TestCa, issuer: &TestCa, leaf: Leaf, reason: &str) {
    let server = identity(ca.issue(Leaf::new("test", "server")), &[ca]);
    let client = identity(issuer.issue(leaf), &[ca]);
    let hops = TwoHops::start("http", "permissive", server, client);
    let r = hops.get("/").await.unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    eventually(reason, Duration::from_secs(5), async || {
        handshakes(&hops.server, "inbound", reason) >= 1
    })
    .await;
    assert_eq!(handshakes(&hops.server, "inbound", "success"), 0);
    assert!(
        hops.server.access_log().is_empty(),
        "a refused client reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_trust_domain_is_refused_as_wrong_trust_domain() {
    let ca = TestCa::root("root");
    let leaf = Leaf::new("test", "client").in_trust_domain("other.example");
    refused_client_cert(&ca, &ca, leaf, "wrong-trust-domain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_as_expired() {
    let ca = TestCa::root("root");
    refused_client_cert(&ca, &ca, Leaf::new("test", "client").expired(), "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_an_unknown_root_is_refused_as_untrusted() {
    let ca = TestCa::root("root");
    let stranger = TestCa::root("stranger");
    refused_client_cert(&ca, &stranger, Leaf::new("test", "client"), "untrusted").await;
}

/// A TLS server that answers any SNI with a valid certificate for `test/impostor` (signed by
/// `ca`) and negotiates `alpn`; the flag says whether any handshake completed.
fn impostor(
    ca: &TestCa,
    listener: std::net::TcpListener,
    alpn: &[u8],
) -> (SocketAddr, Arc<AtomicBool>) {
    let impostor = ca.issue(Leaf::new("test", "impostor"));
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(impostor.chain.clone(), impostor.key.clone_key().into())
    .unwrap();
    server_config.alpn_protocols = vec![alpn.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let reached = Arc::new(AtomicBool::new(false));
    let flag = reached.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let flag = flag.clone();
            tokio::spawn(async move {
                if acceptor.accept(tcp).await.is_ok() {
                    flag.store(true, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, reached)
}

/// No outbound handshake of `proxy` succeeded, and the impostor never completed one.
fn assert_impostor_never_served(proxy: &MeshProxy, reached: &AtomicBool) {
    assert_eq!(handshakes(proxy, "outbound", "success"), 0);
    assert!(
        !reached.load(Ordering::Relaxed),
        "the impostor completed a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_is_for_another_service_account_is_refused_as_wrong_identity() {
    let ca = TestCa::root("root");
    let (impostor_addr, reached) = impostor(&ca, bind_local(), b"http/1.1");
    let client = identity(ca.issue(Leaf::new("test", "client")), &[&ca]);
    let dir = client_config("app", "127.0.0.1", 18443, "http", impostor_addr);
    let proxy = MeshProxy::start(&dir.path(), client);
    let r = get(proxy.outbound, "127.0.0.1:18443", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(
        handshakes(&proxy, "outbound", "wrong-identity") >= 1,
        "{}",
        proxy.metrics()
    );
    assert_impostor_never_served(&proxy, &reached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_certificates_mid_stream_loses_no_request() {
    let ca = TestCa::root("root");
    let hops = Arc::new(TwoHops::start(
        "http",
        "strict",
        identity(ca.issue(Leaf::new("test", "server")), &[&ca]),
        identity(ca.issue(Leaf::new("test", "client")), &[&ca]),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let hops = hops.clone();
        let stop = stop.clone();
        let served = served.clone();
        workers.push(tokio::spawn(async move {
            let mut client = H1Client::connect(hops.client.outbound, &hops.authority())
                .await
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = client.get(&format!("/w{w}")).await.unwrap();
                assert_eq!(r.status, 200, "{r:?}");
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hops.client
            .identity
            .set_credentials(ca.issue(Leaf::new("test", "client")));
        hops.server
            .identity
            .set_credentials(ca.issue(Leaf::new("test", "server")));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let outbound = handshakes(&hops.client, "outbound", "success");
    eprintln!(
        "{} requests across 5 renewals: {outbound} outbound handshakes",
        served.load(Ordering::Relaxed)
    );
    // Each client renewal changes the pool key: new connections use the new certificate.
    assert!(
        outbound >= 6,
        "{outbound} handshakes: renewals were not picked up"
    );
    for reason in ["expired", "untrusted", "bad-san", "handshake"] {
        assert_eq!(handshakes(&hops.server, "inbound", reason), 0, "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_root_bundle_accepts_certificates_from_either_root() {
    let old = TestCa::root("old root");
    let new = TestCa::root("new root");
    let server = identity(old.issue(Leaf::new("test", "server")), &[&old, &new]);
    let client = identity(new.issue(Leaf::new("test", "client")), &[&old, &new]);
    let hops = TwoHops::start("http", "strict", server, client);
    assert_eq!(hops.get("/").await.unwrap().status, 200);
    hops.server
        .identity
        .set_credentials(new.issue(Leaf::new("test", "server")));
    hops.client
        .identity
        .set_credentials(old.issue(Leaf::new("test", "client")));
    assert_eq!(hops.get("/").await.unwrap().status, 200);
    assert_eq!(handshakes(&hops.server, "inbound", "success"), 2);
}

// ---------------------------------------------------------------------------------------------
// With an original destination: two network namespaces, iptables REDIRECT on both sides.

/// A port the server pod's app listens on; its inbound connections are redirected to the proxy.
const APP_PORT: u16 = 7000;
/// A cluster IP the client pod's outbound connections to which are redirected to its proxy.
const CLUSTER_IP: &str = "10.96.0.50";

/// Starts the server pod's proxy on `dir` as `test/server` under `ca`, and redirects TCP
/// arriving at the pod on `app_port` to its inbound listener.
fn start_server_in_pod(pods: &Pods, dir: &ConfigDir, ca: &TestCa, app_port: u16) -> MeshProxy {
    let server = MeshProxy::start_in(
        &pods.server,
        &dir.path(),
        identity(ca.issue(Leaf::new("test", "server")), &[ca]),
    );
    pods.server.redirect_tcp(
        "PREROUTING",
        &["--dport", &app_port.to_string()],
        server.inbound.port(),
    );
    server
}

/// Starts the client pod's proxy on `dir` as `test/client` under `ca`, and redirects the pod's
/// TCP to [`CLUSTER_IP`] to its outbound listener.
fn start_client_in_pod(pods: &Pods, dir: &ConfigDir, ca: &TestCa) -> MeshProxy {
    let client = MeshProxy::start_in(
        &pods.client,
        &dir.path(),
        identity(ca.issue(Leaf::new("test", "client")), &[ca]),
    );
    pods.client
        .redirect_tcp("OUTPUT", &["-d", CLUSTER_IP], client.outbound.port());
    client
}

/// A TLS server with its own certificate for `app.example` (the application's TLS, not
/// Tandem's), echoing what it reads; returns the certificate to trust.
fn app_tls_server(listener: std::net::TcpListener) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().clone();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![der.clone()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    der
}

/// Connects with TLS to `addr` as `app.example`, trusting `root`, sends `line`, returns the echo.
async fn app_tls_call(
    addr: SocketAddr,
    root: rustls::pki_types::CertificateDer<'static>,
    line: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("app.example").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(line).await?;
    let mut buf = vec![0u8; line.len()];
    tls.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_between_meshed_proxies_is_mutual_tls_to_the_original_destination() {
    let pods = Pods::new();
    let ca = TestCa::root("root");
    let echo = upstream::tcp_echo(pods.server.bind(&format!("0.0.0.0:{APP_PORT}")));
    let mut server_dir = ConfigDir::new();
    server_dir.publish(&config("server", "server", "strict", vec![]));
    let server = start_server_in_pod(&pods, &server_dir, &ca, echo.port());
    let app: SocketAddr = format!("{SERVER_IP}:{APP_PORT}").parse().unwrap();
    let wiretap = Wiretap::start_in(&pods.client, pods.client.bind("127.0.0.1:0"), app);
    let client_dir = client_config("echo", CLUSTER_IP, APP_PORT, "tcp", wiretap.addr);
    let client = start_client_in_pod(&pods, &client_dir, &ca);

    let echoed = pods.client.block_on(|| async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(format!("{CLUSTER_IP}:{APP_PORT}"))
            .await
            .unwrap();
        let line = format!("{MARKER}\n");
        tcp.write_all(line.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; line.len()];
        tcp.read_exact(&mut buf).await.unwrap();
        String::from_utf8(buf).unwrap()
    });
    assert_eq!(echoed, format!("{MARKER}\n"));

    assert_encrypted(&wiretap);
    assert_eq!(handshakes(&client, "outbound", "success"), 1);
    assert_eq!(handshakes(&server, "inbound", "success"), 1);
    eventually(
        "the relayed connection counted",
        Duration::from_secs(5),
        async || {
            let labels = [
                ("reporter", "destination"),
                ("request_protocol", "tcp"),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", CLIENT),
            ];
            support::series_sum(
                &server.metrics(),
                "tandem_tcp_connections_opened_total",
                &labels,
            ) == Some(1)
        },
    )
    .await;
    assert!(server.metrics().contains(&format!(
        r#"tandem_tls_peer_connections_total{{direction="inbound",peer_identity="{CLIENT}"}} 1"#
    )));
    let labels = [
        ("reporter", "source"),
        ("destination_service", "echo.test.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        ("destination_principal", SERVER),
    ];
    assert_eq!(
        support::series_sum(
            &client.metrics(),
            "tandem_tcp_connections_opened_total",
            &labels
        ),
        Some(1),
        "{}",
        client.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_tls_passes_through_untouched_when_permissive_and_is_refused_when_strict() {
    let pods = Pods::new();
    let ca = TestCa::root("root");
    let app_port = 8443;
    let root = app_tls_server(pods.server.bind(&format!("0.0.0.0:{app_port}")));
    let mut dir = ConfigDir::new();
    dir.publish(&config("v1", "server", "permissive", vec![]));
    let server = start_server_in_pod(&pods, &dir, &ca, app_port);
    let app: SocketAddr = format!("{SERVER_IP}:{app_port}").parse().unwrap();

    // The application's own TLS reaches it end to end: the proxy neither terminates nor alters it.
    let call = {
        let root = root.clone();
        move || async move { app_tls_call(app, root, b"hello app\n").await }
    };
    let echoed = pods.client.block_on(call.clone()).unwrap();
    assert_eq!(echoed, b"hello app\n");
    assert_eq!(handshakes(&server, "inbound", "success"), 0);
    assert_eq!(handshakes(&server, "inbound", "handshake"), 0);
    eventually(
        "the pass-through counted",
        Duration::from_secs(5),
        async || {
            let labels = [
                ("reporter", "destination"),
                ("request_protocol", "tcp"),
                ("connection_security_policy", "none"),
            ];
            support::series_sum(
                &server.metrics(),
                "tandem_tcp_connections_opened_total",
                &labels,
            ) == Some(1)
        },
    )
    .await;

    dir.publish(&config("v2", "server", "strict", vec![]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if pods.client.block_on(call.clone()).is_err() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "strict never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused(&server, "foreign-tls") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_connection_to_a_server_with_another_identity_is_refused_as_wrong_identity() {
    let pods = Pods::new();
    let ca = TestCa::root("root");
    let listener = pods.client.bind("127.0.0.1:0");
    let (impostor_addr, reached) = impostor(&ca, listener, b"tandem/1");
    let dir = client_config("db", CLUSTER_IP, APP_PORT, "tcp", impostor_addr);
    let client = start_client_in_pod(&pods, &dir, &ca);
    let answer = pods.client.block_on(|| async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(format!("{CLUSTER_IP}:{APP_PORT}"))
            .await
            .unwrap();
        let _ = tcp.write_all(MARKER.as_bytes()).await;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.map(|_| buf)
    });
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(Vec::is_empty),
        "{answer:?}"
    );
    assert_eq!(
        handshakes(&client, "outbound", "wrong-identity"),
        1,
        "{}",
        client.metrics()
    );
    assert_impostor_never_served(&client, &reached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_http_over_mutual_tls_reaches_the_original_destination() {
    let pods = Pods::new();
    let ca = TestCa::root("root");
    let port = 7080;
    upstream::http("app", pods.server.bind(&format!("0.0.0.0:{port}")));
    let mut server_dir = ConfigDir::new();
    server_dir.publish(&config("server", "server", "strict", vec![]));
    let server = start_server_in_pod(&pods, &server_dir, &ca, port);
    let endpoint: SocketAddr = format!("{SERVER_IP}:{port}").parse().unwrap();
    let client_dir = client_config("app", CLUSTER_IP, 80, "http", endpoint);
    let client = start_client_in_pod(&pods, &client_dir, &ca);
    let reply = pods.client.block_on(|| async {
        get(
            format!("{CLUSTER_IP}:80").parse().unwrap(),
            "app.test",
            "/orders",
            &[],
        )
        .await
        .unwrap()
    });
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "app GET /orders");
    eventually("server access log", Duration::from_secs(5), async || {
        server.access_log().len() == 1
    })
    .await;
    let line = &server.access_log()[0];
    assert_eq!(
        line["upstream"],
        endpoint.to_string(),
        "forwarded to the original destination"
    );
    assert_eq!(line["peer_identity"], CLIENT);
    assert_eq!(handshakes(&client, "outbound", "success"), 1);
}
