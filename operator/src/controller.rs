//! The I/O around [`crate::render`]: reflectors that keep the inputs in memory, and the
//! reconcile pass that writes ConfigMaps and policy status.
//!
//! All replicas watch (so a new leader starts with warm caches); only the leader writes. Any
//! watch event wakes the reconciler, which waits a short debounce so that a burst of events
//! (a rollout, a Service with many slices) costs one pass. A pass renders once, then writes only
//! the ConfigMaps and statuses whose content changed: the "exactly the ConfigMaps it affects"
//! of the design falls out of the diff, because every workload carries the same services.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tandem_crds::identity::{TRUST_ROOTS_CONFIG_MAP, TRUST_ROOTS_KEY};
use tandem_crds::names::{CONFIG_KEY, OPERATOR_FIELD_MANAGER, config_map_name};
use tandem_crds::v1alpha1::{CircuitBreakerPolicy, PolicyStatus, TrafficPolicy};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::issuer::CurrentAuthority;
use crate::metrics::Metrics;
use crate::policy::{PolicyKey, PolicyKind, Verdict};
use crate::render::{
    BadAnnotation, Inputs, MAX_CONFIG_MAP_BYTES, Mesh, Rendered, WorkloadKey, is_injected, render,
    trust_namespaces, workloads,
};
use crate::status::{Programming, Transition, next_status};
use crate::{Error, Result};

/// Label on every ConfigMap the operator owns; the ConfigMap watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Annotation naming the ServiceAccount a ConfigMap is for (names may exceed a label's 63).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "tandem.dev/service-account";
/// Local-only annotation the ConfigMap reflector stores in place of the (large) data: the hash
/// of `config.json` (or of `roots.pem`) as it is in the cluster.
const DATA_HASH: &str = "tandem.dev/local-data-hash";

/// The watches, by the names logs and `pending` use.
pub const WATCHES: [&str; 8] = [
    "trafficpolicies",
    "circuitbreakerpolicies",
    "services",
    "endpointslices",
    "pods",
    "namespaces",
    "configmaps",
    "serviceaccounts",
];

/// In-memory views of the cluster, kept current by watches. Each store is empty until its
/// watch has listed once; [`Stores::wait_until_ready`] waits for all of them.
#[derive(Clone)]
pub struct Stores {
    traffic: Store<TrafficPolicy>,
    breakers: Store<CircuitBreakerPolicy>,
    services: Store<k8s_openapi::api::core::v1::Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    config_maps: Store<ConfigMap>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
}

/// The write halves of [`Stores`], one per watch; [`start_watches`] feeds them.
pub struct Writers {
    traffic: Writer<TrafficPolicy>,
    breakers: Writer<CircuitBreakerPolicy>,
    services: Writer<k8s_openapi::api::core::v1::Service>,
    slices: Writer<EndpointSlice>,
    pods: Writer<Pod>,
    namespaces: Writer<PartialObjectMeta<Namespace>>,
    config_maps: Writer<ConfigMap>,
    service_accounts: Writer<PartialObjectMeta<ServiceAccount>>,
}

#[cfg(test)]
impl Writers {
    /// Feeds watch `name` the start (`done == false`) or the end of a list, as its watch does.
    pub(crate) fn list_event(&mut self, name: &str, done: bool) {
        fn bare<K>(done: bool) -> Event<K> {
            if done { Event::InitDone } else { Event::Init }
        }
        match name {
            "trafficpolicies" => self.traffic.apply_watcher_event(&bare(done)),
            "circuitbreakerpolicies" => self.breakers.apply_watcher_event(&bare(done)),
            "services" => self.services.apply_watcher_event(&bare(done)),
            "endpointslices" => self.slices.apply_watcher_event(&bare(done)),
            "pods" => self.pods.apply_watcher_event(&bare(done)),
            "namespaces" => self.namespaces.apply_watcher_event(&bare(done)),
            "configmaps" => self.config_maps.apply_watcher_event(&bare(done)),
            "serviceaccounts" => self.service_accounts.apply_watcher_event(&bare(done)),
            other => panic!("no watch named {other}"),
        }
    }
}

impl Stores {
    /// Empty, unsynced stores and the writers that fill them.
    pub fn new() -> (Self, Writers) {
        let (traffic, traffic_w) = reflector::store();
        let (breakers, breakers_w) = reflector::store();
        let (services, services_w) = reflector::store();
        let (slices, slices_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        let (namespaces, namespaces_w) = reflector::store();
        let (config_maps, config_maps_w) = reflector::store();
        let (service_accounts, service_accounts_w) = reflector::store();
        let stores = Self {
            traffic,
            breakers,
            services,
            slices,
            pods,
            namespaces,
            config_maps,
            service_accounts,
        };
        let writers = Writers {
            traffic: traffic_w,
            breakers: breakers_w,
            services: services_w,
            slices: slices_w,
            pods: pods_w,
            namespaces: namespaces_w,
            config_maps: config_maps_w,
            service_accounts: service_accounts_w,
        };
        (stores, writers)
    }

    /// Waits until every watch has listed its objects once. Fails only if a watch task ended
    /// before that (its writer was dropped), in which case the stores never sync.
    pub async fn wait_until_ready(&self) -> Result<()> {
        let closed = |_| Error::WatchEnded;
        self.traffic.wait_until_ready().await.map_err(closed)?;
        self.breakers.wait_until_ready().await.map_err(closed)?;
        self.services.wait_until_ready().await.map_err(closed)?;
        self.slices.wait_until_ready().await.map_err(closed)?;
        self.pods.wait_until_ready().await.map_err(closed)?;
        self.namespaces.wait_until_ready().await.map_err(closed)?;
        self.config_maps.wait_until_ready().await.map_err(closed)?;
        self.service_accounts
            .wait_until_ready()
            .await
            .map_err(closed)?;
        Ok(())
    }

    /// The watches (names from [`WATCHES`]) that have not listed once yet.
    pub fn pending(&self) -> Vec<&'static str> {
        let synced = [
            is_synced(&self.traffic),
            is_synced(&self.breakers),
            is_synced(&self.services),
            is_synced(&self.slices),
            is_synced(&self.pods),
            is_synced(&self.namespaces),
            is_synced(&self.config_maps),
            is_synced(&self.service_accounts),
        ];
        WATCHES
            .into_iter()
            .zip(synced)
            .filter_map(|(name, synced)| (!synced).then_some(name))
            .collect()
    }

    fn inputs(&self, mesh: &Mesh) -> Inputs {
        Inputs {
            traffic_policies: self.traffic.state(),
            circuit_breaker_policies: self.breakers.state(),
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            pods: self.pods.state(),
            service_accounts: self.service_accounts.state(),
            namespaces: self.namespaces.state(),
            mesh: mesh.clone(),
        }
    }
}

/// Whether a store has seen its watch's first complete list (it never becomes unsynced again:
/// a later re-list swaps the new objects in whole, at its end).
fn is_synced<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// Starts one watch per input, filling `writers`; each event wakes `trigger`. Watch errors (an
/// unreachable apiserver, a missing right or resource) are logged, counted and retried with
/// backoff for ever: until its first list succeeds, a store stays unsynced and the operator
/// does nothing (see [`crate::sync`]).
pub fn start_watches(
    client: &Client,
    writers: Writers,
    trigger: &Arc<Notify>,
    metrics: &Metrics,
) -> Vec<JoinHandle<()>> {
    let [
        traffic,
        breakers,
        services,
        slices,
        pods,
        namespaces,
        config_maps,
        service_accounts,
    ] = WATCHES;
    let config = watcher::Config::default();
    vec![
        spawn_watch(
            traffic,
            watcher(Api::all(client.clone()), config.clone()).reflect(writers.traffic),
            trigger,
            metrics,
        ),
        spawn_watch(
            breakers,
            watcher(Api::all(client.clone()), config.clone()).reflect(writers.breakers),
            trigger,
            metrics,
        ),
        spawn_watch(
            services,
            watcher(Api::all(client.clone()), config.clone())
                .modify(|s: &mut k8s_openapi::api::core::v1::Service| {
                    s.managed_fields_mut().clear();
                })
                .reflect(writers.services),
            trigger,
            metrics,
        ),
        spawn_watch(
            slices,
            watcher(Api::all(client.clone()), config.clone())
                .modify(|s: &mut EndpointSlice| s.managed_fields_mut().clear())
                .reflect(writers.slices),
            trigger,
            metrics,
        ),
        // Pods cannot be selected by injection on the server (namespace-wide injection leaves
        // no pod label), so every pod is watched, only injected pods are kept, and those are
        // stripped to what rendering reads.
        spawn_watch(
            pods,
            watcher(Api::all(client.clone()), config.clone())
                .try_filter(|event| futures::future::ready(keeps_pod(event)))
                .modify(strip_pod)
                .reflect(writers.pods),
            trigger,
            metrics,
        ),
        spawn_watch(
            namespaces,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                config.clone(),
            )
            .reflect(writers.namespaces),
            trigger,
            metrics,
        ),
        spawn_watch(
            config_maps,
            watcher(
                Api::all(client.clone()),
                watcher::Config::default()
                    .labels(&format!("{MANAGED_BY_LABEL}={OPERATOR_FIELD_MANAGER}")),
            )
            .modify(hash_config_map)
            .reflect(writers.config_maps),
            trigger,
            metrics,
        ),
        // For their `tandem.dev/mtls` annotation only.
        spawn_watch(
            service_accounts,
            watcher(
                Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
                config.clone(),
            )
            .modify(|sa| sa.metadata.managed_fields = None)
            .reflect(writers.service_accounts),
            trigger,
            metrics,
        ),
    ]
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = std::result::Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff()
}

fn spawn_watch<S, K>(
    name: &'static str,
    stream: S,
    trigger: &Arc<Notify>,
    metrics: &Metrics,
) -> JoinHandle<()>
where
    S: futures::Stream<Item = std::result::Result<Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    let trigger = trigger.clone();
    let errors = metrics.watch_errors.clone();
    let span = tracing::info_span!("watch", watch = name);
    let task = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // Wake the reconciler only on complete information: individual init events
                // are followed by InitDone.
                Ok(Event::Init | Event::InitApply(_)) => {}
                Ok(_) => trigger.notify_one(),
                Err(error) => {
                    errors.inc();
                    warn!(watch = name, %error, "Watch failed; retrying with backoff");
                }
            }
        }
        warn!(watch = name, "Watch ended");
    };
    tokio::spawn(tracing::Instrument::instrument(task, span))
}

/// Keeps deletions (harmless when the pod was never stored) and injected pods.
fn keeps_pod(event: &Event<Pod>) -> bool {
    match event {
        Event::Apply(pod) | Event::InitApply(pod) => is_injected(pod),
        Event::Delete(_) | Event::Init | Event::InitDone => true,
    }
}

/// Drops everything rendering does not read, so 10,000 pods cost little memory.
fn strip_pod(pod: &mut Pod) {
    let meta = pod.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for init in spec.init_containers.iter_mut().flatten() {
            *init = k8s_openapi::api::core::v1::Container {
                name: std::mem::take(&mut init.name),
                ..Default::default()
            };
        }
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

/// Replaces a ConfigMap's data by the hash of its `config.json` (up to 1 MiB per ConfigMap
/// would otherwise sit in memory once per ServiceAccount), or of its `roots.pem` for the trust
/// roots.
fn hash_config_map(config_map: &mut ConfigMap) {
    let hash = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY).or_else(|| d.get(TRUST_ROOTS_KEY)))
        .map(|json| hex_sha256(json.as_bytes()))
        .unwrap_or_default();
    config_map.data = None;
    config_map.binary_data = None;
    config_map.metadata.managed_fields = None;
    config_map
        .annotations_mut()
        .insert(DATA_HASH.to_owned(), hash);
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reconciler

/// What a pass needs besides the stores.
pub struct Reconciler {
    client: Client,
    stores: Stores,
    metrics: Metrics,
    recorder: Recorder,
    /// Parallel writes per pass.
    concurrency: usize,
    /// Trust domain and default mTLS mode.
    mesh: Mesh,
    /// The issuer, whose trust anchors go to every namespace with injected pods.
    authority: CurrentAuthority,
    /// Ignored annotations already reported by an Event (each is reported once per value).
    reported: Mutex<BTreeSet<BadAnnotation>>,
}

impl Reconciler {
    /// A reconciler writing through `client`; `identity` names this replica in Events.
    pub fn new(
        client: Client,
        stores: Stores,
        metrics: Metrics,
        identity: &str,
        mesh: Mesh,
        authority: CurrentAuthority,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: OPERATOR_FIELD_MANAGER.to_owned(),
                instance: Some(identity.to_owned()),
            },
        );
        Self {
            client,
            stores,
            metrics,
            recorder,
            concurrency: 16,
            mesh,
            authority,
            reported: Mutex::new(BTreeSet::new()),
        }
    }

    /// Runs passes whenever `trigger` fires while this replica leads and its stores have
    /// synced (`synced`, see [`crate::sync`]), until `shutdown`. A failed pass is retried with
    /// exponential backoff (0.5 s doubling to 30 s).
    pub async fn run(
        self,
        trigger: Arc<Notify>,
        debounce: Duration,
        mut leader: watch::Receiver<bool>,
        mut synced: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Nothing before every store has synced. (The gate's sender is gone once it has
        // opened, so it is awaited here once, not selected on below: a closed channel would
        // end the loop.)
        if !crate::sync::wait_open(&mut synced, &mut shutdown).await {
            return;
        }
        let mut backoff = Duration::from_millis(500);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = trigger.notified() => {}
                () = retry => {}
                changed = leader.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if !crate::sync::may_reconcile(*leader.borrow(), *synced.borrow()) {
                continue;
            }
            // Let a burst of events settle into one pass.
            tokio::time::sleep(debounce).await;
            retry_at = None;
            match self.pass(&leader).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(error) => {
                    self.metrics.reconcile_errors.inc();
                    warn!(%error, retry_in_ms = backoff.as_millis(), "Reconcile failed");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// One pass: render, write changed ConfigMaps, delete orphaned ones, update status.
    async fn pass(&self, leader: &watch::Receiver<bool>) -> Result<()> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let inputs = self.stores.inputs(&self.mesh);
        let rendered = render(&inputs);
        let terminating: BTreeSet<String> = self
            .stores
            .namespaces
            .state()
            .iter()
            .filter(|ns| ns.metadata.deletion_timestamp.is_some())
            .map(|ns| ns.name_any())
            .collect();
        let wanted: Vec<WorkloadKey> = workloads(&inputs.pods)
            .into_iter()
            .filter(|w| !terminating.contains(&w.namespace))
            .collect();

        let outcome = self.write_config_maps(&rendered, &wanted, leader).await;
        let trust: BTreeSet<String> = trust_namespaces(&inputs.pods)
            .into_iter()
            .filter(|ns| !terminating.contains(ns))
            .collect();
        let roots_failed = self.write_trust_roots(&trust, leader).await;
        let deleted = self.delete_orphans(&wanted, &trust, leader).await;
        if *leader.borrow() {
            self.report_annotations(&rendered.bad_annotations).await;
        }
        let programming = match &outcome {
            WriteOutcome::TooLarge { bytes } => Programming::TooLarge(format!(
                "the proxy config would be {bytes} bytes, over the ConfigMap limit of \
                 {MAX_CONFIG_MAP_BYTES}; nothing was written"
            )),
            WriteOutcome::Written { failed, .. } if *failed > 0 => Programming::Pending(format!(
                "{failed} of {} proxy ConfigMaps could not be written yet; retrying",
                wanted.len()
            )),
            WriteOutcome::Written { .. } => Programming::Done {
                config_maps: wanted.len(),
            },
        };
        let status_failures = self.write_statuses(&rendered, &programming, leader).await;
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        debug!(
            services = rendered.services.len(),
            workloads = wanted.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "Reconciled"
        );
        match (outcome, roots_failed, deleted, status_failures) {
            (WriteOutcome::Written { failed: 0 }, 0, Ok(()), 0) => Ok(()),
            (WriteOutcome::TooLarge { .. }, 0, Ok(()), 0) => Ok(()),
            (outcome, roots_failed, deleted, status_failures) => Err(Error::Incomplete {
                config_maps: roots_failed
                    + match outcome {
                        WriteOutcome::Written { failed, .. } => failed,
                        WriteOutcome::TooLarge { .. } => 0,
                    },
                deletes: usize::from(deleted.is_err()),
                statuses: status_failures,
            }),
        }
    }

    async fn write_config_maps(
        &self,
        rendered: &Rendered,
        wanted: &[WorkloadKey],
        leader: &watch::Receiver<bool>,
    ) -> WriteOutcome {
        let mut documents = Vec::with_capacity(wanted.len());
        for workload in wanted {
            let config = rendered.config_for(&workload.namespace, &workload.service_account);
            if let Err(errors) = config.validate() {
                // Every policy was validated on its own; a failure here is a bug, and writing
                // would only make proxies refuse the file.
                warn!(%errors, namespace = %workload.namespace, "Rendered config is invalid; not written");
                return WriteOutcome::Written {
                    failed: wanted.len(),
                };
            }
            let json = crate::render::document(&config);
            let bytes = json.len() + CONFIG_KEY.len();
            if bytes > MAX_CONFIG_MAP_BYTES {
                warn!(bytes, namespace = %workload.namespace, service_account = %workload.service_account, "Proxy config too large; nothing written");
                return WriteOutcome::TooLarge { bytes };
            }
            documents.push((workload, json));
        }
        let changed: Vec<_> = documents
            .into_iter()
            .filter(|(workload, json)| {
                let name = config_map_name(&workload.service_account);
                let current = self
                    .stores
                    .config_maps
                    .get(&reflector::ObjectRef::new(&name).within(&workload.namespace));
                let current_hash = current
                    .as_ref()
                    .and_then(|cm| cm.annotations().get(DATA_HASH).cloned());
                current_hash.as_deref() != Some(hex_sha256(json.as_bytes()).as_str())
            })
            .collect();
        if !*leader.borrow() {
            return WriteOutcome::Written {
                failed: changed.len(),
            };
        }
        let failed = stream::iter(changed)
            .map(|(workload, json)| self.apply_config_map(workload, json))
            .buffer_unordered(self.concurrency)
            .filter(|r| futures::future::ready(r.is_err()))
            .count()
            .await;
        WriteOutcome::Written { failed }
    }

    async fn apply_config_map(&self, workload: &WorkloadKey, json: String) -> Result<()> {
        let name = config_map_name(&workload.service_account);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &workload.namespace);
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": workload.namespace,
                "labels": { MANAGED_BY_LABEL: OPERATOR_FIELD_MANAGER },
                "annotations": { SERVICE_ACCOUNT_ANNOTATION: workload.service_account },
            },
            "data": { CONFIG_KEY: json },
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        match api.patch(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => {
                self.metrics.config_map_applies.inc();
                info!(namespace = %workload.namespace, config_map = %name, "Applied proxy config");
                Ok(())
            }
            Err(source) => {
                warn!(namespace = %workload.namespace, config_map = %name, error = %source, "ConfigMap apply failed");
                Err(Error::Kube {
                    action: format!("apply ConfigMap {}/{name}", workload.namespace),
                    source,
                })
            }
        }
    }

    /// Writes the trust roots ConfigMap into each of `namespaces` where it is missing or
    /// differs from the issuer's `ca.crt`; returns how many writes failed. Nothing is written
    /// before the issuer is loaded (proxies then keep whatever roots they have).
    async fn write_trust_roots(
        &self,
        namespaces: &BTreeSet<String>,
        leader: &watch::Receiver<bool>,
    ) -> usize {
        let Some(authority) = self.authority.borrow().clone() else {
            return 0;
        };
        let hash = hex_sha256(authority.roots_pem.as_bytes());
        let changed: Vec<&String> = namespaces
            .iter()
            .filter(|ns| {
                let current = self
                    .stores
                    .config_maps
                    .get(&reflector::ObjectRef::new(TRUST_ROOTS_CONFIG_MAP).within(ns));
                current
                    .as_ref()
                    .and_then(|cm| cm.annotations().get(DATA_HASH).cloned())
                    .as_deref()
                    != Some(hash.as_str())
            })
            .collect();
        if !*leader.borrow() {
            return changed.len();
        }
        stream::iter(changed)
            .map(|ns| self.apply_trust_roots(ns, &authority.roots_pem))
            .buffer_unordered(self.concurrency)
            .filter(|r| futures::future::ready(r.is_err()))
            .count()
            .await
    }

    async fn apply_trust_roots(&self, namespace: &str, roots_pem: &str) -> Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": TRUST_ROOTS_CONFIG_MAP,
                "namespace": namespace,
                "labels": { MANAGED_BY_LABEL: OPERATOR_FIELD_MANAGER },
            },
            "data": { TRUST_ROOTS_KEY: roots_pem },
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        match api
            .patch(TRUST_ROOTS_CONFIG_MAP, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                self.metrics.config_map_applies.inc();
                info!(%namespace, config_map = TRUST_ROOTS_CONFIG_MAP, "Applied the trust roots");
                Ok(())
            }
            Err(source) => {
                warn!(%namespace, config_map = TRUST_ROOTS_CONFIG_MAP, error = %source, "ConfigMap apply failed");
                Err(Error::Kube {
                    action: format!("apply ConfigMap {namespace}/{TRUST_ROOTS_CONFIG_MAP}"),
                    source,
                })
            }
        }
    }

    /// Publishes one Warning Event per ignored annotation value (on the Namespace or
    /// ServiceAccount that carries it); a value seen before is not reported again.
    async fn report_annotations(&self, bad: &[BadAnnotation]) {
        let mut reported = self.reported.lock().await;
        // Forget what was fixed, so the same mistake made again is reported again.
        reported.retain(|b| bad.contains(b));
        for annotation in bad {
            if reported.contains(annotation) {
                continue;
            }
            warn!(kind = annotation.kind, namespace = %annotation.namespace, name = %annotation.name, value = %annotation.value, "Ignored an invalid tandem.dev/mtls annotation");
            let reference = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some(annotation.kind.to_owned()),
                name: Some(annotation.name.clone()),
                namespace: (!annotation.namespace.is_empty()).then(|| annotation.namespace.clone()),
                ..ObjectReference::default()
            };
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "InvalidMtlsMode".to_owned(),
                note: Some(truncate(&annotation.message(), 1000)),
                action: "RenderProxyConfig".to_owned(),
                secondary: None,
            };
            match self.recorder.publish(&event, &reference).await {
                Ok(()) => {
                    reported.insert(annotation.clone());
                }
                Err(error) => warn!(%error, "Could not publish an Event"),
            }
        }
    }

    /// Deletes the proxy ConfigMaps whose ServiceAccount has no injected pod any more, and the
    /// trust roots of namespaces without injected pods.
    async fn delete_orphans(
        &self,
        wanted: &[WorkloadKey],
        trust: &BTreeSet<String>,
        leader: &watch::Receiver<bool>,
    ) -> Result<()> {
        let mut wanted: BTreeSet<(String, String)> = wanted
            .iter()
            .map(|w| (w.namespace.clone(), config_map_name(&w.service_account)))
            .collect();
        wanted.extend(
            trust
                .iter()
                .map(|ns| (ns.clone(), TRUST_ROOTS_CONFIG_MAP.to_owned())),
        );
        let mut result = Ok(());
        for config_map in self.stores.config_maps.state() {
            let key = (
                config_map.namespace().unwrap_or_default(),
                config_map.name_any(),
            );
            if wanted.contains(&key) || !*leader.borrow() {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &key.0);
            match api.delete(&key.1, &DeleteParams::default()).await {
                Ok(_) => {
                    self.metrics.config_map_deletes.inc();
                    info!(namespace = %key.0, config_map = %key.1, "Deleted proxy config: no injected pod uses it");
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => {
                    warn!(namespace = %key.0, config_map = %key.1, error = %source, "ConfigMap delete failed");
                    result = Err(Error::Kube {
                        action: format!("delete ConfigMap {}/{}", key.0, key.1),
                        source,
                    });
                }
            }
        }
        result
    }

    /// Writes every policy's status that changed; returns how many writes failed.
    async fn write_statuses(
        &self,
        rendered: &Rendered,
        programming: &Programming,
        leader: &watch::Receiver<bool>,
    ) -> usize {
        let mut failures = 0;
        for policy in self.stores.traffic.state() {
            if !*leader.borrow() {
                return failures;
            }
            failures += usize::from(
                self.update_status(PolicyKind::Traffic, policy.as_ref(), rendered, programming)
                    .await
                    .is_err(),
            );
        }
        for policy in self.stores.breakers.state() {
            if !*leader.borrow() {
                return failures;
            }
            failures += usize::from(
                self.update_status(
                    PolicyKind::CircuitBreaker,
                    policy.as_ref(),
                    rendered,
                    programming,
                )
                .await
                .is_err(),
            );
        }
        failures
    }

    async fn update_status<P>(
        &self,
        kind: PolicyKind,
        policy: &P,
        rendered: &Rendered,
        programming: &Programming,
    ) -> Result<()>
    where
        P: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + HasStatus
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let key = PolicyKey::of(kind, policy);
        let Some(verdict) = rendered.verdicts.get(&key) else {
            return Ok(());
        };
        let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let previous = policy.status();
        let (status, transitions) = next_status(
            previous,
            policy.meta().generation,
            verdict,
            programming,
            &now,
        );
        if previous == Some(&status) {
            return Ok(());
        }
        let api: Api<P> = Api::namespaced(self.client.clone(), &key.namespace);
        let body = serde_json::json!({
            "apiVersion": P::api_version(&()),
            "kind": P::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        api.patch_status(&key.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|source| {
                warn!(policy = %key, error = %source, "Status write failed");
                Error::Kube {
                    action: format!("write status of {key}"),
                    source,
                }
            })?;
        self.metrics.status_writes.inc();
        if let Verdict::Rejected { reason, message } = verdict {
            info!(policy = %key, reason, message, "Policy not accepted");
        }
        self.publish(policy, &transitions).await;
        Ok(())
    }

    /// Records condition changes as Kubernetes Events; a failed Event is logged, not retried.
    async fn publish<P: Resource<DynamicType = ()>>(&self, policy: &P, transitions: &[Transition]) {
        let reference = policy.object_ref(&());
        for transition in transitions {
            let event = KubeEvent {
                type_: if transition.holds {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: transition.reason.clone(),
                note: Some(truncate(&transition.message, 1000)),
                action: transition.type_.to_owned(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                warn!(%error, "Could not publish an Event");
            }
        }
    }
}

/// What happened to the ConfigMaps in a pass.
enum WriteOutcome {
    /// Configs fit; `failed` writes did not go through.
    Written { failed: usize },
    /// The config is over 1 MiB; nothing was written.
    TooLarge { bytes: usize },
}

/// Cuts an Event note to the apiserver's limit, on a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// Access to a policy's status, for both kinds.
pub trait HasStatus {
    /// The status, if any.
    fn status(&self) -> Option<&PolicyStatus>;
}

impl HasStatus for TrafficPolicy {
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}

impl HasStatus for CircuitBreakerPolicy {
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
}
