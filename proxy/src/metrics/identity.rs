//! The identity client's metrics: `tandem_identity_cert_expiry_timestamp_seconds`,
//! `tandem_identity_next_renewal_timestamp_seconds`, `tandem_identity_renewals_total{result,
//! reason}` and `tandem_identity_trust_reload_errors_total`.
//!
//! They sit in a registry of their own, exported only once identity is turned on (a proxy
//! without identity must not show an expiry of 0, which an alert would read as "expired").
//! Nothing here is touched on the request path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Labels of `tandem_identity_renewals_total`: `result="ok"`, or `result="error"` with the
/// failure class as `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RenewalLabels {
    /// `ok` or `error`.
    pub result: &'static str,
    /// The failure class ([`crate::identity::CertifyFailure::reason`]), for errors only.
    pub reason: Option<&'static str>,
}

impl EncodeLabelSet for RenewalLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("result", self.result).encode(encoder.encode_label())?;
        if let Some(reason) = self.reason {
            ("reason", reason).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The identity client's metrics.
pub struct IdentityMetrics {
    registry: Registry,
    enabled: AtomicBool,
    /// `notAfter` of the certificate in use, Unix seconds.
    pub cert_expiry: Gauge<f64, AtomicU64>,
    /// When the next renewal (or retry) is due, Unix seconds.
    pub next_renewal: Gauge<f64, AtomicU64>,
    /// Certify attempts by result (and failure class).
    pub renewals: Family<RenewalLabels, Counter>,
    /// Trust-roots files refused.
    pub trust_reload_errors: Counter,
}

impl IdentityMetrics {
    /// Creates the metrics (not exported until [`enable`](Self::enable)).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let cert_expiry = Gauge::<f64, AtomicU64>::default();
        let next_renewal = Gauge::<f64, AtomicU64>::default();
        let renewals = Family::default();
        let trust_reload_errors = Counter::default();
        registry.register_with_unit(
            "tandem_identity_cert_expiry_timestamp",
            "Expiry (notAfter) of the proxy's certificate, Unix time",
            Unit::Seconds,
            cert_expiry.clone(),
        );
        registry.register_with_unit(
            "tandem_identity_next_renewal_timestamp",
            "When the proxy next asks the signer for a certificate, Unix time",
            Unit::Seconds,
            next_renewal.clone(),
        );
        registry.register(
            "tandem_identity_renewals",
            "Certify attempts by result, with the failure class as reason",
            renewals.clone(),
        );
        registry.register(
            "tandem_identity_trust_reload_errors",
            "Trust-roots files refused (the last good bundle was kept)",
            trust_reload_errors.clone(),
        );
        Self {
            registry,
            enabled: AtomicBool::new(false),
            cert_expiry,
            next_renewal,
            renewals,
            trust_reload_errors,
        }
    }

    /// Exports these metrics from now on (identity is on).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Counts a successful certify call.
    pub fn renewed(&self) {
        self.renewals
            .get_or_create(&RenewalLabels {
                result: "ok",
                reason: None,
            })
            .inc();
    }

    /// Counts a failed certify call.
    pub fn failed(&self, reason: &'static str) {
        self.renewals
            .get_or_create(&RenewalLabels {
                result: "error",
                reason: Some(reason),
            })
            .inc();
    }

    /// Appends the text exposition when identity is on.
    pub(crate) fn encode(&self, out: &mut String) {
        if self.enabled.load(Ordering::Relaxed) {
            let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
        }
    }
}

impl Default for IdentityMetrics {
    fn default() -> Self {
        Self::new()
    }
}
