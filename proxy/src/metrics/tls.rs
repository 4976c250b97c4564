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
#[repr(usize)]
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
#[repr(usize)]
pub enum InboundRefusal {
    /// Plaintext to a `strict` workload.
    Plaintext,
    /// TLS that is not Tandem's (another SNI, or no Tandem ALPN) to a `strict` workload.
    ForeignTls,
    /// Tandem's mutual TLS for our certificate, but no trust anchors are loaded to check the
    /// client's.
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
        // `ALL` lists the variants in declaration order, so the discriminant is the index.
        if let Some(counter) = self.handshakes[direction_index(direction)].get(result as usize) {
            counter.inc();
        }
    }

    /// Counts an inbound connection refused for `reason`.
    pub fn refused(&self, reason: InboundRefusal) {
        if let Some(counter) = self.refused.get(reason as usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_and_reason_counts_in_its_own_series() {
        let mut registry = Registry::default();
        let tls = TlsMetrics::register(&mut registry);
        for (i, result) in HandshakeResult::ALL.into_iter().enumerate() {
            assert_eq!(result as usize, i);
            tls.handshake(Direction::Inbound, result);
        }
        tls.handshake(Direction::Outbound, HandshakeResult::WrongIdentity);
        for reason in InboundRefusal::ALL {
            tls.refused(reason);
        }
        tls.peer(Direction::Inbound, "spiffe://cluster.local/ns/a/sa/b");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for result in HandshakeResult::ALL {
            let line = format!(
                "tandem_tls_handshakes_total{{direction=\"inbound\",result=\"{}\"}} 1",
                result.as_str()
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(text.contains(
            r#"tandem_tls_handshakes_total{direction="outbound",result="wrong-identity"} 1"#
        ));
        assert!(
            text.contains(
                r#"tandem_tls_handshakes_total{direction="outbound",result="success"} 0"#
            )
        );
        assert!(
            text.contains(r#"tandem_inbound_connections_refused_total{reason="foreign-tls"} 1"#)
        );
        assert!(text.contains(
            r#"tandem_tls_peer_connections_total{direction="inbound",peer_identity="spiffe://cluster.local/ns/a/sa/b"} 1"#
        ));
    }
}
