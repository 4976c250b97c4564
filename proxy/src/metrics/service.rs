//! The series of one destination, resolved once and then touched with atomics only.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::{
    AtomicHistogram, Classification, ConnProtocol, Direction, Families, RequestLabels,
    ResponseLabels, SecurityPolicy, TcpLabels,
};

/// Status codes are three digits (`http::StatusCode` allows 100–999); 0 means none was sent.
const STATUS_CLASSES: usize = 10;

/// One hundred status codes × the two classifications.
type StatusRow = [[OnceLock<Counter>; 2]; 100];

/// The metric handles of one destination (`namespace/name`, `passthrough`, `inbound`, …) in
/// one direction. Built when a config is compiled, kept by it, shared by every request to the
/// destination. Each series is created in its family the first time it is used (one lock, once)
/// and cached here; after that recording is an atomic add. A series appears in `/metrics` only
/// once something was recorded in it, as with plain families.
pub struct ServiceTelemetry {
    direction: Direction,
    label: Arc<str>,
    families: Families,
    requests: OnceLock<Counter>,
    latency: OnceLock<AtomicHistogram>,
    attempts: OnceLock<AtomicHistogram>,
    /// Response counters by status class (the hundreds digit), each row allocated on first use
    /// so a destination that only ever answers 200 costs one row.
    responses: [OnceLock<Box<StatusRow>>; STATUS_CLASSES],
    /// By protocol, then security policy.
    connections: [[OnceLock<ConnectionCounters>; 2]; 3],
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
    pub(super) fn new(families: &Families, direction: Direction, label: Arc<str>) -> Self {
        Self {
            direction,
            label,
            families: families.clone(),
            requests: OnceLock::new(),
            latency: OnceLock::new(),
            attempts: OnceLock::new(),
            responses: std::array::from_fn(|_| OnceLock::new()),
            connections: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
        }
    }

    /// The `dst_service` label.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn request_labels(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            dst_service: self.label.to_string(),
        }
    }

    /// Counts a request received.
    pub fn request(&self) {
        self.requests
            .get_or_init(|| {
                self.families
                    .requests
                    .get_or_create(&self.request_labels())
                    .clone()
            })
            .inc();
    }

    /// Records a finished request: its status (0 when none was sent), classification and
    /// latency, and for requests a policy governed, how many attempts it took.
    pub fn response(
        &self,
        status: u16,
        classification: Classification,
        elapsed: Duration,
        attempts: Option<u32>,
    ) {
        self.count_response(status, classification);
        self.latency
            .get_or_init(|| {
                self.families
                    .latency
                    .get_or_create(&self.request_labels())
                    .clone()
            })
            .observe_duration(elapsed);
        if let Some(attempts) = attempts {
            self.attempts
                .get_or_init(|| {
                    self.families
                        .attempts
                        .get_or_create(&self.request_labels())
                        .clone()
                })
                .observe(u64::from(attempts));
        }
    }

    fn count_response(&self, status: u16, classification: Classification) {
        let create = || {
            self.families
                .responses
                .get_or_create(&ResponseLabels {
                    direction: self.direction,
                    dst_service: self.label.to_string(),
                    status_code: status,
                    classification,
                })
                .clone()
        };
        let Some(row) = self.responses.get(usize::from(status / 100)) else {
            // Not a status `http` can carry; counted through the family (never on a real path).
            create().inc();
            return;
        };
        let row = row.get_or_init(|| Box::new(std::array::from_fn(|_| Default::default())));
        // In bounds by construction: a remainder of 100 and a two-valued index.
        row[usize::from(status % 100)][classification.index()]
            .get_or_init(create)
            .inc();
    }

    fn connection_counters(
        &self,
        protocol: ConnProtocol,
        security: SecurityPolicy,
    ) -> &ConnectionCounters {
        self.connections[protocol.index()][security.index()].get_or_init(|| {
            let labels = TcpLabels {
                direction: self.direction,
                dst_service: self.label.to_string(),
                protocol,
                connection_security_policy: security,
            };
            ConnectionCounters {
                open: self.families.tcp_open.get_or_create(&labels).clone(),
                close: self.families.tcp_close.get_or_create(&labels).clone(),
                active: self.families.tcp_active.get_or_create(&labels).clone(),
                read: self.families.tcp_read_bytes.get_or_create(&labels).clone(),
                write: self.families.tcp_write_bytes.get_or_create(&labels).clone(),
            }
        })
    }
}

/// The TCP series of one destination and protocol.
#[derive(Clone, Debug)]
struct ConnectionCounters {
    open: Counter,
    close: Counter,
    active: Gauge,
    read: Counter,
    write: Counter,
}

/// Keeps a connection counted as open; counts it closed when dropped.
pub struct ConnectionTelemetry {
    counters: ConnectionCounters,
}

impl ConnectionTelemetry {
    /// Counts a connection to `service` carried as `protocol` (mutually authenticated or not)
    /// opened.
    pub fn open(
        service: &ServiceTelemetry,
        protocol: ConnProtocol,
        security: SecurityPolicy,
    ) -> Self {
        let counters = service.connection_counters(protocol, security).clone();
        counters.open.inc();
        counters.active.inc();
        Self { counters }
    }

    /// Counts bytes read from the client.
    pub fn from_client(&self, n: u64) {
        self.counters.read.inc_by(n);
    }

    /// Counts bytes written to the client.
    pub fn to_client(&self, n: u64) {
        self.counters.write.inc_by(n);
    }
}

impl Drop for ConnectionTelemetry {
    fn drop(&mut self) {
        self.counters.close.inc();
        self.counters.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn repeated_recording_reuses_one_series_per_status_and_classification() {
        let metrics = Metrics::new();
        let svc = metrics.service(Direction::Outbound, Arc::from("ns/web"));
        svc.request();
        svc.request();
        svc.response(
            200,
            Classification::Success,
            Duration::from_millis(1),
            Some(1),
        );
        svc.response(
            200,
            Classification::Success,
            Duration::from_millis(1),
            Some(2),
        );
        svc.response(503, Classification::Failure, Duration::from_millis(1), None);
        svc.response(0, Classification::Failure, Duration::from_millis(1), None);
        let text = metrics.encode(None);
        assert!(
            text.contains(r#"tandem_requests_total{direction="outbound",dst_service="ns/web"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"tandem_responses_total{direction="outbound",dst_service="ns/web",status_code="200",classification="success"} 2"#), "{text}");
        assert!(text.contains(r#"tandem_responses_total{direction="outbound",dst_service="ns/web",status_code="503",classification="failure"} 1"#), "{text}");
        assert!(text.contains(r#"tandem_responses_total{direction="outbound",dst_service="ns/web",status_code="0",classification="failure"} 1"#), "{text}");
        assert!(text.contains(r#"tandem_response_latency_seconds_count{direction="outbound",dst_service="ns/web"} 4"#), "{text}");
        assert!(
            text.contains(
                r#"tandem_request_attempts_count{direction="outbound",dst_service="ns/web"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn two_handles_for_one_destination_share_its_series() {
        // A config reload builds new handles; the counts must carry on, not restart.
        let metrics = Metrics::new();
        let before = metrics.service(Direction::Inbound, Arc::from("ns/a"));
        let after = metrics.service(Direction::Inbound, Arc::from("ns/a"));
        before.request();
        after.request();
        let text = metrics.encode(None);
        assert!(
            text.contains(r#"tandem_requests_total{direction="inbound",dst_service="ns/a"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn a_connection_is_active_until_its_telemetry_drops() {
        let metrics = Metrics::new();
        let svc = metrics.service(Direction::Outbound, Arc::from("ns/db"));
        let conn = ConnectionTelemetry::open(&svc, ConnProtocol::Tcp, SecurityPolicy::None);
        conn.from_client(10);
        let open = metrics.encode(None);
        assert!(
            open.contains(
                r#"tandem_tcp_active{direction="outbound",dst_service="ns/db",protocol="tcp",connection_security_policy="none"} 1"#
            ),
            "{open}"
        );
        drop(conn);
        let closed = metrics.encode(None);
        assert!(
            closed.contains(
                r#"tandem_tcp_active{direction="outbound",dst_service="ns/db",protocol="tcp",connection_security_policy="none"} 0"#
            ),
            "{closed}"
        );
        assert!(closed.contains(r#"tandem_tcp_read_bytes_total{direction="outbound",dst_service="ns/db",protocol="tcp",connection_security_policy="none"} 10"#), "{closed}");
    }
}
