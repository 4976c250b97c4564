//! Wiring: watches, election, reconciler and HTTP server, with one shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::controller::{Reconciler, Stores, start_watches};
use crate::leader::{self, ElectionSettings};
use crate::metrics::Metrics;
use crate::server::{self, Health};
use crate::sync;
use crate::{Error, Result};

/// The operator's settings (from flags or environment, see `main.rs`).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "tandem-operator", version, about)]
pub struct Settings {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "TANDEM_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "TANDEM_LEASE_NAME", default_value = "tandem-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = tandem_crds::names::SYSTEM_NAMESPACE)]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Quiet time after a change before a pass runs, so bursts coalesce.
    #[arg(long, env = "TANDEM_DEBOUNCE_MS", default_value_t = 100)]
    pub debounce_ms: u64,
    /// Lease duration in seconds (a new leader takes over within this plus two seconds).
    #[arg(long, env = "TANDEM_LEASE_SECONDS", default_value_t = 8)]
    pub lease_seconds: u64,
    /// Log format: `json` (default, for the cluster) or `text`.
    #[arg(long, env = "TANDEM_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

/// Runs the operator until `shutdown` turns true (SIGTERM in the binary).
pub async fn run(settings: Settings, shutdown: watch::Receiver<bool>) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let identity = settings.identity.clone().unwrap_or_else(default_identity);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        registry,
    });

    let listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .map_err(|source| Error::Http {
            addr: settings.http_addr,
            source,
        })?;
    let http_addr = listener.local_addr().unwrap_or(settings.http_addr);
    info!(%http_addr, %identity, "Serving /healthz, /readyz, /metrics");
    let mut http_shutdown = shutdown.clone();
    let http_health = health.clone();
    let http = tokio::spawn(async move {
        let served = axum::serve(listener, server::router(http_health))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = served {
            warn!(%error, "HTTP server failed");
        }
    });

    let trigger = Arc::new(Notify::new());
    let (stores, writers) = Stores::new();
    let watches = start_watches(&client, writers, &trigger, &metrics);
    // Nothing acts on a partial view of the cluster: see `sync`.
    let (synced_tx, synced_rx) = watch::channel(false);
    let sync_task = tokio::spawn(sync::open_when_synced(
        stores.clone(),
        health,
        synced_tx,
        Duration::from_secs(10),
        shutdown.clone(),
    ));

    let (leader_tx, leader_rx) = watch::channel(false);
    let mut election =
        ElectionSettings::new(&settings.lease_name, &settings.lease_namespace, &identity);
    election.lease_duration = Duration::from_secs(settings.lease_seconds.max(2));
    election.renew_deadline = election.lease_duration * 5 / 8;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.lease_namespace);
    let leader_gauge = metrics.leader.clone();
    let mut gauge_rx = leader_rx.clone();
    tokio::spawn(async move {
        while gauge_rx.changed().await.is_ok() {
            leader_gauge.set(i64::from(*gauge_rx.borrow()));
        }
    });
    // A replica campaigns only once synced: holding the Lease without being able to act would
    // keep a synced replica from taking over.
    let mut election_gate = synced_rx.clone();
    let mut election_shutdown = shutdown.clone();
    let election_stop = shutdown.clone();
    let election_task = tokio::spawn(async move {
        if sync::wait_open(&mut election_gate, &mut election_shutdown).await {
            leader::run(leases, election, leader_tx, election_stop).await;
        }
    });

    let reconciler = Reconciler::new(client, stores, metrics, &identity);
    reconciler
        .run(
            trigger,
            Duration::from_millis(settings.debounce_ms),
            leader_rx,
            synced_rx,
            shutdown,
        )
        .await;

    // Shutting down: release the Lease first so the other replica takes over at once.
    if let Err(error) = election_task.await {
        warn!(%error, "Election task failed");
    }
    let synced = match sync_task.await {
        Ok(synced) => synced,
        Err(_) => Err(Error::WatchEnded),
    };
    for watch in watches {
        watch.abort();
    }
    // The reconciler also stops when the caches can never sync (a watch task died): exit
    // with the error, so the pod restarts rather than sitting unready for ever.
    if let Err(error) = synced {
        http.abort();
        return Err(error);
    }
    let _ = http.await;
    info!("Stopped");
    Ok(())
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tandem-operator".to_owned());
    format!("{host}-{}", std::process::id())
}
