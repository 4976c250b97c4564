//! The bench signer: a test CA (root and issuer, P-256) and an HTTPS server on loopback that
//! answers the certify call of the identity contract ([`tandem_crds::identity`]) as the
//! operator's signer does, so the mutual-TLS topologies get real certificates by the real
//! protocol.
//!
//! It is not the operator's signer because that one reviews each token with the
//! kube-apiserver (TokenReview); the benchmark measures the data plane, so a token here is a
//! random string the benchmark wrote into a proxy's token file, mapped to the SPIFFE ID it
//! assigned to that proxy. Everything else is as in the cluster: the proxy makes its key in
//! memory, sends a PKCS#10 CSR with the token as a bearer over TLS it checks against the
//! roots file, and gets a 24 h leaf with the URI SAN and the DNS SAN of its identity, a
//! random serial, chained to the root through the issuer. The CSR contributes its public key
//! and nothing else.
//!
//! The nginx pair's certificates come from the same CA ([`TestCa::workload`]), written to
//! files, so both pairs verify the same chains.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tandem_crds::identity::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, DEFAULT_CERT_TTL_SECONDS,
    DEFAULT_TRUST_DOMAIN, SpiffeId, signer_dns_name,
};

/// The namespace of every workload the benchmark names.
pub const NAMESPACE: &str = "bench";

/// Largest certify body read (a CSR is well under 1 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long before now a certificate's validity starts (clock skew between processes is nil
/// on one machine, but a certificate valid from "now" is refused by a verifier whose clock
/// reads a second earlier).
const BACKDATE: Duration = Duration::from_secs(300);

/// Errors of the test CA and the signer.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A certificate or key could not be made.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The serving TLS config was refused.
    #[error("signer TLS config: {0}")]
    Tls(#[from] rustls::Error),
    /// The system's random source failed.
    #[error("random source failed")]
    Random,
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SignerError {
    let what = what.into();
    move |source| SignerError::Io { what, source }
}

/// `n` bytes from the system's secure random source (ring's, as rustls uses it).
fn random_bytes(n: usize) -> Result<Vec<u8>, SignerError> {
    let mut bytes = vec![0u8; n];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| SignerError::Random)?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A positive 16-byte serial (RFC 5280 allows up to 20 octets; the top bit clear keeps it
/// positive without a leading zero byte).
fn random_serial() -> Result<SerialNumber, SignerError> {
    let mut bytes = random_bytes(16)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A key (PKCS#8 PEM) and the chain certifying it (PEM: the leaf, then the issuer).
#[derive(Debug, Clone)]
pub struct KeyAndChain {
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Leaf first, then the issuer (not the root).
    pub chain_pem: String,
}

/// A leaf the CA issued for a key it was given (the certify call's answer).
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the issuer (not the root).
    pub chain_pem: String,
    /// End of the leaf's validity, seconds since the Unix epoch.
    pub not_after_unix: u64,
}

/// The benchmark's certificate authority: a self-signed root and an issuer it signed; leaves
/// are signed by the issuer.
pub struct TestCa {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    issuer_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn ca_params(common_name: &str, path_length: u8) -> Result<CertificateParams, SignerError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tandem-bench");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_length));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    // The CA outlives every run by far; its leaves last a day.
    params.not_after = now + Duration::from_secs(30 * 86_400);
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl TestCa {
    /// A fresh root and issuer (P-256, ECDSA with SHA-256), each with its own key in memory.
    pub fn new() -> Result<Self, SignerError> {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params("tandem-bench root", 1)?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Issuer::new(root_params, root_key);
        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issuer_params = ca_params("tandem-bench issuer", 0)?;
        let issuer_cert = issuer_params.signed_by(&issuer_key, &root)?;
        Ok(Self {
            root_pem: root_cert.pem(),
            issuer: Issuer::new(issuer_params, issuer_key),
            issuer_pem: issuer_cert.pem(),
        })
    }

    /// The trust anchors (the root alone), PEM: what `TANDEM_TRUST_ROOTS` and nginx's
    /// `ssl_client_certificate` / `proxy_ssl_trusted_certificate` point at.
    pub fn roots_pem(&self) -> &str {
        &self.root_pem
    }

    fn leaf(
        &self,
        sans: Vec<SanType>,
        public_key: &impl PublicKeyData,
    ) -> Result<(Certificate, u64), SignerError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(DEFAULT_CERT_TTL_SECONDS);
        // X.509 times have whole seconds: what the leaf says is the floor.
        let not_after = u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0);
        Ok((params.signed_by(public_key, &self.issuer)?, not_after))
    }

    fn chain(&self, leaf: &Certificate) -> String {
        format!("{}{}", leaf.pem(), self.issuer_pem)
    }

    /// A 24 h leaf for `id` (URI SAN and DNS SAN) certifying `public_key`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
    ) -> Result<Issued, SignerError> {
        let sans = vec![
            SanType::URI(id.uri().try_into()?),
            SanType::DnsName(id.dns_name().try_into()?),
        ];
        let (leaf, not_after) = self.leaf(sans, public_key)?;
        Ok(Issued {
            chain_pem: self.chain(&leaf),
            not_after_unix: not_after,
        })
    }

    /// A fresh key and a leaf for `id`: the certificates an nginx of the anchor pair presents.
    pub fn workload(&self, id: &SpiffeId) -> Result<KeyAndChain, SignerError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue(id, &key)?;
        Ok(KeyAndChain {
            key_pem: key.serialize_pem(),
            chain_pem: issued.chain_pem,
        })
    }

    /// The signer's own serving certificate: a leaf for `dns_name`, with its key, as DER.
    fn serving(
        &self,
        dns_name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SignerError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (leaf, _) = self.leaf(vec![SanType::DnsName(dns_name.try_into()?)], &key)?;
        let issuer = rustls::pki_types::pem::PemObject::from_pem_slice(self.issuer_pem.as_bytes())
            .map_err(|e| SignerError::Tls(rustls::Error::General(e.to_string())))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![leaf.der().clone(), issuer], key))
    }
}

/// Which token stands for which identity: what TokenReview answers in the cluster.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, SpiffeId>);

impl Tokens {
    /// A random token for the ServiceAccount `service_account` of [`NAMESPACE`]; returns it
    /// (what the proxy's token file holds).
    pub fn add(&mut self, service_account: &str) -> Result<(SpiffeId, String), SignerError> {
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, NAMESPACE, service_account);
        let token = format!("{service_account}.{}", hex(&random_bytes(16)?));
        self.0.insert(token.clone(), id.clone());
        Ok((id, token))
    }

    /// The identity `token` stands for.
    pub fn identity(&self, token: &str) -> Option<&SpiffeId> {
        self.0.get(token)
    }
}

/// A refused certify call: the status and the JSON body the contract prescribes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: StatusCode,
    /// The body.
    pub error: CertifyError,
}

fn refuse(status: StatusCode, reason: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error: CertifyError {
            reason: reason.into(),
            message: message.into(),
        },
    }
}

/// The certify call, without the HTTP around it: `authorization` is the `Authorization`
/// header, `body` the request body. The identity comes from the token only; the CSR gives its
/// public key (its signature is checked) and nothing else.
pub fn certify(
    ca: &TestCa,
    tokens: &Tokens,
    authorization: Option<&str>,
    body: &[u8],
) -> Result<CertifyResponse, Refusal> {
    let unauthenticated = |message: &str| {
        refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            message.to_owned(),
        )
    };
    let token = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthenticated("no bearer token"))?;
    let id = tokens
        .identity(token)
        .ok_or_else(|| unauthenticated("the token is not one the benchmark issued"))?;
    let request: CertifyRequest = serde_json::from_slice(body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadRequest", format!("body: {e}")))?;
    let csr = CertificateSigningRequestParams::from_pem(&request.csr)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "BadCsr", format!("CSR: {e}")))?;
    let issued = ca.issue(id, &csr.public_key).map_err(|e| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "IssuerUnavailable",
            e.to_string(),
        )
    })?;
    Ok(CertifyResponse {
        certificate_chain: issued.chain_pem,
        identity: id.uri(),
        not_after_unix: issued.not_after_unix,
    })
}

/// What the server shares between connections.
struct Shared {
    ca: Arc<TestCa>,
    tokens: Tokens,
    issued: AtomicU64,
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let refusal = |r: Refusal| {
        let body = serde_json::to_vec(&r.error).unwrap_or_default();
        json_response(r.status, body)
    };
    if request.uri().path() != CERTIFY_PATH {
        return refusal(refuse(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("only {CERTIFY_PATH} is served"),
        ));
    }
    if request.method() != Method::POST {
        return refusal(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST only",
        ));
    }
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return refusal(refuse(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("body: {e}"),
            ));
        }
    };
    match certify(&shared.ca, &shared.tokens, authorization.as_deref(), &body) {
        Ok(answer) => {
            shared.issued.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            json_response(StatusCode::OK, body)
        }
        Err(r) => refusal(r),
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            // A client that fails the handshake (it does not trust the root) is its problem.
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// The running signer: HTTPS on a loopback port, on a thread of its own (with its own
/// runtime, so it never competes with the load generator's). Dropping it stops it.
pub struct Signer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Serves the certify call for `tokens` with certificates of `ca` on 127.0.0.1 (a port
    /// the kernel picks), with a serving certificate for [`Signer::server_name`].
    pub fn start(ca: Arc<TestCa>, tokens: Tokens) -> Result<Self, SignerError> {
        let (chain, key) = ca.serving(&Self::server_name())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind the signer's port"))?;
        let addr = listener
            .local_addr()
            .map_err(io("read the signer's port"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("make the signer's socket non-blocking"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("build the signer's runtime"))?;
        let shared = Arc::new(Shared {
            ca,
            tokens,
            issued: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-signer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, acceptor, served, stopped).await,
                        Err(e) => eprintln!("bench signer: listen: {e}"),
                    }
                });
            })
            .map_err(io("start the signer's thread"))?;
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name its serving certificate carries (`TANDEM_IDENTITY_NAME`): the operator's
    /// signer's in-cluster name, so the proxy's default would do.
    pub fn server_name() -> String {
        signer_dns_name()
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> u64 {
        self.shared.issued.load(Ordering::Relaxed)
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Everything a mutual-TLS topology needs: the CA, the signer, the roots file and one token
/// file per ServiceAccount, in the topology's directory.
#[derive(Debug)]
pub struct BenchIdentity {
    /// The CA (also the source of the nginx pair's certificates).
    pub ca: Arc<TestCa>,
    /// The running signer.
    pub signer: Signer,
    /// The roots PEM file.
    pub roots: PathBuf,
    tokens: HashMap<String, (SpiffeId, PathBuf)>,
}

impl BenchIdentity {
    /// A fresh CA, `roots.pem` and one `<sa>.token` per ServiceAccount in `dir`, and the
    /// signer answering for those tokens.
    pub fn prepare(dir: &Path, service_accounts: &[&str]) -> Result<Self, SignerError> {
        let ca = Arc::new(TestCa::new()?);
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, ca.roots_pem()).map_err(io("write roots.pem"))?;
        let mut tokens = Tokens::default();
        let mut files = HashMap::new();
        for &sa in service_accounts {
            let (id, token) = tokens.add(sa)?;
            let path = dir.join(format!("{sa}.token"));
            std::fs::write(&path, &token).map_err(io(format!("write {sa}.token")))?;
            files.insert(sa.to_owned(), (id, path));
        }
        let signer = Signer::start(ca.clone(), tokens)?;
        Ok(Self {
            ca,
            signer,
            roots,
            tokens: files,
        })
    }

    /// The identity of `service_account` (in [`NAMESPACE`]).
    pub fn id(&self, service_account: &str) -> SpiffeId {
        SpiffeId::new(DEFAULT_TRUST_DOMAIN, NAMESPACE, service_account)
    }

    /// The environment that turns on a proxy's identity client as `service_account`:
    /// `TANDEM_IDENTITY_ADDR`, `_NAME`, `_TOKEN` and `TANDEM_TRUST_ROOTS`; `None` for a
    /// ServiceAccount [`BenchIdentity::prepare`] was not given.
    pub fn proxy_env(&self, service_account: &str) -> Option<Vec<(&'static str, String)>> {
        let (_, token) = self.tokens.get(service_account)?;
        Some(vec![
            ("TANDEM_IDENTITY_ADDR", self.signer.addr().to_string()),
            ("TANDEM_IDENTITY_NAME", Signer::server_name()),
            ("TANDEM_IDENTITY_TOKEN", token.display().to_string()),
            ("TANDEM_TRUST_ROOTS", self.roots.display().to_string()),
        ])
    }
}

/// The environment variables of the identity client, which a plaintext proxy must not
/// inherit from the benchmark's own environment.
pub const PROXY_IDENTITY_ENV: [&str; 4] = [
    "TANDEM_IDENTITY_ADDR",
    "TANDEM_IDENTITY_NAME",
    "TANDEM_IDENTITY_TOKEN",
    "TANDEM_TRUST_ROOTS",
];

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    fn csr(key: &KeyPair, uri: Option<&str>) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn body(csr: String) -> Vec<u8> {
        serde_json::to_vec(&CertifyRequest { csr }).unwrap()
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject as _;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn sans(der: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        for name in &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
        {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
        (uris, dns)
    }

    #[test]
    fn a_token_gets_a_leaf_for_its_identity_whatever_the_csr_asks_for() {
        let ca = TestCa::new().unwrap();
        let mut tokens = Tokens::default();
        let (id, token) = tokens.add("client").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let asks_for_more = csr(&key, Some("spiffe://cluster.local/ns/bench/sa/server"));
        let answer = certify(
            &ca,
            &tokens,
            Some(&format!("Bearer {token}")),
            &body(asks_for_more),
        )
        .unwrap();
        assert_eq!(answer.identity, "spiffe://cluster.local/ns/bench/sa/client");
        let chain = ders(&answer.certificate_chain);
        assert_eq!(chain.len(), 2, "leaf and issuer, not the root");
        let (uris, dns) = sans(&chain[0]);
        assert_eq!(uris, [id.uri()]);
        assert_eq!(dns, ["client.bench.sa.cluster.local"]);
        let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(
            lifetime as u64,
            DEFAULT_CERT_TTL_SECONDS + BACKDATE.as_secs()
        );
        assert_eq!(
            answer.not_after_unix as i64,
            leaf.validity().not_after.timestamp()
        );
    }

    #[test]
    fn serials_are_random() {
        let ca = TestCa::new().unwrap();
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, NAMESPACE, "server");
        let serial = |pair: KeyAndChain| {
            let chain = ders(&pair.chain_pem);
            let (_, leaf) = X509Certificate::from_der(chain[0].as_ref()).unwrap();
            leaf.raw_serial().to_vec()
        };
        let a = serial(ca.workload(&id).unwrap());
        let b = serial(ca.workload(&id).unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn unknown_missing_or_malformed_tokens_and_bad_csrs_are_refused_with_the_contract_s_reasons() {
        let ca = TestCa::new().unwrap();
        let mut tokens = Tokens::default();
        let (_, token) = tokens.add("client").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let good = body(csr(&key, None));
        let bearer = format!("Bearer {token}");
        let refused =
            |auth: Option<&str>, body: &[u8]| certify(&ca, &tokens, auth, body).unwrap_err();
        let r = refused(None, &good);
        assert_eq!(
            (r.status, r.error.reason.as_str()),
            (StatusCode::UNAUTHORIZED, "Unauthenticated")
        );
        let r = refused(Some("Bearer client"), &good);
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = refused(Some(&token), &good);
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "no Bearer prefix");
        let r = refused(Some(&bearer), b"{\"csr\": 1}");
        assert_eq!(
            (r.status, r.error.reason.as_str()),
            (StatusCode::BAD_REQUEST, "BadRequest")
        );
        let r = refused(Some(&bearer), &body("not a CSR".into()));
        assert_eq!(
            (r.status, r.error.reason.as_str()),
            (StatusCode::BAD_REQUEST, "BadCsr")
        );
    }

    /// A rustls client that trusts `roots_pem`, as the proxy's identity client is.
    fn client(roots_pem: &str) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for der in ders(roots_pem) {
            roots.add(der).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    async fn post(identity: &BenchIdentity, token: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let tcp = tokio::net::TcpStream::connect(identity.signer.addr())
            .await
            .unwrap();
        let name = ServerName::try_from(Signer::server_name()).unwrap();
        let tls = client(identity.ca.roots_pem())
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post(CERTIFY_PATH)
            .header(hyper::header::HOST, "signer")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn the_signer_answers_the_certify_call_over_https_checked_against_the_roots_file() {
        let dir = tempfile::tempdir().unwrap();
        let identity = BenchIdentity::prepare(dir.path(), &["client", "server"]).unwrap();
        let roots = std::fs::read_to_string(&identity.roots).unwrap();
        assert_eq!(roots, identity.ca.roots_pem());
        let env = identity.proxy_env("server").unwrap();
        let token_path = &env
            .iter()
            .find(|(k, _)| *k == "TANDEM_IDENTITY_TOKEN")
            .unwrap()
            .1;
        let token = std::fs::read_to_string(token_path).unwrap();
        assert!(token.starts_with("server."), "{token}");
        assert!(identity.proxy_env("nobody").is_none());

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (status, answer) = post(&identity, &token, body(csr(&key, None))).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let answer: CertifyResponse = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer.identity, "spiffe://cluster.local/ns/bench/sa/server");
        assert_eq!(identity.signer.issued(), 1);

        let (status, refusal) = post(&identity, "guessed", body(csr(&key, None))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let refusal: CertifyError = serde_json::from_slice(&refusal).unwrap();
        assert_eq!(refusal.reason, "Unauthenticated");
        assert_eq!(identity.signer.issued(), 1);
    }
}
