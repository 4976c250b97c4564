//! A finished span as the request path hands it over, and its OTLP form.
//!
//! The request path fills a [`SpanRecord`] (ids, times, the request's few facts, copied only
//! for a sampled request) and queues it; the export task turns records into
//! `opentelemetry-proto` messages, where every attribute key and the span name become owned
//! strings. Keeping that conversion off the request path is the point of the split.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderValue, Method};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};

use super::context::{SpanId, TraceId};

/// Which side of a hop the span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The inbound proxy receiving a request for its application.
    Server,
    /// One outbound attempt to an endpoint.
    Client,
}

/// Why a span failed, as OTel's `error.type` (low cardinality).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// A 5xx response: the status code.
    Status(u16),
    /// No response, or the proxy refused: a fixed name (`connect_failure`, `timeout`, `reset`,
    /// a policy's refusal such as `max-connections`, Pingora's error type).
    Named(&'static str),
}

/// One finished span, ready to export.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// The caller's span (the request's incoming context), none for a root.
    pub parent: Option<SpanId>,
    /// Server or client.
    pub kind: Kind,
    /// When it started and ended.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// The first part of the span's name: the destination service (`namespace/name` as the
    /// metrics label it, or a fixed label) outbound, this workload inbound.
    pub service: Arc<str>,
    /// The port the request was sent to.
    pub port: u16,
    /// The route rule that matched, by name, when it has one (`*` in the name otherwise).
    pub route: Option<Box<str>>,
    /// `http.request.method`.
    pub method: Method,
    /// `url.path`.
    pub path: Box<str>,
    /// `server.address`: the request's authority host.
    pub server_address: Box<str>,
    /// `network.peer.address`/`port`: the endpoint (client spans) or the client (server spans).
    pub peer: Option<SocketAddr>,
    /// `network.protocol.version`: `1.1` or `2`.
    pub protocol_version: &'static str,
    /// `http.response.status_code` (0: none).
    pub status: u16,
    /// Set when the span failed (5xx, no response, refused).
    pub error: Option<ErrorType>,
    /// `tandem.attempt`: 1 for the first attempt, 2 for the first retry…; 0 on server spans.
    pub attempt: u32,
    /// `tandem.policy`: inbound, the authorization policy that decided; outbound, the
    /// resilience policy's refusal when it refused.
    pub policy: Option<Box<str>>,
    /// `tandem.peer.identity`: the SPIFFE ID of the other proxy when the hop is mutual TLS.
    pub peer_identity: Option<Box<str>>,
    /// The request's `tracestate`, exported as the span's.
    pub trace_state: Option<HeaderValue>,
}

/// What the export needs besides the records: this proxy's workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `tandem.workload`, also the resource's `service.name`.
    pub name: Arc<str>,
    /// The workload's namespace.
    pub namespace: Arc<str>,
}

impl SpanRecord {
    /// `<service>:<port>/<route or *>`: bounded, as Istio's `<host>:<port>/*`; the service's
    /// `namespace/name` label is written `name.namespace`.
    pub fn name(&self) -> String {
        let service = match self.service.split_once('/') {
            Some((namespace, name)) => format!("{name}.{namespace}"),
            None => self.service.to_string(),
        };
        format!(
            "{service}:{}/{}",
            self.port,
            self.route.as_deref().unwrap_or("*")
        )
    }

    /// The OTLP span.
    pub fn to_proto(&self, workload: &Workload) -> Span {
        let mut attributes = Vec::with_capacity(16);
        let mut add = |key: &str, value: any_value::Value| {
            attributes.push(KeyValue {
                key: key.to_owned(),
                value: Some(AnyValue { value: Some(value) }),
                ..KeyValue::default()
            });
        };
        let text = |s: &str| any_value::Value::StringValue(s.to_owned());
        let int = |n: i64| any_value::Value::IntValue(n);
        add("http.request.method", text(self.method.as_str()));
        add("url.path", text(&self.path));
        add("server.address", text(&self.server_address));
        add("server.port", int(i64::from(self.port)));
        add("network.protocol.version", text(self.protocol_version));
        if self.status != 0 {
            add("http.response.status_code", int(i64::from(self.status)));
        }
        if let Some(peer) = self.peer {
            add("network.peer.address", text(&peer.ip().to_string()));
            add("network.peer.port", int(i64::from(peer.port())));
        }
        if let Some(error) = self.error {
            let value = match error {
                ErrorType::Status(code) => code.to_string(),
                ErrorType::Named(name) => name.to_owned(),
            };
            add("error.type", any_value::Value::StringValue(value));
        }
        add("tandem.workload", text(&workload.name));
        add("tandem.route", text(self.route.as_deref().unwrap_or("")));
        if let Some(policy) = &self.policy {
            add("tandem.policy", text(policy));
        }
        if self.kind == Kind::Client {
            add("tandem.attempt", int(i64::from(self.attempt)));
        }
        if let Some(identity) = &self.peer_identity {
            add("tandem.peer.identity", text(identity));
        }
        let kind = match self.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        };
        let status = match self.error {
            Some(_) => Status {
                code: status::StatusCode::Error.into(),
                message: String::new(),
            },
            None => Status::default(),
        };
        // W3C flags (sampled) plus OTLP's "the parent is remote" bits: every parent the proxy
        // has is another process's span.
        let flags = match self.parent {
            Some(_) => 0x301,
            None => 0x101,
        };
        Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            trace_state: self
                .trace_state
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags,
            name: self.name(),
            kind: kind.into(),
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end),
            attributes,
            status: Some(status),
            ..Span::default()
        }
    }
}

/// Nanoseconds since the epoch (0 for a clock before it; saturating far in the future).
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record() -> SpanRecord {
        SpanRecord {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent: Some([9; 8]),
            kind: Kind::Client,
            start: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2),
            service: Arc::from("shop/web"),
            port: 80,
            route: Some("orders".into()),
            method: Method::GET,
            path: "/orders".into(),
            server_address: "web.shop".into(),
            peer: "10.0.0.7:8080".parse().ok(),
            protocol_version: "1.1",
            status: 503,
            error: Some(ErrorType::Status(503)),
            attempt: 2,
            policy: None,
            peer_identity: None,
            trace_state: Some(HeaderValue::from_static("congo=t61rcWkgMzE")),
        }
    }

    fn attribute<'s>(span: &'s Span, key: &str) -> Option<&'s any_value::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn a_record_becomes_an_otlp_span_with_bounded_name_and_http_attributes() {
        let workload = Workload {
            name: Arc::from("client"),
            namespace: Arc::from("shop"),
        };
        let span = record().to_proto(&workload);
        assert_eq!(span.name, "web.shop:80/orders");
        assert_eq!(span.kind, i32::from(span::SpanKind::Client));
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert_eq!(span.trace_state, "congo=t61rcWkgMzE");
        assert_eq!(span.start_time_unix_nano, 1_000_000_000);
        assert_eq!(
            span.status.unwrap().code,
            i32::from(status::StatusCode::Error)
        );
        let string = |s: &str| Some(any_value::Value::StringValue(s.into()));
        let span = record().to_proto(&workload);
        assert_eq!(
            attribute(&span, "http.request.method").cloned(),
            string("GET")
        );
        assert_eq!(attribute(&span, "error.type").cloned(), string("503"));
        assert_eq!(
            attribute(&span, "http.response.status_code").cloned(),
            Some(any_value::Value::IntValue(503))
        );
        assert_eq!(
            attribute(&span, "tandem.attempt").cloned(),
            Some(any_value::Value::IntValue(2))
        );
        assert_eq!(
            attribute(&span, "network.peer.address").cloned(),
            string("10.0.0.7")
        );
        let no_route = SpanRecord {
            route: None,
            service: Arc::from("passthrough"),
            ..record()
        };
        assert_eq!(no_route.name(), "passthrough:80/*");
    }
}
