//! Which policies are in force: conflicts between policies of one kind, and verdicts.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tandem_crds::v1alpha1::reason;

/// The policy kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// `TrafficPolicy`.
    Traffic,
    /// `CircuitBreakerPolicy`.
    CircuitBreaker,
    /// `AuthorizationPolicy` (never conflicts: every accepted one applies).
    Authorization,
}

impl PolicyKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Traffic => "TrafficPolicy",
            Self::CircuitBreaker => "CircuitBreakerPolicy",
            Self::Authorization => "AuthorizationPolicy",
        }
    }
}

/// One policy object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Its kind.
    pub kind: PolicyKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl PolicyKey {
    /// The key of a policy object.
    pub fn of(kind: PolicyKind, object: &impl ResourceExt) -> Self {
        Self {
            kind,
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        }
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// Whether a policy is in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and applied.
    Accepted,
    /// Not applied, with a reason from [`reason`] and a message for people.
    Rejected {
        /// `Invalid`, `TargetNotFound` or `Conflicted`.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Verdict {
    /// Whether the policy is in force.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted)
    }
}

/// Resolves conflicts between policies of one kind: per target Service the oldest policy (by
/// creation time, then name, as in Gateway API) wins; the others are recorded as `Conflicted`.
/// Returns the winners, in a stable order.
pub fn winners<'a, P: ResourceExt>(
    kind: PolicyKind,
    policies: &'a [Arc<P>],
    target: impl Fn(&P) -> &String,
    verdicts: &mut BTreeMap<PolicyKey, Verdict>,
) -> Vec<&'a P> {
    let mut by_target: BTreeMap<(String, String), Vec<&'a P>> = BTreeMap::new();
    for policy in policies {
        let key = (
            policy.namespace().unwrap_or_default(),
            target(policy).clone(),
        );
        by_target.entry(key).or_default().push(policy.as_ref());
    }
    let mut winners = Vec::with_capacity(by_target.len());
    for ((namespace, service), mut group) in by_target {
        group.sort_by_key(|p| (created(*p), p.name_any()));
        let mut group = group.into_iter();
        let Some(winner) = group.next() else {
            continue;
        };
        for loser in group {
            verdicts.insert(
                PolicyKey::of(kind, loser),
                Verdict::Rejected {
                    reason: reason::CONFLICTED,
                    message: format!(
                        "{} {namespace}/{} is older and already targets Service {namespace}/{service}",
                        kind.as_str(),
                        winner.name_any()
                    ),
                },
            );
        }
        winners.push(winner);
    }
    winners
}

/// Creation time; an object without one (not yet persisted) counts as the newest.
fn created(object: &impl ResourceExt) -> Timestamp {
    object.creation_timestamp().map_or(Timestamp::MAX, |t| t.0)
}
