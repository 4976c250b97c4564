//! The pure core: from the cluster's objects to the proxy config and each policy's verdict.
//!
//! Rendering happens once per pass ([`render`]): every Service's entry (governed ones with their
//! policies, the others as they are) goes into one catalog, by [`ServiceRef`]. A workload's
//! config is scoped ([`Rendered::config_with`]): its own inbound side (its mTLS mode and the
//! AuthorizationPolicies that target it, see [`crate::authz`]) and outbound entries only for
//! the Services it depends on: those its pods name in `tandem.dev/dependencies`, those it was
//! seen calling (learned through discovery), and, transitively, the backends their routes send
//! to. Everything is sorted, so unchanged inputs give byte-identical JSON and the operator
//! writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{
    Namespace, Pod, Service as KubeService, ServiceAccount, ServicePort as KubeServicePort,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::PartialObjectMeta;
use sha2::{Digest, Sha256};
use tandem_crds::contract::{
    self, Backend, DefaultPolicy, Endpoint, EndpointWorkload, HeaderMatch, LoadBalancer, PathMatch,
    Protocol, ProxyConfig, RequestMatch, Route, ServicePort, ServiceRef, Telemetry, ValueMatch,
    Workload,
};
use tandem_crds::dependencies::Dependency;
use tandem_crds::identity::{DEFAULT_TRUST_DOMAIN, MTLS_MODE_ANNOTATION, MtlsMode, SpiffeId};
use tandem_crds::names::{DEFAULT_POLICY_ANNOTATION, DEPENDENCIES_ANNOTATION};
use tandem_crds::pods::service_account;
use tandem_crds::v1alpha1::{
    AuthorizationPolicy, CircuitBreakerPolicy, HeaderMatchKind, LoadBalancerKind, PathMatchKind,
    TrafficPolicy, TrafficRule, circuit_breaker, default_retry_budget, reason, retries,
    retry_budget,
};

use crate::authz::Authorizations;
use crate::policy::{PolicyKey, PolicyKind, Verdict};

/// Largest ConfigMap payload the apiserver stores (keys plus values), 1 MiB.
pub const MAX_CONFIG_MAP_BYTES: usize = 1 << 20;

/// The label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A snapshot of everything rendering reads, as the reflectors' stores hold it.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// All TrafficPolicies.
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
    /// All CircuitBreakerPolicies.
    pub circuit_breaker_policies: Vec<Arc<CircuitBreakerPolicy>>,
    /// All AuthorizationPolicies.
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// All Services.
    pub services: Vec<Arc<KubeService>>,
    /// All EndpointSlices.
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Pods with the proxy injected (others may be present; they are ignored), with their
    /// labels (Service selectors) and container ports (named target ports).
    pub pods: Vec<Arc<Pod>>,
    /// ServiceAccounts (metadata: their `tandem.dev/mtls` annotation, and whether an
    /// AuthorizationPolicy's target exists).
    pub service_accounts: Vec<Arc<PartialObjectMeta<ServiceAccount>>>,
    /// Namespaces (metadata: their `tandem.dev/mtls` and `tandem.dev/default-policy`
    /// annotations).
    pub namespaces: Vec<Arc<PartialObjectMeta<Namespace>>>,
    /// Mesh-wide settings.
    pub mesh: Mesh,
}

/// Mesh-wide settings rendering needs (operator flags).
#[derive(Clone, Debug, PartialEq)]
pub struct Mesh {
    /// Trust domain of endpoint identities.
    pub trust_domain: String,
    /// mTLS mode where no annotation chooses one.
    pub default_mtls: MtlsMode,
    /// Authorization default policy where no namespace annotation chooses one.
    pub default_policy: DefaultPolicy,
    /// The networks whose clients count as "in the cluster" (`cluster-authenticated`).
    pub cluster_networks: Vec<IpNet>,
    /// How every proxy reports (metric prefix, tracing), rendered into every config.
    pub telemetry: Telemetry,
}

/// Linkerd's default cluster networks: the private IPv4 ranges and the carrier-grade NAT range,
/// where pod and node addresses live in nearly every cluster.
pub const DEFAULT_CLUSTER_NETWORKS: &str = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16";

impl Default for Mesh {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_mtls: MtlsMode::default(),
            default_policy: DefaultPolicy::default(),
            cluster_networks: DEFAULT_CLUSTER_NETWORKS
                .split(',')
                .filter_map(|n| n.parse().ok())
                .collect(),
            telemetry: Telemetry::default(),
        }
    }
}

/// An object whose `tandem.dev/mtls` or `tandem.dev/default-policy` annotation was ignored,
/// and why (an Event says so).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadAnnotation {
    /// The annotation: [`MTLS_MODE_ANNOTATION`] or [`DEFAULT_POLICY_ANNOTATION`].
    pub annotation: &'static str,
    /// `Namespace` or `ServiceAccount`.
    pub kind: &'static str,
    /// The object's namespace (empty for a Namespace).
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// The value found.
    pub value: String,
}

impl BadAnnotation {
    /// The Event's note.
    pub fn message(&self) -> String {
        if self.annotation == DEPENDENCIES_ANNOTATION {
            return format!(
                "{DEPENDENCIES_ANNOTATION} on pods of this ServiceAccount: {} not <service>, \
                 <namespace>/<service> or <namespace>/*; ignored (the other entries count)",
                self.value
            );
        }
        if self.annotation == DEFAULT_POLICY_ANNOTATION {
            let values: Vec<&str> = DefaultPolicy::ALL.iter().map(|p| p.as_str()).collect();
            return format!(
                "{DEFAULT_POLICY_ANNOTATION}: {:?} is none of {}; ignored (the mesh default \
                 applies)",
                self.value,
                values.join(", ")
            );
        }
        format!(
            "{MTLS_MODE_ANNOTATION}: {:?} is neither \"permissive\" nor \"strict\"; ignored (the \
             {} applies)",
            self.value,
            if self.kind == "ServiceAccount" {
                "namespace's mode, else the mesh default,"
            } else {
                "mesh default"
            }
        )
    }

    /// The Event's reason.
    pub fn reason(&self) -> &'static str {
        if self.annotation == DEPENDENCIES_ANNOTATION {
            return "InvalidDependencies";
        }
        if self.annotation == DEFAULT_POLICY_ANNOTATION {
            "InvalidDefaultPolicy"
        } else {
            "InvalidMtlsMode"
        }
    }
}

/// What one rendering pass concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// Every policy's verdict, by policy.
    pub verdicts: BTreeMap<PolicyKey, Verdict>,
    /// Every Service's entry (governed ones with their policies), with its hashes; shared with
    /// the next pass, which reuses the entries whose objects did not change.
    pub catalog: BTreeMap<ServiceRef, Arc<CatalogEntry>>,
    /// The Services of each namespace (for `<namespace>/*` dependencies).
    pub by_namespace: BTreeMap<String, Vec<ServiceRef>>,
    /// What each workload's pods name in `tandem.dev/dependencies` (union over its pods).
    pub dependencies: BTreeMap<WorkloadKey, BTreeSet<Dependency>>,
    /// The target Service of every accepted TrafficPolicy and CircuitBreakerPolicy.
    pub targets: BTreeMap<PolicyKey, ServiceRef>,
    /// Every policy's `metadata.generation`, as this pass saw it.
    pub generations: BTreeMap<PolicyKey, i64>,
    /// The mTLS mode of every workload with injected pods.
    pub modes: BTreeMap<WorkloadKey, MtlsMode>,
    /// The mode where no workload-specific one was resolved.
    pub default_mtls: MtlsMode,
    /// The mesh's telemetry settings, the same in every config.
    pub telemetry: Telemetry,
    /// Annotations that were ignored.
    pub bad_annotations: Vec<BadAnnotation>,
    /// Every workload's authorization, and which workloads each AuthorizationPolicy reaches.
    pub authorizations: Authorizations,
}

/// One Service as configs carry it, with the hashes that tell what changed between passes.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogEntry {
    /// The entry.
    pub service: contract::Service,
    /// A hash of the whole entry.
    pub hash: u64,
    /// A hash of the entry without its endpoints: what policies and the Service's spec
    /// decide. Equal `policy_hash` and different `hash` means only endpoints changed.
    pub policy_hash: u64,
    /// The length of the entry's compact JSON, as a config's `services` array carries it: what
    /// it adds to a config's size, so an oversized config is known before it is built.
    pub json_len: usize,
    /// Whether a policy governs it (or it is a backend of one).
    pub governed: bool,
    /// The fingerprint of the objects an ungoverned entry was built from (see
    /// `Index::fingerprint`): the next pass reuses the entry while it is unchanged. `None`
    /// for governed entries (they are compared by value) and objects without a
    /// `resourceVersion`.
    pub fingerprint: Option<u64>,
}

impl CatalogEntry {
    fn new(service: contract::Service, governed: bool, fingerprint: Option<u64>) -> Self {
        let json = serde_json::to_vec(&service).unwrap_or_default();
        let mut bare = service.clone();
        for port in &mut bare.ports {
            port.endpoints.clear();
        }
        Self {
            policy_hash: hash_of(&bare),
            hash: hash_bytes(&json),
            json_len: json.len(),
            service,
            governed,
            fingerprint,
        }
    }

    /// Whether the entry carries a meshed endpoint (one with an identity to demand).
    fn is_meshed(&self) -> bool {
        self.service
            .ports
            .iter()
            .any(|p| p.endpoints.iter().any(|e| e.identity.is_some()))
    }
}

/// What one workload's config holds and the hashes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The Services its config carries, sorted.
    pub view: BTreeSet<ServiceRef>,
    /// The content hash (everything but the version): equal hashes, equal configs.
    pub content: String,
    /// The hash of the content without endpoints: equal `policy` and different `content`
    /// means an endpoint-only change.
    pub policy: String,
}

impl Rendered {
    /// The governed Services and the meshed ones, sorted by namespace then name: what every
    /// config carried before configs were scoped (for inspection and tests).
    pub fn services(&self) -> Vec<&contract::Service> {
        self.catalog
            .values()
            .filter(|e| e.governed || e.is_meshed())
            .map(|e| &e.service)
            .collect()
    }

    /// The config for the pods of one ServiceAccount, scoped to the dependencies its pods
    /// name (nothing learned); its version is the bare content hash.
    pub fn config_for(&self, namespace: &str, service_account: &str) -> ProxyConfig {
        let key = WorkloadKey {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let scope = self.scope_of(&key, &BTreeSet::new());
        let mut config = self.config_with(&key, &scope);
        config.version = scope.content;
        config
    }

    /// The Services `workload`'s config carries: those its pods name, those it was seen
    /// calling (`learned`), and the backends of their routes, transitively. Services that do
    /// not exist (any more) are left out. With the hashes of that content.
    pub fn scope_of(&self, workload: &WorkloadKey, learned: &BTreeSet<ServiceRef>) -> Scope {
        let mut pending: Vec<&ServiceRef> = learned.iter().collect();
        for dependency in self.dependencies.get(workload).into_iter().flatten() {
            match dependency {
                Dependency::Service { namespace, name } => {
                    if let Some((key, _)) =
                        self.catalog.get_key_value(&service_ref(namespace, name))
                    {
                        pending.push(key);
                    }
                }
                Dependency::Namespace(namespace) => {
                    pending.extend(self.by_namespace.get(namespace).into_iter().flatten());
                }
            }
        }
        let mut view = BTreeSet::new();
        while let Some(key) = pending.pop() {
            let Some((key, entry)) = self.catalog.get_key_value(key) else {
                continue;
            };
            if !view.insert(key.clone()) {
                continue;
            }
            for route in &entry.service.routes {
                pending.extend(route.backends.iter().map(|b| &b.service));
            }
        }
        let (content, policy) = self.hashes(workload, &view);
        Scope {
            view,
            content,
            policy,
        }
    }

    /// The content and policy hashes of a workload's config holding `view`, computed from the
    /// catalog's per-Service hashes (no config is built).
    fn hashes(&self, workload: &WorkloadKey, view: &BTreeSet<ServiceRef>) -> (String, String) {
        let own = serde_json::to_vec(&(
            self.mode_of(workload),
            self.authorizations.for_workload(workload),
            &self.telemetry,
        ))
        .unwrap_or_default();
        let mut content = Sha256::new();
        let mut policy = Sha256::new();
        for hasher in [&mut content, &mut policy] {
            hasher.update(workload.namespace.as_bytes());
            hasher.update(b"/");
            hasher.update(workload.service_account.as_bytes());
            hasher.update(b"\n");
            hasher.update(&own);
        }
        for key in view {
            if let Some(entry) = self.catalog.get(key) {
                content.update(entry.hash.to_le_bytes());
                policy.update(entry.policy_hash.to_le_bytes());
            }
        }
        (
            short_hash(&content.finalize()),
            short_hash(&policy.finalize()),
        )
    }

    fn mode_of(&self, workload: &WorkloadKey) -> MtlsMode {
        self.modes
            .get(workload)
            .copied()
            .unwrap_or(self.default_mtls)
    }

    /// The bytes `scope`'s Services take in a config's compact JSON (their entries and the
    /// commas between them): a lower bound of the config's size, known without building it.
    pub fn services_size(&self, scope: &Scope) -> usize {
        let entries: usize = scope
            .view
            .iter()
            .filter_map(|key| self.catalog.get(key))
            .map(|entry| entry.json_len)
            .sum();
        entries + scope.view.len().saturating_sub(1)
    }

    /// Builds the config of `workload` holding `scope`'s Services, with an empty version (the
    /// caller stamps it: [`tandem_crds::contract::version_stamp`]).
    pub fn config_with(&self, workload: &WorkloadKey, scope: &Scope) -> ProxyConfig {
        let mut config = ProxyConfig::new(Workload {
            namespace: workload.namespace.clone(),
            service_account: workload.service_account.clone(),
            mtls: self.mode_of(workload),
        });
        config.services = scope
            .view
            .iter()
            .filter_map(|key| self.catalog.get(key))
            .map(|entry| entry.service.clone())
            .collect();
        config.authorization = self.authorizations.for_workload(workload);
        config.telemetry = self.telemetry.clone();
        config
    }

    /// The workloads (`<namespace>/<serviceAccount>`, sorted) an AuthorizationPolicy applies
    /// to; empty for one that is not accepted.
    pub fn workloads_of(&self, policy: &PolicyKey) -> &[String] {
        self.authorizations
            .workloads_of
            .get(policy)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The policies that are in force.
    pub fn accepted(&self) -> impl Iterator<Item = &PolicyKey> {
        self.verdicts
            .iter()
            .filter(|(_, v)| v.is_accepted())
            .map(|(k, _)| k)
    }
}

/// The bytes written to a ConfigMap: compact JSON, fields in the contract's fixed order.
///
/// Compact rather than [`ProxyConfig::to_json`]'s pretty form, because the 1 MiB ConfigMap
/// limit is what bounds the number of governed endpoints: indentation would cost about 40 % of
/// it. Serializing plain structs with string keys cannot fail.
pub fn document(config: &ProxyConfig) -> String {
    serde_json::to_string(config).unwrap_or_default()
}

/// A workload that needs a config: the pods of one ServiceAccount in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    /// Namespace of the pods.
    pub namespace: String,
    /// Their ServiceAccount.
    pub service_account: String,
}

/// Whether a pod may still run: finished pods no longer need a config.
pub(crate) fn is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether the pod carries the proxy: its container, or the webhook's mark (all the
/// metadata-only pod watch sees of it, see [`crate::stores`]).
pub fn is_injected(pod: &Pod) -> bool {
    tandem_crds::pods::is_injected(pod) || tandem_crds::pods::is_marked_injected(&pod.metadata)
}

/// The ServiceAccounts (per namespace) that have injected, unfinished pods.
pub fn workloads(pods: &[Arc<Pod>]) -> BTreeSet<WorkloadKey> {
    pods.iter()
        .filter(|p| is_injected(p) && is_active(p))
        .map(|pod| WorkloadKey {
            namespace: pod.namespace().unwrap_or_default(),
            service_account: service_account(pod).to_owned(),
        })
        .collect()
}

/// The namespaces that need the trust roots: those with injected, unfinished pods.
pub fn trust_namespaces(pods: &[Arc<Pod>]) -> BTreeSet<String> {
    workloads(pods).into_iter().map(|w| w.namespace).collect()
}

/// The mTLS mode of each workload: its ServiceAccount's annotation, else its namespace's, else
/// the mesh default. Unparseable annotations are skipped and reported.
fn modes(inputs: &Inputs) -> (BTreeMap<WorkloadKey, MtlsMode>, Vec<BadAnnotation>) {
    let mut bad = BTreeSet::new();
    let mut annotated = |kind, namespace, meta: &kube::api::ObjectMeta| {
        parsed_annotation(
            MTLS_MODE_ANNOTATION,
            kind,
            namespace,
            meta,
            MtlsMode::parse,
            &mut bad,
        )
    };
    let namespace_modes: BTreeMap<String, MtlsMode> = inputs
        .namespaces
        .iter()
        .filter_map(|ns| {
            let mode = annotated("Namespace", String::new(), &ns.metadata)?;
            Some((ns.name_any(), mode))
        })
        .collect();
    let account_modes: BTreeMap<(String, String), MtlsMode> = inputs
        .service_accounts
        .iter()
        .filter_map(|sa| {
            let namespace = sa.namespace().unwrap_or_default();
            let mode = annotated("ServiceAccount", namespace.clone(), &sa.metadata)?;
            Some(((namespace, sa.name_any()), mode))
        })
        .collect();
    let modes = workloads(&inputs.pods)
        .into_iter()
        .map(|w| {
            let mode = account_modes
                .get(&(w.namespace.clone(), w.service_account.clone()))
                .or_else(|| namespace_modes.get(&w.namespace))
                .copied()
                .unwrap_or(inputs.mesh.default_mtls);
            (w, mode)
        })
        .collect();
    (modes, bad.into_iter().collect())
}

/// The value of annotation `annotation` on an object, parsed; a value `parse` refuses is
/// recorded in `bad` and counts as absent.
pub(crate) fn parsed_annotation<T>(
    annotation: &'static str,
    kind: &'static str,
    namespace: String,
    meta: &kube::api::ObjectMeta,
    parse: impl Fn(&str) -> Option<T>,
    bad: &mut BTreeSet<BadAnnotation>,
) -> Option<T> {
    let value = meta.annotations.as_ref()?.get(annotation)?;
    let parsed = parse(value);
    if parsed.is_none() {
        bad.insert(BadAnnotation {
            annotation,
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
            value: value.clone(),
        });
    }
    parsed
}

/// Renders the governed services (and the meshed ones no policy governs) and judges every
/// policy.
pub fn render(inputs: &Inputs) -> Rendered {
    render_with(inputs, None)
}

/// As [`render`], reusing the entries of the `previous` pass's catalog whose objects did not
/// change, so a pass after one change builds about one entry rather than every Service's.
pub fn render_with(inputs: &Inputs, previous: Option<&Rendered>) -> Rendered {
    let index = Index::new(inputs);
    let mut verdicts = BTreeMap::new();
    let mut governed: BTreeMap<ServiceRef, contract::Service> = BTreeMap::new();

    let traffic = crate::policy::winners(
        PolicyKind::Traffic,
        &inputs.traffic_policies,
        |p| &p.spec.target_ref.name,
        &mut verdicts,
    );
    let breakers = crate::policy::winners(
        PolicyKind::CircuitBreaker,
        &inputs.circuit_breaker_policies,
        |p| &p.spec.target_ref.name,
        &mut verdicts,
    );

    let mut targets = BTreeMap::new();
    for policy in traffic {
        let key = PolicyKey::of(PolicyKind::Traffic, policy);
        targets.insert(key.clone(), target_of(policy, &policy.spec.target_ref.name));
        let verdict = match traffic_fragment(&index, policy) {
            Ok(fragment) => merge_traffic(&index, &mut governed, fragment),
            Err(rejection) => rejection,
        };
        verdicts.insert(key, verdict);
    }
    for policy in breakers {
        let key = PolicyKey::of(PolicyKind::CircuitBreaker, policy);
        targets.insert(key.clone(), target_of(policy, &policy.spec.target_ref.name));
        let verdict = breaker_verdict(&index, &mut governed, policy);
        verdicts.insert(key, verdict);
    }

    let catalog = catalog(&index, &governed, previous.map(|p| &p.catalog));
    let mut by_namespace: BTreeMap<String, Vec<ServiceRef>> = BTreeMap::new();
    for key in catalog.keys() {
        by_namespace
            .entry(key.namespace.clone())
            .or_default()
            .push(key.clone());
    }
    let (modes, mut bad_annotations) = modes(inputs);
    let dependencies = dependencies(inputs, &mut bad_annotations);
    let authorizations = crate::authz::render(inputs, &mut verdicts, &mut bad_annotations);
    bad_annotations.sort();
    targets.retain(|key, _| verdicts.get(key).is_some_and(Verdict::is_accepted));
    Rendered {
        targets,
        generations: generations(inputs),
        verdicts,
        catalog,
        by_namespace,
        dependencies,
        modes,
        default_mtls: inputs.mesh.default_mtls,
        telemetry: inputs.mesh.telemetry.clone(),
        bad_annotations,
        authorizations,
    }
}

fn target_of<P: kube::Resource>(policy: &P, name: &str) -> ServiceRef {
    service_ref(&policy.meta().namespace.clone().unwrap_or_default(), name)
}

/// Every policy's `metadata.generation` (0 where the apiserver set none).
fn generations(inputs: &Inputs) -> BTreeMap<PolicyKey, i64> {
    let traffic = inputs.traffic_policies.iter().map(|p| {
        (
            PolicyKey::of(PolicyKind::Traffic, p.as_ref()),
            p.metadata.generation,
        )
    });
    let breakers = inputs.circuit_breaker_policies.iter().map(|p| {
        (
            PolicyKey::of(PolicyKind::CircuitBreaker, p.as_ref()),
            p.metadata.generation,
        )
    });
    let authorizations = inputs.authorization_policies.iter().map(|p| {
        (
            PolicyKey::of(PolicyKind::Authorization, p.as_ref()),
            p.metadata.generation,
        )
    });
    traffic
        .chain(breakers)
        .chain(authorizations)
        .map(|(key, generation)| (key, generation.unwrap_or(0)))
        .collect()
}

/// Every Service's entry: the governed one where a policy governs it, else its base. An entry
/// of the `previous` catalog is reused, not rebuilt, when it is still right: a governed one
/// when its service is equal, an ungoverned one when its objects' fingerprint is.
fn catalog(
    index: &Index,
    governed: &BTreeMap<ServiceRef, contract::Service>,
    previous: Option<&BTreeMap<ServiceRef, Arc<CatalogEntry>>>,
) -> BTreeMap<ServiceRef, Arc<CatalogEntry>> {
    index
        .services
        .keys()
        .filter_map(|key| {
            let earlier = previous.and_then(|p| p.get(key));
            let entry = match governed.get(key) {
                Some(service) => match earlier {
                    Some(e) if e.governed && e.service == *service => e.clone(),
                    _ => Arc::new(CatalogEntry::new(service.clone(), true, None)),
                },
                None => {
                    let fingerprint = index.fingerprint(key);
                    match earlier {
                        Some(e)
                            if !e.governed
                                && fingerprint.is_some()
                                && e.fingerprint == fingerprint =>
                        {
                            e.clone()
                        }
                        _ => Arc::new(CatalogEntry::new(index.base(key)?, false, fingerprint)),
                    }
                }
            };
            Some((key.clone(), entry))
        })
        .collect()
}

/// What each workload's pods name in `tandem.dev/dependencies`, united over its pods. Entries
/// that name nothing are skipped and reported once per workload (on its ServiceAccount).
fn dependencies(
    inputs: &Inputs,
    bad: &mut Vec<BadAnnotation>,
) -> BTreeMap<WorkloadKey, BTreeSet<Dependency>> {
    // A workload's pods usually carry the same value: each distinct value is parsed and
    // united once per workload, not once per pod.
    let mut values: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for pod in inputs
        .pods
        .iter()
        .filter(|p| is_injected(p) && is_active(p))
    {
        if let Some(value) = pod.annotations().get(DEPENDENCIES_ANNOTATION) {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            values
                .entry((namespace, service_account(pod)))
                .or_default()
                .insert(value);
        }
    }
    let mut found = BTreeMap::new();
    for ((namespace, account), values) in values {
        let mut named = BTreeSet::new();
        let mut wrong = BTreeSet::new();
        for value in values {
            let (dependencies, errors) = tandem_crds::dependencies::parse(value, namespace);
            named.extend(dependencies);
            wrong.extend(errors.into_iter().map(|e| e.entry));
        }
        if !wrong.is_empty() {
            bad.push(BadAnnotation {
                annotation: DEPENDENCIES_ANNOTATION,
                kind: "ServiceAccount",
                namespace: namespace.to_owned(),
                name: account.to_owned(),
                value: wrong.into_iter().collect::<Vec<_>>().join(","),
            });
        }
        let workload = WorkloadKey {
            namespace: namespace.to_owned(),
            service_account: account.to_owned(),
        };
        found.insert(workload, named);
    }
    found
}

/// A stable 64-bit hash of a value's JSON (the first 8 bytes of its SHA-256), the same in
/// every process and release, so versions survive restarts.
fn hash_of<T: serde::Serialize>(value: &T) -> u64 {
    hash_bytes(&serde_json::to_vec(value).unwrap_or_default())
}

/// The first 8 bytes of the SHA-256 of `bytes`.
fn hash_bytes(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

fn short_hash(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Lookups

/// What a pod contributes to the endpoints it backs.
#[derive(Debug, Hash)]
struct PodFacts {
    /// Its identity's URI, when the proxy is injected (the endpoint is then meshed).
    identity: Option<String>,
    /// Its workload (`pods::workload_name`), which labels the metrics.
    workload: Option<EndpointWorkload>,
}

/// The inputs indexed for rendering.
struct Index<'a> {
    services: BTreeMap<ServiceRef, &'a KubeService>,
    slices: BTreeMap<ServiceRef, Vec<&'a EndpointSlice>>,
    /// Every known pod by namespace, then name: what it contributes to its endpoints.
    pods: HashMap<&'a str, HashMap<&'a str, PodFacts>>,
}

impl<'a> Index<'a> {
    fn new(inputs: &'a Inputs) -> Self {
        let services = inputs
            .services
            .iter()
            .map(|s| {
                (
                    service_ref(&s.namespace().unwrap_or_default(), &s.name_any()),
                    s.as_ref(),
                )
            })
            .collect();
        let mut slices: BTreeMap<ServiceRef, Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in &inputs.endpoint_slices {
            if let Some(name) = slice.labels().get(SERVICE_NAME_LABEL) {
                let key = service_ref(&slice.namespace().unwrap_or_default(), name);
                slices.entry(key).or_default().push(slice.as_ref());
            }
        }
        let trust_domain = &inputs.mesh.trust_domain;
        let mut pods: HashMap<&str, HashMap<&str, PodFacts>> = HashMap::new();
        // Identities by (namespace, ServiceAccount), each formatted once.
        let mut identities: HashMap<(&str, &str), String> = HashMap::new();
        for pod in &inputs.pods {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            let identity = is_injected(pod).then(|| {
                let account = service_account(pod);
                identities
                    .entry((namespace, account))
                    .or_insert_with(|| SpiffeId::new(trust_domain, namespace, account).uri())
                    .clone()
            });
            let name = tandem_crds::pods::workload_name(&pod.metadata);
            let workload = (!name.is_empty()).then(|| EndpointWorkload {
                name,
                namespace: namespace.to_owned(),
            });
            pods.entry(namespace).or_default().insert(
                pod.metadata.name.as_deref().unwrap_or_default(),
                PodFacts { identity, workload },
            );
        }
        Self {
            services,
            slices,
            pods,
        }
    }

    /// A fingerprint of everything [`Index::base`] reads for `key`: the Service's and its
    /// slices' `resourceVersion`s, and what the pods behind the slices' endpoints contribute
    /// ([`PodFacts`]). Equal fingerprints, equal bases, so the previous pass's entry is
    /// reused. `None` when an object has no `resourceVersion` (built by hand, as in tests):
    /// the entry is then always rebuilt. In-process only (the hasher is not stable across
    /// releases; nothing persists it).
    fn fingerprint(&self, key: &ServiceRef) -> Option<u64> {
        let mut hasher = std::hash::DefaultHasher::new();
        let service = self.services.get(key)?;
        service
            .metadata
            .resource_version
            .as_deref()?
            .hash(&mut hasher);
        for slice in self.slices.get(key).into_iter().flatten() {
            slice.metadata.name.hash(&mut hasher);
            slice
                .metadata
                .resource_version
                .as_deref()?
                .hash(&mut hasher);
            for endpoint in &slice.endpoints {
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"));
                if let Some(pod) = pod {
                    let namespace = pod.namespace.as_deref().unwrap_or(&key.namespace);
                    self.pod_facts(namespace, pod.name.as_deref().unwrap_or_default())
                        .hash(&mut hasher);
                }
            }
        }
        Some(hasher.finish())
    }

    /// What a pod contributes to its endpoints; `None` for a pod that is not known.
    fn pod_facts(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        self.pods.get(namespace)?.get(name)
    }

    /// The contract view of a Service: cluster IPs, TCP ports with protocol and ready
    /// endpoints; no policy yet.
    fn base(&self, key: &ServiceRef) -> Option<contract::Service> {
        let service = self.services.get(key)?;
        let spec = service.spec.as_ref();
        let cluster_ips = cluster_ips(service);
        let slices = self.slices.get(key).map(Vec::as_slice).unwrap_or_default();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let number = u16::try_from(p.port).ok().filter(|n| *n != 0)?;
                let port = ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: number,
                    protocol: protocol_of(p),
                    endpoints: self.endpoints(&key.namespace, p, slices),
                };
                Some((number, port))
            })
            .collect::<BTreeMap<u16, ServicePort>>()
            .into_values()
            .collect();
        Some(contract::Service {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            cluster_ips,
            ports,
            ..contract::Service::default()
        })
    }

    /// Ready endpoints of one service port, from the slices of its Service. The slice's port of
    /// the same name carries the resolved target port.
    fn endpoints(
        &self,
        namespace: &str,
        port: &KubeServicePort,
        slices: &[&EndpointSlice],
    ) -> Vec<Endpoint> {
        let wanted = port.name.as_deref().unwrap_or_default();
        let mut found = BTreeSet::new();
        for slice in slices {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let Some(target) = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| is_tcp(p.protocol.as_deref()))
                .find(|p| p.name.as_deref().unwrap_or_default() == wanted)
                .and_then(|p| p.port)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                // A missing `ready` means unknown, which consumers treat as ready.
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
                if ready == Some(false) {
                    continue;
                }
                // Meshed means "its pod is injected"; the pod's ServiceAccount is the identity
                // the client's proxy will demand of it. Its workload labels the metrics.
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.as_deref().unwrap_or(namespace);
                        self.pod_facts(ns, r.name.as_deref()?)
                    });
                let identity = pod.and_then(|p| p.identity.as_ref());
                let workload = pod.and_then(|p| p.workload.as_ref());
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        found.insert(Endpoint {
                            address: SocketAddr::new(ip, target),
                            meshed: identity.is_some(),
                            identity: identity.cloned(),
                            workload: workload.cloned(),
                        });
                    }
                }
            }
        }
        found.into_iter().collect()
    }
}

fn service_ref(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
    }
}

fn cluster_ips(service: &KubeService) -> Vec<IpAddr> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    // Headless Services have "None": no cluster IP to match on.
    let set: BTreeSet<IpAddr> = ips.into_iter().filter_map(|ip| ip.parse().ok()).collect();
    set.into_iter().collect()
}

/// Only TCP is proxied; UDP and SCTP ports are left out.
pub(crate) fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

/// The protocol of a Service port: from `appProtocol`, else from the port name's prefix
/// (`http`, `http-web`, `grpc-api`, …), else detected by the proxy.
pub fn protocol_of(port: &KubeServicePort) -> Protocol {
    if let Some(protocol) = port.app_protocol.as_deref().and_then(named_protocol) {
        return protocol;
    }
    port.name
        .as_deref()
        .and_then(|name| named_protocol(name.split('-').next().unwrap_or_default()))
        .unwrap_or(Protocol::Detect)
}

fn named_protocol(name: &str) -> Option<Protocol> {
    match name.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        // TLS passes through the proxy as opaque bytes.
        "tcp" | "tls" | "https" | "kubernetes.io/wss" => Some(Protocol::Tcp),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

/// What an acceptable TrafficPolicy adds to its target.
struct TrafficFragment {
    target: ServiceRef,
    backends: Vec<ServiceRef>,
    routes: Vec<Route>,
    load_balancer: LoadBalancer,
    retry_budget: Option<contract::RetryBudget>,
}

fn rejected(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Rejected {
        reason,
        message: message.into(),
    }
}

fn traffic_fragment(index: &Index<'_>, policy: &TrafficPolicy) -> Result<TrafficFragment, Verdict> {
    let namespace = policy.namespace().unwrap_or_default();
    let target = service_ref(&namespace, &policy.spec.target_ref.name);
    let target_base = index.base(&target).ok_or_else(|| {
        rejected(
            reason::TARGET_NOT_FOUND,
            format!("Service {target} does not exist"),
        )
    })?;
    let mut bases = BTreeMap::from([(target.clone(), target_base)]);
    let mut routes = Vec::new();
    let mut any_retries = false;
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        let route = route_of(&namespace, i, rule).map_err(|e| rejected(reason::INVALID, e))?;
        for backend in &route.backends {
            if !bases.contains_key(&backend.service) {
                let base = index.base(&backend.service).ok_or_else(|| {
                    rejected(
                        reason::TARGET_NOT_FOUND,
                        format!(
                            "backend Service {} of rules[{i}] does not exist",
                            backend.service
                        ),
                    )
                })?;
                bases.insert(backend.service.clone(), base);
            }
        }
        any_retries |= route.retries.is_some();
        routes.push(route);
    }
    let retry_budget = match &policy.spec.retry_budget {
        Some(budget) => {
            Some(retry_budget(budget).map_err(|e| rejected(reason::INVALID, e.to_string()))?)
        }
        None => any_retries.then(default_retry_budget),
    };
    let fragment = TrafficFragment {
        backends: bases.keys().filter(|k| **k != target).cloned().collect(),
        target,
        routes,
        load_balancer: load_balancer_of(policy.spec.load_balancer),
        retry_budget,
    };
    check_fragment(&fragment, bases)?;
    Ok(fragment)
}

/// Validates the policy on its own (its target and backends only), so that an error is the
/// policy's and the others render regardless.
fn check_fragment(
    fragment: &TrafficFragment,
    mut bases: BTreeMap<ServiceRef, contract::Service>,
) -> Result<(), Verdict> {
    if let Some(target) = bases.get_mut(&fragment.target) {
        apply_traffic(target, fragment);
    }
    let mut trial = ProxyConfig::new(Workload {
        namespace: "trial".into(),
        service_account: "trial".into(),
        mtls: Default::default(),
    });
    trial.services = bases.into_values().collect();
    trial.validate().map_err(|errors| {
        let problems: Vec<String> = errors
            .0
            .iter()
            .map(|e| describe_problem(&e.path, &e.message))
            .collect();
        rejected(reason::INVALID, problems.join("; "))
    })
}

/// Rewrites a validation path such as `$.services[0].routes[1].backends[0].port` into words a
/// policy author recognises: the rule index maps one to one onto the policy's rules.
fn describe_problem(path: &str, message: &str) -> String {
    let tail = path
        .split_once(".routes[")
        .map(|(_, rest)| format!("rules[{rest}"))
        .unwrap_or_else(|| path.trim_start_matches("$.").to_owned());
    format!("{tail}: {message}")
}

fn apply_traffic(service: &mut contract::Service, fragment: &TrafficFragment) {
    service.routes.clone_from(&fragment.routes);
    service.load_balancer = fragment.load_balancer;
    service.retry_budget.clone_from(&fragment.retry_budget);
}

/// Adds an accepted TrafficPolicy to the governed services.
fn merge_traffic(
    index: &Index<'_>,
    governed: &mut BTreeMap<ServiceRef, contract::Service>,
    fragment: TrafficFragment,
) -> Verdict {
    for key in std::iter::once(&fragment.target).chain(&fragment.backends) {
        if !governed.contains_key(key)
            && let Some(base) = index.base(key)
        {
            governed.insert(key.clone(), base);
        }
    }
    if let Some(target) = governed.get_mut(&fragment.target) {
        apply_traffic(target, &fragment);
    }
    Verdict::Accepted
}

fn route_of(namespace: &str, index: usize, rule: &TrafficRule) -> Result<Route, String> {
    let field = format!("rules[{index}]");
    let timeout_ms = rule
        .timeout
        .as_deref()
        .map(|t| {
            tandem_crds::duration::parse_millis(t).map_err(|e| format!("{field}.timeout: {e}"))
        })
        .transpose()?;
    let retries = rule
        .retries
        .as_ref()
        .map(|r| retries(&format!("{field}.retries"), r).map_err(|e| e.to_string()))
        .transpose()?;
    let backends = rule
        .backends
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let port = u16::try_from(b.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{field}.backends[{j}].port: {} is not a port", b.port))?;
            let weight = u32::try_from(b.weight)
                .map_err(|_| format!("{field}.backends[{j}].weight: must not be negative"))?;
            Ok(Backend {
                service: service_ref(namespace, &b.name),
                port,
                weight,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Route {
        name: rule.name.clone().unwrap_or_else(|| format!("rule-{index}")),
        matches: rule.matches.iter().map(request_match).collect(),
        backends,
        timeout_ms,
        retries,
    })
}

fn request_match(m: &tandem_crds::v1alpha1::RouteMatch) -> RequestMatch {
    RequestMatch {
        path: m.path.as_ref().map(path_match),
        method: m.method.map(|method| method.as_str().to_owned()),
        headers: m.headers.iter().map(header_match).collect(),
    }
}

/// A CRD path condition as the contract spells it.
pub(crate) fn path_match(p: &tandem_crds::v1alpha1::PathMatch) -> PathMatch {
    match p.kind {
        PathMatchKind::Exact => PathMatch::Exact(p.value.clone()),
        PathMatchKind::PathPrefix => PathMatch::Prefix(p.value.clone()),
        PathMatchKind::RegularExpression => PathMatch::Regex(p.value.clone()),
    }
}

/// A CRD header condition as the contract spells it.
pub(crate) fn header_match(h: &tandem_crds::v1alpha1::HeaderMatch) -> HeaderMatch {
    HeaderMatch {
        // HTTP header names are case-insensitive; the contract wants lower case.
        name: h.name.to_ascii_lowercase(),
        value: match h.kind {
            HeaderMatchKind::Exact => ValueMatch::Exact(h.value.clone()),
            HeaderMatchKind::RegularExpression => ValueMatch::Regex(h.value.clone()),
        },
    }
}

fn load_balancer_of(kind: LoadBalancerKind) -> LoadBalancer {
    match kind {
        LoadBalancerKind::PeakEwma => LoadBalancer::PeakEwma,
        LoadBalancerKind::RoundRobin => LoadBalancer::RoundRobin,
        LoadBalancerKind::LeastRequest => LoadBalancer::LeastRequest,
    }
}

// ---------------------------------------------------------------------------------------------
// CircuitBreakerPolicy

fn breaker_verdict(
    index: &Index<'_>,
    governed: &mut BTreeMap<ServiceRef, contract::Service>,
    policy: &CircuitBreakerPolicy,
) -> Verdict {
    let target = service_ref(
        &policy.namespace().unwrap_or_default(),
        &policy.spec.target_ref.name,
    );
    let breaker = match circuit_breaker(&policy.spec) {
        Ok(breaker) => breaker,
        Err(e) => return rejected(reason::INVALID, e.to_string()),
    };
    let Some(mut base) = governed
        .get(&target)
        .cloned()
        .or_else(|| index.base(&target))
    else {
        return rejected(
            reason::TARGET_NOT_FOUND,
            format!("Service {target} does not exist"),
        );
    };
    base.circuit_breaker = Some(breaker);
    let mut trial = ProxyConfig::new(Workload {
        namespace: "trial".into(),
        service_account: "trial".into(),
        mtls: Default::default(),
    });
    // Routes are the TrafficPolicy's business and were checked with it; the breaker is checked
    // on its own.
    let mut alone = base.clone();
    alone.routes.clear();
    trial.services = vec![alone];
    if let Err(errors) = trial.validate() {
        let problems: Vec<String> = errors
            .0
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.path.trim_start_matches("$.services[0].circuitBreaker."),
                    e.message
                )
            })
            .collect();
        return rejected(reason::INVALID, problems.join("; "));
    }
    governed.insert(target, base);
    Verdict::Accepted
}
