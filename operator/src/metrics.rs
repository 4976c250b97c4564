//! The operator's Prometheus metrics, served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric the operator exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconcile passes run.
    pub reconciles: Counter,
    /// Reconcile passes that failed (and are retried with backoff).
    pub reconcile_errors: Counter,
    /// Duration of reconcile passes.
    pub reconcile_duration: Histogram,
    /// ConfigMaps written by server-side apply.
    pub config_map_applies: Counter,
    /// ConfigMaps deleted because no injected pod uses their ServiceAccount any more.
    pub config_map_deletes: Counter,
    /// Policy status writes.
    pub status_writes: Counter,
    /// Errors from the watches (each is retried with backoff).
    pub watch_errors: Counter,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// The identity metrics (`tandem_identity_*`).
    pub identity: IdentityMetrics,
    /// The config stream's metrics.
    pub stream: StreamMetrics,
}

/// Istio's `pilot_proxy_convergence_time` buckets, in seconds.
pub const CONVERGENCE_BUCKETS: [f64; 8] = [0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];

/// The config stream's metrics.
#[derive(Clone, Debug)]
pub struct StreamMetrics {
    /// `tandem_proxy_convergence_seconds`: from the watch event that changed a workload's
    /// config to a proxy of it reporting that it applied the version carrying it, by `source`
    /// (`file` or `stream`).
    pub convergence: Family<Labels, Histogram>,
    /// Open watches.
    pub watches: Gauge,
    /// Stream calls refused, by `reason` (the `StreamRefusal` reason).
    pub refused: Family<Labels, Counter>,
    /// Messages sent on watches, by `type` (`snapshot`, `current`, `delta`).
    pub messages: Family<Labels, Counter>,
    /// Discovery calls, by `result` (`found`, `unknown`).
    pub discoveries: Family<Labels, Counter>,
}

impl Default for StreamMetrics {
    fn default() -> Self {
        Self {
            convergence: Family::new_with_constructor(|| Histogram::new(CONVERGENCE_BUCKETS)),
            watches: Gauge::default(),
            refused: Family::default(),
            messages: Family::default(),
            discoveries: Family::default(),
        }
    }
}

impl StreamMetrics {
    /// Counts one labelled event in `family`.
    pub fn count(family: &Family<Labels, Counter>, label: &str, value: &str) {
        family
            .get_or_create(&vec![(label.to_owned(), value.to_owned())])
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "tandem_proxy_convergence_seconds",
            "Time from a change the operator saw to a proxy applying the config that carries it, by source",
            self.convergence.clone(),
        );
        let prefixed = registry.sub_registry_with_prefix("tandem_operator_stream");
        prefixed.register("watches", "Open config watches", self.watches.clone());
        prefixed.register(
            "refused",
            "Config stream calls refused, by reason",
            self.refused.clone(),
        );
        prefixed.register(
            "messages",
            "Messages sent on config watches, by type",
            self.messages.clone(),
        );
        prefixed.register(
            "discoveries",
            "On-demand discovery calls, by result",
            self.discoveries.clone(),
        );
    }
}

/// Labels of one series: name and value pairs.
pub type Labels = Vec<(String, String)>;

/// The signer's and the CA's metrics, under `tandem_identity_`.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    /// When the issuer certificate expires (Unix seconds).
    pub issuer_expiry: Gauge,
    /// When each trust anchor expires (Unix seconds), by `fingerprint` (SHA-256 of the DER).
    pub root_expiry: Family<Labels, Gauge>,
    /// Workload certificates issued.
    pub issued: Counter,
    /// Certify calls refused, by `reason` (the `CertifyError` reason).
    pub refused: Family<Labels, Counter>,
}

impl IdentityMetrics {
    /// Counts a refused certify call.
    pub fn refusal(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Shows the expiry of the loaded issuer and of exactly the roots given.
    pub fn expiries(&self, issuer: &crate::ca::CertSummary, roots: &[crate::ca::CertSummary]) {
        self.issuer_expiry.set(issuer.not_after.unix_timestamp());
        self.root_expiry.clear();
        for root in roots {
            self.root_expiry
                .get_or_create(&vec![("fingerprint".to_owned(), root.fingerprint.clone())])
                .set(root.not_after.unix_timestamp());
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            config_map_applies: Counter::default(),
            config_map_deletes: Counter::default(),
            status_writes: Counter::default(),
            watch_errors: Counter::default(),
            leader: Gauge::default(),
            identity: IdentityMetrics::default(),
            stream: StreamMetrics::default(),
        };
        metrics.stream.register(registry);
        let prefixed = registry.sub_registry_with_prefix("tandem_operator");
        prefixed.register(
            "reconciles",
            "Reconcile passes run",
            metrics.reconciles.clone(),
        );
        prefixed.register(
            "reconcile_errors",
            "Reconcile passes that failed and are retried",
            metrics.reconcile_errors.clone(),
        );
        prefixed.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            metrics.reconcile_duration.clone(),
        );
        prefixed.register(
            "configmap_applies",
            "Proxy ConfigMaps written by server-side apply",
            metrics.config_map_applies.clone(),
        );
        prefixed.register(
            "configmap_deletes",
            "Proxy ConfigMaps deleted",
            metrics.config_map_deletes.clone(),
        );
        prefixed.register(
            "status_writes",
            "Policy status writes",
            metrics.status_writes.clone(),
        );
        prefixed.register(
            "watch_errors",
            "Watch errors, each retried with backoff",
            metrics.watch_errors.clone(),
        );
        prefixed.register(
            "leader",
            "1 while this replica holds the Lease",
            metrics.leader.clone(),
        );
        let identity = registry.sub_registry_with_prefix("tandem_identity");
        identity.register(
            "issuer_expiry_timestamp_seconds",
            "When the identity issuer certificate expires, in Unix seconds",
            metrics.identity.issuer_expiry.clone(),
        );
        identity.register(
            "root_expiry_timestamp_seconds",
            "When each trust anchor expires, in Unix seconds, by SHA-256 fingerprint",
            metrics.identity.root_expiry.clone(),
        );
        identity.register(
            "certificates_issued",
            "Workload certificates issued",
            metrics.identity.issued.clone(),
        );
        identity.register(
            "certify_refused",
            "Certify calls refused, by reason",
            metrics.identity.refused.clone(),
        );
        metrics
    }
}
