//! Names, ports and identifiers fixed by DESIGN.md. Every crate takes them from here so that a
//! change is made once.

/// The API group of Tandem's policy CRDs.
pub const API_GROUP: &str = "tandem.dev";
/// The served and stored version of the policy CRDs.
pub const API_VERSION: &str = "v1alpha1";

/// Label (on a namespace or a pod) that turns injection on; its value must be [`INJECT_ENABLED`].
pub const INJECT_LABEL: &str = "tandem.dev/inject";
/// Value of [`INJECT_LABEL`] that enables injection.
pub const INJECT_ENABLED: &str = "enabled";
/// Pod annotation that opts a pod out when set to [`INJECT_DISABLED`].
pub const INJECT_ANNOTATION: &str = "tandem.dev/inject";
/// Value of [`INJECT_ANNOTATION`] that disables injection.
pub const INJECT_DISABLED: &str = "disabled";
/// Annotation stamped on every injected pod with the proxy version.
pub const PROXY_VERSION_ANNOTATION: &str = "tandem.dev/proxy-version";
/// Annotation the webhook records on every injected pod: its ServiceAccount
/// (`spec.serviceAccountName`, or `default`), so the operator can watch pods through their
/// metadata only. The operator uses the same key on a proxy ConfigMap to name its workload.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "tandem.dev/service-account";
/// Annotation the webhook records on every injected pod: the named TCP ports of its app
/// containers, `name=port` comma-separated and sorted by name (empty when there are none). A
/// Service's named `targetPort` resolves through them without the pod's spec.
pub const CONTAINER_PORTS_ANNOTATION: &str = "tandem.dev/container-ports";

/// Name of the init container that programs iptables.
pub const INIT_CONTAINER: &str = "tandem-init";
/// Name of the sidecar container (a native sidecar: an init container with restartPolicy Always).
pub const PROXY_CONTAINER: &str = "tandem-proxy";

/// UID and GID the proxy runs as; iptables exempts this UID from capture.
pub const PROXY_UID: u32 = 2102;
/// Outbound capture port: the application's outgoing TCP is redirected here.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound capture port: TCP arriving at the pod is redirected here.
pub const INBOUND_PORT: u16 = 15006;
/// Admin port: `/live`, `/ready`, `/metrics`, `/config`. Never captured.
pub const ADMIN_PORT: u16 = 15020;

/// Namespace annotation choosing the default authorization policy of its workloads
/// (`all-unauthenticated`, `all-authenticated`, `cluster-authenticated`, `deny`); without it the
/// operator's `--default-policy` applies.
pub const DEFAULT_POLICY_ANNOTATION: &str = "tandem.dev/default-policy";
/// Response header on a request the inbound proxy refused: the denying AuthorizationPolicy
/// (`<namespace>/<name>`), the Allow policies none of which matched, or `default:<policy>`.
pub const DENIED_BY_HEADER: &str = "tandem-denied-by";

/// Pod annotation naming the Services the pod calls, so its config carries them from the start
/// (see [`crate::dependencies`]): `<service>`, `<namespace>/<service>` or `<namespace>/*`,
/// separated by commas or spaces. Services it is seen calling are added anyway (on-demand
/// discovery); the annotation only saves the first calls the pass-through.
pub const DEPENDENCIES_ANNOTATION: &str = "tandem.dev/dependencies";

/// Directory where the proxy's ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/tandem";
/// Key of the proxy config inside the ConfigMap, and file name inside [`CONFIG_DIR`].
pub const CONFIG_KEY: &str = "config.json";
/// Prefix of the per-ServiceAccount ConfigMap name (`tandem-proxy-<serviceAccount>`).
pub const CONFIG_MAP_PREFIX: &str = "tandem-proxy-";

/// Namespace the control plane runs in.
pub const SYSTEM_NAMESPACE: &str = "tandem-system";
/// Field manager for the operator's server-side apply.
pub const OPERATOR_FIELD_MANAGER: &str = "tandem-operator";

/// Namespaces whose pods are never injected.
pub const NEVER_INJECTED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    SYSTEM_NAMESPACE,
];

/// Longest name a ConfigMap may have (a DNS subdomain).
const MAX_CONFIG_MAP_NAME: usize = 253;

/// The ConfigMap holding the proxy config for pods running as `service_account`.
///
/// A name too long for a ConfigMap is cut and suffixed with a short hash of the full name, so
/// two long ServiceAccount names that share a prefix still get distinct ConfigMaps.
pub fn config_map_name(service_account: &str) -> String {
    let full = format!("{CONFIG_MAP_PREFIX}{service_account}");
    if full.len() <= MAX_CONFIG_MAP_NAME {
        return full;
    }
    let suffix = format!("-{:08x}", fnv1a32(full.as_bytes()));
    let mut cut = MAX_CONFIG_MAP_NAME - suffix.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = full[..cut].trim_end_matches(['-', '.']);
    format!("{head}{suffix}")
}

/// FNV-1a: a stable, dependency-free hash. Stability across releases matters more here than
/// strength, because the webhook and the operator must derive the same name independently.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_prefixed_only() {
        assert_eq!(config_map_name("default"), "tandem-proxy-default");
    }

    #[test]
    fn long_names_are_cut_and_hashed_distinctly() {
        let a = config_map_name(&"a".repeat(300));
        let b = config_map_name(&format!("{}b", "a".repeat(299)));
        assert!(a.len() <= MAX_CONFIG_MAP_NAME);
        assert!(b.len() <= MAX_CONFIG_MAP_NAME);
        assert_ne!(a, b);
        assert!(a.starts_with("tandem-proxy-aaa"));
    }
}
