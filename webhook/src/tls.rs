//! The serving certificate: read from files (a mounted Secret), swapped in when they change.
//!
//! rustls asks [`CertResolver`] for the certificate on every handshake, and the resolver hands
//! out whatever its `ArcSwap` holds, so a new certificate applies to the next connection while
//! connections already open finish on the old one: no restart, no dropped request. A pair of
//! files that cannot be used (half-written, or the key of one rotation with the certificate of
//! another while the kubelet swaps the Secret's symlink) is refused and the last good pair
//! keeps serving; the next poll tries again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    /// The key file holds no usable PEM private key.
    #[error("no PEM private key in {0}")]
    NoKey(PathBuf),
    /// rustls refused the key, or the key does not belong to the certificate.
    #[error("the key in {key} cannot serve the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The TLS configuration could not be built.
    #[error("could not build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// Hands rustls the current certificate; [`CertFiles::reload`] replaces it.
#[derive(Default)]
pub struct CertResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl CertResolver {
    /// Whether a certificate has been loaded (the webhook is not healthy before).
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Some(Arc::new(key)));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// A certificate chain and key from PEM text, checked to belong together.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    paths: &CertPaths,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate(paths.cert.clone()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(paths.cert.clone()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey(paths.key.clone()))?;
    let mismatch = |source| TlsError::Mismatch {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
        source,
    };
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(mismatch)?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(mismatch)?;
    Ok(certified)
}

/// Where the PEM certificate chain and key live (`tls.crt` and `tls.key` of a Secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Keeps a [`CertResolver`] in step with the files at [`CertPaths`].
#[derive(Debug)]
pub struct CertFiles {
    paths: CertPaths,
    resolver: Arc<CertResolver>,
    loaded: Option<(Vec<u8>, Vec<u8>)>,
}

impl CertFiles {
    /// Watches `paths` for `resolver`. Nothing is loaded until [`Self::reload`].
    pub fn new(paths: CertPaths, resolver: Arc<CertResolver>) -> Self {
        Self {
            paths,
            resolver,
            loaded: None,
        }
    }

    /// Loads the files if their contents changed since the last successful load. Returns
    /// whether a new certificate is now served; on error the previous one stays.
    pub async fn reload(&mut self) -> Result<bool, TlsError> {
        let cert = read(&self.paths.cert).await?;
        let key = read(&self.paths.key).await?;
        if self
            .loaded
            .as_ref()
            .is_some_and(|(c, k)| *c == cert && *k == key)
        {
            return Ok(false);
        }
        let certified = certified_key(&cert, &key, &self.paths)?;
        self.resolver.set(certified);
        self.loaded = Some((cert, key));
        Ok(true)
    }

    /// Polls the files every `interval` for as long as the task lives. Polling rather than
    /// inotify: a Secret volume changes by a symlink swap one directory up, which polling
    /// sees without special cases, and a few stat-sized reads every seconds cost nothing.
    pub async fn watch(mut self, interval: Duration, metrics: Arc<Metrics>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reload().await {
                Ok(false) => {}
                Ok(true) => {
                    metrics.certificate_reload(true);
                    info!(cert = %self.paths.cert.display(), "Serving a new certificate");
                }
                Err(error) => {
                    metrics.certificate_reload(false);
                    warn!(error = %error_chain(&error), "Keeping the previous certificate");
                }
            }
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
}

/// The rustls server configuration: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN, the
/// certificate from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// An error and its causes, `: `-separated, for one log field.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
