//! The hub between the reconciler and the config stream: the current view of every workload,
//! who watches it, what each proxy runs, and what proxies learned they need.
//!
//! The reconciler [`Hub::publish`]es a workload's config after each pass that changed it; each
//! watch ([`crate::stream`]) follows its workload's [`watch`] channel and sends the difference.
//! Proxies report the version they applied ([`Hub::applied`]): that feeds
//! `tandem_proxy_convergence_seconds` and the per-policy proxy counts in status. Discovery
//! ([`Hub::learn`]) adds a Service to a workload's view and wakes the reconciler.
//!
//! Nothing here does I/O. The locks are held for a map operation each, never across an await.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use tandem_crds::contract::{ConfigSource, ProxyConfig, ServiceRef, generation_of};
use tokio::sync::{Notify, watch};

use crate::metrics::StreamMetrics;
use crate::render::WorkloadKey;

/// One published version of a workload's config.
#[derive(Debug)]
pub struct View {
    /// The config (its `version` carries the generation).
    pub config: Arc<ProxyConfig>,
    /// When the operator saw the first change this version is the first to carry; convergence
    /// is measured from here.
    pub changed_at: Instant,
}

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What one proxy last reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its workload.
    pub workload: WorkloadKey,
    /// The version it runs.
    pub version: String,
    /// Where that version came from.
    pub source: ConfigSource,
}

/// Services by cluster IP, each with its ports: what discovery resolves addresses with.
pub type AddressTable = HashMap<IpAddr, Vec<(u16, ServiceRef)>>;

/// See the module documentation.
pub struct Hub {
    views: RwLock<HashMap<WorkloadKey, watch::Sender<Option<Arc<View>>>>>,
    addresses: RwLock<Arc<AddressTable>>,
    learned: Mutex<BTreeMap<WorkloadKey, BTreeSet<ServiceRef>>>,
    applied: Mutex<HashMap<PodKey, Applied>>,
    watching: Mutex<HashMap<PodKey, usize>>,
    changed: Arc<Notify>,
    metrics: StreamMetrics,
}

impl Hub {
    /// An empty hub; `changed` is notified when discovery adds to a view (the reconciler's
    /// trigger).
    pub fn new(changed: Arc<Notify>, metrics: StreamMetrics) -> Self {
        Self {
            views: RwLock::default(),
            addresses: RwLock::default(),
            learned: Mutex::default(),
            applied: Mutex::default(),
            watching: Mutex::default(),
            changed,
            metrics,
        }
    }

    /// The stream's metrics.
    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    // === Views ===

    /// Makes `config` the workload's current view (a no-op when that version is already
    /// current). `changed_at` is when the oldest change it carries was seen.
    pub fn publish(&self, workload: &WorkloadKey, config: ProxyConfig, changed_at: Instant) {
        let mut views = write(&self.views);
        let sender = views
            .entry(workload.clone())
            .or_insert_with(|| watch::channel(None).0);
        let current = sender.borrow().as_ref().map(|v| v.config.version.clone());
        if current.as_deref() == Some(config.version.as_str()) {
            return;
        }
        sender.send_replace(Some(Arc::new(View {
            config: Arc::new(config),
            changed_at,
        })));
    }

    /// Forgets a workload that has no pods any more: its watches end.
    pub fn retire(&self, workload: &WorkloadKey) {
        write(&self.views).remove(workload);
        lock(&self.learned).remove(workload);
    }

    /// The workload's view as it changes; `None` in it until the first pass rendered one.
    pub fn subscribe(&self, workload: &WorkloadKey) -> watch::Receiver<Option<Arc<View>>> {
        write(&self.views)
            .entry(workload.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// The workload's current view.
    pub fn current(&self, workload: &WorkloadKey) -> Option<Arc<View>> {
        read(&self.views)
            .get(workload)
            .and_then(|s| s.borrow().clone())
    }

    // === Discovery ===

    /// Replaces the table discovery resolves addresses with (once per pass).
    pub fn set_addresses(&self, table: AddressTable) {
        *write(&self.addresses) = Arc::new(table);
    }

    /// The Service with this cluster IP and port.
    pub fn resolve(&self, address: SocketAddr) -> Option<ServiceRef> {
        let table = read(&self.addresses).clone();
        table.get(&address.ip()).and_then(|ports| {
            ports
                .iter()
                .find(|(port, _)| *port == address.port())
                .map(|(_, service)| service.clone())
        })
    }

    /// Adds `service` to what `workload` was seen calling; wakes the reconciler when it is
    /// new. Returns whether it was.
    pub fn learn(&self, workload: &WorkloadKey, service: ServiceRef) -> bool {
        let added = lock(&self.learned)
            .entry(workload.clone())
            .or_default()
            .insert(service);
        if added {
            self.changed.notify_one();
        }
        added
    }

    /// Seeds what a workload was seen calling (from its ConfigMap, after a restart).
    pub fn seed_learned(&self, workload: &WorkloadKey, services: BTreeSet<ServiceRef>) {
        lock(&self.learned)
            .entry(workload.clone())
            .or_default()
            .extend(services);
    }

    /// What `workload` was seen calling.
    pub fn learned(&self, workload: &WorkloadKey) -> BTreeSet<ServiceRef> {
        lock(&self.learned)
            .get(workload)
            .cloned()
            .unwrap_or_default()
    }

    // === Proxies ===

    /// Records that `pod`'s proxy runs `version`, and observes the convergence of that version
    /// the first time a proxy reports it while it is current.
    pub fn applied(
        &self,
        pod: PodKey,
        workload: WorkloadKey,
        version: String,
        source: ConfigSource,
    ) {
        let view = self.current(&workload);
        let report = Applied {
            workload,
            version,
            source,
        };
        let previous = lock(&self.applied).insert(pod, report.clone());
        if previous.as_ref().map(|p| &p.version) == Some(&report.version) {
            return;
        }
        if let Some(view) = view.filter(|v| v.config.version == report.version) {
            self.metrics
                .convergence
                .get_or_create(&vec![("source".to_owned(), source.as_str().to_owned())])
                .observe(view.changed_at.elapsed().as_secs_f64());
        }
    }

    /// What `pod` last reported.
    pub fn applied_by(&self, pod: &PodKey) -> Option<Applied> {
        lock(&self.applied).get(pod).cloned()
    }

    /// How many of `pods` report a generation of `workload`'s config at least `generation`.
    pub fn running_at_least(
        &self,
        workload: &WorkloadKey,
        pods: &[PodKey],
        generation: u64,
    ) -> usize {
        let applied = lock(&self.applied);
        pods.iter()
            .filter(|pod| {
                applied.get(*pod).is_some_and(|a| {
                    &a.workload == workload && generation_of(&a.version) >= generation
                })
            })
            .count()
    }

    /// Forgets pods that no longer exist.
    pub fn retain_pods(&self, alive: impl Fn(&PodKey) -> bool) {
        lock(&self.applied).retain(|pod, _| alive(pod));
    }

    /// Registers an open watch of `pod`; the returned guard unregisters it when dropped.
    pub fn watching(self: &Arc<Self>, pod: PodKey) -> WatchGuard {
        *lock(&self.watching).entry(pod.clone()).or_default() += 1;
        self.metrics.watches.inc();
        WatchGuard {
            hub: self.clone(),
            pod,
        }
    }

    /// Whether every one of `pods` has a watch open (so the stream, not the file, carries
    /// changes to them).
    pub fn all_watching(&self, pods: &[PodKey]) -> bool {
        let watching = lock(&self.watching);
        !pods.is_empty() && pods.iter().all(|p| watching.contains_key(p))
    }
}

/// An open watch; see [`Hub::watching`].
pub struct WatchGuard {
    hub: Arc<Hub>,
    pod: PodKey,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut watching = lock(&self.hub.watching);
        if let Some(count) = watching.get_mut(&self.pod) {
            *count -= 1;
            if *count == 0 {
                watching.remove(&self.pod);
            }
        }
        self.hub.metrics.watches.dec();
    }
}

// A poisoned lock means a panic while holding it, which none of these map operations can
// cause; the data is still consistent, so keep going rather than take the operator down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tandem_crds::contract::{Workload, version_stamp};

    use super::*;

    fn workload() -> WorkloadKey {
        WorkloadKey {
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    fn pod(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn config(generation: u64) -> ProxyConfig {
        let mut config = ProxyConfig::new(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            ..Workload::default()
        });
        config.version = version_stamp(generation, "abc");
        config
    }

    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(Arc::new(Notify::new()), StreamMetrics::default()))
    }

    #[tokio::test]
    async fn subscribers_see_each_new_version_once() {
        let hub = hub();
        let mut rx = hub.subscribe(&workload());
        assert!(rx.borrow_and_update().is_none());
        hub.publish(&workload(), config(1), Instant::now());
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().config.generation(),
            1
        );
        hub.publish(&workload(), config(1), Instant::now());
        assert!(!rx.has_changed().unwrap());
        hub.retire(&workload());
        assert!(rx.changed().await.is_err());
    }

    #[test]
    fn discovery_resolves_cluster_ip_and_port_and_learning_wakes_the_reconciler_once() {
        let changed = Arc::new(Notify::new());
        let hub = Hub::new(changed.clone(), StreamMetrics::default());
        let cart = ServiceRef {
            name: "cart".into(),
            namespace: "shop".into(),
        };
        let ip: IpAddr = "10.96.0.7".parse().unwrap();
        hub.set_addresses(HashMap::from([(ip, vec![(80, cart.clone())])]));
        assert_eq!(hub.resolve(SocketAddr::new(ip, 80)), Some(cart.clone()));
        assert_eq!(hub.resolve(SocketAddr::new(ip, 81)), None);
        assert!(hub.learn(&workload(), cart.clone()));
        assert!(!hub.learn(&workload(), cart.clone()));
        assert_eq!(hub.learned(&workload()), BTreeSet::from([cart]));
    }

    #[test]
    fn proxies_are_counted_by_the_generation_they_report() {
        let hub = hub();
        hub.publish(&workload(), config(5), Instant::now());
        hub.applied(
            pod("a"),
            workload(),
            version_stamp(5, "abc"),
            ConfigSource::Stream,
        );
        hub.applied(
            pod("b"),
            workload(),
            version_stamp(4, "old"),
            ConfigSource::File,
        );
        let pods = [pod("a"), pod("b"), pod("c")];
        assert_eq!(hub.running_at_least(&workload(), &pods, 5), 1);
        assert_eq!(hub.running_at_least(&workload(), &pods, 4), 2);
        hub.retain_pods(|p| p.name != "a");
        assert_eq!(hub.running_at_least(&workload(), &pods, 5), 0);
    }

    #[test]
    fn a_pod_is_watching_while_a_guard_lives() {
        let hub = hub();
        let pods = [pod("a")];
        assert!(!hub.all_watching(&pods));
        let first = hub.watching(pod("a"));
        let second = hub.watching(pod("a"));
        drop(first);
        assert!(hub.all_watching(&pods));
        drop(second);
        assert!(!hub.all_watching(&pods));
        assert!(!hub.all_watching(&[]));
    }
}
