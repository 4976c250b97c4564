//! Export: a bounded queue the request path never waits on, and one task that batches spans
//! and POSTs them as OTLP/HTTP protobuf to the collector the active config names.
//!
//! - The request path calls [`Exporter::record`]: `try_send` into a queue of `--trace-queue`
//!   spans (2,048 by default). A full queue drops the span and counts it
//!   (`tandem_trace_spans_dropped_total{reason="queue-full"}`): a slow or dead collector costs
//!   spans, never latency.
//! - The task sends a batch when it holds [`MAX_BATCH`] spans or `--trace-flush` (5 s) after the
//!   batch's first span, whichever comes first: an `ExportTraceServiceRequest` built from
//!   `opentelemetry-proto`'s messages and encoded by prost, `POST <collector>/v1/traces` with
//!   `content-type: application/x-protobuf`, over one kept-alive HTTP/1.1 connection (TLS with
//!   the system's roots for an `https://` collector), [`EXPORT_TIMEOUT`] for the whole call.
//! - A failed export (unreachable, a timeout, a non-2xx answer) is counted
//!   (`tandem_trace_export_errors_total`) and its batch **dropped**, not retried
//!   (`tandem_trace_spans_dropped_total{reason="export-failed"}`): a retry would hold spans in
//!   memory while the queue behind it drops new ones anyway, and the next batch tries afresh.
//! - The collector and the workload come from the config active when a batch is sent, so a
//!   reload that changes the collector applies to the next batch; a batch that finds tracing
//!   turned off is dropped (`reason="disabled"`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::TraceSettings;
use super::span::{SpanRecord, Workload};
use crate::metrics::TraceMetrics;

/// Most spans in one export request (the OpenTelemetry SDK's default batch).
pub const MAX_BATCH: usize = 512;
/// Time allowed for one export call, connecting included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a collector's answer read (its body is discarded).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where the request path hands finished spans.
#[derive(Clone)]
pub struct Exporter {
    queue: mpsc::Sender<SpanRecord>,
    metrics: TraceMetrics,
}

/// How the export task finds the active tracing settings (the active config's).
pub type Settings = Box<dyn Fn() -> Option<Arc<TraceSettings>> + Send + Sync>;

impl Exporter {
    /// Starts the export task (on the current tokio runtime) with a queue of `capacity` spans,
    /// sending a batch at the latest `flush` after its first span.
    pub fn spawn(
        capacity: usize,
        flush: Duration,
        settings: Settings,
        metrics: TraceMetrics,
    ) -> Self {
        let (queue, spans) = mpsc::channel(capacity.max(1));
        let task = Task {
            spans,
            settings,
            metrics: metrics.clone(),
            flush,
            connection: None,
            failing: false,
        };
        tokio::spawn(task.run());
        Self { queue, metrics }
    }

    /// An exporter whose queue the caller reads (unit tests).
    #[cfg(test)]
    pub fn channel(capacity: usize, metrics: TraceMetrics) -> (Self, mpsc::Receiver<SpanRecord>) {
        let (queue, spans) = mpsc::channel(capacity);
        (Self { queue, metrics }, spans)
    }

    /// Queues a finished span; never waits: a full queue drops it (counted).
    pub fn record(&self, span: SpanRecord) {
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped_queue_full.inc();
        }
    }
}

/// The export task.
struct Task {
    spans: mpsc::Receiver<SpanRecord>,
    settings: Settings,
    metrics: TraceMetrics,
    flush: Duration,
    connection: Option<Connection>,
    /// Whether the last export failed (failures are logged at WARN when they start, then at
    /// DEBUG, so a dead collector does not flood the log).
    failing: bool,
}

impl Task {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if self.spans.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return; // every sender is gone: the proxy is stopping
            }
            let deadline = tokio::time::Instant::now() + self.flush;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                tokio::select! {
                    n = self.spans.recv_many(&mut batch, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.export(&mut batch).await;
        }
    }

    /// Sends `batch` (and empties it), counting the outcome.
    async fn export(&mut self, batch: &mut Vec<SpanRecord>) {
        let count = batch.len() as u64;
        let Some(settings) = (self.settings)() else {
            batch.clear();
            self.metrics.dropped_disabled.inc_by(count);
            return;
        };
        let body = Bytes::from(request(batch, &settings.workload).encode_to_vec());
        batch.clear();
        match self.post(&settings.collector, body).await {
            Ok(()) => {
                self.metrics.exported.inc_by(count);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(collector = %settings.collector.url, "Trace export recovered");
                }
            }
            Err(error) => {
                self.connection = None;
                self.metrics.export_errors.inc();
                self.metrics.dropped_export_failed.inc_by(count);
                if std::mem::replace(&mut self.failing, true) {
                    tracing::debug!(collector = %settings.collector.url, error = %crate::error::chain(&error), spans = count, "Trace export failed; spans dropped");
                } else {
                    tracing::warn!(collector = %settings.collector.url, error = %crate::error::chain(&error), spans = count, "Trace export failed; spans dropped");
                }
            }
        }
    }

    async fn post(&mut self, collector: &Arc<Collector>, body: Bytes) -> Result<(), ExportError> {
        let reuse = self
            .connection
            .take()
            .filter(|c| Arc::ptr_eq(&c.collector, collector) || c.collector.url == collector.url)
            .filter(|c| !c.sender.is_closed());
        let call = async {
            let mut connection = match reuse {
                Some(c) => c,
                None => Connection::open(collector).await?,
            };
            connection.sender.ready().await.map_err(ExportError::Http)?;
            let request = http::Request::post(collector.path.as_str())
                .header(http::header::HOST, collector.authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(Full::new(body))
                .map_err(ExportError::Request)?;
            let answer = connection
                .sender
                .send_request(request)
                .await
                .map_err(ExportError::Http)?;
            let status = answer.status();
            // Read (and discard) the answer so the connection can carry the next batch.
            Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| ExportError::Answer)?;
            if !status.is_success() {
                return Err(ExportError::Status(status));
            }
            Ok(connection)
        };
        let connection = tokio::time::timeout(EXPORT_TIMEOUT, call)
            .await
            .map_err(|_| ExportError::Timeout)??;
        self.connection = Some(connection);
        Ok(())
    }
}

/// One OTLP export request: this workload's resource, one scope, the spans.
pub fn request(batch: &[SpanRecord], workload: &Workload) -> ExportTraceServiceRequest {
    let text = |key: &str, value: &str| KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    };
    let mut attributes = vec![
        text("service.name", &workload.name),
        text("service.namespace", &workload.namespace),
        text("k8s.namespace.name", &workload.namespace),
        text("telemetry.sdk.name", "tandem-proxy"),
    ];
    if let Some(pod) = &super::process().pod_name {
        attributes.push(text("k8s.pod.name", pod));
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes,
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tandem-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans: batch.iter().map(|s| s.to_proto(workload)).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// A collector, parsed from the config's (validated) base URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Collector {
    /// The URL as configured, for logs.
    pub url: String,
    /// Whether it is `https://`.
    pub tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (80 or 443 when the URL has none).
    pub port: u16,
    /// `Host` header value.
    pub authority: String,
    /// `<base path>/v1/traces`.
    pub path: String,
}

/// A collector URL the proxy cannot use.
#[derive(Debug, thiserror::Error)]
#[error("tracing collector {url:?} is not an http:// or https:// URL with a host: {why}")]
pub struct BadCollector {
    /// The URL.
    pub url: String,
    /// Why.
    pub why: String,
}

impl Collector {
    /// Parses `url` (`http://host[:port][/base]`).
    pub fn parse(url: &str) -> Result<Self, BadCollector> {
        let bad = |why: &str| BadCollector {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base = uri.path().trim_end_matches('/');
        Ok(Self {
            url: url.to_owned(),
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            path: format!("{base}/v1/traces"),
        })
    }
}

/// A kept-alive connection to one collector.
struct Connection {
    collector: Arc<Collector>,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(collector: &Arc<Collector>) -> Result<Self, ExportError> {
        let tcp = connect(&collector.host, collector.port).await?;
        let _ = tcp.set_nodelay(true);
        let sender = if collector.tls {
            let name = rustls::pki_types::ServerName::try_from(collector.host.clone())
                .map_err(|_| ExportError::ServerName(collector.host.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                .connect(name, tcp)
                .await
                .map_err(ExportError::Tls)?;
            handshake(tls).await?
        } else {
            handshake(tcp).await?
        };
        Ok(Self {
            collector: collector.clone(),
            sender,
        })
    }
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ExportError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(ExportError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "Trace collector connection ended");
        }
    });
    Ok(sender)
}

/// Resolves `host` and connects to the first address that answers.
async fn connect(host: &str, port: u16) -> Result<TcpStream, ExportError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ExportError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, source)) => ExportError::Connect { addr, source },
        None => ExportError::Resolve {
            host: host.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        },
    })
}

/// The client TLS config for `https://` collectors: the system's trust roots, built once.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, ExportError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no system trust roots found".to_owned());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
        .map_err(ExportError::TlsConfig)
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The collector's name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No address of the collector accepted a connection.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The last address tried.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The collector's host is not a name TLS can check.
    #[error("{0:?} is not a TLS server name")]
    ServerName(String),
    /// No TLS client config (no system roots).
    #[error("cannot build the TLS client config: {0}")]
    TlsConfig(String),
    /// The TLS handshake failed.
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    /// HTTP failed.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The request could not be built.
    #[error("cannot build the request")]
    Request(#[source] http::Error),
    /// The answer's body could not be read.
    #[error("cannot read the collector's answer")]
    Answer,
    /// The collector answered with an error status.
    #[error("the collector answered {0}")]
    Status(http::StatusCode),
    /// The call took longer than [`EXPORT_TIMEOUT`].
    #[error("no answer within {EXPORT_TIMEOUT:?}")]
    Timeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_give_host_port_and_the_traces_path() {
        let c = Collector::parse("http://otel.observability:4318").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_str(), c.tls),
            ("otel.observability", 4318, "/v1/traces", false)
        );
        assert_eq!(c.authority, "otel.observability:4318");
        let c = Collector::parse("https://collector.example.com/otlp/").unwrap();
        assert_eq!(
            (c.port, c.path.as_str(), c.tls),
            (443, "/otlp/v1/traces", true)
        );
        let c = Collector::parse("http://[::1]:4318").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 4318));
        assert!(Collector::parse("ftp://x").is_err());
        assert!(Collector::parse("http:///v1").is_err());
    }

    #[test]
    fn an_export_request_carries_the_resource_and_every_span() {
        let workload = Workload {
            name: Arc::from("web.shop"),
            namespace: Arc::from("shop"),
        };
        let spans = vec![super::super::span::tests::record(); 3];
        let request = request(&spans, &workload);
        let bytes = request.encode_to_vec();
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let rs = &back.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert!(attrs.iter().any(|kv| kv.key == "service.name"
            && kv.value.as_ref().unwrap().value
                == Some(any_value::Value::StringValue("web.shop".into()))));
        assert_eq!(rs.scope_spans[0].spans.len(), 3);
    }
}
