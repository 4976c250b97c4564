//! The trust anchors: a PEM file (the `tandem-trust-roots` ConfigMap, mounted by the kubelet),
//! polled like the config file and swapped atomically when it changes.
//!
//! The watcher polls the file with the [`FileWatch`] the config watcher uses (following the
//! kubelet's `..data` symlink swap, parsing only bytes that changed). A refused file
//! (not PEM, no certificate, a certificate that cannot be an anchor) keeps the last good bundle;
//! the error is logged, counted in `tandem_identity_trust_reload_errors_total` and shown at
//! `/config`. A missing file is logged once and shown; until a bundle loads the proxy is not
//! ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::Notify;

use super::error::TrustError;
use super::{IdentityState, TrustBundle};
use crate::config::sha256_hex;
use crate::error::chain;
use crate::file_watch::{self, FileWatch, Poll};
use crate::metrics::Metrics;

impl TrustBundle {
    /// Parses a PEM bundle of one or more `CERTIFICATE`s (other PEM sections are skipped).
    pub fn from_pem(pem: &[u8]) -> Result<Self, TrustError> {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TrustError::Pem)?;
        Self::from_der(certificates)
    }

    /// A bundle of these roots (DER), in this order.
    pub fn from_der(certificates: Vec<CertificateDer<'static>>) -> Result<Self, TrustError> {
        if certificates.is_empty() {
            return Err(TrustError::Empty);
        }
        let mut roots = RootCertStore::empty();
        for (index, certificate) in certificates.iter().enumerate() {
            roots
                .add(certificate.clone())
                .map_err(|source| TrustError::Root { index, source })?;
        }
        let fingerprints = certificates.iter().map(|c| fingerprint(c)).collect();
        Ok(Self {
            roots: Arc::new(roots),
            certificates,
            fingerprints,
        })
    }
}

/// SHA-256 of a certificate's DER, lower-case hex (what `openssl x509 -fingerprint -sha256`
/// prints, without the colons).
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    sha256_hex(certificate.as_ref())
}

/// Polls the trust-roots file and installs new bundles.
pub struct TrustWatcher {
    file: FileWatch,
    state: Arc<IdentityState>,
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
}

impl TrustWatcher {
    /// A watcher of `path` installing into `state`; `changed` is notified after each new bundle
    /// (the certify task waits on it while it has no way to check the signer).
    pub fn new(
        path: PathBuf,
        state: Arc<IdentityState>,
        metrics: Arc<Metrics>,
        changed: Arc<Notify>,
    ) -> Self {
        Self {
            file: FileWatch::new(path),
            state,
            metrics,
            changed,
        }
    }

    /// The file watched.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Checks the file once and installs it if it changed.
    pub fn check(&mut self) {
        match self.file.poll() {
            Poll::Unchanged => {}
            Poll::Missing => {
                tracing::warn!(path = %self.path().display(), kept = self.state.trust().is_some(), "Trust roots file missing; keeping the last good bundle (not ready without one)");
                self.state.set_trust_error(format!(
                    "trust roots file {} missing",
                    self.path().display()
                ));
            }
            Poll::ReadFailed(source) => self.refuse(&TrustError::Read {
                path: self.path().to_path_buf(),
                source,
            }),
            Poll::Changed(bytes) => {
                let installed = self.install(&bytes);
                self.file.attempted(installed);
            }
        }
    }

    /// Parses and installs a bundle; false if it was refused.
    fn install(&self, pem: &[u8]) -> bool {
        match TrustBundle::from_pem(pem) {
            Ok(bundle) => {
                tracing::info!(
                    path = %self.path().display(),
                    roots = bundle.certificates.len(),
                    fingerprints = ?bundle.fingerprints,
                    "Trust roots loaded"
                );
                self.state.set_trust(Arc::new(bundle));
                self.state.clear_trust_error();
                self.changed.notify_one();
                true
            }
            Err(error) => {
                self.refuse(&error);
                false
            }
        }
    }

    fn refuse(&self, error: &TrustError) {
        let message = chain(error);
        tracing::error!(path = %self.path().display(), error = %message, kept = self.state.trust().is_some(), "Trust roots refused; keeping the last good bundle");
        self.metrics.identity.trust_reload_errors.inc();
        self.state.set_trust_error(message);
    }

    /// Checks the file every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        file_watch::every(interval, || self.check()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_bundle_of_two_roots_keeps_both_in_file_order() {
        let (a, b) = (root("a"), root("b"));
        let bundle = TrustBundle::from_pem(format!("{a}\n{b}").as_bytes()).unwrap();
        assert_eq!(bundle.certificates.len(), 2);
        assert_eq!(bundle.roots.len(), 2);
        let only_a = TrustBundle::from_pem(a.as_bytes()).unwrap();
        assert_eq!(bundle.fingerprints[0], only_a.fingerprints[0]);
        assert_ne!(bundle.fingerprints[0], bundle.fingerprints[1]);
    }

    #[test]
    fn a_fingerprint_is_the_sha256_of_the_der_in_hex() {
        let pem = root("a");
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let fp = fingerprint(&der);
        assert_eq!(fp.len(), 64);
        assert!(
            fp.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(fp, sha256_hex(der.as_ref()));
        assert_eq!(
            fingerprint(&CertificateDer::from(b"abc".to_vec())),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn empty_and_non_certificate_files_are_refused() {
        assert!(matches!(TrustBundle::from_pem(b""), Err(TrustError::Empty)));
        assert!(matches!(
            TrustBundle::from_pem(b"just some text\n"),
            Err(TrustError::Empty)
        ));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            TrustBundle::from_pem(key.serialize_pem().as_bytes()),
            Err(TrustError::Empty)
        ));
    }

    #[test]
    fn a_truncated_or_garbled_certificate_is_refused() {
        let pem = root("a");
        let cut = &pem[..pem.len() / 2];
        assert!(TrustBundle::from_pem(cut.as_bytes()).is_err());
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustBundle::from_pem(garbled.as_bytes()),
            Err(TrustError::Root { index: 0, .. })
        ));
    }

    #[test]
    fn a_refused_file_keeps_the_last_good_bundle_and_is_counted() {
        let dir = std::env::temp_dir().join(format!("tandem-trust-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roots.pem");
        std::fs::write(&path, root("a")).unwrap();
        let state = Arc::new(IdentityState::default());
        let metrics = Arc::new(Metrics::new());
        let mut watcher =
            TrustWatcher::new(path.clone(), state.clone(), metrics.clone(), Arc::default());
        watcher.check();
        let first = state.trust().unwrap().fingerprints.clone();
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n").unwrap();
        watcher.check();
        watcher.check();
        assert_eq!(state.trust().unwrap().fingerprints, first);
        assert_eq!(metrics.identity.trust_reload_errors.get(), 1);
        assert!(state.trust_error().is_some());
        std::fs::write(&path, format!("{}{}", root("b"), root("c"))).unwrap();
        watcher.check();
        assert_eq!(state.trust().unwrap().fingerprints.len(), 2);
        assert!(state.trust_error().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
