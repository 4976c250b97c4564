//! Terminating Tandem's mutual TLS on the inbound listener, and the mTLS mode's admission rule.
//!
//! One `rustls::ServerConfig` serves the process's whole life: TLS 1.3 only, ALPN `h2`,
//! `http/1.1`, `tandem/1`, a certificate resolver that hands out the current
//! [`Credentials`](crate::identity::Credentials) and a client verifier that checks against the
//! current [`TrustBundle`](crate::identity::TrustBundle). Both read the [`IdentityState`] with an
//! atomic load per handshake, so a renewed certificate or a new root applies to the next
//! handshake without a restart, a lock or a rebuilt acceptor. The webpki client verifier is
//! rebuilt only when the bundle itself changes (an `ArcSwap` keyed by the bundle's `Arc`).
//!
//! The handshake runs through Pingora's own acceptor (`handshake_with_callback`), so the
//! resulting stream is a Pingora IO that its HTTP/1 and HTTP/2 servers accept as they accept
//! TLS from their own listeners, and the callback's [`PeerIdentity`] lands in the connection's
//! `SslDigest` extension, where each request finds it.

use std::cell::Cell;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as PingoraStream;
use pingora::protocols::tls::{TlsRef, TlsStream};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, ServerConfig};
use tandem_crds::contract::MtlsMode;
use tandem_crds::identity::ALPN_TCP;

use super::hello::Hello;
use super::spiffe::{self, SanRefusal};
use super::{HandshakeFailed, PeerIdentity, handshake_within};
use crate::identity::{IdentityState, TrustBundle};
use crate::metrics::{Direction, HandshakeResult, InboundRefusal, TlsMetrics};

tokio::task_local! {
    /// Why the client verifier refused the certificate of the handshake this task runs.
    /// Pingora's acceptor reports a failure as text only, so the verifier, which runs inside
    /// the handshake's poll, notes the typed cause here for [`InboundTls::terminate`].
    static REFUSED: Cell<Option<HandshakeResult>>;
}

/// Notes a refusal's cause for the running handshake (outside one, nothing happens).
fn note(result: HandshakeResult) {
    let _ = REFUSED.try_with(|cause| cause.set(Some(result)));
}

/// ALPN protocols the inbound side negotiates, in its order of preference.
pub const ALPN: [&[u8]; 3] = [b"h2", b"http/1.1", ALPN_TCP];

/// What the inbound listener does with a connection, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Tandem's mutual TLS for this proxy: terminate it.
    Terminate,
    /// Plaintext or the application's own TLS, allowed by the mode: serve it as before
    /// (detection, HTTP or opaque relay), untouched.
    Pass,
    /// Plaintext to a strict workload on a port the kubelet probes: serve it as HTTP/1 only,
    /// each request checked against the pod's probes ([`super::probes`]).
    ProbesOnly,
    /// Close it unserved.
    Refuse(InboundRefusal),
}

/// The admission rule. `hello` is the client's ClientHello (`None`: not TLS); `own` is this
/// proxy's DNS identity (`None`: no certificate yet). A hello is Tandem's when its SNI is our
/// DNS identity and it offers one of our ALPN protocols; anything else is the application's.
/// `probed` says whether the connection's port is one the kubelet probes.
pub fn admit(mode: MtlsMode, hello: Option<&Hello>, own: Option<&str>, probed: bool) -> Admission {
    let Some(hello) = hello else {
        return match mode {
            MtlsMode::Permissive => Admission::Pass,
            MtlsMode::Strict if probed => Admission::ProbesOnly,
            MtlsMode::Strict => Admission::Refuse(InboundRefusal::Plaintext),
        };
    };
    // Without a certificate of our own nothing is ours: a peer's mTLS is then treated as any
    // foreign TLS (the proxy is not ready then, so peers should not be sending yet).
    let ours = hello
        .sni
        .as_deref()
        .zip(own)
        .is_some_and(|(sni, own)| sni.eq_ignore_ascii_case(own));
    let tandem_alpn = hello.alpn.iter().any(|p| ALPN.contains(&p.as_slice()));
    if ours && tandem_alpn {
        return Admission::Terminate;
    }
    match mode {
        MtlsMode::Permissive => Admission::Pass,
        MtlsMode::Strict => Admission::Refuse(InboundRefusal::ForeignTls),
    }
}

/// The inbound side's TLS: one acceptor reading the current identity on each handshake.
pub struct InboundTls {
    acceptor: Acceptor,
    callbacks: Callbacks,
    identity: Arc<IdentityState>,
}

impl std::fmt::Debug for InboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundTls").finish_non_exhaustive()
    }
}

/// Why a connection could not be terminated.
#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    /// The handshake failed (counted with its cause).
    #[error("mutual-TLS handshake failed ({result:?})")]
    Handshake {
        /// The counted cause.
        result: HandshakeResult,
        /// Pingora's error.
        #[source]
        source: Box<pingora::Error>,
    },
    /// The handshake did not finish in time.
    #[error("mutual-TLS handshake timed out")]
    Timeout,
}

impl InboundTls {
    /// The acceptor for `identity`, counting into `metrics`. Fails only if the crypto provider
    /// lacks TLS 1.3 (ring has it).
    pub fn new(
        identity: Arc<IdentityState>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(MeshClientVerifier {
            identity: identity.clone(),
            provider: provider.clone(),
            current: ArcSwapOption::empty(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert {
                identity: identity.clone(),
            }));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            callbacks: Callbacks { metrics },
            identity,
        })
    }

    /// This proxy's DNS identity now, if it has a certificate.
    pub fn own_sni(&self) -> Option<String> {
        self.identity.credentials().map(|c| c.id.dns_name())
    }

    /// Whether a hello for us can be terminated now: credentials and trust anchors are loaded.
    pub fn ready(&self) -> bool {
        self.identity.credentials().is_some() && self.identity.trust().is_some()
    }

    /// Runs the server side of the handshake on `stream`; counts its result.
    pub async fn terminate(
        &self,
        stream: PingoraStream,
    ) -> Result<TlsStream<PingoraStream>, TerminateError> {
        let handshake = pingora::protocols::tls::server::handshake_with_callback(
            &self.acceptor,
            stream,
            &self.callbacks,
        );
        // Pingora's error is text only: the typed cause is what the verifier noted in REFUSED.
        let handshake = handshake_within(
            &self.callbacks.metrics.tls,
            Direction::Inbound,
            handshake,
            |_| {
                REFUSED
                    .with(Cell::take)
                    .unwrap_or(HandshakeResult::Handshake)
            },
        );
        REFUSED
            .scope(Cell::new(None), handshake)
            .await
            .map_err(|failed| match failed {
                HandshakeFailed::Error(result, source) => {
                    TerminateError::Handshake { result, source }
                }
                HandshakeFailed::Timeout => TerminateError::Timeout,
            })
    }
}

/// Hands out the current credentials (ours for every SNI: admission has already checked it).
#[derive(Debug)]
struct CurrentCert {
    identity: Arc<IdentityState>,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.identity.credentials().map(|c| c.certified.clone())
    }
}

/// webpki's client verification against the current bundle, plus the SPIFFE check.
#[derive(Debug)]
struct MeshClientVerifier {
    identity: Arc<IdentityState>,
    provider: Arc<CryptoProvider>,
    current: ArcSwapOption<Generation>,
}

/// The webpki verifier built for one trust bundle.
#[derive(Debug)]
struct Generation {
    bundle: Arc<TrustBundle>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl MeshClientVerifier {
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self
            .identity
            .trust()
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        if let Some(current) = self.current.load().as_ref()
            && Arc::ptr_eq(&current.bundle, &bundle)
        {
            return Ok(current.verifier.clone());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            bundle.roots.clone(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        self.current.store(Some(Arc::new(Generation {
            bundle,
            verifier: verifier.clone(),
        })));
        Ok(verifier)
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Our clients have one certificate and send it whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |e: rustls::Error| {
            note(spiffe::classify(&e));
            e
        };
        self.webpki()
            .map_err(refuse)?
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(refuse)?;
        let id = spiffe::spiffe_id(end_entity).map_err(|r| refuse(r.into_rustls()))?;
        let ours = self
            .identity
            .credentials()
            .map(|c| c.id.trust_domain.clone())
            .unwrap_or_default();
        if id.trust_domain != ours {
            return Err(refuse(
                SanRefusal::WrongTrustDomain {
                    found: id.uri(),
                    expected: ours,
                }
                .into_rustls(),
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    provider_signature_checks!(provider.signature_verification_algorithms);
}

/// After a successful handshake: the peer's identity, counted and kept in the digest.
struct Callbacks {
    metrics: Arc<crate::metrics::Metrics>,
}

#[async_trait]
impl TlsAccept for Callbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        // The verifier accepted this very certificate, so it parses; `None` cannot happen.
        let id = spiffe::spiffe_id(tls.peer_certificate_der()?).ok()?;
        let peer = PeerIdentity::new(id);
        let tls_metrics: &TlsMetrics = &self.metrics.tls;
        tls_metrics.handshake(Direction::Inbound, HandshakeResult::Success);
        tls_metrics.peer(Direction::Inbound, &peer.uri);
        Some(Arc::new(peer))
    }
}

/// The peer identity Pingora keeps in a terminated connection's digest.
pub fn peer_of(digest: Option<&pingora::protocols::Digest>) -> Option<&PeerIdentity> {
    digest?.ssl_digest.as_ref()?.extension.get::<PeerIdentity>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(sni: &str, alpn: &[&[u8]]) -> Hello {
        Hello {
            sni: Some(sni.into()),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    const OWN: Option<&str> = Some("server.test.sa.cluster.local");

    #[test]
    fn our_sni_with_a_tandem_alpn_is_terminated_in_both_modes() {
        for mode in [MtlsMode::Permissive, MtlsMode::Strict] {
            for alpn in ALPN {
                let h = hello("server.test.sa.cluster.local", &[alpn]);
                assert_eq!(admit(mode, Some(&h), OWN, false), Admission::Terminate);
            }
        }
    }

    #[test]
    fn permissive_passes_plaintext_and_foreign_tls_and_strict_refuses_them() {
        let foreign = hello("api.example.com", &[b"h2"]);
        let no_alpn = hello("server.test.sa.cluster.local", &[]);
        for h in [&foreign, &no_alpn] {
            assert_eq!(
                admit(MtlsMode::Permissive, Some(h), OWN, false),
                Admission::Pass
            );
            assert_eq!(
                admit(MtlsMode::Strict, Some(h), OWN, false),
                Admission::Refuse(InboundRefusal::ForeignTls)
            );
        }
        assert_eq!(
            admit(MtlsMode::Permissive, None, OWN, false),
            Admission::Pass
        );
        assert_eq!(
            admit(MtlsMode::Strict, None, OWN, false),
            Admission::Refuse(InboundRefusal::Plaintext)
        );
    }

    #[test]
    fn without_a_certificate_of_our_own_nothing_is_terminated() {
        let h = hello("server.test.sa.cluster.local", &[b"h2"]);
        assert_eq!(
            admit(MtlsMode::Permissive, Some(&h), None, false),
            Admission::Pass
        );
        assert_eq!(
            admit(MtlsMode::Strict, Some(&h), None, false),
            Admission::Refuse(InboundRefusal::ForeignTls)
        );
    }
}
