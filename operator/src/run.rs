//! Wiring: watches, election, reconciler and HTTP server, with one shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use ipnet::IpNet;
use tandem_crds::contract::DefaultPolicy;
use tandem_crds::identity::{MtlsMode, SpiffeId};

use crate::controller::{Debounce, Reconciler};
use crate::hub::Hub;
use crate::issuer::{self, CurrentAuthority};
use crate::leader::{self, ElectionSettings};
use crate::metrics::Metrics;
use crate::render::{DEFAULT_CLUSTER_NETWORKS, Mesh};
use crate::server::{self, Health};
use crate::signer::{self, Signer};
use crate::stores::{Stores, start_watches};
use crate::stream::auth::Authenticator;
use crate::stream::{self, StreamServer};
use crate::sync;
use crate::{Error, Result};
use tandem_crds::contract::{DEFAULT_SAMPLING_PERCENT, MetricsPrefix, Telemetry, Tracing};

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
    /// Longest wait from the first change of a burst before a pass runs, however long the
    /// burst lasts (a steady stream of events still gets passes).
    #[arg(long, env = "TANDEM_DEBOUNCE_MAX_MS", default_value_t = 10_000)]
    pub debounce_max_ms: u64,
    /// Lease duration in seconds (a new leader takes over within this plus two seconds).
    #[arg(long, env = "TANDEM_LEASE_SECONDS", default_value_t = 8)]
    pub lease_seconds: u64,
    /// Log format: `json` (default, for the cluster) or `text`.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Address of the identity signer (HTTPS, `POST /v1/certify`), on every replica.
    #[arg(long, env = "TANDEM_IDENTITY_LISTEN", default_value = "0.0.0.0:15030")]
    pub identity_listen: SocketAddr,
    /// Trust domain of workload identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "TANDEM_TRUST_DOMAIN", default_value = tandem_crds::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (`24h`, `90m`, …), cut at the issuer's expiry.
    #[arg(long, env = "TANDEM_CERT_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub cert_ttl: Duration,
    /// mTLS mode of workloads whose ServiceAccount and namespace carry no `tandem.dev/mtls`
    /// annotation: `permissive` or `strict`.
    #[arg(long, env = "TANDEM_MTLS_MODE", default_value = "permissive", value_parser = parse_mode)]
    pub mtls_mode: MtlsMode,
    /// Authorization default of workloads whose namespace carries no
    /// `tandem.dev/default-policy` annotation: `all-unauthenticated`, `all-authenticated`,
    /// `cluster-authenticated` or `deny`. Checked by [`Settings::mesh`] (exit 64).
    #[arg(
        long,
        env = "TANDEM_DEFAULT_POLICY",
        default_value = "all-unauthenticated"
    )]
    pub default_policy: String,
    /// The networks (CIDRs, comma-separated) whose clients are in the cluster, for
    /// `cluster-authenticated`; empty: every address. Checked by [`Settings::mesh`] (exit 64).
    #[arg(
        long,
        env = "TANDEM_CLUSTER_NETWORKS",
        default_value = DEFAULT_CLUSTER_NETWORKS,
        value_delimiter = ','
    )]
    pub cluster_networks: Vec<String>,
    /// The prefix of every proxy's request and TCP series: `tandem` (`tandem_requests_total`,
    /// …) or `istio` (`istio_requests_total`, …, what Istio's dashboards and Kiali query).
    /// Checked by [`Settings::mesh`] (exit 64).
    #[arg(long, env = "TANDEM_METRICS_PREFIX", default_value = "tandem")]
    pub metrics_prefix: String,
    /// The OTLP/HTTP collector every proxy exports spans to (`http://host:4318`; spans are
    /// POSTed to `<url>/v1/traces`); empty: tracing off. Checked by [`Settings::mesh`].
    #[arg(long, env = "TANDEM_TRACING_COLLECTOR", default_value = "")]
    pub tracing_collector: String,
    /// The percentage (0–100) of requests arriving without trace context that start a trace.
    #[arg(long, env = "TANDEM_TRACING_SAMPLING_PERCENT", default_value_t = DEFAULT_SAMPLING_PERCENT)]
    pub tracing_sampling_percent: f64,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line (for the cluster).
    Json,
    /// Human-readable lines.
    Text,
}

fn parse_ttl(value: &str) -> std::result::Result<Duration, String> {
    let ttl = tandem_crds::duration::parse_duration(value).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(60) {
        return Err(format!("{value} is under a minute"));
    }
    Ok(ttl)
}

/// A collector base URL: `http(s)://host[:port]`, nothing after it but an optional `/`.
fn check_collector(url: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::Settings(format!(
            "--tracing-collector {url:?} {why} (expected http://host:port)"
        ))
    };
    let uri: axum::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("has no http or https scheme"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("has a path or query (the proxy appends /v1/traces)"));
    }
    Ok(())
}

fn parse_mode(value: &str) -> std::result::Result<MtlsMode, String> {
    MtlsMode::parse(value).ok_or_else(|| format!("{value:?} is neither permissive nor strict"))
}

impl Settings {
    /// Checks what clap's parsers cannot: the trust domain must be a DNS name (it is part of
    /// every SPIFFE ID and DNS SAN), the default policy one of its four values, the cluster
    /// networks CIDRs.
    pub fn validate(&self) -> Result<()> {
        self.mesh().map(|_| ())
    }

    /// The mesh-wide settings rendering uses, checked.
    pub fn mesh(&self) -> Result<Mesh> {
        self.check_trust_domain()?;
        let default_policy = DefaultPolicy::parse(&self.default_policy).ok_or_else(|| {
            let values: Vec<&str> = DefaultPolicy::ALL.iter().map(|p| p.as_str()).collect();
            Error::Settings(format!(
                "--default-policy {:?} is none of {}",
                self.default_policy,
                values.join(", ")
            ))
        })?;
        let cluster_networks = self
            .cluster_networks
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse::<IpNet>().map_err(|e| {
                    Error::Settings(format!(
                        "--cluster-networks: {n:?} is not a CIDR such as 10.0.0.0/8: {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mesh {
            trust_domain: self.trust_domain.clone(),
            default_mtls: self.mtls_mode,
            default_policy,
            cluster_networks,
            telemetry: self.telemetry()?,
        })
    }

    /// The telemetry every config carries, checked: a known prefix, a collector URL with an
    /// `http`/`https` scheme and a host (and no path, query or fragment: the proxy appends
    /// `/v1/traces`), a sampling percentage from 0 to 100.
    fn telemetry(&self) -> Result<Telemetry> {
        let metrics_prefix = match self.metrics_prefix.as_str() {
            "tandem" => MetricsPrefix::Tandem,
            "istio" => MetricsPrefix::Istio,
            other => {
                return Err(Error::Settings(format!(
                    "--metrics-prefix {other:?} is neither tandem nor istio"
                )));
            }
        };
        let percent = self.tracing_sampling_percent;
        if !(0.0..=100.0).contains(&percent) {
            return Err(Error::Settings(format!(
                "--tracing-sampling-percent {percent} is not between 0 and 100"
            )));
        }
        let collector = self.tracing_collector.trim();
        let tracing = if collector.is_empty() {
            None
        } else {
            check_collector(collector)?;
            Some(Tracing {
                collector: collector.trim_end_matches('/').to_owned(),
                sampling_percent: percent,
            })
        };
        Ok(Telemetry {
            metrics_prefix,
            tracing,
        })
    }

    fn check_trust_domain(&self) -> Result<()> {
        let probe = SpiffeId::new(&self.trust_domain, "ns", "sa").uri();
        SpiffeId::parse(&probe).map_err(|_| {
            Error::Settings(format!(
                "--trust-domain {:?} is not a DNS name (lower-case labels joined by dots)",
                self.trust_domain
            ))
        })?;
        Ok(())
    }
}

/// Runs the operator until `shutdown` turns true (SIGTERM in the binary).
pub async fn run(settings: Settings, shutdown: watch::Receiver<bool>) -> Result<()> {
    let mesh = settings.mesh()?;
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
    let http = tokio::spawn(
        async move {
            let served = axum::serve(listener, server::router(http_health))
                .with_graceful_shutdown(async move {
                    let _ = http_shutdown.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = served {
                warn!(%error, "HTTP server failed");
            }
        }
        .instrument(info_span!("http")),
    );

    let trigger = Arc::new(Notify::new());
    let identity_listener = tokio::net::TcpListener::bind(settings.identity_listen)
        .await
        .map_err(|source| Error::Http {
            addr: settings.identity_listen,
            source,
        })?;
    // The hub the reconciler publishes into and the stream serves from (discovery's learning
    // wakes the reconciler through `trigger`); the leader flag decides both who reconciles and
    // who answers watches.
    let hub = Arc::new(Hub::new(trigger.clone(), metrics.stream.clone()));
    let (leader_tx, leader_rx) = watch::channel(false);
    let (authority, signer_tasks) = start_identity(
        IdentityInputs {
            settings: &settings,
            client: &client,
            identity: &identity,
            trigger: &trigger,
            metrics: &metrics,
        },
        identity_listener,
        hub.clone(),
        leader_rx.clone(),
        shutdown.clone(),
    );
    let (stores, writers) = Stores::new();
    let watches = start_watches(&client, writers, &trigger, &metrics);
    // Nothing acts on a partial view of the cluster: see `sync`.
    let (synced_tx, synced_rx) = watch::channel(false);
    let sync_task = tokio::spawn(
        sync::open_when_synced(
            stores.clone(),
            health,
            synced_tx,
            Duration::from_secs(10),
            shutdown.clone(),
        )
        .instrument(info_span!("sync")),
    );

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
    let election_task = tokio::spawn(
        async move {
            if sync::wait_open(&mut election_gate, &mut election_shutdown).await {
                leader::run(leases, election, leader_tx, election_stop).await;
            }
        }
        .instrument(info_span!("election")),
    );

    info!(default_policy = %mesh.default_policy, cluster_networks = ?mesh.cluster_networks, "Authorization defaults");
    let reconciler = Reconciler::new(client, stores, metrics, &identity, mesh, authority, hub);
    // Nothing before every store has synced. (The gate's sender is gone once it has opened, so
    // it is awaited once here, not watched by the reconciler: a closed channel would end it.)
    let mut reconciler_gate = synced_rx;
    let mut reconciler_shutdown = shutdown.clone();
    if sync::wait_open(&mut reconciler_gate, &mut reconciler_shutdown).await {
        reconciler
            .run(
                trigger,
                Debounce {
                    quiet: Duration::from_millis(settings.debounce_ms),
                    ceiling: Duration::from_millis(settings.debounce_max_ms),
                },
                leader_rx,
                shutdown,
            )
            .await;
    }

    // Shutting down: release the Lease first so the other replica takes over at once.
    if let Err(error) = election_task.await {
        warn!(%error, "Election task failed");
    }
    let synced = match sync_task.await {
        Ok(synced) => synced,
        Err(_) => Err(Error::WatchEnded),
    };
    for task in watches.into_iter().chain(signer_tasks.background) {
        task.abort();
    }
    // The reconciler also stops when the caches can never sync (a watch task died): exit
    // with the error, so the pod restarts rather than sitting unready for ever.
    if let Err(error) = synced {
        signer_tasks.server.abort();
        http.abort();
        return Err(error);
    }
    // The signer drains its open connections (it has its own grace period).
    let _ = signer_tasks.server.await;
    let _ = http.await;
    info!("Stopped");
    Ok(())
}

/// The identity side's tasks: those that run until aborted, and the server, which stops by
/// itself on shutdown once its connections have drained.
struct SignerTasks {
    background: Vec<JoinHandle<()>>,
    server: JoinHandle<()>,
}

/// What the identity side is built from.
struct IdentityInputs<'a> {
    settings: &'a Settings,
    client: &'a Client,
    identity: &'a str,
    trigger: &'a Arc<Notify>,
    metrics: &'a Metrics,
}

/// Starts the identity side: the issuer Secret's watch, the signer's serving certificate and,
/// on `listener`, the signer with the config stream beside it (serving `hub` while `leader`
/// holds true). Returns the issuer as the reconciler sees it (for the trust roots it
/// distributes) and the tasks.
fn start_identity(
    inputs: IdentityInputs<'_>,
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    leader: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> (CurrentAuthority, SignerTasks) {
    let IdentityInputs {
        settings,
        client,
        identity,
        trigger,
        metrics,
    } = inputs;
    let (authority_tx, authority) = watch::channel(None);
    let issuer_task = tokio::spawn(
        issuer::run(
            client.clone(),
            settings.lease_namespace.clone(),
            identity.to_owned(),
            authority_tx,
            trigger.clone(),
            metrics.identity.clone(),
        )
        .instrument(info_span!("issuer")),
    );
    let (configs_tx, configs) = watch::channel(None);
    let cert_task = tokio::spawn(
        signer::keep_serving_cert(authority.clone(), configs_tx)
            .instrument(info_span!("signer_cert")),
    );
    let signer = Arc::new(Signer {
        client: client.clone(),
        authority: authority.clone(),
        trust_domain: settings.trust_domain.clone(),
        ttl: settings.cert_ttl,
        metrics: metrics.identity.clone(),
    });
    let addr = listener.local_addr().unwrap_or(settings.identity_listen);
    info!(%addr, dns_name = %tandem_crds::identity::signer_dns_name(), trust_domain = %settings.trust_domain, cert_ttl_s = settings.cert_ttl.as_secs(), "Serving the identity signer (HTTPS)");
    let stream = Arc::new(StreamServer::new(
        hub,
        Authenticator::new(client.clone(), settings.trust_domain.clone()),
        leader,
    ));
    let app = signer::router(signer).merge(stream::router(stream));
    let mut stop = shutdown;
    let serve_task = tokio::spawn(
        signer::serve(
            listener,
            configs,
            app,
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
            Duration::from_secs(5),
        )
        .instrument(info_span!("signer")),
    );
    let tasks = SignerTasks {
        background: vec![issuer_task, cert_task],
        server: serve_task,
    };
    (authority, tasks)
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tandem-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod telemetry_tests {
    use clap::Parser;

    use super::*;

    fn mesh_of(args: &[&str]) -> Result<Mesh> {
        Settings::try_parse_from(std::iter::once("tandem-operator").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .mesh()
    }

    #[test]
    fn telemetry_defaults_to_the_tandem_prefix_and_no_tracing() {
        let mesh = mesh_of(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mesh.telemetry, Telemetry::default());
        assert!(mesh.telemetry.is_default());
    }

    #[test]
    fn the_telemetry_flags_reach_the_mesh() {
        let mesh = mesh_of(&[
            "--metrics-prefix",
            "istio",
            "--tracing-collector",
            "http://otel.observability.svc:4318/",
            "--tracing-sampling-percent",
            "100",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            mesh.telemetry,
            Telemetry {
                metrics_prefix: MetricsPrefix::Istio,
                tracing: Some(Tracing {
                    collector: "http://otel.observability.svc:4318".into(),
                    sampling_percent: 100.0,
                }),
            }
        );
        let default_rate = mesh_of(&["--tracing-collector", "https://collector:4318"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            default_rate.telemetry.tracing.map(|t| t.sampling_percent),
            Some(DEFAULT_SAMPLING_PERCENT)
        );
    }

    #[test]
    fn bad_telemetry_flags_are_settings_errors_naming_the_flag() {
        for (args, needle) in [
            (
                vec!["--metrics-prefix", "prom"],
                "--metrics-prefix \"prom\"",
            ),
            (
                vec!["--tracing-sampling-percent", "101"],
                "--tracing-sampling-percent 101",
            ),
            (
                vec!["--tracing-sampling-percent", "NaN"],
                "--tracing-sampling-percent NaN",
            ),
            (
                vec!["--tracing-collector", "collector:4318"],
                "no http or https scheme",
            ),
            (
                vec!["--tracing-collector", "ftp://c:21"],
                "no http or https scheme",
            ),
            (
                vec!["--tracing-collector", "http://c:4318/v1/traces"],
                "has a path",
            ),
            (vec!["--tracing-collector", "http:// bad"], "is not a URL"),
        ] {
            match mesh_of(&args) {
                Err(Error::Settings(message)) => assert!(message.contains(needle), "{message}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }
}
