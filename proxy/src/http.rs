//! The HTTP path: Pingora's proxy, told per request where to go.
//!
//! One [`MeshHttp`] per listener direction. Every request resolves its destination afresh from
//! the connection's original destination (or, when the connection was not redirected by
//! iptables, from its authority) and the config active at that moment, so a config swap applies
//! to the next request even on a kept-alive connection. Headers are forwarded untouched, except
//! that with tracing on the trace context is continued ([`crate::trace`]): `traceparent` (or
//! B3, in the form it came) is rewritten with this proxy's span; `tracestate` passes through.
//!
//! Outbound requests to a configured service go through its [`Policy`](crate::policy::Policy):
//! `upstream_peer` selects the route, backend and endpoint (or refuses with 503 and a header
//! naming why); every attempt's result is reported from `upstream_response_filter` (a response
//! head), `fail_to_connect` and `error_while_proxy` (no response); a failure the policy retries
//! turns into a retryable Pingora error, and the next `upstream_peer` waits out the backoff and
//! sends to the endpoint the decision picked. Timeouts that end a request answer 504.
//!
//! Mutual TLS: an outbound attempt to an endpoint the config names an identity for gets a
//! Pingora mTLS peer ([`crate::tls::OutboundTls::http_peer`]); Pingora pools those connections
//! like any other (its pool key includes the SNI and our certificate's serial). Inbound, the
//! peer's identity comes from the terminated connection's TLS digest. Both go into the access
//! log (`peer_identity`, `connection_security_policy`).
//!
//! Inbound, `request_filter` is the gate (`MeshHttp::admit_inbound`): with one load of the
//! active config it applies the strict mode's plaintext refusal, lets the pod's kubelet probes
//! through, and authorizes the request ([`crate::authz`]); a denial is answered there (403
//! naming the policy, or gRPC's trailers-only `grpc-status: 7`), keeping the client connection
//! when no request body is left unread. The decision goes into the access log (`authz_decision`,
//! `authz_policy`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::ErrorType::{self, HTTPStatus};
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error as PingoraError, ErrorSource, Result as PingoraResult, RetryType};
use tandem_crds::contract::{DefaultPolicy, Protocol, Request};
use tandem_crds::names::DENIED_BY_HEADER;

use crate::access_log;
use crate::authz::{self, Verdict};
use crate::detect::redirected_destination;
use crate::metrics::mesh::GrpcStatus;
use crate::metrics::{AuthzProtocol, ResponseFlags, SecurityPolicy, Sym};
use crate::metrics::{
    Direction, Labels, Peer, Reporter, RequestProtocol, ServiceLabels, ServiceTelemetry,
};
use crate::policy::{Decision, Outcome, Refusal, RequestBody, RetryDecision};
use crate::server::Shared;
use crate::telemetry::{self, LabelTable, RequestFacts};
use crate::tls::PeerIdentity;
use crate::trace::span::ErrorType as SpanError;
use crate::trace::{End, Hop, RequestTrace};

/// How many requests one upstream h2c connection carries at once (also what `maxConnections`
/// counts an HTTP/2 connection as).
const H2_STREAMS: usize = crate::policy::STREAMS_PER_H2_CONNECTION as usize;

/// The proxy logic for one direction.
pub struct MeshHttp {
    direction: Direction,
    shared: Arc<Shared>,
}

impl MeshHttp {
    /// The HTTP logic of the `direction` listener.
    pub fn new(direction: Direction, shared: Arc<Shared>) -> Self {
        Self { direction, shared }
    }
}

/// Per-request state, filled when the destination is resolved and read when logging.
pub struct RequestCtx {
    started: Instant,
    /// The destination's metric series, once resolved.
    telemetry: Option<Arc<ServiceTelemetry>>,
    upstream: Option<SocketAddr>,
    upstream_h2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// The policy's decision, for requests to a configured service.
    decision: Option<Decision>,
    /// Why the policy refused the request, answered as 503 with a header.
    refusal: Option<Refusal>,
    /// The pause before the next attempt, set when a retry was decided.
    backoff: Option<Duration>,
    /// The error now unwinding Pingora's attempt was raised to retry a failed response.
    retrying_response: bool,
    /// Outbound: who the current attempt's endpoint must be, when it goes over mutual TLS.
    peer_tls: Option<Arc<PeerIdentity>>,
    /// Inbound: the authorization decision and what made it.
    authz: Option<Verdict>,
    /// Inbound: where the request is forwarded ([`inbound_upstream`]), found once by the
    /// inbound gate, whose port authorization decides on, and used again to forward.
    inbound_upstream: Option<SocketAddr>,
    /// The trace context and the spans in progress ([`crate::trace`]).
    trace: RequestTrace,
    /// What the standard metrics and the access log say about the peer and the response.
    facts: RequestFacts,
}

/// Where one request goes.
struct Resolved {
    telemetry: Arc<ServiceTelemetry>,
    upstream: SocketAddr,
    h2: bool,
}

fn status(code: u16, why: &'static str) -> Box<PingoraError> {
    PingoraError::explain(HTTPStatus(code), why)
}

impl MeshHttp {
    fn resolve(&self, session: &Session, ctx: &mut RequestCtx) -> PingoraResult<Resolved> {
        let active = self.shared.config.active();
        if let Some(active) = &active {
            ctx.connect_timeout = Duration::from_millis(active.config.defaults.connect_timeout_ms);
            ctx.idle_timeout = Duration::from_millis(active.config.defaults.idle_timeout_ms);
        }
        let downstream_h2 = session.is_http2();
        match self.direction {
            Direction::Outbound => {
                let redirected = session
                    .digest()
                    .and_then(|d| d.socket_digest.as_deref())
                    .and_then(redirected_destination);
                let dst = match redirected {
                    Some(dst) => dst,
                    None => authority_addr(session).ok_or_else(|| {
                        status(
                            400,
                            "no IP:port authority on a connection that was not redirected",
                        )
                    })?,
                };
                ctx.trace.destination_port(dst.port());
                let target = active
                    .as_ref()
                    .and_then(|a| a.destinations.lookup(dst).cloned());
                match target {
                    Some(target) => {
                        let policy = active
                            .as_ref()
                            .and_then(|a| a.policies.for_destination(dst));
                        let upstream = match policy {
                            Some(policy) => select(policy, dst.port(), session, ctx),
                            None => target.pick().ok_or_else(|| {
                                // The same refusal as a policy's: answered with its header,
                                // logged as `refused` and flagged `UH`.
                                ctx.refusal = Some(Refusal::NoEndpoints);
                                status(503, "service has no ready endpoint")
                            }),
                        }
                        .inspect_err(|_| {
                            // A refused request still went to this service: its series and
                            // log line name it (Kiali shows the failing edge). Only here, so
                            // a resolved request clones the handle once.
                            ctx.telemetry = Some(target.telemetry.clone());
                        })?;
                        let h2 = downstream_h2
                            || matches!(target.protocol, Protocol::Http2 | Protocol::Grpc);
                        Ok(Resolved {
                            telemetry: target.telemetry.clone(),
                            upstream,
                            h2,
                        })
                    }
                    None => {
                        self.shared
                            .refuse_loop(dst)
                            .map_err(|why| status(403, why))?;
                        self.shared.unknown_destination(dst);
                        Ok(Resolved {
                            telemetry: self.shared.metrics.passthrough.clone(),
                            upstream: dst,
                            h2: downstream_h2,
                        })
                    }
                }
            }
            Direction::Inbound => {
                // Found by the inbound gate (`request_filter`), which every inbound request
                // passes first.
                let upstream = ctx.inbound_upstream.ok_or_else(|| {
                    status(
                        400,
                        "no authority port on a connection that was not redirected",
                    )
                })?;
                self.shared
                    .refuse_inbound(upstream)
                    .map_err(|why| status(403, why))?;
                Ok(Resolved {
                    telemetry: self.shared.metrics.inbound.clone(),
                    upstream,
                    h2: downstream_h2,
                })
            }
        }
    }
}

impl MeshHttp {
    /// The inbound gate of one request, with one load of the active config: the mTLS mode
    /// (plaintext to a strict workload gets 403 unless it is one of the pod's kubelet probes),
    /// then authorization (the probes always pass; a denial is answered here). Returns whether
    /// a response was sent, as `request_filter` does.
    async fn admit_inbound(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<bool> {
        let active = self.shared.config.active();
        let peer = crate::tls::inbound::peer_of(session.digest());
        ctx.inbound_upstream = inbound_upstream(session);
        let port = ctx.inbound_upstream.map(|u| u.port());
        let req = session.req_header();
        let probe = port.is_some_and(|port| {
            self.shared
                .tls
                .probes
                .allows(port, &req.method, req.uri.path())
        });
        let strict = active
            .as_ref()
            .is_some_and(|a| a.config.workload.mtls == tandem_crds::contract::MtlsMode::Strict);
        if peer.is_none() && strict && !probe {
            self.shared
                .metrics
                .tls
                .refused(crate::metrics::InboundRefusal::Plaintext);
            tracing::info!(
                path = req.uri.path(),
                "Refused a plaintext request to a strict workload (not one of its probes)"
            );
            session.set_keepalive(None);
            session.respond_error(403).await?;
            return Ok(true);
        }
        let grpc = authz::is_grpc(req);
        let protocol = if grpc {
            AuthzProtocol::Grpc
        } else {
            AuthzProtocol::Http
        };
        let Some(active) = active else {
            // No config yet: passthrough, which is the open default.
            self.shared.metrics.authz.open.inc(protocol);
            ctx.authz = Some(Verdict {
                allowed: true,
                policy: authz::PolicyLabel::Fixed(DefaultPolicy::AllUnauthenticated.label()),
            });
            return Ok(false);
        };
        if probe {
            ctx.authz = Some(active.authz.record_probe());
            return Ok(false);
        }
        let Some(port) = port else {
            // Nothing says where the request goes, so nothing can authorize it (and it could
            // not be forwarded either).
            session.set_keepalive(None);
            session.respond_error(400).await?;
            return Ok(true);
        };
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // Decided in a block of its own: the request's facts are borrowed, not `Send`, and
        // must not live across an await.
        let (decision, verdict) = {
            let facts = authz::RequestFacts(req);
            let request = Request {
                port,
                caller: authz::caller(peer, client),
                http: Some(&facts),
            };
            active.authz.authorize(&request, protocol)
        };
        ctx.authz = Some(verdict);
        if decision.allowed {
            return Ok(false);
        }
        let denied_by = active.authz.denied_by(decision.by, port);
        let caller = authz::caller_name(peer);
        tracing::info!(
            policy = %denied_by,
            caller,
            client = ?client,
            port,
            method = req.method.as_str(),
            path = req.uri.path(),
            "Request denied"
        );
        let denial = Denial {
            denied_by: &denied_by,
            caller,
            method: req.method.as_str(),
            path: req.uri.path(),
            port,
        };
        let response = if grpc {
            denial.grpc(session.is_http2())
        } else {
            denial.http()
        };
        // Linkerd's rule: the client's connection survives a denial when nothing of the request
        // is left to read; an unread body would have to be drained first, so close instead.
        if !session.is_body_empty() {
            session.set_keepalive(None);
        }
        let (header, body) = response?;
        let end = body.is_none();
        session.write_response_header(Box::new(header), end).await?;
        if let Some(body) = body {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }
}

/// Where an inbound request is forwarded: the address the peer asked for (the pod IP and
/// port, from the redirect), or on a connection that was not redirected the loopback at the
/// authority's port.
fn inbound_upstream(session: &Session) -> Option<SocketAddr> {
    let redirected = session
        .digest()
        .and_then(|d| d.socket_digest.as_deref())
        .and_then(redirected_destination);
    redirected.or_else(|| {
        let port = authority_addr(session)
            .map(|a| a.port())
            .or_else(|| authority_port(session))?;
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    })
}

/// An authorization denial, before it is written.
struct Denial<'a> {
    denied_by: &'a str,
    caller: &'a str,
    method: &'a str,
    path: &'a str,
    port: u16,
}

impl Denial<'_> {
    /// HTTP 403 with `tandem-denied-by` and a text body saying who may not do what.
    fn http(&self) -> PingoraResult<(ResponseHeader, Option<Bytes>)> {
        let body = authz::denial_body(
            self.denied_by,
            self.caller,
            self.method,
            self.path,
            self.port,
        );
        let mut response = ResponseHeader::build(403, Some(4))?;
        response.insert_header(DENIED_BY_HEADER, self.denied_by)?;
        response.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        response.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        Ok((response, Some(Bytes::from(body))))
    }

    /// gRPC's trailers-only response: HTTP 200, `grpc-status: 7` (PERMISSION_DENIED) and a
    /// `grpc-message` naming the policy, in the one header block that ends the stream.
    fn grpc(&self, h2: bool) -> PingoraResult<(ResponseHeader, Option<Bytes>)> {
        let message = authz::grpc_message(self.denied_by, self.caller, self.path, self.port);
        let mut response = ResponseHeader::build(200, Some(5))?;
        response.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
        response.insert_header("grpc-status", GRPC_PERMISSION_DENIED)?;
        response.insert_header("grpc-message", message)?;
        response.insert_header(DENIED_BY_HEADER, self.denied_by)?;
        if !h2 {
            // HTTP/1 has no trailers-only form: an empty body, delimited.
            response.insert_header(http::header::CONTENT_LENGTH, "0")?;
        }
        Ok((response, None))
    }
}

/// gRPC's status code PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: &str = "7";

/// Asks the service's policy where the request goes; keeps the decision in the context.
fn select(
    policy: &Arc<crate::policy::Policy>,
    port: u16,
    session: &Session,
    ctx: &mut RequestCtx,
) -> PingoraResult<SocketAddr> {
    match policy.select(port, session.req_header()) {
        Ok(decision) => {
            let upstream = decision
                .endpoint()
                .ok_or_else(|| status(503, "no endpoint chosen"))?;
            ctx.connect_timeout = decision.connect_timeout();
            ctx.idle_timeout = decision.idle_timeout();
            ctx.decision = Some(decision);
            Ok(upstream)
        }
        Err(refusal) => {
            ctx.refusal = Some(refusal);
            Err(status(refusal.status(), "refused by the service's policy"))
        }
    }
}

/// Whether the request body can be sent again: Pingora keeps up to 64 KiB of it for retries,
/// the same bound as the policy's.
fn replay(session: &Session) -> RequestBody {
    if session.as_ref().retry_buffer_truncated() {
        RequestBody::TooLarge
    } else {
        RequestBody::Replayable
    }
}

/// Reports an attempt that got no usable response and decides whether to retry it.
fn after_failure(ctx: &mut RequestCtx, outcome: Outcome, body: RequestBody) -> bool {
    let Some(decision) = ctx.decision.as_mut() else {
        return false;
    };
    decision.on_attempt_result(outcome);
    retry_decided(decision, body, &mut ctx.backoff)
}

/// Asks the decision whether to retry; records the backoff when it says yes.
fn retry_decided(
    decision: &mut Decision,
    body: RequestBody,
    backoff: &mut Option<Duration>,
) -> bool {
    match decision.should_retry(body) {
        RetryDecision::Retry { backoff: pause } => {
            *backoff = Some(pause);
            tracing::debug!(
                route = decision.route_name(),
                attempt = decision.attempts(),
                endpoint = ?decision.endpoint(),
                backoff_ms = pause.as_millis(),
                "Retrying"
            );
            true
        }
        RetryDecision::Stop(reason) => {
            tracing::debug!(
                route = decision.route_name(),
                reason = reason.as_str(),
                "Not retrying"
            );
            false
        }
    }
}

/// A peer for `upstream` with the request's timeouts.
/// The attempt's peer: `mtls` (an mTLS peer for a meshed endpoint) or plaintext, with the
/// request's timeouts and HTTP version.
fn peer(upstream: SocketAddr, ctx: &RequestCtx, mtls: Option<HttpPeer>) -> Box<HttpPeer> {
    let mut peer = mtls.unwrap_or_else(|| HttpPeer::new(upstream, false, String::new()));
    peer.options.connection_timeout = Some(ctx.connect_timeout);
    peer.options.idle_timeout = Some(ctx.idle_timeout);
    if let Some(decision) = &ctx.decision {
        // Bounds the wait for each read: the per-try timeout, cut to what is left of the
        // request timeout.
        peer.options.read_timeout = decision.attempt_timeout();
    }
    if ctx.upstream_h2 {
        peer.options.set_http_version(2, 2);
        peer.options.max_h2_streams = H2_STREAMS;
    }
    Box::new(peer)
}

impl MeshHttp {
    /// The peer of a retry: after the backoff, the endpoint the decision picked.
    async fn retry_peer(&self, ctx: &mut RequestCtx) -> PingoraResult<Box<HttpPeer>> {
        if let Some(pause) = ctx.backoff.take() {
            tokio::time::sleep(pause).await;
        }
        let Some(decision) = ctx.decision.as_ref() else {
            return Err(status(503, "no decision to retry"));
        };
        if decision.time_left() == Some(Duration::ZERO) {
            return Err(PingoraError::explain(
                ErrorType::ReadTimedout,
                "request timeout before the retry",
            ));
        }
        let upstream = decision
            .endpoint()
            .ok_or_else(|| status(503, "no endpoint left to retry"))?;
        ctx.upstream = Some(upstream);
        Ok(self.peer(upstream, ctx))
    }

    /// The attempt's peer, in mutual TLS when outbound to an endpoint with an identity (and
    /// this proxy has one); records whom it must reach.
    fn peer(&self, upstream: SocketAddr, ctx: &mut RequestCtx) -> Box<HttpPeer> {
        ctx.peer_tls = None;
        let mtls = match self.direction {
            Direction::Outbound => self.mtls_peer(upstream, ctx),
            Direction::Inbound => None,
        };
        peer(upstream, ctx, mtls)
    }

    fn mtls_peer(&self, upstream: SocketAddr, ctx: &mut RequestCtx) -> Option<HttpPeer> {
        let active = self.shared.config.active()?;
        let identity = active.identities.get(upstream)?;
        let peer = self.shared.tls.outbound.http_peer(upstream, identity)?;
        ctx.peer_tls = Some(identity.clone());
        Some(peer)
    }
}

/// Tracing's hooks: small, the logic is in [`crate::trace`].
impl MeshHttp {
    /// Reads the request's trace context and decides whether it is sampled.
    fn begin_trace(&self, session: &Session) -> RequestTrace {
        let settings = self.shared.config.active().and_then(|a| a.tracing.clone());
        if settings.is_none() && !self.shared.access_log.enabled() {
            // Tracing off and no log to show the incoming ids in: nothing to read.
            return RequestTrace::default();
        }
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        RequestTrace::begin(
            settings.as_ref(),
            self.direction == Direction::Inbound,
            session.req_header(),
            session.is_http2(),
            client,
        )
    }

    /// Runs `f` on a sampled request's trace with where the request went; nothing otherwise.
    fn traced(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        f: impl FnOnce(&mut RequestTrace, &crate::trace::export::Exporter, &Hop<'_>),
    ) {
        if !ctx.trace.is_recording() {
            return;
        }
        // Taken out for the call, so the hop can borrow the rest of the context.
        let mut trace = std::mem::take(&mut ctx.trace);
        f(&mut trace, &self.shared.tracer, &self.hop(session, ctx));
        ctx.trace = trace;
    }

    /// Outbound: an attempt to `endpoint` begins (its own CLIENT span).
    fn trace_attempt(&self, session: &Session, endpoint: Option<SocketAddr>, ctx: &mut RequestCtx) {
        if let (Direction::Outbound, Some(endpoint)) = (self.direction, endpoint) {
            self.traced(session, ctx, |trace, exporter, hop| {
                trace.begin_attempt(exporter, endpoint, hop);
            });
        }
    }

    /// Outbound: the attempt in progress ended without a response the client will get.
    fn end_attempt(&self, session: &Session, ctx: &mut RequestCtx, status: u16, error: SpanError) {
        self.traced(session, ctx, |trace, exporter, hop| {
            trace.end_attempt(
                exporter,
                hop,
                End {
                    status,
                    error: Some(error),
                },
            );
        });
    }

    /// The mutual-TLS peer of this hop: the upstream's certificate on outbound, the
    /// client's on inbound; `None` for plaintext.
    fn peer_identity<'c>(
        &self,
        session: &'c Session,
        ctx: &'c RequestCtx,
    ) -> Option<&'c PeerIdentity> {
        match self.direction {
            Direction::Outbound => ctx.peer_tls.as_deref(),
            Direction::Inbound => crate::tls::inbound::peer_of(session.digest()),
        }
    }

    /// Where the request went, as its spans name it.
    fn hop<'c>(&'c self, session: &'c Session, ctx: &'c RequestCtx) -> Hop<'c> {
        let policy = match self.direction {
            Direction::Outbound => ctx.refusal.map(|r| r.header().1),
            Direction::Inbound => ctx.authz.as_ref().map(|v| v.policy.as_str()),
        };
        let peer_identity = self.peer_identity(session, ctx).map(|p| &*p.uri);
        Hop {
            service: self.telemetry(ctx).label(),
            route: ctx
                .decision
                .as_ref()
                .map(Decision::route_name)
                .filter(|r| *r != crate::policy::DEFAULT_ROUTE),
            policy,
            peer_identity,
            port: ctx.inbound_upstream.map(|u| u.port()),
        }
    }
}

impl MeshHttp {
    /// The standard metrics' labels of a finished request ([`crate::telemetry`] says where
    /// each comes from).
    fn standard_labels(
        &self,
        session: &Session,
        error: Option<&PingoraError>,
        ctx: &RequestCtx,
        status: u16,
    ) -> Labels {
        let mesh = &self.shared.metrics.mesh;
        let table = self.shared.label_table();
        let decision = ctx.decision.as_ref();
        let mtls = self.peer_identity(session, ctx).is_some();
        let (reporter, source, destination, service) = match self.direction {
            Direction::Outbound => {
                let service = self.routed_service(ctx, &table).0;
                let (source, destination) = (table.own(mtls), table.endpoint(ctx.upstream, mtls));
                (Reporter::Source, source, destination, service)
            }
            Direction::Inbound => {
                let source = ctx.facts.source.unwrap_or_else(Peer::unknown);
                let service = ctx.facts.service.unwrap_or_else(ServiceLabels::unknown);
                (Reporter::Destination, source, table.own(mtls), service)
            }
        };
        let grpc = authz::is_grpc(session.req_header());
        let grpc_status = grpc.then(|| {
            ctx.facts.grpc_trailer.unwrap_or_else(|| {
                let header = session
                    .response_written()
                    .and_then(|r| r.headers.get("grpc-status"));
                telemetry::grpc_status(header.map(|v| v.as_bytes()), status)
            })
        });
        let route = decision
            .and_then(Decision::matched_route)
            .map_or_else(Sym::unknown, |r| mesh.interner.intern(r));
        Labels {
            reporter,
            source,
            destination,
            service,
            protocol: if grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            response_code: status,
            grpc_status: GrpcStatus(grpc_status),
            flags: ResponseFlags::of(
                ctx.refusal,
                decision.and_then(Decision::last_outcome),
                decision.and_then(Decision::retry_stopped),
                error,
            ),
            security: if mtls {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
            route: Some(route),
        }
    }

    /// The service an outbound request went to (the split's backend when it is another one
    /// than the service addressed) and the peer header of requests to it.
    fn routed_service<'c>(
        &'c self,
        ctx: &'c RequestCtx,
        table: &'c LabelTable,
    ) -> (ServiceLabels, Option<&'c http::HeaderValue>) {
        let backend = ctx
            .decision
            .as_ref()
            .filter(|d| d.backend() != d.service())
            .and_then(|d| table.service(d.backend()));
        match backend {
            Some(routed) => (routed.labels, routed.peer_header.as_ref()),
            None => {
                let own = self.telemetry(ctx);
                (own.service(), own.peer_header())
            }
        }
    }

    /// The peer header of an outbound attempt: only towards a meshed endpoint, whose proxy
    /// strips it (anyone else would see the caller's name).
    fn peer_header(&self, ctx: &RequestCtx) -> Option<http::HeaderValue> {
        let upstream = ctx.upstream?;
        let active = self.shared.config.active()?;
        if !active.labels.meshed(upstream) {
            return None;
        }
        self.routed_service(ctx, &active.labels).1.cloned()
    }
}

impl MeshHttp {
    /// The request's metric series: its destination's, or `unknown` when none was resolved.
    fn telemetry<'c>(&'c self, ctx: &'c RequestCtx) -> &'c ServiceTelemetry {
        ctx.telemetry
            .as_deref()
            .unwrap_or_else(|| self.shared.metrics.unknown(self.direction))
    }
}

/// The status answered when proxying failed: Pingora's mapping, except that a timeout of a
/// request governed by a policy is a 504 (the request or per-try timeout fired).
fn error_status(e: &PingoraError, governed: bool) -> u16 {
    match e.etype() {
        HTTPStatus(code) => *code,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout if governed => 504,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// An empty response with one extra header (`x-tandem-overflow: max-requests`).
async fn respond_with_header(
    session: &mut Session,
    code: u16,
    name: &'static str,
    value: &'static str,
) -> PingoraResult<()> {
    let mut response = ResponseHeader::build(code, Some(2))?;
    response.insert_header(name, value)?;
    response.insert_header(http::header::CONTENT_LENGTH, "0")?;
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(response), true)
        .await
}

/// The request's authority (`:authority` or `Host`) as an IP address and port (80 by default).
fn authority_addr(session: &Session) -> Option<SocketAddr> {
    let authority = authority(session)?;
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Some(addr);
    }
    authority
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 80))
}

/// The port of a host-name authority (`name:port`).
fn authority_port(session: &Session) -> Option<u16> {
    let authority = authority(session)?;
    match authority.rsplit_once(':') {
        Some((_, port)) => port.parse().ok(),
        None => Some(80),
    }
}

fn authority(session: &Session) -> Option<&str> {
    let req = session.req_header();
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str());
    }
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// Largest request header section accepted (names and values), as Envoy's 60 KiB default;
/// Pingora itself would buffer up to 1 MiB.
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;

/// Size of a header section: names and values.
pub fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

/// A request whose body length two parsers could read differently (request smuggling): both
/// `Content-Length` and `Transfer-Encoding`, or more than one `Content-Length`. RFC 9112 §6.3
/// allows rejecting the first and requires rejecting conflicting lengths. (Pingora's parser
/// already drops `Content-Length` when `Transfer-Encoding` is present and closes the connection
/// after the response; this check is the proxy's own line, independent of that.)
pub fn ambiguous_framing(headers: &http::HeaderMap) -> Option<&'static str> {
    let lengths = headers.get_all(http::header::CONTENT_LENGTH);
    let count = lengths.iter().count();
    if count > 0 && headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Some("Content-Length with Transfer-Encoding");
    }
    if count > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
        return Some("more than one Content-Length");
    }
    None
}

fn header<'a>(session: &'a Session, name: &str) -> &'a str {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[async_trait]
impl ProxyHttp for MeshHttp {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            telemetry: None,
            upstream: None,
            upstream_h2: false,
            connect_timeout: Duration::from_millis(
                tandem_crds::contract::DEFAULT_CONNECT_TIMEOUT_MS,
            ),
            idle_timeout: Duration::from_millis(tandem_crds::contract::DEFAULT_IDLE_TIMEOUT_MS),
            decision: None,
            refusal: None,
            backoff: None,
            retrying_response: false,
            peer_tls: None,
            authz: None,
            inbound_upstream: None,
            trace: RequestTrace::default(),
            facts: RequestFacts::default(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<bool> {
        ctx.trace = self.begin_trace(session);
        if self.direction == Direction::Inbound {
            // First, so that even a denied request is labelled with its caller.
            ctx.facts = telemetry::take_inbound_facts(session, &self.shared.metrics.mesh.interner);
            if self.admit_inbound(session, ctx).await? {
                return Ok(true);
            }
        }
        let headers = &session.req_header().headers;
        let refusal = if header_bytes(headers) > MAX_REQUEST_HEADER_BYTES {
            Some((431, "request headers too large"))
        } else if session.is_http2() {
            None
        } else {
            ambiguous_framing(headers).map(|why| (400, why))
        };
        let Some((code, why)) = refusal else {
            return Ok(false);
        };
        tracing::warn!(
            direction = self.direction.as_str(),
            status = code,
            reason = why,
            "Refused a request"
        );
        // The rest of the connection cannot be trusted: answer and close.
        session.set_keepalive(None);
        session.respond_error(code).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<Box<HttpPeer>> {
        if ctx.decision.is_some() {
            let peer = self.retry_peer(ctx).await?;
            let endpoint = ctx.upstream;
            self.trace_attempt(session, endpoint, ctx);
            return Ok(peer);
        }
        let resolved = self.resolve(session, ctx)?;
        ctx.telemetry = Some(resolved.telemetry);
        ctx.upstream = Some(resolved.upstream);
        ctx.upstream_h2 = resolved.h2;
        let peer = self.peer(resolved.upstream, ctx);
        self.trace_attempt(session, Some(resolved.upstream), ctx);
        Ok(peer)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<()> {
        if !reused && let Some(peer) = &ctx.peer_tls {
            self.shared.tls.outbound.http_connected(peer);
        }
        if let Some(decision) = ctx.decision.as_mut() {
            decision.on_connected();
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<()> {
        if self.direction == Direction::Outbound
            && let Some(value) = self.peer_header(ctx)
        {
            upstream_request.insert_header(telemetry::PEER_HEADER, value)?;
        }
        ctx.trace.write(upstream_request)
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        upstream_trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<()> {
        ctx.facts.grpc_trailer = upstream_trailers
            .get("grpc-status")
            .map(|v| telemetry::grpc_status(Some(v.as_bytes()), 200));
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<PingoraError>,
    ) -> Box<PingoraError> {
        self.end_attempt(session, ctx, 0, SpanError::Named("connect_failure"));
        if ctx.peer_tls.is_some() {
            self.shared.tls.outbound.http_failed(&e);
        }
        if ctx.decision.is_some() {
            // Nothing reached the endpoint, so the body is intact whatever its size.
            let retry = after_failure(ctx, Outcome::ConnectFailure, RequestBody::Replayable);
            e.set_retry(retry);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> PingoraResult<()> {
        let code = upstream_response.status.as_u16();
        if code >= 200 {
            ctx.trace.attempt_response(code);
        }
        let Some(decision) = ctx.decision.as_mut() else {
            return Ok(());
        };
        // Interim responses (100 Continue) are not the attempt's result.
        if code < 200 || decision.attempt().is_none() {
            return Ok(());
        }
        decision.on_attempt_result(Outcome::Response(code));
        if !retry_decided(decision, replay(session), &mut ctx.backoff) {
            return Ok(());
        }
        // Unwind this attempt before anything reaches the client; `error_while_proxy` sees the
        // flag and lets Pingora call `upstream_peer` again.
        ctx.retrying_response = true;
        self.end_attempt(session, ctx, code, SpanError::Status(code));
        let mut e = PingoraError::explain(HTTPStatus(code), "retrying a failed response");
        e.set_retry(true);
        Err(e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<PingoraError>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<PingoraError> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if std::mem::take(&mut ctx.retrying_response) {
            e.set_retry(true);
            return e;
        }
        let failure = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
            _ => "reset",
        };
        self.end_attempt(session, ctx, 0, SpanError::Named(failure));
        let body = replay(session);
        let Some(decision) = ctx.decision.as_ref() else {
            // Pingora's own rule: retry only a pooled connection that turned out stale.
            if !session.req_header().method.is_idempotent() || body == RequestBody::TooLarge {
                e.set_retry(false);
            } else {
                e.retry.decide_reuse(client_reused);
            }
            return e;
        };
        if decision.attempt().is_none() {
            // The response head was accepted and sent on: nothing can be retried now.
            e.set_retry(false);
            return e;
        }
        if client_reused
            && body == RequestBody::Replayable
            && matches!(e.retry, RetryType::ReusedOnly)
        {
            // A pooled connection the endpoint had already closed: the endpoint did nothing
            // wrong, so send the same attempt again on a new connection.
            e.set_retry(true);
            return e;
        }
        let outcome = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Outcome::Timeout,
            _ => Outcome::Reset,
        };
        let retry = after_failure(ctx, outcome, body);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &PingoraError,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = if let Some(refusal) = ctx.refusal {
            let (name, value) = refusal.header();
            if let Err(err) = respond_with_header(session, refusal.status(), name, value).await {
                tracing::debug!(error = %err, "Could not answer a refused request");
            }
            return FailToProxy {
                error_code: refusal.status(),
                can_reuse_downstream: false,
            };
        } else {
            error_status(e, ctx.decision.is_some())
        };
        if code > 0
            && let Err(err) = session.respond_error(code).await
        {
            tracing::debug!(error = %err, "Could not send the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        error: Option<&PingoraError>,
        ctx: &mut RequestCtx,
    ) {
        let elapsed = ctx.started.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let labels = self.standard_labels(session, error, ctx, status);
        self.shared.metrics.mesh.record_request(
            &labels,
            elapsed,
            session.body_bytes_read() as u64,
            session.body_bytes_sent() as u64,
        );
        // The span's status follows the metrics' reading of the exchange: a failure is an
        // error, no response, a 5xx or a gRPC status other than OK (trailers included).
        let grpc_failed = labels.grpc_status.0.is_some_and(|code| code != 0);
        let failed = error.is_some() || status == 0 || status >= 500 || grpc_failed;
        let end = crate::trace::end_of(status, failed, error);
        self.traced(session, ctx, |trace, exporter, hop| {
            trace.finish(exporter, hop, end);
        });
        let telemetry = self.telemetry(ctx);
        let attempts = ctx.decision.as_ref().map(Decision::attempts);
        if let Some(attempts) = attempts {
            telemetry.attempts(attempts);
        }
        let log = &self.shared.access_log;
        if !log.enabled() {
            return;
        }
        let req = session.req_header();
        let peer = self.peer_identity(session, ctx);
        let trace_ids = ctx.trace.log_ids();
        log.write(&access_log::Entry {
            direction: self.direction.as_str(),
            dst_service: telemetry.label(),
            method: req.method.as_str(),
            authority: authority(session).unwrap_or(""),
            path: req.uri.path(),
            status,
            upstream: ctx.upstream,
            upstream_protocol: if ctx.upstream_h2 { "h2" } else { "http/1.1" },
            route: ctx.decision.as_ref().map_or("", |d| d.route_name()),
            attempts: attempts.unwrap_or(u32::from(ctx.upstream.is_some())),
            refused: ctx.refusal.map_or("", |r| r.header().1),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            traceparent: header(session, "traceparent"),
            trace_id: trace_ids.as_ref().map_or("", |(t, _)| t.as_str()),
            span_id: trace_ids.as_ref().map_or("", |(_, s)| s.as_str()),
            peer_identity: peer.map_or("", |p| &p.uri),
            connection_security_policy: labels.security.as_str(),
            source_workload: labels.source.workload.as_str(),
            source_namespace: labels.source.namespace.as_str(),
            destination_workload: labels.destination.workload.as_str(),
            destination_namespace: labels.destination.namespace.as_str(),
            authz_decision: ctx.authz.as_ref().map_or("", Verdict::decision),
            authz_policy: ctx.authz.as_ref().map_or("", |v| v.policy.as_str()),
            error: error.map(|e| e as &dyn std::fmt::Display),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, http::HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn length_with_chunked_is_ambiguous() {
        let h = headers(&[("content-length", "4"), ("transfer-encoding", "chunked")]);
        assert!(ambiguous_framing(&h).is_some());
    }

    #[test]
    fn two_lengths_are_ambiguous() {
        assert!(
            ambiguous_framing(&headers(&[
                ("content-length", "1"),
                ("content-length", "20")
            ]))
            .is_some()
        );
        assert!(ambiguous_framing(&headers(&[("content-length", "1, 20")])).is_some());
    }

    #[test]
    fn one_length_or_chunked_alone_is_fine() {
        assert!(ambiguous_framing(&headers(&[("content-length", "4")])).is_none());
        assert!(ambiguous_framing(&headers(&[("transfer-encoding", "chunked")])).is_none());
    }
}
