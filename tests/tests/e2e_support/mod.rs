//! What the end-to-end scenarios share: a cluster with Tandem's webhook installed and a node
//! agent running the injected pods.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::json;
use tandem_crds::contract::{ProxyConfig, Workload};
use tandem_tests::node::{Image, Images, NodeAgent, NodeOptions};
use tandem_tests::process::{Supervised, free_port};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

/// The proxy image the webhook injects and the node maps to the built `tandem-proxy`.
pub const PROXY_IMAGE: &str = "tandem-proxy:dev";
/// The test app's image.
pub const TESTAPP_IMAGE: &str = "tandem-testapp:dev";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of another workspace crate: `$ENV` or `target/debug/NAME`, which must exist.
fn workspace_binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug").join(name));
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p {name}) or set {env}",
            path.display()
        );
    }
    Ok(path)
}

/// A control plane, the webhook installed, and a node.
pub struct Mesh {
    pub node: NodeAgent,
    pub webhook: Supervised,
    pub cluster: ControlPlane,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts everything. Needs root (fails, never skips, without it).
    pub async fn start() -> anyhow::Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,kube=warn")
            .with_test_writer()
            .try_init();
        tandem_tests::node::net::require_root()?;
        let proxy = workspace_binary("TANDEM_PROXY_BIN", "tandem-proxy")?;
        let webhook_bin = workspace_binary("TANDEM_WEBHOOK_BIN", "tandem-webhook")?;
        let cluster = ControlPlane::start(ControlPlaneOptions::default()).await?;
        let dir = tempfile::Builder::new().prefix("tandem-e2e-").tempdir()?;

        // The webhook, serving on loopback with a certificate the cluster CA signed.
        let cert = cluster.loopback_serving_cert("tandem-webhook")?;
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, &cert.cert_pem)?;
        std::fs::write(&key_path, &cert.key_pem)?;
        let port = free_port()?;
        let mut command = Command::new(webhook_bin);
        command.args([
            format!("--listen=127.0.0.1:{port}"),
            format!("--tls-cert={}", cert_path.display()),
            format!("--tls-key={}", key_path.display()),
            format!("--proxy-image={PROXY_IMAGE}"),
        ]);
        let webhook =
            Supervised::spawn("tandem-webhook", command, &dir.path().join("webhook.log"))?;
        let ca = base64::engine::general_purpose::STANDARD.encode(cluster.ca_pem());
        let webhook_config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "tandem-webhook"},
            "webhooks": [
                webhook_entry("namespace.inject.tandem.dev", port, &ca,
                    json!({"matchLabels": {"tandem.dev/inject": "enabled"}}),
                    json!({})),
                webhook_entry("pod.inject.tandem.dev", port, &ca,
                    json!({"matchExpressions": [{"key": "tandem.dev/inject", "operator": "NotIn", "values": ["enabled"]}]}),
                    json!({"matchLabels": {"tandem.dev/inject": "enabled"}})),
            ]
        });
        apply_value(&cluster.client(), &webhook_config).await?;

        let mut images = BTreeMap::new();
        images.insert(
            PROXY_IMAGE.to_owned(),
            Image {
                entrypoint: vec!["/usr/local/bin/tandem-proxy".into()],
                cmd: vec!["run".into()],
                user: 2102,
                programs: [("tandem-proxy".to_owned(), proxy)].into(),
            },
        );
        images.insert(
            TESTAPP_IMAGE.to_owned(),
            Image {
                entrypoint: vec!["tandem-testapp".into()],
                cmd: vec![],
                user: 65532,
                programs: [(
                    "tandem-testapp".to_owned(),
                    PathBuf::from(env!("CARGO_BIN_EXE_tandem-testapp")),
                )]
                .into(),
            },
        );
        let node = NodeAgent::start(
            cluster.client(),
            NodeOptions {
                name: "tandem-node".into(),
                dir: dir.path().join("node"),
                images: Images(images),
                shim: PathBuf::from(env!("CARGO_BIN_EXE_tandem-container")),
            },
        )
        .await?;
        Ok(Self {
            node,
            webhook,
            cluster,
            dir,
        })
    }

    /// The tail of every container log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let dir = self.dir.path().join("node/logs");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let tail = tandem_tests::process::log_tail(&entry.path());
            out.push_str(&format!(
                "--- {}\n{}\n",
                entry.file_name().to_string_lossy(),
                tail.lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        out
    }

    /// A client with admin rights.
    pub fn client(&self) -> kube::Client {
        self.cluster.client()
    }

    /// Applies every document of a YAML file, in order (server-side apply).
    pub async fn apply_file(&self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
            if !value.is_null() {
                apply_value(&self.client(), &value).await?;
            }
        }
        Ok(())
    }

    /// Writes the proxy config ConfigMap of a ServiceAccount with no governed services (every
    /// destination passes through): what the operator writes for a workload no policy names.
    pub async fn write_passthrough_config(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<()> {
        let config = ProxyConfig::new(Workload {
            namespace: namespace.into(),
            service_account: service_account.into(),
        });
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": tandem_crds::names::config_map_name(service_account), "namespace": namespace},
            "data": {tandem_crds::names::CONFIG_KEY: config.to_json()}
        });
        apply_value(&self.client(), &cm).await
    }

    /// Waits until `count` pods matching `selector` in `namespace` are Ready; returns them.
    pub async fn ready_pods(
        &self,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client(), namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let pods = api
                .list(&ListParams::default().labels(selector))
                .await?
                .items;
            let ready: Vec<Pod> = pods
                .iter()
                .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
                .cloned()
                .collect();
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                let statuses: Vec<_> = pods
                    .iter()
                    .map(|p| {
                        (
                            p.metadata.name.clone(),
                            serde_json::to_string(&p.status).unwrap_or_default(),
                        )
                    })
                    .collect();
                bail!(
                    "{count} ready pods {namespace}/{selector} not seen in {timeout:?}: {statuses:#?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `GET path` on a pod's address and port, from the node.
    pub async fn get(&self, pod: &Pod, port: u16, path: &str) -> anyhow::Result<String> {
        let ip: Ipv4Addr = pod_ip(pod)?;
        let response = self
            .node
            .http_get(SocketAddr::from((ip, port)), path)
            .await?;
        if response.status != 200 {
            bail!(
                "GET {ip}:{port}{path}: {} {}",
                response.status,
                response.body
            );
        }
        Ok(response.body)
    }

    /// A proxy's metrics (admin port 15020).
    pub async fn proxy_metrics(&self, pod: &Pod) -> anyhow::Result<String> {
        self.get(pod, tandem_crds::names::ADMIN_PORT, "/metrics")
            .await
    }
}

fn webhook_entry(
    name: &str,
    port: u16,
    ca: &str,
    namespace_selector: serde_json::Value,
    object_selector: serde_json::Value,
) -> serde_json::Value {
    json!({
        "name": name,
        "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": ca},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        "namespaceSelector": namespace_selector,
        "objectSelector": object_selector,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "failurePolicy": "Fail",
        "reinvocationPolicy": "IfNeeded",
        "timeoutSeconds": 10
    })
}

/// Server-side applies one object of any kind.
pub async fn apply_value(client: &kube::Client, value: &serde_json::Value) -> anyhow::Result<()> {
    let object: DynamicObject = serde_json::from_value(value.clone())?;
    let types = object
        .types
        .clone()
        .context("object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let name = object
        .metadata
        .name
        .clone()
        .context("object without a name")?;
    let api: Api<DynamicObject> = match (caps.scope, object.metadata.namespace.as_deref()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply("tandem-e2e").force(),
        &Patch::Apply(value),
    )
    .await
    .with_context(|| format!("apply {} {name}", types.kind))?;
    Ok(())
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(pod: &Pod) -> anyhow::Result<Ipv4Addr> {
    Ok(pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("pod has no IP")?
        .parse()?)
}

/// The sum of a counter's samples whose labels contain every `label="value"` given.
pub fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One Mesh at a time per test binary: they share the machine's netns names and CPU.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
