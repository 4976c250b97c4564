//! One certify call: make a key, send its CSR with the ServiceAccount token to the signer over
//! TLS checked against the trust anchors, check what comes back, build [`Credentials`].
//!
//! The key is generated in memory for every call (a fresh key per renewal) and never written
//! anywhere. The token is read from its file on every call: the kubelet rotates it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use tandem_crds::identity::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, SpiffeId,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::error::{BadResponse, CertifyFailure};
use super::{Credentials, TrustBundle};

/// Largest answer body read from the signer (a chain is a few KiB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Time allowed for one TCP connect to one of the signer's addresses.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `host:port` of the signer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerAddr {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl SignerAddr {
    /// Parses `host:port` (`[v6]:port` for an IPv6 address).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', ' ']) || port == 0 {
            return Err(format!("{s:?} is not host:port"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for SignerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The name the signer's certificate must carry (a DNS name or an IP address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerName(pub ServerName<'static>);

impl SignerName {
    /// Parses a DNS name or IP address.
    pub fn parse(s: &str) -> Result<Self, String> {
        ServerName::try_from(s.to_owned())
            .map(Self)
            .map_err(|e| format!("{s:?} is not a DNS name or IP address: {e}"))
    }
}

impl fmt::Display for SignerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_str())
    }
}

/// Where and how to ask for a certificate.
#[derive(Clone, Debug)]
pub struct Signer {
    /// The signer's address.
    pub addr: SignerAddr,
    /// The name the signer's certificate must carry.
    pub server_name: ServerName<'static>,
    /// The projected ServiceAccount token file.
    pub token: PathBuf,
    /// Time allowed for a whole attempt (resolve, connect, handshake, answer).
    pub timeout: Duration,
}

/// Asks the signer for a certificate for a fresh key, trusting the signer only if its
/// certificate chains to `trust`. `expected` (the identity of the certificate being renewed,
/// when there is one) goes into the CSR, whose SANs the signer ignores anyway.
pub async fn certify(
    signer: &Signer,
    trust: Option<Arc<TrustBundle>>,
    expected: Option<&SpiffeId>,
) -> Result<Credentials, CertifyFailure> {
    let token = read_token(&signer.token)?;
    let trust = trust.ok_or(CertifyFailure::NoTrust)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertifyFailure::Key)?;
    let csr = csr_pem(&key, expected).map_err(CertifyFailure::Key)?;
    let body = serde_json::to_vec(&CertifyRequest { csr })
        .map_err(|e| CertifyFailure::Request(Box::new(e)))?;
    let exchange = post(signer, &trust, &token, body);
    let (status, body) = tokio::time::timeout(signer.timeout, exchange)
        .await
        .map_err(|_| CertifyFailure::Timeout {
            addr: signer.addr.to_string(),
            after: signer.timeout,
        })??;
    let response = answer(status, &body)?;
    credentials(&response, &key, &trust, SystemTime::now()).map_err(CertifyFailure::BadResponse)
}

/// Reads the token file and checks it can be sent as a bearer token.
pub(crate) fn read_token(path: &PathBuf) -> Result<http::HeaderValue, CertifyFailure> {
    let raw = std::fs::read_to_string(path).map_err(|source| CertifyFailure::ReadToken {
        path: path.clone(),
        source,
    })?;
    let token = raw.trim();
    let bad = || CertifyFailure::BadToken { path: path.clone() };
    if token.is_empty() {
        return Err(bad());
    }
    let mut value = http::HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| bad())?;
    value.set_sensitive(true);
    Ok(value)
}

/// A PEM CSR for `key`, carrying `expected` as its URI SAN when known.
pub fn csr_pem(key: &KeyPair, expected: Option<&SpiffeId>) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = expected {
        params
            .subject_alt_names
            .push(SanType::URI(id.uri().try_into()?));
    }
    params.serialize_request(key)?.pem()
}

async fn post(
    signer: &Signer,
    trust: &TrustBundle,
    authorization: &http::HeaderValue,
    body: Vec<u8>,
) -> Result<(http::StatusCode, Bytes), CertifyFailure> {
    let addr = signer.addr.to_string();
    let tls = open(&signer.addr, &signer.server_name, trust).await?;
    let http = |source| CertifyFailure::Http {
        addr: addr.clone(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(http)?;
    // The connection task ends when the sender is dropped (end of this call) or the peer
    // closes; the attempt's timeout bounds both.
    let driver = tokio::spawn(connection);
    let request = http::Request::post(CERTIFY_PATH)
        .header(http::header::HOST, addr.as_str())
        .header(http::header::AUTHORIZATION, authorization.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)));
    let request = request.map_err(|e| CertifyFailure::Request(Box::new(e)))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| CertifyFailure::BadResponse(BadResponse::Body(e)))?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok((status, body))
}

/// A TLS connection to the signer's address (the operator's HTTPS port, which also serves the
/// config stream), trusted only if its certificate carries `server_name` and chains to
/// `trust`: the one connector of every call this proxy makes to the operator.
pub(crate) async fn open(
    addr: &SignerAddr,
    server_name: &ServerName<'static>,
    trust: &TrustBundle,
) -> Result<TlsStream<TcpStream>, CertifyFailure> {
    let name = addr.to_string();
    let tcp = connect(addr).await?;
    let config = client_config(trust).map_err(|e| CertifyFailure::Tls {
        addr: name.clone(),
        source: std::io::Error::other(e),
    })?;
    TlsConnector::from(Arc::new(config))
        .connect(server_name.clone(), tcp)
        .await
        .map_err(|source| CertifyFailure::Tls { addr: name, source })
}

async fn connect(addr: &SignerAddr) -> Result<TcpStream, CertifyFailure> {
    let name = addr.to_string();
    let resolved = tokio::net::lookup_host((addr.host.as_str(), addr.port))
        .await
        .map_err(|source| CertifyFailure::Resolve {
            addr: name.clone(),
            source,
        })?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address resolved");
    for candidate in resolved {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(candidate)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {candidate} timed out"),
                );
            }
        }
    }
    Err(CertifyFailure::Connect {
        addr: name,
        source: last,
    })
}

fn client_config(trust: &TrustBundle) -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(trust.roots.clone())
        .with_no_client_auth())
}

/// Reads the signer's answer: a [`CertifyResponse`] on 2xx, else a failure classed by status
/// (the body's [`CertifyError`] when it has one).
pub fn answer(status: http::StatusCode, body: &[u8]) -> Result<CertifyResponse, CertifyFailure> {
    if status.is_success() {
        return serde_json::from_slice(body)
            .map_err(|e| CertifyFailure::BadResponse(BadResponse::Body(Box::new(e))));
    }
    let (reason, message) = match serde_json::from_slice::<CertifyError>(body) {
        Ok(e) => (e.reason, e.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_owned(),
            String::from_utf8_lossy(&body[..body.len().min(512)])
                .trim()
                .to_owned(),
        ),
    };
    let status = status.as_u16();
    Err(match status {
        401 | 403 => CertifyFailure::Unauthenticated {
            status,
            reason,
            message,
        },
        _ => CertifyFailure::Refused {
            status,
            reason,
            message,
        },
    })
}

/// Checks an issued chain and builds the credentials: the leaf must carry exactly one URI SAN,
/// a workload SPIFFE ID equal to the identity the signer names; certify `key`'s public key; be
/// valid at `now`; and chain to `trust` (as a peer will check it).
pub fn credentials(
    response: &CertifyResponse,
    key: &KeyPair,
    trust: &TrustBundle,
    now: SystemTime,
) -> Result<Credentials, BadResponse> {
    let chain = CertificateDer::pem_slice_iter(response.certificate_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(BadResponse::Pem)?;
    let leaf_der = chain.first().ok_or(BadResponse::EmptyChain)?;
    let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref())
        .map_err(|e| BadResponse::Leaf(e.to_string()))?;

    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .map_err(|e| BadResponse::Leaf(e.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(BadResponse::UriSans(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(BadResponse::SpiffeId)?;
    if id.uri() != response.identity {
        return Err(BadResponse::IdentityMismatch {
            leaf: id.uri(),
            said: response.identity.clone(),
        });
    }

    if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(BadResponse::KeyMismatch);
    }

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let now_secs = unix_seconds(now);
    if not_after <= not_before || not_after <= now_secs || not_before < 0 {
        return Err(BadResponse::Validity {
            not_before,
            not_after,
            now: now_secs,
        });
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
            .build()
            .map_err(|e| BadResponse::Untrusted(rustls::Error::General(e.to_string())))?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    verifier
        .verify_client_cert(
            leaf_der,
            &chain[1..],
            UnixTime::since_unix_epoch(since_epoch),
        )
        .map_err(BadResponse::Untrusted)?;

    let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
    let certified = CertifiedKey::from_der(
        chain.clone(),
        PrivateKeyDer::Pkcs8(pkcs8.clone_key()),
        &provider,
    )
    .map_err(|_| BadResponse::KeyMismatch)?;
    let serial = hex(leaf.raw_serial());
    Ok(Credentials {
        id,
        chain,
        key: pkcs8,
        certified: Arc::new(certified),
        not_before: from_unix(not_before),
        not_after: from_unix(not_after),
        serial,
    })
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}

/// Hex of a DER serial, without the sign byte DER adds before a high first byte.
fn hex(bytes: &[u8]) -> String {
    let bytes = match bytes {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => bytes,
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose};

    use super::*;

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A leaf for `key` with these URI SANs, valid `from`..`to` seconds around now.
    fn leaf(ca: &Ca, key: &KeyPair, uris: &[&str], from: i64, to: i64) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let at = |s: i64| {
            if s >= 0 {
                now + Duration::from_secs(s.unsigned_abs())
            } else {
                now - Duration::from_secs(s.unsigned_abs())
            }
        };
        params.not_before = at(from).into();
        params.not_after = at(to).into();
        params
            .signed_by(key, &Issuer::from_params(&ca.params, &ca.key))
            .unwrap()
            .pem()
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn response(chain: String, identity: &str) -> CertifyResponse {
        CertifyResponse {
            certificate_chain: chain,
            identity: identity.into(),
            not_after_unix: 0,
        }
    }

    fn check(trusted: &Ca, chain: String, key: &KeyPair) -> Result<Credentials, BadResponse> {
        let trust = TrustBundle::from_pem(trusted.pem.as_bytes()).unwrap();
        credentials(&response(chain, WEB), key, &trust, SystemTime::now())
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn a_leaf_for_our_key_and_one_spiffe_id_under_the_roots_becomes_credentials() {
        let ca = ca("root");
        let key = p256();
        let creds = check(&ca, leaf(&ca, &key, &[WEB], -10, 3_600), &key).unwrap();
        assert_eq!(creds.id.uri(), WEB);
        assert!(creds.not_after > SystemTime::now());
        assert!(!creds.serial.is_empty());
        assert_eq!(creds.certified.cert.len(), 1);
        assert_eq!(creds.key.secret_pkcs8_der(), key.serialize_der().as_slice());
    }

    #[test]
    fn a_leaf_for_another_key_is_refused() {
        let ca = ca("root");
        let (ours, theirs) = (p256(), p256());
        let chain = leaf(&ca, &theirs, &[WEB], -10, 3_600);
        assert!(matches!(
            check(&ca, chain, &ours),
            Err(BadResponse::KeyMismatch)
        ));
    }

    #[test]
    fn a_leaf_without_exactly_one_spiffe_uri_is_refused() {
        let ca = ca("root");
        let key = p256();
        let none = leaf(&ca, &key, &[], -10, 3_600);
        assert!(matches!(
            check(&ca, none, &key),
            Err(BadResponse::UriSans(0))
        ));
        let two = leaf(
            &ca,
            &key,
            &[WEB, "spiffe://cluster.local/ns/shop/sa/db"],
            -10,
            3_600,
        );
        assert!(matches!(
            check(&ca, two, &key),
            Err(BadResponse::UriSans(2))
        ));
        let not_spiffe = leaf(&ca, &key, &["https://example.com/web"], -10, 3_600);
        assert!(matches!(
            check(&ca, not_spiffe, &key),
            Err(BadResponse::SpiffeId(_))
        ));
    }

    #[test]
    fn a_leaf_for_another_identity_than_the_signer_names_is_refused() {
        let ca = ca("root");
        let key = p256();
        let chain = leaf(
            &ca,
            &key,
            &["spiffe://cluster.local/ns/shop/sa/db"],
            -10,
            3_600,
        );
        assert!(matches!(
            check(&ca, chain, &key),
            Err(BadResponse::IdentityMismatch { .. })
        ));
    }

    #[test]
    fn an_expired_leaf_is_refused() {
        let ca = ca("root");
        let key = p256();
        let chain = leaf(&ca, &key, &[WEB], -3_600, -60);
        assert!(matches!(
            check(&ca, chain, &key),
            Err(BadResponse::Validity { .. })
        ));
    }

    #[test]
    fn a_leaf_not_under_the_trust_roots_is_refused() {
        let (signer, other) = (ca("root"), ca("other"));
        let key = p256();
        let chain = leaf(&signer, &key, &[WEB], -10, 3_600);
        assert!(matches!(
            check(&other, chain, &key),
            Err(BadResponse::Untrusted(_))
        ));
    }

    #[test]
    fn refusals_are_classed_by_status() {
        let body = br#"{"reason":"Unauthenticated","message":"token expired"}"#;
        let e = answer(http::StatusCode::UNAUTHORIZED, body).unwrap_err();
        assert_eq!(e.reason(), "unauthenticated");
        assert!(e.to_string().contains("token expired"), "{e}");
        let e = answer(http::StatusCode::SERVICE_UNAVAILABLE, b"upstream gone").unwrap_err();
        assert_eq!(e.reason(), "refused");
        assert!(e.to_string().contains("upstream gone"), "{e}");
        let e = answer(http::StatusCode::OK, b"<html>").unwrap_err();
        assert_eq!(e.reason(), "bad-response");
    }

    #[test]
    fn a_csr_names_the_expected_identity_when_there_is_one() {
        let key = p256();
        let id = SpiffeId::parse(WEB).unwrap();
        let with = csr_pem(&key, Some(&id)).unwrap();
        let without = csr_pem(&key, None).unwrap();
        assert!(with.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(with.len() > without.len());
    }

    #[test]
    fn signer_addresses_print_as_they_parse() {
        for s in [
            "tandem-identity.tandem-system.svc:15030",
            "127.0.0.1:1",
            "[::1]:15030",
        ] {
            assert_eq!(SignerAddr::parse(s).unwrap().to_string(), s);
        }
        assert!(SignerAddr::parse("[]:1").is_err());
        assert_eq!(
            SignerName::parse("tandem-identity.tandem-system.svc")
                .unwrap()
                .to_string(),
            "tandem-identity.tandem-system.svc"
        );
    }
}
