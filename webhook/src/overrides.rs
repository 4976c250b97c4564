//! Per-pod knobs: `tandem.dev/<knob>` annotations, validated before anything is injected.
//!
//! A pod whose annotation cannot be understood is refused with a message naming the
//! annotation, rather than meshed with a guess: a mistyped exclusion would otherwise capture
//! (or leak) traffic the user meant to treat differently.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use regex::Regex;
use std::sync::LazyLock;
use tandem_init::PortRange;

use crate::config::{IdentityConfig, InjectConfig, ProxyResources};

/// Inbound ports (and ranges, `9000-9100`) that reach the application directly.
pub const SKIP_INBOUND_PORTS: &str = "tandem.dev/skip-inbound-ports";
/// Outbound ports (and ranges) the application reaches directly.
pub const SKIP_OUTBOUND_PORTS: &str = "tandem.dev/skip-outbound-ports";
/// Outbound networks (CIDRs or addresses) the application reaches directly.
pub const SKIP_OUTBOUND_CIDRS: &str = "tandem.dev/skip-outbound-cidrs";
/// The proxy image, instead of the webhook's default.
pub const PROXY_IMAGE: &str = "tandem.dev/proxy-image";
/// The proxy's log level (`info`, `debug`, or a filter like `info,tandem_proxy=debug`).
pub const LOG_LEVEL: &str = "tandem.dev/log-level";
/// The proxy's access log: `json` (one line per HTTP request, the proxy's default) or `off`.
pub const ACCESS_LOG: &str = "tandem.dev/access-log";
/// The values [`ACCESS_LOG`] takes (the proxy's `--access-log`).
const ACCESS_LOG_VALUES: [&str; 2] = ["json", "off"];
/// The proxy's CPU request.
pub const PROXY_CPU_REQUEST: &str = "tandem.dev/proxy-cpu-request";
/// The proxy's CPU limit.
pub const PROXY_CPU_LIMIT: &str = "tandem.dev/proxy-cpu-limit";
/// The proxy's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "tandem.dev/proxy-memory-request";
/// The proxy's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "tandem.dev/proxy-memory-limit";
/// Workload identity for this pod: `enabled` (the default when the webhook has identity on)
/// or `disabled` (no token, no trust roots, no signer address: the proxy speaks no mutual TLS).
pub const IDENTITY: &str = "tandem.dev/identity";

/// A `tandem.dev/*` annotation that could not be understood.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("annotation {key}={value:?} is invalid: {reason}")]
pub struct InvalidAnnotation {
    /// The annotation key.
    pub key: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The resolved per-pod settings: the webhook's defaults with the pod's annotations applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Overrides {
    /// Inbound ports not captured.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports not captured.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound networks not captured.
    pub skip_outbound_cidrs: Vec<IpNet>,
    /// The proxy image.
    pub proxy_image: String,
    /// The proxy's log filter.
    pub log_level: String,
    /// The proxy's access log, when the pod chose one (`None`: the proxy's default).
    pub access_log: Option<String>,
    /// The proxy's requests and limits.
    pub resources: ProxyResources,
    /// The signer to bootstrap identity from; `None` when the webhook has identity off or the
    /// pod opted out.
    pub identity: Option<IdentityConfig>,
}

/// Reads the pod's annotations over the defaults in `config`.
pub fn resolve(
    annotations: Option<&BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<Overrides, InvalidAnnotation> {
    let empty = BTreeMap::new();
    let annotations = annotations.unwrap_or(&empty);
    let get = |key: &'static str| annotations.get(key).map(|value| (key, value.trim()));
    let invalid = |key: &str, value: &str, reason: String| InvalidAnnotation {
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };

    let ports = |key: &'static str| match get(key) {
        Some((key, value)) => tandem_init::parse_port_list(value)
            .map_err(|error| invalid(key, value, error.to_string())),
        None => Ok(Vec::new()),
    };
    let skip_inbound_ports = ports(SKIP_INBOUND_PORTS)?;
    let skip_outbound_ports = ports(SKIP_OUTBOUND_PORTS)?;
    let skip_outbound_cidrs = match get(SKIP_OUTBOUND_CIDRS) {
        Some((key, value)) => tandem_init::parse_cidr_list(value)
            .map_err(|error| invalid(key, value, error.to_string()))?,
        None => Vec::new(),
    };

    let proxy_image = match get(PROXY_IMAGE) {
        Some((key, value)) if !is_image_reference(value) => {
            return Err(invalid(
                key,
                value,
                "expected an image reference like registry/tandem-proxy:1.0".into(),
            ));
        }
        Some((_, value)) => value.to_owned(),
        None => config.proxy_image.clone(),
    };
    let log_level = match get(LOG_LEVEL) {
        Some((key, value)) if !is_log_filter(value) => {
            return Err(invalid(
                key,
                value,
                "expected a level like info or a filter like info,tandem_proxy=debug".into(),
            ));
        }
        Some((_, value)) => value.to_owned(),
        None => config.log_level.clone(),
    };
    let access_log = match get(ACCESS_LOG) {
        Some((key, value)) if !ACCESS_LOG_VALUES.contains(&value) => {
            return Err(invalid(key, value, "expected json or off".into()));
        }
        Some((_, value)) => Some(value.to_owned()),
        None => None,
    };

    let quantity = |key: &'static str, default: &Option<Quantity>| match get(key) {
        Some((key, value)) if !is_quantity(value) => Err(invalid(
            key,
            value,
            "expected a Kubernetes quantity like 100m or 64Mi".into(),
        )),
        Some((_, value)) => Ok(Some(Quantity(value.to_owned()))),
        None => Ok(default.clone()),
    };
    let defaults = &config.resources;
    let resources = ProxyResources {
        cpu_request: quantity(PROXY_CPU_REQUEST, &defaults.cpu_request)?,
        cpu_limit: quantity(PROXY_CPU_LIMIT, &defaults.cpu_limit)?,
        memory_request: quantity(PROXY_MEMORY_REQUEST, &defaults.memory_request)?,
        memory_limit: quantity(PROXY_MEMORY_LIMIT, &defaults.memory_limit)?,
    };
    let identity = match get(IDENTITY) {
        Some((_, "enabled")) | None => config.identity.clone(),
        Some((_, "disabled")) => None,
        Some((key, value)) => {
            return Err(invalid(key, value, "expected enabled or disabled".into()));
        }
    };

    Ok(Overrides {
        skip_inbound_ports,
        skip_outbound_ports,
        skip_outbound_cidrs,
        proxy_image,
        log_level,
        access_log,
        resources,
        identity,
    })
}

/// A container image reference: no whitespace, no control characters, a sane length.
pub fn is_image_reference(value: &str) -> bool {
    static IMAGE: LazyLock<Option<Regex>> =
        LazyLock::new(|| Regex::new(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$").ok());
    IMAGE.as_ref().is_some_and(|re| re.is_match(value))
}

/// A tracing filter: levels, targets, `=`, `,` and `::`.
fn is_log_filter(value: &str) -> bool {
    static FILTER: LazyLock<Option<Regex>> =
        LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_:=,.\-]{1,256}$").ok());
    FILTER.as_ref().is_some_and(|re| re.is_match(value))
}

/// The Kubernetes quantity grammar (apimachinery `resource.ParseQuantity`).
pub fn is_quantity(value: &str) -> bool {
    static QUANTITY: LazyLock<Option<Regex>> = LazyLock::new(|| {
        Regex::new(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$").ok()
    });
    QUANTITY.as_ref().is_some_and(|re| re.is_match(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_annotations_give_the_defaults() {
        let config = InjectConfig::default();
        let overrides = resolve(None, &config).unwrap();
        assert_eq!(overrides.proxy_image, config.proxy_image);
        assert_eq!(overrides.resources, config.resources);
        assert!(overrides.skip_outbound_cidrs.is_empty());
        assert_eq!(overrides.access_log, None);
    }

    #[test]
    fn annotations_override_the_defaults() {
        let pod = annotations(&[
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/8, 169.254.169.254"),
            (PROXY_IMAGE, "registry.local/tandem-proxy:dev"),
            (LOG_LEVEL, "info,tandem_proxy=debug"),
            (ACCESS_LOG, "off"),
            (PROXY_MEMORY_LIMIT, "256Mi"),
            (PROXY_CPU_REQUEST, "0.5"),
        ]);
        let overrides = resolve(Some(&pod), &InjectConfig::default()).unwrap();
        assert_eq!(overrides.skip_outbound_cidrs.len(), 2);
        assert_eq!(overrides.proxy_image, "registry.local/tandem-proxy:dev");
        assert_eq!(overrides.log_level, "info,tandem_proxy=debug");
        assert_eq!(overrides.access_log.as_deref(), Some("off"));
        assert_eq!(
            overrides.resources.memory_limit,
            Some(Quantity("256Mi".into()))
        );
        assert_eq!(
            overrides.resources.cpu_request,
            Some(Quantity("0.5".into()))
        );
    }

    #[test]
    fn a_bad_annotation_is_refused_naming_the_key_and_value() {
        for (key, value) in [
            (SKIP_INBOUND_PORTS, "80,http"),
            (SKIP_OUTBOUND_PORTS, "99999"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/40"),
            (PROXY_IMAGE, "bad image"),
            (LOG_LEVEL, "info; rm -rf /"),
            (ACCESS_LOG, "apache"),
            (PROXY_MEMORY_LIMIT, "lots"),
            (IDENTITY, "off"),
        ] {
            let error = resolve(
                Some(&annotations(&[(key, value)])),
                &InjectConfig::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(error.contains(key) && error.contains(value), "{error}");
        }
    }

    #[test]
    fn identity_is_the_webhooks_unless_the_pod_opts_out() {
        let config = InjectConfig::default();
        let on = |pairs: &[(&str, &str)]| {
            resolve(Some(&annotations(pairs)), &config)
                .unwrap()
                .identity
                .is_some()
        };
        assert!(on(&[]));
        assert!(on(&[(IDENTITY, "enabled")]));
        assert!(!on(&[(IDENTITY, " disabled ")]));
        let off = InjectConfig {
            identity: None,
            ..InjectConfig::default()
        };
        let enabled = annotations(&[(IDENTITY, "enabled")]);
        assert_eq!(
            resolve(Some(&enabled), &off).unwrap().identity,
            None,
            "a pod cannot turn on what the webhook has off"
        );
    }

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for good in ["100m", "1", "0.5", "64Mi", "1Gi", "1e3", ".5", "2k"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "m", "1.2.3", "-1", "64MB", "1 Gi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
