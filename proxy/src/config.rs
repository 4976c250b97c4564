//! The proxy config: loaded at start, watched, swapped atomically.
//!
//! The kubelet updates a ConfigMap volume by writing a new timestamped directory and renaming
//! the `..data` symlink onto it, so `config.json` (a symlink through `..data`) changes in one
//! step. The watcher polls: every interval it resolves the path and compares the target's
//! identity (resolved path, inode, length, modification time); only when that changes, or while
//! the last attempt failed, does it read the file, and only when the bytes' SHA-256 differs from
//! the last attempt does it parse them. Polling needs no inotify instance per pod, follows the
//! symlink swap without special cases, and also catches editors that rewrite in place.
//!
//! The active config is an [`ArcSwap`]: the request path does one atomic load, never a lock.
//! A missing file means passthrough and not ready; a refused file keeps the last good config,
//! and its error is logged, counted and shown at `/config`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tandem_crds::contract::ProxyConfig;

use crate::error::{Error, Result};
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
}

/// Why a valid config could not be compiled.
#[derive(Debug)]
enum CompileError {
    Policy(crate::policy::PolicyError),
    Identity(BadEndpointIdentity),
}

impl ActiveConfig {
    fn new(
        config: ProxyConfig,
        hash: String,
        previous: Option<&ActiveConfig>,
        metrics: &Metrics,
    ) -> std::result::Result<Self, CompileError> {
        let identities = PeerIdentities::compile(&config).map_err(CompileError::Identity)?;
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
}

impl ConfigStore {
    /// A store with no config yet (passthrough, not ready).
    pub fn new(path: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self {
            path,
            active: ArcSwap::from_pointee(None),
            last_error: ArcSwap::from_pointee(None),
            metrics,
        }
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
            .and_then(|config| {
                ActiveConfig::new(config, hash, self.active().as_deref(), &self.metrics).map_err(
                    |e| match e {
                        CompileError::Policy(source) => Error::CompilePolicy {
                            path: self.path.clone(),
                            source,
                        },
                        CompileError::Identity(source) => Error::EndpointIdentity {
                            path: self.path.clone(),
                            source,
                        },
                    },
                )
            });
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

    /// Records a failure to read the file.
    pub fn record_error(&self, error: &Error) {
        let message = format!("{:#}", anyhow_chain(error));
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

fn anyhow_chain(error: &Error) -> String {
    let mut out = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies one version of the file on disk without reading it (also used for the
/// trust-roots file, which the kubelet swaps the same way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    resolved: PathBuf,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

pub(crate) fn file_identity(path: &Path) -> std::io::Result<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&resolved)?;
    Ok(FileIdentity {
        resolved,
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Polls the config file and applies new versions.
pub struct Watcher {
    store: Arc<ConfigStore>,
    seen: Option<FileIdentity>,
    last_attempt_hash: Option<String>,
    last_failed: bool,
    missing_logged: bool,
}

impl Watcher {
    /// A watcher for the store's file.
    pub fn new(store: Arc<ConfigStore>) -> Self {
        Self {
            store,
            seen: None,
            last_attempt_hash: None,
            last_failed: false,
            missing_logged: false,
        }
    }

    /// Checks the file once and applies it if it changed.
    pub fn check(&mut self) {
        let path = self.store.path().to_path_buf();
        let id = match file_identity(&path) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.missing_logged {
                    tracing::warn!(path = %path.display(), kept = self.store.active().is_some(), "Config file missing; passing traffic through until one appears");
                    self.missing_logged = true;
                }
                self.seen = None;
                return;
            }
            Err(source) => {
                self.fail_read(path, source);
                return;
            }
        };
        self.missing_logged = false;
        if self.seen.as_ref() == Some(&id) && !self.last_failed {
            return;
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(source) => {
                self.fail_read(path, source);
                return;
            }
        };
        self.seen = Some(id);
        let hash = sha256_hex(&bytes);
        if self.last_attempt_hash.as_deref() == Some(hash.as_str()) {
            return;
        }
        self.last_attempt_hash = Some(hash);
        self.last_failed = self.store.apply(&bytes).is_err();
    }

    fn fail_read(&mut self, path: PathBuf, source: std::io::Error) {
        let message = source.to_string();
        if self.last_attempt_hash.as_deref() != Some(message.as_str()) {
            self.store.record_error(&Error::ReadConfig { path, source });
            // Remember the error text so the same failure is counted once.
            self.last_attempt_hash = Some(message);
        }
        self.last_failed = true;
    }

    /// Checks the file every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.check();
        }
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
