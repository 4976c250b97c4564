//! Prometheus metrics (prometheus-client), served at `/metrics`.
//!
//! The standard request and TCP series, in Istio's shape under the config's prefix (see
//! [`mesh`]): `<prefix>requests_total`, `<prefix>request_duration_milliseconds`,
//! `<prefix>request_bytes`, `<prefix>response_bytes`, `<prefix>tcp_connections_opened_total`,
//! `<prefix>tcp_connections_closed_total`, `<prefix>tcp_sent_bytes_total`,
//! `<prefix>tcp_received_bytes_total`.
//!
//! The proxy's own series keep their names whatever the prefix: `tandem_request_attempts`,
//! `tandem_config_reloads_total`, `tandem_config_reload_errors_total`, `tandem_config_info`,
//! `tandem_ready`, mutual TLS's (see [`TlsMetrics`]): `tandem_tls_handshakes_total`,
//! `tandem_inbound_connections_refused_total`, `tandem_tls_peer_connections_total`, inbound
//! authorization's `tandem_authz_decisions_total` (see [`AuthzMetrics`]), the config sources'
//! `tandem_proxy_config_generation`, `tandem_proxy_config_source_generation`,
//! `tandem_proxy_config_stream_connected`, `tandem_proxy_config_stream_reconnects_total` and
//! `tandem_proxy_discovery_requests_total` (see [`StreamMetrics`]), tracing's
//! `tandem_trace_spans_exported_total`, `tandem_trace_spans_dropped_total{reason}` and
//! `tandem_trace_export_errors_total` (see [`TraceMetrics`]), and the resilience
//! engine's (read from the active config at scrape time, see [`policy_metrics`]): `tandem_retries_total`, `tandem_retry_budget_exhausted_total`,
//! `tandem_ejections_total`, `tandem_active_ejections`, `tandem_panic_total`,
//! `tandem_no_endpoints_total`, `tandem_overflows_total`; and, when identity is on, the identity
//! client's (see [`IdentityMetrics`]).
//!
//! The request path never looks a series up in a family: a family's map sits behind a lock and
//! its key is an owned label set. The standard series are found in a lock-free cache keyed by
//! interned labels ([`mesh`]); the per-destination ones are resolved once per destination
//! ([`ServiceTelemetry`]). Histograms are [`AtomicHistogram`]s for the same reason
//! (prometheus-client's own histogram takes a write lock per observation).

pub mod flags;
mod histogram;
mod identity;
pub mod intern;
mod policy;
mod service;
mod stream;
mod trace;

pub use flags::ResponseFlags;
pub use histogram::AtomicHistogram;
pub use identity::{IdentityMetrics, RenewalLabels};
pub use intern::Sym;
pub use policy::policy_metrics;
pub use service::{ConnectionTelemetry, ServiceTelemetry};
pub use stream::{DiscoveryLabels, SourceLabels, StreamMetrics, gauge_value};
pub use trace::{DroppedLabels, TraceMetrics};

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the application to the world (:15001).
    Outbound,
    /// From the world to the application (:15006).
    Inbound,
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
        impl ::prometheus_client::encoding::EncodeLabelValue for $ty {
            fn encode(
                &self,
                encoder: &mut ::prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                ::prometheus_client::encoding::EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

lower_case_label!(Direction, Outbound => "outbound", Inbound => "inbound");
lower_case_label!(ConnProtocol, Http1 => "http1", Http2 => "http2", Tcp => "tcp");
lower_case_label!(SecurityPolicy, MutualTls => "mutual_tls", None => "none");

// After the macro, which they use.
mod authz;
pub mod mesh;
mod tls;

pub use mesh::{Labels, MeshMetrics, Peer, Reporter, RequestProtocol, ServiceLabels};

pub use authz::{
    AuthzDecision, AuthzLabels, AuthzMetrics, AuthzProtocol, ByProtocol, NO_ALLOW_MATCH, PROBE,
};
pub use tls::{HandshakeResult, InboundRefusal, TlsMetrics};

/// Whether a connection was mutually authenticated (the `connection_security_policy` label, as
/// Istio names it).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// Both proxies presented certificates under the trust anchors.
    MutualTls,
    /// Plaintext, or TLS this proxy did not terminate.
    #[default]
    None,
}

impl ConnProtocol {
    /// Every protocol.
    pub const ALL: [Self; 3] = [Self::Http1, Self::Http2, Self::Tcp];
}

/// `dst_service` of a connection that was not redirected, before its first request named a
/// destination.
const UNRESOLVED: &str = "unresolved";
/// `dst_service` of traffic to a destination the config does not know.
pub const PASSTHROUGH: &str = "passthrough";
/// `dst_service` of inbound traffic.
pub const INBOUND: &str = "inbound";
/// `dst_service` of an outbound request whose destination could not be resolved.
pub const UNKNOWN: &str = "unknown";

/// Labels of the proxy's own per-destination series (`tandem_request_attempts`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Listener.
    pub direction: Direction,
    /// `namespace/name` of the destination service, `passthrough` or `inbound`.
    pub dst_service: String,
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

/// The families whose series are per destination, shared by every [`ServiceTelemetry`].
#[derive(Clone)]
pub(crate) struct Families {
    pub(crate) attempts: Family<RequestLabels, AtomicHistogram, fn() -> AtomicHistogram>,
}

impl Families {
    fn new() -> Self {
        Self {
            attempts: Family::new_with_constructor(AtomicHistogram::attempts),
        }
    }
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    families: Families,
    /// The standard request and TCP series (Istio's shape).
    pub mesh: Arc<MeshMetrics>,
    /// Config load attempts by result.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// Config files refused.
    pub config_reload_errors: Counter,
    /// 1 for the active config's version and hash.
    pub config_info: Family<ConfigInfoLabels, Gauge>,
    /// 1 when ready (listeners bound and a valid config loaded), else 0.
    pub ready: Gauge,
    /// Outbound traffic to a destination the config does not know.
    pub passthrough: Arc<ServiceTelemetry>,
    /// Outbound requests whose destination could not be resolved.
    unknown: Arc<ServiceTelemetry>,
    /// Inbound traffic.
    pub inbound: Arc<ServiceTelemetry>,
    /// Connections that were not redirected and had not yet said where they go, by direction.
    unresolved: [Arc<ServiceTelemetry>; 2],
    /// Reads how many log lines were dropped (the log writer counts them itself).
    log_lines_dropped: OnceLock<ReadCounter>,
    /// The identity client's metrics (exported once identity is on).
    pub identity: IdentityMetrics,
    /// Mutual TLS: handshakes, refusals, peers.
    pub tls: TlsMetrics,
    /// Inbound authorization decisions.
    pub authz: AuthzMetrics,
    /// The config sources (file and stream) and on-demand discovery.
    pub stream: StreamMetrics,
    /// Span export (tracing).
    pub trace: TraceMetrics,
}

/// How a source of a counter read at scrape time is given to [`Metrics`].
pub type ReadCounter = Box<dyn Fn() -> u64 + Send + Sync>;

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let families = Families::new();
        register_families(&mut registry, &families);
        let (mesh, collector) = MeshMetrics::new();
        registry.register_collector(Box::new(collector));
        let config_reloads = Family::default();
        let config_reload_errors = Counter::default();
        let config_info = Family::default();
        let ready = Gauge::default();
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
        let tls = TlsMetrics::register(&mut registry);
        let authz = AuthzMetrics::register(&mut registry);
        let stream = StreamMetrics::register(&mut registry);
        let trace = TraceMetrics::register(&mut registry);
        let fixed = |direction, label: &str| {
            Arc::new(ServiceTelemetry::new(
                &families,
                direction,
                Arc::from(label),
                ServiceLabels::unknown(),
                None,
            ))
        };
        Self {
            passthrough: fixed(Direction::Outbound, PASSTHROUGH),
            unknown: fixed(Direction::Outbound, UNKNOWN),
            inbound: fixed(Direction::Inbound, INBOUND),
            unresolved: [
                fixed(Direction::Outbound, UNRESOLVED),
                fixed(Direction::Inbound, UNRESOLVED),
            ],
            registry,
            families,
            mesh,
            config_reloads,
            config_reload_errors,
            config_info,
            ready,
            log_lines_dropped: OnceLock::new(),
            identity: IdentityMetrics::new(),
            tls,
            authz,
            stream,
            trace,
        }
    }

    /// Exports `tandem_log_lines_dropped_total`, read from `read` at each scrape. Set once;
    /// later calls are ignored.
    pub fn count_dropped_log_lines(&self, read: ReadCounter) {
        let _ = self.log_lines_dropped.set(read);
    }

    /// The handles of one destination's series, for a compiled config to keep: its
    /// `dst_service` label, its standard `destination_service*` labels and the peer header of
    /// requests to it.
    pub fn service(
        &self,
        direction: Direction,
        label: Arc<str>,
        service: ServiceLabels,
        peer_header: Option<http::HeaderValue>,
    ) -> Arc<ServiceTelemetry> {
        Arc::new(ServiceTelemetry::new(
            &self.families,
            direction,
            label,
            service,
            peer_header,
        ))
    }

    /// The handles of a request whose destination could not be resolved: `unknown` outbound;
    /// inbound, every request is for the application.
    pub fn unknown(&self, direction: Direction) -> &Arc<ServiceTelemetry> {
        match direction {
            Direction::Outbound => &self.unknown,
            Direction::Inbound => &self.inbound,
        }
    }

    /// The handles of connections whose destination is not known yet.
    pub fn unresolved(&self, direction: Direction) -> &Arc<ServiceTelemetry> {
        match direction {
            Direction::Outbound => &self.unresolved[0],
            Direction::Inbound => &self.unresolved[1],
        }
    }

    /// The Prometheus text exposition of every metric, with the resilience engine's counters
    /// of the active policies when there are any.
    pub fn encode(&self, policies: Option<&crate::policy::PolicySet>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if let Some(policies) = policies {
            let _ = prometheus_client::encoding::text::encode_registry(
                &mut out,
                &policy_metrics(policies),
            );
        }
        if let Some(read) = self.log_lines_dropped.get() {
            let mut registry = Registry::default();
            let dropped = Counter::<u64>::default();
            dropped.inc_by(read());
            registry.register(
                "tandem_log_lines_dropped",
                "Log lines (access log included) dropped because stdout could not keep up",
                dropped,
            );
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        }
        self.identity.encode(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

fn register_families(registry: &mut Registry, f: &Families) {
    registry.register(
        "tandem_request_attempts",
        "Attempts (first try and retries) per request to a service with a policy",
        f.attempts.clone(),
    );
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
