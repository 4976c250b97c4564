//! The webhook over real TLS on loopback: a real client that verifies the certificate against
//! the CA (as the apiserver does with `caBundle`), HTTP/1.1 and HTTP/2, certificate rotation
//! while requests flow, and bodies that are malformed or too large.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tandem_webhook::certs::{Issued, issue_serving, new_ca, service_dns_names};
use tandem_webhook::tls::CertPaths;
use tandem_webhook::{CertSource, InjectConfig, Settings};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

const SERVICE_NAME: &str = "tandem-webhook.tandem-system.svc";
const DAY: Duration = Duration::from_secs(86_400);

// ---------------------------------------------------------------------------------------------
// Certificates on disk

/// A directory of its own under the system temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tandem-webhook-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn paths(&self) -> CertPaths {
        CertPaths {
            cert: self.0.join("tls.crt"),
            key: self.0.join("tls.key"),
        }
    }

    /// Writes the pair the way the kubelet updates a Secret volume: each file replaced
    /// atomically, so a reader sees the old or the new file, never half of one.
    fn install(&self, cert_pem: &str, key_pem: &str) {
        let paths = self.paths();
        write_atomically(&paths.key, key_pem);
        write_atomically(&paths.cert, cert_pem);
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_atomically(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn ca() -> Issued {
    new_ca(OffsetDateTime::now_utc(), 365 * DAY).unwrap()
}

fn serving(ca: &Issued) -> Issued {
    let names = service_dns_names("tandem-webhook", "tandem-system");
    issue_serving(ca, &names, OffsetDateTime::now_utc(), 30 * DAY).unwrap()
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The server

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<tandem_webhook::Result<()>>,
}

impl Server {
    async fn start(dir: &Dir, max_body_bytes: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Settings {
            listen: addr,
            certificates: CertSource::Files {
                paths: dir.paths(),
                reload_interval: Duration::from_millis(20),
            },
            max_body_bytes,
            shutdown_grace: Duration::from_secs(5),
            inject: InjectConfig::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tandem_webhook::run_on(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// A client that trusts `cas` only and checks the name, as the apiserver does.
fn client_tls(cas: &[&Issued], h2: bool) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(der(&ca.cert_pem)).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    // Every connection a full handshake: a resumed session would not show the certificate
    // the server serves now, only the one of the session it resumes.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

struct Reply {
    status: StatusCode,
    body: Bytes,
    /// The leaf certificate the server presented.
    served: CertificateDer<'static>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// One request on a new connection (a new handshake each time, so certificate changes show).
async fn request(
    addr: SocketAddr,
    tls: &TlsConnector,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<Reply> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(SERVICE_NAME)?;
    let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
    let (_, session) = stream.get_ref();
    let served = session.peer_certificates().context("no certificate")?[0]
        .clone()
        .into_owned();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let request = Request::builder()
        .method(method)
        .uri(format!("https://{SERVICE_NAME}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    };
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        body,
        served,
    })
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn an_admission_review_round_trips_over_verified_https_on_http1_and_http2() {
    let dir = Dir::new("round-trip");
    let ca = ca();
    let cert = serving(&ca);
    dir.install(&cert.cert_pem, &cert.key_pem);
    let server = Server::start(&dir, 1 << 20).await;

    for h2 in [false, true] {
        let tls = client_tls(&[&ca], h2);
        let reply = request(
            server.addr,
            &tls,
            "POST",
            "/mutate",
            fixture("deployment-pod.json"),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "h2={h2}");
        assert_eq!(reply.served, der(&cert.cert_pem));
        let review = reply.json();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(
            review["response"]["uid"],
            "6a1f0c2e-0001-4d2b-8d6e-1c1f00000001"
        );
        assert_eq!(review["response"]["allowed"], true);
        assert_eq!(review["response"]["patchType"], "JSONPatch");
    }

    // A client that trusts another CA refuses the server: the certificate is really checked.
    let stranger = client_tls(&[&self::ca()], false);
    let refused = request(
        server.addr,
        &stranger,
        "POST",
        "/mutate",
        fixture("deployment-pod.json"),
    )
    .await;
    assert!(
        refused.is_err(),
        "a certificate from an untrusted CA was accepted"
    );
    server.stop().await;
}

#[tokio::test]
async fn health_and_metrics_report_what_was_served() {
    let dir = Dir::new("metrics");
    let ca = ca();
    let cert = serving(&ca);
    dir.install(&cert.cert_pem, &cert.key_pem);
    let server = Server::start(&dir, 1 << 20).await;
    let tls = client_tls(&[&ca], false);

    let health = request(server.addr, &tls, "GET", "/healthz", Vec::new())
        .await
        .unwrap();
    assert_eq!(health.status, StatusCode::OK);
    for case in ["deployment-pod.json", "host-network.json", "opted-out.json"] {
        let reply = request(server.addr, &tls, "POST", "/mutate", fixture(case))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{case}");
    }
    let metrics = request(server.addr, &tls, "GET", "/metrics", Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        r#"tandem_webhook_admissions_total{result="injected",reason=""} 1"#,
        r#"tandem_webhook_admissions_total{result="skipped",reason="host-network"} 1"#,
        r#"tandem_webhook_admissions_total{result="skipped",reason="opted-out"} 1"#,
        "tandem_webhook_admission_duration_seconds_count 3",
        r#"tandem_webhook_certificate_reloads_total{result="success"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_a_4xx_and_the_server_carries_on() {
    let dir = Dir::new("malformed");
    let ca = ca();
    let cert = serving(&ca);
    dir.install(&cert.cert_pem, &cert.key_pem);
    let max = 64 * 1024;
    let server = Server::start(&dir, max).await;
    let tls = client_tls(&[&ca], false);

    let garbage = request(
        server.addr,
        &tls,
        "POST",
        "/mutate",
        b"{\"kind\": [".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    let review = garbage.json();
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not an AdmissionReview")
    );

    // A real review padded past the limit (an oversized annotation).
    let mut big: Value = serde_json::from_slice(&fixture("deployment-pod.json")).unwrap();
    big["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({ "padding": "x".repeat(max + 1) });
    let oversized = request(
        server.addr,
        &tls,
        "POST",
        "/mutate",
        serde_json::to_vec(&big).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE);

    let wrong_method = request(server.addr, &tls, "GET", "/mutate", Vec::new())
        .await
        .unwrap();
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);

    let fine = request(
        server.addr,
        &tls,
        "POST",
        "/mutate",
        fixture("deployment-pod.json"),
    )
    .await
    .unwrap();
    assert_eq!(
        fine.status,
        StatusCode::OK,
        "the server still answers after bad requests"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_while_requests_flow_without_a_failed_request() {
    let dir = Dir::new("rotation");
    let ca = ca();
    let first = serving(&ca);
    dir.install(&first.cert_pem, &first.key_pem);
    let server = Server::start(&dir, 1 << 20).await;
    let tls = client_tls(&[&ca], false);
    let body = fixture("deployment-pod.json");

    // Four clients send reviews back to back, each on a new connection, until told to stop.
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (tls, body, done, addr) = (tls.clone(), body.clone(), Arc::clone(&done), server.addr);
        clients.push(tokio::spawn(async move {
            let mut served = Vec::new();
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                match request(addr, &tls, "POST", "/mutate", body.clone()).await {
                    Ok(reply) if reply.status == StatusCode::OK => served.push(reply.served),
                    Ok(reply) => failures.push(format!("status {}", reply.status)),
                    Err(error) => failures.push(format!("{error:#}")),
                }
            }
            (served, failures)
        }));
    }

    // Five rotations; between two of them, a torn pair (a new certificate with the old key,
    // as a reader may see mid-update) that the server must refuse while it keeps serving.
    let mut installed = vec![der(&first.cert_pem)];
    let mut previous = first;
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = serving(&ca);
        if round == 2 {
            write_atomically(&dir.paths().cert, &next.cert_pem);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        dir.install(&next.cert_pem, &next.key_pem);
        installed.push(der(&next.cert_pem));
        previous = next;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, Ordering::Relaxed);

    let mut served = Vec::new();
    for client in clients {
        let (seen, failures) = client.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during rotation: {failures:?}"
        );
        served.extend(seen);
    }
    assert!(
        served.len() >= 20,
        "too little load to show anything: {} requests",
        served.len()
    );
    for certificate in &served {
        assert!(
            installed.contains(certificate),
            "served a certificate that was never installed"
        );
    }
    // The last rotation is served (polled: the watcher checks every 20 ms, but a loaded
    // machine may be slower than that).
    let mut latest = request(server.addr, &tls, "GET", "/healthz", Vec::new())
        .await
        .unwrap();
    for _ in 0..100 {
        if latest.served == der(&previous.cert_pem) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        latest = request(server.addr, &tls, "GET", "/healthz", Vec::new())
            .await
            .unwrap();
    }
    let position = installed.iter().position(|c| *c == latest.served);
    assert_eq!(
        latest.served,
        der(&previous.cert_pem),
        "the last rotation is being served, not {position:?} of {}",
        installed.len()
    );
    let distinct = installed.iter().filter(|c| served.contains(c)).count();
    assert!(
        distinct >= 3,
        "only {distinct} of the certificates were ever served"
    );

    let metrics = request(server.addr, &tls, "GET", "/metrics", Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains(r#"tandem_webhook_certificate_reloads_total{result="error"}"#),
        "the torn pair was not counted as a failed reload:\n{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_missing_or_broken_certificate_stops_the_start_with_a_clear_error() {
    let dir = Dir::new("broken");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = Settings {
        listen: listener.local_addr().unwrap(),
        certificates: CertSource::Files {
            paths: dir.paths(),
            reload_interval: Duration::from_secs(1),
        },
        max_body_bytes: 1024,
        shutdown_grace: Duration::from_secs(1),
        inject: InjectConfig::default(),
    };
    let error = tandem_webhook::run_on(listener, settings.clone(), async {})
        .await
        .unwrap_err();
    let chain = tandem_webhook::tls::error_chain(&error);
    assert!(chain.contains("tls.crt"), "{chain}");

    dir.install("not a certificate", "not a key");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = tandem_webhook::run_on(listener, settings, async {})
        .await
        .unwrap_err();
    let chain = tandem_webhook::tls::error_chain(&error);
    assert!(chain.contains("no PEM certificate"), "{chain}");
}
