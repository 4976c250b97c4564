//! The proxy config: loaded at start, watched, swapped atomically.
//!
//! The watcher polls the file with a [`FileWatch`], which follows the kubelet's `..data` symlink
//! swap and hands over the bytes only when they changed.
//!
//! The active config is an [`ArcSwap`]: the request path does one atomic load, never a lock.
//! A missing file means passthrough and not ready; a refused file keeps the last good config,
//! and its error is logged, counted and shown at `/config`.
//!
//! Compiling a version builds everything the request path reads: destinations, resilience
//! policies, endpoint identities and the inbound authorization ([`Authz`]). Authorization is
//! compiled for the mesh's trust domain, the one in this proxy's own certificate
//! (`cluster.local` until it has one); should a certificate arrive in another trust domain, the
//! watcher recompiles the active version for it ([`ConfigStore::follow_trust_domain`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tandem_crds::contract::ProxyConfig;
use tandem_crds::identity::DEFAULT_TRUST_DOMAIN;

use crate::authz::Authz;
use crate::error::{Error, Result, chain};
use crate::file_watch::{self, FileWatch, Poll};
use crate::identity::IdentityState;
use crate::metrics::{ConfigInfoLabels, Metrics, ReloadLabels};
use crate::policy::{PolicySet, Sources};
use crate::routing::Destinations;
use crate::tls::{BadEndpointIdentity, PeerIdentities};

/// One loaded config version, compiled for the request path.
#[derive(Debug)]
pub struct ActiveConfig {
    /// The config as loaded.
    pub config: ProxyConfig,
    /// SHA-256 (hex) of the file's bytes.
    pub hash: String,
    /// When this version was applied.
    pub loaded_at: SystemTime,
    /// Services by cluster IP and port.
    pub destinations: Destinations,
    /// The resilience policies of HTTP requests (routes, retries, balancing, breakers), with
    /// the state of the previous version's carried over.
    pub policies: PolicySet,
    /// The identity of each meshed endpoint, which outbound mutual TLS checks.
    pub identities: PeerIdentities,
    /// Who may call this workload: the compiled policies, with their metric series.
    pub authz: Authz,
}

/// Why a valid config could not be compiled.
#[derive(Debug)]
enum CompileError {
    Policy(crate::policy::PolicyError),
    Identity(BadEndpointIdentity),
    Authorization(tandem_crds::contract::CompileError),
}

impl ActiveConfig {
    fn new(
        config: ProxyConfig,
        hash: String,
        previous: Option<&ActiveConfig>,
        metrics: &Metrics,
        trust_domain: &str,
    ) -> std::result::Result<Self, CompileError> {
        let identities = PeerIdentities::compile(&config).map_err(CompileError::Identity)?;
        let authz = Authz::compile(&config, trust_domain, &metrics.authz)
            .map_err(CompileError::Authorization)?;
        let destinations = Destinations::compile(&config, metrics);
        let policies = PolicySet::build(&config, previous.map(|p| &p.policies), &Sources::system())
            .map_err(CompileError::Policy)?;
        Ok(Self {
            config,
            hash,
            loaded_at: SystemTime::now(),
            destinations,
            policies,
            identities,
            authz,
        })
    }
}

/// The last refused attempt.
#[derive(Clone, Debug)]
pub struct ReloadError {
    /// What was wrong, with its cause chain.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// The active config (if any) and the last reload error, shared by every task.
pub struct ConfigStore {
    path: PathBuf,
    active: ArcSwap<Option<Arc<ActiveConfig>>>,
    last_error: ArcSwap<Option<ReloadError>>,
    metrics: Arc<Metrics>,
    /// Where the mesh's trust domain comes from (this proxy's certificate), when identity is
    /// known to the store.
    identity: Option<Arc<IdentityState>>,
}

impl ConfigStore {
    /// A store with no config yet (passthrough, not ready).
    pub fn new(path: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self {
            path,
            active: ArcSwap::from_pointee(None),
            last_error: ArcSwap::from_pointee(None),
            metrics,
            identity: None,
        }
    }

    /// The same, compiling authorization for the trust domain of `identity`'s certificate.
    pub fn with_identity(mut self, identity: Arc<IdentityState>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The mesh's trust domain: our certificate's, `cluster.local` without one.
    fn trust_domain(&self) -> String {
        self.identity
            .as_ref()
            .and_then(|i| i.credentials())
            .map_or_else(
                || DEFAULT_TRUST_DOMAIN.to_owned(),
                |c| c.id.trust_domain.clone(),
            )
    }

    /// The file being watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The active config, `None` while no valid config was ever loaded. Lock-free.
    pub fn active(&self) -> Option<Arc<ActiveConfig>> {
        self.active.load().as_ref().clone()
    }

    /// The last refused attempt, cleared by the next successful load.
    pub fn last_error(&self) -> Option<ReloadError> {
        self.last_error.load().as_ref().clone()
    }

    /// Applies file bytes: parse, validate, swap. On refusal the active config stays.
    pub fn apply(&self, bytes: &[u8]) -> Result<Arc<ActiveConfig>> {
        let hash = sha256_hex(bytes);
        let compiled = ProxyConfig::from_json(bytes)
            .map_err(|source| Error::InvalidConfig {
                path: self.path.clone(),
                source,
            })
            .and_then(|config| self.compile(config, hash));
        match compiled {
            Ok(active) => {
                let active = Arc::new(active);
                self.active.store(Arc::new(Some(active.clone())));
                self.last_error.store(Arc::new(None));
                self.record_success(&active);
                tracing::info!(
                    version = %active.config.version,
                    hash = %active.hash,
                    services = active.config.services.len(),
                    default_policy = %active.authz.default_policy(),
                    authorization_policies = active.config.authorization.policies.len(),
                    "Config applied"
                );
                Ok(active)
            }
            Err(error) => {
                self.record_error(&error);
                Err(error)
            }
        }
    }

    /// Compiles a parsed and validated config against the active one.
    fn compile(&self, config: ProxyConfig, hash: String) -> Result<ActiveConfig> {
        let trust_domain = self.trust_domain();
        ActiveConfig::new(
            config,
            hash,
            self.active().as_deref(),
            &self.metrics,
            &trust_domain,
        )
        .map_err(|e| match e {
            CompileError::Policy(source) => Error::CompilePolicy {
                path: self.path.clone(),
                source,
            },
            CompileError::Identity(source) => Error::EndpointIdentity {
                path: self.path.clone(),
                source,
            },
            CompileError::Authorization(source) => Error::CompileAuthorization {
                path: self.path.clone(),
                source,
            },
        })
    }

    /// Recompiles the active config when our certificate's trust domain is not the one its
    /// authorization was compiled for (the certificate arrived after the config, in a trust
    /// domain other than `cluster.local`). Cheap when nothing changed: one comparison.
    pub fn follow_trust_domain(&self) {
        let Some(active) = self.active() else { return };
        let trust_domain = self.trust_domain();
        if active.authz.trust_domain() == trust_domain {
            return;
        }
        match self.compile(active.config.clone(), active.hash.clone()) {
            Ok(recompiled) => {
                tracing::info!(%trust_domain, "Authorization recompiled for the trust domain of our certificate");
                self.active.store(Arc::new(Some(Arc::new(recompiled))));
            }
            // Compiling depends on the trust domain only as a string to compare with, so this
            // cannot fail where the first compilation succeeded; keep serving if it ever does.
            Err(error) => self.record_error(&error),
        }
    }

    /// Records a failure to read the file.
    pub fn record_error(&self, error: &Error) {
        let message = chain(error);
        tracing::error!(error = %message, kept = self.active().is_some(), "Config refused; keeping the last good config");
        self.last_error.store(Arc::new(Some(ReloadError {
            message,
            at: SystemTime::now(),
        })));
        self.metrics.config_reload_errors.inc();
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: "error".into(),
            })
            .inc();
    }

    fn record_success(&self, active: &ActiveConfig) {
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: "success".into(),
            })
            .inc();
        self.metrics.config_info.clear();
        self.metrics
            .config_info
            .get_or_create(&ConfigInfoLabels {
                version: active.config.version.clone(),
                hash: active.hash.clone(),
            })
            .set(1);
    }
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls the config file and applies new versions.
pub struct Watcher {
    store: Arc<ConfigStore>,
    file: FileWatch,
}

impl Watcher {
    /// A watcher for the store's file.
    pub fn new(store: Arc<ConfigStore>) -> Self {
        let file = FileWatch::new(store.path().to_path_buf());
        Self { store, file }
    }

    /// Checks the file once and applies it if it changed (and follows our trust domain).
    pub fn check(&mut self) {
        self.store.follow_trust_domain();
        match self.file.poll() {
            Poll::Unchanged => {}
            Poll::Missing => {
                tracing::warn!(path = %self.file.path().display(), kept = self.store.active().is_some(), "Config file missing; passing traffic through until one appears");
            }
            Poll::ReadFailed(source) => self.store.record_error(&Error::ReadConfig {
                path: self.file.path().to_path_buf(),
                source,
            }),
            Poll::Changed(bytes) => self.file.attempted(self.store.apply(&bytes).is_ok()),
        }
    }

    /// Checks the file every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        file_watch::every(interval, || self.check()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(version: &str) -> String {
        format!(
            r#"{{"apiVersion":"tandem.dev/proxy-config/v1","version":"{version}","workload":{{"namespace":"shop","serviceAccount":"web"}}}}"#
        )
    }

    #[test]
    fn a_refused_file_keeps_the_last_good_config() {
        let store = ConfigStore::new("x".into(), Arc::new(Metrics::new()));
        store.apply(valid("v1").as_bytes()).unwrap();
        assert!(store.apply(b"{\"apiVersion\":").is_err());
        assert_eq!(store.active().unwrap().config.version, "v1");
        assert!(
            store
                .last_error()
                .unwrap()
                .message
                .contains("not valid JSON")
        );
        store.apply(valid("v2").as_bytes()).unwrap();
        assert_eq!(store.active().unwrap().config.version, "v2");
        assert!(store.last_error().is_none());
    }

    #[test]
    fn refusals_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let store = ConfigStore::new("x".into(), metrics.clone());
        assert!(store.apply(b"[]").is_err());
        assert!(
            metrics
                .encode(None)
                .contains("tandem_config_reload_errors_total 1")
        );
    }
}
