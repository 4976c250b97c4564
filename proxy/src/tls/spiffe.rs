//! The SPIFFE ID a certificate carries, and why a handshake failed.
//!
//! webpki checks chains, validity and DNS names, but ignores URI SANs, so the SPIFFE check is
//! ours: exactly one `spiffe://` URI SAN, parsed as a workload ID. Our own refusals travel
//! through rustls as `CertificateError::Other` holding a [`SanRefusal`], so one classifier
//! ([`classify`]) names the cause of any handshake error, whichever side raised it and whether
//! it came through Pingora or tokio-rustls.

use std::error::Error as StdError;
use std::sync::Arc;

use rustls::{CertificateError, OtherError};
use tandem_crds::identity::SpiffeId;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::metrics::HandshakeResult;

/// Why a certificate's SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanRefusal {
    /// No usable SPIFFE URI SAN: none, several, malformed, or the certificate does not parse.
    #[error("the certificate has no single valid SPIFFE ID URI SAN")]
    BadSan,
    /// A valid SPIFFE ID in another trust domain than ours.
    #[error("the peer's identity {found} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The peer's ID.
        found: String,
        /// Our trust domain.
        expected: String,
    },
    /// A valid ID in our trust domain, but not the one the config names for this endpoint.
    #[error("the server is {found}, the config expects {expected}")]
    WrongIdentity {
        /// The server's ID.
        found: String,
        /// The config's.
        expected: String,
    },
}

impl SanRefusal {
    /// The handshake result it is counted as.
    pub fn result(&self) -> HandshakeResult {
        match self {
            Self::BadSan => HandshakeResult::BadSan,
            Self::WrongTrustDomain { .. } => HandshakeResult::WrongTrustDomain,
            Self::WrongIdentity { .. } => HandshakeResult::WrongIdentity,
        }
    }

    /// As a rustls error, so the handshake fails with a `bad_certificate` alert and the cause
    /// can be recovered by [`classify`].
    pub fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The SPIFFE ID of a DER certificate: its one `spiffe://` URI SAN.
pub fn spiffe_id(der: &[u8]) -> Result<SpiffeId, SanRefusal> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SanRefusal::BadSan)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SanRefusal::BadSan)?
        .ok_or(SanRefusal::BadSan)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(SanRefusal::BadSan);
    };
    SpiffeId::parse(uri).map_err(|_| SanRefusal::BadSan)
}

/// The first rustls error in an error's chain (through Pingora's errors and `io::Error`s).
pub fn rustls_cause<'e>(error: &'e (dyn StdError + 'static)) -> Option<&'e rustls::Error> {
    let mut current: Option<&'e (dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            current = Some(inner);
            continue;
        }
        if let Some(p) = e.downcast_ref::<pingora::Error>() {
            current = p.cause.as_deref().map(|c| c as &(dyn StdError + 'static));
            continue;
        }
        current = e.source();
    }
    None
}

/// The counted cause of a failed handshake.
pub fn classify(error: &(dyn StdError + 'static)) -> HandshakeResult {
    match rustls_cause(error) {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => HandshakeResult::Expired,
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnhandledCriticalExtension
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. } => HandshakeResult::Untrusted,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                HandshakeResult::WrongIdentity
            }
            CertificateError::Other(OtherError(other)) => other
                .downcast_ref::<SanRefusal>()
                .map_or(HandshakeResult::Handshake, SanRefusal::result),
            _ => HandshakeResult::Handshake,
        },
        _ => HandshakeResult::Handshake,
    }
}

/// The counted cause of a failed handshake whose typed error is gone, from its message.
///
/// Pingora's TLS handshakes (upstream connect and downstream accept) report a failure as an
/// error *explained* with the rustls error's text, dropping the typed cause (`explain_err`),
/// so the outbound HTTP path can only read the text; rustls's `Display` for certificate
/// errors is stable within 0.23. The inbound path does not need this: its own verifier notes
/// the cause ([`super::inbound`]).
pub fn classify_message(message: &str) -> HandshakeResult {
    let Some((_, cert)) = message.split_once("invalid peer certificate: ") else {
        return HandshakeResult::Handshake;
    };
    let has = |needle: &str| cert.contains(needle);
    if has("not valid for name") || has("NotValidForName") {
        HandshakeResult::WrongIdentity
    } else if has("expired") || has("Expired") || has("not valid yet") || has("NotValidYet") {
        HandshakeResult::Expired
    } else if has("UnknownIssuer") || has("BadSignature") || has("issuer") {
        HandshakeResult::Untrusted
    } else {
        HandshakeResult::Handshake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn the_one_spiffe_uri_san_is_the_identity() {
        let der = leaf(vec![
            rcgen::SanType::DnsName("web.shop.sa.cluster.local".try_into().unwrap()),
            uri("spiffe://cluster.local/ns/shop/sa/web"),
        ]);
        assert_eq!(
            spiffe_id(&der),
            Ok(SpiffeId::new("cluster.local", "shop", "web"))
        );
    }

    #[test]
    fn no_several_or_malformed_spiffe_ids_are_a_bad_san() {
        for sans in [
            vec![],
            vec![rcgen::SanType::DnsName("x.example".try_into().unwrap())],
            vec![uri("spiffe://cluster.local/web")],
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ],
        ] {
            assert_eq!(spiffe_id(&leaf(sans)), Err(SanRefusal::BadSan));
        }
        assert_eq!(spiffe_id(b"not a certificate"), Err(SanRefusal::BadSan));
    }

    #[test]
    fn causes_are_recovered_through_io_and_pingora_errors() {
        let refusal = SanRefusal::WrongTrustDomain {
            found: "spiffe://other/ns/a/sa/b".into(),
            expected: "cluster.local".into(),
        };
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refusal.into_rustls());
        assert_eq!(classify(&io), HandshakeResult::WrongTrustDomain);
        let wrapped = pingora::Error::because(
            pingora::ErrorType::TLSHandshakeFailure,
            "tls stream error",
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::Expired),
            ),
        );
        assert_eq!(classify(&*wrapped), HandshakeResult::Expired);
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(classify(&unknown), HandshakeResult::Untrusted);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(classify(&eof), HandshakeResult::Handshake);
    }

    #[test]
    fn pingoras_flattened_messages_still_name_the_cause() {
        let msg = |e: CertificateError| {
            format!(
                "TLS connect() failed: TLSHandshakeFailure context: tls connect error cause: {}, SNI: a.b.sa.c",
                rustls::Error::InvalidCertificate(e)
            )
        };
        assert_eq!(
            classify_message(&msg(CertificateError::NotValidForName)),
            HandshakeResult::WrongIdentity
        );
        assert_eq!(
            classify_message(&msg(CertificateError::Expired)),
            HandshakeResult::Expired
        );
        assert_eq!(
            classify_message(&msg(CertificateError::UnknownIssuer)),
            HandshakeResult::Untrusted
        );
        assert_eq!(
            classify_message("TLS connect() failed: connection reset"),
            HandshakeResult::Handshake
        );
    }
}
