//! Status shared by both policy kinds: conditions in the Gateway API style.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition types.
pub mod condition {
    /// Whether the policy is valid and in force: `True`, or `False` with a reason from
    /// [`super::reason`].
    pub const ACCEPTED: &str = "Accepted";
    /// Whether every proxy ConfigMap that needs the policy carries it.
    pub const PROGRAMMED: &str = "Programmed";
}

/// Condition reasons.
pub mod reason {
    /// The policy is valid and applies (`Accepted=True`).
    pub const ACCEPTED: &str = "Accepted";
    /// The policy makes no sense in a way the schema cannot catch (`Accepted=False`).
    pub const INVALID: &str = "Invalid";
    /// The target Service, or a backend Service, does not exist (`Accepted=False`).
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    /// An older policy of the same kind targets the same Service (`Accepted=False`).
    pub const CONFLICTED: &str = "Conflicted";
    /// Every ConfigMap that needs the policy carries it (`Programmed=True`).
    pub const PROGRAMMED: &str = "Programmed";
    /// Some ConfigMap is not written yet (`Programmed=False`).
    pub const PENDING: &str = "Pending";
    /// A ConfigMap would exceed 1 MiB with the policy, so it was not written (`Programmed=False`).
    pub const TOO_LARGE: &str = "ConfigTooLarge";
}

/// What the operator last concluded about a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` and `Programmed`, each with a reason and a message for people.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,

    /// How many of the proxies that need the policy run a config with its current generation,
    /// `<current>/<total>` (for example `37/40`), as they report it to the operator over the
    /// config stream; absent until the operator has counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub proxies: Option<String>,
}

/// One condition, as in `metav1.Condition`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: `Accepted` or `Programmed`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,

    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,

    /// Machine-readable reason in CamelCase, such as `TargetNotFound`.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,

    /// What happened, for a person.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,

    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,

    /// The generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The value of a condition.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}
