//! What the end-to-end scenarios share: a cluster with Tandem's webhook installed and a node
//! agent running the injected pods.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod stream;
pub mod telemetry;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use tandem_crds::contract::ProxyConfig;
use tandem_tests::install::{InstallOptions, Tandem};
use tandem_tests::node::{Image, Images, NodeAgent, NodeOptions};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

/// The proxy image the webhook injects and the node maps to the built `tandem-proxy`.
pub const PROXY_IMAGE: &str = tandem_tests::install::PROXY_IMAGE;
/// The test app's image.
pub const TESTAPP_IMAGE: &str = "tandem-testapp:dev";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of another workspace crate (package and binary `name`): `$ENV`, which must exist,
/// or `target/debug/NAME`, built first when stale (so an e2e test run alone never runs an old
/// proxy).
fn workspace_binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    let Some(path) = std::env::var_os(env).map(PathBuf::from) else {
        return Ok(tandem_tests::install::workspace_binary(name, name)?);
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p {name}) or unset {env}",
            path.display()
        );
    }
    Ok(path)
}

/// A control plane, Tandem installed (webhook and operator), and a node.
pub struct Mesh {
    pub node: NodeAgent,
    pub tandem: Tandem,
    pub cluster: ControlPlane,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts everything. Needs root (fails, never skips, without it).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(InstallOptions::default()).await
    }

    /// [`Mesh::start`], with Tandem installed with `options` (e.g. the operator's env).
    pub async fn start_with(options: InstallOptions) -> anyhow::Result<Self> {
        Self::start_with_refresh(options, None).await
    }

    /// [`Mesh::start_with`], the node refreshing mounted ConfigMaps only every
    /// `config_map_refresh` when given (see `NodeOptions::config_map_refresh`).
    pub async fn start_with_refresh(
        options: InstallOptions,
        config_map_refresh: Option<Duration>,
    ) -> anyhow::Result<Self> {
        Self::start_with_forwards(options, config_map_refresh, Vec::new()).await
    }

    /// [`Mesh::start_with_refresh`], the node also carrying `forwards` from the gateway
    /// address to processes on the machine (e.g. a trace collector), beside Tandem's own.
    pub async fn start_with_forwards(
        options: InstallOptions,
        config_map_refresh: Option<Duration>,
        forwards: Vec<tandem_tests::node::forward::HostForward>,
    ) -> anyhow::Result<Self> {
        // The kube clients' connection errors while scenario f restarts the apiserver are
        // expected; RUST_LOG shows them when wanted.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,kube=warn,kube_client=off,tandem_tests::node=warn",
            )
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        tandem_tests::node::net::require_root()?;
        let proxy = workspace_binary("TANDEM_PROXY_BIN", "tandem-proxy")?;
        let cluster = ControlPlane::start(ControlPlaneOptions::default()).await?;
        let dir = tempfile::Builder::new().prefix("tandem-e2e-").tempdir()?;
        // Tandem as a user installs it: CRDs, RBAC, the webhook configuration from
        // manifests/, the webhook and the operator under their own ServiceAccounts.
        let tandem = Tandem::install_with(&cluster, options).await?;

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
                forwards: tandem.node_forwards().into_iter().chain(forwards).collect(),
                config_map_refresh,
            },
        )
        .await?;
        Ok(Self {
            node,
            tandem,
            cluster,
            dir,
        })
    }

    /// The tail of every container log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = self.tandem.log_tails();
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

    /// A proxy's `/config` (admin port 15020): what it loaded, and its policies' state.
    pub async fn proxy_admin_config(&self, pod: &Pod) -> anyhow::Result<serde_json::Value> {
        let body = self
            .get(pod, tandem_crds::names::ADMIN_PORT, "/config")
            .await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// The proxy config a proxy has loaded, if any.
    pub async fn proxy_loaded(&self, pod: &Pod) -> anyhow::Result<Option<ProxyConfig>> {
        let admin = self.proxy_admin_config(pod).await?;
        if admin["config"].is_null() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_value(admin["config"].clone())?))
    }

    /// The proxy config the operator wrote for a ServiceAccount, if any.
    pub async fn operator_config(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Option<ProxyConfig>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client(), namespace);
        let Some(cm) = api
            .get_opt(&tandem_crds::names::config_map_name(service_account))
            .await?
        else {
            return Ok(None);
        };
        let json = cm
            .data
            .unwrap_or_default()
            .remove(tandem_crds::names::CONFIG_KEY)
            .context("ConfigMap without the config key")?;
        Ok(Some(serde_json::from_str(&json)?))
    }

    /// Asks a `tandem-testapp client` pod for the burst `ask`: see [`burst_with`].
    pub async fn burst_with(&self, client: &Pod, ask: &Burst) -> anyhow::Result<ClientStats> {
        burst_with(&self.node, client, ask).await
    }

    /// Asks a `tandem-testapp client` pod for TCP connections: see [`tcp_burst`].
    pub async fn tcp_burst(
        &self,
        client: &Pod,
        target: &str,
        n: u64,
        concurrency: u64,
    ) -> anyhow::Result<TcpStats> {
        tcp_burst(&self.node, client, target, n, concurrency).await
    }

    /// Asks a `tandem-testapp client` pod for a burst: see [`burst`].
    pub async fn burst(
        &self,
        client: &Pod,
        target: &str,
        n: u64,
        concurrency: u64,
        rps: Option<u32>,
    ) -> anyhow::Result<ClientStats> {
        burst(&self.node, client, target, n, concurrency, rps).await
    }

    /// What a `tandem-testapp client` pod's background traffic observed since the last reset.
    pub async fn client_stats(&self, client: &Pod, reset: bool) -> anyhow::Result<ClientStats> {
        let path = if reset { "/stats?reset=1" } else { "/stats" };
        Ok(serde_json::from_str(&self.get(client, 9090, path).await?)?)
    }

    /// A Service's cluster IP.
    pub async fn cluster_ip(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        let api: Api<Service> = Api::namespaced(self.client(), namespace);
        api.get(name)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("Service without a cluster IP")
    }

    /// A policy object of any of Tandem's kinds (`plural`: `trafficpolicies`,
    /// `circuitbreakerpolicies`, `authorizationpolicies`), if it exists.
    pub async fn policy_object(
        &self,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Option<DynamicObject>> {
        let kind = match plural {
            "trafficpolicies" => "TrafficPolicy",
            "authorizationpolicies" => "AuthorizationPolicy",
            "circuitbreakerpolicies" => "CircuitBreakerPolicy",
            other => bail!("not one of Tandem's policy kinds: {other}"),
        };
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("tandem.dev", "v1alpha1", kind),
            plural,
        );
        let api: Api<DynamicObject> = Api::namespaced_with(self.client(), namespace, &resource);
        Ok(api.get_opt(name).await?)
    }

    /// A policy condition as (status, reason, message): `plural` as for
    /// [`Mesh::policy_object`].
    pub async fn policy_condition(
        &self,
        plural: &str,
        namespace: &str,
        name: &str,
        type_: &str,
    ) -> anyhow::Result<Option<(String, String, String)>> {
        let Some(object) = self.policy_object(plural, namespace, name).await? else {
            return Ok(None);
        };
        let conditions = object.data["status"]["conditions"].clone();
        Ok(conditions.as_array().into_iter().flatten().find_map(|c| {
            (c["type"] == type_).then(|| {
                let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                (text("status"), text("reason"), text("message"))
            })
        }))
    }
}

/// Asks a `tandem-testapp client` pod for a burst of exactly `n` requests to `target`
/// (`concurrency` at once, paced at `rps` if given) and returns what they observed.
pub async fn burst(
    node: &NodeAgent,
    client: &Pod,
    target: &str,
    n: u64,
    concurrency: u64,
    rps: Option<u32>,
) -> anyhow::Result<ClientStats> {
    let mut ask = Burst::new(target, n).concurrency(concurrency);
    ask.rps = rps;
    burst_with(node, client, &ask).await
}

/// One bounded burst a `tandem-testapp client` pod sends: `n` requests to `target`.
#[derive(Clone, Debug)]
pub struct Burst {
    pub target: String,
    pub n: u64,
    pub concurrency: u64,
    pub rps: Option<u32>,
    /// The method (GET when `None`).
    pub method: Option<String>,
    /// Response headers whose values the burst counts (`ClientStats::by_header`: their values
    /// joined by `|`), comma-separated.
    pub header: Option<String>,
    /// The request's content type.
    pub content_type: Option<String>,
    /// HTTP/2 with prior knowledge (as gRPC clients speak).
    pub h2: bool,
}

impl Burst {
    /// `n` GETs of `target`, one at a time.
    pub fn new(target: &str, n: u64) -> Self {
        Self {
            target: target.to_owned(),
            n,
            concurrency: 1,
            rps: None,
            method: None,
            header: None,
            content_type: None,
            h2: false,
        }
    }

    /// As a gRPC client calls: `POST`, `content-type: application/grpc`, HTTP/2.
    pub fn grpc(mut self) -> Self {
        self.method = Some("POST".to_owned());
        self.content_type = Some("application/grpc".to_owned());
        self.h2 = true;
        self
    }

    pub fn concurrency(mut self, concurrency: u64) -> Self {
        self.concurrency = concurrency;
        self
    }

    pub fn rps(mut self, rps: u32) -> Self {
        self.rps = Some(rps);
        self
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_owned());
        self
    }

    /// Counts the values of response header `name` (several: comma-separated).
    pub fn header(mut self, name: &str) -> Self {
        self.header = Some(name.to_owned());
        self
    }

    fn path(&self) -> String {
        let mut path = format!(
            "/burst?n={}&concurrency={}&target={}",
            self.n, self.concurrency, self.target
        );
        if let Some(rps) = self.rps {
            path.push_str(&format!("&rps={rps}"));
        }
        if let Some(method) = &self.method {
            path.push_str(&format!("&method={method}"));
        }
        if let Some(header) = &self.header {
            path.push_str(&format!("&header={header}"));
        }
        if let Some(content_type) = &self.content_type {
            path.push_str(&format!("&content_type={content_type}"));
        }
        if self.h2 {
            path.push_str("&h2=true");
        }
        path
    }
}

/// Asks a `tandem-testapp client` pod for the burst `ask` and returns what it observed.
pub async fn burst_with(
    node: &NodeAgent,
    client: &Pod,
    ask: &Burst,
) -> anyhow::Result<ClientStats> {
    // The burst answers when its last request is done: the pacing, plus 5 ms a request (slow
    // debug builds on a shared machine), plus slack; each request is limited to 5 s anyway.
    let paced = ask.rps.map_or(0, |r| ask.n / u64::from(r.max(1)));
    let limit = Duration::from_secs(30 + paced + 5 * ask.n / ask.concurrency.max(1) / 1000);
    ask_client(node, client, &ask.path(), limit).await
}

/// GETs `path` from a `tandem-testapp client` pod's stats port (from the node's network
/// namespace) and parses its JSON answer.
async fn ask_client<T: serde::de::DeserializeOwned>(
    node: &NodeAgent,
    client: &Pod,
    path: &str,
    limit: Duration,
) -> anyhow::Result<T> {
    let ip = pod_ip(client)?;
    let response = tandem_tests::node::net::http_get_in(
        &node.netns(),
        SocketAddr::from((ip, 9090)),
        path,
        limit,
    )
    .await?;
    if response.status != 200 {
        bail!("{path}: {} {}", response.status, response.body);
    }
    Ok(serde_json::from_str(&response.body)?)
}

/// Asks a `tandem-testapp client` pod to open `n` TCP connections to `target` (`host:port`),
/// `concurrency` at once, each writing a line and reading it back; returns what they observed.
pub async fn tcp_burst(
    node: &NodeAgent,
    client: &Pod,
    target: &str,
    n: u64,
    concurrency: u64,
) -> anyhow::Result<TcpStats> {
    let path = format!("/tcp?n={n}&concurrency={concurrency}&target={target}");
    // Each connection is limited to 5 s to connect and 5 s to exchange.
    let limit = Duration::from_secs(30 + 10 * n / concurrency.max(1));
    ask_client(node, client, &path, limit).await
}

/// What `tandem-testapp client` reports for a TCP burst (`/tcp`).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct TcpStats {
    pub total: u64,
    /// `echoed`, `closed`, `reset`, `partial`, `connect-error`, `timeout`.
    pub by_outcome: BTreeMap<String, u64>,
    pub bytes_back: u64,
}

impl TcpStats {
    /// Connections with this outcome.
    pub fn count(&self, outcome: &str) -> u64 {
        self.by_outcome.get(outcome).copied().unwrap_or(0)
    }
}

/// What `tandem-testapp client` reports (`/stats`, `/burst`).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ClientStats {
    pub seconds: f64,
    pub total: u64,
    pub ok: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_body: BTreeMap<String, u64>,
    /// Values of the response header the burst asked for ("" when absent).
    #[serde(default)]
    pub by_header: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Per body, when the last request answered with it was sent (unix milliseconds).
    #[serde(default)]
    pub last_sent_by_body: BTreeMap<String, u64>,
}

impl ClientStats {
    /// Successful responses, as a fraction of all.
    pub fn success_rate(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.ok as f64 / self.total as f64
    }

    /// Responses whose body was `body`, as a fraction of all.
    pub fn share(&self, body: &str) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.by_body.get(body).copied().unwrap_or(0) as f64 / self.total as f64
    }
}

/// Polls `check` every 100 ms until it returns `Some`, at most `timeout`; returns the value
/// and how long it took. Errors of `check` count as "not yet" (the last one is reported).
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok((value, started.elapsed())),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > timeout {
            bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Server-side applies one object of any kind.
pub async fn apply_value(client: &kube::Client, value: &serde_json::Value) -> anyhow::Result<()> {
    Ok(tandem_tests::install::apply_object(client, value, "tandem-e2e").await?)
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
