//! The access log: one JSON object per request on stdout, written off the request path.
//!
//! Why not `tracing::info!` through the JSON formatter, as before: a profile of one hop
//! (callgrind, HTTP/1.1) put a quarter of the proxy's instructions per request in that
//! formatter — per-field visitors, dynamic dispatch, a `write(2)` on stdout per line, in the
//! request's own task. Now the line is serialised from a borrowed struct into a buffer the
//! thread reuses, and queued for the writer the rest of the log uses too
//! ([`crate::log_writer`]). When stdout cannot keep up, lines are dropped and counted
//! (`tandem_log_lines_dropped_total`), never waited for: a slow log reader must not slow the
//! traffic.
//!
//! The line keeps the shape the tracing formatter gave it (`timestamp`, `level`, `target`
//! `tandem::access`, `message` `request`, then the request's fields), so log pipelines that
//! select on `target` keep working.

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::ser::SerializeStruct as _;
use serde::{Serialize, Serializer};

use crate::log_writer::LogWriter;

/// The `target` of access-log lines.
pub const TARGET: &str = "tandem::access";

/// Where access-log lines go: the shared log writer, or nowhere.
#[derive(Clone, Default)]
pub struct AccessLog {
    out: Option<LogWriter>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.out.is_some())
            .finish()
    }
}

impl AccessLog {
    /// Lines go to `out`.
    pub fn to(out: LogWriter) -> Self {
        Self { out: Some(out) }
    }

    /// No access log (`--access-log off`).
    pub fn off() -> Self {
        Self { out: None }
    }

    /// Whether lines are written at all (so callers can skip gathering the fields).
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    /// Writes one line. Never blocks and never fails the request: a line that cannot be
    /// serialised is skipped, one the writer has no room for is dropped and counted by it.
    pub fn write(&self, entry: &Entry<'_>) {
        let Some(out) = &self.out else { return };
        thread_local! {
            // Reused: after the first request a thread serialises without allocating.
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            if serde_json::to_writer(&mut *line, &Line::new(entry)).is_ok() {
                line.push(b'\n');
                // One message per line: lines never interleave.
                out.write_line(line);
            }
        });
    }
}

/// The fields of one request's line, borrowed from the request.
pub struct Entry<'a> {
    /// `outbound` or `inbound`.
    pub direction: &'a str,
    /// `namespace/name` of the destination service, or a fixed label.
    pub dst_service: &'a str,
    /// Request method.
    pub method: &'a str,
    /// `:authority` or `Host`.
    pub authority: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Response status (0 when none was sent).
    pub status: u16,
    /// The endpoint of the last attempt ("" when none was chosen).
    pub upstream: Option<SocketAddr>,
    /// `h2` or `http/1.1`.
    pub upstream_protocol: &'a str,
    /// Matched route name ("" when none).
    pub route: &'a str,
    /// Attempts made (retries + 1; 0 when no endpoint was tried).
    pub attempts: u32,
    /// Why the proxy refused the request ("" when it did not).
    pub refused: &'a str,
    /// Request body bytes read.
    pub bytes_in: usize,
    /// Response body bytes sent.
    pub bytes_out: usize,
    /// Time from the request's arrival to the end of the response, milliseconds.
    pub duration_ms: f64,
    /// The request's `traceparent` header ("" when absent).
    pub traceparent: &'a str,
    /// The trace the request belongs to, 32 hex digits ("" when none is known).
    pub trace_id: &'a str,
    /// The span the proxy made for it (outbound: the last attempt's), or, when it made none,
    /// the caller's span from the incoming context; 16 hex digits ("" when none).
    pub span_id: &'a str,
    /// The SPIFFE ID of the proxy at the other end (inbound: the client's, outbound: the
    /// server's) when the hop is mutual TLS, "" otherwise.
    pub peer_identity: &'a str,
    /// `mutual_tls` or `none` (Istio's name for it).
    pub connection_security_policy: &'a str,
    /// The calling workload (outbound: this one), `unknown` when not known; the same value
    /// as the metrics' `source_workload`.
    pub source_workload: &'a str,
    /// Its namespace (`source_workload_namespace`).
    pub source_namespace: &'a str,
    /// The called workload (inbound: this one; outbound: the chosen endpoint's), as the
    /// metrics' `destination_workload`.
    pub destination_workload: &'a str,
    /// Its namespace (`destination_workload_namespace`).
    pub destination_namespace: &'a str,
    /// Inbound: `allow` or `deny`, the authorization decision ("" outbound).
    pub authz_decision: &'a str,
    /// Inbound: what decided it, as the metric names it: `<namespace>/<name>` of a policy,
    /// `default:<policy>`, `no-allow-match` or `probe` ("" outbound).
    pub authz_policy: &'a str,
    /// What failed ("" when nothing did).
    pub error: Option<&'a dyn fmt::Display>,
}

/// The line: the envelope the tracing formatter used to write, then the entry's fields.
struct Line<'a> {
    timestamp: SystemTime,
    entry: &'a Entry<'a>,
}

impl<'a> Line<'a> {
    fn new(entry: &'a Entry<'a>) -> Self {
        Self {
            timestamp: SystemTime::now(),
            entry,
        }
    }
}

// Written out rather than `#[serde(flatten)]`: flattening goes through serde's map adapter,
// which the profile showed costing a third of the line's serialisation.
impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let mut line = s.serialize_struct("Line", 30)?;
        line.serialize_field("timestamp", &Rfc3339(self.timestamp))?;
        line.serialize_field("level", "INFO")?;
        line.serialize_field("target", TARGET)?;
        line.serialize_field("message", "request")?;
        line.serialize_field("direction", e.direction)?;
        line.serialize_field("dst_service", e.dst_service)?;
        line.serialize_field("method", e.method)?;
        line.serialize_field("authority", e.authority)?;
        line.serialize_field("path", e.path)?;
        line.serialize_field("status", &e.status)?;
        line.serialize_field("upstream", &DisplayOrEmpty(e.upstream))?;
        line.serialize_field("upstream_protocol", e.upstream_protocol)?;
        line.serialize_field("route", e.route)?;
        line.serialize_field("attempts", &e.attempts)?;
        line.serialize_field("refused", e.refused)?;
        line.serialize_field("bytes_in", &e.bytes_in)?;
        line.serialize_field("bytes_out", &e.bytes_out)?;
        line.serialize_field("duration_ms", &e.duration_ms)?;
        line.serialize_field("traceparent", e.traceparent)?;
        line.serialize_field("trace_id", e.trace_id)?;
        line.serialize_field("span_id", e.span_id)?;
        line.serialize_field("peer_identity", e.peer_identity)?;
        line.serialize_field("connection_security_policy", e.connection_security_policy)?;
        line.serialize_field("source_workload", e.source_workload)?;
        line.serialize_field("source_namespace", e.source_namespace)?;
        line.serialize_field("destination_workload", e.destination_workload)?;
        line.serialize_field("destination_namespace", e.destination_namespace)?;
        line.serialize_field("authz_decision", e.authz_decision)?;
        line.serialize_field("authz_policy", e.authz_policy)?;
        line.serialize_field("error", &DisplayOrEmpty(e.error))?;
        line.end()
    }
}

/// A time as RFC 3339 with microseconds, as the tracing formatter wrote it.
struct Rfc3339(SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

/// A value's `Display`, or "" when there is none.
struct DisplayOrEmpty<T>(Option<T>);

impl<T: fmt::Display> Serialize for DisplayOrEmpty<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(v) => s.collect_str(v),
            None => s.serialize_str(""),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            direction: "outbound",
            dst_service: "shop/server",
            method: "GET",
            authority: "server.shop:80",
            path: "/a\"b",
            status: 200,
            upstream: "10.0.0.7:8080".parse().ok(),
            upstream_protocol: "http/1.1",
            route: "",
            attempts: 1,
            refused: "",
            bytes_in: 0,
            bytes_out: 15,
            duration_ms: 0.25,
            traceparent: "",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: "00f067aa0ba902b7",
            peer_identity: "",
            connection_security_policy: "none",
            source_workload: "client",
            source_namespace: "shop",
            destination_workload: "server-v1",
            destination_namespace: "shop",
            authz_decision: "allow",
            authz_policy: "shop/allow-web",
            error: None,
        }
    }

    #[test]
    fn a_line_has_the_envelope_and_every_field_with_empty_strings_for_absent_ones() {
        let entry = entry();
        let json = serde_json::to_value(Line::new(&entry)).unwrap();
        assert_eq!(json["target"], TARGET);
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["message"], "request");
        assert_eq!(json["upstream"], "10.0.0.7:8080");
        assert_eq!(json["error"], "");
        assert_eq!(json["path"], "/a\"b");
        assert_eq!(json["status"], 200);
        assert_eq!(json["bytes_out"], 15);
        let ts = json["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(json["connection_security_policy"], "none");
        assert_eq!(json["authz_decision"], "allow");
        assert_eq!(json["authz_policy"], "shop/allow-web");
        assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(json["span_id"], "00f067aa0ba902b7");
        assert_eq!(json["source_workload"], "client");
        assert_eq!(json["destination_namespace"], "shop");
        assert_eq!(json.as_object().unwrap().len(), 30);
    }

    #[test]
    fn an_error_is_written_as_its_message() {
        let why = "connection refused";
        let entry = Entry {
            upstream: None,
            error: Some(&why),
            ..entry()
        };
        let json = serde_json::to_value(Line::new(&entry)).unwrap();
        assert_eq!(json["error"], why);
        assert_eq!(json["upstream"], "");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_writer_whole_one_per_request() {
        let captured = Captured::default();
        let (out, writer) = crate::log_writer::spawn(captured.clone()).unwrap();
        let log = AccessLog::to(out);
        assert!(log.enabled());
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || (0..50).for_each(|_| log.write(&entry())))
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        drop(writer); // writes what is queued
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 200);
        assert!(lines.iter().all(|l| l["dst_service"] == "shop/server"));
    }

    #[test]
    fn a_disabled_log_writes_nothing_and_says_so() {
        let log = AccessLog::off();
        assert!(!log.enabled());
        log.write(&entry());
    }
}
