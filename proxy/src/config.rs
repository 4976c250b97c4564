//! The proxy config: loaded at start, watched, swapped atomically.
//!
//! The watcher polls the file with a [`FileWatch`], which follows the kubelet's `..data` symlink
//! swap and hands over the bytes only when they changed.
//!
//! A second source, the operator's config stream ([`crate::stream`]), hands over whole configs
//! too ([`ConfigStore::apply_stream`]). Each source keeps its last good version; the active one
//! is the newer by generation ([`ProxyConfig::generation`]), under one rule: **a version becomes
//! active when it arrives if its generation is 0 (unstamped: a hand-written file, an older
//! operator) or at least the active version's**, except that the version already active is
//! not taken again from the other source. So a stale file (the kubelet's sync lag) never
//! replaces a newer stream version, a newer file wins over an older stream version (the stream
//! is down or behind), and an unstamped file is applied whenever it changes, as it always was.
//! Both sources are validated and compiled alike: a refused version keeps the last good
//! config and is logged, counted and shown at `/config` under its source.
//!
//! The active config is an [`ArcSwap`]: the request path does one atomic load, never a lock.
//! A missing file means passthrough and not ready; a refused file keeps the last good config,
//! and its error is logged, counted and shown at `/config`.
//!
//! Compiling a version builds everything the request path reads: destinations, resilience
//! policies, endpoint identities, the inbound authorization ([`Authz`]) and tracing's
//! collector and sampler ([`TraceSettings`]). Authorization is
//! compiled for the mesh's trust domain, the one in this proxy's own certificate
//! (`cluster.local` until it has one); should a certificate arrive in another trust domain, the
//! watcher recompiles the active version for it ([`ConfigStore::follow_trust_domain`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tandem_crds::contract::{AppliedReport, ConfigSource, ProxyConfig, ValidationErrors};
use tandem_crds::identity::DEFAULT_TRUST_DOMAIN;
use tokio::sync::watch;

use crate::authz::Authz;
use crate::error::{Error, Result, chain};
use crate::file_watch::{self, FileWatch, Poll};
use crate::identity::IdentityState;
use crate::metrics::{ConfigInfoLabels, Metrics, ReloadLabels, gauge_value};
use crate::policy::{PolicySet, Sources};
use crate::routing::Destinations;
use crate::telemetry::LabelTable;
use crate::tls::{BadEndpointIdentity, PeerIdentities};
use crate::trace::TraceSettings;
use crate::trace::export::BadCollector;

/// One loaded config version, compiled for the request path.
#[derive(Debug)]
pub struct ActiveConfig {
    /// The config as loaded.
    pub config: ProxyConfig,
    /// SHA-256 (hex) of the file's bytes (of a stream version: of its JSON as the operator
    /// writes the file, so the same version hashes alike from both sources).
    pub hash: String,
    /// Where this version came from.
    pub source: ConfigSource,
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
    /// Tracing's collector and sampling, when tracing is on.
    pub tracing: Option<Arc<TraceSettings>>,
    /// The labels of this workload and of every endpoint and service it knows, for the
    /// standard metrics and the access log.
    pub labels: LabelTable,
}

/// Why a valid config could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Its policies do not compile.
    #[error("its policies do not compile")]
    Policy(#[source] crate::policy::PolicyError),
    /// An endpoint identity is malformed.
    #[error("an endpoint identity is malformed")]
    Identity(#[source] BadEndpointIdentity),
    /// Its authorization policies do not compile.
    #[error("its authorization policies do not compile")]
    Authorization(#[source] tandem_crds::contract::CompileError),
    /// Its tracing collector is not a usable URL.
    #[error("its tracing collector is not a usable URL")]
    Tracing(#[source] BadCollector),
}

/// Why a config from the stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamConfigError {
    /// It breaks the contract's rules.
    #[error("config is invalid: {0}")]
    Invalid(#[source] ValidationErrors),
    /// It does not compile.
    #[error(transparent)]
    Compile(CompileError),
}

impl ActiveConfig {
    /// The generation of this version ([`ProxyConfig::generation`]).
    pub fn generation(&self) -> u64 {
        self.config.generation()
    }

    fn new(
        config: ProxyConfig,
        hash: String,
        source: ConfigSource,
        previous: Option<&ActiveConfig>,
        metrics: &Metrics,
        trust_domain: &str,
    ) -> std::result::Result<Self, CompileError> {
        let identities = PeerIdentities::compile(&config).map_err(CompileError::Identity)?;
        let authz = Authz::compile(&config, trust_domain, &metrics.authz)
            .map_err(CompileError::Authorization)?;
        let tracing = TraceSettings::compile(&config).map_err(CompileError::Tracing)?;
        let destinations = Destinations::compile(&config, metrics);
        let labels = LabelTable::compile(
            &config,
            metrics.mesh.workload(),
            trust_domain,
            &metrics.mesh.interner,
        );
        let policies = PolicySet::build(&config, previous.map(|p| &p.policies), &Sources::system())
            .map_err(CompileError::Policy)?;
        Ok(Self {
            config,
            hash,
            source,
            loaded_at: SystemTime::now(),
            destinations,
            policies,
            identities,
            authz,
            tracing,
            labels,
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

/// A source's last good version.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Its version stamp.
    pub version: String,
    /// The generation the stamp carries (0 for none).
    pub generation: u64,
    /// Its hash ([`ActiveConfig::hash`]).
    pub hash: String,
    /// When it was accepted.
    pub at: SystemTime,
}

/// What one source (file or stream) last gave.
#[derive(Clone, Debug, Default)]
pub struct SourceState {
    /// Its last good version.
    pub good: Option<Loaded>,
    /// Its last refused attempt, cleared by its next good one.
    pub last_error: Option<ReloadError>,
}

/// The active config (if any), each source's last good version and last error, shared by
/// every task.
pub struct ConfigStore {
    path: PathBuf,
    active: ArcSwap<Option<Arc<ActiveConfig>>>,
    file: ArcSwap<SourceState>,
    stream: ArcSwap<SourceState>,
    /// Serializes the two sources' offers: choosing the winner and swapping must not interleave.
    /// Never taken on the request path.
    offering: Mutex<()>,
    /// The latest active version, for the reporter of applied versions (coalesced: a slow
    /// reporter only ever sends the latest).
    applied: watch::Sender<Option<AppliedReport>>,
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
            file: ArcSwap::from_pointee(SourceState::default()),
            stream: ArcSwap::from_pointee(SourceState::default()),
            offering: Mutex::new(()),
            applied: watch::Sender::new(None),
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

    /// What `source` last gave.
    pub fn source(&self, source: ConfigSource) -> Arc<SourceState> {
        self.state(source).load_full()
    }

    fn state(&self, source: ConfigSource) -> &ArcSwap<SourceState> {
        match source {
            ConfigSource::File => &self.file,
            ConfigSource::Stream => &self.stream,
        }
    }

    /// The most recent refused attempt of either source, each cleared by its source's next
    /// good version.
    pub fn last_error(&self) -> Option<ReloadError> {
        let file = self.file.load().last_error.clone();
        let stream = self.stream.load().last_error.clone();
        match (file, stream) {
            (Some(f), Some(s)) => Some(if s.at > f.at { s } else { f }),
            (f, s) => f.or(s),
        }
    }

    /// Follows the active version: every change of it, latest only.
    pub fn applied(&self) -> watch::Receiver<Option<AppliedReport>> {
        self.applied.subscribe()
    }

    /// Applies file bytes: parse, validate, compile, and make it active if it wins (see the
    /// module's rule). Returns the config active afterwards; on refusal the active config stays.
    pub fn apply(&self, bytes: &[u8]) -> Result<Arc<ActiveConfig>> {
        let hash = sha256_hex(bytes);
        let parsed = ProxyConfig::from_json(bytes).map_err(|source| Error::InvalidConfig {
            path: self.path.clone(),
            source,
        });
        self.offer(ConfigSource::File, parsed, hash)
    }

    /// Applies a config the operator's stream delivered, exactly as a file: validate, compile,
    /// make it active if it wins. Returns the config active afterwards.
    pub fn apply_stream(&self, config: ProxyConfig) -> Result<Arc<ActiveConfig>> {
        let hash = sha256_hex(config.to_json().as_bytes());
        let checked = match config.validate() {
            Ok(()) => Ok(config),
            Err(errors) => Err(Error::StreamConfig {
                version: config.version.clone(),
                source: StreamConfigError::Invalid(errors),
            }),
        };
        self.offer(ConfigSource::Stream, checked, hash)
    }

    fn offer(
        &self,
        source: ConfigSource,
        parsed: Result<ProxyConfig>,
        hash: String,
    ) -> Result<Arc<ActiveConfig>> {
        // A panic while holding it leaves nothing half-done (the swap is one store).
        let _offering = self
            .offering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let compiled = parsed.and_then(|config| self.compile(source, config, hash));
        let candidate = match compiled {
            Ok(candidate) => Arc::new(candidate),
            Err(error) => {
                self.record_refusal(source, &error);
                return Err(error);
            }
        };
        self.record_good(&candidate);
        let active = self.active();
        if !wins(active.as_deref(), &candidate) {
            tracing::info!(
                source = %source,
                version = %candidate.config.version,
                active = active.as_ref().map(|a| a.config.version.as_str()),
                "Config version not newer than the active one; keeping the active one"
            );
            if let Some(active) = active {
                return Ok(active);
            }
        }
        self.activate(&candidate);
        Ok(candidate)
    }

    fn activate(&self, active: &Arc<ActiveConfig>) {
        self.metrics
            .mesh
            .set_prefix(active.config.telemetry.metrics_prefix);
        self.active.store(Arc::new(Some(active.clone())));
        self.record_success(active);
        self.applied.send_replace(Some(AppliedReport {
            version: active.config.version.clone(),
            source: active.source,
        }));
        tracing::info!(
            source = %active.source,
            version = %active.config.version,
            generation = active.generation(),
            hash = %active.hash,
            services = active.config.services.len(),
            default_policy = %active.authz.default_policy(),
            authorization_policies = active.config.authorization.policies.len(),
            "Config applied"
        );
    }

    /// Compiles a parsed and validated config against the active one.
    fn compile(
        &self,
        source: ConfigSource,
        config: ProxyConfig,
        hash: String,
    ) -> Result<ActiveConfig> {
        let trust_domain = self.trust_domain();
        let version = config.version.clone();
        ActiveConfig::new(
            config,
            hash,
            source,
            self.active().as_deref(),
            &self.metrics,
            &trust_domain,
        )
        .map_err(|e| self.compile_error(source, version, e))
    }

    fn compile_error(&self, source: ConfigSource, version: String, error: CompileError) -> Error {
        let path = self.path.clone();
        match (source, error) {
            (ConfigSource::Stream, source) => Error::StreamConfig {
                version,
                source: StreamConfigError::Compile(source),
            },
            (ConfigSource::File, CompileError::Policy(source)) => {
                Error::CompilePolicy { path, source }
            }
            (ConfigSource::File, CompileError::Identity(source)) => {
                Error::EndpointIdentity { path, source }
            }
            (ConfigSource::File, CompileError::Authorization(source)) => {
                Error::CompileAuthorization { path, source }
            }
            (ConfigSource::File, CompileError::Tracing(source)) => {
                Error::TracingCollector { path, source }
            }
        }
    }

    /// Recompiles the active config when our certificate's trust domain is not the one its
    /// authorization was compiled for (the certificate arrived after the config, in a trust
    /// domain other than `cluster.local`). Cheap when nothing changed: one comparison.
    pub fn follow_trust_domain(&self) {
        let _offering = self
            .offering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(active) = self.active() else { return };
        let trust_domain = self.trust_domain();
        if active.authz.trust_domain() == trust_domain {
            return;
        }
        match self.compile(active.source, active.config.clone(), active.hash.clone()) {
            Ok(recompiled) => {
                tracing::info!(%trust_domain, "Authorization recompiled for the trust domain of our certificate");
                self.active.store(Arc::new(Some(Arc::new(recompiled))));
            }
            // Compiling depends on the trust domain only as a string to compare with, so this
            // cannot fail where the first compilation succeeded; keep serving if it ever does.
            Err(error) => self.record_refusal(active.source, &error),
        }
    }

    /// Records a failure to read the file.
    pub fn record_error(&self, error: &Error) {
        self.record_refusal(ConfigSource::File, error);
    }

    fn record_refusal(&self, source: ConfigSource, error: &Error) {
        let message = chain(error);
        tracing::error!(source = %source, error = %message, kept = self.active().is_some(), "Config refused; keeping the last good config");
        let state = self.state(source);
        state.store(Arc::new(SourceState {
            good: state.load().good.clone(),
            last_error: Some(ReloadError {
                message,
                at: SystemTime::now(),
            }),
        }));
        self.metrics.config_reload_errors.inc();
        self.count_reload("error");
    }

    fn record_good(&self, candidate: &ActiveConfig) {
        self.state(candidate.source).store(Arc::new(SourceState {
            good: Some(Loaded {
                version: candidate.config.version.clone(),
                generation: candidate.generation(),
                hash: candidate.hash.clone(),
                at: candidate.loaded_at,
            }),
            last_error: None,
        }));
        self.metrics
            .stream
            .source_loaded(candidate.source, candidate.generation());
        self.count_reload("success");
    }

    fn count_reload(&self, result: &str) {
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: result.into(),
            })
            .inc();
    }

    fn record_success(&self, active: &ActiveConfig) {
        self.metrics
            .stream
            .generation
            .set(gauge_value(active.generation()));
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

/// The precedence rule (see the module docs): does `candidate` replace `active`?
fn wins(active: Option<&ActiveConfig>, candidate: &ActiveConfig) -> bool {
    let Some(active) = active else { return true };
    let generation = candidate.generation();
    if generation == 0 {
        return true;
    }
    if candidate.config.version == active.config.version && candidate.source != active.source {
        return false;
    }
    generation >= active.generation()
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

    fn stream(version: &str) -> ProxyConfig {
        ProxyConfig::from_json(valid(version).as_bytes()).unwrap()
    }

    #[test]
    fn the_newer_generation_wins_whichever_source_it_comes_from() {
        let store = ConfigStore::new("x".into(), Arc::new(Metrics::new()));
        let mut applied = store.applied();
        store.apply(valid("100.aa").as_bytes()).unwrap();
        store.apply_stream(stream("200.bb")).unwrap();
        let active = store.active().unwrap();
        assert_eq!(
            (active.config.version.as_str(), active.source),
            ("200.bb", ConfigSource::Stream)
        );
        // A stale file (the kubelet's lag) is kept as the file's last good, not activated.
        store.apply(valid("150.cc").as_bytes()).unwrap();
        assert_eq!(store.active().unwrap().config.version, "200.bb");
        let file = store.source(ConfigSource::File);
        assert_eq!(file.good.as_ref().unwrap().generation, 150);
        // A newer file wins over the stream.
        store.apply(valid("300.dd").as_bytes()).unwrap();
        assert_eq!(store.active().unwrap().source, ConfigSource::File);
        // The same version from the other source changes nothing.
        store.apply_stream(stream("300.dd")).unwrap();
        assert_eq!(store.active().unwrap().source, ConfigSource::File);
        assert_eq!(
            applied.borrow_and_update().clone().unwrap(),
            AppliedReport {
                version: "300.dd".into(),
                source: ConfigSource::File
            }
        );
    }

    #[test]
    fn an_unstamped_file_is_applied_whenever_it_changes() {
        let store = ConfigStore::new("x".into(), Arc::new(Metrics::new()));
        store.apply_stream(stream("200.bb")).unwrap();
        store.apply(valid("hand-written").as_bytes()).unwrap();
        assert_eq!(store.active().unwrap().config.version, "hand-written");
        store.apply_stream(stream("201.bb")).unwrap();
        assert_eq!(store.active().unwrap().config.version, "201.bb");
    }

    #[test]
    fn an_invalid_stream_version_keeps_the_last_good_one_and_shows_under_the_stream() {
        let metrics = Arc::new(Metrics::new());
        let store = ConfigStore::new("x".into(), metrics.clone());
        store.apply_stream(stream("200.bb")).unwrap();
        let mut bad = stream("300.cc");
        bad.workload.service_account = String::new();
        let error = store.apply_stream(bad).unwrap_err();
        assert!(error.to_string().contains("300.cc"), "{error}");
        assert_eq!(store.active().unwrap().config.version, "200.bb");
        let state = store.source(ConfigSource::Stream);
        assert_eq!(state.good.as_ref().unwrap().version, "200.bb");
        assert!(
            state
                .last_error
                .as_ref()
                .unwrap()
                .message
                .contains("invalid")
        );
        assert!(store.source(ConfigSource::File).last_error.is_none());
        let text = metrics.encode(None);
        assert!(
            text.contains("tandem_proxy_config_generation 200"),
            "{text}"
        );
        assert!(
            text.contains(r#"tandem_proxy_config_source_generation{source="stream"} 200"#),
            "{text}"
        );
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
