//! What every component reads from a Pod the same way (feature `kube`): whether the proxy is
//! injected, which ServiceAccount the pod runs as, whether a Service selects it, and the
//! annotations the webhook records so that the operator can watch pods through their metadata
//! only ([`recorded_ports`], [`from_metadata`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::names::{CONTAINER_PORTS_ANNOTATION, PROXY_CONTAINER, PROXY_VERSION_ANNOTATION};

/// A `tandem.dev/container-ports` value that is not `name=port,...`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{CONTAINER_PORTS_ANNOTATION} entry {entry:?} is not name=port (port 1-65535)")]
pub struct BadPorts {
    /// The entry that could not be read.
    pub entry: String,
}

/// The `tandem-proxy` native sidecar the webhook injected, if the pod has one.
pub fn proxy_container(pod: &Pod) -> Option<&Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == PROXY_CONTAINER)
}

/// Whether the pod carries the Tandem proxy container.
pub fn is_injected(pod: &Pod) -> bool {
    proxy_container(pod).is_some()
}

/// Whether the metadata carries the webhook's mark of injection (`tandem.dev/proxy-version`):
/// all a component that watches pods through their metadata can see of it.
pub fn is_marked_injected(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION))
}

/// The name of the workload a pod belongs to, as Istio derives it for its
/// `*_workload` labels: a ReplicaSet's pod belongs to the Deployment (the ReplicaSet's name
/// without its `-<pod-template-hash>`), a Job's pod to its CronJob when the Job's name is the
/// CronJob's plus a numeric suffix, any other controlled pod to its controller, and a pod with
/// no controller to itself (its name, or its `generateName` without the trailing dash while
/// the apiserver has not named it yet). Empty when the metadata names nothing.
///
/// Works on metadata alone, so the operator's metadata-only pod watch and the webhook's
/// admission request (where the pod has no name yet) agree.
pub fn workload_name(meta: &ObjectMeta) -> String {
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(owner) = controller else {
        return match (&meta.name, &meta.generate_name) {
            (Some(name), _) if !name.is_empty() => name.clone(),
            (_, Some(prefix)) => prefix.trim_end_matches('-').to_owned(),
            _ => String::new(),
        };
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => deployment.to_owned(),
                None => owner.name.clone(),
            }
        }
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron_job, suffix))
                if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron_job.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
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

/// The named TCP ports of the pod's app containers, as the webhook records them in
/// `tandem.dev/container-ports`: `name=port`, comma-separated, sorted by name; empty when
/// there are none.
pub fn recorded_ports(pod: &Pod) -> String {
    named_tcp_ports(pod)
        .iter()
        .map(|(name, port)| format!("{name}={port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The named TCP ports of the pod's app containers, sorted by name.
pub fn named_tcp_ports(pod: &Pod) -> Vec<(&str, u16)> {
    let mut ports: Vec<(&str, u16)> = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let name = p.name.as_deref().filter(|n| !n.is_empty())?;
            let port = u16::try_from(p.container_port).ok().filter(|n| *n != 0)?;
            Some((name, port))
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Reads a `tandem.dev/container-ports` value back (the empty value has no ports).
pub fn parse_recorded_ports(value: &str) -> Result<Vec<(String, u16)>, BadPorts> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let bad = || BadPorts {
                entry: entry.to_owned(),
            };
            let (name, port) = entry.split_once('=').ok_or_else(bad)?;
            let port: u16 = port.trim().parse().map_err(|_| bad())?;
            let name = name.trim();
            if name.is_empty() || port == 0 {
                return Err(bad());
            }
            Ok((name.to_owned(), port))
        })
        .collect()
}

/// The pod as a component that watches only its metadata knows it: the metadata, the
/// ServiceAccount and the named TCP ports (held by one container, since no reader asks which
/// container a port belongs to). [`service_account`] and a Service's named target port read
/// it as they read the full pod; the phase is not known (finished pods are tracked apart).
pub fn from_metadata(metadata: ObjectMeta, service_account: &str, ports: &[(String, u16)]) -> Pod {
    let ports: Vec<ContainerPort> = ports
        .iter()
        .map(|(name, port)| ContainerPort {
            name: Some(name.clone()),
            container_port: i32::from(*port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        })
        .collect();
    Pod {
        metadata,
        spec: Some(PodSpec {
            service_account_name: Some(service_account.to_owned()),
            containers: vec![Container {
                name: "ports".to_owned(),
                ports: (!ports.is_empty()).then_some(ports),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_workload_is_the_controller_with_generated_suffixes_removed() {
        let meta =
            |value: serde_json::Value| -> ObjectMeta { serde_json::from_value(value).unwrap() };
        let owned = |kind: &str, name: &str, labels: serde_json::Value| {
            meta(json!({"name": "p-1", "labels": labels, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Other", "name": "not-the-controller", "uid": "0"},
                {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "1", "controller": true}
            ]}))
        };
        let hash = json!({"pod-template-hash": "7d9f8c"});
        assert_eq!(
            workload_name(&owned("ReplicaSet", "web-v1-7d9f8c", hash.clone())),
            "web-v1"
        );
        // A ReplicaSet not made by a Deployment (no hash label, or another one) is the workload.
        assert_eq!(
            workload_name(&owned("ReplicaSet", "web-v1-7d9f8c", json!({}))),
            "web-v1-7d9f8c"
        );
        assert_eq!(workload_name(&owned("ReplicaSet", "plain", hash)), "plain");
        assert_eq!(workload_name(&owned("StatefulSet", "db", json!({}))), "db");
        assert_eq!(
            workload_name(&owned("Job", "backup-29012345", json!({}))),
            "backup"
        );
        assert_eq!(
            workload_name(&owned("Job", "migrate-schema", json!({}))),
            "migrate-schema"
        );
        assert_eq!(workload_name(&meta(json!({"name": "solo"}))), "solo");
        assert_eq!(
            workload_name(&meta(json!({"generateName": "batch-"}))),
            "batch"
        );
        assert_eq!(workload_name(&ObjectMeta::default()), "");
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

    #[test]
    fn recorded_ports_round_trip_through_the_metadata_view() {
        let full = pod(json!({
            "metadata": {"name": "a", "namespace": "shop",
                         "annotations": {"tandem.dev/proxy-version": "1"}},
            "spec": {"serviceAccountName": "web", "containers": [
                {"name": "b", "ports": [{"name": "web", "containerPort": 8080},
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                        {"containerPort": 9000}]},
                {"name": "a", "ports": [{"name": "admin", "containerPort": 9090,
                                         "protocol": "TCP"}]}
            ]}
        }));
        let recorded = recorded_ports(&full);
        assert_eq!(recorded, "admin=9090,web=8080");
        let ports = parse_recorded_ports(&recorded).unwrap();
        let view = from_metadata(full.metadata.clone(), "web", &ports);
        assert!(is_marked_injected(&view.metadata));
        assert_eq!(service_account(&view), "web");
        assert_eq!(recorded_ports(&view), recorded);
        assert_eq!(parse_recorded_ports(""), Ok(vec![]));
        assert_eq!(
            recorded_ports(&pod(json!({"metadata": {}, "spec": {"containers": []}}))),
            ""
        );
    }

    #[test]
    fn a_bad_recorded_port_is_named() {
        for bad in ["web", "web=", "web=0", "web=70000", "=80", "web=http"] {
            let error = parse_recorded_ports(&format!("ok=1,{bad}")).unwrap_err();
            assert_eq!(error.entry, bad);
            assert!(error.to_string().contains(bad), "{error}");
        }
    }
}
