//! The application's HTTP probes, told to the proxy so that kubelet probes keep working when
//! the workload refuses plaintext (strict mutual TLS).
//!
//! The kubelet is not a meshed client: its probes arrive in plaintext from the node. Istio
//! rewrites every probe to its agent; Linkerd lets unauthenticated requests to the declared
//! probe paths through. Tandem does what Linkerd does, because it leaves the pod's probes as the
//! user wrote them (no rewritten spec to explain): the webhook lists each container's `httpGet`
//! probes (port, path) in [`PROBES_ENV`], and the inbound proxy of a strict workload accepts a
//! plaintext `GET`/`HEAD` to exactly those, and nothing else.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// The proxy's environment variable listing the probes, as JSON
/// (`[{"port":8080,"path":"/healthz"}]`).
pub const PROBES_ENV: &str = "TANDEM_APP_PROBES";

/// One HTTP probe the kubelet sends to the application.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct AppProbe {
    /// The container port probed.
    pub port: u16,
    /// The path probed (query string cut: the proxy matches paths).
    pub path: String,
}

/// Every `httpGet` liveness, readiness and startup probe of the pod's containers and ordinary
/// init containers, with named ports resolved, sorted and without duplicates. A probe whose port
/// cannot be resolved is left out (the kubelet could not send it either).
pub fn app_probes(pod: &Pod) -> Vec<AppProbe> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut probes: Vec<AppProbe> = containers
        .flat_map(|c| container_probes(c).into_iter())
        .collect();
    probes.sort();
    probes.dedup();
    probes
}

/// [`app_probes`] as the JSON value of [`PROBES_ENV`], or `None` when there are none.
pub fn probes_env_value(probes: &[AppProbe]) -> Option<String> {
    if probes.is_empty() {
        return None;
    }
    serde_json::to_string(probes).ok()
}

fn container_probes(container: &Container) -> Vec<AppProbe> {
    [
        &container.liveness_probe,
        &container.readiness_probe,
        &container.startup_probe,
    ]
    .into_iter()
    .flatten()
    .filter_map(|probe: &Probe| probe.http_get.as_ref())
    .filter_map(|get| probe_of(container, get))
    .collect()
}

fn probe_of(container: &Container, get: &HTTPGetAction) -> Option<AppProbe> {
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).ok()?,
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())?,
    };
    let raw = get.path.as_deref().unwrap_or("/");
    let path = raw.split('?').next().unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Some(AppProbe { port, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap_or_default()
    }

    #[test]
    fn named_and_numbered_http_probes_are_listed_once_each() {
        let pod = pod(serde_json::json!({"spec": {"containers": [{
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "livenessProbe": {"httpGet": {"path": "/healthz?deep=1", "port": 8080}},
            "startupProbe": {"tcpSocket": {"port": 8080}}
        }, {
            "name": "admin",
            "livenessProbe": {"httpGet": {"path": "live", "port": 9090}}
        }]}}));
        assert_eq!(
            app_probes(&pod),
            vec![
                AppProbe {
                    port: 8080,
                    path: "/healthz".into()
                },
                AppProbe {
                    port: 9090,
                    path: "/live".into()
                },
            ]
        );
    }

    #[test]
    fn a_probe_on_an_unknown_port_name_is_left_out() {
        let pod = pod(serde_json::json!({"spec": {"containers": [{
            "name": "app",
            "readinessProbe": {"httpGet": {"path": "/", "port": "nope"}}
        }]}}));
        assert!(app_probes(&pod).is_empty());
        assert_eq!(probes_env_value(&app_probes(&pod)), None);
    }

    #[test]
    fn the_env_value_is_json_the_proxy_can_read() {
        let value = probes_env_value(&[AppProbe {
            port: 8080,
            path: "/healthz".into(),
        }]);
        assert_eq!(
            value.as_deref(),
            Some(r#"[{"port":8080,"path":"/healthz"}]"#)
        );
    }
}
