//! Tracing's export metrics: `tandem_trace_spans_exported_total`,
//! `tandem_trace_spans_dropped_total{reason="queue-full"|"export-failed"|"disabled"}` and
//! `tandem_trace_export_errors_total`.
//!
//! Each drop reason's series is created (at 0) when the metrics are, and the request path
//! holds its counter directly: counting a drop is one atomic add, never a family lookup.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of `tandem_trace_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `queue-full` (the export queue had no room), `export-failed` (the collector did not
    /// take the batch) or `disabled` (tracing was turned off before the batch was sent).
    pub reason: &'static str,
}

/// The export's counters.
#[derive(Clone, Debug)]
pub struct TraceMetrics {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Export calls that failed.
    pub export_errors: Counter,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: Counter,
    /// Spans dropped with a failed export.
    pub dropped_export_failed: Counter,
    /// Spans dropped because tracing was turned off.
    pub dropped_disabled: Counter,
}

impl TraceMetrics {
    /// Creates and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let dropped = Family::<DroppedLabels, Counter>::default();
        let reason = |reason| dropped.get_or_create(&DroppedLabels { reason }).clone();
        let metrics = Self {
            exported: Counter::default(),
            export_errors: Counter::default(),
            dropped_queue_full: reason("queue-full"),
            dropped_export_failed: reason("export-failed"),
            dropped_disabled: reason("disabled"),
        };
        registry.register(
            "tandem_trace_spans_exported",
            "Spans the trace collector accepted",
            metrics.exported.clone(),
        );
        registry.register(
            "tandem_trace_spans_dropped",
            "Spans dropped before reaching the collector, by reason",
            dropped,
        );
        registry.register(
            "tandem_trace_export_errors",
            "Span export calls that failed (unreachable collector, timeout, error status)",
            metrics.export_errors.clone(),
        );
        metrics
    }
}
