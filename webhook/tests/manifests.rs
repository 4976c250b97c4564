//! The manifests in `manifests/webhook/` agree with the code and with each other, and the
//! MutatingWebhookConfiguration's selectors send exactly the right pods to the webhook.
//!
//! The selectors are evaluated here with the apiserver's label-selector rules (matchLabels and
//! the In, NotIn, Exists, DoesNotExist operators, all ANDed), so the injection truth table is
//! checked without a cluster; the local-cluster tests check it again with a real apiserver.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use tandem_crds::names;

fn manifest(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/webhook")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of `kind` in `file`.
fn documents<T: DeserializeOwned>(file: &str, kind: &str) -> Vec<T> {
    let text = manifest(file);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap())
        .filter(|value| value["kind"].as_str() == Some(kind))
        .map(|value| serde_yaml::from_value(value).unwrap())
        .collect()
}

fn one<T: DeserializeOwned>(file: &str, kind: &str) -> T {
    let mut all = documents(file, kind);
    assert_eq!(all.len(), 1, "{file} should hold one {kind}");
    all.remove(0)
}

fn webhooks() -> Vec<MutatingWebhook> {
    let config: MutatingWebhookConfiguration = one(
        "mutatingwebhookconfiguration.yaml",
        "MutatingWebhookConfiguration",
    );
    assert_eq!(config.metadata.name.as_deref(), Some("tandem-webhook"));
    config.webhooks.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Label selectors, as the apiserver evaluates them

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    // An absent selector matches everything.
    let Some(selector) = selector else {
        return true;
    };
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector
        .match_expressions
        .iter()
        .flatten()
        .all(|expression| {
            let value = labels.get(&expression.key);
            let values = expression.values.as_deref().unwrap_or_default();
            match expression.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("unknown operator {other}"),
            }
        });
    by_label && by_expression
}

/// The webhook entries the apiserver would call for a pod with `pod` labels created in the
/// namespace `namespace` that carries `namespace_labels` (plus the name label the apiserver
/// sets on every namespace).
fn called(namespace: &str, namespace_labels: &[(&str, &str)], pod: &[(&str, &str)]) -> Vec<String> {
    let mut namespace_labels = labels(namespace_labels);
    namespace_labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
    let pod = labels(pod);
    webhooks()
        .into_iter()
        .filter(|w| selects(w.namespace_selector.as_ref(), &namespace_labels))
        .filter(|w| selects(w.object_selector.as_ref(), &pod))
        .map(|w| w.name)
        .collect()
}

const ENABLED: (&str, &str) = (names::INJECT_LABEL, names::INJECT_ENABLED);
const DISABLED: (&str, &str) = (names::INJECT_LABEL, names::INJECT_DISABLED);

#[test]
fn every_pod_in_a_labelled_namespace_is_sent_once() {
    assert_eq!(
        called("shop", &[ENABLED], &[("app", "cart")]),
        ["namespace.inject.tandem.dev"]
    );
    assert_eq!(
        called("shop", &[ENABLED], &[ENABLED]),
        ["namespace.inject.tandem.dev"]
    );
}

#[test]
fn a_labelled_pod_in_another_namespace_is_sent_once() {
    assert_eq!(
        called("jobs", &[], &[ENABLED]),
        ["object.inject.tandem.dev"]
    );
    let other_value = (names::INJECT_LABEL, "something-else");
    assert_eq!(
        called("jobs", &[other_value], &[ENABLED]),
        ["object.inject.tandem.dev"]
    );
}

#[test]
fn unlabelled_pods_in_unlabelled_namespaces_are_never_sent() {
    assert!(called("jobs", &[], &[("app", "worker")]).is_empty());
    assert!(called("jobs", &[], &[DISABLED]).is_empty());
}

#[test]
fn pods_labelled_disabled_never_wait_on_the_webhook() {
    assert!(called("shop", &[ENABLED], &[DISABLED]).is_empty());
}

#[test]
fn system_namespaces_are_never_sent_even_when_labelled() {
    for namespace in names::NEVER_INJECTED_NAMESPACES {
        assert!(
            called(namespace, &[ENABLED], &[ENABLED]).is_empty(),
            "{namespace}"
        );
        assert!(called(namespace, &[], &[ENABLED]).is_empty(), "{namespace}");
    }
}

// ---------------------------------------------------------------------------------------------
// The registration

#[test]
fn both_webhooks_fail_closed_and_speak_admission_v1_to_the_service() {
    let service: Service = one("service.yaml", "Service");
    let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    for webhook in webhooks() {
        let name = &webhook.name;
        assert_eq!(webhook.admission_review_versions, ["v1"], "{name}");
        assert_eq!(webhook.side_effects, "None", "{name}");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"), "{name}");
        assert!(
            webhook
                .timeout_seconds
                .is_some_and(|t| (1..=30).contains(&t)),
            "{name}"
        );
        let target = webhook.client_config.service.as_ref().unwrap();
        assert_eq!(Some(&target.name), service.metadata.name.as_ref(), "{name}");
        assert_eq!(
            Some(&target.namespace),
            service.metadata.namespace.as_ref(),
            "{name}"
        );
        assert_eq!(target.path.as_deref(), Some("/mutate"), "{name}");
        assert_eq!(target.port, Some(port.port), "{name}");
        let rules = webhook.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(
            rules[0].operations.as_deref(),
            Some(&["CREATE".to_owned()][..]),
            "{name}"
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_owned()][..]),
            "{name}"
        );
    }
}

#[test]
fn the_deployment_runs_two_replicas_behind_the_service_with_a_budget() {
    let deployment: Deployment = one("deployment.yaml", "Deployment");
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();

    let service: Service = one("service.yaml", "Service");
    let service_spec = service.spec.as_ref().unwrap();
    let selector = service_spec.selector.as_ref().unwrap();
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service selects the pods"
    );

    let budget: PodDisruptionBudget = one("pdb.yaml", "PodDisruptionBudget");
    let budget_spec = budget.spec.as_ref().unwrap();
    assert!(
        selects(budget_spec.selector.as_ref(), &pod_labels),
        "the budget covers the pods"
    );
    assert_eq!(budget_spec.min_available, Some(IntOrString::Int(1)));

    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let target = service_spec.ports.as_ref().unwrap()[0]
        .target_port
        .clone()
        .unwrap();
    let port_names: Vec<_> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    assert_eq!(target, IntOrString::String("https".into()));
    assert!(port_names.contains(&"https".to_owned()));
    let probe = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (probe.path.as_deref(), probe.scheme.as_deref()),
        (Some("/healthz"), Some("HTTPS"))
    );

    // --self-signed writes the Secret the pods mount, named as the flag's default.
    assert!(
        container
            .args
            .iter()
            .flatten()
            .any(|a| a == "--self-signed")
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.is_some())
        .unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("tandem-webhook-tls")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("tandem-webhook"));
    assert_eq!(
        deployment.metadata.namespace.as_deref(),
        Some(names::SYSTEM_NAMESPACE)
    );
}

#[test]
fn rbac_grants_only_the_secret_and_the_webhook_configuration() {
    let role: Role = one("rbac.yaml", "Role");
    for rule in role.rules.unwrap() {
        assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_owned()][..]));
        let verbs = rule.verbs;
        if verbs != ["create"] {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["tandem-webhook-tls".to_owned()][..])
            );
            assert!(
                verbs.iter().all(|v| v == "get" || v == "update"),
                "{verbs:?}"
            );
        }
    }
    let cluster_role: ClusterRole = one("rbac.yaml", "ClusterRole");
    let rules = cluster_role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["mutatingwebhookconfigurations".to_owned()][..])
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["tandem-webhook".to_owned()][..])
    );
}
