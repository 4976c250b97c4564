//! AdmissionReview `admission.k8s.io/v1` in, AdmissionReview out: the protocol around
//! [`inject`]. Pure (no I/O), so tests call it directly with the documents the apiserver sends.

use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::inject::{Decision, InjectConfig, SkipReason, inject};

/// What happened to one review, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod is injected.
    Injected,
    /// The pod is allowed unchanged, for this reason.
    Skipped(SkipReason),
    /// The pod is refused; the message says why.
    Denied(String),
    /// Not a pod creation (another kind or operation): allowed unchanged.
    Ignored,
    /// The document is not an AdmissionReview this webhook can read.
    Invalid(String),
}

impl Outcome {
    /// The `result` label in metrics.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped(_) => "skipped",
            Self::Denied(_) => "denied",
            Self::Ignored => "ignored",
            Self::Invalid(_) => "invalid",
        }
    }

    /// The `reason` label in metrics: the skip reason, or empty.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Skipped(reason) => reason.as_str(),
            _ => "",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Skipped(reason) => write!(f, "skipped ({reason})"),
            Self::Denied(message) | Self::Invalid(message) => {
                write!(f, "{} ({message})", self.result())
            }
            _ => f.write_str(self.result()),
        }
    }
}

/// The answer to one review.
#[derive(Debug, Clone)]
pub struct Reviewed {
    /// The AdmissionReview to send back.
    pub review: AdmissionReview<DynamicObject>,
    /// What was decided.
    pub outcome: Outcome,
    /// The pod as named in logs: `namespace/name`, or `namespace/generateName*`.
    pub pod: String,
    /// Whether the request was a dry run (answered the same; logged as such).
    pub dry_run: bool,
}

impl Reviewed {
    /// Whether the HTTP status should say the request itself was malformed.
    pub fn is_invalid(&self) -> bool {
        matches!(self.outcome, Outcome::Invalid(_))
    }
}

/// Answers the AdmissionReview in `body`. Never fails: an unreadable document gets an
/// AdmissionReview that refuses it ([`Outcome::Invalid`]).
pub fn review(body: &[u8], config: &InjectConfig) -> Reviewed {
    let invalid = |message: String| Reviewed {
        review: AdmissionResponse::invalid(&message).into_review(),
        outcome: Outcome::Invalid(message),
        pod: String::new(),
        dry_run: false,
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => return invalid(format!("not an AdmissionReview: {error}")),
    };
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return invalid(format!(
            "expected an admission.k8s.io/v1 AdmissionReview, got {} {}",
            review.types.api_version, review.types.kind
        ));
    }
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return invalid("the AdmissionReview has no request".to_owned()),
    };
    answer(&request, config)
}

/// Answers a well-formed request.
fn answer(request: &AdmissionRequest<DynamicObject>, config: &InjectConfig) -> Reviewed {
    let respond = |response: AdmissionResponse, outcome: Outcome, pod: String| Reviewed {
        review: response.into_review(),
        outcome,
        pod,
        dry_run: request.dry_run,
    };
    let allowed = AdmissionResponse::from(request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
        return respond(allowed, Outcome::Ignored, request.name.clone());
    }

    let pod = match request.object.as_ref().map(pod_from) {
        Some(Ok(pod)) => pod,
        Some(Err(message)) => {
            return respond(
                allowed.deny(&message),
                Outcome::Denied(message),
                request.name.clone(),
            );
        }
        None => {
            let message = "the request carries no object".to_owned();
            return respond(
                allowed.deny(&message),
                Outcome::Denied(message),
                request.name.clone(),
            );
        }
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let name = pod_name(&pod, &namespace);
    if namespace.is_empty() {
        let message = "the request names no namespace".to_owned();
        return respond(allowed.deny(&message), Outcome::Denied(message), name);
    }

    match inject(&pod, &namespace, config) {
        Ok(Decision::Skip(reason)) => respond(allowed, Outcome::Skipped(reason), name),
        Ok(Decision::Inject(patch)) => match allowed.clone().with_patch(patch) {
            Ok(response) => respond(response, Outcome::Injected, name),
            Err(error) => {
                let message = format!("could not serialize the patch: {error}");
                respond(allowed.deny(&message), Outcome::Denied(message), name)
            }
        },
        Err(error) => {
            let message = format!("tandem cannot inject this pod: {error}");
            respond(allowed.deny(&message), Outcome::Denied(message), name)
        }
    }
}

/// Reads the request's object as a Pod.
fn pod_from(object: &DynamicObject) -> Result<Pod, String> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value::<Pod>)
        .map_err(|error| format!("the object is not a valid Pod: {error}"))
}

/// `namespace/name`, or `namespace/generateName*` for a controller's pod that has no name yet.
fn pod_name(pod: &Pod, namespace: &str) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => format!("{namespace}/{name}"),
        (_, Some(prefix)) => format!("{namespace}/{prefix}*"),
        _ => format!("{namespace}/<unnamed>"),
    }
}
