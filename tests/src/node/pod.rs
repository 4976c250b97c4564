//! One pod's life on the node: network, volumes, init containers in order, the native
//! sidecars (started, startup probe awaited), the containers, probes, restarts, status, and
//! the orderly stop.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Probe, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::Instrument as _;

use super::container::{PodContext, shim_spec};
use super::projected::Projected;
use super::tokens::BoundPod;
use super::{NodeShared, net, volumes};
use crate::{Error, Result};

/// The longest grace period the node grants, whatever the pod asks (tests must not hang).
const MAX_GRACE: Duration = Duration::from_secs(30);

/// What a container is doing, as `containerStatuses[].state` reports it.
#[derive(Debug, Clone)]
enum State {
    Waiting(String, Option<String>),
    Running {
        since: String,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        since: String,
        until: String,
    },
}

#[derive(Debug, Clone)]
struct Status {
    name: String,
    image: String,
    init: bool,
    state: State,
    restarts: i32,
    started: bool,
    ready: bool,
    pid: Option<u32>,
}

/// The pod's observable state, shared by its tasks.
#[derive(Debug)]
struct Shared {
    containers: Mutex<Vec<Status>>,
    changed: Notify,
}

impl Shared {
    fn update(&self, name: &str, init: bool, f: impl FnOnce(&mut Status)) {
        if let Ok(mut all) = self.containers.lock()
            && let Some(status) = all.iter_mut().find(|s| s.name == name && s.init == init)
        {
            f(status);
        }
        self.changed.notify_one();
    }

    fn get(&self, name: &str, init: bool) -> Option<Status> {
        self.containers
            .lock()
            .ok()?
            .iter()
            .find(|s| s.name == name && s.init == init)
            .cloned()
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A running pod: dropping the sender stops it.
#[derive(Debug)]
pub struct RunningPod {
    netns: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningPod {
    /// Starts `pod` on the node.
    pub fn start(node: Arc<NodeShared>, pod: Pod) -> Self {
        let (stop, stopped) = watch::channel(false);
        let netns = netns_name(&pod);
        let task = tokio::spawn(async move {
            let name = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            if let Err(e) = run(node, pod, stopped).await {
                tracing::error!(pod = %name, error = %e, "Pod failed");
            }
        });
        Self { netns, stop, task }
    }

    /// The pod's network namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Stops the pod's containers (SIGTERM, grace, SIGKILL) and removes its network and
    /// volumes; returns when all is gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(node: Arc<NodeShared>, pod: Pod, stopped: watch::Receiver<bool>) -> Result<()> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let netns_name = netns_name(&pod);
    let veth = netns_name.replace("tandem-pod-", "tv");
    let ip = node
        .pool
        .lock()
        .map_err(|_| Error::Unexpected("address pool poisoned".into()))?
        .allocate()
        .ok_or_else(|| Error::Unexpected("the node's pod CIDR is exhausted".into()))?;
    let pod_dir = node.dir.join("pods").join(&uid);
    let result = run_with_network(&node, &pod, stopped, &netns_name, &veth, ip, &pod_dir).await;
    // Teardown, whatever happened.
    let net = node.net.clone();
    let ns = netns_name.clone();
    let _ = tokio::task::spawn_blocking(move || net.remove_pod(&ns)).await;
    if let Ok(mut pool) = node.pool.lock() {
        pool.release(ip);
    }
    node.forget_volumes(&pod_dir);
    let _ = std::fs::remove_dir_all(&pod_dir);
    result
}

async fn run_with_network(
    node: &Arc<NodeShared>,
    pod: &Pod,
    mut stopped: watch::Receiver<bool>,
    netns_name: &str,
    veth: &str,
    ip: Ipv4Addr,
    pod_dir: &std::path::Path,
) -> Result<()> {
    let started = Instant::now();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(node.client.clone(), &namespace);
    {
        let net = node.net.clone();
        let (ns, veth) = (netns_name.to_owned(), veth.to_owned());
        tokio::task::spawn_blocking(move || net.add_pod(&ns, &veth, ip))
            .await
            .map_err(|e| Error::Unexpected(format!("network setup: {e}")))??;
    }
    let netns = net::netns_path(netns_name);
    // The keepers live as long as this function: the pod's containers, then its volumes.
    let (volumes, _keepers) = prepare_volumes(node, pod, pod_dir).await?;
    let spec = pod.spec.clone().unwrap_or_default();
    let init_containers = spec.init_containers.clone().unwrap_or_default();
    let containers = spec.containers.clone();
    let shared = Arc::new(Shared {
        containers: Mutex::new(
            init_containers
                .iter()
                .map(|c| (c, true))
                .chain(containers.iter().map(|c| (c, false)))
                .map(|(c, init)| Status {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    init,
                    state: State::Waiting("PodInitializing".into(), None),
                    restarts: 0,
                    started: false,
                    ready: false,
                    pid: None,
                })
                .collect(),
        ),
        changed: Notify::new(),
    });
    let start_time = now();
    let status_task = tokio::spawn(status_writer(
        api.clone(),
        name.clone(),
        shared.clone(),
        ip,
        node.host_ip,
        start_time,
    ));
    let grace = Duration::from_secs(
        spec.termination_grace_period_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    )
    .min(MAX_GRACE);
    let launcher = Launcher {
        node: node.clone(),
        pod: pod.clone(),
        ip,
        netns: netns.clone(),
        volumes,
        dir: pod_dir.to_owned(),
        shared: shared.clone(),
        grace,
    };

    let mut running: Vec<(
        String,
        bool,
        tokio::task::JoinHandle<()>,
        watch::Sender<bool>,
    )> = Vec::new();
    let mut outcome = Ok(());
    'init: for container in &init_containers {
        if container.restart_policy.as_deref() == Some("Always") {
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(launcher.clone().supervise(container.clone(), true, rx));
            running.push((container.name.clone(), true, task, tx));
            let probe_task = tokio::spawn(launcher.clone().probe(container.clone(), true));
            // The next container waits until this sidecar has started (startup probe).
            loop {
                if shared.get(&container.name, true).is_some_and(|s| s.started) {
                    break;
                }
                tokio::select! {
                    _ = stopped.changed() => { probe_task.abort(); break 'init; }
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            node.probes.lock().map(|mut p| p.push(probe_task)).ok();
        } else {
            loop {
                match launcher.run_to_completion(container, &mut stopped).await {
                    Ok(true) => break,
                    Ok(false) => {
                        if *stopped.borrow() {
                            break 'init;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        shared.update(&container.name, true, |s| {
                            s.state =
                                State::Waiting("CreateContainerError".into(), Some(e.to_string()));
                        });
                        outcome = Err(e);
                        break 'init;
                    }
                }
            }
        }
    }
    let mut probe_tasks = Vec::new();
    if outcome.is_ok() && !*stopped.borrow() {
        for container in &containers {
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(launcher.clone().supervise(container.clone(), false, rx));
            running.push((container.name.clone(), false, task, tx));
            probe_tasks.push(tokio::spawn(
                launcher.clone().probe(container.clone(), false),
            ));
        }
        tracing::info!(pod = %format!("{namespace}/{name}"), %ip, elapsed = ?started.elapsed(), "Pod containers started");
        until_stopped(&mut stopped).await;
    }
    // Stop: the containers first, then the sidecars in reverse order, as the kubelet does.
    for task in probe_tasks {
        task.abort();
    }
    running.sort_by_key(|(_, init, _, _)| *init);
    let (apps, mut sidecars): (Vec<_>, Vec<_>) =
        running.into_iter().partition(|(_, init, _, _)| !init);
    for (_, _, _, tx) in &apps {
        let _ = tx.send(true);
    }
    for (_, _, task, _) in apps {
        let _ = task.await;
    }
    sidecars.reverse();
    for (_, _, task, tx) in sidecars {
        let _ = tx.send(true);
        let _ = task.await;
    }
    status_task.abort();
    outcome
}

/// Everything needed to start a container of this pod.
#[derive(Clone)]
struct Launcher {
    node: Arc<NodeShared>,
    pod: Pod,
    ip: Ipv4Addr,
    netns: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    dir: PathBuf,
    shared: Arc<Shared>,
    grace: Duration,
}

impl Launcher {
    async fn spawn(&self, container: &Container, init: bool) -> Result<tokio::process::Child> {
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let services: Vec<Service> =
            Api::<Service>::namespaced(self.node.client.clone(), &namespace)
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::kube("list Services", e))?
                .items;
        let config_maps: Vec<ConfigMap> =
            Api::<ConfigMap>::namespaced(self.node.client.clone(), &namespace)
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::kube("list ConfigMaps", e))?
                .items;
        let ctx = PodContext {
            pod: &self.pod,
            pod_ip: self.ip,
            host_ip: self.node.host_ip,
            node_name: &self.node.name,
            netns: self.netns.clone(),
            volumes: &self.volumes,
            services: &services,
            config_maps: &config_maps,
        };
        let spec = shim_spec(container, &ctx, &self.node.images)?;
        let kind = if init { "init" } else { "app" };
        let spec_path = self.dir.join(format!("{kind}-{}.json", container.name));
        let json = serde_json::to_vec_pretty(&spec).map_err(Error::Json)?;
        std::fs::write(&spec_path, json)
            .map_err(|e| Error::io(format!("write {}", spec_path.display()), e))?;
        let log_path = self.node.log_path(&self.pod, &container.name);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("open {}", log_path.display()), e))?;
        let err = log.try_clone().map_err(|e| Error::io("clone log", e))?;
        let mut command = tokio::process::Command::new(&self.node.shim);
        command
            .arg(&spec_path)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| Error::io(format!("start container {}", container.name), e))
    }

    /// Runs a one-shot init container; `Ok(true)` when it exited 0.
    async fn run_to_completion(
        &self,
        container: &Container,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut child = self.spawn(container, true).await?;
        let since = now();
        self.shared.update(&container.name, true, |s| {
            s.state = State::Running {
                since: since.clone(),
            };
            s.pid = child.id();
        });
        let status = tokio::select! {
            status = child.wait() => status.map_err(|e| Error::io("wait for init container", e))?,
            _ = until_stopped(stopped) => {
                terminate(&mut child, self.grace).await;
                return Ok(false);
            }
        };
        let exit_code = status.code().unwrap_or(128);
        self.shared.update(&container.name, true, |s| {
            s.pid = None;
            s.state = State::Terminated {
                exit_code,
                reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
                since,
                until: now(),
            };
            if exit_code != 0 {
                s.restarts += 1;
            }
        });
        if exit_code != 0 {
            tracing::warn!(container = %container.name, exit_code, log = %self.node.log_path(&self.pod, &container.name).display(), "Init container failed; retrying");
        }
        Ok(exit_code == 0)
    }

    /// Keeps a long-running container (sidecar or app) up, restarting it with backoff, until
    /// told to stop.
    async fn supervise(self, container: Container, init: bool, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let mut child = match self.spawn(&container, init).await {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!(container = %container.name, error = %e, "Container cannot start");
                    self.shared.update(&container.name, init, |s| {
                        s.state =
                            State::Waiting("CreateContainerError".into(), Some(e.to_string()));
                    });
                    tokio::select! {
                        _ = until_stopped(&mut stop) => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let since = now();
            self.shared.update(&container.name, init, |s| {
                s.state = State::Running {
                    since: since.clone(),
                };
                s.pid = child.id();
                // Without a startup probe a container counts as started once running.
                s.started = container.startup_probe.is_none();
            });
            tokio::select! {
                status = child.wait() => {
                    let exit_code = status.ok().and_then(|s| s.code()).unwrap_or(137);
                    tracing::warn!(container = %container.name, exit_code, "Container exited; restarting");
                    self.shared.update(&container.name, init, |s| {
                        s.pid = None;
                        s.started = false;
                        s.ready = false;
                        s.restarts += 1;
                        s.state = State::Terminated { exit_code, reason: "Error".into(), since, until: now() };
                    });
                }
                _ = until_stopped(&mut stop) => {
                    terminate(&mut child, self.grace).await;
                    self.shared.update(&container.name, init, |s| {
                        s.pid = None;
                        s.ready = false;
                        s.state = State::Terminated { exit_code: 0, reason: "Completed".into(), since, until: now() };
                    });
                    return;
                }
            }
            tokio::select! {
                _ = until_stopped(&mut stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Runs the container's startup, readiness and liveness probes for as long as the task
    /// lives, recording `started` and `ready` and killing the process on a liveness failure.
    async fn probe(self, container: Container, init: bool) {
        let mut startup_failures = 0;
        let mut liveness_failures = 0;
        let mut readiness_successes = 0;
        let mut last_readiness = Instant::now() - Duration::from_secs(3600);
        let mut last_liveness = Instant::now();
        loop {
            let Some(status) = self.shared.get(&container.name, init) else {
                return;
            };
            let running = matches!(status.state, State::Running { .. });
            if !running {
                startup_failures = 0;
                liveness_failures = 0;
                readiness_successes = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if !status.started {
                match &container.startup_probe {
                    Some(probe) => {
                        tokio::time::sleep(period(probe, 0)).await;
                        if self.check(&container, probe).await {
                            self.shared
                                .update(&container.name, init, |s| s.started = true);
                        } else {
                            startup_failures += 1;
                            if startup_failures >= probe.failure_threshold.unwrap_or(3) {
                                tracing::warn!(container = %container.name, "Startup probe failed; killing");
                                self.kill(&container.name, init);
                                startup_failures = 0;
                            }
                        }
                        continue;
                    }
                    None => self
                        .shared
                        .update(&container.name, init, |s| s.started = true),
                }
            }
            // Readiness: no probe means ready once started.
            match &container.readiness_probe {
                None => {
                    if !status.ready {
                        self.shared
                            .update(&container.name, init, |s| s.ready = true);
                    }
                }
                Some(probe) if last_readiness.elapsed() >= period(probe, 10) => {
                    last_readiness = Instant::now();
                    let ok = self.check(&container, probe).await;
                    if ok {
                        readiness_successes += 1;
                    } else {
                        readiness_successes = 0;
                    }
                    let ready = if ok {
                        readiness_successes >= probe.success_threshold.unwrap_or(1)
                    } else {
                        false
                    };
                    if ready != status.ready {
                        self.shared
                            .update(&container.name, init, |s| s.ready = ready);
                    }
                }
                Some(_) => {}
            }
            if let Some(probe) = &container.liveness_probe
                && last_liveness.elapsed() >= period(probe, 10)
            {
                last_liveness = Instant::now();
                if self.check(&container, probe).await {
                    liveness_failures = 0;
                } else {
                    liveness_failures += 1;
                    if liveness_failures >= probe.failure_threshold.unwrap_or(3) {
                        tracing::warn!(container = %container.name, "Liveness probe failed; restarting");
                        self.kill(&container.name, init);
                        liveness_failures = 0;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill(&self, name: &str, init: bool) {
        if let Some(pid) = self
            .shared
            .get(name, init)
            .and_then(|s| s.pid)
            .and_then(|p| i32::try_from(p).ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// One HTTP GET probe, from the node's namespace to the pod's address, as the kubelet
    /// probes. Success is a status in 200..400.
    async fn check(&self, container: &Container, probe: &Probe) -> bool {
        let Some(get) = &probe.http_get else {
            // Only HTTP probes are used by Tandem's pods; others count as passing so the
            // limitation shows as a log line, not as a pod that never starts.
            tracing::warn!(container = %container.name, "Only httpGet probes are run on this node");
            return true;
        };
        let port = match &get.port {
            IntOrString::Int(p) => u16::try_from(*p).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        let Some(port) = port else { return false };
        let timeout = Duration::from_secs(
            probe
                .timeout_seconds
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(1),
        );
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        match net::http_get_in(
            &self.node.net.path(),
            SocketAddr::from((self.ip, port)),
            &path,
            timeout,
        )
        .await
        {
            Ok(response) => (200..400).contains(&response.status),
            Err(_) => false,
        }
    }
}

fn period(probe: &Probe, default_secs: u64) -> Duration {
    let secs = probe
        .period_seconds
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(default_secs.max(1));
    Duration::from_secs(secs)
}

/// The pod's network namespace name, from its UID (unique, and short enough for the veth).
fn netns_name(pod: &Pod) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let short: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(10)
        .collect();
    format!("tandem-pod-{short}")
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The tasks keeping a pod's projected volumes current; dropping them stops them.
#[derive(Debug, Default)]
struct Keepers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Keepers {
    fn drop(&mut self) {
        for keeper in &self.0 {
            keeper.abort();
        }
    }
}

/// Writes the pod's volumes under `dir/volumes/<name>`: ConfigMaps (registered so the node
/// keeps them current, and fills an optional one in once it exists), emptyDirs, and projected
/// volumes (tokens bound to the pod, kept current by the returned tasks).
async fn prepare_volumes(
    node: &Arc<NodeShared>,
    pod: &Pod,
    dir: &std::path::Path,
) -> Result<(BTreeMap<String, PathBuf>, Keepers)> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let bound = BoundPod {
        namespace: namespace.clone(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "default".into()),
    };
    let mut keepers = Keepers::default();
    let mut out = BTreeMap::new();
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let path = dir.join("volumes").join(&volume.name);
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        if let Some(source) = &volume.config_map {
            // Registered before the read, so a ConfigMap created in between is not missed.
            node.watch_config_map(&namespace, &source.name, path.clone(), source.items.clone());
            let api: Api<ConfigMap> = Api::namespaced(node.client.clone(), &namespace);
            let cm = api.get_opt(&source.name).await.map_err(|e| {
                Error::kube(format!("get ConfigMap {namespace}/{}", source.name), e)
            })?;
            if cm.is_none() && source.optional != Some(true) {
                return Err(Error::Unexpected(format!(
                    "FailedMount: ConfigMap {namespace}/{} not found",
                    source.name
                )));
            }
            let files = cm
                .as_ref()
                .map(|cm| {
                    volumes::config_map_files(
                        cm.data.as_ref(),
                        cm.binary_data.as_ref(),
                        source.items.as_deref(),
                    )
                })
                .unwrap_or_default();
            volumes::write_atomic(&path, &files)?;
        } else if let Some(source) = &volume.projected {
            let mut projected =
                Projected::new(node.client.clone(), bound.clone(), path.clone(), source);
            let next = projected.sync(SystemTime::now()).await?;
            let span = tracing::info_span!("projected", pod = %format!("{namespace}/{}", bound.name), volume = %volume.name);
            keepers
                .0
                .push(tokio::spawn(projected.keep(next).instrument(span)));
        } else if volume.empty_dir.is_none() {
            tracing::warn!(volume = %volume.name, "Volume type not supported on this node; mounted empty");
        }
        // Volumes are world-readable, as the kubelet's defaultMode 0644 makes them.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = if volume.empty_dir.is_some() {
            0o1777
        } else {
            0o755
        };
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        out.insert(volume.name.clone(), path);
    }
    Ok((out, keepers))
}

/// Patches the pod's status whenever a container's state changes.
async fn status_writer(
    api: Api<Pod>,
    name: String,
    shared: Arc<Shared>,
    ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    start_time: String,
) {
    let mut last = Value::Null;
    loop {
        let containers = shared
            .containers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        let status = render_status(&containers, ip, host_ip, &start_time);
        if status != last {
            let patch = json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => last = status,
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "Status patch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            () = shared.changed.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The pod status the kubelet would report for these containers. Pure.
fn render_status(
    containers: &[Status],
    ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    start_time: &str,
) -> Value {
    let init: Vec<&Status> = containers.iter().filter(|c| c.init).collect();
    let apps: Vec<&Status> = containers.iter().filter(|c| !c.init).collect();
    let initialized = init.iter().all(|c| match c.state {
        State::Terminated { exit_code, .. } => exit_code == 0,
        _ => c.started,
    });
    let containers_ready = initialized
        && apps.iter().all(|c| c.ready)
        && init
            .iter()
            .all(|c| matches!(c.state, State::Terminated { .. }) || c.ready);
    let phase = if initialized
        && apps
            .iter()
            .all(|c| matches!(c.state, State::Running { .. }))
    {
        "Running"
    } else {
        "Pending"
    };
    let condition = |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": start_time});
    json!({
        "phase": phase,
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "startTime": start_time,
        "conditions": [
            condition("PodReadyToStartContainers", true),
            condition("Initialized", initialized),
            condition("ContainersReady", containers_ready),
            condition("Ready", containers_ready),
            condition("PodScheduled", true),
        ],
        "initContainerStatuses": init.iter().map(|c| container_status(c)).collect::<Vec<_>>(),
        "containerStatuses": apps.iter().map(|c| container_status(c)).collect::<Vec<_>>(),
    })
}

fn container_status(c: &Status) -> Value {
    let state = match &c.state {
        State::Waiting(reason, message) => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { since } => json!({"running": {"startedAt": since}}),
        State::Terminated {
            exit_code,
            reason,
            since,
            until,
        } => {
            json!({"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": since, "finishedAt": until}})
        }
    };
    json!({
        "name": c.name,
        "image": c.image,
        "imageID": format!("tandem-node://{}", c.image),
        "containerID": c.pid.map(|p| format!("tandem-node://{p}")),
        "state": state,
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restarts,
    })
}
