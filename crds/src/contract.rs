//! The proxy config contract: `tandem.dev/proxy-config/v1`.
//!
//! The operator renders one [`ProxyConfig`] per ServiceAccount into the ConfigMap
//! `tandem-proxy-<serviceAccount>` (key `config.json`); every proxy of that ServiceAccount loads
//! it from `/etc/tandem/config.json`. This module is the whole agreement between the two: the
//! operator writes only what [`ProxyConfig::validate`] accepts, and the proxy refuses anything
//! else (keeping its last good config).
//!
//! Durations are integers of milliseconds (`…Ms` fields): the CRDs take human strings such as
//! `"250ms"`, the operator converts them once, and the proxy never parses a duration.
//!
//! This module compiles without kube or k8s-openapi so that the proxy can depend on it.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::identity::MtlsMode;

mod authz;
pub mod stream;
mod validate;

pub use authz::{
    Authorization, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Authorizer, Caller,
    CallerIdentity, Callers, CompileError, DecidedBy, Decision, DefaultPolicy, HttpFacts,
    Operations, Request,
};
pub use stream::{
    AppliedReport, ConfigDelta, ConfigSource, DeltaMismatch, DiscoverRequest, DiscoverResponse,
    StreamMessage, StreamRefusal, generation_of, version_stamp,
};
pub use validate::{ValidationError, ValidationErrors};

/// The `apiVersion` every config file carries.
pub const PROXY_CONFIG_API_VERSION: &str = "tandem.dev/proxy-config/v1";

/// Default request timeout when a route sets none: none (requests may take as long as the
/// upstream needs), as in Linkerd and Istio.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default idle timeout of pooled upstream connections.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

/// Everything one proxy needs to know.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Always [`PROXY_CONFIG_API_VERSION`].
    pub api_version: String,
    /// Version stamp chosen by the operator, `<generation>.<hash of the content>` (see
    /// [`stream::version_stamp`]), shown by the proxy at `/config` and in its metrics so a person
    /// can tell which config a proxy runs; the generation orders a workload's versions.
    #[serde(default)]
    pub version: String,
    /// Whose config this is.
    pub workload: Workload,
    /// Proxy-wide defaults.
    #[serde(default)]
    pub defaults: Defaults,
    /// The destination services that policies govern, and every other Service with a meshed
    /// endpoint (so mutual TLS reaches it), sorted by namespace then name. Traffic to any other
    /// destination passes through to its original address unchanged.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Who may call this workload: its default policy and the AuthorizationPolicies that target
    /// it, enforced by its inbound proxy. Absent: everyone (`all-unauthenticated`, no policy).
    /// Left out of the JSON when it is that default, so a config without authorization stays
    /// loadable by proxies older than this section (sidecars are upgraded independently).
    #[serde(default, skip_serializing_if = "Authorization::is_open")]
    pub authorization: Authorization,
    /// How this proxy reports: the metric names' prefix and distributed tracing. A mesh-wide
    /// setting of the operator, the same in every workload's config. Left out of the JSON when
    /// it is the default (prefix `tandem_`, no tracing), so such a config stays loadable by
    /// proxies older than this section.
    #[serde(default, skip_serializing_if = "Telemetry::is_default")]
    pub telemetry: Telemetry,
}

/// The proxy's telemetry settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    /// The prefix of the request and TCP series (`<prefix>requests_total`, …): `tandem` (the
    /// default) or `istio`, under which Istio's published dashboards and Kiali read the series
    /// unchanged. The proxy's own series (`tandem_proxy_*`, config, identity) keep their names.
    #[serde(default)]
    pub metrics_prefix: MetricsPrefix,
    /// Distributed tracing; absent: no spans are recorded or exported (trace headers still pass
    /// through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

impl Telemetry {
    /// Whether these are the defaults (`tandem_` prefix, tracing off).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The prefix of the request and TCP metric names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MetricsPrefix {
    /// `tandem_requests_total`, …
    #[default]
    Tandem,
    /// `istio_requests_total`, …: what Istio's dashboards and Kiali query.
    Istio,
}

impl MetricsPrefix {
    /// The prefix with its trailing underscore: `tandem_` or `istio_`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tandem => "tandem_",
            Self::Istio => "istio_",
        }
    }
}

/// Where and how often spans are exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// The OTLP/HTTP collector's base URL (`http://host:port`); spans are POSTed as protobuf to
    /// `<collector>/v1/traces`.
    pub collector: String,
    /// The probability, in percent (0–100), of starting a trace for a request that arrives with
    /// no trace context. A request that carries one follows its sampled flag (parent-based).
    #[serde(default = "default_sampling_percent")]
    pub sampling_percent: f64,
}

/// Istio's default: 1 % of requests without a trace context start one.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

fn default_sampling_percent() -> f64 {
    DEFAULT_SAMPLING_PERCENT
}

/// The workload identity the config was rendered for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Namespace of the pods.
    pub namespace: String,
    /// ServiceAccount the pods run as.
    pub service_account: String,
    /// Whether this workload's inbound listener accepts plaintext (`permissive`, the default)
    /// or only mutual TLS from meshed peers (`strict`).
    #[serde(default)]
    pub mtls: MtlsMode,
}

/// Proxy-wide defaults, used where a service or route says nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Defaults {
    /// Time allowed to establish an upstream TCP connection, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time an idle pooled upstream connection is kept, in milliseconds.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_idle_timeout_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}

/// A Kubernetes Service, as the proxy sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// The Service's cluster IPs; connections to one of them on a listed port are this service.
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// The Service's ports, each with its ready endpoints.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Routing rules, matched in order, first match wins. When empty, or when no rule matches,
    /// requests go to this service itself on the port they were sent to.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// How requests are spread over the endpoints.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Cap on retries to this service, shared by every route that retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// Connection-pool limits and outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

impl Service {
    /// `namespace/name`, the key backends use to refer to a service.
    pub fn key(&self) -> ServiceRef {
        ServiceRef {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// The port with this number, if the service has it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// One port of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (may be empty for a single-port Service).
    #[serde(default)]
    pub name: String,
    /// The port clients connect to on the cluster IP.
    pub port: u16,
    /// The application protocol; `detect` sniffs HTTP/1, HTTP/2 or opaque TCP per connection.
    #[serde(default)]
    pub protocol: Protocol,
    /// Ready endpoints for this port, sorted by address.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// The protocol spoken on a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Not declared: the proxy detects HTTP/1.1 and HTTP/2 prior knowledge, and relays anything
    /// else as opaque TCP (without waiting for a client that does not speak first).
    #[default]
    Detect,
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP: relayed byte for byte, no detection.
    Tcp,
}

/// One ready endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Address and port to connect to.
    pub address: SocketAddr,
    /// Whether a Tandem proxy runs beside this endpoint (its pod is injected). Mutual TLS will be
    /// used only towards meshed endpoints.
    #[serde(default)]
    pub meshed: bool,
    /// The SPIFFE ID of the endpoint's workload (`spiffe://<td>/ns/<ns>/sa/<sa>`), set when the
    /// endpoint is meshed and its pod's ServiceAccount is known. The outbound proxy opens mutual
    /// TLS to such an endpoint and accepts only a certificate for exactly this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The workload the endpoint's pod belongs to (its controller's name: the Deployment for a
    /// ReplicaSet's pod, see `pods::workload_name`), and that pod's namespace; set when the
    /// endpoint is a pod the operator knows. Metrics label destinations with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<EndpointWorkload>,
}

/// The workload behind an endpoint.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointWorkload {
    /// The workload's name (`reviews-v1` for the pods of Deployment `reviews-v1`).
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
}

/// A reference to a service in the config.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A routing rule: when a request matches, it is sent to one of the backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Name for metrics and logs (the policy's rule name, or `<policy>-<index>`).
    pub name: String,
    /// The request matches when any one of these matches; an empty list matches every request.
    #[serde(default)]
    pub matches: Vec<RequestMatch>,
    /// Weighted backends. Empty means the service itself.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Whole-request timeout in milliseconds, retries included; answered with 504 when it fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry policy for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

/// Conditions a request must meet, all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    /// Path condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// HTTP method, upper case (`GET`, `POST`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header conditions, all of which must hold.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// How a path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole path equals this.
    Exact(String),
    /// The path starts with this, on a segment boundary (`/api` matches `/api` and `/api/x`, not
    /// `/apix`).
    Prefix(String),
    /// The whole path matches this regular expression (Rust `regex` syntax, anchored).
    Regex(String),
}

/// A header condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, lower case.
    pub name: String,
    /// How its value is matched.
    pub value: ValueMatch,
}

/// How a header value is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ValueMatch {
    /// The value equals this.
    Exact(String),
    /// The whole value matches this regular expression (anchored).
    Regex(String),
}

/// A weighted backend of a route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// The service requests are sent to; it must be in the config's `services`.
    pub service: ServiceRef,
    /// Its port; it must be one of that service's ports.
    pub port: u16,
    /// Relative weight; 0 takes the backend out of rotation.
    pub weight: u32,
}

/// Retry policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (so at most `attempts + 1` tries).
    pub attempts: u32,
    /// Timeout of each try in milliseconds; a try that times out may be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// What is retried.
    pub retry_on: Vec<RetryOn>,
    /// Extra status codes retried when `retry_on` has `retriableStatusCodes`.
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// First backoff interval in milliseconds; it doubles per retry, with full jitter.
    pub backoff_base_ms: u64,
    /// Largest backoff interval in milliseconds.
    pub backoff_max_ms: u64,
    /// Whether methods that are not idempotent (POST, PATCH, CONNECT) may be retried.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// A retry condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504.
    GatewayError,
    /// The connection to the endpoint could not be established.
    ConnectFailure,
    /// The connection was reset or closed before a response arrived.
    Reset,
    /// A status listed in `retriableStatusCodes`.
    RetriableStatusCodes,
}

/// Linkerd-style retry budget: retries may add at most `ratio` of the request load, plus a floor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries allowed per original request over the window (0.2 = 20 % extra load).
    pub ratio: f64,
    /// Retries allowed per second regardless of the ratio, so low traffic can still retry.
    pub min_retries_per_second: u32,
    /// Sliding window over which requests and retries are counted, in milliseconds.
    pub window_ms: u64,
}

/// How requests are spread over endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Peak-EWMA latency with power of two choices (as Linkerd).
    #[default]
    PeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// The endpoint with fewest requests in flight of two chosen at random.
    LeastRequest,
}

/// Connection-pool limits and outlier detection for a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Connection-pool limits; excess requests fail fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of misbehaving endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// Connection-pool limits (per proxy, per service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Upstream connections in use: one per HTTP/1.1 attempt in flight, one per 100 attempts
    /// on an HTTP/2 port.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

/// Outlier detection: eject endpoints that fail in a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (or connect failures) that eject an endpoint; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 responses (or connect failures) that eject; 0 disables.
    pub consecutive_gateway_errors: u32,
    /// How often ejections are re-evaluated, in milliseconds.
    pub interval_ms: u64,
    /// Ejection time for the first ejection; multiplied by the number of times ejected.
    pub base_ejection_time_ms: u64,
    /// Longest ejection time.
    pub max_ejection_time_ms: u64,
    /// Most endpoints ejected at once, in percent (at least one may always be ejected).
    pub max_ejection_percent: u32,
}

impl ProxyConfig {
    /// An empty config for a workload: every destination passes through.
    pub fn new(workload: Workload) -> Self {
        Self {
            api_version: PROXY_CONFIG_API_VERSION.to_owned(),
            version: String::new(),
            workload,
            defaults: Defaults::default(),
            services: Vec::new(),
            authorization: Authorization::default(),
            telemetry: Telemetry::default(),
        }
    }

    /// Parses and validates a config file's bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes).map_err(ConfigError::Parse)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// Serializes the config as the operator writes it: pretty JSON, fields in a fixed order.
    pub fn to_json(&self) -> String {
        // Serializing plain structs with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Finds the service a connection to `dst` is meant for (by cluster IP and port).
    pub fn service_for(&self, dst: SocketAddr) -> Option<(&Service, &ServicePort)> {
        self.services.iter().find_map(|svc| {
            if !svc.cluster_ips.contains(&dst.ip()) {
                return None;
            }
            svc.port(dst.port()).map(|port| (svc, port))
        })
    }

    /// Finds a service by its reference.
    pub fn service(&self, key: &ServiceRef) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.name == key.name && s.namespace == key.namespace)
    }

    /// Checks everything serde cannot: the API version, references between services, bounds,
    /// regular expressions. Reports every problem, each with its JSON path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        validate::validate(self)
    }

    /// Compiles the authorization section for the inbound proxy (`trust_domain`: the mesh's).
    pub fn authorizer(&self, trust_domain: &str) -> Result<Authorizer, CompileError> {
        Authorizer::new(&self.authorization, trust_domain)
    }

    /// The set of services by key, for duplicate checks.
    pub(crate) fn service_keys(&self) -> BTreeSet<ServiceRef> {
        self.services.iter().map(Service::key).collect()
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The bytes are not a config document (bad JSON, wrong field, wrong type).
    #[error("config is not valid JSON for {PROXY_CONFIG_API_VERSION}: {0}")]
    Parse(#[source] serde_json::Error),
    /// The document parsed but makes no sense.
    #[error("config is invalid: {0}")]
    Invalid(#[source] ValidationErrors),
}

/// The JSON Schema of the config file, as checked in at `manifests/proxy-config.schema.json`.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ProxyConfig)).unwrap_or_default()
}
