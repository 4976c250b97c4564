//! Mutual TLS counters: handshakes by direction and result, inbound connections refused by the
//! mTLS mode, and connections per peer identity.
//!
//! Every handshake and refusal series is created with the metrics, so counting is an atomic add
//! on a handle held here (the series show 0 until something happens, which also tells an
//! operator that the proxy knows the counter). The per-identity counter is looked up in its
//! family once per completed handshake (a read lock on the family's map, taken after tens of
//! microseconds of public-key cryptography, never per request).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Direction;

/// How a mutual-TLS handshake ended (the `result` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Both sides were authenticated.
    Success,
    /// The peer's certificate is outside its validity period.
    Expired,
    /// The peer's chain does not end in one of the trust anchors (or a signature is wrong).
    Untrusted,
    /// The peer's SPIFFE ID is in another trust domain.
    WrongTrustDomain,
    /// The peer's certificate has no usable SPIFFE ID (none, several, or malformed).
    BadSan,
    /// The server's certificate is valid but for another identity than the config names.
    WrongIdentity,
    /// Anything else: no certificate, a protocol error, the peer's alert, a timeout.
    Handshake,
}

lower_case_label!(HandshakeResult,
    Success => "success",
    Expired => "expired",
    Untrusted => "untrusted",
    WrongTrustDomain => "wrong-trust-domain",
    BadSan => "bad-san",
    WrongIdentity => "wrong-identity",
    Handshake => "handshake"
);

impl HandshakeResult {
    /// Every result, in index order.
    pub const ALL: [Self; 7] = [
        Self::Success,
        Self::Expired,
        Self::Untrusted,
        Self::WrongTrustDomain,
        Self::BadSan,
        Self::WrongIdentity,
        Self::Handshake,
    ];
}

/// Why the inbound listener closed a connection without serving it (the `reason` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum InboundRefusal {
    /// Plaintext to a `strict` workload.
    Plaintext,
    /// TLS that is not Tandem's (another SNI, or no Tandem ALPN) to a `strict` workload.
    ForeignTls,
    /// Tandem's mutual TLS, but this proxy has no certificate (or no trust anchors) yet.
    NoIdentity,
}

lower_case_label!(InboundRefusal,
    Plaintext => "plaintext",
    ForeignTls => "foreign-tls",
    NoIdentity => "no-identity"
);

impl InboundRefusal {
    /// Every reason, in index order.
    pub const ALL: [Self; 3] = [Self::Plaintext, Self::ForeignTls, Self::NoIdentity];
}

/// Labels of the handshake counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Inbound: this proxy terminated; outbound: it originated.
    pub direction: Direction,
    /// How it ended.
    pub result: HandshakeResult,
}

/// Labels of the refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why.
    pub reason: InboundRefusal,
}

/// Labels of the per-peer connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Inbound: the client's identity; outbound: the server's.
    pub direction: Direction,
    /// The peer's SPIFFE ID.
    pub peer_identity: String,
}

/// The mutual-TLS counters.
pub struct TlsMetrics {
    handshakes: [[Counter; HandshakeResult::ALL.len()]; 2],
    refused: [Counter; InboundRefusal::ALL.len()],
    peers: Family<PeerLabels, Counter>,
}

impl std::fmt::Debug for TlsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMetrics").finish_non_exhaustive()
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

impl TlsMetrics {
    /// Creates the counters and registers them in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let handshakes: Family<HandshakeLabels, Counter> = Family::default();
        let refused: Family<RefusalLabels, Counter> = Family::default();
        let peers = Family::default();
        registry.register(
            "tandem_tls_handshakes",
            "Mutual-TLS handshakes between proxies by direction and result",
            handshakes.clone(),
        );
        registry.register(
            "tandem_inbound_connections_refused",
            "Inbound connections closed unserved because of the workload's mTLS mode",
            refused.clone(),
        );
        registry.register(
            "tandem_tls_peer_connections",
            "Mutual-TLS connections by peer identity",
            peers.clone(),
        );
        let handshake = |direction, result| {
            handshakes
                .get_or_create(&HandshakeLabels { direction, result })
                .clone()
        };
        Self {
            handshakes: [Direction::Outbound, Direction::Inbound]
                .map(|d| HandshakeResult::ALL.map(|r| handshake(d, r))),
            refused: InboundRefusal::ALL
                .map(|reason| refused.get_or_create(&RefusalLabels { reason }).clone()),
            peers,
        }
    }

    /// Counts a handshake that ended with `result`.
    pub fn handshake(&self, direction: Direction, result: HandshakeResult) {
        let row = &self.handshakes[direction_index(direction)];
        if let Some(counter) = HandshakeResult::ALL
            .iter()
            .position(|r| *r == result)
            .and_then(|i| row.get(i))
        {
            counter.inc();
        }
    }

    /// Counts an inbound connection refused for `reason`.
    pub fn refused(&self, reason: InboundRefusal) {
        if let Some(counter) = InboundRefusal::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i))
        {
            counter.inc();
        }
    }

    /// Counts a mutual-TLS connection with `peer` (a SPIFFE ID). Once per handshake.
    pub fn peer(&self, direction: Direction, peer: &str) {
        self.peers
            .get_or_create(&PeerLabels {
                direction,
                peer_identity: peer.to_owned(),
            })
            .inc();
    }
}
