//! The cluster's objects: namespaces, Services with EndpointSlices and (some) TrafficPolicies,
//! ServiceAccounts with injected pods naming their dependencies, and a projected token for
//! each pod. Pods are objects only: nothing runs them; the simulated fleet plays their proxies.

use std::collections::BTreeSet;

use futures::{StreamExt, stream};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tandem_crds::names::{
    CONTAINER_PORTS_ANNOTATION, DEPENDENCIES_ANNOTATION, PROXY_VERSION_ANNOTATION,
    SERVICE_ACCOUNT_ANNOTATION,
};
use tandem_crds::v1alpha1::TrafficPolicy;

use super::scale::{self, GATEWAYS, Scale};
use super::support::{apply, endpoints, service};

/// Requests in flight to the apiserver while creating.
const CONCURRENCY: usize = 32;

/// One injected pod, as its proxy would know itself.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
    /// Its workload's index (`sa-<w>`), or `None` for a gateway.
    pub workload: Option<usize>,
    /// Its projected token (audience `tandem`, bound to the pod).
    pub token: String,
}

/// Creates the namespaces and every Service with its endpoints and policy.
pub async fn services(client: &Client, scale: &Scale) {
    for n in 0..scale.namespaces {
        apply::<Namespace>(
            client,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": scale::namespace(n)}}),
        )
        .await;
    }
    stream::iter(0..scale.services)
        .for_each_concurrent(CONCURRENCY, |i| async move {
            let ns = scale.service_namespace(i);
            let name = format!("svc-{i}");
            service(
                client,
                &ns,
                &name,
                json!([{"name": "http", "port": 80, "targetPort": 8080}]),
            )
            .await;
            let ips = endpoint_ips(scale, i, 0);
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            endpoints(client, &ns, &name, 8080, &refs).await;
            if scale.has_policy(i) {
                policy(client, scale, i, 2).await;
            }
        })
        .await;
}

/// The ready endpoints of Service `i`; `extra` more than the usual count (an endpoint change).
pub fn endpoint_ips(scale: &Scale, i: usize, extra: usize) -> Vec<String> {
    (0..scale.endpoints_per_service + extra)
        .map(|e| format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1))
        .collect()
}

/// A TrafficPolicy `tp-<i>` on `svc-<i>` with one retrying rule of `attempts`.
pub async fn policy(client: &Client, scale: &Scale, i: usize, attempts: u32) {
    apply::<TrafficPolicy>(
        client,
        Some(&scale.service_namespace(i)),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": format!("tp-{i}"), "namespace": scale.service_namespace(i)},
            "spec": {"targetRef": {"name": format!("svc-{i}")},
                     "rules": [{"name": "api", "matches": [{"path": {"value": "/api"}}],
                                "timeout": "2s", "retries": {"attempts": attempts}}]}
        }),
    )
    .await;
}

/// The workloads (`sa-<w>` with their pods, annotated with `dependencies[w]`) and the gateways
/// (`gateway-<g>` in `bench-0`, one pod each, depending on every namespace). Returns the pods
/// with a token each.
pub async fn workloads(
    client: &Client,
    scale: &Scale,
    dependencies: &[BTreeSet<usize>],
) -> Vec<Member> {
    // (namespace, pod, ServiceAccount, workload, annotation)
    let mut plans: Vec<(String, String, String, Option<usize>, String)> = Vec::new();
    for (w, services) in dependencies.iter().enumerate() {
        let ns = scale.workload_namespace(w);
        let annotation = scale::annotation(scale, &ns, services);
        for p in 0..scale.pods_per_service_account {
            let sa = format!("sa-{w}");
            plans.push((
                ns.clone(),
                format!("{sa}-{p}"),
                sa,
                Some(w),
                annotation.clone(),
            ));
        }
    }
    for g in 0..GATEWAYS {
        let sa = format!("gateway-{g}");
        let annotation = scale::gateway_annotation(scale);
        plans.push((scale::namespace(0), format!("{sa}-0"), sa, None, annotation));
    }
    let accounts: BTreeSet<(String, String)> = plans
        .iter()
        .map(|(ns, _, sa, _, _)| (ns.clone(), sa.clone()))
        .collect();
    stream::iter(accounts)
        .for_each_concurrent(CONCURRENCY, |(ns, sa)| async move {
            apply::<ServiceAccount>(
                client,
                Some(&ns),
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}}),
            )
            .await;
        })
        .await;
    stream::iter(plans)
        .map(|(ns, pod, sa, workload, annotation)| async move {
            let created = injected_pod(client, &ns, &pod, &sa, &annotation).await;
            let token = token(client, &ns, &sa, &created).await;
            Member {
                namespace: ns,
                pod,
                workload,
                token,
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// A pod with the proxy injected (as the webhook leaves it) and the dependencies annotation.
async fn injected_pod(client: &Client, ns: &str, name: &str, sa: &str, dependencies: &str) -> Pod {
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            // The annotations the webhook writes: its mark of injection, and what the
            // operator's metadata-only pod watch reads instead of the spec.
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {DEPENDENCIES_ANNOTATION: dependencies,
                                         PROXY_VERSION_ANNOTATION: "bench",
                                         SERVICE_ACCOUNT_ANNOTATION: sa,
                                         CONTAINER_PORTS_ANNOTATION: ""}},
            "spec": {
                "serviceAccountName": sa,
                "automountServiceAccountToken": false,
                "initContainers": [
                    {"name": "tandem-init", "image": "tandem/proxy:dev"},
                    {"name": "tandem-proxy", "image": "tandem/proxy:dev", "restartPolicy": "Always"}
                ],
                "containers": [{"name": "app", "image": "app:dev"}]
            }
        }),
    )
    .await
}

/// A projected-style token for the pod's ServiceAccount, audience `tandem`, bound to the pod:
/// what the kubelet mounts for the proxy. An hour outlives the run's budget.
async fn token(client: &Client, ns: &str, sa: &str, pod: &Pod) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["tandem".to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let created: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("token for {ns}/{sa}: {e}"));
    created.status.expect("token status").token
}
