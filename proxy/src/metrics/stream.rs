//! The config sources' metrics: `tandem_proxy_config_generation` (the active version's
//! generation), `tandem_proxy_config_source_generation{source="file|stream"}`,
//! `tandem_proxy_config_stream_connected`, `tandem_proxy_config_stream_reconnects_total` and
//! `tandem_proxy_discovery_requests_total{result}`.
//!
//! Nothing here is touched on the request path: the discovery hook only sends into a channel,
//! and the discovery task counts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tandem_crds::contract::ConfigSource;

/// Labels of `tandem_proxy_config_source_generation`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `file` or `stream`.
    pub source: &'static str,
}

/// Labels of `tandem_proxy_discovery_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryLabels {
    /// `found` (the operator named a Service), `unknown` (no Service has the address), `error`
    /// (the call failed) or `dropped` (the queue was full).
    pub result: &'static str,
}

/// The config sources' metrics.
#[derive(Clone)]
pub struct StreamMetrics {
    /// The active version's generation (0 for an unstamped version).
    pub generation: Gauge,
    /// The last good version's generation, per source.
    pub source_generation: Family<SourceLabels, Gauge>,
    /// 1 while the stream is connected and answered.
    pub connected: Gauge,
    /// Stream connections ended (by error, refusal or the operator).
    pub reconnects: Counter,
    /// Discovery calls by result.
    pub discoveries: Family<DiscoveryLabels, Counter>,
}

impl StreamMetrics {
    /// Creates and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            generation: Gauge::default(),
            source_generation: Family::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            discoveries: Family::default(),
        };
        registry.register(
            "tandem_proxy_config_generation",
            "Generation of the active config version (0 when its version carries none)",
            metrics.generation.clone(),
        );
        registry.register(
            "tandem_proxy_config_source_generation",
            "Generation of the last good version of each config source",
            metrics.source_generation.clone(),
        );
        registry.register(
            "tandem_proxy_config_stream_connected",
            "1 while the operator's config stream is connected",
            metrics.connected.clone(),
        );
        registry.register(
            "tandem_proxy_config_stream_reconnects",
            "Config stream connections that ended and were retried",
            metrics.reconnects.clone(),
        );
        registry.register(
            "tandem_proxy_discovery_requests",
            "On-demand discovery calls for unknown destinations, by result",
            metrics.discoveries.clone(),
        );
        metrics
    }

    /// Records the generation of a source's new last good version.
    pub fn source_loaded(&self, source: ConfigSource, generation: u64) {
        self.source_generation
            .get_or_create(&SourceLabels {
                source: source.as_str(),
            })
            .set(gauge_value(generation));
    }

    /// Counts one discovery outcome.
    pub fn discovered(&self, result: &'static str) {
        self.discoveries
            .get_or_create(&DiscoveryLabels { result })
            .inc();
    }
}

/// A generation (Unix milliseconds) as a gauge value; they fit in an `i64` for 292 million
/// years, beyond that the gauge saturates.
pub fn gauge_value(generation: u64) -> i64 {
    i64::try_from(generation).unwrap_or(i64::MAX)
}
