//! The proxy's own identity and the trust anchors it checks peers against.
//!
//! [`IdentityState`] is the one place the data plane reads them from: the current
//! [`Credentials`] (certificate chain and the key made in this process's memory) and the current
//! [`TrustBundle`]. Both are swapped atomically (`ArcSwap`) when the certificate is renewed or the
//! roots file changes, so a handshake never locks and a renewal never restarts the proxy or
//! drops a connection: connections keep the credentials they were opened with, new ones take
//! the new ones.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tandem_crds::identity::SpiffeId;

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
#[derive(Debug, Default)]
pub struct IdentityState {
    credentials: ArcSwapOption<Credentials>,
    trust: ArcSwapOption<TrustBundle>,
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
}
