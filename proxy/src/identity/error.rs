//! Why getting a certificate or loading the trust anchors failed.

use std::path::PathBuf;
use std::time::Duration;

/// Why one certify attempt failed. Each variant belongs to one [`reason`](Self::reason), the
/// `reason` label of `tandem_identity_renewals_total{result="error"}`.
#[derive(Debug, thiserror::Error)]
pub enum CertifyFailure {
    /// The projected ServiceAccount token could not be read (not mounted yet, unreadable).
    #[error("cannot read the ServiceAccount token {path}")]
    ReadToken {
        /// The token file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file is empty or holds bytes a header cannot carry.
    #[error("the ServiceAccount token {path} is empty or not a valid bearer token")]
    BadToken {
        /// The token file.
        path: PathBuf,
    },
    /// No trust bundle is loaded, so the signer's certificate cannot be checked.
    #[error("no trust bundle loaded: the signer's certificate cannot be verified")]
    NoTrust,
    /// The signer's host name did not resolve.
    #[error("cannot resolve the signer address {addr}")]
    Resolve {
        /// `host:port` of the signer.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No address of the signer accepted a TCP connection.
    #[error("cannot connect to the signer at {addr}")]
    Connect {
        /// `host:port` of the signer.
        addr: String,
        /// The cause (of the last address tried).
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (among other causes: the signer's certificate is not for the
    /// expected name or does not chain to the trust anchors).
    #[error("TLS handshake with the signer at {addr} failed")]
    Tls {
        /// `host:port` of the signer.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange broke off.
    #[error("HTTP exchange with the signer at {addr} failed")]
    Http {
        /// `host:port` of the signer.
        addr: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The signer did not answer in time.
    #[error("no answer from the signer at {addr} within {after:?}")]
    Timeout {
        /// `host:port` of the signer.
        addr: String,
        /// How long the attempt waited.
        after: Duration,
    },
    /// The signer refused the token (HTTP 401 or 403).
    #[error("the signer refused the token: {status} {reason}: {message}")]
    Unauthenticated {
        /// The HTTP status.
        status: u16,
        /// The signer's stable reason (`Unauthenticated`, …).
        reason: String,
        /// The signer's explanation.
        message: String,
    },
    /// The signer refused to certify for another reason (any other non-2xx status).
    #[error("the signer refused to certify: {status} {reason}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The signer's stable reason (`BadCsr`, `PodNotFound`, `IssuerUnavailable`, …).
        reason: String,
        /// The signer's explanation.
        message: String,
    },
    /// The signer answered 200 with something this proxy cannot use.
    #[error("the signer's answer is unusable")]
    BadResponse(#[source] BadResponse),
    /// The key or the CSR could not be made (the system's random source failed).
    #[error("cannot make a key and CSR")]
    Key(#[source] rcgen::Error),
    /// The request could not be put together (encoding the body, building the message).
    #[error("cannot build the certify request")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CertifyFailure {
    /// The failure class, as a label value: `unauthenticated` (no usable token, or the signer
    /// refused it), `refused` (the signer said no for another reason), `unreachable` (no
    /// verified connection to the signer: no trust bundle, DNS, TCP, TLS, HTTP, timeout),
    /// `bad-response` (a 200 whose certificate is unusable) or `local` (no key or request could
    /// be made).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadToken { .. } | Self::BadToken { .. } | Self::Unauthenticated { .. } => {
                "unauthenticated"
            }
            Self::Refused { .. } => "refused",
            Self::NoTrust
            | Self::Resolve { .. }
            | Self::Connect { .. }
            | Self::Tls { .. }
            | Self::Http { .. }
            | Self::Timeout { .. } => "unreachable",
            Self::BadResponse(_) => "bad-response",
            Self::Key(_) | Self::Request(_) => "local",
        }
    }
}

/// What is wrong with a successful-looking answer of the signer.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    /// The body is not a `CertifyResponse` (or is larger than the proxy reads).
    #[error("the body is not a CertifyResponse")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The chain is not PEM.
    #[error("the certificate chain is not PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    /// The chain holds no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The leaf is not a parseable X.509 certificate.
    #[error("the leaf certificate cannot be parsed: {0}")]
    Leaf(String),
    /// The leaf carries no URI SAN, or more than one.
    #[error("the leaf must carry exactly one URI SAN, it carries {0}")]
    UriSans(usize),
    /// The leaf's URI SAN is not a workload SPIFFE ID.
    #[error("the leaf's URI SAN is not a workload SPIFFE ID")]
    SpiffeId(#[source] tandem_crds::identity::SpiffeIdError),
    /// The leaf's SPIFFE ID differs from the identity the signer says it issued.
    #[error("the leaf is for {leaf} but the signer says it issued {said}")]
    IdentityMismatch {
        /// The leaf's URI SAN.
        leaf: String,
        /// `CertifyResponse.identity`.
        said: String,
    },
    /// The leaf certifies another public key than the one this proxy sent.
    #[error("the leaf certifies a different public key than the CSR's")]
    KeyMismatch,
    /// The leaf's validity is unusable (already expired, or ends before it starts).
    #[error(
        "the leaf is not valid now (not before {not_before}, not after {not_after}, now {now})"
    )]
    Validity {
        /// `notBefore`, Unix seconds.
        not_before: i64,
        /// `notAfter`, Unix seconds.
        not_after: i64,
        /// Now, Unix seconds.
        now: i64,
    },
    /// The chain does not lead to one of the trust anchors (peers would refuse it too).
    #[error("the chain does not verify against the trust anchors")]
    Untrusted(#[source] rustls::Error),
}

/// Why a trust-roots file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read (other than being absent).
    #[error("cannot read the trust roots {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM.
    #[error("the trust roots are not PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    /// The file holds no `CERTIFICATE`.
    #[error("the trust roots file holds no CERTIFICATE")]
    Empty,
    /// A certificate cannot be a trust anchor.
    #[error("trust root {index} (0-based) is not a usable certificate")]
    Root {
        /// Its position in the file.
        index: usize,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}
