//! Projected volumes, kept current for as long as the pod runs: ServiceAccount tokens
//! ([`super::tokens`]: bound to the pod, replaced at 80 % of their lifetime), ConfigMaps and the
//! downward API, written together with one atomic swap ([`super::volumes::write_atomic`]), so a
//! reader never sees a new token beside an old CA bundle.
//!
//! The kubelet re-renders a projected volume on every pod sync (about a minute); here a volume
//! is rendered again when its first token falls due, and every [`RESYNC`] when it projects
//! anything else. A ConfigMap that does not exist contributes nothing until it appears (the
//! kubelet refuses to mount a non-optional one; this node waits for it instead, which keeps a
//! pod whose `kube-root-ca.crt` is late from failing).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, ProjectedVolumeSource, VolumeProjection};
use kube::api::Api;

use super::tokens::{self, BoundPod, Token};
use super::volumes;
use crate::{Error, Result};

/// How often a volume that projects ConfigMaps or the downward API is rendered again.
pub const RESYNC: Duration = Duration::from_secs(20);
/// How long to wait after a failed render before trying again (the old files stay).
const RETRY: Duration = Duration::from_secs(5);

/// One projected volume of one pod.
pub struct Projected {
    client: kube::Client,
    pod: BoundPod,
    dir: PathBuf,
    sources: Vec<VolumeProjection>,
    /// The current token of each token source, by file path.
    tokens: BTreeMap<String, Token>,
}

impl std::fmt::Debug for Projected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projected")
            .field("pod", &self.pod)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Projected {
    /// The volume `source` of `pod`, written into `dir`.
    pub fn new(
        client: kube::Client,
        pod: BoundPod,
        dir: PathBuf,
        source: &ProjectedVolumeSource,
    ) -> Self {
        Self {
            client,
            pod,
            dir,
            sources: source.sources.clone().unwrap_or_default(),
            tokens: BTreeMap::new(),
        }
    }

    /// Renders every source (a token only when it is missing or due) and writes the volume if
    /// anything changed. Returns when it should be rendered again.
    pub async fn sync(&mut self, now: SystemTime) -> Result<SystemTime> {
        let mut files = BTreeMap::new();
        let mut next = None::<SystemTime>;
        let mut resync = false;
        for source in &self.sources {
            if let Some(projection) = &source.service_account_token {
                let current = self
                    .tokens
                    .get(&projection.path)
                    .filter(|token| !token.is_due(now));
                let token = match current {
                    Some(token) => token.clone(),
                    None => {
                        let fresh = tokens::request(&self.client, projection, &self.pod).await?;
                        self.tokens.insert(projection.path.clone(), fresh.clone());
                        fresh
                    }
                };
                next = Some(next.map_or(token.refresh_at, |n| n.min(token.refresh_at)));
                files.insert(projection.path.clone(), token.value.into_bytes());
            }
            if let Some(config_map) = &source.config_map {
                resync = true;
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.pod.namespace);
                let found = api.get_opt(&config_map.name).await.map_err(|e| {
                    Error::kube(
                        format!("get ConfigMap {}/{}", self.pod.namespace, config_map.name),
                        e,
                    )
                })?;
                if let Some(found) = found {
                    files.extend(volumes::config_map_files(
                        found.data.as_ref(),
                        found.binary_data.as_ref(),
                        config_map.items.as_deref(),
                    ));
                }
            }
            if let Some(downward) = &source.downward_api {
                resync = true;
                for item in downward.items.iter().flatten() {
                    let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.namespace") => &self.pod.namespace,
                        Some("metadata.name") => &self.pod.name,
                        Some("metadata.uid") => &self.pod.uid,
                        _ => continue,
                    };
                    files.insert(item.path.clone(), value.clone().into_bytes());
                }
            }
        }
        volumes::write_atomic(&self.dir, &files)?;
        let periodic = now + RESYNC;
        let next = match next {
            Some(next) if resync => next.min(periodic),
            Some(next) => next,
            None => periodic,
        };
        // A token the apiserver says is due at once must not turn this into a busy loop.
        Ok(next.max(now + Duration::from_secs(1)))
    }

    /// Keeps the volume current until the task is aborted (the pod stops), starting with a
    /// render at `first`.
    pub async fn keep(mut self, first: SystemTime) {
        let mut at = first;
        loop {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            at = match self.sync(SystemTime::now()).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", self.pod.namespace, self.pod.name),
                        dir = %self.dir.display(), error = %e, "Projected volume refresh failed; retrying");
                    SystemTime::now() + RETRY
                }
            };
        }
    }
}
