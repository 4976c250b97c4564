//! What every component reads from a Pod the same way (feature `kube`): whether the proxy is
//! injected, which ServiceAccount the pod runs as, whether a Service selects it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Service};

use crate::names::PROXY_CONTAINER;

/// The `tandem-proxy` native sidecar the webhook injected, if the pod has one.
pub fn proxy_container(pod: &Pod) -> Option<&Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == PROXY_CONTAINER)
}

/// Whether the pod carries the Tandem proxy.
pub fn is_injected(pod: &Pod) -> bool {
    proxy_container(pod).is_some()
}

/// The pod's ServiceAccount (`default` when the spec names none).
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|name| !name.is_empty())
        .unwrap_or("default")
}

/// Whether `service`'s selector picks `pod` (labels only; namespaces are the caller's
/// business). A Service without a selector, or with an empty one, selects no pods: its
/// endpoints are managed by hand.
pub fn selects(service: &Service, pod: &Pod) -> bool {
    let selector: Option<&BTreeMap<String, String>> =
        service.spec.as_ref().and_then(|s| s.selector.as_ref());
    let labels = pod.metadata.labels.as_ref();
    selector.is_some_and(|selector| {
        !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn injection_service_account_and_selection() {
        let injected = pod(json!({
            "metadata": {"name": "a", "labels": {"app": "web", "v": "1"}},
            "spec": {"serviceAccountName": "web", "containers": [],
                     "initContainers": [{"name": "tandem-init"}, {"name": "tandem-proxy"}]}
        }));
        let plain = pod(json!({"metadata": {"name": "b"}, "spec": {"containers": []}}));
        assert!(is_injected(&injected));
        assert!(!is_injected(&plain));
        assert_eq!(service_account(&injected), "web");
        assert_eq!(service_account(&plain), "default");
        let service = |selector: serde_json::Value| -> Service {
            serde_json::from_value(
                json!({"metadata": {"name": "s"}, "spec": {"selector": selector}}),
            )
            .unwrap()
        };
        assert!(selects(&service(json!({"app": "web"})), &injected));
        assert!(!selects(
            &service(json!({"app": "web", "v": "2"})),
            &injected
        ));
        assert!(!selects(&service(json!({})), &injected));
        assert!(!selects(&service(json!({"app": "web"})), &plain));
    }
}
