//! Distributed tracing: W3C `traceparent` (and B3) propagation, parent-based sampling, a SERVER
//! span per inbound request and a CLIENT span per outbound attempt, exported over OTLP/HTTP.
//!
//! - [`context`]: the header codecs (no allocation to read; the header value alone to write).
//! - [`sampler`]: the decision (the incoming flag, else `samplingPercent`).
//! - [`span`]: a finished span and its OTLP message.
//! - [`export`]: the bounded queue and the batching export task.
//!
//! The request path keeps a [`RequestTrace`] in Pingora's per-request context. `request_filter`
//! calls [`RequestTrace::begin`] (read the headers, decide); the outbound `upstream_peer` calls
//! [`RequestTrace::begin_attempt`] for each attempt, which gets a span id of its own;
//! `upstream_request_filter` writes the context onto the upstream request
//! ([`RequestTrace::write`]); the attempt's result hooks end its span, and `logging` ends
//! whatever is still open. With tracing absent from the config, nothing is recorded or written:
//! the headers pass through untouched, and the access log still shows the incoming ids.
//!
//! What is written where:
//! - **sampled**: the trace id, this proxy's span id (inbound: the SERVER span, outbound: the
//!   attempt's CLIENT span), flag 1, in the incoming form (`traceparent` for a new trace);
//! - **not sampled, decided upstream** (flag 0 arrived): nothing is changed;
//! - **not sampled, decided here** (no context arrived, or a B3 one that deferred): the
//!   decision is written (`traceparent` with flag 0 and fresh ids for a new trace), so the next
//!   proxy follows it instead of drawing again: a trace is sampled once, at its first proxy.

pub mod context;
pub mod export;
pub mod sampler;
pub mod span;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use http::{HeaderValue, Method};
use pingora::http::RequestHeader;
use tandem_crds::contract::ProxyConfig;

use context::{Format, Hex, Incoming, SpanId, TraceId};
use export::{BadCollector, Collector, Exporter};
use sampler::Sampler;
use span::{ErrorType, Kind, SpanRecord, Workload};

/// The tracing settings of one config version, compiled with it.
#[derive(Debug)]
pub struct TraceSettings {
    /// Where spans go.
    pub collector: Arc<Collector>,
    /// How new traces are sampled.
    pub sampler: Sampler,
    /// This proxy's workload, as spans and the resource name it.
    pub workload: Workload,
}

impl TraceSettings {
    /// The config's tracing settings; `None` when tracing is off.
    pub fn compile(config: &ProxyConfig) -> Result<Option<Arc<Self>>, BadCollector> {
        let Some(tracing) = &config.telemetry.tracing else {
            return Ok(None);
        };
        let collector = Arc::new(Collector::parse(&tracing.collector)?);
        let namespace = config.workload.namespace.as_str();
        // Istio's default service name: `<app>.<namespace>`; the workload's name when the
        // injector provides it, else its ServiceAccount.
        let workload = process()
            .workload_name
            .as_deref()
            .unwrap_or(&config.workload.service_account);
        Ok(Some(Arc::new(Self {
            collector,
            sampler: Sampler::new(tracing.sampling_percent),
            workload: Workload {
                name: Arc::from(format!("{workload}.{namespace}")),
                namespace: Arc::from(namespace),
            },
        })))
    }
}

/// What the process knows about its pod, read once from the environment the injector sets.
#[derive(Debug, Default)]
pub struct Process {
    /// `TANDEM_WORKLOAD_NAME`: the pod's workload (its Deployment, …).
    pub workload_name: Option<String>,
    /// `TANDEM_POD_NAME`.
    pub pod_name: Option<String>,
}

/// The pod facts, read from the environment on first use.
pub fn process() -> &'static Process {
    static PROCESS: OnceLock<Process> = OnceLock::new();
    PROCESS.get_or_init(|| {
        let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Process {
            workload_name: var("TANDEM_WORKLOAD_NAME"),
            pod_name: var("TANDEM_POD_NAME"),
        }
    })
}

/// What this proxy writes onto the upstream request.
#[derive(Clone, Copy, Debug)]
struct Outgoing {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    format: Format,
    /// The parent to name (B3 carries it), when the proxy made a span.
    parent: Option<SpanId>,
}

/// One request's trace state.
#[derive(Debug, Default)]
pub struct RequestTrace {
    /// The ids the access log shows: the span the proxy made, else the incoming ones, else the
    /// ones the proxy wrote.
    log_ids: Option<(TraceId, SpanId)>,
    outgoing: Option<Outgoing>,
    /// Present when the request is sampled.
    recording: Option<Box<Recording>>,
}

/// The state of a sampled request.
#[derive(Debug)]
struct Recording {
    settings: Arc<TraceSettings>,
    kind: Kind,
    /// The caller's span.
    parent: Option<SpanId>,
    /// Inbound: the SERVER span's id.
    server_span: SpanId,
    start: SystemTime,
    method: Method,
    path: Box<str>,
    server_address: Box<str>,
    client: Option<SocketAddr>,
    protocol_version: &'static str,
    trace_state: Option<HeaderValue>,
    /// Outbound: the port the request was sent to (the service's).
    port: u16,
    /// Attempts begun.
    attempts: u32,
    /// The attempt in progress.
    attempt: Option<Attempt>,
}

#[derive(Debug)]
struct Attempt {
    span_id: SpanId,
    start: SystemTime,
    number: u32,
    endpoint: SocketAddr,
    /// The response head's status, once it arrived.
    status: u16,
}

/// Where the request went, as spans describe it: borrowed from the request's context when a
/// span ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hop<'a> {
    /// The destination's metrics label (`namespace/name`), outbound.
    pub service: &'a str,
    /// The route rule that matched, by name (none: no named rule).
    pub route: Option<&'a str>,
    /// The policy that decided (authorization inbound, a refusal outbound).
    pub policy: Option<&'a str>,
    /// The other proxy's SPIFFE ID over mutual TLS.
    pub peer_identity: Option<&'a str>,
    /// Inbound: the application port the request is forwarded to.
    pub port: Option<u16>,
}

/// How a span ended.
#[derive(Clone, Copy, Debug, Default)]
pub struct End {
    /// The response status (0: none).
    pub status: u16,
    /// Why it failed, if it did.
    pub error: Option<ErrorType>,
}

fn random_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

impl RequestTrace {
    /// Reads the request's context and decides: `settings` is the active config's tracing
    /// (`None`: off), `inbound` says which listener, `client` is the downstream address.
    pub fn begin(
        settings: Option<&Arc<TraceSettings>>,
        inbound: bool,
        req: &RequestHeader,
        h2: bool,
        client: Option<SocketAddr>,
    ) -> Self {
        let incoming = Incoming::extract(&req.headers);
        let received = match incoming {
            Incoming::Context(c) => Some((c.trace_id, c.span_id)),
            Incoming::None | Incoming::Decision(_) => None,
        };
        let Some(settings) = settings else {
            return Self {
                log_ids: received,
                ..Self::default()
            };
        };
        let sampled = settings.sampler.decide(&incoming);
        let (trace_id, parent, format, decided_here) = match incoming {
            Incoming::Context(c) => (c.trace_id, Some(c.span_id), c.format, c.sampled.is_none()),
            Incoming::Decision(_) => (
                random_trace_id(),
                None,
                Format::B3Single { short: false },
                false,
            ),
            Incoming::None => (random_trace_id(), None, Format::W3c, true),
        };
        if !sampled {
            let outgoing = decided_here.then(|| Outgoing {
                trace_id,
                span_id: parent.unwrap_or_else(random_span_id),
                sampled: false,
                format,
                parent: None,
            });
            return Self {
                log_ids: received.or(outgoing.map(|o| (o.trace_id, o.span_id))),
                outgoing,
                recording: None,
            };
        }
        // Inbound, the SERVER span; outbound, replaced by each attempt's span.
        let span_id = random_span_id();
        let path = req.uri.path();
        let authority = req
            .uri
            .authority()
            .map(http::uri::Authority::as_str)
            .or_else(|| {
                req.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let host = authority_host(authority);
        let recording = Recording {
            settings: settings.clone(),
            kind: if inbound { Kind::Server } else { Kind::Client },
            parent,
            server_span: span_id,
            start: SystemTime::now(),
            method: req.method.clone(),
            path: path.into(),
            server_address: host.into(),
            client,
            protocol_version: if h2 { "2" } else { "1.1" },
            trace_state: req.headers.get(context::TRACESTATE).cloned(),
            port: authority_port(authority),
            attempts: 0,
            attempt: None,
        };
        Self {
            log_ids: inbound.then_some((trace_id, span_id)),
            outgoing: Some(Outgoing {
                trace_id,
                span_id,
                sampled: true,
                format,
                parent,
            }),
            recording: Some(Box::new(recording)),
        }
    }

    /// Whether spans are recorded for this request.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// The trace and span ids for the access log, as hex.
    pub fn log_ids(&self) -> Option<(Hex<32>, Hex<16>)> {
        self.log_ids
            .map(|(trace, span)| (Hex::of(&trace), Hex::of(&span)))
    }

    /// Outbound: the port the request was sent to (the service's), when it is known exactly
    /// (the original destination, or the authority's).
    pub fn destination_port(&mut self, port: u16) {
        if let Some(r) = &mut self.recording {
            r.port = port;
        }
    }

    /// Outbound: an attempt to `endpoint` begins; it gets a span of its own, whose id the
    /// upstream request carries. An attempt still open (Pingora retried without reporting
    /// it) is ended first.
    pub fn begin_attempt(&mut self, exporter: &Exporter, endpoint: SocketAddr, hop: &Hop<'_>) {
        let Some(r) = self.recording.as_deref_mut() else {
            return;
        };
        if r.attempt.is_some() {
            self.end_attempt(
                exporter,
                hop,
                End {
                    status: 0,
                    error: Some(ErrorType::Named("abandoned")),
                },
            );
        }
        let Some(r) = self.recording.as_deref_mut() else {
            return;
        };
        let span_id = random_span_id();
        r.attempts += 1;
        r.attempt = Some(Attempt {
            span_id,
            start: SystemTime::now(),
            number: r.attempts,
            endpoint,
            status: 0,
        });
        if let Some(out) = &mut self.outgoing {
            out.span_id = span_id;
            self.log_ids = Some((out.trace_id, span_id));
        }
    }

    /// Outbound: the attempt's response head arrived with `status`.
    pub fn attempt_response(&mut self, status: u16) {
        if let Some(attempt) = self
            .recording
            .as_deref_mut()
            .and_then(|r| r.attempt.as_mut())
        {
            attempt.status = status;
        }
    }

    /// Outbound: the attempt in progress ended (a retry follows, or it failed).
    pub fn end_attempt(&mut self, exporter: &Exporter, hop: &Hop<'_>, end: End) {
        let Some(r) = self.recording.as_deref_mut() else {
            return;
        };
        let Some(attempt) = r.attempt.take() else {
            return;
        };
        let status = if end.status == 0 {
            attempt.status
        } else {
            end.status
        };
        let trace_id = self.outgoing.map_or([0; 16], |o| o.trace_id);
        exporter.record(r.record(
            trace_id,
            attempt.span_id,
            attempt.start,
            hop,
            Some(attempt.endpoint),
            attempt.number,
            End { status, ..end },
        ));
    }

    /// The request is over: ends the open attempt (outbound) or the SERVER span (inbound).
    /// An outbound request that never reached an attempt (the policy refused it, no endpoint)
    /// still gets one CLIENT span, so a refusal shows in its trace.
    pub fn finish(&mut self, exporter: &Exporter, hop: &Hop<'_>, end: End) {
        let Some(r) = self.recording.as_deref() else {
            return;
        };
        let trace_id = self.outgoing.map_or([0; 16], |o| o.trace_id);
        match r.kind {
            Kind::Client if r.attempt.is_some() => self.end_attempt(exporter, hop, end),
            Kind::Client if r.attempts == 0 => {
                let span_id = random_span_id();
                exporter.record(r.record(trace_id, span_id, r.start, hop, None, 0, end));
                self.log_ids = Some((trace_id, span_id));
            }
            Kind::Client => {}
            Kind::Server => {
                exporter.record(r.record(trace_id, r.server_span, r.start, hop, r.client, 0, end));
            }
        }
        self.recording = None;
    }

    /// Writes the context onto the upstream request (see the module docs for when).
    pub fn write(&self, req: &mut RequestHeader) -> pingora::Result<()> {
        let Some(out) = &self.outgoing else {
            return Ok(());
        };
        let parent = out.parent.filter(|_| out.sampled);
        match out.format {
            Format::W3c => req.insert_header(
                context::TRACEPARENT,
                context::traceparent(&out.trace_id, &out.span_id, out.sampled),
            ),
            Format::B3Single { short } => req.insert_header(
                context::B3,
                context::b3_single(
                    &out.trace_id,
                    short,
                    &out.span_id,
                    out.sampled,
                    parent.as_ref(),
                ),
            ),
            Format::B3Multi { short } => {
                let trace = if short {
                    context::hex_value::<16>(&out.trace_id[8..])
                } else {
                    context::hex_value::<32>(&out.trace_id)
                };
                req.insert_header(context::B3_TRACE_ID, trace)?;
                req.insert_header(context::B3_SPAN_ID, context::hex_value::<16>(&out.span_id))?;
                if let Some(parent) = parent {
                    req.insert_header(
                        context::B3_PARENT_SPAN_ID,
                        context::hex_value::<16>(&parent),
                    )?;
                }
                req.insert_header(
                    context::B3_SAMPLED,
                    HeaderValue::from_static(if out.sampled { "1" } else { "0" }),
                )
            }
        }
    }
}

impl Recording {
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of one span, named at the call"
    )]
    fn record(
        &self,
        trace_id: TraceId,
        span_id: SpanId,
        start: SystemTime,
        hop: &Hop<'_>,
        peer: Option<SocketAddr>,
        attempt: u32,
        end: End,
    ) -> SpanRecord {
        let (service, port): (Arc<str>, u16) = match self.kind {
            Kind::Server => (
                self.settings.workload.name.clone(),
                hop.port.unwrap_or(self.port),
            ),
            Kind::Client => (Arc::from(hop.service), self.port),
        };
        SpanRecord {
            trace_id,
            span_id,
            parent: self.parent,
            kind: self.kind,
            start,
            end: SystemTime::now(),
            service,
            port,
            route: hop.route.map(Into::into),
            method: self.method.clone(),
            path: self.path.clone(),
            server_address: self.server_address.clone(),
            peer,
            protocol_version: self.protocol_version,
            status: end.status,
            error: end.error,
            attempt,
            policy: hop.policy.filter(|p| !p.is_empty()).map(Into::into),
            peer_identity: hop.peer_identity.filter(|p| !p.is_empty()).map(Into::into),
            trace_state: self.trace_state.clone(),
        }
    }
}

/// The host of an authority (`host[:port]`, `[v6]:port`).
fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// The port of an authority, 80 when it names none.
fn authority_port(authority: &str) -> u16 {
    let after_host = authority
        .rsplit_once(']')
        .map_or(authority, |(_, rest)| rest);
    after_host
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(80)
}

/// How a request that ended is described: `status` as answered, `failed` as the metrics
/// classified it, `error` Pingora's error if any.
pub fn end_of(status: u16, failed: bool, error: Option<&pingora::Error>) -> End {
    let error = if !failed {
        None
    } else if status >= 500 {
        Some(ErrorType::Status(status))
    } else if let Some(e) = error {
        Some(ErrorType::Named(e.etype().as_str()))
    } else if status == 0 {
        Some(ErrorType::Named("no_response"))
    } else {
        Some(ErrorType::Named("grpc_error"))
    };
    End { status, error }
}

#[cfg(test)]
mod tests;
