//! Originating Tandem's mutual TLS towards meshed endpoints.
//!
//! HTTP (HTTP/1.1, h2, gRPC) uses Pingora's own upstream TLS: `HttpPeer::new_mtls` with SNI
//! `<sa>.<ns>.sa.<td>`, our chain and key as a `CertKey`, the trust anchors as the peer's CA and
//! full verification, ALPN `http/1.1` or `h2`. Pingora checks the server's chain and that its
//! certificate is valid for the SNI (the DNS SAN the signer always issues with the URI SAN), and
//! keeps the connection in its pool like any other, so handshakes happen only when the pool has
//! no idle connection to reuse. Opaque TCP uses tokio-rustls with ALPN `tandem/1` and a verifier
//! that adds the exact URI SAN check to webpki's.
//!
//! The `CertKey` and the CA list are built once per credentials and bundle generation
//! ([`Material`]): a request to a meshed endpoint costs two atomic loads and a comparison, plus
//! the SNI string Pingora's peer owns.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use pingora::prelude::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509, parse_x509};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use tandem_crds::identity::ALPN_TCP;
use tokio::net::TcpStream;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::spiffe::{self, SanRefusal};
use super::{HandshakeFailed, PeerIdentity, handshake_within};
use crate::identity::{Credentials, IdentityState, TrustBundle};
use crate::metrics::{Direction, HandshakeResult, Metrics};

/// The outbound side's TLS material, rebuilt when the credentials or the bundle change.
pub struct OutboundTls {
    identity: Arc<IdentityState>,
    metrics: Arc<Metrics>,
    provider: Arc<CryptoProvider>,
    current: ArcSwapOption<Generation>,
}

/// The material built for one credentials and bundle pair, or `None` if they did not parse
/// (kept too, so a bad pair is reported once, not rebuilt per request).
struct Generation {
    credentials: Arc<Credentials>,
    bundle: Arc<TrustBundle>,
    material: Option<Arc<Material>>,
}

impl std::fmt::Debug for OutboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundTls").finish_non_exhaustive()
    }
}

/// What one credentials and bundle generation gives every outbound connection.
pub struct Material {
    credentials: Arc<Credentials>,
    /// Our chain and key, as Pingora takes them (its pool key includes the leaf's serial, so a
    /// renewed certificate opens new connections and the old ones idle out).
    cert_key: Arc<CertKey>,
    /// The trust anchors, as Pingora takes them.
    ca: Arc<[WrappedX509]>,
    /// webpki's server verifier over the anchors (opaque TCP).
    webpki: Arc<WebPkiServerVerifier>,
}

/// Why an opaque TCP connection could not be secured.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No credentials or no trust anchors yet: the connection is not made in plaintext instead,
    /// since the config says the endpoint is meshed.
    #[error("no certificate or trust anchors yet")]
    NoIdentity,
    /// The TLS client config could not be built.
    #[error("cannot build the TLS client config")]
    Config(#[source] rustls::Error),
    /// The handshake failed (counted with its cause).
    #[error("mutual-TLS handshake with {peer} failed ({result:?})")]
    Handshake {
        /// Who was expected.
        peer: Arc<str>,
        /// The counted cause.
        result: HandshakeResult,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The handshake did not finish in time.
    #[error("mutual-TLS handshake timed out")]
    Timeout,
}

/// Every DER certificate parses (Pingora's `CertKey` and `WrappedX509` panic on one that does
/// not, so they are checked first).
fn all_parse(certs: &[CertificateDer<'_>]) -> bool {
    certs
        .iter()
        .all(|c| X509Certificate::from_der(c.as_ref()).is_ok())
}

impl OutboundTls {
    /// The outbound material source for `identity`, counting into `metrics`.
    pub fn new(identity: Arc<IdentityState>, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            metrics,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            current: ArcSwapOption::empty(),
        }
    }

    /// The material of the current generation, built on first use after a change; `None`
    /// while there are no credentials or no trust anchors, or they do not parse (traffic stays
    /// plaintext).
    pub fn material(&self) -> Option<Arc<Material>> {
        let credentials = self.identity.credentials()?;
        let bundle = self.identity.trust()?;
        if let Some(current) = self.current.load().as_ref()
            && Arc::ptr_eq(&current.credentials, &credentials)
            && Arc::ptr_eq(&current.bundle, &bundle)
        {
            return current.material.clone();
        }
        let material = self.build(&credentials, &bundle);
        self.current.store(Some(Arc::new(Generation {
            credentials,
            bundle,
            material: material.clone(),
        })));
        material
    }

    fn build(&self, credentials: &Arc<Credentials>, bundle: &TrustBundle) -> Option<Arc<Material>> {
        if credentials.chain.is_empty()
            || !all_parse(&credentials.chain)
            || bundle.certificates.is_empty()
            || !all_parse(&bundle.certificates)
        {
            tracing::warn!(identity = %credentials.id, "Credentials or trust anchors do not parse; outbound traffic stays plaintext");
            return None;
        }
        let chain = credentials.chain.iter().map(|c| c.to_vec()).collect();
        let cert_key = Arc::new(CertKey::new(
            chain,
            credentials.key.secret_pkcs8_der().to_vec(),
        ));
        let ca: Arc<[WrappedX509]> = bundle
            .certificates
            .iter()
            .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
            .collect();
        let webpki = match WebPkiServerVerifier::builder_with_provider(
            bundle.roots.clone(),
            self.provider.clone(),
        )
        .build()
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot build the server verifier; outbound traffic stays plaintext");
                return None;
            }
        };
        Some(Arc::new(Material {
            credentials: credentials.clone(),
            cert_key,
            ca,
            webpki,
        }))
    }

    /// Pingora's peer for an HTTP request to `upstream`, which must be `peer`: mutual TLS with
    /// full verification. `None` while this proxy has no identity (the request goes in
    /// plaintext, as before identity existed).
    pub fn http_peer(&self, upstream: SocketAddr, peer: &PeerIdentity) -> Option<HttpPeer> {
        let material = self.material()?;
        let mut http =
            HttpPeer::new_mtls(upstream, peer.sni.to_string(), material.cert_key.clone());
        http.options.ca = Some(material.ca.clone());
        http.options.verify_cert = true;
        http.options.verify_hostname = true;
        Some(http)
    }

    /// Counts a new upstream HTTP connection's handshake with `peer`.
    pub fn http_connected(&self, peer: &PeerIdentity) {
        self.metrics
            .tls
            .handshake(Direction::Outbound, HandshakeResult::Success);
        self.metrics.tls.peer(Direction::Outbound, &peer.uri);
    }

    /// Counts a failed upstream HTTP connection, if TLS is what failed.
    pub fn http_failed(&self, error: &pingora::Error) {
        let tls = matches!(
            error.etype(),
            pingora::ErrorType::TLSHandshakeFailure
                | pingora::ErrorType::InvalidCert
                | pingora::ErrorType::HandshakeError
        ) || spiffe::rustls_cause(error).is_some();
        if tls {
            let result = match spiffe::classify(error) {
                HandshakeResult::Handshake => spiffe::classify_message(&error.to_string()),
                typed => typed,
            };
            self.metrics.tls.handshake(Direction::Outbound, result);
        }
    }

    /// Runs the client side of the handshake on `tcp` for an opaque connection that must reach
    /// `peer`: ALPN `tandem/1`, our certificate, webpki plus the exact URI SAN check.
    pub async fn connect_tcp(
        &self,
        tcp: TcpStream,
        peer: &Arc<PeerIdentity>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
        let material = self.material().ok_or(ConnectError::NoIdentity)?;
        let verifier = Arc::new(PeerVerifier {
            webpki: material.webpki.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            expected: peer.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ConnectError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OurCert(material.credentials.certified.clone())));
        config.alpn_protocols = vec![ALPN_TCP.to_vec()];
        // One config per connection (the verifier knows whom it expects), so a session cache
        // would never be hit; resuming would also skip the URI SAN check.
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(peer.sni.to_string())
            .map_err(|e| ConnectError::Config(rustls::Error::General(e.to_string())))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let handshake = connector.connect(name, tcp);
        let tls = handshake_within(&self.metrics.tls, Direction::Outbound, handshake, |e| {
            spiffe::classify(e)
        })
        .await
        .map_err(|failed| match failed {
            HandshakeFailed::Error(result, source) => ConnectError::Handshake {
                peer: peer.uri.clone(),
                result,
                source,
            },
            HandshakeFailed::Timeout => ConnectError::Timeout,
        })?;
        self.http_connected(peer);
        Ok(tls)
    }
}

/// Presents our current certificate whatever the server asks.
#[derive(Debug)]
struct OurCert(Arc<CertifiedKey>);

impl ResolvesClientCert for OurCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// webpki's chain and DNS-name check, then: the leaf's SPIFFE ID is exactly the expected one.
#[derive(Debug)]
struct PeerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The provider's signature algorithms (those `webpki` was built with).
    algorithms: WebPkiSupportedAlgorithms,
    expected: Arc<PeerIdentity>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = spiffe::spiffe_id(end_entity).map_err(SanRefusal::into_rustls)?;
        if id != self.expected.id {
            return Err(SanRefusal::WrongIdentity {
                found: id.uri(),
                expected: self.expected.uri.to_string(),
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    provider_signature_checks!(algorithms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    use tandem_crds::identity::SpiffeId;

    /// A root, and a leaf it signed with these SANs.
    fn chain(dns: &str, uri: &str) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![
            SanType::DnsName(dns.try_into().unwrap()),
            SanType::URI(uri.try_into().unwrap()),
        ];
        let cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &root)
            .unwrap();
        (root.der().clone(), cert.der().clone())
    }

    fn verifier(root: CertificateDer<'static>, expected: SpiffeId) -> PeerVerifier {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        PeerVerifier {
            webpki,
            algorithms: provider.signature_verification_algorithms,
            expected: Arc::new(PeerIdentity::new(expected)),
        }
    }

    #[test]
    fn the_servers_uri_san_must_be_exactly_the_expected_identity() {
        let expected = SpiffeId::new("cluster.local", "shop", "web");
        let sni = ServerName::try_from(expected.dns_name()).unwrap();
        let now = UnixTime::now();

        let (root, leaf) = chain(&expected.dns_name(), &expected.uri());
        let v = verifier(root, expected.clone());
        assert!(v.verify_server_cert(&leaf, &[], &sni, &[], now).is_ok());

        // The right DNS name but another URI SAN: only our check catches it.
        let (root, leaf) = chain(&expected.dns_name(), "spiffe://cluster.local/ns/shop/sa/db");
        let err = verifier(root, expected.clone())
            .verify_server_cert(&leaf, &[], &sni, &[], now)
            .unwrap_err();
        assert_eq!(spiffe::classify(&err), HandshakeResult::WrongIdentity);

        // A certificate for another name altogether: webpki refuses it first.
        let (root, leaf) = chain(
            "db.shop.sa.cluster.local",
            "spiffe://cluster.local/ns/shop/sa/db",
        );
        let err = verifier(root, expected)
            .verify_server_cert(&leaf, &[], &sni, &[], now)
            .unwrap_err();
        assert_eq!(spiffe::classify(&err), HandshakeResult::WrongIdentity);
    }
}
