//! `tandem-webhook`: the mutating admission webhook that injects the `tandem-proxy` sidecar.
//!
//! - [`inject`]: the decision and the JSON patch, `inject(&Pod, namespace, &InjectConfig)`;
//!   who is injected and why a pod is skipped is documented there.
//! - [`overrides`]: the per-pod `tandem.dev/<knob>` annotations.
//! - [`admission`]: AdmissionReview `admission.k8s.io/v1` in and out.
//! - [`server`]: axum over rustls; [`tls`]: the serving certificate, reloaded from files.
//! - [`metrics`]: what `/metrics` shows.
//! - [`certs`]: a CA and serving certificate for clusters without cert-manager.
//!
//! [`run`] ties them together; `main.rs` only parses flags and starts tracing.

pub mod admission;
pub mod certs;
pub mod inject;
pub mod metrics;
pub mod overrides;
pub mod server;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

pub use inject::{Decision, InjectConfig, InjectError, SkipReason, inject};
use tls::{CertFiles, CertPaths, CertResolver, TlsError};

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The serving certificate could not be loaded at start.
    #[error("could not load the serving certificate")]
    Certificate(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("could not listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything [`run`] needs, validated by `main` before any port is bound.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen for HTTPS.
    pub listen: SocketAddr,
    /// The serving certificate and key files.
    pub cert: CertPaths,
    /// How often the certificate files are checked for changes.
    pub cert_reload_interval: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long open connections may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Defaults for injected pods.
    pub inject: InjectConfig,
}

/// Serves until `shutdown` completes. The certificate must load before the port is bound, so
/// a misconfigured webhook fails at start rather than at the first handshake.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (resolver, files, metrics) = load_certificate(&settings).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.listen,
            source,
        })?;
    serve_on(listener, settings, resolver, files, metrics, shutdown).await
}

/// [`run`] on a listener the caller bound (tests bind port 0).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let (resolver, files, metrics) = load_certificate(&settings).await?;
    serve_on(listener, settings, resolver, files, metrics, shutdown).await
}

async fn load_certificate(
    settings: &Settings,
) -> Result<(Arc<CertResolver>, CertFiles, Arc<metrics::Metrics>)> {
    let metrics = Arc::new(metrics::Metrics::new());
    let resolver = Arc::new(CertResolver::default());
    let mut files = CertFiles::new(settings.cert.clone(), Arc::clone(&resolver));
    files.reload().await?;
    metrics.certificate_reload(true);
    Ok((resolver, files, metrics))
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    settings: Settings,
    resolver: Arc<CertResolver>,
    files: CertFiles,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let tls = Arc::new(tls::server_config(Arc::clone(&resolver))?);
    let state = Arc::new(server::AppState {
        inject: settings.inject,
        metrics: Arc::clone(&metrics),
        resolver,
    });
    let app = server::router(state, settings.max_body_bytes);
    let watcher = tokio::spawn(files.watch(settings.cert_reload_interval, metrics));
    let addr = listener.local_addr().ok();
    info!(?addr, "Serving admission reviews");
    server::serve(listener, tls, app, shutdown, settings.shutdown_grace).await;
    watcher.abort();
    info!("Stopped");
    Ok(())
}
