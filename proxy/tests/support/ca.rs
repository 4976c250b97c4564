//! A test certificate authority and a real HTTPS signer implementing the certify contract
//! (`tandem_crds::identity`), on loopback port 0.
//!
//! [`TestCa`] makes roots and intermediates, serving certificates for DNS names, and workload
//! leaves for a [`SpiffeId`] (URI SAN `spiffe://…` plus the DNS SAN `<sa>.<ns>.sa.<td>`, server
//! and client auth, random serial), either with a fresh key ([`TestCa::issue_spiffe`]) or for a
//! public key taken from a CSR ([`TestCa::sign_spiffe`]). [`TestSigner`] serves
//! `POST /v1/certify` over rustls: the bearer token picks the identity, the CSR contributes only
//! its public key, as the real signer does. [`identity_state`] and [`identity`] fill an
//! `IdentityState` directly, for data-plane tests that need credentials but no signer; [`Leaf`]
//! describes the odd leaves those tests need (another trust domain, expired).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use tandem_crds::identity::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, SpiffeId, signer_dns_name,
};
use tandem_proxy::identity::{Credentials, IdentityState, TrustBundle};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::FromDer;

/// A certificate authority: a root, or an intermediate under one.
pub struct TestCa {
    /// The CA's certificate.
    pub cert: CertificateDer<'static>,
    /// The CA's certificate, PEM.
    pub pem: String,
    /// The certificates between this CA and its root, this CA first, the root excluded (what a
    /// leaf's chain carries after the leaf). Empty for a root.
    pub chain: Vec<CertificateDer<'static>>,
    /// [`chain`](Self::chain), PEM.
    pub chain_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

/// A certificate issued by a [`TestCa`], with its key.
pub struct Issued {
    /// Leaf first, then the issuing CA's chain (the root excluded).
    pub chain: Vec<CertificateDer<'static>>,
    /// The chain, PEM, leaf first.
    pub chain_pem: String,
    /// The leaf's private key (absent for [`TestCa::sign_spiffe`], whose key the caller holds).
    pub key: Option<PrivatePkcs8KeyDer<'static>>,
    /// The serial, hex.
    pub serial: String,
}

impl Issued {
    /// The key in the form rustls configs take.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.as_ref().expect("issued with a key").clone_key())
    }

    /// The proxy's [`Credentials`] for this workload leaf (from [`TestCa::issue_spiffe`]), to
    /// install with `IdentityState::set_credentials` without a signer.
    pub fn credentials(&self, id: &SpiffeId) -> Credentials {
        let key = self.key.as_ref().expect("issued with a key").clone_key();
        let certified = rustls::sign::CertifiedKey::from_der(
            self.chain.clone(),
            PrivateKeyDer::Pkcs8(key.clone_key()),
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap();
        let (_, leaf) =
            x509_parser::certificate::X509Certificate::from_der(self.chain[0].as_ref()).unwrap();
        let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64);
        Credentials {
            id: id.clone(),
            chain: self.chain.clone(),
            key,
            certified: Arc::new(certified),
            not_before: at(leaf.validity().not_before.timestamp()),
            not_after: at(leaf.validity().not_after.timestamp()),
            serial: self.serial.clone(),
        }
    }
}

/// A [`TrustBundle`] of these roots, to install with `IdentityState::set_trust`.
pub fn trust_bundle(roots: &[&TestCa]) -> TrustBundle {
    TrustBundle::from_der(roots.iter().map(|ca| ca.cert.clone()).collect()).unwrap()
}

/// An [`IdentityState`] holding a fresh leaf for `id` under `issuer` (valid `ttl`) and the
/// trust anchors `roots`: what a proxy has once its identity client has done its work.
pub fn identity_state(
    issuer: &TestCa,
    roots: &[&TestCa],
    id: &SpiffeId,
    ttl: Duration,
) -> Arc<IdentityState> {
    let state = Arc::new(IdentityState::default());
    state.set_credentials(Arc::new(issuer.issue_spiffe(id, ttl).credentials(id)));
    state.set_trust(Arc::new(trust_bundle(roots)));
    state
}

/// An [`IdentityState`] holding `credentials` and trusting `roots`.
pub fn identity(credentials: Arc<Credentials>, roots: &[&TestCa]) -> Arc<IdentityState> {
    let state = Arc::new(IdentityState::default());
    state.set_credentials(credentials);
    state.set_trust(Arc::new(trust_bundle(roots)));
    state
}

/// What a workload leaf looks like, for [`TestCa::issue`]; [`Leaf::new`] is a good one.
pub struct Leaf {
    /// The URI SAN (and the derived DNS SAN).
    pub id: SpiffeId,
    /// Whether its validity ended a day ago.
    pub expired: bool,
}

impl Leaf {
    /// A leaf for `ns/sa` in `cluster.local`, valid for a day.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            id: SpiffeId::new("cluster.local", namespace, service_account),
            expired: false,
        }
    }

    /// In another trust domain.
    pub fn in_trust_domain(mut self, trust_domain: &str) -> Self {
        self.id.trust_domain = trust_domain.to_owned();
        self
    }

    /// Expired a day ago.
    pub fn expired(mut self) -> Self {
        self.expired = true;
        self
    }
}

/// A public key taken from a CSR (P-256, as the proxy makes them).
struct CsrKey(Vec<u8>);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // positive and never led by a zero byte
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().0);
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3_600)).into();
    params.not_after = (now + Duration::from_secs(10 * 86_400)).into();
    params
}

impl TestCa {
    /// A self-signed root named `name`.
    pub fn root(name: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name);
        let signed = params.self_signed(&key).unwrap();
        Self {
            pem: signed.pem(),
            cert: signed.der().clone(),
            chain: Vec::new(),
            chain_pem: String::new(),
            params,
            key,
        }
    }

    /// An intermediate CA under this one (the signer's issuer, in the real layout).
    pub fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = ca_params(name);
        let signed = params.signed_by(&key, &self.issuer()).unwrap();
        let cert = signed.der().clone();
        let mut chain = vec![cert.clone()];
        chain.extend(self.chain.iter().cloned());
        Self {
            pem: signed.pem(),
            cert,
            chain,
            chain_pem: format!("{}{}", signed.pem(), self.chain_pem),
            params,
            key,
        }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    fn finish(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
    ) -> (Vec<CertificateDer<'static>>, String) {
        let leaf = params.signed_by(key, &self.issuer()).unwrap();
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        (chain, format!("{}{}", leaf.pem(), self.chain_pem))
    }

    fn leaf_params(&self, sans: Vec<SanType>, ttl: Duration) -> (CertificateParams, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (serial, hex) = random_serial();
        params.serial_number = Some(serial);
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + ttl).into();
        (params, hex)
    }

    fn spiffe_sans(id: &SpiffeId) -> Vec<SanType> {
        vec![
            SanType::URI(id.uri().try_into().unwrap()),
            SanType::DnsName(id.dns_name().try_into().unwrap()),
        ]
    }

    /// Signs `params` (serial `serial`) for a fresh P-256 key, which the result keeps.
    fn issue_with_new_key(&self, params: &CertificateParams, serial: String) -> Issued {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (chain, chain_pem) = self.finish(params, &key);
        Issued {
            chain,
            chain_pem,
            key: Some(PrivatePkcs8KeyDer::from(key.serialize_der())),
            serial,
        }
    }

    /// A workload leaf for `id`, valid `ttl` from now, with a fresh P-256 key.
    pub fn issue_spiffe(&self, id: &SpiffeId, ttl: Duration) -> Issued {
        let (params, serial) = self.leaf_params(Self::spiffe_sans(id), ttl);
        self.issue_with_new_key(&params, serial)
    }

    /// The proxy's [`Credentials`] for a workload leaf described by `leaf`, with a fresh key.
    pub fn issue(&self, leaf: Leaf) -> Arc<Credentials> {
        const DAY: Duration = Duration::from_secs(86_400);
        let (mut params, serial) = self.leaf_params(Self::spiffe_sans(&leaf.id), DAY);
        if leaf.expired {
            let now = SystemTime::now();
            params.not_before = (now - 2 * DAY).into();
            params.not_after = (now - DAY).into();
        }
        Arc::new(
            self.issue_with_new_key(&params, serial)
                .credentials(&leaf.id),
        )
    }

    /// A workload leaf for `id` certifying `public_key` (a DER SubjectPublicKeyInfo's key bits,
    /// P-256), valid `ttl` from now.
    fn sign_spiffe_key(&self, public_key: Vec<u8>, id: &SpiffeId, ttl: Duration) -> Issued {
        let (params, serial) = self.leaf_params(Self::spiffe_sans(id), ttl);
        let (chain, chain_pem) = self.finish(&params, &CsrKey(public_key));
        Issued {
            chain,
            chain_pem,
            key: None,
            serial,
        }
    }

    /// A workload leaf for `id` certifying the public key of a PEM CSR (what the signer does:
    /// the CSR's SANs are ignored), valid `ttl` from now.
    pub fn sign_spiffe(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, String> {
        let key = csr_public_key(csr_pem)?;
        Ok(self.sign_spiffe_key(key, id, ttl))
    }

    /// A serving certificate for `dns`, valid ten days, with a fresh key.
    pub fn issue_server(&self, dns: &str) -> Issued {
        let (params, serial) = self.leaf_params(
            vec![SanType::DnsName(dns.try_into().unwrap())],
            Duration::from_secs(10 * 86_400),
        );
        self.issue_with_new_key(&params, serial)
    }
}

/// The public key bits of a PEM CSR, if it is a well-formed P-256 CSR.
fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, String> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| format!("not a PEM CSR: {e}"))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("not a CSR: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err("not an EC key".into());
    }
    Ok(spki.subject_public_key.as_ref().to_vec())
}

/// How the signer misbehaves, to test the proxy's checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// It follows the contract.
    No,
    /// It certifies a key of its own instead of the CSR's.
    WrongKey,
    /// It answers 503 `IssuerUnavailable`.
    Unavailable,
}

struct SignerState {
    issuer: TestCa,
    tokens: Mutex<HashMap<String, SpiffeId>>,
    ttl: Mutex<Duration>,
    misbehave: Mutex<Misbehave>,
    requests: AtomicUsize,
    issued: Mutex<Vec<String>>,
    csr_sans: Mutex<Vec<Vec<String>>>,
    csr_keys: Mutex<Vec<Vec<u8>>>,
}

/// A real HTTPS signer on loopback port 0, serving `POST /v1/certify`; stopped on drop.
pub struct TestSigner {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The name its certificate carries ([`signer_dns_name`]).
    pub name: String,
    state: Arc<SignerState>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSigner {
    /// Starts a signer whose serving certificate and workload leaves come from `issuer`.
    /// Certificates are valid 24 h unless [`set_ttl`](Self::set_ttl) says otherwise.
    pub async fn start(issuer: TestCa) -> Self {
        let name = signer_dns_name();
        let serving = issuer.issue_server(&name);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(serving.chain.clone(), serving.private_key())
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(SignerState {
            issuer,
            tokens: Mutex::new(HashMap::new()),
            ttl: Mutex::new(Duration::from_secs(86_400)),
            misbehave: Mutex::new(Misbehave::No),
            requests: AtomicUsize::new(0),
            issued: Mutex::new(Vec::new()),
            csr_sans: Mutex::new(Vec::new()),
            csr_keys: Mutex::new(Vec::new()),
        });
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            name,
            state,
            task,
        }
    }

    /// Accepts `token` as the ServiceAccount token of `id`.
    pub fn allow(&self, token: &str, id: &SpiffeId) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), id.clone());
    }

    /// Lifetime of the certificates issued from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        *self.state.ttl.lock().unwrap() = ttl;
    }

    /// How the signer behaves from now on.
    pub fn misbehave(&self, how: Misbehave) {
        *self.state.misbehave.lock().unwrap() = how;
    }

    /// Certify calls received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Serials (hex) of the certificates issued, in order.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    /// The public key of each CSR received, in order.
    pub fn csr_keys(&self) -> Vec<Vec<u8>> {
        self.state.csr_keys.lock().unwrap().clone()
    }

    /// The URI SANs of each CSR received, in order.
    pub fn csr_uri_sans(&self) -> Vec<Vec<String>> {
        self.state.csr_sans.lock().unwrap().clone()
    }
}

impl Drop for TestSigner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: u16, body: &impl serde::Serialize) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

fn refuse(status: u16, reason: &str, message: &str) -> hyper::Response<Full<Bytes>> {
    json(
        status,
        &CertifyError {
            reason: reason.into(),
            message: message.into(),
        },
    )
}

async fn handle(
    state: &SignerState,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    if req.uri().path() != CERTIFY_PATH || req.method() != http::Method::POST {
        return refuse(404, "NotFound", "POST /v1/certify");
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Ok(body) = req.into_body().collect().await else {
        return refuse(400, "BadRequest", "body unreadable");
    };
    let id = token.and_then(|t| state.tokens.lock().unwrap().get(&t).cloned());
    let Some(id) = id else {
        return refuse(401, "Unauthenticated", "token not accepted");
    };
    let misbehave = *state.misbehave.lock().unwrap();
    if misbehave == Misbehave::Unavailable {
        return refuse(503, "IssuerUnavailable", "no issuer loaded");
    }
    let Ok(request) = serde_json::from_slice::<CertifyRequest>(&body.to_bytes()) else {
        return refuse(400, "BadCsr", "body is not a CertifyRequest");
    };
    state
        .csr_sans
        .lock()
        .unwrap()
        .push(csr_uri_sans(&request.csr));
    if let Ok(key) = csr_public_key(&request.csr) {
        state.csr_keys.lock().unwrap().push(key);
    }
    let ttl = *state.ttl.lock().unwrap();
    let issued = match misbehave {
        Misbehave::WrongKey => state.issuer.issue_spiffe(&id, ttl),
        _ => match state.issuer.sign_spiffe(&request.csr, &id, ttl) {
            Ok(issued) => issued,
            Err(e) => return refuse(400, "BadCsr", &e),
        },
    };
    state.issued.lock().unwrap().push(issued.serial.clone());
    let not_after = SystemTime::now() + ttl;
    json(
        200,
        &CertifyResponse {
            certificate_chain: issued.chain_pem,
            identity: id.uri(),
            not_after_unix: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        },
    )
}

fn csr_uri_sans(csr_pem: &str) -> Vec<String> {
    let Ok(der) = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok((_, csr)) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    if let x509_parser::extensions::GeneralName::URI(uri) = name {
                        out.push((*uri).to_owned());
                    }
                }
            }
        }
    }
    out
}
