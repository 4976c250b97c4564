//! One accepted connection: where it was going, what it speaks, and who handles it.
//!
//! # Detection without stalls
//!
//! When the config does not declare a port's protocol, the first bytes decide. A client that
//! has already sent something is classified at once. A client that has sent nothing yet may be
//! waiting for the server to speak (MySQL, SMTP, …), so the proxy does not wait for it: it
//! connects to the destination immediately and lets whichever side speaks first decide. If the
//! server speaks first, the connection is relayed as opaque TCP with no delay at all; if the
//! client does, its bytes are classified, and an HTTP client goes to the HTTP path (the early
//! upstream connection, which carried no byte, is closed). No timer is ever on the path of a
//! server-first protocol, unlike Linkerd's 10-second detection timeout.
//!
//! A declared protocol (`http`, `http2`, `grpc`, `tcp`) skips detection entirely.
//!
//! # Mutual TLS
//!
//! Inbound, once the client has spoken, a TLS ClientHello is read from peeked bytes
//! ([`crate::tls::hello`]) and the workload's mTLS mode decides ([`crate::tls::admit`]): Tandem's
//! mutual TLS for this proxy is terminated, and the negotiated ALPN names the inner protocol
//! (`h2`, `http/1.1`, `tandem/1` for opaque TCP); anything else passes untouched (permissive) or
//! is closed (strict). A server that speaks first is plaintext by definition. Outbound, opaque
//! TCP to an endpoint the config names an identity for is wrapped in mutual TLS once the
//! destination is chosen; HTTP is secured by Pingora per upstream connection
//! ([`crate::http`]). A server-first protocol on a `detect` port stays plaintext (declare it
//! `tcp` to secure it): the peer proxy cannot see a ClientHello before the server has spoken.
//!
//! # Authorization
//!
//! An inbound connection relayed as opaque TCP (after detection, server-first, or Tandem's
//! mutual TLS with ALPN `tandem/1`) is authorized once, before a byte is relayed
//! ([`crate::authz`], no HTTP facts); a denied one is closed, and with it the early upstream
//! connection, which carried nothing. HTTP is authorized per request ([`crate::http`]).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::SocketDigest;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as PingoraStream;
use pingora::protocols::{ALPN, GetSocketDigest, Ssl};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tandem_crds::contract::{MtlsMode, Protocol, Request};
use tandem_crds::identity::ALPN_TCP;
use tokio::net::TcpStream;

use crate::authz;
use crate::detect::{Detected, PROBE_LEN, classify, redirected_destination};
use crate::http::MeshHttp;
use crate::metrics::{
    AuthzProtocol, ConnProtocol, ConnectionTelemetry, Direction, InboundRefusal, SecurityPolicy,
    ServiceTelemetry,
};
use crate::relay::{relay, relay_streams};
use crate::server::Shared;
use crate::tls::{Admission, PeerIdentity, admit, hello};

/// How long a client that sent a prefix of an HTTP method may take to send the rest before
/// its connection is relayed as opaque TCP. Only reached by a client that has already spoken.
const DETECT_MORE: Duration = Duration::from_millis(500);

/// How long a kept-alive HTTP/1 client connection may idle between requests (Pingora's default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// What one listener needs to serve its connections.
pub struct Listener {
    /// Which listener this is.
    pub direction: Direction,
    /// Config, metrics, own addresses.
    pub shared: Arc<Shared>,
    /// Pingora's HTTP/1.x proxy for this direction.
    pub h1: Arc<HttpProxy<MeshHttp>>,
    /// Pingora's HTTP/2 (h2c) proxy for this direction.
    pub h2: Arc<HttpProxy<MeshHttp>>,
    /// Flips to `true` on shutdown: HTTP/1 stops keep-alive, HTTP/2 sends GOAWAY.
    pub shutdown: ShutdownWatch,
}

/// What to do with a connection before reading anything from it.
#[derive(Debug)]
enum Plan {
    /// Close it, for this reason.
    Refuse(&'static str),
    /// Relay as opaque TCP to this address.
    Relay {
        upstream: SocketAddr,
        label: Arc<ServiceTelemetry>,
    },
    /// HTTP/1.x, declared (counted per request).
    Http1,
    /// HTTP/2, declared (counted per request).
    Http2,
    /// Detect from the first bytes; `eager` is where to connect if the client stays silent.
    Detect {
        eager: Option<SocketAddr>,
        label: Arc<ServiceTelemetry>,
    },
}

impl Listener {
    fn plan(&self, destination: Option<SocketAddr>) -> Plan {
        let Some(dst) = destination else {
            // Not redirected: only HTTP can say where it is going (its authority).
            return Plan::Detect {
                eager: None,
                label: self.shared.metrics.unresolved(self.direction).clone(),
            };
        };
        match self.direction {
            Direction::Outbound => {
                let active = self.shared.config.active();
                let Some(target) = active.as_ref().and_then(|a| a.destinations.lookup(dst)) else {
                    if let Err(why) = self.shared.refuse_loop(dst) {
                        return Plan::Refuse(why);
                    }
                    self.shared.unknown_destination(dst);
                    return Plan::Relay {
                        upstream: dst,
                        label: self.shared.metrics.passthrough.clone(),
                    };
                };
                let label = target.telemetry.clone();
                match target.protocol {
                    Protocol::Http => Plan::Http1,
                    Protocol::Http2 | Protocol::Grpc => Plan::Http2,
                    Protocol::Tcp => match target.pick() {
                        Some(upstream) => Plan::Relay { upstream, label },
                        None => Plan::Refuse("service has no ready endpoint"),
                    },
                    Protocol::Detect => match target.pick() {
                        Some(upstream) => Plan::Detect {
                            eager: Some(upstream),
                            label,
                        },
                        None => Plan::Detect { eager: None, label },
                    },
                }
            }
            Direction::Inbound => match self.shared.refuse_inbound(dst) {
                Err(why) => Plan::Refuse(why),
                Ok(()) => Plan::Detect {
                    eager: Some(dst),
                    label: self.shared.metrics.inbound.clone(),
                },
            },
        }
    }

    /// Serves one accepted connection to the end.
    pub async fn serve(self: Arc<Self>, client: TcpStream) {
        let _in_flight = self.shared.tracker.enter();
        let _ = client.set_nodelay(true);
        let socket = SocketDigest::from_raw_fd(client.as_raw_fd());
        let destination = redirected_destination(&socket);
        let peer = client.peer_addr().ok();
        match self.plan(destination) {
            Plan::Refuse(why) => {
                tracing::warn!(
                    direction = self.direction.as_str(),
                    ?peer,
                    ?destination,
                    reason = why,
                    "Connection refused"
                );
            }
            Plan::Relay { upstream, label } => {
                let connect_timeout = self.shared.connect_timeout();
                match connect(upstream, connect_timeout).await {
                    Ok(up) => self.relay(client, up, upstream, label).await,
                    Err(e) => {
                        tracing::warn!(direction = self.direction.as_str(), ?peer, %upstream, error = %e, "Upstream connect failed")
                    }
                }
            }
            Plan::Http1 => self.http(client, socket, ConnProtocol::Http1).await,
            Plan::Http2 => self.http(client, socket, ConnProtocol::Http2).await,
            Plan::Detect { eager, label } => {
                self.detect(client, socket, destination, eager, label).await
            }
        }
    }

    async fn detect(
        &self,
        client: TcpStream,
        socket: SocketDigest,
        destination: Option<SocketAddr>,
        eager: Option<SocketAddr>,
        label: Arc<ServiceTelemetry>,
    ) {
        let first = match first_speaker(&client, eager, self.shared.connect_timeout()).await {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(error = %e, "Client connection failed before it spoke");
                return;
            }
        };
        let early = match first {
            First::Server(up) => {
                if self.direction == Direction::Inbound && self.mode() == MtlsMode::Strict {
                    return self.refuse(&client, InboundRefusal::Plaintext);
                }
                // The server has greeted, but nothing has been relayed yet.
                if self.tcp_denied(&client, eager, None) {
                    return;
                }
                return self.relay_plain(client, up, eager, label).await;
            }
            First::Client(early) => early,
        };
        if self.direction == Direction::Inbound {
            match self.admission(&client, destination).await {
                Admission::Pass => {}
                Admission::ProbesOnly => {
                    // Only HTTP/1 can be a kubelet probe; each request is checked in
                    // `MeshHttp::request_filter`.
                    return match classify_client(&client).await {
                        Ok(Some(Detected::Http1)) => {
                            self.http(client, socket, ConnProtocol::Http1).await
                        }
                        Ok(Some(_)) => self.refuse(&client, InboundRefusal::Plaintext),
                        Ok(None) | Err(_) => {}
                    };
                }
                Admission::Refuse(reason) => return self.refuse(&client, reason),
                Admission::Terminate => {
                    drop(early);
                    return self.terminate(client, socket, destination).await;
                }
            }
        }
        let detected = match classify_client(&client).await {
            Ok(Some(d)) => d,
            Ok(None) | Err(_) => return, // closed before saying anything
        };
        match detected {
            Detected::Http1 => self.http(client, socket, ConnProtocol::Http1).await,
            Detected::Http2 => self.http(client, socket, ConnProtocol::Http2).await,
            Detected::Opaque | Detected::NeedMore => {
                let target = early
                    .as_ref()
                    .map(|(_, addr)| *addr)
                    .or(eager)
                    .or(destination);
                if self.tcp_denied(&client, target, None) {
                    return; // the early upstream connection, which carried nothing, closes too
                }
                let (upstream, addr) = match (early, eager.or(destination)) {
                    (Some(early), _) => early,
                    (None, Some(addr)) => {
                        match connect(addr, self.shared.connect_timeout()).await {
                            Ok(up) => (up, addr),
                            Err(e) => {
                                tracing::warn!(direction = self.direction.as_str(), upstream = %addr, error = %e, "Upstream connect failed");
                                return;
                            }
                        }
                    }
                    (None, None) => {
                        tracing::warn!(direction = self.direction.as_str(), peer = ?client.peer_addr().ok(), "Connection was not redirected and is not HTTP: no destination; closed");
                        return;
                    }
                };
                self.relay(client, upstream, addr, label).await;
            }
        }
    }

    /// Relays to `upstream` (connected to `addr`): in mutual TLS when outbound to an endpoint
    /// the config names an identity for and this proxy has one, else as plaintext.
    async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        addr: SocketAddr,
        label: Arc<ServiceTelemetry>,
    ) {
        if self.direction == Direction::Outbound {
            let active = self.shared.config.active();
            let peer = active.as_ref().and_then(|a| a.identities.get(addr));
            if let Some(peer) = peer
                && self.shared.tls.outbound.material().is_some()
            {
                match self.shared.tls.outbound.connect_tcp(upstream, peer).await {
                    Ok(tls) => {
                        let telemetry = ConnectionTelemetry::open(self.shared.tcp_series(
                            self.direction,
                            &label,
                            Some(addr),
                            None,
                            SecurityPolicy::MutualTls,
                        ));
                        relay_streams(client, tls, &telemetry).await;
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %addr, peer = %peer.uri, error = %e, "Outbound mutual TLS failed; connection closed");
                    }
                }
                return;
            }
        }
        self.relay_plain(client, upstream, Some(addr), label).await;
    }

    /// Relays in plaintext to `upstream`, connected to `addr` when known.
    async fn relay_plain(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        addr: Option<SocketAddr>,
        label: Arc<ServiceTelemetry>,
    ) {
        let series =
            self.shared
                .tcp_series(self.direction, &label, addr, None, SecurityPolicy::None);
        let telemetry = ConnectionTelemetry::open(series);
        relay(client, upstream, &telemetry).await;
    }

    /// The inbound mTLS mode of the active config (permissive without one).
    fn mode(&self) -> MtlsMode {
        self.shared
            .config
            .active()
            .map_or(MtlsMode::default(), |a| a.config.workload.mtls)
    }

    /// What to do with an inbound connection (to `destination`) whose client has spoken.
    async fn admission(&self, client: &TcpStream, destination: Option<SocketAddr>) -> Admission {
        let mode = self.mode();
        let mut first = [0u8; 1];
        let hello = match client.peek(&mut first).await {
            Ok(1) if hello::starts_tls(&first) => match hello::peek(client).await {
                Ok(Some(hello)) => Some(hello),
                // TLS we cannot read a hello from is not Tandem's: foreign.
                Ok(None) | Err(_) => Some(hello::Hello::default()),
            },
            _ => None,
        };
        admit(
            mode,
            hello.as_ref(),
            self.shared.tls.inbound.own_sni().as_deref(),
            self.shared.tls.probes.covers(destination.map(|d| d.port())),
        )
    }

    /// Whether authorization refuses an inbound plaintext opaque connection from `client` to
    /// `target` (always `false` outbound). With no destination there is nothing to relay to,
    /// and the caller closes the connection anyway.
    fn tcp_denied(
        &self,
        client: &TcpStream,
        target: Option<SocketAddr>,
        peer: Option<&PeerIdentity>,
    ) -> bool {
        if self.direction != Direction::Inbound {
            return false;
        }
        let Some(target) = target else { return false };
        self.tcp_denied_from(client.peer_addr().ok(), target.port(), peer)
    }

    /// Decides an inbound opaque connection to workload `port` (`peer`: the caller's verified
    /// identity, over Tandem's mutual TLS), counts it, and logs a denial. Runs before any byte
    /// is relayed; the caller closes a denied connection.
    fn tcp_denied_from(
        &self,
        client: Option<SocketAddr>,
        port: u16,
        peer: Option<&PeerIdentity>,
    ) -> bool {
        let Some(active) = self.shared.config.active() else {
            // No config yet: passthrough, the open default.
            self.shared.metrics.authz.open.inc(AuthzProtocol::Tcp);
            return false;
        };
        let request = Request {
            port,
            caller: authz::caller(peer, client.map(|c| c.ip())),
            http: None,
        };
        let (decision, _) = active.authz.authorize(&request, AuthzProtocol::Tcp);
        if decision.allowed {
            return false;
        }
        tracing::info!(
            policy = %active.authz.denied_by(decision.by, port),
            caller = authz::caller_name(peer),
            ?client,
            port,
            "Connection denied"
        );
        true
    }

    /// Closes an inbound connection the mTLS mode does not allow, and counts it.
    fn refuse(&self, client: &TcpStream, reason: InboundRefusal) {
        self.shared.metrics.tls.refused(reason);
        tracing::info!(
            direction = self.direction.as_str(),
            peer = ?client.peer_addr().ok(),
            reason = reason.as_str(),
            "Inbound connection refused by the mTLS mode"
        );
    }

    /// Terminates Tandem's mutual TLS and serves what the negotiated ALPN names.
    async fn terminate(
        &self,
        client: TcpStream,
        socket: SocketDigest,
        destination: Option<SocketAddr>,
    ) {
        if !self.shared.tls.inbound.ready() {
            return self.refuse(&client, InboundRefusal::NoIdentity);
        }
        let peer = client.peer_addr().ok();
        let mut stream = PingoraStream::from(client);
        stream.set_socket_digest(socket);
        let tls = match self.shared.tls.inbound.terminate(stream).await {
            Ok(tls) => tls,
            Err(e) => {
                tracing::info!(?peer, error = %e, "Inbound mutual TLS refused");
                return;
            }
        };
        let label = self.shared.metrics.inbound.clone();
        match tls.selected_alpn_proto() {
            Some(ALPN::H2) => {
                self.h2.process_new(Box::new(tls), &self.shutdown).await;
            }
            Some(ALPN::H1) => {
                self.http1(Box::new(tls), false).await;
            }
            Some(ALPN::Custom(custom)) if custom.protocol() == ALPN_TCP => {
                let Some(dst) = destination else {
                    tracing::warn!(
                        ?peer,
                        "Opaque mutual TLS on a connection that was not redirected: no destination; closed"
                    );
                    return;
                };
                let digest = tls.get_ssl_digest();
                let identity = digest
                    .as_deref()
                    .and_then(|d| d.extension.get::<PeerIdentity>());
                if self.tcp_denied_from(peer, dst.port(), identity) {
                    return;
                }
                let up = match connect(dst, self.shared.connect_timeout()).await {
                    Ok(up) => up,
                    Err(e) => {
                        tracing::warn!(direction = self.direction.as_str(), upstream = %dst, error = %e, "Upstream connect failed");
                        return;
                    }
                };
                let _ = up.set_nodelay(true);
                let telemetry = ConnectionTelemetry::open(self.shared.tcp_series(
                    self.direction,
                    &label,
                    Some(dst),
                    identity,
                    SecurityPolicy::MutualTls,
                ));
                relay_streams(tls, up, &telemetry).await;
            }
            other => {
                tracing::warn!(?peer, alpn = ?other, "Mutual TLS without a Tandem ALPN; closed")
            }
        }
    }

    async fn http(&self, client: TcpStream, socket: SocketDigest, protocol: ConnProtocol) {
        // HTTP is counted per request; the TCP series are for relayed connections, as Istio's.
        let mut stream = PingoraStream::from(client);
        stream.set_socket_digest(socket);
        match protocol {
            ConnProtocol::Http2 => {
                self.h2.process_new(Box::new(stream), &self.shutdown).await;
            }
            _ => self.http1(Box::new(stream), true).await,
        }
    }

    /// HTTP/1.x keep-alive, one Pingora session per request.
    ///
    /// Between requests the connection waits here, in a future of a few hundred bytes, for the
    /// next request's first byte; only then is Pingora's request state (tens of KiB) created.
    /// Pingora's own loop keeps that state alive while a kept-alive connection idles, which is
    /// what makes 10,000 idle connections cost hundreds of MiB.
    ///
    /// A TLS stream cannot be peeked (`peekable` false): Pingora's session waits for the next
    /// request itself, under the same keep-alive timeout.
    async fn http1(&self, mut stream: pingora::protocols::Stream, peekable: bool) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut shutdown = self.shutdown.clone();
        let mut first = true;
        loop {
            if !first && peekable {
                let mut byte = [0u8; 1];
                let next = tokio::select! {
                    r = tokio::time::timeout(KEEPALIVE_IDLE, stream.try_peek(&mut byte)) => r,
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                };
                if !matches!(next, Ok(Ok(true))) {
                    return; // closed, failed or idle too long
                }
            }
            first = false;
            let mut session = ServerSession::new_http1(stream);
            let stopping = *self.shutdown.borrow();
            session.set_keepalive(if stopping {
                None
            } else {
                Some(KEEPALIVE_IDLE.as_secs())
            });
            if let Some(settings) = settings.take() {
                settings.apply_to_session(&mut session);
            }
            match self.h1.process_new_http(session, &self.shutdown).await {
                Some(reused) => {
                    let (next, persistent) = reused.consume();
                    stream = next;
                    settings = persistent;
                }
                None => return,
            }
        }
    }
}

/// Who spoke first.
enum First {
    /// The client has bytes to read; the early upstream connection and its address, if one
    /// was made.
    Client(Option<(TcpStream, SocketAddr)>),
    /// The server spoke (or closed) first: a server-first protocol.
    Server(TcpStream),
}

async fn first_speaker(
    client: &TcpStream,
    eager: Option<SocketAddr>,
    connect_timeout: Duration,
) -> std::io::Result<First> {
    let mut probe = [0u8; 1];
    let spoke = tokio::select! {
        biased;
        r = client.peek(&mut probe) => Some(r?),
        () = std::future::ready(()) => None,
    };
    if spoke.is_some() {
        return Ok(First::Client(None));
    }
    let Some(addr) = eager else {
        client.readable().await?;
        return Ok(First::Client(None));
    };
    let connecting = connect(addr, connect_timeout);
    tokio::pin!(connecting);
    let upstream = tokio::select! {
        biased;
        r = client.readable() => {
            r?;
            return Ok(First::Client(None));
        }
        c = &mut connecting => c,
    };
    match upstream {
        Ok(up) => tokio::select! {
            biased;
            r = client.readable() => {
                r?;
                Ok(First::Client(Some((up, addr))))
            }
            r = up.readable() => {
                r?;
                Ok(First::Server(up))
            }
        },
        Err(e) => {
            // The destination is unreachable; let the client's bytes decide (an HTTP client
            // then gets a 502 from the HTTP path, which may also pick another endpoint).
            tracing::debug!(upstream = %addr, error = %e, "Early upstream connect failed");
            client.readable().await?;
            Ok(First::Client(None))
        }
    }
}

/// Classifies what the client sent; `None` if it closed without sending anything.
async fn classify_client(client: &TcpStream) -> std::io::Result<Option<Detected>> {
    let mut buf = [0u8; PROBE_LEN];
    let deadline = Instant::now() + DETECT_MORE;
    loop {
        let n = client.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match classify(&buf[..n]) {
            Detected::NeedMore if n < PROBE_LEN && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Detected::NeedMore => return Ok(Some(Detected::Opaque)),
            detected => return Ok(Some(detected)),
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}
