//! `CircuitBreakerPolicy`: limits on the load clients put on one Service, and ejection of
//! endpoints that keep failing.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, TargetRef};
use crate::duration::DURATION_PATTERN;

/// Protects one Service from overload and routes around its failing endpoints.
///
/// Every meshed client of the target Service enforces the limits in its own proxy (per client
/// proxy, as Envoy's circuit breakers are per client), fails excess requests fast with 503 and
/// a header `x-tandem-overflow` naming the limit, and ejects endpoints that fail repeatedly.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "CircuitBreakerPolicy",
    plural = "circuitbreakerpolicies",
    shortname = "cbp",
    category = "tandem",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "Connection-pool limits and outlier detection for one Service (Tandem)",
    cel,
    validation = Rule::new("has(self.spec.connectionPool) || has(self.spec.outlierDetection)")
        .message("set spec.connectionPool, spec.outlierDetection, or both"),
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Proxies","type":"string","jsonPath":".status.proxies"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerPolicySpec {
    /// The Service this policy protects, in the policy's namespace. At most one
    /// CircuitBreakerPolicy may target a Service; the older one wins a conflict.
    pub target_ref: TargetRef,

    /// Limits on concurrent load from each client proxy. Omitted: no limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,

    /// Ejection of endpoints that fail in a row. Omitted: no ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// Limits on concurrent load, per client proxy. Requests beyond a limit fail at once with 503.
/// Defaults are Envoy's: 1024 connections, 1024 pending, 1024 in flight, 3 retries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Most connections in use to the Service's endpoints: each HTTP/1.1 request in flight holds
    /// one; an HTTP/2 (h2c, gRPC) port's connection carries up to 100 requests at once. Idle
    /// kept-alive connections are not counted. Default 1024.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: i32,

    /// Most requests waiting for a connection. Default 1024.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_pending_requests: i32,

    /// Most requests in flight. Default 1024.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_requests: i32,

    /// Most retries in flight at once; 0 forbids retries to this Service. Default 3.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_retries: i32,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: default_limit(),
            max_pending_requests: default_limit(),
            max_requests: default_limit(),
            max_retries: default_max_retries(),
        }
    }
}

fn default_limit() -> i32 {
    1024
}

fn default_max_retries() -> i32 {
    3
}

/// Ejection of failing endpoints. An endpoint that returns `consecutive5xxErrors` 5xx responses
/// (or connection failures) in a row is taken out of rotation for `baseEjectionTime` times the
/// number of times it has been ejected, at most `maxEjectionTime`; then one probe request
/// decides whether it returns. When every endpoint is ejected, traffic goes to all of them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)")
        .message("baseEjectionTime must not be longer than maxEjectionTime")
        .field_path(".baseEjectionTime"),
    validation = Rule::new("self.consecutive5xxErrors > 0 || self.consecutiveGatewayErrors > 0")
        .message("set consecutive5xxErrors or consecutiveGatewayErrors above 0, or remove outlierDetection")
)]
pub struct OutlierDetection {
    /// 5xx responses (or connection failures) in a row that eject an endpoint; 0 disables this
    /// trigger. Default 5.
    #[serde(default = "default_consecutive_5xx", rename = "consecutive5xxErrors")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_5xx_errors: i32,

    /// 502, 503 or 504 responses (or connection failures) in a row that eject an endpoint; 0
    /// disables this trigger. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_gateway_errors: i32,

    /// How often ejections are reconsidered, such as "10s". Default "10s".
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub interval: String,

    /// Ejection time of a first ejection, such as "30s"; it grows with each further ejection of
    /// the same endpoint. Default "30s".
    #[serde(default = "default_base_ejection")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub base_ejection_time: String,

    /// Longest ejection time, such as "300s". Default "300s".
    #[serde(default = "default_max_ejection")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_ejection_time: String,

    /// Most endpoints ejected at once, in percent; one endpoint may always be ejected.
    /// Default 10.
    #[serde(default = "default_max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: i32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: default_consecutive_5xx(),
            consecutive_gateway_errors: 0,
            interval: default_interval(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_5xx() -> i32 {
    5
}

fn default_interval() -> String {
    "10s".into()
}

fn default_base_ejection() -> String {
    "30s".into()
}

fn default_max_ejection() -> String {
    "300s".into()
}

fn default_max_ejection_percent() -> i32 {
    10
}
