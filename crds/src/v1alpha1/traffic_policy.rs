//! `TrafficPolicy`: how requests to one Service are routed, split, timed out and retried.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, TargetRef};
use crate::duration::DURATION_PATTERN;

/// How requests to one Service are routed, split between backends, timed out and retried.
///
/// Every meshed client that calls the target Service applies this policy in its own proxy.
/// Rules are tried in order and the first whose matches fit the request decides; a request no
/// rule matches goes to the target Service unchanged.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    category = "tandem",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "How requests to one Service are routed, split between backends, timed out and retried (Tandem)",
    cel,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Proxies","type":"string","jsonPath":".status.proxies"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service whose traffic this policy governs, in the policy's namespace. At most one
    /// TrafficPolicy may target a Service; when two do, the older one wins and the newer is
    /// marked `Accepted=False` with reason `Conflicted`.
    pub target_ref: TargetRef,

    /// Ordered routing rules; the first rule whose matches fit a request applies. Requests that
    /// no rule matches go to the target Service with no timeout and no retries.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub rules: Vec<TrafficRule>,

    /// Caps the retries of every rule of this policy so that retries cannot multiply an outage
    /// (Linkerd's retry budget). When omitted and any rule retries, the defaults apply: 20% extra
    /// load, 10 retries per second minimum, over a 10s window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,

    /// How each client spreads requests over the endpoints of the target Service:
    /// `PeakEWMA` (default; the endpoint with the lower latency-weighted load of two picked at
    /// random), `RoundRobin`, or `LeastRequest` (fewer requests in flight of two).
    #[serde(default)]
    pub load_balancer: LoadBalancerKind,
}

/// One routing rule: which requests it takes and where they go.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.timeout) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) <= duration(self.timeout)")
        .message("retries.perTryTimeout must not be longer than the rule's timeout")
        .field_path(".retries.perTryTimeout")
)]
pub struct TrafficRule {
    /// Name of the rule, used in metrics and logs. Defaults to `rule-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: Option<String>,

    /// The rule applies when any one of these matches (all conditions inside one match must
    /// hold). Omitted or empty: the rule matches every request.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub matches: Vec<RouteMatch>,

    /// Where matching requests go, split by weight (e.g. 90 and 10 for a canary). Omitted or
    /// empty: the target Service itself.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("self.size() == 0 || self.exists(b, b.weight > 0)")
            .message("at least one backend must have a positive weight")
    )]
    pub backends: Vec<BackendRef>,

    /// Time allowed for the whole request, retries included, such as "2s". When it expires the
    /// caller gets 504 Gateway Timeout. Omitted: no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,

    /// When and how failed requests are retried. Omitted: no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
}

/// Conditions on a request; all that are given must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Condition on the request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,

    /// The HTTP method, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,

    /// Conditions on request headers, all of which must hold.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// A condition on the request path.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type == 'RegularExpression' || self.value.startsWith('/')")
        .message("an Exact or PathPrefix path must start with '/'")
        .field_path(".value")
)]
pub struct PathMatch {
    /// `Exact`: the whole path; `PathPrefix`: the path starts with the value on a `/` boundary
    /// (`/api` matches `/api` and `/api/x`, not `/apix`); `RegularExpression`: the whole path
    /// matches (RE2-like syntax, anchored). Default `PathPrefix`.
    #[serde(default, rename = "type")]
    pub kind: PathMatchKind,

    /// The path or expression.
    #[schemars(length(min = 1, max = 1024))]
    pub value: String,
}

/// How a path is compared.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PathMatchKind {
    /// The whole path equals the value.
    Exact,
    /// The path starts with the value, on a segment boundary.
    #[default]
    PathPrefix,
    /// The whole path matches the regular expression.
    RegularExpression,
}

/// A condition on one request header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,

    /// `Exact` (default) compares the whole value; `RegularExpression` matches it, anchored.
    #[serde(default, rename = "type")]
    pub kind: HeaderMatchKind,

    /// The value or expression.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// How a header value is compared.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum HeaderMatchKind {
    /// The whole value equals.
    #[default]
    Exact,
    /// The whole value matches the regular expression.
    RegularExpression,
}

/// HTTP methods a rule can match.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs, clippy::upper_case_acronyms)]
pub enum HttpMethod {
    GET,
    HEAD,
    POST,
    PUT,
    DELETE,
    CONNECT,
    OPTIONS,
    TRACE,
    PATCH,
}

impl HttpMethod {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GET => "GET",
            Self::HEAD => "HEAD",
            Self::POST => "POST",
            Self::PUT => "PUT",
            Self::DELETE => "DELETE",
            Self::CONNECT => "CONNECT",
            Self::OPTIONS => "OPTIONS",
            Self::TRACE => "TRACE",
            Self::PATCH => "PATCH",
        }
    }
}

/// A weighted destination of a rule: a Service in the policy's namespace and one of its ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Name of the Service, in the policy's namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Port of that Service (its `port`, not the target port).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Share of requests, relative to the other backends of the rule: 90 and 10 send 90% and
    /// 10%. 0 keeps the backend listed but sends it nothing. Default 1.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: i32,
}

fn default_weight() -> i32 {
    1
}

/// When and how failed requests are retried.
///
/// Only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are retried unless
/// `retryNonIdempotent` is true; request bodies over 64 KiB are never retried.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("size(self.retriableStatusCodes) == 0 || self.retryOn.exists(c, c == 'retriable-status-codes')")
        .message("retriableStatusCodes is used only when retryOn contains 'retriable-status-codes'")
        .field_path(".retriableStatusCodes")
)]
pub struct RetryPolicy {
    /// Retries after the first try; 2 means at most 3 tries in all. Default 2, at most 10.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: i32,

    /// Time allowed for each try, such as "500ms"; a try that takes longer is abandoned and may
    /// be retried. Must not exceed the rule's `timeout`. Omitted: bounded only by `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub per_try_timeout: Option<String>,

    /// What counts as a failure worth retrying: `5xx` (any 5xx response), `gateway-error`
    /// (502, 503, 504), `connect-failure` (no connection to the endpoint), `reset` (connection
    /// reset or closed before a response), `retriable-status-codes` (the codes listed below).
    /// Default `["5xx", "connect-failure", "reset"]`.
    #[serde(default = "default_retry_on")]
    #[schemars(length(min = 1, max = 5))]
    pub retry_on: Vec<RetryCondition>,

    /// Further status codes to retry (e.g. 409), with `retry-on: retriable-status-codes`.
    #[serde(default)]
    #[schemars(length(max = 16), inner(range(min = 100, max = 599)))]
    pub retriable_status_codes: Vec<i32>,

    /// Wait between tries: exponential from `baseInterval`, doubling per retry up to
    /// `maxInterval`, with full jitter. Default 25ms to 250ms.
    #[serde(default)]
    pub backoff: Backoff,

    /// Whether POST, PATCH and CONNECT may be retried. Default false: retrying a request that is
    /// not idempotent can apply it twice (a double payment).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

fn default_attempts() -> i32 {
    2
}

fn default_retry_on() -> Vec<RetryCondition> {
    vec![
        RetryCondition::FiveXx,
        RetryCondition::ConnectFailure,
        RetryCondition::Reset,
    ]
}

/// A failure that may be retried.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCondition {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the endpoint could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset or closed before a response arrived.
    #[serde(rename = "reset")]
    Reset,
    /// A status listed in `retriableStatusCodes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

/// Exponential backoff with full jitter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.baseInterval) <= duration(self.maxInterval)")
        .message("backoff.baseInterval must not be longer than backoff.maxInterval")
)]
pub struct Backoff {
    /// Wait before the first retry (before jitter), such as "25ms". Default "25ms".
    #[serde(default = "default_backoff_base")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub base_interval: String,

    /// Longest wait between tries, such as "250ms". Default "250ms".
    #[serde(default = "default_backoff_max")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_interval: String,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_interval: default_backoff_base(),
            max_interval: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> String {
    "25ms".into()
}

fn default_backoff_max() -> String {
    "250ms".into()
}

/// Linkerd-style retry budget: over any `window`, retries may add at most `retryPercent` of the
/// requests, plus `minRetriesPerSecond` so that quiet services can still retry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Extra load retries may add, in percent of requests. Default 20.
    #[serde(default = "default_retry_percent")]
    #[schemars(range(min = 0, max = 1000))]
    pub retry_percent: i32,

    /// Retries per second allowed regardless of the percentage. Default 10.
    #[serde(default = "default_min_retries")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_retries_per_second: i32,

    /// Window over which requests and retries are counted, such as "10s". Default "10s".
    #[serde(default = "default_budget_window")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub window: String,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            retry_percent: default_retry_percent(),
            min_retries_per_second: default_min_retries(),
            window: default_budget_window(),
        }
    }
}

fn default_retry_percent() -> i32 {
    20
}

fn default_min_retries() -> i32 {
    10
}

fn default_budget_window() -> String {
    "10s".into()
}

/// Load-balancing algorithm.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum LoadBalancerKind {
    /// Peak-EWMA latency with power of two choices (Linkerd's algorithm).
    #[default]
    #[serde(rename = "PeakEWMA")]
    PeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// Fewer requests in flight, of two endpoints picked at random.
    LeastRequest,
}
