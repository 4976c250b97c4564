//! The operator's view of the cluster: one reflector store per input, kept current by watches,
//! and the helpers that keep what they hold small (pods stripped to what rendering reads,
//! ConfigMaps reduced to the hash of their data).
//!
//! Every replica watches (so a new leader starts with warm caches); any event wakes the
//! reconciler ([`crate::controller`]). A store is empty until its watch has listed once:
//! [`crate::sync`] keeps everything closed until all have.
//!
//! Pods are watched through their metadata only (as Linkerd's destination does): the webhook
//! records what rendering reads from a pod's spec as annotations (`tandem.dev/service-account`,
//! `tandem.dev/container-ports`), a second metadata watch selected on the phase lists the
//! finished pods (they stop needing a config), and a pod from an older webhook, without the
//! annotations, is fetched once ([`PodResolver`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tandem_crds::identity::TRUST_ROOTS_KEY;
use tandem_crds::names::{
    CONFIG_KEY, CONTAINER_PORTS_ANNOTATION, DEPENDENCIES_ANNOTATION, OPERATOR_FIELD_MANAGER,
    PROXY_VERSION_ANNOTATION,
};
use tandem_crds::pods;
use tandem_crds::v1alpha1::{AuthorizationPolicy, CircuitBreakerPolicy, TrafficPolicy};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::metrics::Metrics;
use crate::render::{Inputs, Mesh};
use crate::{Error, Result};

/// Label on every ConfigMap the operator owns; the ConfigMap watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Annotation naming the ServiceAccount a ConfigMap is for (names may exceed a label's 63);
/// the same key the webhook records on a pod.
pub use tandem_crds::names::SERVICE_ACCOUNT_ANNOTATION;
/// Local-only annotation the ConfigMap reflector stores in place of the (large) data: the hash
/// of `config.json` (or of `roots.pem`) as it is in the cluster.
pub(crate) const DATA_HASH: &str = "tandem.dev/local-data-hash";
/// Annotation on a proxy ConfigMap: the version of the config it holds (so an unchanged
/// content keeps its version across an operator restart).
pub const CONFIG_VERSION_ANNOTATION: &str = "tandem.dev/config-version";
/// Annotation on a proxy ConfigMap: the Services (`<namespace>/<name>`, comma-separated) its
/// workload was seen calling, learned through discovery; seeded back after a restart.
pub const LEARNED_ANNOTATION: &str = "tandem.dev/learned";

/// The watches, by the names logs and `pending` use.
pub const WATCHES: [&str; 10] = [
    "trafficpolicies",
    "circuitbreakerpolicies",
    "authorizationpolicies",
    "services",
    "endpointslices",
    "pods",
    "finishedpods",
    "namespaces",
    "configmaps",
    "serviceaccounts",
];

/// In-memory views of the cluster, kept current by watches. Each store is empty until its
/// watch has listed once; [`Stores::wait_until_ready`] waits for all of them.
#[derive(Clone)]
pub struct Stores {
    pub(crate) traffic: Store<TrafficPolicy>,
    pub(crate) breakers: Store<CircuitBreakerPolicy>,
    pub(crate) authorizations: Store<AuthorizationPolicy>,
    pub(crate) services: Store<k8s_openapi::api::core::v1::Service>,
    pub(crate) slices: Store<EndpointSlice>,
    /// Injected pods as their metadata tells them ([`pods::from_metadata`]).
    pub(crate) pods: Store<Pod>,
    /// Every pod whose phase is Succeeded or Failed (metadata, without labels or annotations).
    pub(crate) finished: Store<PartialObjectMeta<Pod>>,
    pub(crate) namespaces: Store<PartialObjectMeta<Namespace>>,
    pub(crate) config_maps: Store<ConfigMap>,
    pub(crate) service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
}

/// The write halves of [`Stores`], one per watch; [`start_watches`] feeds them.
pub struct Writers {
    traffic: Writer<TrafficPolicy>,
    breakers: Writer<CircuitBreakerPolicy>,
    authorizations: Writer<AuthorizationPolicy>,
    services: Writer<k8s_openapi::api::core::v1::Service>,
    slices: Writer<EndpointSlice>,
    pods: Writer<Pod>,
    finished: Writer<PartialObjectMeta<Pod>>,
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
            "authorizationpolicies" => self.authorizations.apply_watcher_event(&bare(done)),
            "services" => self.services.apply_watcher_event(&bare(done)),
            "endpointslices" => self.slices.apply_watcher_event(&bare(done)),
            "pods" => self.pods.apply_watcher_event(&bare(done)),
            "finishedpods" => self.finished.apply_watcher_event(&bare(done)),
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
        let (authorizations, authorizations_w) = reflector::store();
        let (services, services_w) = reflector::store();
        let (slices, slices_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        let (finished, finished_w) = reflector::store();
        let (namespaces, namespaces_w) = reflector::store();
        let (config_maps, config_maps_w) = reflector::store();
        let (service_accounts, service_accounts_w) = reflector::store();
        let stores = Self {
            traffic,
            breakers,
            authorizations,
            services,
            slices,
            pods,
            finished,
            namespaces,
            config_maps,
            service_accounts,
        };
        let writers = Writers {
            traffic: traffic_w,
            breakers: breakers_w,
            authorizations: authorizations_w,
            services: services_w,
            slices: slices_w,
            pods: pods_w,
            finished: finished_w,
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
        self.authorizations
            .wait_until_ready()
            .await
            .map_err(closed)?;
        self.services.wait_until_ready().await.map_err(closed)?;
        self.slices.wait_until_ready().await.map_err(closed)?;
        self.pods.wait_until_ready().await.map_err(closed)?;
        self.finished.wait_until_ready().await.map_err(closed)?;
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
            is_synced(&self.authorizations),
            is_synced(&self.services),
            is_synced(&self.slices),
            is_synced(&self.pods),
            is_synced(&self.finished),
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

    /// A snapshot of everything rendering reads.
    pub fn inputs(&self, mesh: &Mesh) -> Inputs {
        Inputs {
            traffic_policies: self.traffic.state(),
            circuit_breaker_policies: self.breakers.state(),
            authorization_policies: self.authorizations.state(),
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            pods: self.unfinished_pods(),
            service_accounts: self.service_accounts.state(),
            namespaces: self.namespaces.state(),
            mesh: mesh.clone(),
        }
    }
}

impl Stores {
    /// The injected pods less those that finished: a finished pod no longer needs a config.
    /// Matched by UID, so a pod recreated under a finished one's name counts.
    fn unfinished_pods(&self) -> Vec<Arc<Pod>> {
        let finished = self.finished.state();
        let finished: HashSet<&str> = finished
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .uid
                    .as_deref()
                    .is_none_or(|uid| !finished.contains(uid))
            })
            .collect()
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
        authorizations,
        services,
        slices,
        pods,
        finished,
        namespaces,
        config_maps,
        service_accounts,
    ] = WATCHES;
    let resolver = Arc::new(PodResolver::new(client, metrics));
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
            authorizations,
            watcher(Api::all(client.clone()), config.clone())
                .modify(|p: &mut AuthorizationPolicy| p.managed_fields_mut().clear())
                .reflect(writers.authorizations),
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
        // no pod label), so every pod's metadata is watched, only injected pods are kept, and
        // those become the small pods rendering reads.
        spawn_watch(
            pods,
            watcher(
                Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                config.clone(),
            )
            .try_filter(|event| futures::future::ready(keeps_pod(event)))
            .then(move |event| {
                let resolver = resolver.clone();
                async move { resolver.event(event).await }
            })
            .filter_map(futures::future::ready)
            .reflect(writers.pods),
            trigger,
            metrics,
        ),
        // The phase is not in the metadata: the server selects the finished pods.
        spawn_watch(
            finished,
            watcher(
                Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                watcher::Config::default().fields(FINISHED_PHASES),
            )
            .modify(|pod| {
                let meta = &mut pod.metadata;
                meta.managed_fields = None;
                meta.annotations = None;
                meta.labels = None;
                meta.owner_references = None;
            })
            .reflect(writers.finished),
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
        // For their `tandem.dev/mtls` annotation, and whether a policy's target exists.
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

/// Selects the pods whose phase is Succeeded or Failed (the phases `is_active` excludes).
const FINISHED_PHASES: &str = "status.phase!=Pending,status.phase!=Running,status.phase!=Unknown";

/// How many older pods' recorded facts [`PodResolver`] keeps (a pod's fact is read once per
/// pod, not once per event; a bound, because only the oldest pods need it and they go).
const FETCHED_LIMIT: usize = 10_000;

/// Keeps deletions (harmless when the pod was never stored) and injected pods.
fn keeps_pod(event: &Event<PartialObjectMeta<Pod>>) -> bool {
    match event {
        Event::Apply(pod) | Event::InitApply(pod) => pods::is_marked_injected(&pod.metadata),
        Event::Delete(_) | Event::Init | Event::InitDone => true,
    }
}

/// What rendering reads from a pod's spec: its ServiceAccount and named TCP ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    service_account: String,
    ports: Vec<(String, u16)>,
}

impl Recorded {
    /// As the webhook recorded it on the pod, if it did (and readably).
    pub fn from_annotations(meta: &ObjectMeta) -> Option<Self> {
        let annotations = meta.annotations.as_ref()?;
        let service_account = annotations
            .get(SERVICE_ACCOUNT_ANNOTATION)
            .filter(|sa| !sa.is_empty())?;
        let ports = annotations
            .get(CONTAINER_PORTS_ANNOTATION)
            .map_or(Ok(Vec::new()), |value| pods::parse_recorded_ports(value));
        match ports {
            Ok(ports) => Some(Self {
                service_account: service_account.clone(),
                ports,
            }),
            Err(error) => {
                // Read from the spec instead: a hand-edited annotation loses nothing.
                warn!(pod = %pod_name(meta), %error, "Unreadable annotation; reading the pod");
                None
            }
        }
    }

    /// As the pod's spec says.
    pub fn from_pod(pod: &Pod) -> Self {
        Self {
            service_account: pods::service_account(pod).to_owned(),
            ports: pods::named_tcp_ports(pod)
                .into_iter()
                .map(|(name, port)| (name.to_owned(), port))
                .collect(),
        }
    }
}

/// The pod rendering reads, from a pod's metadata and what is recorded about its spec.
pub fn metadata_pod(mut metadata: ObjectMeta, recorded: &Recorded) -> Pod {
    metadata.managed_fields = None;
    // Only the controller: `pods::workload_name` derives the pod's workload from it.
    metadata.owner_references = metadata.owner_references.map(|owners| {
        owners
            .into_iter()
            .filter(|o| o.controller == Some(true))
            .collect()
    });
    // Only the annotations rendering reads: the dependencies the pod names, and the
    // webhook's mark of injection.
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|k, _| k == DEPENDENCIES_ANNOTATION || k == PROXY_VERSION_ANNOTATION);
    }
    pods::from_metadata(metadata, &recorded.service_account, &recorded.ports)
}

fn pod_name(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Turns metadata events into the pods rendering reads. A pod injected by an older webhook
/// (without the recorded annotations) is read once with a GET, remembered by UID, so
/// upgrading the operator before the webhook loses nothing.
pub(crate) struct PodResolver {
    client: Client,
    errors: prometheus_client::metrics::counter::Counter,
    fetched: Mutex<Fetched>,
}

/// The facts read from older pods, by UID, oldest first out.
#[derive(Default)]
struct Fetched {
    by_uid: HashMap<String, Recorded>,
    order: VecDeque<String>,
}

impl Fetched {
    fn insert(&mut self, uid: String, recorded: Recorded) {
        if self.by_uid.insert(uid.clone(), recorded).is_none() {
            self.order.push_back(uid);
        }
        while self.order.len() > FETCHED_LIMIT {
            if let Some(oldest) = self.order.pop_front() {
                self.by_uid.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, uid: &str) {
        if self.by_uid.remove(uid).is_some() {
            self.order.retain(|u| u != uid);
        }
    }
}

impl PodResolver {
    pub(crate) fn new(client: &Client, metrics: &Metrics) -> Self {
        Self {
            client: client.clone(),
            errors: metrics.watch_errors.clone(),
            fetched: Mutex::default(),
        }
    }

    /// The event for the pods store; `None` drops it (a pod gone before it could be read:
    /// its deletion follows).
    pub(crate) async fn event(
        &self,
        event: std::result::Result<Event<PartialObjectMeta<Pod>>, watcher::Error>,
    ) -> Option<std::result::Result<Event<Pod>, watcher::Error>> {
        let event = match event {
            Ok(event) => event,
            Err(error) => return Some(Err(error)),
        };
        Some(Ok(match event {
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
            Event::Apply(pod) => Event::Apply(self.pod(pod.metadata).await?),
            Event::InitApply(pod) => Event::InitApply(self.pod(pod.metadata).await?),
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.fetched_facts().remove(uid);
                }
                Event::Delete(Pod {
                    metadata: pod.metadata,
                    ..Pod::default()
                })
            }
        }))
    }

    async fn pod(&self, metadata: ObjectMeta) -> Option<Pod> {
        let recorded = match Recorded::from_annotations(&metadata) {
            Some(recorded) => recorded,
            None => self.fetch(&metadata).await?,
        };
        Some(metadata_pod(metadata, &recorded))
    }

    fn fetched_facts(&self) -> std::sync::MutexGuard<'_, Fetched> {
        // The map holds plain data: a panic elsewhere cannot leave it half-written.
        self.fetched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads an older pod's spec once (then from memory), retrying with backoff until the
    /// apiserver answers; `None` when the pod is gone or replaced under its name.
    async fn fetch(&self, meta: &ObjectMeta) -> Option<Recorded> {
        let uid = meta.uid.clone().unwrap_or_default();
        if let Some(recorded) = self.fetched_facts().by_uid.get(&uid) {
            return Some(recorded.clone());
        }
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            meta.namespace.as_deref().unwrap_or_default(),
        );
        let name = meta.name.as_deref().unwrap_or_default();
        let mut delay = Duration::from_millis(200);
        let pod = loop {
            match api.get_opt(name).await {
                Ok(pod) => break pod,
                Err(error) => {
                    self.errors.inc();
                    warn!(pod = %pod_name(meta), %error, "Reading an older pod failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let pod = pod.filter(|p| p.metadata.uid.as_deref().unwrap_or_default() == uid)?;
        let recorded = Recorded::from_pod(&pod);
        self.fetched_facts().insert(uid, recorded.clone());
        Some(recorded)
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

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
