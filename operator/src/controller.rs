//! The I/O around [`crate::render`]: the reconcile pass that writes ConfigMaps (proxy configs
//! and trust roots) and policy status, from the stores [`crate::stores`] keeps current.
//!
//! All replicas watch (so a new leader starts with warm caches); only the leader writes. Any
//! watch event wakes the reconciler, which waits a short debounce so that a burst of events
//! (a rollout, a Service with many slices) costs one pass. A pass renders once, then writes only
//! the ConfigMaps and statuses whose content changed: the "exactly the ConfigMaps it affects"
//! of the design falls out of the diff (every workload carries the same services; an
//! AuthorizationPolicy changes only the configs of the workloads it targets).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_crds::identity::{TRUST_ROOTS_CONFIG_MAP, TRUST_ROOTS_KEY};
use tandem_crds::names::{CONFIG_KEY, OPERATOR_FIELD_MANAGER, config_map_name};
use tandem_crds::v1alpha1::{
    AuthorizationPolicy, AuthorizationPolicyStatus, CircuitBreakerPolicy, PolicyStatus,
    TrafficPolicy,
};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, info, warn};

use crate::issuer::CurrentAuthority;
use crate::metrics::Metrics;
use crate::policy::{PolicyKey, PolicyKind, Verdict};
use crate::render::{
    BadAnnotation, MAX_CONFIG_MAP_BYTES, Mesh, Rendered, WorkloadKey, render, trust_namespaces,
    workloads,
};
use crate::status::{Programming, Transition, next_authorization_status, next_status};
use crate::stores::{DATA_HASH, hex_sha256};
pub use crate::stores::{
    MANAGED_BY_LABEL, SERVICE_ACCOUNT_ANNOTATION, Stores, WATCHES, Writers, start_watches,
};
use crate::{Error, Result};

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
    /// Trust domain, default mTLS mode, default authorization policy and cluster networks.
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

    /// Runs passes whenever `trigger` fires while this replica leads, until `shutdown`. Call it
    /// once the stores have synced (see [`crate::sync`]): it reads them as they are. A failed
    /// pass is retried with exponential backoff (0.5 s doubling to 30 s).
    pub async fn run(
        self,
        trigger: Arc<Notify>,
        debounce: Duration,
        mut leader: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
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
            if !*leader.borrow() {
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
        for policy in self.stores.authorizations.state() {
            if !*leader.borrow() {
                return failures;
            }
            failures += usize::from(
                self.update_status(
                    PolicyKind::Authorization,
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
        let (status, transitions) =
            policy.next_status(verdict, programming, rendered.workloads_of(&key), &now);
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
