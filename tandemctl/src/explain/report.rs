//! The pure core of `explain`: from what was read to the report, with the decision of
//! [`super::decision`] when a caller was given.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, Service};
use serde::{Deserialize, Serialize};
use tandem_crds::contract::{self, AuthorizationAction, MtlsMode, ProxyConfig};
use tandem_crds::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use tandem_crds::v1alpha1::{
    AuthorizationPolicy, AuthorizationTargetKind, Condition, ConditionStatus, condition,
};
use tandem_crds::{names, pods};

pub use super::decision::{CallerFacts, DecidedByFacts, DecisionFacts, RequestFacts};
use super::decision::{Target, decide};
use super::gather::{ConfigState, Inputs, NamespaceDefault};
use super::question::Question;
use super::summary;
use crate::Result;

/// The `apiVersion` of the JSON report; fields are only ever added under it.
pub const API_VERSION: &str = "tandemctl.tandem.dev/explain/v1";

/// The proxy's environment variable listing the pod's HTTP probes, as the webhook writes it
/// (`webhook/src/probes.rs`): `[{"port":8080,"path":"/healthz"}]`.
pub const PROBES_ENV: &str = "TANDEM_APP_PROBES";

/// Everything `explain` says about a pod.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// Always [`API_VERSION`].
    pub api_version: &'static str,
    /// The workload.
    pub pod: PodFacts,
    /// Its proxy config.
    pub config: ConfigFacts,
    /// What decides when no Allow policy covers a port, and where that came from.
    pub default_policy: DefaultFacts,
    /// The kubelet's HTTP probes, which the proxy always lets through.
    pub probes: Vec<ProbeFacts>,
    /// The policies the config carries, in its order (evaluation order within an action).
    pub policies: Vec<AppliedPolicy>,
    /// AuthorizationPolicies that target this pod but are not in its config, and why.
    pub not_applied: Vec<UnappliedPolicy>,
    /// The decision for `--from`, if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionFacts>,
    /// What looked wrong while explaining (a stale status, an unreadable probe list, …).
    pub warnings: Vec<String>,
}

/// The pod.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The ServiceAccount it runs as.
    pub service_account: String,
    /// Its SPIFFE ID in the config's trust domain.
    pub identity: String,
    /// Whether it has the `tandem-proxy` sidecar.
    pub injected: bool,
    /// Its `tandem.dev/proxy-version` annotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_version: Option<String>,
    /// The Services of its namespace whose selector picks it, sorted.
    pub services: Vec<String>,
}

/// The proxy config, as the pod's ConfigMap holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigFacts {
    /// The ConfigMap (`tandem-proxy-<serviceaccount>`).
    pub config_map: String,
    /// Whether it is there and valid.
    pub state: ConfigStateName,
    /// Why it is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The operator's version stamp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `permissive` or `strict`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// The mesh's trust domain, as the config's endpoint identities show it.
    pub trust_domain: String,
    /// Where the trust domain came from.
    pub trust_domain_from: TrustDomainSource,
}

/// The state of the pod's proxy config (`loaded`, `missing`, `invalid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigStateName {
    /// The ConfigMap holds a valid config.
    Loaded,
    /// There is no ConfigMap.
    Missing,
    /// The ConfigMap holds a config the proxy refuses.
    Invalid,
}

/// Where the trust domain came from (`endpoint-identities`, `default`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustDomainSource {
    /// The SPIFFE IDs of the endpoints in the config.
    EndpointIdentities,
    /// No endpoint identity in the config: the mesh's default, `cluster.local`.
    Default,
}

/// Where the default policy came from (`namespace-annotation`, `mesh-default`, `unknown`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultSource {
    /// The Namespace annotation `tandem.dev/default-policy`.
    NamespaceAnnotation,
    /// The operator's `--default-policy`.
    MeshDefault,
    /// The Namespace could not be read.
    Unknown,
}

/// The default policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultFacts {
    /// The policy the config carries; absent when there is no valid config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<contract::DefaultPolicy>,
    /// Where it came from.
    pub source: DefaultSource,
    /// The source in words.
    pub detail: String,
}

/// One kubelet probe.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProbeFacts {
    /// The container port.
    pub port: u16,
    /// The path.
    pub path: String,
}

/// A policy in the config.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPolicy {
    /// `<namespace>/<name>`.
    pub name: String,
    /// `Allow` or `Deny`.
    pub action: AuthorizationAction,
    /// The workload ports it covers; empty: all.
    pub ports: Vec<u16>,
    /// Its rules, each in one line.
    pub rules: Vec<RuleFacts>,
    /// The object's status; absent when the object no longer exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusFacts>,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFacts {
    /// Its index in the policy (what the proxy's logs and metrics name).
    pub index: usize,
    /// [`summary::rule`].
    pub summary: String,
}

/// An AuthorizationPolicy's status, the part that explains it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusFacts {
    /// The `Accepted` condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<ConditionFacts>,
    /// The `Programmed` condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programmed: Option<ConditionFacts>,
    /// `status.workloads`.
    pub workloads: Vec<String>,
}

/// One condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionFacts {
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
}

/// A policy that targets the pod but is not in its config.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnappliedPolicy {
    /// `<namespace>/<name>`.
    pub name: String,
    /// `ServiceAccount/<name>` or `Service/<name>`.
    pub target: String,
    /// `Allow` or `Deny`.
    pub action: tandem_crds::v1alpha1::AuthorizationAction,
    /// Its status.
    pub status: StatusFacts,
    /// Why it does not apply, in one sentence.
    pub why: String,
}

/// The report as the JSON document `-o json` prints (pretty, newline-terminated).
pub fn to_json(explanation: &Explanation) -> String {
    // Plain structs with string keys: serializing cannot fail.
    let mut text = serde_json::to_string_pretty(explanation).unwrap_or_default();
    text.push('\n');
    text
}

/// Builds the report; `question` adds the decision.
pub fn explain(inputs: &Inputs, question: Option<&Question>) -> Result<Explanation> {
    let mut warnings = Vec::new();
    let pod = &inputs.pod;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pods::service_account(pod).to_owned();
    let config = match &inputs.config {
        ConfigState::Loaded { config, .. } => Some(config.as_ref()),
        _ => None,
    };
    let (trust_domain, trust_domain_from) = trust_domain(config);
    let services = selecting_services(pod, &inputs.services);
    let probes = probes(pod, &mut warnings);
    let workload = format!("{namespace}/{sa}");
    let pod_facts = PodFacts {
        identity: SpiffeId::new(&trust_domain, &namespace, &sa).uri(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: namespace.clone(),
        service_account: sa.clone(),
        injected: pods::is_injected(pod),
        proxy_version: annotation(pod, names::PROXY_VERSION_ANNOTATION),
        services: services.iter().cloned().collect(),
    };
    let policies = config.map_or_else(Vec::new, |c| applied(c, inputs, &namespace));
    let in_config: BTreeSet<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    let mut not_applied: Vec<UnappliedPolicy> = inputs
        .policies
        .iter()
        .filter(|p| targets(p, &sa, &services))
        .map(|p| (qualified(p, &namespace), p))
        .filter(|(name, _)| !in_config.contains(name.as_str()))
        .map(|(name, p)| unapplied(name, p, &workload))
        .collect();
    not_applied.sort_by(|a, b| a.name.cmp(&b.name));
    // Only the policies this pod's story involves: in its config, or targeting it.
    let involved = inputs.policies.iter().filter(|p| {
        in_config.contains(qualified(p, &namespace).as_str()) || targets(p, &sa, &services)
    });
    for policy in involved {
        stale_status_warning(policy, &namespace, &mut warnings);
    }
    let decision = match question {
        Some(q) => Some(decide(
            q,
            &Target {
                pod: &pod_facts,
                default_port: first_container_port(pod),
                config: &inputs.config,
                trust_domain: &trust_domain,
                trust_domain_known: trust_domain_from == TrustDomainSource::EndpointIdentities,
                probes: &probes,
            },
        )?),
        None => None,
    };
    Ok(Explanation {
        api_version: API_VERSION,
        config: config_facts(&inputs.config, trust_domain, trust_domain_from),
        default_policy: default_facts(config, &inputs.namespace_default),
        pod: pod_facts,
        probes,
        policies,
        not_applied,
        decision,
        warnings,
    })
}

// ---------------------------------------------------------------------------------------------
// The pod

fn annotation(pod: &Pod, key: &str) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get(key).cloned()
}

/// The Services that select the pod.
fn selecting_services(pod: &Pod, services: &[Service]) -> BTreeSet<String> {
    services
        .iter()
        .filter(|svc| pods::selects(svc, pod))
        .filter_map(|svc| svc.metadata.name.clone())
        .collect()
}

/// The probes the webhook told the proxy about.
fn probes(pod: &Pod, warnings: &mut Vec<String>) -> Vec<ProbeFacts> {
    let Some(value) = pods::proxy_container(pod)
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == PROBES_ENV))
        .and_then(|e| e.value.as_deref())
    else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<ProbeFacts>>(value) {
        Ok(mut probes) => {
            probes.sort();
            probes
        }
        Err(error) => {
            warnings.push(format!(
                "the proxy's {PROBES_ENV} is not a probe list ({error}): the probes cannot be shown"
            ));
            Vec::new()
        }
    }
}

/// The pod's first container port (the default `--port`).
fn first_container_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| u16::try_from(p.container_port).ok())
}

// ---------------------------------------------------------------------------------------------
// The config

/// The trust domain of the first endpoint identity in the config, else the mesh default.
fn trust_domain(config: Option<&ProxyConfig>) -> (String, TrustDomainSource) {
    let from_endpoints = config
        .into_iter()
        .flat_map(|c| &c.services)
        .find_map(|svc| {
            svc.ports
                .iter()
                .flat_map(|p| &p.endpoints)
                .filter_map(|e| e.identity.as_deref())
                .find_map(|id| SpiffeId::parse(id).ok())
        });
    match from_endpoints {
        Some(id) => (id.trust_domain, TrustDomainSource::EndpointIdentities),
        None => (DEFAULT_TRUST_DOMAIN.to_owned(), TrustDomainSource::Default),
    }
}

fn config_facts(
    state: &ConfigState,
    trust_domain: String,
    trust_domain_from: TrustDomainSource,
) -> ConfigFacts {
    let (state_name, error, config) = match state {
        ConfigState::Loaded { config, .. } => (ConfigStateName::Loaded, None, Some(config)),
        ConfigState::Missing { .. } => (ConfigStateName::Missing, None, None),
        ConfigState::Invalid { error, .. } => (ConfigStateName::Invalid, Some(error.clone()), None),
    };
    ConfigFacts {
        config_map: state.name().to_owned(),
        state: state_name,
        error,
        version: config.map(|c| c.version.clone()),
        mtls: config.map(|c| c.workload.mtls),
        trust_domain,
        trust_domain_from,
    }
}

fn default_facts(config: Option<&ProxyConfig>, annotation: &NamespaceDefault) -> DefaultFacts {
    let policy = config.map(|c| c.authorization.default_policy);
    let key = names::DEFAULT_POLICY_ANNOTATION;
    let (source, detail) = match annotation {
        NamespaceDefault::Set(value) => match contract::DefaultPolicy::parse(value) {
            Some(wanted) if policy.is_none_or(|p| p == wanted) => (
                DefaultSource::NamespaceAnnotation,
                format!("Namespace annotation {key}"),
            ),
            Some(wanted) => (
                DefaultSource::NamespaceAnnotation,
                format!(
                    "Namespace annotation {key} says {wanted}, but the config still carries \
                     {}: the operator has not rendered the change yet",
                    policy.map_or("nothing", |p| p.as_str())
                ),
            ),
            None => (
                DefaultSource::MeshDefault,
                format!(
                    "the mesh default: the Namespace annotation {key}={value:?} is not one of {}",
                    contract::DefaultPolicy::ALL.map(|p| p.as_str()).join(", ")
                ),
            ),
        },
        NamespaceDefault::Absent => (
            DefaultSource::MeshDefault,
            format!(
                "the mesh default (the operator's --default-policy); no Namespace annotation {key}"
            ),
        ),
        NamespaceDefault::Unreadable(why) => {
            (DefaultSource::Unknown, format!("cannot tell: {why}"))
        }
    };
    DefaultFacts {
        policy,
        source,
        detail,
    }
}

// ---------------------------------------------------------------------------------------------
// Policies

fn qualified(policy: &AuthorizationPolicy, namespace: &str) -> String {
    let ns = policy.metadata.namespace.as_deref().unwrap_or(namespace);
    format!(
        "{ns}/{}",
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether a policy targets the pod: its ServiceAccount, or a Service that selects it.
fn targets(policy: &AuthorizationPolicy, sa: &str, services: &BTreeSet<String>) -> bool {
    let target = &policy.spec.target_ref;
    match target.kind {
        AuthorizationTargetKind::ServiceAccount => target.name == sa,
        AuthorizationTargetKind::Service => services.contains(&target.name),
    }
}

fn applied(config: &ProxyConfig, inputs: &Inputs, namespace: &str) -> Vec<AppliedPolicy> {
    config
        .authorization
        .policies
        .iter()
        .map(|p| AppliedPolicy {
            name: p.name.clone(),
            action: p.action,
            ports: p.ports.clone(),
            rules: p
                .rules
                .iter()
                .enumerate()
                .map(|(index, r)| RuleFacts {
                    index,
                    summary: summary::rule(r),
                })
                .collect(),
            status: inputs
                .policies
                .iter()
                .find(|o| qualified(o, namespace) == p.name)
                .map(status_facts),
        })
        .collect()
}

fn status_facts(policy: &AuthorizationPolicy) -> StatusFacts {
    let status = policy.status.clone().unwrap_or_default();
    let find = |type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(condition_facts)
    };
    StatusFacts {
        accepted: find(condition::ACCEPTED),
        programmed: find(condition::PROGRAMMED),
        workloads: status.workloads.clone(),
    }
}

fn condition_facts(c: &Condition) -> ConditionFacts {
    ConditionFacts {
        status: match c.status {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        },
        reason: c.reason.clone(),
        message: c.message.clone(),
    }
}

fn unapplied(name: String, policy: &AuthorizationPolicy, workload: &str) -> UnappliedPolicy {
    let status = status_facts(policy);
    let why = why_not_applied(&status, workload);
    let target = &policy.spec.target_ref;
    UnappliedPolicy {
        name,
        target: format!("{}/{}", target.kind.as_str(), target.name),
        action: policy.spec.action,
        status,
        why,
    }
}

/// The first link of the chain policy → status → ConfigMap that is broken.
fn why_not_applied(status: &StatusFacts, workload: &str) -> String {
    let refused =
        |kind: &str, c: &ConditionFacts| format!("{kind}={} {}: {}", c.status, c.reason, c.message);
    match (&status.accepted, &status.programmed) {
        (None, _) => "the operator has not reported on it yet (no Accepted condition)".to_owned(),
        (Some(a), _) if a.status != "True" => refused("Accepted", a),
        (_, Some(p)) if p.status != "True" => refused("Programmed", p),
        _ if !status.workloads.iter().any(|w| w == workload) => format!(
            "accepted, but its status.workloads does not list {workload}: the operator does not \
             count this pod among its targets yet"
        ),
        _ => "accepted and programmed, but the ConfigMap does not carry it yet: the operator's \
              write has not landed"
            .to_owned(),
    }
}

fn stale_status_warning(policy: &AuthorizationPolicy, namespace: &str, warnings: &mut Vec<String>) {
    let generation = policy.metadata.generation;
    let observed = policy.status.as_ref().and_then(|s| s.observed_generation);
    if let (Some(generation), Some(observed)) = (generation, observed)
        && observed < generation
    {
        warnings.push(format!(
            "{}: its status describes generation {observed}, the object is at {generation} \
             (the operator has not processed the latest change)",
            qualified(policy, namespace)
        ));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tandem_crds::contract::{
        AuthorizationPolicy as Rendered, AuthorizationRule, Callers, DefaultPolicy, Endpoint,
        Operations, PathMatch, Protocol, ServicePort, Workload,
    };

    use super::*;
    use crate::explain::question::{CallerArg, HttpQuestion};

    fn pod(injected: bool) -> Pod {
        let mut pod = json!({
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {"tandem.dev/proxy-version": "0.1.0"}},
            "spec": {"serviceAccountName": "web",
                     "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]}
        });
        if injected {
            pod["spec"]["initContainers"] = json!([
                {"name": "tandem-init", "image": "tandem-proxy"},
                {"name": "tandem-proxy", "image": "tandem-proxy", "restartPolicy": "Always",
                 "env": [{"name": PROBES_ENV, "value": r#"[{"port":8080,"path":"/ready"}]"#}]}
            ]);
        }
        serde_json::from_value(pod).unwrap()
    }

    fn service(name: &str, selector: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"},
                                      "spec": {"selector": selector}}))
        .unwrap()
    }

    fn object(
        name: &str,
        kind: &str,
        target: &str,
        accepted: Option<(&str, &str)>,
    ) -> AuthorizationPolicy {
        let mut p = json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop", "generation": 1},
            "spec": {"targetRef": {"kind": kind, "name": target}, "action": "Allow",
                     "rules": [{"from": {"authenticated": true}}]}
        });
        if let Some((status, reason)) = accepted {
            p["status"] = json!({"observedGeneration": 1, "workloads": ["shop/web"], "conditions": [
                {"type": "Accepted", "status": status, "reason": reason, "message": format!("{reason} message"),
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Programmed", "status": status, "reason": if status == "True" {"Programmed"} else {reason},
                 "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        }
        serde_json::from_value(p).unwrap()
    }

    fn allow_web() -> Rendered {
        Rendered {
            name: "shop/allow-web".into(),
            action: AuthorizationAction::Allow,
            ports: vec![8080],
            rules: vec![
                AuthorizationRule {
                    from: Some(Callers {
                        principals: vec!["spiffe://corp.example/ns/shop/sa/admin".into()],
                        ..Callers::default()
                    }),
                    to: None,
                },
                AuthorizationRule {
                    from: Some(Callers {
                        principals: vec!["spiffe://corp.example/ns/shop/sa/frontend".into()],
                        ..Callers::default()
                    }),
                    to: Some(Operations {
                        methods: vec!["GET".into()],
                        paths: vec![PathMatch::Prefix("/api".into())],
                        ..Operations::default()
                    }),
                },
            ],
        }
    }

    fn deny_batch() -> Rendered {
        Rendered {
            name: "shop/deny-batch".into(),
            action: AuthorizationAction::Deny,
            ports: vec![],
            rules: vec![AuthorizationRule {
                from: Some(Callers {
                    namespaces: vec!["batch".into()],
                    ..Callers::default()
                }),
                to: None,
            }],
        }
    }

    fn config(default_policy: DefaultPolicy, policies: Vec<Rendered>) -> ProxyConfig {
        let mut c = ProxyConfig::new(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            mtls: MtlsMode::Permissive,
        });
        c.version = "v7".into();
        c.authorization.default_policy = default_policy;
        c.authorization.policies = policies;
        c.services = vec![contract::Service {
            name: "db".into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "pg".into(),
                port: 5432,
                protocol: Protocol::Tcp,
                endpoints: vec![Endpoint {
                    address: "10.244.0.9:5432".parse().unwrap(),
                    meshed: true,
                    identity: Some("spiffe://corp.example/ns/shop/sa/db".into()),
                    workload: None,
                }],
            }],
            ..contract::Service::default()
        }];
        c.validate().unwrap();
        c
    }

    fn inputs(config: ProxyConfig) -> Inputs {
        Inputs {
            pod: pod(true),
            namespace_default: NamespaceDefault::Set("deny".into()),
            config: ConfigState::Loaded {
                name: "tandem-proxy-web".into(),
                config: Box::new(config),
            },
            services: vec![
                service("web", json!({"app": "web"})),
                service("other", json!({"app": "other"})),
            ],
            policies: vec![
                object("allow-web", "Service", "web", Some(("True", "Accepted"))),
                object(
                    "broken",
                    "ServiceAccount",
                    "web",
                    Some(("False", "Invalid")),
                ),
                object(
                    "elsewhere",
                    "ServiceAccount",
                    "batch",
                    Some(("False", "Invalid")),
                ),
                object("new", "Service", "web", None),
            ],
        }
    }

    fn ask(caller: &str, port: Option<u16>, http: Option<(&str, &str)>) -> Question {
        Question {
            caller: CallerArg::parse(caller).unwrap(),
            address: None,
            port,
            http: http.map(|(method, path)| HttpQuestion {
                method: method.into(),
                path: path.into(),
                headers: vec![],
            }),
        }
    }

    fn standard() -> Inputs {
        inputs(config(DefaultPolicy::Deny, vec![allow_web(), deny_batch()]))
    }

    #[test]
    fn the_chain_from_policy_through_status_to_config_is_shown() {
        let e = explain(&standard(), None).unwrap();
        assert_eq!(e.pod.services, ["web"]);
        assert_eq!(e.pod.identity, "spiffe://corp.example/ns/shop/sa/web");
        assert_eq!(
            e.config.trust_domain_from,
            TrustDomainSource::EndpointIdentities
        );
        assert_eq!(e.default_policy.policy, Some(DefaultPolicy::Deny));
        assert_eq!(e.default_policy.source, DefaultSource::NamespaceAnnotation);
        let names: Vec<&str> = e.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["shop/allow-web", "shop/deny-batch"]);
        assert_eq!(
            e.policies[0]
                .status
                .as_ref()
                .unwrap()
                .accepted
                .as_ref()
                .unwrap()
                .status,
            "True"
        );
        assert!(e.policies[1].status.is_none(), "no object named deny-batch");
        assert_eq!(
            e.policies[0].rules[1].summary,
            "from spiffe://corp.example/ns/shop/sa/frontend; to method GET, path /api/*"
        );
        // elsewhere targets another ServiceAccount: not this pod's business.
        let not: Vec<(&str, &str)> = e
            .not_applied
            .iter()
            .map(|p| (p.name.as_str(), p.why.as_str()))
            .collect();
        assert_eq!(
            not,
            [
                ("shop/broken", "Accepted=False Invalid: Invalid message"),
                (
                    "shop/new",
                    "the operator has not reported on it yet (no Accepted condition)"
                ),
            ]
        );
        assert_eq!(
            e.probes,
            [ProbeFacts {
                port: 8080,
                path: "/ready".into()
            }]
        );
        assert!(e.decision.is_none());
        assert!(e.warnings.is_empty(), "{:?}", e.warnings);
    }

    fn decided(inputs: &Inputs, q: Question) -> DecisionFacts {
        explain(inputs, Some(&q)).unwrap().decision.unwrap()
    }

    #[test]
    fn an_allowed_caller_is_named_with_its_policy_and_rule() {
        let d = decided(
            &standard(),
            ask("shop/frontend", None, Some(("GET", "/api/items"))),
        );
        assert!(d.allowed);
        assert_eq!(
            d.decided_by,
            DecidedByFacts::Rule {
                policy: "shop/allow-web".into(),
                action: AuthorizationAction::Allow,
                rule: 1,
                summary:
                    "from spiffe://corp.example/ns/shop/sa/frontend; to method GET, path /api/*"
                        .into(),
            }
        );
        assert_eq!(d.request.port, 8080, "the pod's first container port");
        assert_eq!(d.denied_by_header, None);
    }

    #[test]
    fn an_allowed_tcp_connection_is_relayed() {
        let d = decided(&standard(), ask("shop/admin", Some(8080), None));
        assert!(d.allowed);
        assert!(matches!(
            &d.decided_by,
            DecidedByFacts::Rule { rule: 0, .. }
        ));
        assert_eq!(d.request.protocol, "tcp");
        assert_eq!(d.response, "relays the connection to the app");
    }

    #[test]
    fn a_caller_no_allow_rule_matches_gets_403_naming_the_allow_policies() {
        let d = decided(
            &standard(),
            ask("shop/frontend", Some(8080), Some(("POST", "/api/items"))),
        );
        assert!(!d.allowed);
        assert_eq!(
            d.decided_by,
            DecidedByFacts::NoAllowMatched {
                policies: vec!["shop/allow-web".into()]
            }
        );
        assert_eq!(d.denied_by_header.as_deref(), Some("shop/allow-web"));
        assert!(
            d.response
                .starts_with("answers HTTP 403 with tandem-denied-by: shop/allow-web"),
            "{}",
            d.response
        );
    }

    #[test]
    fn a_deny_rule_beats_an_allow_and_a_tcp_connection_is_closed() {
        let mut c = config(DefaultPolicy::Deny, vec![allow_web(), deny_batch()]);
        c.authorization.policies[0].rules[0].from = Some(Callers {
            authenticated: true,
            ..Callers::default()
        });
        let d = decided(&inputs(c), ask("batch/cron", Some(8080), None));
        assert!(!d.allowed);
        assert!(
            matches!(&d.decided_by, DecidedByFacts::Rule { policy, .. } if policy == "shop/deny-batch")
        );
        assert_eq!(d.request.protocol, "tcp");
        assert_eq!(d.denied_by_header, None);
        assert_eq!(d.response, "closes the connection after accepting it");
    }

    #[test]
    fn where_no_allow_policy_covers_the_port_the_default_decides() {
        let d = decided(
            &standard(),
            ask("unauthenticated", Some(9090), Some(("GET", "/"))),
        );
        assert!(!d.allowed);
        assert_eq!(
            d.decided_by,
            DecidedByFacts::Default {
                policy: DefaultPolicy::Deny
            }
        );
        assert_eq!(d.denied_by_header.as_deref(), Some("default:deny"));
    }

    #[test]
    fn the_kubelets_probes_get_in_under_deny_and_nothing_else_does() {
        let i = inputs(config(DefaultPolicy::Deny, vec![]));
        let probe = decided(
            &i,
            ask("unauthenticated", Some(8080), Some(("GET", "/ready"))),
        );
        assert!(probe.allowed);
        assert_eq!(
            probe.decided_by,
            DecidedByFacts::Probe {
                port: 8080,
                path: "/ready".into()
            }
        );
        let post = decided(
            &i,
            ask("unauthenticated", Some(8080), Some(("POST", "/ready"))),
        );
        assert!(!post.allowed);
        let other = decided(
            &i,
            ask("unauthenticated", Some(8080), Some(("GET", "/admin"))),
        );
        assert!(!other.allowed);
    }

    #[test]
    fn strict_mtls_refuses_plaintext_before_any_policy() {
        let mut c = config(DefaultPolicy::AllUnauthenticated, vec![]);
        c.workload.mtls = MtlsMode::Strict;
        let d = decided(&inputs(c), ask("unauthenticated", None, None));
        assert!(!d.allowed);
        assert_eq!(d.decided_by, DecidedByFacts::StrictMtls);
    }

    #[test]
    fn a_pod_without_a_proxy_lets_everyone_in_and_says_why() {
        let mut i = standard();
        i.pod = pod(false);
        let e = explain(&i, Some(&ask("unauthenticated", None, None))).unwrap();
        assert!(!e.pod.injected);
        let d = e.decision.unwrap();
        assert!(d.allowed);
        assert_eq!(d.decided_by, DecidedByFacts::NotInjected);
    }

    #[test]
    fn without_a_valid_config_there_is_a_report_but_no_decision() {
        let mut i = standard();
        i.config = ConfigState::Missing {
            name: "tandem-proxy-web".into(),
        };
        let e = explain(&i, None).unwrap();
        assert_eq!(e.config.state, ConfigStateName::Missing);
        assert_eq!(e.default_policy.policy, None);
        // Every policy targeting the pod is listed as not applied.
        assert_eq!(e.not_applied.len(), 3);
        let error = explain(&i, Some(&ask("shop/frontend", None, None))).unwrap_err();
        assert_eq!(error.exit_code(), crate::exit::UNDECIDABLE, "{error}");
        i.config = ConfigState::Invalid {
            name: "tandem-proxy-web".into(),
            error: "bad".into(),
        };
        let error = explain(&i, Some(&ask("shop/frontend", None, None))).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("keeps serving the last good one"),
            "{error}"
        );
    }

    #[test]
    fn the_default_policys_source_is_told_apart() {
        let c = config(DefaultPolicy::AllUnauthenticated, vec![]);
        let source = |annotation: NamespaceDefault| {
            let mut i = inputs(c.clone());
            i.namespace_default = annotation;
            let d = explain(&i, None).unwrap().default_policy;
            (d.source, d.detail)
        };
        let (s, d) = source(NamespaceDefault::Absent);
        assert_eq!(s, DefaultSource::MeshDefault);
        assert!(d.contains("--default-policy"), "{d}");
        let (s, d) = source(NamespaceDefault::Set("deny".into()));
        assert_eq!(s, DefaultSource::NamespaceAnnotation);
        assert!(d.contains("has not rendered the change yet"), "{d}");
        let (s, d) = source(NamespaceDefault::Set("closed".into()));
        assert_eq!(s, DefaultSource::MeshDefault);
        assert!(d.contains("\"closed\" is not one of"), "{d}");
        let (s, _) = source(NamespaceDefault::Unreadable("forbidden".into()));
        assert_eq!(s, DefaultSource::Unknown);
    }

    #[test]
    fn a_pod_without_ports_needs_port_for_a_decision() {
        let mut i = standard();
        if let Some(spec) = i.pod.spec.as_mut() {
            spec.containers[0].ports = None;
        }
        let error = explain(&i, Some(&ask("shop/frontend", None, None))).unwrap_err();
        assert_eq!(error.exit_code(), crate::exit::USAGE);
        assert!(explain(&i, Some(&ask("shop/frontend", Some(8080), None))).is_ok());
    }

    #[test]
    fn cluster_authenticated_without_an_address_says_what_it_assumed() {
        let mut c = config(DefaultPolicy::ClusterAuthenticated, vec![]);
        c.authorization.cluster_networks = vec!["10.244.0.0/16".parse().unwrap()];
        let i = inputs(c);
        let unknown = decided(&i, ask("shop/frontend", Some(8080), None));
        assert!(!unknown.allowed);
        assert!(
            unknown.notes[0].contains("--from-ip"),
            "{:?}",
            unknown.notes
        );
        let mut inside = ask("shop/frontend", Some(8080), None);
        inside.address = Some("10.244.1.5".parse().unwrap());
        assert!(decided(&i, inside).allowed);
    }

    #[test]
    fn a_caller_from_another_trust_domain_fails_the_handshake_when_the_mesh_domain_is_known() {
        let foreign = "spiffe://other.example/ns/shop/sa/admin";
        let d = decided(&standard(), ask(foreign, Some(8080), None));
        assert!(!d.allowed);
        assert_eq!(
            d.decided_by,
            DecidedByFacts::ForeignTrustDomain {
                trust_domain: "other.example".into()
            }
        );
        // Without endpoint identities the mesh's domain is only assumed: decide, and say so.
        let mut c = config(DefaultPolicy::AllUnauthenticated, vec![]);
        c.services.clear();
        let d = decided(&inputs(c), ask(foreign, Some(8080), None));
        assert!(d.allowed);
        assert!(
            d.notes[0].contains("cluster.local is assumed"),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn a_stale_status_is_warned_about() {
        let mut i = standard();
        i.policies[0].metadata.generation = Some(2);
        let e = explain(&i, None).unwrap();
        assert_eq!(e.warnings.len(), 1);
        assert!(e.warnings[0].starts_with("shop/allow-web: its status describes generation 1"));
    }
}
