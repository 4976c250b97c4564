//! `AuthorizationPolicy`: who may call a workload, enforced by the workload's inbound proxy.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, HeaderMatch, HttpMethod, PathMatch};

/// Who may call the workloads behind a Service (or of a ServiceAccount), and on what.
///
/// The inbound proxy of every targeted pod evaluates, per HTTP request and per opaque TCP
/// connection: a matching `Deny` policy refuses; otherwise, when any `Allow` policy covers the
/// port, only what one of their rules matches gets in; otherwise the namespace's default policy
/// (annotation `tandem.dev/default-policy`, else the mesh's) decides. A refused HTTP request gets
/// 403 with a `tandem-denied-by` header naming the policy (gRPC: status 7, PERMISSION_DENIED); a
/// refused TCP connection is closed. The kubelet's probes are always let through.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    category = "tandem",
    namespaced,
    status = "AuthorizationPolicyStatus",
    derive = "PartialEq",
    doc = "Who may call the workloads behind a Service or of a ServiceAccount (Tandem)",
    cel,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.targetRef.kind"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Workloads","type":"string","jsonPath":".status.workloads"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Proxies","type":"string","jsonPath":".status.proxies"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads the policy protects, in the policy's namespace.
    pub target_ref: AuthorizationTarget,

    /// `Allow` or `Deny` what the rules match.
    pub action: AuthorizationAction,

    /// The policy matches a request when any rule matches. A rule with neither `from` nor `to`
    /// matches everything (so `Deny` with `rules: [{}]` refuses every caller).
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<AuthorizationRule>,
}

/// The workloads a policy protects.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.kind == 'Service' || size(self.ports) == 0")
        .message("ports can only be given with kind Service (a ServiceAccount's policy covers every port; narrow it with rules[].to.ports)")
        .field_path(".ports")
)]
pub struct AuthorizationTarget {
    /// API group of the target: "" (the core group).
    #[serde(default)]
    #[schemars(length(max = 0))]
    pub group: String,

    /// `Service` (the pods its selector picks) or `ServiceAccount` (the pods running as it).
    pub kind: AuthorizationTargetKind,

    /// Name of the Service or ServiceAccount.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Service ports (their `port`, not the target port) the policy covers; omitted: every port
    /// of the Service. The operator resolves them to the pods' ports.
    #[serde(default)]
    #[schemars(length(max = 32), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
}

/// Kinds a policy can target.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationTargetKind {
    /// The pods a Service selects.
    Service,
    /// The pods running as a ServiceAccount.
    ServiceAccount,
}

impl AuthorizationTargetKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::ServiceAccount => "ServiceAccount",
        }
    }
}

/// What a policy does with what its rules match.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizationAction {
    /// Let it in. Once an Allow policy covers a port, whatever no Allow rule matches is denied.
    Allow,
    /// Refuse it, whatever Allow policies say.
    Deny,
}

/// One rule: who (`from`) and what (`to`); both must match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Callers the rule matches; omitted: any caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,

    /// Requests the rule matches; omitted: any request or connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Operation>,
}

/// Callers: a caller matches when it matches any entry of any field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("size(self.principals) + size(self.serviceAccounts) + size(self.namespaces) > 0 || self.authenticated || self.unauthenticated")
        .message("from matches no caller: set principals, serviceAccounts, namespaces, authenticated or unauthenticated")
)]
pub struct Source {
    /// SPIFFE IDs such as `spiffe://cluster.local/ns/shop/sa/web`; one ending in `*` matches
    /// every ID starting with the rest.
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(length(min = 10, max = 1024), regex(pattern = r"^spiffe://[^\s]+$"))
    )]
    pub principals: Vec<String>,

    /// ServiceAccounts whose pods (over mutual TLS) match.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub service_accounts: Vec<ServiceAccountRef>,

    /// Namespaces whose meshed workloads (over mutual TLS) match.
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub namespaces: Vec<String>,

    /// Any caller with a mesh identity.
    #[serde(default)]
    pub authenticated: bool,

    /// Any caller at all, plaintext included.
    #[serde(default)]
    pub unauthenticated: bool,
}

/// A ServiceAccount, by name and namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Its namespace; omitted: the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,

    /// Its name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Request conditions: each field that is set must match (any one of its entries).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Ports the pods listen on (container ports, as the inbound proxy sees them).
    #[serde(default)]
    #[schemars(length(max = 32), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,

    /// Paths (HTTP only).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub paths: Vec<PathMatch>,

    /// Methods (HTTP only).
    #[serde(default)]
    #[schemars(length(max = 9))]
    pub methods: Vec<HttpMethod>,

    /// Headers, every one of which must match (HTTP only).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// What the operator last concluded about an authorization policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` and `Programmed`, each with a reason and a message for people.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,

    /// The workloads (`<namespace>/<serviceAccount>`) the policy applies to, sorted.
    #[serde(default)]
    #[schemars(length(max = 1024), inner(length(max = 512)))]
    pub workloads: Vec<String>,

    /// How many of the proxies that need the policy run a config with its current generation,
    /// `<current>/<total>` (for example `37/40`), as they report it to the operator over the
    /// config stream; absent until the operator has counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub proxies: Option<String>,
}
