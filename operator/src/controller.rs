//! The I/O around [`crate::render`]: the reconcile pass that writes ConfigMaps (proxy configs
//! and trust roots) and policy status, from the stores [`crate::stores`] keeps current, and
//! publishes every workload's view into the [`Hub`] the config stream serves.
//!
//! All replicas watch (so a new leader starts with warm caches); only the leader runs passes.
//! Any watch event (and any Service discovery learns) wakes the reconciler, which waits until
//! events stop for a short debounce, at most a ceiling after the first ([`settle`]), so that
//! a burst (a rollout, a Service with many slices) costs one pass. A pass renders the catalog
//! once, then the [`Index`] names the workloads whose content changed; only those are built,
//! published and, when due, written:
//! - a policy or view change is written (when the document differs from the ConfigMap's);
//! - an endpoint-only change is written only when some pod of the workload has no open watch
//!   (the stream carries it to the others), so endpoint churn writes nothing while the stream
//!   is up;
//! - a config over the 1 MiB limit is refused for that workload alone (Event on its
//!   ServiceAccount, `ConfigTooLarge` on the policies it needs); the others are written.
//!
//! Once a second, statuses are refreshed from what proxies report (no re-render), and
//! endpoint-only changes still due are written for pods that stopped watching.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_crds::contract::{ProxyConfig, ServiceRef};
use tandem_crds::identity::{TRUST_ROOTS_CONFIG_MAP, TRUST_ROOTS_KEY};
use tandem_crds::names::{CONFIG_KEY, OPERATOR_FIELD_MANAGER, config_map_name};
use tandem_crds::pods::service_account;
use tandem_crds::v1alpha1::{
    AuthorizationPolicy, AuthorizationPolicyStatus, CircuitBreakerPolicy, PolicyStatus,
    TrafficPolicy,
};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, info, warn};

use crate::hub::{AddressTable, Hub, PodKey};
use crate::index::{Change, Index};
use crate::issuer::CurrentAuthority;
use crate::metrics::Metrics;
use crate::policy::{PolicyKey, PolicyKind, Verdict};
use crate::render::{
    BadAnnotation, MAX_CONFIG_MAP_BYTES, Mesh, Rendered, WorkloadKey, is_active, is_injected,
    render_with, trust_namespaces,
};
use crate::status::{Programming, Transition, next_authorization_status, next_status};
pub use crate::stores::{
    CONFIG_VERSION_ANNOTATION, LEARNED_ANNOTATION, MANAGED_BY_LABEL, SERVICE_ACCOUNT_ANNOTATION,
    Stores, WATCHES, Writers, start_watches,
};
use crate::stores::{DATA_HASH, hex_sha256};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Debounce

/// How long the reconciler lets a burst of events settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    /// Quiet time after the last event (trailing debounce, Istio's `PILOT_DEBOUNCE_AFTER`).
    pub quiet: Duration,
    /// Longest wait from the first event (Istio's `PILOT_DEBOUNCE_MAX`), so a steady stream
    /// of events still gets passes.
    pub ceiling: Duration,
}

/// Waits until `trigger` has been quiet for `debounce.quiet`, or `debounce.ceiling` has passed
/// since `first` (the first event of the batch), whichever comes first.
pub async fn settle(trigger: Arc<Notify>, first: tokio::time::Instant, debounce: Debounce) {
    let ceiling = first + debounce.ceiling;
    let mut last = tokio::time::Instant::now();
    loop {
        let deadline = (last + debounce.quiet).min(ceiling);
        tokio::select! {
            () = trigger.notified() => last = tokio::time::Instant::now(),
            () = tokio::time::sleep_until(deadline) => return,
        }
        if last >= ceiling {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reconciler

/// What a pass needs besides the stores.
pub struct Reconciler {
    client: Client,
    stores: Stores,
    metrics: Metrics,
    recorder: Recorder,
    /// The views the stream serves, what proxies run and what they learned.
    hub: Arc<Hub>,
    /// Parallel writes per pass.
    concurrency: usize,
    /// Trust domain, default mTLS mode, default authorization policy and cluster networks.
    mesh: Mesh,
    /// The issuer, whose trust anchors go to every namespace with injected pods.
    authority: CurrentAuthority,
    /// Ignored annotations already reported by an Event (each is reported once per value).
    reported: Mutex<BTreeSet<BadAnnotation>>,
}

/// What woke the reconciler's loop.
enum Woke {
    /// A watch event or a learned Service.
    Event,
    /// A failed pass's backoff ran out.
    Retry,
    /// The once-a-second status refresh.
    Refresh,
    /// Leadership changed.
    Leadership,
}

/// What the reconciler keeps between passes while it leads.
#[derive(Default)]
struct State {
    index: Index,
    /// Whether learned Services were seeded from the ConfigMaps (at the first pass).
    seeded: bool,
    /// The last pass's rendering and pods, for the status refresh between passes.
    last: Option<Last>,
    /// Workloads refused as too large whose Event was published.
    refused: BTreeSet<WorkloadKey>,
    /// ConfigMap writes that failed in the last pass.
    failed: usize,
}

struct Last {
    rendered: Arc<Rendered>,
    pods: BTreeMap<WorkloadKey, Vec<PodKey>>,
}

impl Reconciler {
    /// A reconciler writing through `client` and publishing into `hub`; `identity` names this
    /// replica in Events.
    pub fn new(
        client: Client,
        stores: Stores,
        metrics: Metrics,
        identity: &str,
        mesh: Mesh,
        authority: CurrentAuthority,
        hub: Arc<Hub>,
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
            hub,
            concurrency: 16,
            mesh,
            authority,
            reported: Mutex::new(BTreeSet::new()),
        }
    }

    /// Runs passes whenever `trigger` fires while this replica leads, until `shutdown`. Call it
    /// once the stores have synced (see [`crate::sync`]): it reads them as they are. A failed
    /// pass is retried with exponential backoff (0.5 s doubling to 30 s). Between passes,
    /// statuses are refreshed once a second.
    pub async fn run(
        self,
        trigger: Arc<Notify>,
        debounce: Debounce,
        mut leader: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut state = State::default();
        let mut backoff = Duration::from_millis(500);
        let mut retry_at: Option<tokio::time::Instant> = None;
        // When the oldest change not yet carried by a successful pass was seen.
        let mut pending_since: Option<Instant> = None;
        let mut refresh = tokio::time::interval(Duration::from_secs(1));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry = tokio::time::sleep_until(
                retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            // Decide in the select, act after it: the branches' futures are gone by then.
            let woke = tokio::select! {
                () = trigger.notified() => Woke::Event,
                () = retry, if retry_at.is_some() => Woke::Retry,
                _ = refresh.tick() => Woke::Refresh,
                changed = leader.changed() => match changed {
                    Ok(()) => Woke::Leadership,
                    Err(_) => return,
                },
                () = stopped(&mut shutdown) => return,
            };
            let settled = match woke {
                Woke::Event => {
                    pending_since.get_or_insert_with(Instant::now);
                    if leads(&leader) {
                        settle(trigger.clone(), tokio::time::Instant::now(), debounce).await;
                    }
                    true
                }
                Woke::Retry => true,
                Woke::Refresh => {
                    if leads(&leader) && retry_at.is_none() {
                        self.refresh(&mut state, &leader).await;
                    }
                    false
                }
                Woke::Leadership => {
                    // A new term starts from the cluster as it is, not from a past term.
                    state = State::default();
                    true
                }
            };
            if !settled || !leads(&leader) {
                continue;
            }
            retry_at = None;
            let changed_at = *pending_since.get_or_insert_with(Instant::now);
            match self.pass(&mut state, changed_at, &leader).await {
                Ok(()) => {
                    backoff = Duration::from_millis(500);
                    pending_since = None;
                }
                Err(error) => {
                    self.metrics.reconcile_errors.inc();
                    warn!(%error, retry_in_ms = backoff.as_millis(), "Reconcile failed");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// One pass: render, bring the index up to date, publish and write what changed, delete
    /// orphaned ConfigMaps, update status. `changed_at` is when the oldest change it carries
    /// was seen (convergence is measured from there).
    async fn pass(
        &self,
        state: &mut State,
        changed_at: Instant,
        leader: &watch::Receiver<bool>,
    ) -> Result<()> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let inputs = self.stores.inputs(&self.mesh);
        let previous = state.last.as_ref().map(|l| l.rendered.as_ref());
        let rendered = Arc::new(render_with(&inputs, previous));
        let terminating: BTreeSet<String> = self
            .stores
            .namespaces
            .state()
            .iter()
            .filter(|ns| ns.metadata.deletion_timestamp.is_some())
            .map(|ns| ns.name_any())
            .collect();
        let pods: BTreeMap<WorkloadKey, Vec<PodKey>> = pods_by_workload(&inputs.pods)
            .into_iter()
            .filter(|(w, _)| !terminating.contains(&w.namespace))
            .collect();
        let wanted: Vec<WorkloadKey> = pods.keys().cloned().collect();
        if !state.seeded {
            self.seed_learned();
            state.seeded = true;
        }

        let (updates, gone) = state.index.update(
            &rendered,
            &wanted,
            |w| self.hub.learned(w),
            |w| self.stored_version(w),
            unix_millis(),
            MAX_CONFIG_MAP_BYTES,
        );
        let built = updates.len();
        let mut refused = Vec::new();
        for update in updates {
            match update.config.and_then(checked_size) {
                Ok(config) => self.hub.publish(&update.workload, config, changed_at),
                Err(bytes) => {
                    warn!(bytes, namespace = %update.workload.namespace, service_account = %update.workload.service_account, "Proxy config too large; not written");
                    state.index.refuse(&update.workload, bytes);
                    refused.push((update.workload, bytes));
                }
            }
        }
        for workload in &gone {
            self.hub.retire(workload);
        }
        self.hub.set_addresses(address_table(&rendered));
        let alive: BTreeSet<&PodKey> = pods.values().flatten().collect();
        self.hub.retain_pods(|p| alive.contains(p));

        state.failed = self.write_due(state, &pods, leader).await;
        self.report_refused(state, &refused, leader).await;
        let trust: BTreeSet<String> = trust_namespaces(&inputs.pods)
            .into_iter()
            .filter(|ns| !terminating.contains(ns))
            .collect();
        let roots_failed = self.write_trust_roots(&trust, leader).await;
        let deleted = self.delete_orphans(&wanted, &trust, leader).await;
        if leads(leader) {
            self.report_annotations(&rendered.bad_annotations).await;
        }
        state.last = Some(Last {
            rendered: rendered.clone(),
            pods,
        });
        let status_failures = self.write_statuses(state, leader).await;
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        debug!(
            services = rendered.catalog.len(),
            workloads = wanted.len(),
            built,
            elapsed_ms = started.elapsed().as_millis(),
            "Reconciled"
        );
        if state.failed + roots_failed + status_failures == 0 && deleted.is_ok() {
            return Ok(());
        }
        Err(Error::Incomplete {
            config_maps: state.failed + roots_failed,
            deletes: usize::from(deleted.is_err()),
            statuses: status_failures,
        })
    }

    /// Between passes: writes the endpoint-only changes now due (a pod stopped watching) and
    /// refreshes the proxy counts in status.
    async fn refresh(&self, state: &mut State, leader: &watch::Receiver<bool>) {
        let Some(last) = state.last.take() else {
            return;
        };
        state.failed = self.write_due(state, &last.pods, leader).await;
        state.last = Some(last);
        self.write_statuses(state, leader).await;
    }

    /// Seeds the hub with what each workload was seen calling, from its ConfigMap's
    /// `tandem.dev/learned` annotation (discovery's memory across restarts).
    fn seed_learned(&self) {
        for config_map in self.stores.config_maps.state() {
            let annotations = config_map.annotations();
            let (Some(account), Some(learned)) = (
                annotations.get(SERVICE_ACCOUNT_ANNOTATION),
                annotations.get(LEARNED_ANNOTATION),
            ) else {
                continue;
            };
            let workload = WorkloadKey {
                namespace: config_map.namespace().unwrap_or_default(),
                service_account: account.clone(),
            };
            self.hub.seed_learned(&workload, parse_learned(learned));
        }
    }

    /// The version the workload's ConfigMap carries, if it exists.
    fn stored_version(&self, workload: &WorkloadKey) -> Option<String> {
        self.config_map(workload)?
            .annotations()
            .get(CONFIG_VERSION_ANNOTATION)
            .cloned()
    }

    fn config_map(&self, workload: &WorkloadKey) -> Option<Arc<ConfigMap>> {
        let name = config_map_name(&workload.service_account);
        self.stores
            .config_maps
            .get(&reflector::ObjectRef::new(&name).within(&workload.namespace))
    }

    /// Writes the ConfigMaps that lag their workload's version: always for a policy or view
    /// change, for an endpoint-only change only when some pod has no open watch. A document
    /// equal to the ConfigMap's is not written again. Returns how many writes failed.
    async fn write_due(
        &self,
        state: &mut State,
        pods: &BTreeMap<WorkloadKey, Vec<PodKey>>,
        leader: &watch::Receiver<bool>,
    ) -> usize {
        let mut writes = Vec::new();
        for (workload, change) in state.index.due() {
            let pods = pods.get(&workload).map(Vec::as_slice).unwrap_or_default();
            if change == Change::Endpoints && self.hub.all_watching(pods) {
                continue;
            }
            let Some(view) = self.hub.current(&workload) else {
                continue;
            };
            let json = crate::render::document(&view.config);
            let current_hash = self
                .config_map(&workload)
                .and_then(|cm| cm.annotations().get(DATA_HASH).cloned());
            if current_hash.as_deref() == Some(hex_sha256(json.as_bytes()).as_str()) {
                state.index.written(&workload, &view.config.version);
                continue;
            }
            writes.push((workload, view.config.clone(), json));
        }
        if !leads(leader) {
            return writes.len();
        }
        let results: Vec<(WorkloadKey, String, Result<()>)> = stream::iter(writes)
            .map(|(workload, config, json)| self.apply_config_map(workload, config, json))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut failed = 0;
        for (workload, version, result) in results {
            match result {
                Ok(()) => state.index.written(&workload, &version),
                Err(_) => failed += 1,
            }
        }
        failed
    }

    /// Writes one proxy ConfigMap; returns the workload and version with the outcome.
    async fn apply_config_map(
        &self,
        workload: WorkloadKey,
        config: Arc<ProxyConfig>,
        json: String,
    ) -> (WorkloadKey, String, Result<()>) {
        let result = self.apply_proxy_config(&workload, &config, json).await;
        (workload, config.version.clone(), result)
    }

    async fn apply_proxy_config(
        &self,
        workload: &WorkloadKey,
        config: &ProxyConfig,
        json: String,
    ) -> Result<()> {
        let name = config_map_name(&workload.service_account);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &workload.namespace);
        let learned = format_learned(&self.hub.learned(workload));
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": workload.namespace,
                "labels": { MANAGED_BY_LABEL: OPERATOR_FIELD_MANAGER },
                "annotations": {
                    SERVICE_ACCOUNT_ANNOTATION: workload.service_account,
                    CONFIG_VERSION_ANNOTATION: config.version,
                    LEARNED_ANNOTATION: learned,
                },
            },
            "data": { CONFIG_KEY: json },
        });
        let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
        match api.patch(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => {
                self.metrics.config_map_applies.inc();
                info!(namespace = %workload.namespace, config_map = %name, version = %config.version, "Applied proxy config");
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

    /// Publishes a Warning Event `ConfigTooLarge` on the ServiceAccount of each workload newly
    /// refused; a workload that fits again may be reported again later.
    async fn report_refused(
        &self,
        state: &mut State,
        refused: &[(WorkloadKey, usize)],
        leader: &watch::Receiver<bool>,
    ) {
        let still: BTreeSet<WorkloadKey> = state
            .index
            .workloads()
            .filter(|(_, e)| e.too_large.is_some())
            .map(|(w, _)| w.clone())
            .collect();
        state.refused.retain(|w| still.contains(w));
        if !leads(leader) {
            return;
        }
        for (workload, bytes) in refused {
            if state.refused.contains(workload) {
                continue;
            }
            let reference = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("ServiceAccount".to_owned()),
                name: Some(workload.service_account.clone()),
                namespace: Some(workload.namespace.clone()),
                ..ObjectReference::default()
            };
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: tandem_crds::v1alpha1::reason::TOO_LARGE.to_owned(),
                note: Some(too_large_message(workload, *bytes)),
                action: "RenderProxyConfig".to_owned(),
                secondary: None,
            };
            match self.recorder.publish(&event, &reference).await {
                Ok(()) => {
                    state.refused.insert(workload.clone());
                }
                Err(error) => warn!(%error, "Could not publish an Event"),
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
        let changed: Vec<String> = namespaces
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
            .cloned()
            .collect();
        if !leads(leader) {
            return changed.len();
        }
        // Owned names: a closure over borrowed ones makes the pass's future not `Send`.
        let roots: &str = &authority.roots_pem;
        stream::iter(changed)
            .map(|ns| self.apply_trust_roots(ns, roots))
            .buffer_unordered(self.concurrency)
            .filter(|r| futures::future::ready(r.is_err()))
            .count()
            .await
    }

    async fn apply_trust_roots(&self, namespace: String, roots_pem: &str) -> Result<()> {
        let namespace = namespace.as_str();
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
            warn!(annotation = annotation.annotation, kind = annotation.kind, namespace = %annotation.namespace, name = %annotation.name, value = %annotation.value, "Ignored an invalid annotation");
            let reference = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some(annotation.kind.to_owned()),
                name: Some(annotation.name.clone()),
                namespace: (!annotation.namespace.is_empty()).then(|| annotation.namespace.clone()),
                ..ObjectReference::default()
            };
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: annotation.reason().to_owned(),
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
            if wanted.contains(&key) || !leads(leader) {
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

    /// Writes every policy's status that changed; returns how many writes failed. A policy
    /// whose generation the last pass did not see is left to the next pass.
    async fn write_statuses(&self, state: &State, leader: &watch::Receiver<bool>) -> usize {
        let Some(last) = state.last.as_ref() else {
            return 0;
        };
        let mut failures = 0;
        for policy in self.stores.traffic.state() {
            if !leads(leader) {
                return failures;
            }
            failures += usize::from(
                self.update_status(PolicyKind::Traffic, policy.as_ref(), state, last)
                    .await
                    .is_err(),
            );
        }
        for policy in self.stores.breakers.state() {
            if !leads(leader) {
                return failures;
            }
            failures += usize::from(
                self.update_status(PolicyKind::CircuitBreaker, policy.as_ref(), state, last)
                    .await
                    .is_err(),
            );
        }
        for policy in self.stores.authorizations.state() {
            if !leads(leader) {
                return failures;
            }
            failures += usize::from(
                self.update_status(PolicyKind::Authorization, policy.as_ref(), state, last)
                    .await
                    .is_err(),
            );
        }
        failures
    }

    /// Whether the ConfigMaps and proxies that need `policy` carry it.
    fn programming(&self, policy: &PolicyKey, state: &State, last: &Last) -> Programming {
        programming_of(
            policy,
            &state.index,
            state.failed,
            |workload, generation| {
                let pods = last
                    .pods
                    .get(workload)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (
                    self.hub.running_at_least(workload, pods, generation),
                    pods.len(),
                )
            },
        )
    }

    async fn update_status<P>(
        &self,
        kind: PolicyKind,
        policy: &P,
        state: &State,
        last: &Last,
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
        let rendered = &last.rendered;
        let Some(verdict) = rendered.verdicts.get(&key) else {
            return Ok(());
        };
        if rendered.generations.get(&key).copied() != Some(policy.meta().generation.unwrap_or(0)) {
            // Changed since the last pass, which is coming: judge it then.
            return Ok(());
        }
        let programming = self.programming(&key, state, last);
        let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let previous = policy.status();
        let (status, transitions) =
            policy.next_status(verdict, &programming, rendered.workloads_of(&key), &now);
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

/// Whether the ConfigMaps and proxies that need `policy` carry it, from the index: too large
/// when a workload that needs it was refused (naming it), pending while writes fail, else
/// done with the proxy count. `running(workload, generation)` gives how many of the
/// workload's pods run at least that generation, and how many pods it has.
pub fn programming_of(
    policy: &PolicyKey,
    index: &Index,
    failed_writes: usize,
    running: impl Fn(&WorkloadKey, u64) -> (usize, usize),
) -> Programming {
    let carriers = index.carriers(policy);
    let refused: Vec<String> = carriers
        .iter()
        .filter_map(|(w, _)| {
            let bytes = index.entry(w)?.too_large?;
            Some(too_large_message(w, bytes))
        })
        .collect();
    if !refused.is_empty() {
        return Programming::TooLarge(refused.join("; "));
    }
    if failed_writes > 0 {
        return Programming::Pending(format!(
            "{failed_writes} proxy ConfigMap write(s) failed; retrying"
        ));
    }
    let (current, total) = carriers
        .iter()
        .map(|(w, generation)| running(w, *generation))
        .fold((0, 0), |(c, t), (current, total)| (c + current, t + total));
    Programming::Done {
        config_maps: carriers.len(),
        proxies: Some((current, total)),
    }
}

fn too_large_message(workload: &WorkloadKey, bytes: usize) -> String {
    format!(
        "the proxy config of {}/{} would be at least {bytes} bytes, over the ConfigMap limit of \
         {MAX_CONFIG_MAP_BYTES}; it was not written (narrow its tandem.dev/dependencies)",
        workload.namespace, workload.service_account
    )
}

/// Checks that a config's ConfigMap fits; `Err(bytes)` when it does not.
fn checked_size(config: ProxyConfig) -> std::result::Result<ProxyConfig, usize> {
    let bytes = crate::render::document(&config).len() + CONFIG_KEY.len();
    if bytes > MAX_CONFIG_MAP_BYTES {
        return Err(bytes);
    }
    Ok(config)
}

/// The injected, unfinished pods of each workload.
fn pods_by_workload(
    pods: &[Arc<k8s_openapi::api::core::v1::Pod>],
) -> BTreeMap<WorkloadKey, Vec<PodKey>> {
    let mut by_workload: BTreeMap<WorkloadKey, Vec<PodKey>> = BTreeMap::new();
    for pod in pods.iter().filter(|p| is_injected(p) && is_active(p)) {
        let namespace = pod.namespace().unwrap_or_default();
        by_workload
            .entry(WorkloadKey {
                namespace: namespace.clone(),
                service_account: service_account(pod).to_owned(),
            })
            .or_default()
            .push(PodKey {
                namespace,
                name: pod.name_any(),
            });
    }
    by_workload
}

/// Every Service's cluster IPs and ports, for discovery.
fn address_table(rendered: &Rendered) -> AddressTable {
    let mut table = AddressTable::new();
    for (key, entry) in &rendered.catalog {
        for ip in &entry.service.cluster_ips {
            table
                .entry(*ip)
                .or_default()
                .extend(entry.service.ports.iter().map(|p| (p.port, key.clone())));
        }
    }
    table
}

/// `tandem.dev/learned`: `<namespace>/<name>` entries, comma-separated, sorted.
fn format_learned(learned: &BTreeSet<ServiceRef>) -> String {
    learned
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads `tandem.dev/learned`; entries that are not `<namespace>/<name>` are skipped.
fn parse_learned(value: &str) -> BTreeSet<ServiceRef> {
    value
        .split(',')
        .filter_map(|entry| {
            let (namespace, name) = entry.trim().split_once('/')?;
            (!namespace.is_empty() && !name.is_empty()).then(|| ServiceRef {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
            })
        })
        .collect()
}

/// Resolves when `shutdown` turns true or its sender is gone. (The guard `wait_for` returns
/// is not `Send`; it is dropped here, so the reconciler's future stays `Send`.)
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(drop);
}

/// Whether this replica leads now. (A function, so the channel's read guard is gone before
/// any await: it is not `Send`.)
fn leads(leader: &watch::Receiver<bool>) -> bool {
    *leader.borrow()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

/// A policy kind's status: where it is and what it should be now.
pub trait HasStatus {
    /// The kind's status type.
    type Status: PartialEq + Serialize;

    /// The status, if any.
    fn status(&self) -> Option<&Self::Status>;

    /// The status the policy should have now, and the condition changes; `workloads` are
    /// those it applies to (AuthorizationPolicy only lists them).
    fn next_status(
        &self,
        verdict: &Verdict,
        programming: &Programming,
        workloads: &[String],
        now: &str,
    ) -> (Self::Status, Vec<Transition>);
}

/// TrafficPolicy and CircuitBreakerPolicy share [`PolicyStatus`], which lists no workloads.
macro_rules! policy_status {
    ($($kind:ty),+) => {$(
        impl HasStatus for $kind {
            type Status = PolicyStatus;

            fn status(&self) -> Option<&PolicyStatus> {
                self.status.as_ref()
            }

            fn next_status(
                &self,
                verdict: &Verdict,
                programming: &Programming,
                _workloads: &[String],
                now: &str,
            ) -> (PolicyStatus, Vec<Transition>) {
                next_status(
                    self.status.as_ref(),
                    self.metadata.generation,
                    verdict,
                    programming,
                    now,
                )
            }
        }
    )+};
}

policy_status!(TrafficPolicy, CircuitBreakerPolicy);

impl HasStatus for AuthorizationPolicy {
    type Status = AuthorizationPolicyStatus;

    fn status(&self) -> Option<&AuthorizationPolicyStatus> {
        self.status.as_ref()
    }

    fn next_status(
        &self,
        verdict: &Verdict,
        programming: &Programming,
        workloads: &[String],
        now: &str,
    ) -> (AuthorizationPolicyStatus, Vec<Transition>) {
        next_authorization_status(
            self.status.as_ref(),
            self.metadata.generation,
            verdict,
            programming,
            workloads,
            now,
        )
    }
}
