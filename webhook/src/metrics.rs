//! `/metrics`: admissions by result and skip reason, their latency, certificate reloads.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// The webhook's metrics and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    admissions: Family<AdmissionLabels, Counter>,
    latency: Histogram,
    reloads: Family<ReloadLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tandem_webhook` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem_webhook");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "AdmissionReviews answered, by result (injected, skipped, denied, ignored, invalid) and skip reason",
            admissions.clone(),
        );
        // 50 µs to about 1.6 s: a review is normally well under a millisecond.
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview, from the whole body read to the answer built",
            latency.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate loads from disk, by result (success, error)",
            reloads.clone(),
        );
        Self {
            registry,
            admissions,
            latency,
            reloads,
        }
    }

    /// Counts one answered review.
    pub fn admission(&self, outcome: &Outcome, took: Duration) {
        let labels = AdmissionLabels {
            result: outcome.result(),
            reason: outcome.reason(),
        };
        self.admissions.get_or_create(&labels).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts one certificate load attempt.
    pub fn certificate_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Encoding into a String only fails if a metric's own Display fails, which the
        // built-in types never do; an empty page is the honest fallback.
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::SkipReason;

    #[test]
    fn admissions_are_counted_by_result_and_reason() {
        let metrics = Metrics::new();
        metrics.admission(
            &Outcome::Skipped(SkipReason::HostNetwork),
            Duration::from_micros(80),
        );
        metrics.admission(&Outcome::Injected, Duration::from_micros(120));
        metrics.admission(&Outcome::Injected, Duration::from_micros(90));
        let text = metrics.render();
        assert!(
            text.contains(r#"tandem_webhook_admissions_total{result="injected",reason=""} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tandem_webhook_admissions_total{result="skipped",reason="host-network"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tandem_webhook_admission_duration_seconds_count 3"),
            "{text}"
        );
    }
}
