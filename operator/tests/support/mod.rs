//! What the operator's cluster tests share: a real control plane with the CRDs and the
//! operator's RBAC installed, operators run as processes with their own ServiceAccount's token,
//! and fixtures for Services, EndpointSlices, injected pods and policies.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tandem_crds::contract::ProxyConfig;
use tandem_crds::names::{
    CONTAINER_PORTS_ANNOTATION, DEPENDENCIES_ANNOTATION, PROXY_VERSION_ANNOTATION,
    SERVICE_ACCOUNT_ANNOTATION,
};
use tandem_crds::v1alpha1::{CircuitBreakerPolicy, TrafficPolicy};
use tandem_tests::process::{Supervised, free_port};
use tandem_tests::{ControlPlane, ControlPlaneOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long anything the operator does may take in these tests (generous: the machine is
/// shared; the claims about speed live in the benchmark).
pub const PATIENCE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A control plane with Tandem's CRDs, namespace and operator RBAC.
pub async fn cluster() -> ControlPlane {
    let cluster = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let client = cluster.client();
    for file in [
        "trafficpolicies.yaml",
        "circuitbreakerpolicies.yaml",
        "authorizationpolicies.yaml",
    ] {
        let text =
            std::fs::read_to_string(repo().join("manifests/crds").join(file)).expect("read CRD");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parse CRD");
        let name = crd.metadata.name.clone().expect("CRD name");
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        api.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
        eventually(&format!("CRD {name} established"), || async {
            api.get(&name).await.ok().is_some_and(|crd| {
                crd.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
        })
        .await;
    }
    apply_file(&client, &repo().join("manifests/operator/namespace.yaml")).await;
    apply_file(&client, &repo().join("manifests/operator/rbac.yaml")).await;
    cluster
}

/// Creates every document of a manifest file (the kinds the operator's manifests use).
pub async fn apply_file(client: &Client, path: &Path) {
    let text = std::fs::read_to_string(path).expect("read manifest");
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document).expect("parse manifest");
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_owned);
        match kind.as_str() {
            "Namespace" => create::<Namespace>(client, None, value).await,
            "ServiceAccount" => create::<ServiceAccount>(client, namespace, value).await,
            "ClusterRole" => create::<ClusterRole>(client, None, value).await,
            "ClusterRoleBinding" => create::<ClusterRoleBinding>(client, None, value).await,
            "Role" => create::<Role>(client, namespace, value).await,
            "RoleBinding" => create::<RoleBinding>(client, namespace, value).await,
            other => panic!("apply_file: unexpected kind {other}"),
        }
    }
}

async fn create<K>(client: &Client, namespace: Option<String>, value: Value)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: DynamicObject = serde_json::from_value(value).expect("manifest object");
    dynamic_api::<K>(client, namespace.as_deref())
        .create(&PostParams::default(), &object)
        .await
        .expect("create manifest object");
}

/// Polls `check` every 100 ms until it holds or [`PATIENCE`] runs out.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {PATIENCE:?} waiting for {what}");
}

/// A `tandem-operator` process authenticated as ServiceAccount tandem-system/tandem-operator,
/// so it runs with exactly the rights manifests/operator/rbac.yaml grants.
pub struct Operator {
    /// The process.
    pub process: Supervised,
    /// Its identity in the Lease.
    pub identity: String,
    /// Its `/metrics` port.
    pub port: u16,
    /// Its identity signer's port (HTTPS).
    pub identity_port: u16,
}

impl Operator {
    /// Starts an operator named `identity`.
    pub async fn start(cluster: &ControlPlane, identity: &str) -> Self {
        let kubeconfig = cluster.dir().join(format!("{identity}.kubeconfig"));
        cluster
            .service_account_kubeconfig(
                "tandem-system",
                "tandem-operator",
                Duration::from_secs(3600),
                &kubeconfig,
            )
            .await
            .expect("operator kubeconfig");
        let port = free_port().expect("free port");
        let identity_port = free_port().expect("free port");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tandem-operator"));
        command
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", "tandem-system")
            .env("TANDEM_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "TANDEM_IDENTITY_LISTEN",
                format!("127.0.0.1:{identity_port}"),
            )
            .env("RUST_LOG", "info,tandem_operator=debug");
        let log = cluster.dir().join("logs").join(format!("{identity}.log"));
        let process = Supervised::spawn(identity, command, &log).expect("start operator");
        Self {
            process,
            identity: identity.to_owned(),
            port,
            identity_port,
        }
    }

    /// The value of a metric (0 if absent or unreachable).
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok(body) = http_get(self.port, "/metrics").await else {
            return 0.0;
        };
        body.lines()
            .find_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                (key == name).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// The HTTP status of a path.
    pub async fn status_of(&self, path: &str) -> Option<u16> {
        let body = http_get(self.port, path).await.ok()?;
        body.split_whitespace().nth(1)?.parse().ok()
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log()).unwrap_or_default()
    }
}

impl Drop for Operator {
    /// A failing test shows what the operator logged (the cluster's directory goes with it).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of {}'s log ---", self.identity);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0): the whole response, head and body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// Who holds the operator's Lease.
pub async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "tandem-system");
    leases
        .get_opt("tandem-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Applies any object by server-side apply as the test (field manager `tandem-test`).
pub async fn apply<K>(client: &Client, namespace: Option<&str>, value: Value) -> K
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = value["metadata"]["name"].as_str().expect("name").to_owned();
    let applied = dynamic_api::<K>(client, namespace)
        .patch(
            &name,
            &PatchParams::apply("tandem-test").force(),
            &Patch::Apply(&value),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
    let value = serde_json::to_value(applied).expect("serialize");
    serde_json::from_value(value).expect("typed object")
}

/// An API for kind `K`, namespaced or not, through its erased type.
fn dynamic_api<K: Resource<DynamicType = ()>>(
    client: &Client,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<K>(&());
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// A namespace with a ServiceAccount `client` whose pod `client-1` is injected.
pub async fn namespace_with_injected_client(client: &Client, ns: &str) {
    namespace_with_injected_pod(client, ns, "client", "client-1").await;
}

/// A namespace with ServiceAccount `service_account` and its injected pod `pod`.
pub async fn namespace_with_injected_pod(
    client: &Client,
    ns: &str,
    service_account: &str,
    pod: &str,
) -> Pod {
    apply::<Namespace>(
        client,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    apply::<ServiceAccount>(
        client,
        Some(ns),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, "namespace": ns}}),
    )
    .await;
    injected_pod(client, ns, pod, service_account).await
}

/// What the fixtures' injected pods name in `tandem.dev/dependencies`: the canary's target
/// (its backends follow from its routes), so their scoped configs carry the canary.
pub const DEFAULT_DEPENDENCIES: &str = "server";

/// A pod with the proxy injected (as the webhook leaves it). Nothing runs it: the operator
/// only reads the object.
pub async fn injected_pod(client: &Client, ns: &str, name: &str, service_account: &str) -> Pod {
    labelled_injected_pod(client, ns, name, service_account, json!({}), json!([])).await
}

/// [`injected_pod`] with labels (for Service selectors) and its app container's ports.
pub async fn labelled_injected_pod(
    client: &Client,
    ns: &str,
    name: &str,
    service_account: &str,
    labels: Value,
    ports: Value,
) -> Pod {
    let mut pod = injected_pod_by_older_webhook(ns, name, service_account, labels, ports);
    // What the webhook records for the operator's metadata-only pod watch.
    let typed: Pod = serde_json::from_value(pod.clone()).expect("a pod");
    let annotations = &mut pod["metadata"]["annotations"];
    annotations[SERVICE_ACCOUNT_ANNOTATION] = service_account.into();
    annotations[CONTAINER_PORTS_ANNOTATION] = tandem_crds::pods::recorded_ports(&typed).into();
    apply(client, Some(ns), pod).await
}

/// An injected pod as a webhook older than the metadata-only pod watch left it: the proxy and
/// its version mark, but no recorded ServiceAccount or container ports.
pub fn injected_pod_by_older_webhook(
    ns: &str,
    name: &str,
    service_account: &str,
    labels: Value,
    ports: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {DEPENDENCIES_ANNOTATION: DEFAULT_DEPENDENCIES,
                                     PROXY_VERSION_ANNOTATION: "0.1.0"}},
        "spec": {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "initContainers": [
                {"name": "tandem-init", "image": "tandem/proxy:dev"},
                {"name": "tandem-proxy", "image": "tandem/proxy:dev", "restartPolicy": "Always"}
            ],
            "containers": [{"name": "app", "image": "app:dev", "ports": ports}]
        }
    })
}

/// A Service without selector (so the EndpointSlice controller leaves our slices alone).
pub async fn service(client: &Client, ns: &str, name: &str, ports: Value) -> Service {
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": ports}
        }),
    )
    .await
}

/// An EndpointSlice for `service` with ready endpoints `ips` on port `http` → `target_port`.
pub async fn endpoints(
    client: &Client,
    ns: &str,
    service: &str,
    target_port: u16,
    ips: &[&str],
) -> EndpointSlice {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-test"), "namespace": ns,
                "labels": {"kubernetes.io/service-name": service,
                           "endpointslice.kubernetes.io/managed-by": "tandem-test"}
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}],
            "endpoints": endpoints
        }),
    )
    .await
}

/// A canary TrafficPolicy on `server` splitting `v1`/`v2`.
pub async fn canary(client: &Client, ns: &str, name: &str, v1: u32, v2: u32) -> TrafficPolicy {
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "targetRef": {"kind": "Service", "name": "server"},
                "rules": [{"name": "canary", "backends": [
                    {"name": "server-v1", "port": 80, "weight": v1},
                    {"name": "server-v2", "port": 80, "weight": v2}
                ]}]
            }
        }),
    )
    .await
}

/// The three Services of the canary, with endpoints for both versions.
pub async fn canary_services(client: &Client, ns: &str) {
    for name in ["server", "server-v1", "server-v2"] {
        service(
            client,
            ns,
            name,
            json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        )
        .await;
    }
    endpoints(client, ns, "server-v1", 8080, &["10.244.0.11"]).await;
    endpoints(client, ns, "server-v2", 8080, &["10.244.0.21"]).await;
}

/// The config in ConfigMap `tandem-proxy-<sa>`, if present.
pub async fn proxy_config(client: &Client, ns: &str, sa: &str) -> Option<(ProxyConfig, String)> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api
        .get_opt(&tandem_crds::names::config_map_name(sa))
        .await
        .ok()
        .flatten()?;
    let json = cm.data?.get("config.json")?.clone();
    let config =
        ProxyConfig::from_json(json.as_bytes()).expect("the operator writes valid configs");
    Some((config, cm.metadata.resource_version.unwrap_or_default()))
}

/// The weights of the first route of `server` in a config.
pub fn canary_weights(config: &ProxyConfig) -> Vec<u32> {
    config
        .services
        .iter()
        .find(|s| s.name == "server")
        .and_then(|s| s.routes.first())
        .map(|r| r.backends.iter().map(|b| b.weight).collect())
        .unwrap_or_default()
}

/// A TrafficPolicy's condition `type_`: (status, reason, observedGeneration).
pub async fn traffic_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, Option<i64>)> {
    let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), ns);
    let policy = api.get_opt(name).await.ok().flatten()?;
    let status = policy.status?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((
        format!("{:?}", c.status),
        c.reason.clone(),
        status.observed_generation,
    ))
}

/// A CircuitBreakerPolicy's condition `type_`: (status, reason).
pub async fn breaker_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let api: Api<CircuitBreakerPolicy> = Api::namespaced(client.clone(), ns);
    let status = api.get_opt(name).await.ok().flatten()?.status?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((format!("{:?}", c.status), c.reason.clone()))
}

/// The operator's ConfigMaps in `ns`: name → (uid, resourceVersion).
pub async fn config_map_versions(
    client: &Client,
    ns: &str,
) -> std::collections::BTreeMap<String, (String, String)> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(
            &kube::api::ListParams::default()
                .labels("app.kubernetes.io/managed-by=tandem-operator"),
        )
        .await
        .expect("list ConfigMaps");
    list.items
        .into_iter()
        .map(|cm| {
            let meta = cm.metadata;
            (
                meta.name.unwrap_or_default(),
                (
                    meta.uid.unwrap_or_default(),
                    meta.resource_version.unwrap_or_default(),
                ),
            )
        })
        .collect()
}

/// Watches the ConfigMaps of `ns` from now on and records the name of each one deleted.
pub fn record_deletions(
    client: &Client,
    ns: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let deleted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = deleted.clone();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Delete(cm)) = event {
                record
                    .lock()
                    .expect("not poisoned")
                    .push(cm.metadata.name.unwrap_or_default());
            }
        }
    });
    deleted
}

/// Grants (`allowed`) or withdraws the operator's rights on pods in its ClusterRole; returns
/// whether it had them before.
pub async fn set_pod_rights(client: &Client, allowed: bool) -> bool {
    let api: Api<ClusterRole> = Api::all(client.clone());
    let mut role = api
        .get("tandem-operator")
        .await
        .expect("the operator's ClusterRole");
    let rules = role.rules.get_or_insert_with(Vec::new);
    let had = rules
        .iter()
        .any(|r| r.resources.iter().flatten().any(|res| res == "pods"));
    if allowed && !had {
        let core = rules
            .iter_mut()
            .find(|r| r.resources.iter().flatten().any(|res| res == "services"))
            .expect("the rule on core resources");
        core.resources
            .get_or_insert_with(Vec::new)
            .push("pods".to_owned());
    }
    if !allowed {
        for rule in rules.iter_mut() {
            if let Some(resources) = rule.resources.as_mut() {
                resources.retain(|res| res != "pods");
            }
        }
    }
    api.replace("tandem-operator", &PostParams::default(), &role)
        .await
        .expect("update the operator's ClusterRole");
    had
}

/// A projected-style token for `namespace/service_account` with `audience`, bound to `pod`
/// (name, uid) if given: what the kubelet would mount for the proxy.
pub async fn token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let created: TokenRequest = api
        .create_subresource("token", service_account, &PostParams::default(), &request)
        .await
        .expect("request a token");
    created.status.expect("token status").token
}
