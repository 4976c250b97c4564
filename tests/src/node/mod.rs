//! The node agent: the kubelet of one node, for the local cluster.
//!
//! It registers a Node, binds pending pods to it (there is no scheduler), and runs each pod
//! bound to it as the kubelet would ([`pod`]): a network namespace with a veth and an address
//! from the node's pod CIDR ([`net`]), the init containers in order, the native sidecars
//! started and their startup probes awaited, the containers as processes of the binaries the
//! image map names ([`container`], [`shim`]), ConfigMap volumes written atomically and kept
//! current ([`volumes`]), projected volumes with ServiceAccount tokens bound to the pod and
//! refreshed at 80 % of their lifetime ([`projected`], [`tokens`]), probes honoured, and the pod status patched so the EndpointSlice
//! controller publishes its endpoints. Service ClusterIPs work as kube-proxy makes them work
//! ([`services`]). Deleting a pod stops its processes and removes its namespace.

pub mod container;
pub mod forward;
pub mod net;
pub mod pod;
pub mod projected;
pub mod services;
pub mod shim;
pub mod tokens;
pub mod volumes;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

pub use container::{Image, Images};

use crate::{Error, Result};

/// How a node agent is started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The Node's name.
    pub name: String,
    /// Where pods' volumes, container specs and logs are kept.
    pub dir: PathBuf,
    /// The image store.
    pub images: Images,
    /// The `tandem-container` binary.
    pub shim: PathBuf,
    /// Ports of the gateway address pods reach that are carried to processes on the machine
    /// (the operator's signer), as a host-network proxy would carry them.
    pub forwards: Vec<forward::HostForward>,
    /// How the node refreshes mounted ConfigMaps after a change: `None` rewrites them as soon
    /// as the change is seen (faster than any kubelet); `Some(period)` only every `period`, as
    /// a real kubelet refreshes a pod's ConfigMap volumes when it syncs the pod
    /// (`--sync-frequency`, one minute by default, so 60–90 s after a change). Scenarios that
    /// must prove another path (the operator's config stream) is what delivers a change in
    /// time run with the kubelet's period.
    pub config_map_refresh: Option<Duration>,
}

/// ConfigMap (namespace, name) → the volume directories made from it, with their `items`.
type ConfigMapVolumes = BTreeMap<(String, String), Vec<(PathBuf, Option<Vec<KeyToPath>>)>>;

/// State the pods of this node share.
pub struct NodeShared {
    client: kube::Client,
    name: String,
    dir: PathBuf,
    images: Images,
    shim: PathBuf,
    net: Arc<net::NodeNetwork>,
    host_ip: Ipv4Addr,
    pool: Mutex<net::AddressPool>,
    config_map_volumes: Mutex<ConfigMapVolumes>,
    config_map_refresh: Option<Duration>,
    probes: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeShared {
    fn log_path(&self, pod: &Pod, container: &str) -> PathBuf {
        self.dir.join("logs").join(format!(
            "{}_{}_{container}.log",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        ))
    }

    fn watch_config_map(
        &self,
        namespace: &str,
        name: &str,
        dir: PathBuf,
        items: Option<Vec<KeyToPath>>,
    ) {
        if let Ok(mut map) = self.config_map_volumes.lock() {
            map.entry((namespace.to_owned(), name.to_owned()))
                .or_default()
                .push((dir, items));
        }
    }

    fn forget_volumes(&self, pod_dir: &Path) {
        if let Ok(mut map) = self.config_map_volumes.lock() {
            for dirs in map.values_mut() {
                dirs.retain(|(dir, _)| !dir.starts_with(pod_dir));
            }
        }
    }
}

/// A running node agent; dropping it stops every pod and removes the node's namespaces.
pub struct NodeAgent {
    shared: Arc<NodeShared>,
    pods: Arc<tokio::sync::Mutex<BTreeMap<String, pod::RunningPod>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl NodeAgent {
    /// Registers the Node, waits for its pod CIDR, sets up its network and starts running
    /// pods. Needs root.
    pub async fn start(client: kube::Client, options: NodeOptions) -> Result<Self> {
        net::require_root()?;
        for sub in ["pods", "logs"] {
            let path = options.dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        }
        let pod_cidr = register_node(&client, &options.name).await?;
        // A namespace name unique to this agent, so parallel clusters never collide.
        let ns_name = format!("tandem-node-{}", std::process::id());
        let network = net::NodeNetwork::create(&ns_name)?;
        services::install(&ns_name)?;
        let mut tasks = Vec::new();
        for host_forward in &options.forwards {
            tasks.push(forward::start(&network.path(), *host_forward)?);
        }
        let host_ip = net::GATEWAY;
        let shared = Arc::new(NodeShared {
            client: client.clone(),
            name: options.name.clone(),
            dir: options.dir.clone(),
            images: options.images,
            shim: options.shim,
            net: Arc::new(network),
            host_ip,
            pool: Mutex::new(net::AddressPool::new(&pod_cidr)?),
            config_map_volumes: Mutex::new(BTreeMap::new()),
            config_map_refresh: options.config_map_refresh,
            probes: Mutex::new(Vec::new()),
        });
        let pods = Arc::new(tokio::sync::Mutex::new(BTreeMap::new()));
        tasks.extend([
            tokio::spawn(services::sync(client.clone(), ns_name)),
            tokio::spawn(keep_config_maps(shared.clone())),
            tokio::spawn(run_pods(shared.clone(), pods.clone())),
        ]);
        tracing::info!(node = %options.name, %pod_cidr, forwards = ?options.forwards, "Node agent running");
        Ok(Self {
            shared,
            pods,
            tasks,
        })
    }

    /// The node namespace's file: connect from there to reach pod and Service addresses.
    pub fn netns(&self) -> PathBuf {
        self.shared.net.path()
    }

    /// `GET path` on `addr` from the node namespace.
    pub async fn http_get(&self, addr: SocketAddr, path: &str) -> Result<net::HttpResponse> {
        net::http_get_in(&self.netns(), addr, path, Duration::from_secs(5)).await
    }

    /// The directory the node wrote volume `volume` of the pod with UID `pod_uid` into (what
    /// its containers see at their mount paths).
    pub fn volume_path(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.shared
            .dir
            .join("pods")
            .join(pod_uid)
            .join("volumes")
            .join(volume)
    }

    /// A container's log file.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.shared
            .dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.log"))
    }

    /// Stops every pod (containers, then sidecars, then the network) and the agent.
    pub async fn shutdown(mut self) {
        self.stop_all().await;
    }

    async fn stop_all(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let pods = std::mem::take(&mut *self.pods.lock().await);
        for (_, running) in pods {
            running.stop().await;
        }
        if let Ok(mut probes) = self.shared.probes.lock() {
            for probe in probes.drain(..) {
                probe.abort();
            }
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Pods still running (the owner did not call shutdown, e.g. a test panicked): their
        // processes die with their handles (kill_on_drop); remove their namespaces here.
        if let Ok(mut pods) = self.pods.try_lock() {
            for (_, running) in std::mem::take(&mut *pods) {
                let _ = net::ip(&["netns", "delete", running.netns()]);
            }
        }
    }
}

/// Creates (or adopts) the Node, marks it Ready, and returns the pod CIDR the
/// controller-manager allocates to it.
async fn register_node(client: &kube::Client, name: &str) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
    }))
    .map_err(Error::Json)?;
    nodes
        .patch(
            name,
            &PatchParams::apply("tandem-node-agent").force(),
            &Patch::Apply(&node),
        )
        .await
        .map_err(|e| Error::kube(format!("register Node {name}"), e))?;
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "tandem node agent is posting ready status"}],
        "addresses": [{"type": "InternalIP", "address": net::GATEWAY.to_string()},
                      {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        "nodeInfo": {"kubeletVersion": "tandem-node-agent", "containerRuntimeVersion": "tandem-container://0",
                     "operatingSystem": "linux", "architecture": "amd64", "osImage": "", "kernelVersion": "",
                     "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| Error::kube(format!("mark Node {name} ready"), e))?;
    for _ in 0..300 {
        let node = nodes
            .get(name)
            .await
            .map_err(|e| Error::kube("get Node", e))?;
        if let Some(cidr) = node.spec.and_then(|s| s.pod_cidr) {
            return Ok(cidr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Timeout {
        what: format!("a pod CIDR for Node {name}"),
        seconds: 30,
        detail: None,
    })
}

/// Watches every pod: binds unscheduled ones here, starts the ones bound here, and stops and
/// finally deletes the ones being deleted.
async fn run_pods(
    node: Arc<NodeShared>,
    pods: Arc<tokio::sync::Mutex<BTreeMap<String, pod::RunningPod>>>,
) {
    let api: Api<Pod> = Api::all(node.client.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "Pod watch error");
                continue;
            }
        };
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                handle_pod(&node, &pods, pod).await;
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let running = pods.lock().await.remove(&uid);
                if let Some(running) = running {
                    tokio::spawn(running.stop());
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

async fn handle_pod(
    node: &Arc<NodeShared>,
    pods: &Arc<tokio::sync::Mutex<BTreeMap<String, pod::RunningPod>>>,
    pod: Pod,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let bound_to = spec.and_then(|s| s.node_name.clone());
    let deleting = pod.metadata.deletion_timestamp.is_some();
    match bound_to {
        None if !deleting => {
            if let Err(e) = bind(&node.client, &namespace, &name, &node.name).await {
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "Binding failed");
            }
        }
        Some(n) if n == node.name => {
            if deleting {
                let running = pods.lock().await.remove(&uid);
                let client = node.client.clone();
                tokio::spawn(async move {
                    if let Some(running) = running {
                        running.stop().await;
                    }
                    finalize_delete(client, &namespace, &name, &uid).await;
                });
            } else {
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return;
                }
                let mut pods = pods.lock().await;
                if let std::collections::btree_map::Entry::Vacant(slot) = pods.entry(uid) {
                    tracing::info!(pod = %format!("{namespace}/{name}"), "Starting pod");
                    slot.insert(pod::RunningPod::start(node.clone(), pod));
                }
            }
        }
        _ => {}
    }
}

async fn bind(client: &kube::Client, namespace: &str, name: &str, node: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    match api
        .create_subresource::<serde_json::Value, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already bound (a second event for the same pod): nothing to do.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("bind {namespace}/{name}"), e)),
    }
}

/// The kubelet's last word on a deleted pod: delete it with grace 0 once its containers
/// have stopped, conditional on its UID.
async fn finalize_delete(client: kube::Client, namespace: &str, name: &str, uid: &str) {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    if let Err(e) = api.delete(name, &params).await {
        tracing::debug!(pod = %format!("{namespace}/{name}"), error = %e, "Final delete");
    }
}

/// The latest state of each watched ConfigMap: `None` once it was deleted.
type LatestConfigMaps = BTreeMap<(String, String), Option<ConfigMap>>;

/// Watches ConfigMaps and rewrites every volume made from one when it changes (or empties it
/// when the ConfigMap is deleted), as the kubelet's ConfigMap manager does: at once, or only
/// every [`NodeOptions::config_map_refresh`] (the kubelet's pod sync).
async fn keep_config_maps(node: Arc<NodeShared>) {
    let api: Api<ConfigMap> = Api::all(node.client.clone());
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut latest = LatestConfigMaps::new();
    // Without a period the tick never fires: every change is written when it is seen.
    let period = node
        .config_map_refresh
        .unwrap_or(Duration::from_secs(86_400));
    let mut sync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                let Some((key, state)) = config_map_event(event) else { continue };
                if node.config_map_refresh.is_none() {
                    refresh_volumes(&node, &key, state.as_ref());
                }
                latest.insert(key, state);
            }
            _ = sync.tick() => {
                for (key, state) in &latest {
                    refresh_volumes(&node, key, state.as_ref());
                }
            }
        }
    }
}

/// A ConfigMap watch event as (namespace, name) and the ConfigMap (`None`: deleted).
fn config_map_event(
    event: std::result::Result<watcher::Event<ConfigMap>, watcher::Error>,
) -> Option<((String, String), Option<ConfigMap>)> {
    let (cm, deleted) = match event {
        Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => (cm, false),
        Ok(watcher::Event::Delete(cm)) => (cm, true),
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "ConfigMap watch error");
            return None;
        }
    };
    let key = (
        cm.metadata.namespace.clone().unwrap_or_default(),
        cm.metadata.name.clone().unwrap_or_default(),
    );
    Some((key, (!deleted).then_some(cm)))
}

/// Writes a ConfigMap's current state into every volume made from it (a no-op for volumes
/// that already hold it).
fn refresh_volumes(node: &NodeShared, key: &(String, String), cm: Option<&ConfigMap>) {
    let targets = node
        .config_map_volumes
        .lock()
        .map(|m| m.get(key).cloned().unwrap_or_default())
        .unwrap_or_default();
    for (dir, items) in targets {
        let files = match cm {
            None => BTreeMap::new(),
            Some(cm) => volumes::config_map_files(
                cm.data.as_ref(),
                cm.binary_data.as_ref(),
                items.as_deref(),
            ),
        };
        match volumes::write_atomic(&dir, &files) {
            Ok(true) => {
                tracing::info!(configmap = %format!("{}/{}", key.0, key.1), dir = %dir.display(), "ConfigMap volume updated")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "ConfigMap volume update failed"),
        }
    }
}
