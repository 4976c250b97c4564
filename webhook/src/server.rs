//! The HTTPS server: `POST /mutate`, `GET /healthz`, `GET /metrics`, over rustls.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::{self, Outcome};
use crate::inject::InjectConfig;
use crate::metrics::Metrics;
use crate::tls::CertResolver;

/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Defaults for every injected pod.
    pub inject: InjectConfig,
    /// The metrics the handlers count into.
    pub metrics: Arc<Metrics>,
    /// The serving certificate; the webhook is healthy once one is loaded.
    pub resolver: Arc<CertResolver>,
}

/// The routes. Bodies over `max_body_bytes` are answered 413 before they are read whole.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn mutate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    let reviewed = admission::review(&body, &state.inject);
    state
        .metrics
        .admission(&reviewed.outcome, started.elapsed());
    log(&reviewed);
    let status = if reviewed.is_invalid() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, axum::Json(reviewed.review)).into_response()
}

fn log(reviewed: &admission::Reviewed) {
    let (pod, dry_run) = (&reviewed.pod, reviewed.dry_run);
    match &reviewed.outcome {
        Outcome::Injected => info!(%pod, dry_run, "Injected the sidecar"),
        Outcome::Skipped(reason) => info!(%pod, %reason, dry_run, "Skipped injection"),
        Outcome::Denied(message) => warn!(%pod, %message, dry_run, "Refused the pod"),
        Outcome::Ignored => debug!(%pod, "Not a pod creation; allowed unchanged"),
        Outcome::Invalid(message) => warn!(%message, "Unreadable AdmissionReview"),
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.resolver.is_loaded() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no serving certificate loaded\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}

/// Accepts TLS connections on `listener` and serves `app` on each (HTTP/1.1 or HTTP/2) until
/// `shutdown` completes; then stops accepting and gives open connections `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let connection = connection(acceptor.clone(), tcp, app.clone(), &graceful);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            debug!(%peer, %error, "Connection ended with an error");
                        }
                    });
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(error) => {
                    warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "Connections still open after the grace period; closing them"
        );
    }
}

/// One connection: the TLS handshake (bounded in time), then HTTP until it closes or the
/// server drains.
fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    app: Router,
    graceful: &GracefulShutdown,
) -> impl Future<Output = Result<(), String>> + Send + 'static {
    let watcher = graceful.watcher();
    async move {
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(format!("TLS handshake failed: {error}")),
            Err(_) => return Err("TLS handshake timed out".to_owned()),
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        let service = TowerToHyperService::new(app);
        let serving = builder.serve_connection(TokioIo::new(stream), service);
        watcher
            .watch(serving.into_owned())
            .await
            .map_err(|error| error.to_string())
    }
}
