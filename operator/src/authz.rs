//! AuthorizationPolicy: which workloads a policy protects, on which of their ports, what its
//! rules become in their proxy config (`ProxyConfig.authorization`), and whether it makes sense.
//!
//! Pure, like the rest of rendering. Each policy is judged alone — target resolved, rules
//! converted, contradictions looked for, the result validated as the proxy will — so that a bad
//! policy is refused with a reason and the others render regardless. Policies of this kind never
//! conflict: every accepted policy that targets a workload is in its config (deny before allow is
//! the evaluator's business, `tandem_crds::contract::Authorizer`).
//!
//! **Targets.**
//! - `Service`: the injected, running pods its selector picks in the policy's namespace, grouped
//!   by ServiceAccount. The policy covers the target ports of the Service's TCP ports (all of
//!   them, or those `targetRef.ports` names): a numeric `targetPort` as it is, a named one
//!   through each pod's container port of that name, none at all = the port. Never "every port"
//!   of the pods: a Service target protects what its author sees, the Service's ports. A pod on
//!   which none of them resolves is not covered, rather than covered on every port.
//! - `ServiceAccount`: the pods running as it, on every port.
//!
//! **Defaults.** A workload's default policy is its namespace's `tandem.dev/default-policy`
//! annotation, else the mesh's (`--default-policy`); an unknown value is ignored and reported.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, Service as KubeService, ServicePort as KubeServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tandem_crds::contract::{
    self, Authorization, Authorizer, Callers, DefaultPolicy, Operations, Protocol,
};
use tandem_crds::identity::SpiffeId;
use tandem_crds::names::DEFAULT_POLICY_ANNOTATION;
use tandem_crds::v1alpha1::{
    self as api, AuthorizationAction, AuthorizationPolicy, AuthorizationTarget,
    AuthorizationTargetKind, reason,
};

use crate::policy::{PolicyKey, PolicyKind, Verdict};
use crate::render::{
    BadAnnotation, Inputs, WorkloadKey, header_match, is_active, is_injected, is_tcp,
    parsed_annotation, path_match, protocol_of, workloads,
};

/// Most workloads a status lists (the CRD's bound on `status.workloads`).
const MAX_STATUS_WORKLOADS: usize = 1024;

/// What authorization rendering concluded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Authorizations {
    /// The authorization of every workload with injected, running pods.
    pub by_workload: BTreeMap<WorkloadKey, Authorization>,
    /// The default policy of each namespace whose annotation chooses one.
    pub namespace_defaults: BTreeMap<String, DefaultPolicy>,
    /// The mesh's default policy and cluster networks, for workloads without policies.
    pub mesh_default: Authorization,
    /// The workloads (`<namespace>/<serviceAccount>`, sorted) each accepted AuthorizationPolicy
    /// applies to.
    pub workloads_of: BTreeMap<PolicyKey, Vec<String>>,
}

impl Authorizations {
    /// The authorization of one workload: what was rendered for it, else (no injected pod yet)
    /// its namespace's default without policies.
    pub fn for_workload(&self, workload: &WorkloadKey) -> Authorization {
        let mut authorization = match self.by_workload.get(workload) {
            Some(rendered) => rendered.clone(),
            None => Authorization {
                default_policy: self.default_in(&workload.namespace),
                ..self.mesh_default.clone()
            },
        };
        // Only `cluster-authenticated` reads the networks. Leaving them out elsewhere keeps an
        // open authorization out of the JSON (so proxies older than the section still load the
        // config) and the flag from rewriting configs it does not affect.
        if authorization.default_policy != DefaultPolicy::ClusterAuthenticated {
            authorization.cluster_networks.clear();
        }
        authorization
    }

    fn default_in(&self, namespace: &str) -> DefaultPolicy {
        self.namespace_defaults
            .get(namespace)
            .copied()
            .unwrap_or(self.mesh_default.default_policy)
    }
}

/// Judges every AuthorizationPolicy (into `verdicts`) and renders every workload's
/// authorization; ignored annotations go to `bad`.
pub(crate) fn render(
    inputs: &Inputs,
    verdicts: &mut BTreeMap<PolicyKey, Verdict>,
    bad: &mut Vec<BadAnnotation>,
) -> Authorizations {
    let mut ignored = BTreeSet::new();
    let namespace_defaults: BTreeMap<String, DefaultPolicy> = inputs
        .namespaces
        .iter()
        .filter_map(|ns| {
            let policy = parsed_annotation(
                DEFAULT_POLICY_ANNOTATION,
                "Namespace",
                String::new(),
                &ns.metadata,
                DefaultPolicy::parse,
                &mut ignored,
            )?;
            Some((ns.name_any(), policy))
        })
        .collect();
    bad.extend(ignored);

    let context = Context::new(inputs);
    let mut policies_of: BTreeMap<WorkloadKey, Vec<contract::AuthorizationPolicy>> =
        BTreeMap::new();
    let mut workloads_of = BTreeMap::new();
    let mut sorted: Vec<&AuthorizationPolicy> = inputs
        .authorization_policies
        .iter()
        .map(AsRef::as_ref)
        .collect();
    sorted.sort_by_key(|p| (p.namespace(), p.name_any()));
    for policy in sorted {
        let key = PolicyKey::of(PolicyKind::Authorization, policy);
        match judge(&context, policy) {
            Ok(targeted) => {
                let names: Vec<String> = targeted
                    .iter()
                    .map(|(w, _)| format!("{}/{}", w.namespace, w.service_account))
                    .collect();
                for (workload, rendered) in targeted {
                    policies_of.entry(workload).or_default().push(rendered);
                }
                workloads_of.insert(key.clone(), names);
                verdicts.insert(key, Verdict::Accepted);
            }
            Err(rejection) => {
                verdicts.insert(key, rejection);
            }
        }
    }

    let mut rendered = Authorizations {
        by_workload: BTreeMap::new(),
        namespace_defaults,
        mesh_default: Authorization {
            default_policy: inputs.mesh.default_policy,
            cluster_networks: inputs.mesh.cluster_networks.clone(),
            policies: Vec::new(),
        },
        workloads_of,
    };
    rendered.by_workload = context
        .workloads
        .iter()
        .map(|w| {
            let authorization = Authorization {
                default_policy: rendered.default_in(&w.namespace),
                cluster_networks: inputs.mesh.cluster_networks.clone(),
                // Policies were visited sorted by namespace and name, and a policy only
                // targets workloads in its own namespace: each list is sorted by `<ns>/<name>`.
                policies: policies_of.remove(w).unwrap_or_default(),
            };
            (w.clone(), authorization)
        })
        .collect();
    rendered
}

/// Trims a status's workload list to what the CRD allows (a policy on more than 1,024
/// ServiceAccounts still applies to all of them; the status names the first).
pub(crate) fn status_workloads(workloads: &[String]) -> Vec<String> {
    workloads
        .iter()
        .take(MAX_STATUS_WORKLOADS)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Lookups

/// The inputs a policy is judged against.
struct Context<'a> {
    trust_domain: &'a str,
    services: BTreeMap<(&'a str, &'a str), &'a KubeService>,
    service_accounts: BTreeSet<(&'a str, &'a str)>,
    /// Injected, running pods by namespace.
    pods: BTreeMap<&'a str, Vec<&'a Pod>>,
    /// The workloads with injected, running pods.
    workloads: BTreeSet<WorkloadKey>,
}

impl<'a> Context<'a> {
    fn new(inputs: &'a Inputs) -> Self {
        let services = inputs
            .services
            .iter()
            .map(|s| {
                let key = (
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                (key, s.as_ref())
            })
            .collect();
        let service_accounts = inputs
            .service_accounts
            .iter()
            .map(|sa| {
                (
                    sa.metadata.namespace.as_deref().unwrap_or_default(),
                    sa.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        let mut pods: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in inputs
            .pods
            .iter()
            .filter(|p| is_injected(p) && is_active(p))
        {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            pods.entry(namespace).or_default().push(pod);
        }
        Self {
            trust_domain: &inputs.mesh.trust_domain,
            services,
            service_accounts,
            pods,
            workloads: workloads(&inputs.pods),
        }
    }
}

fn rejected(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Rejected {
        reason,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Judging one policy

/// The workloads a policy reaches, each with the policy as its config carries it; or why the
/// policy is refused.
fn judge(
    context: &Context<'_>,
    policy: &AuthorizationPolicy,
) -> Result<Vec<(WorkloadKey, contract::AuthorizationPolicy)>, Verdict> {
    let namespace = policy.namespace().unwrap_or_default();
    let spec = &policy.spec;
    let coverage = match spec.target_ref.kind {
        AuthorizationTargetKind::Service => {
            service_coverage(context, &namespace, &spec.target_ref)?
        }
        AuthorizationTargetKind::ServiceAccount => {
            account_coverage(context, &namespace, &spec.target_ref.name)?
        }
    };
    let mut problems = Vec::new();
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.iter().enumerate() {
        match rule_of(context.trust_domain, &namespace, i, rule) {
            Ok(converted) => {
                problems.extend(contradictions(
                    context.trust_domain,
                    &coverage,
                    i,
                    rule,
                    &converted,
                ));
                rules.push(converted);
            }
            Err(problem) => problems.push(problem),
        }
    }
    let mut rendered = contract::AuthorizationPolicy {
        name: format!("{namespace}/{}", policy.name_any()),
        action: match spec.action {
            AuthorizationAction::Allow => contract::AuthorizationAction::Allow,
            AuthorizationAction::Deny => contract::AuthorizationAction::Deny,
        },
        ports: Vec::new(),
        rules,
    };
    if problems.is_empty() {
        problems.extend(contract_problems(&rendered, &spec.rules));
    }
    if !problems.is_empty() {
        return Err(rejected(reason::INVALID, problems.join("; ")));
    }
    Ok(coverage
        .workloads
        .into_iter()
        .map(|(workload, ports)| {
            rendered.ports = ports.into_iter().collect();
            (workload, rendered.clone())
        })
        .collect())
}

/// What a policy's target covers.
struct Coverage {
    /// Per targeted workload, the ports covered there; empty: every port.
    workloads: BTreeMap<WorkloadKey, BTreeSet<u16>>,
    /// For a Service target, its covered ports; empty for a ServiceAccount target.
    service_ports: Vec<CoveredPort>,
}

/// One covered Service port.
struct CoveredPort {
    port: u16,
    name: String,
    protocol: Protocol,
    /// The target ports it resolves to, on the selected pods (a numeric one even without pods).
    targets: BTreeSet<u16>,
    /// A named target port no selected pod declares: its target ports are unknown.
    unresolved: bool,
}

fn service_coverage(
    context: &Context<'_>,
    namespace: &str,
    target: &AuthorizationTarget,
) -> Result<Coverage, Verdict> {
    let name = target.name.as_str();
    let service = context
        .services
        .get(&(namespace, name))
        .copied()
        .ok_or_else(|| {
            rejected(
                reason::TARGET_NOT_FOUND,
                format!("Service {namespace}/{name} does not exist"),
            )
        })?;
    let spec = service.spec.as_ref();
    let tcp: Vec<&KubeServicePort> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .collect();
    let chosen = chosen_ports(namespace, name, &tcp, &target.ports)?;
    // A Service without a selector selects no pods (its endpoints are managed by hand).
    let selected: Vec<&Pod> = context
        .pods
        .get(namespace)
        .into_iter()
        .flatten()
        .copied()
        .filter(|pod| tandem_crds::pods::selects(service, pod))
        .collect();
    let mut covered: Vec<CoveredPort> = chosen
        .iter()
        .map(|p| CoveredPort {
            port: u16::try_from(p.port).unwrap_or_default(),
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol_of(p),
            targets: BTreeSet::new(),
            unresolved: matches!(p.target_port, Some(IntOrString::String(_))),
        })
        .collect();
    let mut workloads: BTreeMap<WorkloadKey, BTreeSet<u16>> = BTreeMap::new();
    for (service_port, covered) in chosen.iter().zip(covered.iter_mut()) {
        if let Some(number) = numeric_target(service_port) {
            covered.targets.insert(number);
        }
    }
    for pod in selected {
        let key = WorkloadKey {
            namespace: namespace.to_owned(),
            service_account: tandem_crds::pods::service_account(pod).to_owned(),
        };
        let ports = workloads.entry(key).or_default();
        for (service_port, covered) in chosen.iter().zip(covered.iter_mut()) {
            if let Some(target) = target_port(service_port, pod) {
                ports.insert(target);
                covered.targets.insert(target);
                covered.unresolved = false;
            }
        }
    }
    workloads.retain(|_, ports| !ports.is_empty());
    Ok(Coverage {
        workloads,
        service_ports: covered,
    })
}

/// The Service ports a policy covers: those `wanted` names (each must exist), else all.
fn chosen_ports<'a>(
    namespace: &str,
    name: &str,
    tcp: &[&'a KubeServicePort],
    wanted: &[i32],
) -> Result<Vec<&'a KubeServicePort>, Verdict> {
    if tcp.is_empty() {
        return Err(rejected(
            reason::INVALID,
            format!("Service {namespace}/{name} has no TCP port to protect"),
        ));
    }
    if wanted.is_empty() {
        return Ok(tcp.to_vec());
    }
    let mut chosen: Vec<&KubeServicePort> = Vec::new();
    let mut missing = Vec::new();
    for (i, port) in wanted.iter().enumerate() {
        match tcp.iter().find(|p| p.port == *port) {
            Some(found) if !chosen.iter().any(|c| c.port == *port) => chosen.push(found),
            Some(_) => {}
            None => missing.push(format!(
                "targetRef.ports[{i}]: Service {namespace}/{name} has no TCP port {port} (it has {})",
                list(tcp.iter().map(|p| p.port))
            )),
        }
    }
    if missing.is_empty() {
        Ok(chosen)
    } else {
        Err(rejected(reason::INVALID, missing.join("; ")))
    }
}

/// The target port of a Service port when it does not depend on the pod.
fn numeric_target(port: &KubeServicePort) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(_)) => None,
    }
    .filter(|n| *n != 0)
}

/// The port a Service port reaches on `pod`: numeric, or the pod's TCP container port of the
/// target port's name.
fn target_port(port: &KubeServicePort, pod: &Pod) -> Option<u16> {
    let Some(IntOrString::String(name)) = &port.target_port else {
        return numeric_target(port);
    };
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name.as_str()) && is_tcp(p.protocol.as_deref()))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|n| *n != 0)
}

fn account_coverage(
    context: &Context<'_>,
    namespace: &str,
    name: &str,
) -> Result<Coverage, Verdict> {
    if !context.service_accounts.contains(&(namespace, name)) {
        return Err(rejected(
            reason::TARGET_NOT_FOUND,
            format!("ServiceAccount {namespace}/{name} does not exist"),
        ));
    }
    let key = WorkloadKey {
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
    };
    // Accepted without injected pods: it applies as soon as one runs.
    let workloads = if context.workloads.contains(&key) {
        BTreeMap::from([(key, BTreeSet::new())])
    } else {
        BTreeMap::new()
    };
    Ok(Coverage {
        workloads,
        service_ports: Vec::new(),
    })
}

/// A CRD rule in the contract's terms: ServiceAccounts become exact SPIFFE IDs (in the mesh's
/// trust domain, in the policy's namespace unless they name one).
fn rule_of(
    trust_domain: &str,
    namespace: &str,
    index: usize,
    rule: &api::AuthorizationRule,
) -> Result<contract::AuthorizationRule, String> {
    let from = rule.from.as_ref().map(|from| Callers {
        principals: from
            .principals
            .iter()
            .cloned()
            .chain(from.service_accounts.iter().map(|sa| {
                SpiffeId::new(
                    trust_domain,
                    sa.namespace.as_deref().unwrap_or(namespace),
                    &sa.name,
                )
                .uri()
            }))
            .collect(),
        namespaces: from.namespaces.clone(),
        authenticated: from.authenticated,
        unauthenticated: from.unauthenticated,
    });
    let to = rule
        .to
        .as_ref()
        .map(|to| {
            let ports = to
                .ports
                .iter()
                .enumerate()
                .map(|(k, port)| {
                    u16::try_from(*port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            format!("rules[{index}].to.ports[{k}]: {port} is not a port")
                        })
                })
                .collect::<Result<Vec<u16>, String>>()?;
            Ok::<_, String>(Operations {
                ports,
                paths: to.paths.iter().map(path_match).collect(),
                methods: to.methods.iter().map(|m| m.as_str().to_owned()).collect(),
                headers: to.headers.iter().map(header_match).collect(),
            })
        })
        .transpose()?;
    Ok(contract::AuthorizationRule { from, to })
}

/// What makes a rule self-contradicting: it names a caller that can never authenticate here,
/// a port the policy does not cover, or HTTP conditions where only opaque TCP flows.
fn contradictions(
    trust_domain: &str,
    coverage: &Coverage,
    index: usize,
    rule: &api::AuthorizationRule,
    converted: &contract::AuthorizationRule,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, principal) in rule
        .from
        .iter()
        .flat_map(|f| f.principals.iter())
        .enumerate()
    {
        if let Some(foreign) = foreign_trust_domain(principal, trust_domain) {
            problems.push(format!(
                "rules[{index}].from.principals[{k}]: {principal} is in trust domain {foreign}, \
                 not the mesh's {trust_domain}: no caller can present it here"
            ));
        }
    }
    let Some(to) = &converted.to else {
        return problems;
    };
    // A ServiceAccount target covers every port, over whatever protocol: nothing to compare.
    if coverage.service_ports.is_empty() {
        return problems;
    }
    if coverage.service_ports.iter().all(|p| !p.unresolved) {
        let covered: BTreeSet<u16> = coverage
            .service_ports
            .iter()
            .flat_map(|p| p.targets.iter().copied())
            .collect();
        for (k, port) in to.ports.iter().enumerate() {
            if !covered.contains(port) {
                problems.push(format!(
                    "rules[{index}].to.ports[{k}]: {port} is not among the ports the policy \
                     covers ({}), so the rule can never match",
                    list(covered.iter())
                ));
            }
        }
    }
    if to.is_http() {
        let relevant: Vec<&CoveredPort> = coverage
            .service_ports
            .iter()
            .filter(|p| {
                to.ports.is_empty()
                    || p.unresolved
                    || p.targets.iter().any(|t| to.ports.contains(t))
            })
            .collect();
        if !relevant.is_empty() && relevant.iter().all(|p| p.protocol == Protocol::Tcp) {
            let ports: Vec<String> = relevant
                .iter()
                .map(|p| format!("{} {:?}", p.port, p.name))
                .collect();
            problems.push(format!(
                "rules[{index}].to: paths, methods and headers need HTTP, but every port the \
                 rule applies to is declared tcp (Service port {}): on an opaque connection they \
                 cannot be checked (an Allow rule would never match, a Deny rule would refuse \
                 every connection)",
                ports.join(", ")
            ));
        }
    }
    problems
}

/// The trust domain of a principal (or of a `*` prefix) when it cannot be the mesh's.
fn foreign_trust_domain(principal: &str, trust_domain: &str) -> Option<String> {
    let rest = principal.strip_prefix("spiffe://")?;
    if let Some(prefix) = rest.strip_suffix('*') {
        return match prefix.split_once('/') {
            Some((domain, _)) => (domain != trust_domain).then(|| domain.to_owned()),
            // `spiffe://clu*`: the prefix may still match the mesh's domain.
            None => (!trust_domain.starts_with(prefix)).then(|| format!("{prefix}*")),
        };
    }
    let domain = rest.split_once('/').map_or(rest, |(domain, _)| domain);
    (domain != trust_domain).then(|| domain.to_owned())
}

/// What the contract's own validation (and compilation, as the proxy will do it) refuses, in
/// the policy's terms: `rules[0].to.paths[1].regex: …`.
fn contract_problems(
    rendered: &contract::AuthorizationPolicy,
    rules: &[api::AuthorizationRule],
) -> Vec<String> {
    let trial = Authorization {
        policies: vec![rendered.clone()],
        ..Authorization::default()
    };
    if let Err(errors) = trial.validate() {
        return errors
            .0
            .iter()
            .map(|e| format!("{}: {}", policy_path(&e.path, rules), e.message))
            .collect();
    }
    match Authorizer::new(&trial, "") {
        Ok(_) => Vec::new(),
        Err(error) => vec![error.to_string()],
    }
}

/// Rewrites `$.authorization.policies[0].rules[1].from.principals[3]` into the CRD's path. The
/// rendered principals are the policy's own followed by its ServiceAccounts, so an index past
/// the former points into `serviceAccounts`.
fn policy_path(path: &str, rules: &[api::AuthorizationRule]) -> String {
    let tail = path
        .strip_prefix("$.authorization.policies[0]")
        .unwrap_or(path)
        .trim_start_matches('.');
    let Some((head, rest)) = tail.split_once(".from.principals[") else {
        return tail.to_owned();
    };
    let rule = head
        .strip_prefix("rules[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<usize>().ok())
        .and_then(|i| rules.get(i));
    let index = rest
        .split_once(']')
        .and_then(|(i, _)| i.parse::<usize>().ok());
    match (rule.and_then(|r| r.from.as_ref()), index) {
        (Some(from), Some(k)) if k >= from.principals.len() => {
            format!("{head}.from.serviceAccounts[{}]", k - from.principals.len())
        }
        _ => tail.to_owned(),
    }
}

fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}
