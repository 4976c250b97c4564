//! The HTTP path: Pingora's proxy, told per request where to go.
//!
//! One [`MeshHttp`] per listener direction. Every request resolves its destination afresh from
//! the connection's original destination (or, when the connection was not redirected by
//! iptables, from its authority) and the config active at that moment, so a config swap applies
//! to the next request even on a kept-alive connection. Headers are forwarded untouched, W3C
//! `traceparent`/`tracestate` and B3 included.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::ErrorType::HTTPStatus;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error as PingoraError, Result as PingoraResult};
use tandem_crds::contract::Protocol;

use crate::connection::redirected_destination;
use crate::metrics::{Classification, Direction, RequestLabels, ResponseLabels};
use crate::server::Shared;

/// `dst_service` of traffic to a destination the config does not know.
pub const PASSTHROUGH: &str = "passthrough";
/// `dst_service` of inbound traffic.
pub const INBOUND: &str = "inbound";

/// How many requests one upstream h2c connection carries at once. Kept at or below what
/// servers commonly advertise (Pingora's own h2 server: 100) so streams never queue in the pool.
const H2_STREAMS: usize = 100;

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
    dst_service: Arc<str>,
    upstream: Option<SocketAddr>,
    upstream_h2: bool,
    counted: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// Where one request goes.
struct Resolved {
    dst_service: Arc<str>,
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
        let socket = session.digest().and_then(|d| d.socket_digest.clone());
        let redirected = socket.as_deref().and_then(redirected_destination);
        match self.direction {
            Direction::Outbound => {
                let dst = match redirected {
                    Some(dst) => dst,
                    None => authority_addr(session).ok_or_else(|| {
                        status(
                            400,
                            "no IP:port authority on a connection that was not redirected",
                        )
                    })?,
                };
                let target = active
                    .as_ref()
                    .and_then(|a| a.destinations.lookup(dst).cloned());
                match target {
                    Some(target) => {
                        let upstream = target
                            .pick()
                            .ok_or_else(|| status(503, "service has no ready endpoint"))?;
                        let h2 = downstream_h2
                            || matches!(target.protocol, Protocol::Http2 | Protocol::Grpc);
                        Ok(Resolved {
                            dst_service: target.label.clone(),
                            upstream,
                            h2,
                        })
                    }
                    None => {
                        self.shared
                            .refuse_loop(dst)
                            .map_err(|why| status(403, why))?;
                        Ok(Resolved {
                            dst_service: Arc::from(PASSTHROUGH),
                            upstream: dst,
                            h2: downstream_h2,
                        })
                    }
                }
            }
            Direction::Inbound => {
                let upstream = match redirected {
                    // Forward to the address the peer asked for: the pod IP and port.
                    Some(dst) => dst,
                    None => {
                        let port = authority_addr(session)
                            .map(|a| a.port())
                            .or_else(|| authority_port(session))
                            .ok_or_else(|| {
                                status(
                                    400,
                                    "no authority port on a connection that was not redirected",
                                )
                            })?;
                        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
                    }
                };
                self.shared
                    .refuse_inbound(upstream)
                    .map_err(|why| status(403, why))?;
                Ok(Resolved {
                    dst_service: Arc::from(INBOUND),
                    upstream,
                    h2: downstream_h2,
                })
            }
        }
    }
}

impl MeshHttp {
    /// Counts a request once, when its destination is known.
    fn count_request(&self, ctx: &mut RequestCtx) {
        if ctx.counted {
            return;
        }
        ctx.counted = true;
        let labels = RequestLabels {
            direction: self.direction,
            dst_service: ctx.dst_service.to_string(),
        };
        self.shared.metrics.requests.get_or_create(&labels).inc();
    }
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

fn authority(session: &Session) -> Option<String> {
    let req = session.req_header();
    if let Some(a) = req.uri.authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
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
            dst_service: Arc::from(""),
            upstream: None,
            upstream_h2: false,
            counted: false,
            connect_timeout: Duration::from_millis(
                tandem_crds::contract::DEFAULT_CONNECT_TIMEOUT_MS,
            ),
            idle_timeout: Duration::from_millis(tandem_crds::contract::DEFAULT_IDLE_TIMEOUT_MS),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> PingoraResult<bool> {
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
        let resolved = match self.resolve(session, ctx) {
            Ok(r) => r,
            Err(e) => {
                if ctx.dst_service.is_empty() {
                    ctx.dst_service = Arc::from(match self.direction {
                        Direction::Outbound => "unknown",
                        Direction::Inbound => INBOUND,
                    });
                }
                self.count_request(ctx);
                return Err(e);
            }
        };
        ctx.dst_service = resolved.dst_service;
        self.count_request(ctx);
        ctx.upstream = Some(resolved.upstream);
        ctx.upstream_h2 = resolved.h2;
        let mut peer = HttpPeer::new(resolved.upstream, false, String::new());
        peer.options.connection_timeout = Some(ctx.connect_timeout);
        peer.options.idle_timeout = Some(ctx.idle_timeout);
        if resolved.h2 {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = H2_STREAMS;
        }
        Ok(Box::new(peer))
    }

    async fn logging(
        &self,
        session: &mut Session,
        error: Option<&PingoraError>,
        ctx: &mut RequestCtx,
    ) {
        let elapsed = ctx.started.elapsed();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let grpc_failed = session
            .response_written()
            .and_then(|r| r.headers.get("grpc-status"))
            .is_some_and(|v| v.as_bytes() != b"0");
        let classification = if error.is_some() || status == 0 || status >= 500 || grpc_failed {
            Classification::Failure
        } else {
            Classification::Success
        };
        let dst_service = if ctx.dst_service.is_empty() {
            "unknown"
        } else {
            &ctx.dst_service
        };
        let metrics = &self.shared.metrics;
        let labels = RequestLabels {
            direction: self.direction,
            dst_service: dst_service.to_owned(),
        };
        if !ctx.counted {
            metrics.requests.get_or_create(&labels).inc();
        }
        metrics
            .latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        metrics
            .responses
            .get_or_create(&ResponseLabels {
                direction: self.direction,
                dst_service: labels.dst_service,
                status_code: status,
                classification,
            })
            .inc();
        let req = session.req_header();
        tracing::info!(
            target: "tandem::access",
            direction = self.direction.as_str(),
            dst_service,
            method = %req.method,
            authority = authority(session).as_deref().unwrap_or(""),
            path = req.uri.path(),
            status,
            upstream = ctx.upstream.map(|u| u.to_string()).as_deref().unwrap_or(""),
            upstream_protocol = if ctx.upstream_h2 { "h2" } else { "http/1.1" },
            bytes_in = session.body_bytes_read(),
            bytes_out = session.body_bytes_sent(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            traceparent = header(session, "traceparent"),
            error = error.map(|e| e.to_string()).as_deref().unwrap_or(""),
            "request"
        );
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
