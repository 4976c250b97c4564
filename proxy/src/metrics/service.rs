//! The proxy's own per-destination series (`tandem_request_attempts`), resolved once and then
//! touched with atomics only; and the handle a TCP connection keeps on its standard series.

use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use super::mesh::{ServiceLabels, TcpSeries};
use super::{AtomicHistogram, Direction, Families, RequestLabels};

/// The handles of one destination (`namespace/name`, `passthrough`, `inbound`, …) in one
/// direction, for the proxy's own series, which keep the `direction` and `dst_service` labels
/// (the standard request series are in [`super::mesh`]). Built when a config is compiled, kept
/// by it, shared by every request to the destination; a series is created in its family the
/// first time it is used (one lock, once) and cached here.
pub struct ServiceTelemetry {
    direction: Direction,
    label: Arc<str>,
    families: Families,
    attempts: OnceLock<AtomicHistogram>,
    /// The standard series' `destination_service*` labels.
    service: ServiceLabels,
    /// What an outbound request to this service tells the inbound proxy about its caller
    /// ([`crate::telemetry::PEER_HEADER`]); `None` for the fixed destinations.
    peer_header: Option<HeaderValue>,
}

impl std::fmt::Debug for ServiceTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTelemetry")
            .field("direction", &self.direction)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl ServiceTelemetry {
    pub(super) fn new(
        families: &Families,
        direction: Direction,
        label: Arc<str>,
        service: ServiceLabels,
        peer_header: Option<HeaderValue>,
    ) -> Self {
        Self {
            direction,
            label,
            families: families.clone(),
            attempts: OnceLock::new(),
            service,
            peer_header,
        }
    }

    /// The `destination_service*` labels.
    pub fn service(&self) -> ServiceLabels {
        self.service
    }

    /// The peer header of an outbound request to this service.
    pub fn peer_header(&self) -> Option<&HeaderValue> {
        self.peer_header.as_ref()
    }

    /// The `dst_service` label (also the access log's `dst_service`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Records how many attempts a request a policy governed took.
    pub fn attempts(&self, attempts: u32) {
        self.attempts
            .get_or_init(|| {
                let labels = RequestLabels {
                    direction: self.direction,
                    dst_service: self.label.to_string(),
                };
                self.families.attempts.get_or_create(&labels).clone()
            })
            .observe(u64::from(attempts));
    }
}

/// Keeps a relayed TCP connection counted as open; counts it closed when dropped.
pub struct ConnectionTelemetry {
    series: TcpSeries,
}

impl ConnectionTelemetry {
    /// Counts a connection with these standard series opened.
    pub fn open(series: TcpSeries) -> Self {
        series.opened();
        Self { series }
    }

    /// Counts bytes read from the client.
    pub fn from_client(&self, n: u64) {
        self.series.received(n);
    }

    /// Counts bytes written to the client.
    pub fn to_client(&self, n: u64) {
        self.series.sent(n);
    }
}

impl Drop for ConnectionTelemetry {
    fn drop(&mut self) {
        self.series.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn attempts_of_two_handles_for_one_destination_share_a_series() {
        // A config reload builds new handles; the counts must carry on, not restart.
        let metrics = Metrics::new();
        let service = || {
            metrics.service(
                Direction::Outbound,
                Arc::from("ns/web"),
                ServiceLabels::unknown(),
                None,
            )
        };
        let (before, after) = (service(), service());
        before.attempts(1);
        after.attempts(2);
        let text = metrics.encode(None);
        assert!(
            text.contains(
                r#"tandem_request_attempts_count{direction="outbound",dst_service="ns/web"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tandem_request_attempts_bucket{le="1.0",direction="outbound",dst_service="ns/web"} 1"#
            ),
            "{text}"
        );
    }
}
