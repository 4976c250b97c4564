//! The index the reconciler keeps across passes: each workload's scope and version, and the
//! reverse maps (Service → workloads whose view holds it, policy ↔ workloads that need it).
//!
//! A pass renders the catalog once ([`crate::render`]), then asks [`Index::update`] which
//! workloads changed. Only the workloads a change touches are scoped again: those whose view
//! holds a catalog entry that changed, those whose dependencies or learned Services changed,
//! those a Service that appeared or went away may enter or leave, and all of them when an
//! mTLS mode, an authorization or the mesh's telemetry settings changed. A touched workload's content hash is computed from
//! the per-Service hashes of its view, so one whose content is unchanged is neither built nor
//! written. Pure: no I/O, no clock (the caller passes the time).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tandem_crds::contract::{ProxyConfig, ServiceRef, generation_of, version_stamp};
use tandem_crds::dependencies::Dependency;

use crate::policy::{PolicyKey, PolicyKind};
use crate::render::{Rendered, Scope, WorkloadKey};

/// What the index knows of one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its view and hashes as last rendered.
    pub scope: Scope,
    /// The version stamped on that content.
    pub version: String,
    /// The size of that content's document when it was over the ConfigMap limit (so it was
    /// refused: neither written nor served).
    pub too_large: Option<usize>,
    /// A change the ConfigMap does not carry yet (its write is due, or failed).
    pub unwritten: Option<Change>,
    /// The Services it was seen calling, as that content was scoped with.
    pub learned: BTreeSet<ServiceRef>,
}

/// How a workload's config changed in a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Its view, a policy, its authorization or its mode changed (or it is new): the
    /// ConfigMap is written (when its document differs).
    Policy,
    /// Only endpoints changed: the stream carries them; the ConfigMap is written only for
    /// pods that do not watch.
    Endpoints,
}

/// A workload whose config changed, with the new config (stamped).
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// The workload.
    pub workload: WorkloadKey,
    /// What kind of change.
    pub change: Change,
    /// Its new config, or, when its Services alone already pass `limit` bytes, that lower
    /// bound of its size (the config is then not built: it would be refused).
    pub config: Result<ProxyConfig, usize>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Index {
    entries: BTreeMap<WorkloadKey, Entry>,
    /// Service → the workloads whose view holds it.
    dependents: BTreeMap<ServiceRef, BTreeSet<WorkloadKey>>,
    /// Policy → the workloads that need it (a Traffic or CircuitBreaker policy: those whose
    /// view holds its target; an AuthorizationPolicy: those it targets).
    needed_by: BTreeMap<PolicyKey, BTreeSet<WorkloadKey>>,
    /// Workload → the policies it needs (the inverse of `needed_by`).
    needs: BTreeMap<WorkloadKey, BTreeSet<PolicyKey>>,
    /// (policy, workload) → (the policy's generation, the generation of the first config of
    /// the workload that carried that policy generation).
    carried: BTreeMap<(PolicyKey, WorkloadKey), (i64, u64)>,
    /// The rendering the entries were last brought to: the next pass diffs against it.
    last: Option<Arc<Rendered>>,
}

impl Index {
    /// Brings the index to `rendered` for the workloads `wanted`, and returns the workloads
    /// whose content changed (rendered and stamped) and those that are gone.
    ///
    /// `learned` gives what a workload was seen calling; `stored` the version its ConfigMap
    /// carries (so an unchanged content keeps its version across a restart); `now_ms` the
    /// unix time in milliseconds, the next generation unless the previous one is later. A
    /// config whose Services alone pass `limit` bytes is not built (see [`Update::config`]).
    pub fn update(
        &mut self,
        rendered: &Arc<Rendered>,
        wanted: &[WorkloadKey],
        learned: impl Fn(&WorkloadKey) -> BTreeSet<ServiceRef>,
        stored: impl Fn(&WorkloadKey) -> Option<String>,
        now_ms: u64,
        limit: usize,
    ) -> (Vec<Update>, Vec<WorkloadKey>) {
        let touched = self.touched(rendered);
        let mut updates = Vec::new();
        for workload in wanted {
            let learned = learned(workload);
            let previous = self.entries.get(workload);
            let unchanged = previous.is_some_and(|p| p.learned == learned);
            if unchanged && touched.as_ref().is_some_and(|t| !t.contains(workload)) {
                continue;
            }
            let scope = rendered.scope_of(workload, &learned);
            if previous.is_some_and(|p| p.scope.content == scope.content) {
                continue;
            }
            let change = match previous {
                Some(p) if p.scope.policy == scope.policy => Change::Endpoints,
                _ => Change::Policy,
            };
            // A policy change not written yet stays due even if only endpoints changed since.
            let unwritten = match previous.and_then(|p| p.unwritten) {
                Some(Change::Policy) => Change::Policy,
                _ => change,
            };
            let earlier = previous
                .map(|p| p.version.clone())
                .or_else(|| stored(workload));
            let version = next_version(earlier.as_deref(), &scope.content, now_ms);
            let config = match rendered.services_size(&scope) {
                bytes if bytes > limit => Err(bytes),
                _ => {
                    let mut config = rendered.config_with(workload, &scope);
                    config.version.clone_from(&version);
                    Ok(config)
                }
            };
            let old_view = previous.map(|p| p.scope.view.clone());
            self.set_view(workload, old_view.as_ref(), &scope.view);
            self.entries.insert(
                workload.clone(),
                Entry {
                    scope,
                    version,
                    too_large: None,
                    unwritten: Some(unwritten),
                    learned,
                },
            );
            updates.push(Update {
                workload: workload.clone(),
                change,
                config,
            });
        }
        let wanted: BTreeSet<&WorkloadKey> = wanted.iter().collect();
        let gone: Vec<WorkloadKey> = self
            .entries
            .keys()
            .filter(|w| !wanted.contains(w))
            .cloned()
            .collect();
        for workload in &gone {
            if let Some(entry) = self.entries.remove(workload) {
                self.set_view(workload, Some(&entry.scope.view), &BTreeSet::new());
            }
        }
        self.relate_policies(rendered);
        self.last = Some(rendered.clone());
        (updates, gone)
    }

    /// The workloads a change since the last pass may touch; `None` for all of them (the
    /// first pass, or a mode, an authorization or the telemetry settings changed).
    fn touched(&self, rendered: &Rendered) -> Option<BTreeSet<WorkloadKey>> {
        let last = self.last.as_deref()?;
        if last.modes != rendered.modes
            || last.default_mtls != rendered.default_mtls
            || last.authorizations != rendered.authorizations
            || last.telemetry != rendered.telemetry
        {
            return None;
        }
        let mut touched = BTreeSet::new();
        // Entries that changed or went away: the workloads whose view holds them.
        let mut appeared = Vec::new();
        for (key, entry) in &rendered.catalog {
            match last.catalog.get(key) {
                Some(earlier) if Arc::ptr_eq(earlier, entry) => {}
                Some(_) => touched.extend(self.dependents(key).cloned()),
                None => appeared.push(key),
            }
        }
        let gone: Vec<&ServiceRef> = last
            .catalog
            .keys()
            .filter(|k| !rendered.catalog.contains_key(*k))
            .collect();
        for key in &gone {
            touched.extend(self.dependents(key).cloned());
        }
        // A Service that appeared enters the views that name it or its namespace; one that
        // went away may leave a named dependency without a Service (a learned one, too).
        for (workload, dependencies) in &rendered.dependencies {
            let names = |key: &ServiceRef| {
                dependencies.iter().any(|d| match d {
                    Dependency::Service { namespace, name } => {
                        *namespace == key.namespace && *name == key.name
                    }
                    Dependency::Namespace(namespace) => *namespace == key.namespace,
                })
            };
            if appeared.iter().any(|k| names(k)) {
                touched.insert(workload.clone());
            }
        }
        for (workload, entry) in &self.entries {
            if appeared.iter().any(|k| entry.learned.contains(*k)) {
                touched.insert(workload.clone());
            }
        }
        // Workloads whose dependencies changed.
        for workload in self.entries.keys() {
            if last.dependencies.get(workload) != rendered.dependencies.get(workload) {
                touched.insert(workload.clone());
            }
        }
        Some(touched)
    }

    /// Records that `workload`'s current content is `bytes` long, over the limit: it is
    /// refused, so nothing is due (the last ConfigMap stays).
    pub fn refuse(&mut self, workload: &WorkloadKey, bytes: usize) {
        if let Some(entry) = self.entries.get_mut(workload) {
            entry.too_large = Some(bytes);
            entry.unwritten = None;
        }
    }

    /// The workloads whose ConfigMap lags their current version, and why.
    pub fn due(&self) -> Vec<(WorkloadKey, Change)> {
        self.entries
            .iter()
            .filter_map(|(w, e)| Some((w.clone(), e.unwritten?)))
            .collect()
    }

    /// Records that `workload`'s ConfigMap carries `version` (written, or found equal).
    pub fn written(&mut self, workload: &WorkloadKey, version: &str) {
        if let Some(entry) = self.entries.get_mut(workload)
            && entry.version == version
        {
            entry.unwritten = None;
        }
    }

    /// What the index knows of `workload`.
    pub fn entry(&self, workload: &WorkloadKey) -> Option<&Entry> {
        self.entries.get(workload)
    }

    /// Every workload the index knows.
    pub fn workloads(&self) -> impl Iterator<Item = (&WorkloadKey, &Entry)> {
        self.entries.iter()
    }

    /// The workloads whose view holds `service`.
    pub fn dependents(&self, service: &ServiceRef) -> impl Iterator<Item = &WorkloadKey> {
        self.dependents.get(service).into_iter().flatten()
    }

    /// The policies `workload` needs.
    pub fn policies_of(&self, workload: &WorkloadKey) -> impl Iterator<Item = &PolicyKey> {
        self.needs.get(workload).into_iter().flatten()
    }

    /// The workloads that need `policy`, each with the generation of its first config that
    /// carried the policy's current generation: a proxy running at least that one runs it.
    pub fn carriers(&self, policy: &PolicyKey) -> Vec<(&WorkloadKey, u64)> {
        self.needed_by
            .get(policy)
            .into_iter()
            .flatten()
            .map(|w| {
                let generation = self
                    .carried
                    .get(&(policy.clone(), w.clone()))
                    .map_or(0, |(_, config)| *config);
                (w, generation)
            })
            .collect()
    }

    fn set_view(
        &mut self,
        workload: &WorkloadKey,
        old: Option<&BTreeSet<ServiceRef>>,
        new: &BTreeSet<ServiceRef>,
    ) {
        for service in old.into_iter().flatten().filter(|s| !new.contains(*s)) {
            if let Some(workloads) = self.dependents.get_mut(service) {
                workloads.remove(workload);
                if workloads.is_empty() {
                    self.dependents.remove(service);
                }
            }
        }
        let added = new
            .iter()
            .filter(|s| old.is_none_or(|old| !old.contains(*s)));
        for service in added {
            self.dependents
                .entry(service.clone())
                .or_default()
                .insert(workload.clone());
        }
    }

    /// Rebuilds which workloads need which policy, and notes, per pair, the first config
    /// generation that carried each new policy generation.
    fn relate_policies(&mut self, rendered: &Rendered) {
        let mut needed_by: BTreeMap<PolicyKey, BTreeSet<WorkloadKey>> = BTreeMap::new();
        for policy in rendered.accepted() {
            let workloads: BTreeSet<WorkloadKey> = match policy.kind {
                PolicyKind::Authorization => rendered
                    .workloads_of(policy)
                    .iter()
                    .filter_map(|w| parse_workload(w))
                    .filter(|w| self.entries.contains_key(w))
                    .collect(),
                PolicyKind::Traffic | PolicyKind::CircuitBreaker => rendered
                    .targets
                    .get(policy)
                    .map(|target| self.dependents(target).cloned().collect())
                    .unwrap_or_default(),
            };
            needed_by.insert(policy.clone(), workloads);
        }
        let mut needs: BTreeMap<WorkloadKey, BTreeSet<PolicyKey>> = BTreeMap::new();
        let mut carried = BTreeMap::new();
        for (policy, workloads) in &needed_by {
            let generation = rendered.generations.get(policy).copied().unwrap_or(0);
            for workload in workloads {
                needs
                    .entry(workload.clone())
                    .or_default()
                    .insert(policy.clone());
                let pair = (policy.clone(), workload.clone());
                let current = self
                    .entries
                    .get(workload)
                    .map_or(0, |e| generation_of(&e.version));
                let first = match self.carried.get(&pair) {
                    Some((seen, first)) if *seen == generation => *first,
                    _ => current,
                };
                carried.insert(pair, (generation, first));
            }
        }
        self.needed_by = needed_by;
        self.needs = needs;
        self.carried = carried;
    }
}

/// The version for `content`: the earlier one when it stamps the same content, else a new
/// generation, `now_ms` unless that is not after the earlier one.
fn next_version(earlier: Option<&str>, content: &str, now_ms: u64) -> String {
    if let Some(earlier) = earlier
        && earlier.split_once('.').map(|(_, hash)| hash) == Some(content)
    {
        return earlier.to_owned();
    }
    let floor = earlier.map_or(0, |v| generation_of(v) + 1);
    version_stamp(now_ms.max(floor), content)
}

/// `<namespace>/<serviceAccount>`, as AuthorizationPolicy status lists workloads.
fn parse_workload(text: &str) -> Option<WorkloadKey> {
    let (namespace, service_account) = text.split_once('/')?;
    Some(WorkloadKey {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
    })
}
