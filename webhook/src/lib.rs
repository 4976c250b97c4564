//! `tandem-webhook`: the mutating admission webhook that injects the `tandem-proxy` sidecar.
//!
//! - [`inject`]: the decision and the JSON patch, `inject(&Pod, namespace, &InjectConfig)`;
//!   who is injected, why a pod is skipped and what identity bootstrap mounts is documented
//!   there.
//! - [`config`]: the defaults every injected pod gets ([`InjectConfig`]).
//! - [`overrides`]: the per-pod `tandem.dev/<knob>` annotations.
//! - [`admission`]: AdmissionReview `admission.k8s.io/v1` in and out.
//! - [`server`]: axum over rustls; [`tls`]: the serving certificate, reloaded from files.
//! - [`metrics`]: what `/metrics` shows.
//! - [`certs`]: a CA and serving certificate for clusters without cert-manager.
//!
//! [`run`] ties them together; [`args`] turns flags into [`Settings`]; `main.rs` only parses
//! them and starts tracing.

pub mod admission;
pub mod args;
pub mod bootstrap;
pub mod certs;
pub mod config;
pub mod inject;
pub mod metrics;
pub mod overrides;
pub mod probes;
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
    /// No Kubernetes client could be built for `--self-signed`.
    #[error("could not build a Kubernetes client for --self-signed")]
    Kube(#[source] kube::Error),
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
    /// Where the serving certificate comes from.
    pub certificates: CertSource,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long open connections may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Defaults for injected pods.
    pub inject: InjectConfig,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files (a mounted Secret, e.g. from cert-manager), reloaded when they change.
    Files {
        /// The certificate and key files.
        paths: CertPaths,
        /// How often they are checked for changes.
        reload_interval: Duration,
    },
    /// A CA and certificate the webhook makes and keeps in a Secret itself.
    SelfSigned(bootstrap::BootstrapConfig),
}

/// Serves until `shutdown` completes. With certificate files, they must load before the port
/// is bound, so a misconfigured webhook fails at start rather than at the first handshake;
/// with `--self-signed`, the server starts at once and is healthy once the certificate is in.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let certificates = start_certificates(&settings.certificates, None).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: settings.listen,
            source,
        })?;
    serve_on(listener, settings, certificates, shutdown).await
}

/// [`run`] on a listener the caller bound (tests bind port 0).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let certificates = start_certificates(&settings.certificates, None).await?;
    serve_on(listener, settings, certificates, shutdown).await
}

/// [`run_on`] with the Kubernetes client `--self-signed` uses given, rather than built from
/// the environment (tests pass one that holds exactly the webhook's RBAC).
pub async fn run_with_client(
    listener: tokio::net::TcpListener,
    settings: Settings,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let certificates = start_certificates(&settings.certificates, Some(client)).await?;
    serve_on(listener, settings, certificates, shutdown).await
}

/// The resolver, the task that keeps it current, and the metrics both count into.
struct Certificates {
    resolver: Arc<CertResolver>,
    keeper: tokio::task::JoinHandle<()>,
    metrics: Arc<metrics::Metrics>,
}

async fn start_certificates(
    source: &CertSource,
    client: Option<kube::Client>,
) -> Result<Certificates> {
    let metrics = Arc::new(metrics::Metrics::new());
    let resolver = Arc::new(CertResolver::default());
    let keeper = match source {
        CertSource::Files {
            paths,
            reload_interval,
        } => {
            let mut files = CertFiles::new(paths.clone(), Arc::clone(&resolver));
            files.reload().await?;
            metrics.certificate_reload(true);
            tokio::spawn(files.watch(*reload_interval, Arc::clone(&metrics)))
        }
        CertSource::SelfSigned(config) => {
            let client = match client {
                Some(client) => client,
                None => kube::Client::try_default().await.map_err(Error::Kube)?,
            };
            let task = bootstrap::maintain(
                client,
                config.clone(),
                Arc::clone(&resolver),
                Arc::clone(&metrics),
            );
            tokio::spawn(task)
        }
    };
    Ok(Certificates {
        resolver,
        keeper,
        metrics,
    })
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    settings: Settings,
    certificates: Certificates,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Certificates {
        resolver,
        keeper,
        metrics,
    } = certificates;
    let tls = Arc::new(tls::server_config(Arc::clone(&resolver))?);
    let state = Arc::new(server::AppState {
        inject: settings.inject,
        metrics,
        resolver,
    });
    let app = server::router(state, settings.max_body_bytes);
    let addr = listener.local_addr().ok();
    info!(?addr, "Serving admission reviews");
    server::serve(listener, tls, app, shutdown, settings.shutdown_grace).await;
    keeper.abort();
    info!("Stopped");
    Ok(())
}
