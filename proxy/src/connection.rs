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

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::GetSocketDigest;
use pingora::protocols::SocketDigest;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as PingoraStream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tandem_crds::contract::Protocol;
use tokio::net::TcpStream;

use crate::detect::{Detected, PROBE_LEN, classify};
use crate::http::MeshHttp;
use crate::metrics::{ConnProtocol, ConnectionTelemetry, Direction, ServiceTelemetry};
use crate::relay::relay;
use crate::server::Shared;

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

/// The original destination of a connection redirected by iptables, or `None` when it was not
/// redirected (no `SO_ORIGINAL_DST`, or it is the listener's own address).
pub fn redirected_destination(socket: &SocketDigest) -> Option<SocketAddr> {
    let original = *socket.original_dst()?.as_inet()?;
    let local = *socket.local_addr()?.as_inet()?;
    (original != local).then_some(original)
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
    /// HTTP/1.x, declared.
    Http1 { label: Arc<ServiceTelemetry> },
    /// HTTP/2, declared.
    Http2 { label: Arc<ServiceTelemetry> },
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
                    return Plan::Relay {
                        upstream: dst,
                        label: self.shared.metrics.passthrough.clone(),
                    };
                };
                let label = target.telemetry.clone();
                match target.protocol {
                    Protocol::Http => Plan::Http1 { label },
                    Protocol::Http2 | Protocol::Grpc => Plan::Http2 { label },
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
                    Ok(up) => self.relay(client, up, label).await,
                    Err(e) => {
                        tracing::warn!(direction = self.direction.as_str(), ?peer, %upstream, error = %e, "Upstream connect failed")
                    }
                }
            }
            Plan::Http1 { label } => self.http(client, socket, ConnProtocol::Http1, label).await,
            Plan::Http2 { label } => self.http(client, socket, ConnProtocol::Http2, label).await,
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
            First::Server(up) => return self.relay(client, up, label).await,
            First::Client(early) => early,
        };
        let detected = match classify_client(&client).await {
            Ok(Some(d)) => d,
            Ok(None) | Err(_) => return, // closed before saying anything
        };
        match detected {
            Detected::Http1 => self.http(client, socket, ConnProtocol::Http1, label).await,
            Detected::Http2 => self.http(client, socket, ConnProtocol::Http2, label).await,
            Detected::Opaque | Detected::NeedMore => {
                let upstream = match (early, eager.or(destination)) {
                    (Some(up), _) => up,
                    (None, Some(addr)) => {
                        match connect(addr, self.shared.connect_timeout()).await {
                            Ok(up) => up,
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
                self.relay(client, upstream, label).await;
            }
        }
    }

    async fn relay(&self, client: TcpStream, upstream: TcpStream, label: Arc<ServiceTelemetry>) {
        let telemetry = ConnectionTelemetry::open(&label, ConnProtocol::Tcp);
        relay(client, upstream, &telemetry).await;
    }

    async fn http(
        &self,
        client: TcpStream,
        socket: SocketDigest,
        protocol: ConnProtocol,
        label: Arc<ServiceTelemetry>,
    ) {
        let _telemetry = ConnectionTelemetry::open(&label, protocol);
        let mut stream = PingoraStream::from(client);
        stream.set_socket_digest(socket);
        match protocol {
            ConnProtocol::Http2 => {
                self.h2.process_new(Box::new(stream), &self.shutdown).await;
            }
            _ => self.http1(Box::new(stream)).await,
        }
    }

    /// HTTP/1.x keep-alive, one Pingora session per request.
    ///
    /// Between requests the connection waits here, in a future of a few hundred bytes, for the
    /// next request's first byte; only then is Pingora's request state (tens of KiB) created.
    /// Pingora's own loop keeps that state alive while a kept-alive connection idles, which is
    /// what makes 10,000 idle connections cost hundreds of MiB.
    async fn http1(&self, mut stream: pingora::protocols::Stream) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut shutdown = self.shutdown.clone();
        let mut first = true;
        loop {
            if !first {
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
    /// The client has bytes to read; the early upstream connection, if one was made.
    Client(Option<TcpStream>),
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
                Ok(First::Client(Some(up)))
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
