//! Mutual TLS between sidecars: who the peer is, on the wire.
//!
//! - [`hello`]: reads a TLS ClientHello's SNI and ALPN from peeked bytes, so the inbound
//!   listener can decide what to do with a connection without consuming it.
//! - [`inbound`]: terminates Tandem's mutual TLS on :15006 (Pingora's rustls acceptor with a
//!   certificate resolver and a client verifier that read the current [`IdentityState`]), and
//!   the mTLS mode's admission decision.
//! - [`outbound`]: originates it, for HTTP through Pingora's own upstream TLS
//!   (`HttpPeer::new_mtls`), for opaque TCP through tokio-rustls with a verifier that also
//!   checks the SPIFFE URI SAN.
//! - [`probes`]: the kubelet's plaintext probes a strict workload still lets through.
//! - [`spiffe`]: the SPIFFE ID in a certificate, and why a handshake failed.
//!
//! Which endpoints are meshed comes from the config ([`PeerIdentities`]), never from probing.
//! TLS configs and certificate material are built once per credentials or trust-bundle
//! generation, never per request.
//!
//! [`IdentityState`]: crate::identity::IdentityState

/// The signature half of rustls's certificate-verifier traits, the same for both our verifiers:
/// handshake signatures are checked with the crypto provider's algorithms, as webpki's own
/// verifiers do. `$algorithms` is the field of `self` (a path) holding the provider's
/// `WebPkiSupportedAlgorithms`.
macro_rules! provider_signature_checks {
    ($($algorithms:ident).+) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$($algorithms).+)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$($algorithms).+)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($algorithms).+.supported_schemes()
        }
    };
}

pub mod hello;
pub mod inbound;
pub mod outbound;
pub mod probes;
pub mod spiffe;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tandem_crds::contract::ProxyConfig;
use tandem_crds::identity::{SpiffeId, SpiffeIdError};

use crate::metrics::{Direction, HandshakeResult, TlsMetrics};

pub use inbound::{Admission, InboundTls, admit};
pub use outbound::OutboundTls;

/// Both sides of a proxy's mutual TLS, over one [`IdentityState`].
///
/// [`IdentityState`]: crate::identity::IdentityState
#[derive(Debug)]
pub struct MeshTls {
    /// Termination on the inbound listener.
    pub inbound: InboundTls,
    /// Origination towards meshed endpoints.
    pub outbound: OutboundTls,
    /// The pod's HTTP probes, served in plaintext even when strict.
    pub probes: probes::AppProbes,
}

impl MeshTls {
    /// Both sides for `identity`, counting into `metrics`.
    pub fn new(
        identity: Arc<crate::identity::IdentityState>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, rustls::Error> {
        Ok(Self {
            inbound: InboundTls::new(identity.clone(), metrics.clone())?,
            outbound: OutboundTls::new(identity, metrics),
            probes: probes::AppProbes::default(),
        })
    }

    /// The same, letting the pod's HTTP probes through in plaintext when strict.
    pub fn with_probes(mut self, probes: probes::AppProbes) -> Self {
        self.probes = probes;
        self
    }
}

/// How long a TLS handshake (either side) may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a handshake run by [`handshake_within`] failed.
#[derive(Debug)]
enum HandshakeFailed<E> {
    /// It failed, for the counted cause.
    Error(HandshakeResult, E),
    /// It did not finish within [`HANDSHAKE_TIMEOUT`].
    Timeout,
}

/// Runs `handshake` for at most [`HANDSHAKE_TIMEOUT`]. A failure is counted in `direction`,
/// with the cause `classify` finds in the error (a timeout counts as `handshake`); a success is
/// left to the caller, who knows the peer.
async fn handshake_within<T, E>(
    metrics: &TlsMetrics,
    direction: Direction,
    handshake: impl Future<Output = Result<T, E>>,
    classify: impl FnOnce(&E) -> HandshakeResult,
) -> Result<T, HandshakeFailed<E>> {
    let failed = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => return Ok(tls),
        Ok(Err(error)) => HandshakeFailed::Error(classify(&error), error),
        Err(_) => HandshakeFailed::Timeout,
    };
    let result = match &failed {
        HandshakeFailed::Error(result, _) => *result,
        HandshakeFailed::Timeout => HandshakeResult::Handshake,
    };
    metrics.handshake(direction, result);
    Err(failed)
}

/// The identity of the proxy on the other end of a mutual-TLS connection.
///
/// Inbound, the handshake callback puts it into the connection's `SslDigest` extension, where
/// every HTTP request on the connection finds it; outbound, the config names it for the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's workload identity.
    pub id: SpiffeId,
    /// `spiffe://…`, kept formatted for logs and labels.
    pub uri: Arc<str>,
    /// `<sa>.<ns>.sa.<td>`: the SNI a client sends to reach this identity.
    pub sni: Arc<str>,
}

impl PeerIdentity {
    /// The identity with its two printed forms.
    pub fn new(id: SpiffeId) -> Self {
        Self {
            uri: Arc::from(id.uri()),
            sni: Arc::from(id.dns_name()),
            id,
        }
    }
}

/// The identity of every meshed endpoint the config names, by address: who outbound mTLS to
/// that address must find on the other end. Compiled once per config version.
#[derive(Debug, Default)]
pub struct PeerIdentities {
    by_addr: HashMap<SocketAddr, Arc<PeerIdentity>>,
}

/// An endpoint's `identity` that is not a workload SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error("endpoint {address} of service {service}: bad identity")]
pub struct BadEndpointIdentity {
    /// The endpoint.
    pub address: SocketAddr,
    /// `namespace/name` of its service.
    pub service: String,
    /// Why.
    #[source]
    pub source: SpiffeIdError,
}

impl PeerIdentities {
    /// The table of a config. A malformed identity refuses the config: falling back to
    /// plaintext would silently drop the guarantee the config asked for.
    pub fn compile(config: &ProxyConfig) -> Result<Self, BadEndpointIdentity> {
        let mut by_addr = HashMap::new();
        for service in &config.services {
            for port in &service.ports {
                for endpoint in &port.endpoints {
                    let Some(uri) = &endpoint.identity else {
                        continue;
                    };
                    let id = SpiffeId::parse(uri).map_err(|source| BadEndpointIdentity {
                        address: endpoint.address,
                        service: service.key().to_string(),
                        source,
                    })?;
                    by_addr
                        .entry(endpoint.address)
                        .or_insert_with(|| Arc::new(PeerIdentity::new(id)));
                }
            }
        }
        Ok(Self { by_addr })
    }

    /// Who must answer at `addr`, if the config says it is a meshed endpoint with an identity.
    pub fn get(&self, addr: SocketAddr) -> Option<&Arc<PeerIdentity>> {
        self.by_addr.get(&addr)
    }

    /// Number of endpoints with an identity.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Whether no endpoint has an identity (every connection is plaintext).
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::fixtures::{endpoint, web};

    fn config(identity: Option<&str>) -> ProxyConfig {
        web(vec![
            endpoint("10.0.0.1:8080", true, identity),
            endpoint("10.0.0.2:8080", false, None),
        ])
    }

    #[test]
    fn endpoints_with_an_identity_are_looked_up_by_address() {
        let table = PeerIdentities::compile(&config(Some("spiffe://cluster.local/ns/shop/sa/web")))
            .unwrap();
        let peer = table.get("10.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(&*peer.sni, "web.shop.sa.cluster.local");
        assert_eq!(&*peer.uri, "spiffe://cluster.local/ns/shop/sa/web");
        assert!(table.get("10.0.0.2:8080".parse().unwrap()).is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_malformed_endpoint_identity_refuses_the_config() {
        let err = PeerIdentities::compile(&config(Some("spiffe://cluster.local/web"))).unwrap_err();
        assert_eq!(err.address.to_string(), "10.0.0.1:8080");
        assert_eq!(err.service, "shop/web");
    }
}
