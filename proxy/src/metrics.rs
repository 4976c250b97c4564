//! Prometheus metrics (prometheus-client), served at `/metrics`.
//!
//! Names: `tandem_requests_total`, `tandem_responses_total`, `tandem_response_latency_seconds`,
//! `tandem_tcp_open_total`, `tandem_tcp_close_total`, `tandem_tcp_active`,
//! `tandem_tcp_read_bytes_total`, `tandem_tcp_write_bytes_total`, `tandem_config_reloads_total`,
//! `tandem_config_reload_errors_total`, `tandem_config_info`, `tandem_ready`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the application to the world (:15001).
    Outbound,
    /// From the world to the application (:15006).
    Inbound,
}

/// Whether a response counts as a success (Linkerd's classification: 5xx, a non-zero
/// `grpc-status` or no response at all is a failure).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Classification {
    /// The request was served.
    Success,
    /// The request failed.
    Failure,
}

/// How a connection's bytes were carried.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConnProtocol {
    /// HTTP/1.x, proxied per request.
    Http1,
    /// HTTP/2 (h2c, gRPC), proxied per request.
    Http2,
    /// Opaque TCP, relayed byte for byte.
    Tcp,
}

/// Label values are lower case, as Prometheus label values conventionally are.
macro_rules! lower_case_label {
    ($ty:ty, $($variant:ident => $text:literal),+) => {
        impl $ty {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

lower_case_label!(Direction, Outbound => "outbound", Inbound => "inbound");
lower_case_label!(Classification, Success => "success", Failure => "failure");
lower_case_label!(ConnProtocol, Http1 => "http1", Http2 => "http2", Tcp => "tcp");

/// Labels of request counters and latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Listener.
    pub direction: Direction,
    /// `namespace/name` of the destination service, `passthrough` or `inbound`.
    pub dst_service: String,
}

/// Labels of response counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// Listener.
    pub direction: Direction,
    /// Destination service.
    pub dst_service: String,
    /// HTTP status code sent to the client (0 when none was sent).
    pub status_code: u16,
    /// Success or failure.
    pub classification: Classification,
}

/// Labels of TCP connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// Listener.
    pub direction: Direction,
    /// Destination service.
    pub dst_service: String,
    /// How the bytes were carried.
    pub protocol: ConnProtocol,
}

/// Labels of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `error`.
    pub result: String,
}

/// Labels of the config info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigInfoLabels {
    /// The operator's version stamp.
    pub version: String,
    /// SHA-256 of the file's bytes.
    pub hash: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests received.
    pub requests: Family<RequestLabels, Counter>,
    /// Responses sent (or failures).
    pub responses: Family<ResponseLabels, Counter>,
    /// Time from request start to the end of the response.
    pub latency: Family<RequestLabels, Histogram>,
    /// Connections accepted.
    pub tcp_open: Family<TcpLabels, Counter>,
    /// Connections closed.
    pub tcp_close: Family<TcpLabels, Counter>,
    /// Connections open now.
    pub tcp_active: Family<TcpLabels, Gauge>,
    /// Bytes read from clients.
    pub tcp_read_bytes: Family<TcpLabels, Counter>,
    /// Bytes written to clients.
    pub tcp_write_bytes: Family<TcpLabels, Counter>,
    /// Config load attempts by result.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Config files refused.
    pub config_reload_errors: Counter,
    /// 1 for the active config's version and hash.
    pub config_info: Family<ConfigInfoLabels, Gauge>,
    /// 1 when ready (listeners bound and a valid config loaded), else 0.
    pub ready: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let responses = Family::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let tcp_open = Family::default();
        let tcp_close = Family::default();
        let tcp_active = Family::default();
        let tcp_read_bytes = Family::default();
        let tcp_write_bytes = Family::default();
        let config_reloads = Family::default();
        let config_reload_errors = Counter::default();
        let config_info = Family::default();
        let ready = Gauge::default();
        registry.register(
            "tandem_requests",
            "HTTP requests received",
            requests.clone(),
        );
        registry.register(
            "tandem_responses",
            "HTTP responses by status and classification",
            responses.clone(),
        );
        registry.register_with_unit(
            "tandem_response_latency",
            "Time from request to the end of the response",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "tandem_tcp_open",
            "TCP connections accepted",
            tcp_open.clone(),
        );
        registry.register(
            "tandem_tcp_close",
            "TCP connections closed",
            tcp_close.clone(),
        );
        registry.register(
            "tandem_tcp_active",
            "TCP connections open",
            tcp_active.clone(),
        );
        registry.register(
            "tandem_tcp_read_bytes",
            "Bytes read from clients over relayed TCP",
            tcp_read_bytes.clone(),
        );
        registry.register(
            "tandem_tcp_write_bytes",
            "Bytes written to clients over relayed TCP",
            tcp_write_bytes.clone(),
        );
        registry.register(
            "tandem_config_reloads",
            "Config load attempts by result",
            config_reloads.clone(),
        );
        registry.register(
            "tandem_config_reload_errors",
            "Config files refused",
            config_reload_errors.clone(),
        );
        registry.register(
            "tandem_config_info",
            "The active config's version and hash",
            config_info.clone(),
        );
        registry.register("tandem_ready", "1 when the proxy is ready", ready.clone());
        Self {
            registry,
            requests,
            responses,
            latency,
            tcp_open,
            tcp_close,
            tcp_active,
            tcp_read_bytes,
            tcp_write_bytes,
            config_reloads,
            config_reload_errors,
            config_info,
            ready,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a connection counted as open; counts it closed when dropped.
pub struct ConnectionTelemetry {
    read: Counter,
    write: Counter,
    active: Gauge,
    close: Counter,
}

impl ConnectionTelemetry {
    /// Counts a connection opened.
    pub fn open(metrics: &Metrics, labels: &TcpLabels) -> Self {
        metrics.tcp_open.get_or_create(labels).inc();
        let active = metrics.tcp_active.get_or_create(labels).clone();
        active.inc();
        Self {
            read: metrics.tcp_read_bytes.get_or_create(labels).clone(),
            write: metrics.tcp_write_bytes.get_or_create(labels).clone(),
            close: metrics.tcp_close.get_or_create(labels).clone(),
            active,
        }
    }

    /// Counts bytes read from the client.
    pub fn from_client(&self, n: u64) {
        self.read.inc_by(n);
    }

    /// Counts bytes written to the client.
    pub fn to_client(&self, n: u64) {
        self.write.inc_by(n);
    }
}

impl Drop for ConnectionTelemetry {
    fn drop(&mut self) {
        self.close.inc();
        self.active.dec();
    }
}
