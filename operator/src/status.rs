//! Policy status: the `Accepted` and `Programmed` conditions, computed purely.

use tandem_crds::v1alpha1::{
    AuthorizationPolicyStatus, Condition, ConditionStatus, PolicyStatus, condition, reason,
};

use crate::policy::Verdict;

/// Whether the ConfigMaps that need a policy carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Programming {
    /// Every ConfigMap that needs it was written (or none needs it yet).
    Done {
        /// How many ConfigMaps carry it.
        config_maps: usize,
        /// Of the proxies that need it, how many run a config carrying its current
        /// generation, and how many there are; `None` when not counted.
        proxies: Option<(usize, usize)>,
    },
    /// Some writes failed; they are retried.
    Pending(String),
    /// The config of a workload that needs it would exceed 1 MiB, so that one was not
    /// written (the message names it).
    TooLarge(String),
}

impl Programming {
    /// `status.proxies`: `<current>/<total>`, when counted.
    pub fn proxies(&self) -> Option<String> {
        match self {
            Self::Done {
                proxies: Some((current, total)),
                ..
            } => Some(format!("{current}/{total}")),
            _ => None,
        }
    }
}

/// A condition that changed, for a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `Accepted` or `Programmed`.
    pub type_: &'static str,
    /// Whether the condition now holds.
    pub holds: bool,
    /// The new reason.
    pub reason: String,
    /// The new message.
    pub message: String,
}

/// The status a policy should have now, and the condition changes since `previous`.
///
/// `lastTransitionTime` changes only when a condition's status does, as in `metav1.Condition`,
/// so recomputing an unchanged status gives an equal value and the operator writes nothing.
pub fn next_status(
    previous: Option<&PolicyStatus>,
    generation: Option<i64>,
    verdict: &Verdict,
    programming: &Programming,
    now: &str,
) -> (PolicyStatus, Vec<Transition>) {
    let previous = previous.map(|p| p.conditions.as_slice());
    let (conditions, transitions) =
        next_conditions(previous, generation, verdict, programming, now);
    let status = PolicyStatus {
        observed_generation: generation,
        conditions,
        proxies: verdict
            .is_accepted()
            .then(|| programming.proxies())
            .flatten(),
    };
    (status, transitions)
}

/// [`next_status`] for an AuthorizationPolicy, whose status also lists the workloads
/// (`<namespace>/<serviceAccount>`) it applies to. `Programmed` counts their ConfigMaps, the
/// ones that carry it.
pub fn next_authorization_status(
    previous: Option<&AuthorizationPolicyStatus>,
    generation: Option<i64>,
    verdict: &Verdict,
    programming: &Programming,
    workloads: &[String],
    now: &str,
) -> (AuthorizationPolicyStatus, Vec<Transition>) {
    let programming = match programming {
        Programming::Done { proxies, .. } => Programming::Done {
            config_maps: workloads.len(),
            proxies: *proxies,
        },
        other => other.clone(),
    };
    let previous = previous.map(|p| p.conditions.as_slice());
    let (conditions, transitions) =
        next_conditions(previous, generation, verdict, &programming, now);
    let status = AuthorizationPolicyStatus {
        observed_generation: generation,
        conditions,
        workloads: if verdict.is_accepted() {
            crate::authz::status_workloads(workloads)
        } else {
            Vec::new()
        },
        proxies: verdict
            .is_accepted()
            .then(|| programming.proxies())
            .flatten(),
    };
    (status, transitions)
}

/// The `Accepted` and `Programmed` conditions every kind's status carries.
fn next_conditions(
    previous: Option<&[Condition]>,
    generation: Option<i64>,
    verdict: &Verdict,
    programming: &Programming,
    now: &str,
) -> (Vec<Condition>, Vec<Transition>) {
    let accepted = match verdict {
        Verdict::Accepted => (
            ConditionStatus::True,
            reason::ACCEPTED,
            "the policy is valid and applies".to_owned(),
        ),
        Verdict::Rejected { reason, message } => (ConditionStatus::False, *reason, message.clone()),
    };
    let programmed = match (verdict, programming) {
        (Verdict::Rejected { .. }, _) => (
            ConditionStatus::False,
            reason::PENDING,
            "not programmed because the policy is not accepted".to_owned(),
        ),
        (
            Verdict::Accepted,
            Programming::Done {
                config_maps,
                proxies,
            },
        ) => (
            ConditionStatus::True,
            reason::PROGRAMMED,
            match proxies {
                Some((current, total)) => format!(
                    "carried by {config_maps} proxy ConfigMap(s); {current}/{total} proxies \
                     run it"
                ),
                None => format!("carried by {config_maps} proxy ConfigMap(s)"),
            },
        ),
        (Verdict::Accepted, Programming::Pending(message)) => {
            (ConditionStatus::False, reason::PENDING, message.clone())
        }
        (Verdict::Accepted, Programming::TooLarge(message)) => {
            (ConditionStatus::False, reason::TOO_LARGE, message.clone())
        }
    };
    let mut transitions = Vec::new();
    let conditions = [
        (condition::ACCEPTED, accepted),
        (condition::PROGRAMMED, programmed),
    ]
    .into_iter()
    .map(|(type_, (status, reason, message))| {
        let old = previous.and_then(|p| p.iter().find(|c| c.type_ == type_));
        let changed = old.is_none_or(|c| c.status != status || c.reason != reason);
        if changed {
            transitions.push(Transition {
                type_,
                holds: status == ConditionStatus::True,
                reason: reason.to_owned(),
                message: message.clone(),
            });
        }
        let last_transition_time = match old {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now.to_owned(),
        };
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time,
            observed_generation: generation,
        }
    })
    .collect();
    (conditions, transitions)
}
