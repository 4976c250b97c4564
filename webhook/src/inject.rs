//! The decision and the patch: `inject(&Pod, namespace, &InjectConfig)`. Pure: no I/O.
//!
//! # Who is injected
//!
//! The webhook is only called for pods the MutatingWebhookConfiguration selects (see
//! `manifests/webhook/`): pods in a namespace labelled `tandem.dev/inject=enabled`, and pods
//! labelled `tandem.dev/inject=enabled` elsewhere. The server never looks up namespace labels;
//! it trusts the selectors, so it needs no access to the apiserver to decide. What it decides
//! itself, each with a counted and logged reason:
//!
//! | pod | result |
//! | --- | --- |
//! | in `kube-system`, `kube-public`, `kube-node-lease`, `tandem-system` | skipped: `system-namespace` |
//! | annotation (or label) `tandem.dev/inject: disabled` | skipped: `opted-out` |
//! | `hostNetwork: true` (iptables would capture the node's traffic) | skipped: `host-network` |
//! | already has a `tandem-init` or `tandem-proxy` container | skipped: `already-injected` |
//! | an invalid `tandem.dev/*` annotation | refused, with the annotation named |
//! | anything else | injected |
//!
//! Opting **in** is a label and opting **out** is an annotation (a label works too). The
//! difference matters: the apiserver can only select webhook calls by labels, so a pod
//! *annotated* `tandem.dev/inject: enabled` in an unlabelled namespace is never sent to the
//! webhook and is not injected. Istio's users tripped on exactly this (istio/istio#39006).
//!
//! # Identity bootstrap
//!
//! With identity on (the webhook's `--identity-addr` is not empty) the proxy also gets what it
//! needs to ask the signer for its workload certificate, and nothing more:
//!
//! - volume `tandem-identity-token`: a projected ServiceAccount token with audience `tandem`,
//!   lifetime 3600 s (the kubelet binds it to the pod and rewrites it at 80 %), read-only at
//!   `/var/run/secrets/tandem.dev/identity/token`;
//! - volume `tandem-trust-roots`: ConfigMap `tandem-trust-roots` (written by the operator,
//!   `optional`, so the pod starts before it exists), read-only at
//!   `/var/run/secrets/tandem.dev/trust/`;
//! - env `TANDEM_IDENTITY_ADDR` and `TANDEM_IDENTITY_NAME` (the signer and the name its
//!   certificate carries), and `TANDEM_IDENTITY_TOKEN` and `TANDEM_TRUST_ROOTS` (the two files).
//!
//! The annotation `tandem.dev/identity: disabled` leaves all of it out for one pod (its proxy
//! then neither originates nor terminates mutual TLS). The names and numbers are
//! [`tandem_crds::identity`]'s.

use std::collections::BTreeMap;
use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use tandem_crds::{identity, names};

pub use crate::config::{IdentityConfig, InjectConfig, ProxyResources};
use crate::overrides::{self, InvalidAnnotation, Overrides};

/// Volume holding the proxy config (the ServiceAccount's ConfigMap).
pub const CONFIG_VOLUME: &str = "tandem-config";
/// Volume mounted at `/run` in the init container, where `iptables-legacy` takes its lock
/// (the root filesystem is read-only).
pub const XTABLES_LOCK_VOLUME: &str = "tandem-xtables-lock";
/// Projected ServiceAccount token the proxy presents to the signer (audience
/// [`identity::TOKEN_AUDIENCE`]), mounted at [`identity::TOKEN_DIR`].
pub const IDENTITY_TOKEN_VOLUME: &str = "tandem-identity-token";
/// The namespace's trust roots ([`identity::TRUST_ROOTS_CONFIG_MAP`]), mounted at
/// [`identity::TRUST_ROOTS_DIR`].
pub const TRUST_ROOTS_VOLUME: &str = "tandem-trust-roots";
/// Every volume injection adds: a pod that already has one of these names is refused.
const OUR_VOLUMES: [&str; 4] = [
    CONFIG_VOLUME,
    XTABLES_LOCK_VOLUME,
    IDENTITY_TOKEN_VOLUME,
    TRUST_ROOTS_VOLUME,
];

/// Environment variables the proxy reads, filled from the downward API.
pub mod env {
    /// The pod's name (`metadata.name`).
    pub const POD_NAME: &str = "TANDEM_POD_NAME";
    /// The pod's namespace (`metadata.namespace`).
    pub const POD_NAMESPACE: &str = "TANDEM_POD_NAMESPACE";
    /// The pod's IP (`status.podIP`).
    pub const POD_IP: &str = "TANDEM_POD_IP";
    /// The pod's ServiceAccount (`spec.serviceAccountName`).
    pub const SERVICE_ACCOUNT: &str = "TANDEM_SERVICE_ACCOUNT";
    /// The pod's workload (its controller's name, the Deployment of a ReplicaSet's pod, as
    /// [`tandem_crds::pods::workload_name`] derives it at admission), the metrics'
    /// `*_workload` label; absent when the pod names nothing.
    pub const WORKLOAD_NAME: &str = "TANDEM_WORKLOAD_NAME";
    /// The proxy's log filter (from `tandem.dev/log-level` or the webhook's default).
    pub const LOG: &str = "TANDEM_LOG";
    /// The proxy's access log (from `tandem.dev/access-log`; absent: the proxy's default).
    pub const ACCESS_LOG: &str = "TANDEM_ACCESS_LOG";
    /// The signer's `host:port` (absent: identity off).
    pub const IDENTITY_ADDR: &str = "TANDEM_IDENTITY_ADDR";
    /// The name the signer's certificate carries.
    pub const IDENTITY_NAME: &str = "TANDEM_IDENTITY_NAME";
    /// The projected token file the proxy presents to the signer.
    pub const IDENTITY_TOKEN: &str = "TANDEM_IDENTITY_TOKEN";
    /// The PEM bundle of trust roots.
    pub const TRUST_ROOTS: &str = "TANDEM_TRUST_ROOTS";
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Inject, applying this patch.
    Inject(Patch),
    /// Leave the pod unchanged, for this reason.
    Skip(SkipReason),
}

/// Why a selected pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The namespace is one that is never meshed.
    SystemNamespace,
    /// The pod opted out with `tandem.dev/inject: disabled`.
    OptedOut,
    /// The pod shares the node's network namespace.
    HostNetwork,
    /// The pod already has the sidecar.
    AlreadyInjected,
}

impl SkipReason {
    /// The label value in metrics and the `reason` field in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SystemNamespace => "system-namespace",
            Self::OptedOut => "opted-out",
            Self::HostNetwork => "host-network",
            Self::AlreadyInjected => "already-injected",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a pod is refused rather than injected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InjectError {
    /// A `tandem.dev/*` annotation could not be understood.
    #[error(transparent)]
    InvalidAnnotation(#[from] InvalidAnnotation),
    /// The pod already uses a name the injection needs.
    #[error("the pod already has a volume named {name:?}, which tandem needs")]
    VolumeConflict {
        /// The volume name.
        name: String,
    },
    /// The pod has no `spec`.
    #[error("the pod has no spec")]
    NoSpec,
}

/// Decides whether to inject `pod` (created in `namespace`) and builds the patch.
pub fn inject(pod: &Pod, namespace: &str, config: &InjectConfig) -> Result<Decision, InjectError> {
    if let Some(reason) = skip_reason(pod, namespace) {
        return Ok(Decision::Skip(reason));
    }
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    for volume in spec.volumes.iter().flatten() {
        if OUR_VOLUMES.contains(&volume.name.as_str()) {
            return Err(InjectError::VolumeConflict {
                name: volume.name.clone(),
            });
        }
    }
    let overrides = overrides::resolve(pod.metadata.annotations.as_ref(), config)?;
    let service_account = service_account(pod);
    Ok(Decision::Inject(patch(
        pod,
        &service_account,
        &overrides,
        config,
    )))
}

/// The reason a selected pod is left alone, if there is one. Checked in this order so that
/// the most fundamental reason is the one reported.
fn skip_reason(pod: &Pod, namespace: &str) -> Option<SkipReason> {
    if names::NEVER_INJECTED_NAMESPACES.contains(&namespace) {
        return Some(SkipReason::SystemNamespace);
    }
    let disabled = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|map| map.get(key))
            .is_some_and(|value| value.trim() == names::INJECT_DISABLED)
    };
    if disabled(&pod.metadata.annotations, names::INJECT_ANNOTATION)
        || disabled(&pod.metadata.labels, names::INJECT_LABEL)
    {
        return Some(SkipReason::OptedOut);
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some(SkipReason::HostNetwork);
    }
    let ours = |container: &Container| {
        container.name == names::PROXY_CONTAINER || container.name == names::INIT_CONTAINER
    };
    if spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(ours)
    {
        return Some(SkipReason::AlreadyInjected);
    }
    None
}

/// The pod's ServiceAccount. At admission the ServiceAccount admission plugin has already
/// filled in `default` when the pod named none; the fallback covers clusters without it.
fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|spec| {
            spec.service_account_name
                .clone()
                .or_else(|| spec.service_account.clone())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

// ---------------------------------------------------------------------------------------------
// The patch

/// The RFC 6902 patch. Each list is extended rather than replaced when it exists, so the
/// patch is correct whether or not the pod already has init containers, volumes and
/// annotations.
fn patch(pod: &Pod, service_account: &str, overrides: &Overrides, config: &InjectConfig) -> Patch {
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();

    // The init container and the proxy go first, in that order: user init containers then
    // run with the mesh in place (their traffic is captured and the proxy is up).
    let init = to_value(&init_container(overrides, config));
    let probes = crate::probes::app_probes(pod);
    let workload = tandem_crds::pods::workload_name(&pod.metadata);
    let proxy = to_value(&proxy_container(overrides, config, &probes, &workload));
    if spec
        .and_then(|spec| spec.init_containers.as_ref())
        .is_some()
    {
        ops.push(add(&["spec", "initContainers", "0"], init));
        ops.push(add(&["spec", "initContainers", "1"], proxy));
    } else {
        ops.push(add(
            &["spec", "initContainers"],
            Value::Array(vec![init, proxy]),
        ));
    }

    let mut volumes = vec![config_volume(service_account), xtables_lock_volume()];
    if overrides.identity.is_some() {
        volumes.extend([identity_token_volume(), trust_roots_volume()]);
    }
    let volumes: Vec<Value> = volumes.iter().map(to_value).collect();
    if spec.and_then(|spec| spec.volumes.as_ref()).is_some() {
        for volume in volumes {
            ops.push(add(&["spec", "volumes", "-"], volume));
        }
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }

    let annotations = added_annotations(pod, service_account, config);
    if pod.metadata.annotations.is_some() {
        for (key, value) in annotations {
            ops.push(add(
                &["metadata", "annotations", &key],
                Value::String(value),
            ));
        }
    } else {
        let map = annotations
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        ops.push(add(&["metadata", "annotations"], Value::Object(map)));
    }
    Patch(ops)
}

/// The annotations injection adds: the proxy version; the ServiceAccount and the named TCP
/// container ports, so the operator can watch pods through their metadata only (it reads
/// nothing else from a pod's spec); and Prometheus scrape annotations for the proxy's admin
/// port unless the pod already asks to be scraped (its own metrics win; overwriting them would
/// silently stop the application's scraping).
fn added_annotations(
    pod: &Pod,
    service_account: &str,
    config: &InjectConfig,
) -> BTreeMap<String, String> {
    let mut added = BTreeMap::new();
    added.insert(
        names::PROXY_VERSION_ANNOTATION.to_owned(),
        config.proxy_version.clone(),
    );
    added.insert(
        names::SERVICE_ACCOUNT_ANNOTATION.to_owned(),
        service_account.to_owned(),
    );
    added.insert(
        names::CONTAINER_PORTS_ANNOTATION.to_owned(),
        tandem_crds::pods::recorded_ports(pod),
    );
    let has = |key: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .is_some_and(|map| map.contains_key(key))
    };
    if !has("prometheus.io/scrape") {
        added.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
        added.insert(
            "prometheus.io/port".to_owned(),
            names::ADMIN_PORT.to_string(),
        );
        added.insert("prometheus.io/path".to_owned(), "/metrics".to_owned());
    }
    added
}

/// An `add` operation at the path made of `tokens`; `/` and `~` in a token are escaped
/// (`tandem.dev/proxy-version` becomes `tandem.dev~1proxy-version`).
fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    // Serializing k8s-openapi types to a Value cannot fail: they are plain data with string
    // keys. Null stands in for the impossible error rather than a panic.
    serde_json::to_value(object).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Containers and volumes

/// `tandem-init`: `tandem-proxy init` with the pod's exclusions, as root with only
/// NET_ADMIN and NET_RAW (iptables needs both; nothing else is granted).
fn init_container(overrides: &Overrides, config: &InjectConfig) -> Container {
    let mut args = vec![
        "init".to_owned(),
        format!("--proxy-uid={}", names::PROXY_UID),
        format!("--proxy-gid={}", names::PROXY_UID),
        format!("--inbound-port={}", names::INBOUND_PORT),
        format!("--outbound-port={}", names::OUTBOUND_PORT),
        format!("--admin-port={}", names::ADMIN_PORT),
    ];
    let list = |items: Vec<String>| items.join(",");
    if !overrides.skip_inbound_ports.is_empty() {
        let ports = list(
            overrides
                .skip_inbound_ports
                .iter()
                .map(ToString::to_string)
                .collect(),
        );
        args.push(format!("--skip-inbound-ports={ports}"));
    }
    if !overrides.skip_outbound_ports.is_empty() {
        let ports = list(
            overrides
                .skip_outbound_ports
                .iter()
                .map(ToString::to_string)
                .collect(),
        );
        args.push(format!("--skip-outbound-ports={ports}"));
    }
    if !overrides.skip_outbound_cidrs.is_empty() {
        let cidrs = list(
            overrides
                .skip_outbound_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
        );
        args.push(format!("--skip-outbound-cidrs={cidrs}"));
    }
    Container {
        name: names::INIT_CONTAINER.to_owned(),
        image: Some(overrides.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec!["tandem-proxy".to_owned()]),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "10m"), ("memory", "16Mi")])),
            limits: Some(quantities(&[("memory", "64Mi")])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

fn proxy_env(
    overrides: &Overrides,
    probes: &[crate::probes::AppProbe],
    workload: &str,
) -> Vec<EnvVar> {
    let value = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    };
    let mut env = vec![
        field_env(env::POD_NAME, "metadata.name"),
        field_env(env::POD_NAMESPACE, "metadata.namespace"),
        field_env(env::POD_IP, "status.podIP"),
        field_env(env::SERVICE_ACCOUNT, "spec.serviceAccountName"),
        value(env::LOG, &overrides.log_level),
    ];
    if !workload.is_empty() {
        // A value, not the downward API: the workload is not a field of the pod.
        env.push(value(env::WORKLOAD_NAME, workload));
    }
    if let Some(access_log) = &overrides.access_log {
        env.push(value(env::ACCESS_LOG, access_log));
    }
    if let Some(probes) = crate::probes::probes_env_value(probes) {
        env.push(value(crate::probes::PROBES_ENV, &probes));
    }
    // The paths are where this patch mounts the volumes, so the proxy is told rather than
    // left to agree by coincidence.
    if let Some(identity) = &overrides.identity {
        env.extend([
            value(env::IDENTITY_ADDR, &identity.addr),
            value(env::IDENTITY_NAME, &identity.name),
            value(
                env::IDENTITY_TOKEN,
                &format!("{}/{}", identity::TOKEN_DIR, identity::TOKEN_FILE),
            ),
            value(
                env::TRUST_ROOTS,
                &format!(
                    "{}/{}",
                    identity::TRUST_ROOTS_DIR,
                    identity::TRUST_ROOTS_KEY
                ),
            ),
        ]);
    }
    env
}

/// The proxy's mounts: its config, and with identity on, the token and the trust roots. All
/// read-only: the proxy writes nothing to disk (its key stays in memory).
fn proxy_mounts(overrides: &Overrides) -> Vec<VolumeMount> {
    let read_only = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let mut mounts = vec![read_only(CONFIG_VOLUME, names::CONFIG_DIR)];
    if overrides.identity.is_some() {
        mounts.push(read_only(IDENTITY_TOKEN_VOLUME, identity::TOKEN_DIR));
        mounts.push(read_only(TRUST_ROOTS_VOLUME, identity::TRUST_ROOTS_DIR));
    }
    mounts
}

/// `tandem-proxy`: a native sidecar (an init container with `restartPolicy: Always`), so the
/// application containers start only once its startup probe passes and Jobs complete when
/// their own containers do. The image's entrypoint runs the proxy.
fn proxy_container(
    overrides: &Overrides,
    config: &InjectConfig,
    probes: &[crate::probes::AppProbe],
    workload: &str,
) -> Container {
    Container {
        name: names::PROXY_CONTAINER.to_owned(),
        image: Some(overrides.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("tandem-admin".to_owned()),
            container_port: i32::from(names::ADMIN_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(proxy_env(overrides, probes, workload)),
        // Up to two minutes to become ready (the config may still be on its way), checked
        // every second so the application starts as soon as the proxy can carry its traffic.
        startup_probe: Some(http_probe("/ready", 1, 120)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(names::PROXY_UID)),
            run_as_group: Some(i64::from(names::PROXY_UID)),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        resources: Some(resources(&overrides.resources)),
        volume_mounts: Some(proxy_mounts(overrides)),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// The ServiceAccount's proxy ConfigMap, optional so the pod starts before the operator has
/// written it (the proxy then passes traffic through and is not ready).
fn config_volume(service_account: &str) -> Volume {
    Volume {
        name: CONFIG_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: names::config_map_name(service_account),
            optional: Some(true),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// A ServiceAccount token for the signer only: audience-bound, so it is worthless to the
/// apiserver and to anyone else who accepts the default audience, and short-lived (the kubelet
/// bounds it to the pod and rewrites it at 80 % of its lifetime).
fn identity_token_volume() -> Volume {
    Volume {
        name: IDENTITY_TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(identity::TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(identity::TOKEN_EXPIRATION_SECONDS),
                    path: identity::TOKEN_FILE.to_owned(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The namespace's trust roots, optional so the pod starts before the operator has written
/// them (the kubelet fills the volume in once the ConfigMap exists).
fn trust_roots_volume() -> Volume {
    Volume {
        name: TRUST_ROOTS_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: identity::TRUST_ROOTS_CONFIG_MAP.to_owned(),
            optional: Some(true),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn xtables_lock_volume() -> Volume {
    Volume {
        name: XTABLES_LOCK_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(names::ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

fn resources(resources: &ProxyResources) -> ResourceRequirements {
    let pick = |pairs: [(&str, &Option<Quantity>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(key, value)| value.clone().map(|value| (key.to_owned(), value)))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: pick([
            ("cpu", &resources.cpu_request),
            ("memory", &resources.memory_request),
        ]),
        limits: pick([
            ("cpu", &resources.cpu_limit),
            ("memory", &resources.memory_limit),
        ]),
        ..ResourceRequirements::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), Quantity((*value).to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn app() -> serde_json::Value {
        serde_json::json!({"containers": [{"name": "app", "image": "app:1"}]})
    }

    #[test]
    fn a_pod_labelled_disabled_is_opted_out() {
        let labelled = pod(serde_json::json!({
            "metadata": {"labels": {"tandem.dev/inject": "disabled"}}, "spec": app()
        }));
        let decision = inject(&labelled, "shop", &InjectConfig::default()).unwrap();
        assert_eq!(decision, Decision::Skip(SkipReason::OptedOut));
    }

    #[test]
    fn the_system_namespace_is_the_reason_reported_first() {
        let host = pod(serde_json::json!({
            "metadata": {"annotations": {"tandem.dev/inject": "disabled"}},
            "spec": {"hostNetwork": true, "containers": [{"name": "app"}]}
        }));
        let decision = inject(&host, "kube-system", &InjectConfig::default()).unwrap();
        assert_eq!(decision, Decision::Skip(SkipReason::SystemNamespace));
    }

    #[test]
    fn a_volume_named_like_ours_is_refused_rather_than_shadowed() {
        let clash = pod(serde_json::json!({"spec": {
            "containers": [{"name": "app"}], "volumes": [{"name": "tandem-config", "emptyDir": {}}]
        }}));
        let error = inject(&clash, "shop", &InjectConfig::default()).unwrap_err();
        assert_eq!(
            error,
            InjectError::VolumeConflict {
                name: "tandem-config".into()
            }
        );
    }

    #[test]
    fn a_pod_without_a_spec_is_refused() {
        let empty = pod(serde_json::json!({"metadata": {"name": "x"}}));
        assert_eq!(
            inject(&empty, "shop", &InjectConfig::default()),
            Err(InjectError::NoSpec)
        );
    }

    #[test]
    fn the_proxy_is_told_its_workload_and_a_pod_that_names_nothing_leaves_the_default() {
        let overrides = crate::overrides::resolve(None, &InjectConfig::default()).unwrap();
        let workload = |name: &str| {
            proxy_env(&overrides, &[], name)
                .into_iter()
                .find(|e| e.name == env::WORKLOAD_NAME)
                .and_then(|e| e.value)
        };
        assert_eq!(workload("reviews-v1").as_deref(), Some("reviews-v1"));
        assert_eq!(workload(""), None);
    }

    #[test]
    fn the_access_log_annotation_reaches_the_proxy_and_its_absence_leaves_the_default() {
        let env_of = |overrides: &Overrides| -> Vec<(String, Option<String>)> {
            proxy_env(overrides, &[], "web")
                .into_iter()
                .map(|e| (e.name, e.value))
                .collect()
        };
        let mut overrides = crate::overrides::resolve(None, &InjectConfig::default()).unwrap();
        assert!(!env_of(&overrides).iter().any(|(n, _)| n == env::ACCESS_LOG));
        overrides.access_log = Some("off".into());
        assert!(env_of(&overrides).contains(&(env::ACCESS_LOG.to_owned(), Some("off".to_owned()))));
    }
}
