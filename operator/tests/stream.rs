//! The config stream against a real apiserver: the stream server runs in this process on real
//! TLS (a serving certificate from a generated issuer, verified by the client for the signer's
//! DNS name, as a proxy does), reviews real projected tokens (TokenRequest bound to a pod,
//! TokenReview) as the operator's ServiceAccount, and serves a hub the test publishes into
//! (the reconciler's part, tested with it elsewhere).
// Helpers outside #[test] functions too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::Api;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tandem_crds::contract::stream::{
    APPLIED_PATH, AppliedReport, ConfigSource, DISCOVER_PATH, DiscoverResponse, StreamMessage,
    StreamRefusal, WATCH_PATH,
};
use tandem_crds::contract::{ProxyConfig, Service, ServiceRef, Workload, version_stamp};
use tandem_crds::identity::signer_dns_name;
use tandem_operator::ca::{self, Authority};
use tandem_operator::hub::{Hub, PodKey};
use tandem_operator::metrics::{Labels, StreamMetrics};
use tandem_operator::render::WorkloadKey;
use tandem_operator::signer;
use tandem_operator::stream::auth::Authenticator;
use tandem_operator::stream::{self, StreamServer};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, watch};

// ---------------------------------------------------------------------------------------------
// The server

/// The stream server on 127.0.0.1, its hub, the leader flag and the roots its certificate
/// chains to.
struct Server {
    port: u16,
    roots: String,
    hub: Arc<Hub>,
    leader: watch::Sender<bool>,
    stop: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Starts the stream server, reviewing tokens as ServiceAccount tandem-system/tandem-operator
/// (with exactly the rights manifests/operator/rbac.yaml grants).
async fn serve(cluster: &tandem_tests::ControlPlane, leading: bool) -> Server {
    let kubeconfig = cluster.dir().join("stream-operator.kubeconfig");
    cluster
        .service_account_kubeconfig(
            "tandem-system",
            "tandem-operator",
            Duration::from_secs(3600),
            &kubeconfig,
        )
        .await
        .expect("operator kubeconfig");
    let yaml = std::fs::read_to_string(&kubeconfig).expect("read kubeconfig");
    let client = tandem_tests::cluster::client_from_kubeconfig(&yaml)
        .await
        .expect("operator client");

    let now = time::OffsetDateTime::now_utc();
    let material = ca::generate(now).expect("issuer material");
    let authority = Authority::load(&material).expect("issuer");
    let cert = authority
        .serving(&signer_dns_name(), Duration::from_secs(3600), now)
        .expect("serving certificate");
    let config = signer::server_config(&cert).expect("TLS config");
    let (_configs_tx, configs) = watch::channel(Some(Arc::new(config)));

    let hub = Arc::new(Hub::new(Arc::new(Notify::new()), StreamMetrics::default()));
    let (leader, leader_rx) = watch::channel(leading);
    let server = Arc::new(StreamServer::new(
        hub.clone(),
        Authenticator::new(client, "cluster.local".to_owned()),
        leader_rx,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        let _configs_tx = _configs_tx;
        signer::serve(
            listener,
            configs,
            stream::router(server),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
            Duration::from_secs(1),
        )
        .await;
    });
    Server {
        port,
        roots: material.roots_pem,
        hub,
        leader,
        stop,
    }
}

// ---------------------------------------------------------------------------------------------
// The client: HTTP/1.1 over TLS, verifying the server as a proxy does

async fn connect(port: u16, roots_pem: &str) -> SendRequest<Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.expect("root")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the stream server");
    let name = ServerName::try_from(signer_dns_name()).expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake, the server verified against the issuer's roots");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn send(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> hyper::Response<Incoming> {
    let mut sender = connect(server.port, &server.roots).await;
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", signer_dns_name())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    sender.send_request(request).await.expect("a response")
}

/// A call with a JSON answer: status and body.
async fn call(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<String>,
) -> (u16, Bytes) {
    let response = send(server, method, path, token, body).await;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}

fn refusal(body: &[u8]) -> StreamRefusal {
    serde_json::from_slice(body).expect("a StreamRefusal")
}

/// An open watch, read line by line.
struct Lines {
    body: Incoming,
    buffer: Vec<u8>,
}

impl Lines {
    /// The next message; `None` when the server ended the stream.
    async fn next(&mut self) -> Option<StreamMessage> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(StreamMessage::from_line(&line).expect("a StreamMessage"));
            }
            let frame = self.body.frame().await?.expect("a body frame");
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// The next message within `within`, `None` if nothing came (or the stream ended).
    async fn next_within(&mut self, within: Duration) -> Option<StreamMessage> {
        tokio::time::timeout(within, self.next()).await.ok()?
    }
}

/// Opens a watch; `Err` with the status and refusal when it is refused.
async fn watch_config(
    server: &Server,
    token: &str,
    version: Option<&str>,
) -> Result<Lines, (u16, StreamRefusal)> {
    let path = match version {
        Some(version) => format!("{WATCH_PATH}?version={version}"),
        None => WATCH_PATH.to_owned(),
    };
    let response = send(server, "GET", &path, token, None).await;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        return Err((status, refusal(&body)));
    }
    assert_eq!(
        response.headers()["content-type"],
        "application/x-ndjson",
        "the watch's content type"
    );
    Ok(Lines {
        body: response.into_body(),
        buffer: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn workload(service_account: &str) -> WorkloadKey {
    WorkloadKey {
        namespace: "shop".into(),
        service_account: service_account.into(),
    }
}

fn pod_key(name: &str) -> PodKey {
    PodKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// A config of `shop/<service_account>` at `generation` with Services `services`.
fn config(service_account: &str, generation: u64, services: &[&str]) -> ProxyConfig {
    let mut config = ProxyConfig::new(Workload {
        namespace: "shop".into(),
        service_account: service_account.into(),
        ..Workload::default()
    });
    config.version = version_stamp(generation, service_account);
    config.services = services
        .iter()
        .map(|name| Service {
            name: (*name).into(),
            namespace: "shop".into(),
            ..Service::default()
        })
        .collect();
    config
}

fn counter(family: &Family<Labels, Counter>, label: &str, value: &str) -> u64 {
    family
        .get_or_create(&vec![(label.to_owned(), value.to_owned())])
        .get()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_pod_watches_its_own_workload_only_and_reports_what_it_learns_and_runs() {
    let cluster = cluster().await;
    let client = cluster.client();
    let web = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    apply::<ServiceAccount>(
        &client,
        Some("shop"),
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "db", "namespace": "shop"}}),
    )
    .await;
    let db = injected_pod(&client, "shop", "db-1", "db").await;
    let server = serve(&cluster, true).await;
    let web_token = token(&client, "shop", "web", "tandem", Some(&web)).await;

    // A proxy starting without a file waits; the snapshot comes when the view is published.
    let mut lines = watch_config(&server, &web_token, None)
        .await
        .expect("a watch");
    server.hub.publish(
        &workload("web"),
        config("web", 1, &["cart"]),
        Instant::now(),
    );
    let Some(StreamMessage::Snapshot { config: first }) = lines.next().await else {
        panic!("a snapshot first");
    };
    assert_eq!(first.workload.service_account, "web");
    assert_eq!(first.version, "1.web");
    eventually("the pod counted as watching", || async {
        server.hub.all_watching(&[pod_key("web-1")])
    })
    .await;

    // A change arrives as a delta from what the watch last sent.
    server.hub.publish(
        &workload("web"),
        config("web", 2, &["cart", "pay"]),
        Instant::now(),
    );
    let Some(StreamMessage::Delta(delta)) = lines.next().await else {
        panic!("a delta");
    };
    assert_eq!(
        (delta.base.as_str(), delta.version.as_str()),
        ("1.web", "2.web")
    );
    let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pay"]);
    let mut held = first.clone();
    delta.apply_to(&mut held).expect("the delta applies");
    assert_eq!(held, config("web", 2, &["cart", "pay"]));

    // Reconnecting with the version held: `Current`, nothing resent.
    let mut again = watch_config(&server, &web_token, Some("2.web"))
        .await
        .expect("a second watch");
    assert_eq!(
        again.next().await,
        Some(StreamMessage::Current {
            version: "2.web".into()
        })
    );

    // Another ServiceAccount's token never sees web's view: it waits for its own.
    let db_token = token(&client, "shop", "db", "tandem", Some(&db)).await;
    let mut other = watch_config(&server, &db_token, None)
        .await
        .expect("db's watch");
    server.hub.publish(
        &workload("web"),
        config("web", 3, &["cart"]),
        Instant::now(),
    );
    assert!(matches!(lines.next().await, Some(StreamMessage::Delta(d)) if d.version == "3.web"));
    assert!(matches!(again.next().await, Some(StreamMessage::Delta(d)) if d.base == "2.web"));
    assert_eq!(other.next_within(Duration::from_millis(500)).await, None);
    server
        .hub
        .publish(&workload("db"), config("db", 1, &[]), Instant::now());
    let Some(StreamMessage::Snapshot { config: db_view }) = other.next().await else {
        panic!("db's own snapshot");
    };
    assert_eq!(db_view.workload.service_account, "db");

    // Discovery resolves a cluster IP:port and adds the Service to web's learned set.
    let cart = ServiceRef {
        name: "cart".into(),
        namespace: "shop".into(),
    };
    let ip: std::net::IpAddr = "10.96.0.7".parse().unwrap();
    server.hub.set_addresses(std::collections::HashMap::from([(
        ip,
        vec![(80, cart.clone())],
    )]));
    let (status, body) = call(
        &server,
        "POST",
        DISCOVER_PATH,
        &web_token,
        Some(r#"{"address":"10.96.0.7:80"}"#.to_owned()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: DiscoverResponse = serde_json::from_slice(&body).expect("a DiscoverResponse");
    assert_eq!(answer.service, Some(cart.clone()));
    assert_eq!(server.hub.learned(&workload("web")), BTreeSet::from([cart]));
    let (status, body) = call(
        &server,
        "POST",
        DISCOVER_PATH,
        &web_token,
        Some(r#"{"address":"10.96.0.8:80"}"#.to_owned()),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<DiscoverResponse>(&body).unwrap(),
        DiscoverResponse { service: None }
    );
    assert!(server.hub.learned(&workload("db")).is_empty());
    let discoveries = &server.hub.metrics().discoveries;
    assert_eq!(counter(discoveries, "result", "found"), 1);
    assert_eq!(counter(discoveries, "result", "unknown"), 1);

    // An applied report is recorded for the token's pod and workload.
    let report = AppliedReport {
        version: "3.web".into(),
        source: ConfigSource::Stream,
    };
    let (status, _) = call(
        &server,
        "POST",
        APPLIED_PATH,
        &web_token,
        Some(serde_json::to_string(&report).unwrap()),
    )
    .await;
    assert_eq!(status, 204);
    let applied = server.hub.applied_by(&pod_key("web-1")).expect("recorded");
    assert_eq!(applied.workload, workload("web"));
    assert_eq!(applied.version, "3.web");
    assert_eq!(
        server
            .hub
            .running_at_least(&workload("web"), &[pod_key("web-1")], 3),
        1
    );

    // A bad body is refused with the reason, and records nothing.
    let (status, body) = call(
        &server,
        "POST",
        APPLIED_PATH,
        &web_token,
        Some("{".to_owned()),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(refusal(&body).reason, "BadRequest");
    assert_eq!(
        server.hub.applied_by(&pod_key("web-1")).unwrap().version,
        "3.web"
    );

    // Retiring the view ends its watches; a dropped client stops counting as watching.
    server.hub.retire(&workload("web"));
    assert_eq!(lines.next().await, None);
    assert_eq!(again.next().await, None);
    drop((lines, again));
    eventually("web-1 no longer watching", || async {
        !server.hub.all_watching(&[pod_key("web-1")])
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn tokens_that_are_not_a_live_pods_projected_token_are_refused_with_their_reason() {
    let cluster = cluster().await;
    let client = cluster.client();
    let web = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    let server = serve(&cluster, true).await;
    server
        .hub
        .publish(&workload("web"), config("web", 1, &[]), Instant::now());

    let wrong_audience = token(&client, "shop", "web", "vault", Some(&web)).await;
    let unbound = token(&client, "shop", "web", "tandem", None).await;
    let cases = [
        ("garbage".to_owned(), 401, "Unauthenticated"),
        (wrong_audience, 403, "WrongAudience"),
        (unbound, 403, "PodNotFound"),
    ];
    for (token, status, reason) in &cases {
        let Err((got, refused)) = watch_config(&server, token, None).await else {
            panic!("{reason}: the watch was not refused");
        };
        assert_eq!(
            (got, refused.reason.as_str()),
            (*status, *reason),
            "{refused:?}"
        );
        let (got, body) = call(
            &server,
            "POST",
            DISCOVER_PATH,
            token,
            Some(r#"{"address":"10.96.0.7:80"}"#.to_owned()),
        )
        .await;
        assert_eq!((got, refusal(&body).reason.as_str()), (*status, *reason));
    }
    let refused = &server.hub.metrics().refused;
    assert_eq!(counter(refused, "reason", "WrongAudience"), 2);

    // A token bound to a pod that is gone: refused, even though the ServiceAccount exists.
    let valid = token(&client, "shop", "web", "tandem", Some(&web)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.delete("web-1", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    eventually("web-1 gone", || async {
        pods.get_opt("web-1").await.ok().flatten().is_none()
    })
    .await;
    // (The apiserver itself stops authenticating a token bound to a deleted pod; the stream
    // checks the pod as well.)
    let Err((status, refused)) = watch_config(&server, &valid, None).await else {
        panic!("a deleted pod's token must be refused");
    };
    assert!(
        matches!(
            (status, refused.reason.as_str()),
            (401, "Unauthenticated") | (403, "PodNotFound")
        ),
        "{status} {refused:?}"
    );
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_follower_refuses_every_call_and_a_leader_that_steps_down_ends_its_watches() {
    let cluster = cluster().await;
    let client = cluster.client();
    let web = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    let server = serve(&cluster, true).await;
    server
        .hub
        .publish(&workload("web"), config("web", 1, &[]), Instant::now());
    let web_token = token(&client, "shop", "web", "tandem", Some(&web)).await;

    let mut lines = watch_config(&server, &web_token, None)
        .await
        .expect("a watch");
    assert!(matches!(
        lines.next().await,
        Some(StreamMessage::Snapshot { .. })
    ));
    server.leader.send_replace(false);
    assert_eq!(
        lines.next().await,
        None,
        "the watch ends when leadership is lost"
    );

    let response = send(&server, "GET", WATCH_PATH, &web_token, None).await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(refusal(&body).reason, "NotLeader");
    for (path, body) in [
        (DISCOVER_PATH, r#"{"address":"10.96.0.7:80"}"#),
        (APPLIED_PATH, r#"{"version":"1.web","source":"file"}"#),
    ] {
        let (status, answer) = call(&server, "POST", path, &web_token, Some(body.to_owned())).await;
        assert_eq!(
            (status, refusal(&answer).reason.as_str()),
            (503, "NotLeader")
        );
    }
    assert!(server.hub.applied_by(&pod_key("web-1")).is_none());
    assert_eq!(
        counter(&server.hub.metrics().refused, "reason", "NotLeader"),
        3
    );
}

/// The operator binary serves the stream beside certify: its leader answers a pod's watch, its
/// follower refuses it `NotLeader` (before reviewing anything).
#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn the_operators_leader_serves_watches_on_the_signer_port_and_its_follower_refuses() {
    let cluster = cluster().await;
    let client = cluster.client();
    let web = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    let first = Operator::start(&cluster, "op-a").await;
    eventually("a leader", || async {
        lease_holder(&client).await.is_some()
    })
    .await;
    let second = Operator::start(&cluster, "op-b").await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "tandem-system");
    eventually("the issuer Secret", || async {
        secrets
            .get_opt(tandem_crds::identity::ISSUER_SECRET)
            .await
            .is_ok_and(|s| s.is_some())
    })
    .await;
    for operator in [&first, &second] {
        eventually("the signer port bound", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", operator.identity_port))
                .await
                .is_ok()
        })
        .await;
    }
    let issuer = secrets
        .get(tandem_crds::identity::ISSUER_SECRET)
        .await
        .expect("the issuer Secret");
    let roots = String::from_utf8(
        issuer.data.expect("data")[tandem_crds::identity::ISSUER_ROOTS_KEY]
            .0
            .clone(),
    )
    .expect("PEM");
    let holder = lease_holder(&client).await.expect("a leader");
    let (leader, follower) = if holder == first.identity {
        (&first, &second)
    } else {
        (&second, &first)
    };
    let web_token = token(&client, "shop", "web", "tandem", Some(&web)).await;
    let at = |operator: &Operator| {
        let (leader, _) = watch::channel(true);
        let (stop, _) = watch::channel(false);
        Server {
            port: operator.identity_port,
            roots: roots.clone(),
            hub: Arc::new(Hub::new(Arc::new(Notify::new()), StreamMetrics::default())),
            leader,
            stop,
        }
    };
    let (leader, follower) = (at(leader), at(follower));

    // The follower's signer serves once it has the issuer; until then connections wait.
    let mut refused = None;
    for _ in 0..100 {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            watch_config(&follower, &web_token, None),
        )
        .await;
        if let Ok(Err(answer)) = attempt {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, refusal) = refused.expect("the follower answers");
    assert_eq!((status, refusal.reason.as_str()), (503, "NotLeader"));
    assert!(
        watch_config(&leader, &web_token, None).await.is_ok(),
        "the leader opens the watch"
    );
    let Err((status, refusal)) = watch_config(&leader, "garbage", None).await else {
        panic!("a garbage token must be refused");
    };
    assert_eq!((status, refusal.reason.as_str()), (401, "Unauthenticated"));
}

/// A reconnect storm in small: every pod's proxy at once (here 20 pods, 10 watches each, all
/// concurrent). Each call gets its snapshot or a `Throttled` refusal with `Retry-After`, and
/// retrying gets every watch open; nothing else is answered.
#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_reconnect_storm_opens_every_watch_or_throttles_it_with_retry_after() {
    const PODS: usize = 20;
    const PER_POD: usize = 10;
    let cluster = cluster().await;
    let client = cluster.client();
    namespace_with_injected_pod(&client, "shop", "web", "web-0").await;
    let mut tokens = Vec::new();
    for n in 0..PODS {
        let pod = injected_pod(&client, "shop", &format!("web-{n}"), "web").await;
        tokens.push(token(&client, "shop", "web", "tandem", Some(&pod)).await);
    }
    let server = Arc::new(serve(&cluster, true).await);
    server.hub.publish(
        &workload("web"),
        config("web", 1, &["a", "b"]),
        Instant::now(),
    );
    let attempts = tokens.iter().flat_map(|token| {
        let server = server.clone();
        (0..PER_POD).map(move |_| {
            let server = server.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let mut throttled = 0;
                loop {
                    match watch_config(&server, &token, None).await {
                        Ok(mut lines) => {
                            let first = lines.next().await;
                            assert!(matches!(first, Some(StreamMessage::Snapshot { .. })));
                            return (lines, throttled);
                        }
                        Err((503, refused)) if refused.reason == "Throttled" => {
                            throttled += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(other) => panic!("refused in the storm: {other:?}"),
                    }
                }
            })
        })
    });
    let handles: Vec<_> = attempts.collect();
    let mut open = Vec::new();
    let mut throttled = 0;
    for handle in handles {
        let (lines, count) = handle.await.expect("a client task");
        open.push(lines);
        throttled += count;
    }
    assert_eq!(open.len(), PODS * PER_POD);
    let pods: Vec<PodKey> = (0..PODS).map(|n| pod_key(&format!("web-{n}"))).collect();
    assert!(server.hub.all_watching(&pods));
    eprintln!(
        "storm: {} watches open, {throttled} throttled attempts",
        open.len()
    );
}

/// Not a claim about speed: it measures and prints what one idle watch costs the server
/// (this process's VmRSS before and after 1,000 open watches; the clients run in a child
/// process, [`fleet_of_idle_watches`], so their side is not counted), so the figure in
/// operator/README.md can be reproduced.
#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_thousand_idle_watches_each_get_their_snapshot_and_cost_little_memory() {
    const WATCHES: usize = 1_000;
    if let Ok(spec) = std::env::var(FLEET_ENV) {
        return fleet_of_idle_watches(&spec).await;
    }
    let cluster = cluster().await;
    let client = cluster.client();
    let web = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    let server = serve(&cluster, true).await;
    server.hub.publish(
        &workload("web"),
        config("web", 1, &["a", "b", "c"]),
        Instant::now(),
    );
    let web_token = token(&client, "shop", "web", "tandem", Some(&web)).await;
    // Warm what every watch shares (the review cache, TLS and hyper code paths).
    let mut warm = watch_config(&server, &web_token, None)
        .await
        .expect("a watch");
    warm.next().await.expect("a snapshot");

    let roots = cluster.dir().join("stream-roots.pem");
    std::fs::write(&roots, &server.roots).expect("write roots");
    let before = vm_rss_bytes();
    let mut fleet = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "a_thousand_idle_watches_each_get_their_snapshot_and_cost_little_memory",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            FLEET_ENV,
            format!("{}|{}|{WATCHES}|{web_token}", server.port, roots.display()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the client fleet");
    let stdout = fleet.stdout.take().expect("fleet stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = format!("{FLEET_READY} {WATCHES}");
    loop {
        let line = lines.next_line().await.expect("fleet output");
        let Some(line) = line else {
            let status = fleet.wait().await.expect("the fleet's status");
            panic!("the fleet ended before it was ready: {status}");
        };
        if line == ready {
            break;
        }
    }
    let after = vm_rss_bytes();
    assert_eq!(
        server.hub.metrics().watches.get(),
        i64::try_from(WATCHES).unwrap() + 1
    );
    let per_watch = after.saturating_sub(before) / WATCHES as u64;
    eprintln!(
        "{WATCHES} idle watches: server VmRSS {} KiB -> {} KiB, {per_watch} bytes per watch",
        before / 1024,
        after / 1024
    );
    drop(fleet.stdin.take());
    let status = fleet.wait().await.expect("the fleet ends");
    assert!(status.success(), "the client fleet failed: {status}");
    eventually("the fleet's watches closed", || async {
        server.hub.metrics().watches.get() == 1
    })
    .await;
}

/// `<port>|<roots file>|<watches>|<token>`: what the fleet is told by its parent.
const FLEET_ENV: &str = "TANDEM_TEST_STREAM_FLEET";
/// The line the fleet prints once every watch has its snapshot.
const FLEET_READY: &str = "fleet ready:";

/// The client side of [`a_thousand_idle_watches_each_get_their_snapshot_and_cost_little_memory`],
/// which runs it in a child process: opens the watches, says so, and holds them until its
/// stdin closes.
async fn fleet_of_idle_watches(spec: &str) {
    let mut parts = spec.splitn(4, '|');
    let (port, roots, count, token) = (
        parts.next().unwrap().parse::<u16>().unwrap(),
        std::fs::read_to_string(parts.next().unwrap()).unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
        parts.next().unwrap().to_owned(),
    );
    let (leader, _) = watch::channel(true);
    let (stop, _) = watch::channel(false);
    let server = Server {
        port,
        roots,
        hub: Arc::new(Hub::new(Arc::new(Notify::new()), StreamMetrics::default())),
        leader,
        stop,
    };
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut lines = watch_config(&server, &token, None).await.expect("a watch");
        assert!(matches!(
            lines.next().await,
            Some(StreamMessage::Snapshot { .. })
        ));
        open.push(lines);
    }
    println!("{FLEET_READY} {count}");
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut rest).await;
    drop(open);
}

fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("VmRSS")
}
