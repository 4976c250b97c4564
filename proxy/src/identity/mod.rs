//! The proxy's own identity and the trust anchors it checks peers against.
//!
//! [`IdentityState`] is the one place the data plane reads them from: the current
//! [`Credentials`] (certificate chain and the key made in this process's memory) and the current
//! [`TrustBundle`]. Both are swapped atomically (`ArcSwap`) when the certificate is renewed or the
//! roots file changes, so a handshake never locks and a renewal never restarts the proxy or
//! drops a connection: connections keep the credentials they were opened with, new ones take
//! the new ones.
//!
//! When identity is on (`--identity-addr`), [`start`] loads the trust roots and spawns two
//! tasks: the [`trust::TrustWatcher`], which polls the roots file, and the [`client::Client`],
//! which gets the first certificate and renews it at 70 % of its lifetime ([`schedule`]), each
//! time with a fresh key, by the call in [`certify`]. Until both a certificate and a bundle are
//! in place (and while the certificate is expired) the proxy is not ready. [`IdentityState`]
//! also keeps what `/config` shows: the last failure, the next renewal time.

pub mod certify;
pub mod client;
pub mod error;
pub mod schedule;
pub mod trust;

pub use certify::{SignerAddr, SignerName};
pub use error::{BadResponse, CertifyFailure, TrustError};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tandem_crds::identity::SpiffeId;
use tracing::Instrument;

/// A certificate issued to this proxy, with the key it was issued for.
#[derive(Debug)]
pub struct Credentials {
    /// The identity the certificate carries (its URI SAN).
    pub id: SpiffeId,
    /// Leaf first, then the issuer and any intermediates (DER).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8 DER. Made in memory, never written anywhere.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The chain and key ready for rustls (server and client side).
    pub certified: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, hex.
    pub serial: String,
}

/// The trust anchors: every root a peer's chain may end in (two during a rotation).
#[derive(Debug)]
pub struct TrustBundle {
    /// The roots, for rustls verifiers.
    pub roots: Arc<RootCertStore>,
    /// The roots as DER, in file order.
    pub certificates: Vec<CertificateDer<'static>>,
    /// SHA-256 fingerprint of each root, hex, in file order (shown at `/config`).
    pub fingerprints: Vec<String>,
}

/// The current credentials and trust anchors, read without locks by every handshake.
///
/// [`Default`] is identity off: nothing is required for readiness. [`IdentityState::enabled`]
/// is identity on.
#[derive(Debug, Default)]
pub struct IdentityState {
    credentials: ArcSwapOption<Credentials>,
    trust: ArcSwapOption<TrustBundle>,
    settings: Option<IdentitySettings>,
    certify: ArcSwap<CertifyStatus>,
    trust_error: ArcSwapOption<Failure>,
}

/// Where the identity comes from (shown at `/config`).
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// `host:port` of the signer.
    pub signer: String,
    /// The name the signer's certificate must carry.
    pub server_name: String,
    /// The ServiceAccount token file.
    pub token: PathBuf,
    /// The trust-roots file.
    pub roots: PathBuf,
}

/// A failure to show at `/config`.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The failure class (`unauthenticated`, `refused`, `unreachable`, `bad-response`, `local`)
    /// for a certify failure; `None` for a trust-roots failure.
    pub reason: Option<&'static str>,
    /// What went wrong, with its cause chain.
    pub message: String,
    /// When.
    pub at: SystemTime,
}

/// The certify task's progress.
#[derive(Clone, Debug, Default)]
pub struct CertifyStatus {
    /// When the next attempt is due.
    pub next_attempt: Option<SystemTime>,
    /// The last failed attempt, cleared by the next success.
    pub last_error: Option<Failure>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Certificates obtained since start.
    pub issued: u64,
}

impl IdentityState {
    /// The certificate to present now, if one has been issued.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.load_full()
    }

    /// The trust anchors now, if a bundle has been loaded.
    pub fn trust(&self) -> Option<Arc<TrustBundle>> {
        self.trust.load_full()
    }

    /// Installs renewed (or first) credentials; connections opened from now on use them.
    pub fn set_credentials(&self, credentials: Arc<Credentials>) {
        self.credentials.store(Some(credentials));
    }

    /// Installs a new trust bundle; handshakes from now on are checked against it.
    pub fn set_trust(&self, trust: Arc<TrustBundle>) {
        self.trust.store(Some(trust));
    }

    /// Identity on: readiness waits for a certificate and a trust bundle.
    pub fn enabled(settings: IdentitySettings) -> Self {
        Self {
            settings: Some(settings),
            ..Self::default()
        }
    }

    /// Whether identity is on.
    pub fn is_enabled(&self) -> bool {
        self.settings.is_some()
    }

    /// Where the identity comes from, when it is on.
    pub fn settings(&self) -> Option<&IdentitySettings> {
        self.settings.as_ref()
    }

    /// Ready as far as identity goes: always when it is off; else a current (unexpired)
    /// certificate and a trust bundle are needed, as in Linkerd.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.is_enabled() {
            return Ok(());
        }
        let Some(credentials) = self.credentials() else {
            return Err("no certificate yet");
        };
        if credentials.not_after <= SystemTime::now() {
            return Err("certificate expired");
        }
        if self.trust().is_none() {
            return Err("no trust bundle loaded");
        }
        Ok(())
    }

    /// The certify task's progress.
    pub fn certify_status(&self) -> Arc<CertifyStatus> {
        self.certify.load_full()
    }

    /// Replaces the certify task's progress (only that task writes it).
    pub fn set_certify_status(&self, status: CertifyStatus) {
        self.certify.store(Arc::new(status));
    }

    /// The last refused trust-roots file, cleared by the next good one.
    pub fn trust_error(&self) -> Option<Arc<Failure>> {
        self.trust_error.load_full()
    }

    /// Records a refused or missing trust-roots file.
    pub fn set_trust_error(&self, message: String) {
        self.trust_error.store(Some(Arc::new(Failure {
            reason: None,
            message,
            at: SystemTime::now(),
        })));
    }

    /// Clears the trust-roots error after a good file.
    pub fn clear_trust_error(&self) {
        self.trust_error.store(None);
    }

    /// What `/config` shows under `identity`.
    pub fn snapshot(&self) -> serde_json::Value {
        let Some(settings) = &self.settings else {
            return serde_json::json!({ "enabled": false });
        };
        let credentials = self.credentials();
        let trust = self.trust();
        let status = self.certify_status();
        let failure = |f: &Failure| {
            serde_json::json!({
                "reason": f.reason,
                "message": f.message,
                "at": rfc3339(f.at),
            })
        };
        serde_json::json!({
            "enabled": true,
            "ready": self.ready().is_ok(),
            "signer": settings.signer,
            "serverName": settings.server_name,
            "tokenPath": settings.token.display().to_string(),
            "trustRootsPath": settings.roots.display().to_string(),
            "spiffeId": credentials.as_ref().map(|c| c.id.uri()),
            "serial": credentials.as_ref().map(|c| c.serial.clone()),
            "notBefore": credentials.as_ref().map(|c| rfc3339(c.not_before)),
            "notAfter": credentials.as_ref().map(|c| rfc3339(c.not_after)),
            "nextRenewal": status.next_attempt.map(rfc3339),
            "issued": status.issued,
            "consecutiveFailures": status.failures,
            "lastError": status.last_error.as_ref().map(failure),
            "trustRoots": trust.as_ref().map(|t| t.fingerprints.clone()).unwrap_or_default(),
            "trustLastError": self.trust_error().as_deref().map(failure),
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Turns identity on when `args` name a signer: loads the trust roots once, then spawns the
/// roots watcher (polling every `poll`) and the certify task. Returns the state the data
/// plane reads; with identity off, an empty state that readiness ignores.
pub fn start(
    args: &crate::cli::IdentityArgs,
    poll: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) -> Arc<IdentityState> {
    let Some(addr) = args.identity_addr.0.clone() else {
        return Arc::new(IdentityState::default());
    };
    let signer = certify::Signer {
        addr,
        server_name: args.identity_name.0.clone(),
        token: args.identity_token.clone(),
        timeout: client::ATTEMPT_TIMEOUT,
    };
    let state = Arc::new(IdentityState::enabled(IdentitySettings {
        signer: signer.addr.to_string(),
        server_name: args.identity_name.to_string(),
        token: args.identity_token.clone(),
        roots: args.trust_roots.clone(),
    }));
    metrics.identity.enable();
    let trust_changed = Arc::new(tokio::sync::Notify::new());
    let mut watcher = trust::TrustWatcher::new(
        args.trust_roots.clone(),
        state.clone(),
        metrics.clone(),
        trust_changed.clone(),
    );
    watcher.check();
    tokio::spawn(
        watcher
            .run(poll)
            .instrument(tracing::info_span!("trust_roots")),
    );
    let client = client::Client::new(signer, state.clone(), metrics, trust_changed);
    tokio::spawn(client.run().instrument(tracing::info_span!("identity")));
    state
}
