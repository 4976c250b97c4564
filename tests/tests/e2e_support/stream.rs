//! A config-stream client for the scenarios that act as a proxy would (or as one that should
//! not be let in): real TLS to the operator's signer listener, verified against the trust
//! roots the operator publishes and the signer's Service name, a bearer token, and the watch's
//! newline-delimited JSON read for a bounded time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tandem_crds::contract::StreamMessage;
use tandem_crds::contract::stream::{StreamRefusal, WATCH_PATH, WATCH_VERSION_PARAM};
use tandem_crds::identity::{TRUST_ROOTS_CONFIG_MAP, TRUST_ROOTS_KEY, signer_dns_name};

/// What one watch call got within its time.
#[derive(Debug)]
pub struct Watched {
    /// The HTTP status.
    pub status: u16,
    /// The refusal, when the status is not 2xx.
    pub refusal: Option<StreamRefusal>,
    /// The messages read, in order (none when refused).
    pub messages: Vec<StreamMessage>,
}

impl Watched {
    /// The workloads (`namespace/serviceAccount`) of every config any message carried.
    pub fn workloads(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                StreamMessage::Snapshot { config } => Some(format!(
                    "{}/{}",
                    config.workload.namespace, config.workload.service_account
                )),
                StreamMessage::Delta(delta) => delta
                    .workload
                    .as_ref()
                    .map(|w| format!("{}/{}", w.namespace, w.service_account)),
                StreamMessage::Current { .. } | StreamMessage::Heartbeat => None,
            })
            .collect()
    }
}

/// The trust roots the operator published into `namespace` (PEM).
pub async fn trust_roots(client: &kube::Client, namespace: &str) -> anyhow::Result<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get(TRUST_ROOTS_CONFIG_MAP)
        .await?
        .data
        .unwrap_or_default()
        .remove(TRUST_ROOTS_KEY)
        .context("trust roots ConfigMap without its key")
}

/// A token for ServiceAccount `namespace/name` from the TokenRequest API, for `audience`,
/// bound to `pod` when given (as the kubelet's projected token is).
pub async fn token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> anyhow::Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let created: TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token for {namespace}/{name}"))?;
    Ok(created
        .status
        .context("token request without status")?
        .token)
}

/// `GET WATCH_PATH[?version=…]` on the signer at `addr` with `token` (none: no
/// `Authorization` header), reading messages for at most `read_for` or until `enough` of
/// them (heartbeats included) arrived.
pub async fn watch(
    addr: SocketAddr,
    roots_pem: &str,
    token: Option<&str>,
    version: Option<&str>,
    read_for: Duration,
    enough: usize,
) -> anyhow::Result<Watched> {
    let tls = connect(addr, roots_pem).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP handshake with the signer")?;
    let driver = tokio::spawn(connection);
    let path = match version {
        Some(v) => format!("{WATCH_PATH}?{WATCH_VERSION_PARAM}={v}"),
        None => WATCH_PATH.to_owned(),
    };
    let mut request = http::Request::get(path).header(http::header::HOST, signer_dns_name());
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = tokio::time::timeout(
        Duration::from_secs(15),
        sender.send_request(request.body(Empty::<Bytes>::new())?),
    )
    .await
    .context("no answer to the watch within 15 s")??;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if !response_ok(status) {
        let bytes = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .context("the refusal's body within 5 s")??
            .to_bytes();
        driver.abort();
        let refusal = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "a {status} whose body is not a StreamRefusal: {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        return Ok(Watched {
            status,
            refusal: Some(refusal),
            messages: Vec::new(),
        });
    }
    let deadline = Instant::now() + read_for;
    let mut pending = Vec::new();
    let mut messages = Vec::new();
    while messages.len() < enough {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(frame) = tokio::time::timeout(left, body.frame()).await else {
            break;
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            messages
                .push(StreamMessage::from_line(&line).with_context(|| {
                    format!("a watch line: {}", String::from_utf8_lossy(&line))
                })?);
        }
    }
    driver.abort();
    Ok(Watched {
        status,
        refusal: None,
        messages,
    })
}

fn response_ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// TLS to the signer, verified as a proxy verifies it: the published roots, the Service name.
async fn connect(
    addr: SocketAddr,
    roots_pem: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        bail!("no certificate in the trust roots");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr} within 5 s"))??;
    let name = ServerName::try_from(signer_dns_name())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with the signer at {addr}"))
}
