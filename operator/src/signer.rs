//! The signer: `POST /v1/certify` over HTTPS, on every replica.
//!
//! A proxy sends a CSR and its projected ServiceAccount token (audience `tandem`) as a bearer
//! token. The call is decided in three steps, the first and last pure:
//!
//! 1. [`identity_of`]: the TokenReview's answer must be authenticated, for audience `tandem`,
//!    and for a ServiceAccount user; that ServiceAccount is the identity, whatever the CSR says.
//! 2. A pod-bound token (`user.extra` names a pod) must still belong to a live pod with that
//!    UID ([`check_pod`]), so a token copied out of a deleted pod signs nothing.
//! 3. [`crate::ca::Authority::issue`] signs the CSR's public key (nothing else of the CSR).
//!
//! Steps 1 and 2 are [`authenticate`], which the config stream ([`crate::stream`]) shares: it
//! is served on the same listener.
//!
//! The server presents a certificate the issuer signed for `tandem-identity.tandem-system.svc`,
//! renewed before it expires and re-issued when the issuer changes; proxies verify it against
//! the trust anchors they already hold for mutual TLS.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tandem_crds::identity::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, SpiffeId, TOKEN_AUDIENCE,
    parse_service_account_username, signer_dns_name,
};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::ca::{self, Authority};
use crate::issuer::CurrentAuthority;
use crate::metrics::IdentityMetrics;
use crate::{Error, Result};

/// `user.extra` key naming the pod a bound token belongs to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key with that pod's UID.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// Largest request body (a CSR is well under 2 KiB).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's smallest read buffer (and its first): requests to the signer and the stream are
/// small.
const MIN_READ_BUFFER: usize = 8192;
/// Lifetime of the signer's own serving certificate; it is renewed at two thirds.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why a certify call was refused: the `reason` of its [`CertifyError`] and its HTTP status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no bearer token, or the TokenReview did not authenticate it.
    Unauthenticated(String),
    /// 403: the token is valid but not for audience `tandem`.
    WrongAudience(String),
    /// 403: the token is bound to a pod that is gone, replaced or finished.
    PodNotFound(String),
    /// 403: the token is valid but not a ServiceAccount's (a person, a node).
    NotAServiceAccount(String),
    /// 400: the body is not a CertifyRequest, or the CSR is unusable.
    BadCsr(String),
    /// 503: no usable issuer is loaded (or it has expired).
    IssuerUnavailable(String),
    /// 503: the apiserver could not be asked (TokenReview or the pod lookup failed); retry.
    ReviewUnavailable(String),
}

impl Refusal {
    /// The stable reason, as in [`CertifyError::reason`] and the metric's label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "Unauthenticated",
            Self::WrongAudience(_) => "WrongAudience",
            Self::PodNotFound(_) => "PodNotFound",
            Self::NotAServiceAccount(_) => "NotAServiceAccount",
            Self::BadCsr(_) => "BadCsr",
            Self::IssuerUnavailable(_) => "IssuerUnavailable",
            Self::ReviewUnavailable(_) => "ReviewUnavailable",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::WrongAudience(_) | Self::PodNotFound(_) | Self::NotAServiceAccount(_) => {
                StatusCode::FORBIDDEN
            }
            Self::BadCsr(_) => StatusCode::BAD_REQUEST,
            Self::IssuerUnavailable(_) | Self::ReviewUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What went wrong, for a person.
    pub fn message(&self) -> &str {
        match self {
            Self::Unauthenticated(m)
            | Self::WrongAudience(m)
            | Self::PodNotFound(m)
            | Self::NotAServiceAccount(m)
            | Self::BadCsr(m)
            | Self::IssuerUnavailable(m)
            | Self::ReviewUnavailable(m) => m,
        }
    }
}

/// The pod a bound token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodBinding {
    /// The pod's name (in the identity's namespace).
    pub name: String,
    /// Its UID.
    pub uid: String,
}

/// Step 1: the identity a TokenReview's answer vouches for. `token` is consulted only to
/// explain a refusal (an unverified look at its audience claim), never to grant anything.
pub fn identity_of(
    status: &TokenReviewStatus,
    token: &str,
    trust_domain: &str,
) -> std::result::Result<(SpiffeId, Option<PodBinding>), Refusal> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(match unverified_audiences(token) {
            Some(audiences) if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) => {
                Refusal::WrongAudience(format!(
                    "the token is for audience {audiences:?}, not {TOKEN_AUDIENCE:?}"
                ))
            }
            _ => Refusal::Unauthenticated(format!("the token was not accepted: {why}")),
        });
    }
    // An apiserver that ignores spec.audiences authenticates for its own audience only.
    if !status
        .audiences
        .iter()
        .flatten()
        .any(|a| a == TOKEN_AUDIENCE)
    {
        return Err(Refusal::WrongAudience(format!(
            "the token is valid for {:?}, not {TOKEN_AUDIENCE:?}",
            status.audiences.clone().unwrap_or_default()
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = parse_service_account_username(&username) else {
        return Err(Refusal::NotAServiceAccount(format!(
            "{username:?} is not a ServiceAccount: only workloads get certificates"
        )));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let binding = match (first(POD_NAME_EXTRA), first(POD_UID_EXTRA)) {
        (Some(name), Some(uid)) => Some(PodBinding { name, uid }),
        (None, None) => None,
        _ => {
            return Err(Refusal::PodNotFound(
                "the token names a pod without its UID (or a UID without the pod)".to_owned(),
            ));
        }
    };
    Ok((
        SpiffeId::new(trust_domain, namespace, service_account),
        binding,
    ))
}

/// Step 2: a bound token's pod must exist with the same UID and not have finished.
pub fn check_pod(
    pod: Option<&Pod>,
    id: &SpiffeId,
    binding: &PodBinding,
) -> std::result::Result<(), Refusal> {
    let name = format!("{}/{}", id.namespace, binding.name);
    let Some(pod) = pod else {
        return Err(Refusal::PodNotFound(format!(
            "pod {name}, which the token is bound to, does not exist"
        )));
    };
    if pod.uid().as_deref() != Some(binding.uid.as_str()) {
        return Err(Refusal::PodNotFound(format!(
            "pod {name} is not the pod the token is bound to (UID differs)"
        )));
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(Refusal::PodNotFound(format!(
            "pod {name}, which the token is bound to, has terminated"
        )));
    }
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if account != id.service_account {
        return Err(Refusal::PodNotFound(format!(
            "pod {name} runs as {account}, not as the token's {}",
            id.service_account
        )));
    }
    Ok(())
}

/// The claims of a JWT, read without verifying anything: only to explain a refusal or to
/// shorten how long a reviewed token is trusted, never to grant anything.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `exp` claim of a token the TokenReview accepted (Unix seconds), if it has one.
pub fn unverified_expiry(token: &str) -> Option<i64> {
    unverified_claims(token)?.get("exp")?.as_i64()
}

/// The `aud` claim of a JWT, read without verifying anything (to name the reason of a refusal).
fn unverified_audiences(token: &str) -> Option<Vec<String>> {
    let claims = unverified_claims(token)?;
    match claims.get("aud")? {
        serde_json::Value::String(aud) => Some(vec![aud.clone()]),
        serde_json::Value::Array(auds) => Some(
            auds.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// ---------------------------------------------------------------------------------------------
// The handler

/// What the certify handler needs.
pub struct Signer {
    /// Talks to the apiserver (TokenReview, pods).
    pub client: Client,
    /// The issuer, once loaded.
    pub authority: CurrentAuthority,
    /// The trust domain of issued identities.
    pub trust_domain: String,
    /// Lifetime of issued certificates (cut at the issuer's expiry).
    pub ttl: Duration,
    /// Counters.
    pub metrics: IdentityMetrics,
}

/// The signer's routes: `POST /v1/certify`.
pub fn router(signer: Arc<Signer>) -> Router {
    Router::new()
        .route(CERTIFY_PATH, post(certify))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(signer)
}

async fn certify(State(signer): State<Arc<Signer>>, headers: HeaderMap, body: Bytes) -> Response {
    match signer.decide(&headers, &body).await {
        Ok(response) => (StatusCode::OK, axum::Json(response)).into_response(),
        Err(refusal) => {
            signer.metrics.refusal(refusal.reason());
            warn!(
                reason = refusal.reason(),
                message = refusal.message(),
                "Refused a certificate"
            );
            let body = CertifyError {
                reason: refusal.reason().to_owned(),
                message: refusal.message().to_owned(),
            };
            (refusal.status(), axum::Json(body)).into_response()
        }
    }
}

impl Signer {
    async fn decide(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> std::result::Result<CertifyResponse, Refusal> {
        let token = bearer(headers).ok_or_else(|| {
            Refusal::Unauthenticated("no Authorization: Bearer <token> header".to_owned())
        })?;
        let request: CertifyRequest = serde_json::from_slice(body)
            .map_err(|e| Refusal::BadCsr(format!("the body is not a CertifyRequest: {e}")))?;
        let public_key =
            ca::csr_public_key(&request.csr).map_err(|e| Refusal::BadCsr(e.to_string()))?;
        let authority = self.authority.borrow().clone().ok_or_else(|| {
            Refusal::IssuerUnavailable("no usable issuer Secret is loaded yet".to_owned())
        })?;

        let (id, _) = authenticate(&self.client, token, &self.trust_domain).await?;
        issue(&authority, &public_key, &id, self.ttl, &self.metrics)
    }
}

/// Steps 1 and 2, against the apiserver: who `token` belongs to, and the pod it is bound to
/// (checked to be alive). Shared by certify and the config stream ([`crate::stream`]).
pub async fn authenticate(
    client: &Client,
    token: &str,
    trust_domain: &str,
) -> std::result::Result<(SpiffeId, Option<PodBinding>), Refusal> {
    let review = review(client, token).await?;
    let (id, binding) = identity_of(&review, token, trust_domain)?;
    if let Some(binding) = &binding {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &id.namespace);
        let pod = pods.get_opt(&binding.name).await.map_err(|e| {
            Refusal::ReviewUnavailable(format!("could not look up the token's pod: {e}"))
        })?;
        check_pod(pod.as_ref(), &id, binding)?;
    }
    Ok((id, binding))
}

async fn review(client: &Client, token: &str) -> std::result::Result<TokenReviewStatus, Refusal> {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let reviewed = reviews
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::ReviewUnavailable(format!("the TokenReview failed: {e}")))?;
    Ok(reviewed.status.unwrap_or_default())
}

/// Step 3, and the log line and counter of an issuance.
fn issue(
    authority: &Authority,
    public_key: &rcgen::PublicKey,
    id: &SpiffeId,
    ttl: Duration,
    metrics: &IdentityMetrics,
) -> std::result::Result<CertifyResponse, Refusal> {
    let leaf = authority
        .issue(public_key, id, ttl, OffsetDateTime::now_utc())
        .map_err(|e| Refusal::IssuerUnavailable(e.to_string()))?;
    metrics.issued.inc();
    info!(identity = %id, serial = %leaf.serial, not_after = %leaf.not_after, "Issued a certificate");
    Ok(CertifyResponse {
        certificate_chain: leaf.chain_pem,
        identity: id.uri(),
        not_after_unix: u64::try_from(leaf.not_after.unix_timestamp()).unwrap_or(0),
    })
}

// ---------------------------------------------------------------------------------------------
// Serving

/// The rustls configuration serving `cert` (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(cert: &ca::ServingCert) -> Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::IssuerMaterial(format!("serving chain is not PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| Error::IssuerMaterial(format!("serving key is not PEM: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(Error::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Keeps `configs` serving a certificate from the current issuer: a new one whenever the
/// issuer changes, and when two thirds of the current one's lifetime have passed.
pub async fn keep_serving_cert(
    mut authority: CurrentAuthority,
    configs: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
) {
    let dns_name = signer_dns_name();
    loop {
        let current = authority.borrow_and_update().clone();
        let mut renew_in = Duration::from_secs(30);
        if let Some(current) = current {
            let now = OffsetDateTime::now_utc();
            match current
                .serving(&dns_name, SERVING_TTL, now)
                .and_then(|cert| Ok((server_config(&cert)?, cert)))
            {
                Ok((config, cert)) => {
                    info!(dns_name, not_after = %cert.not_after, "Signer serving a new certificate");
                    configs.send_replace(Some(Arc::new(config)));
                    let lifetime: time::Duration = cert.not_after - now;
                    renew_in = Duration::try_from(lifetime * 2 / 3)
                        .unwrap_or(Duration::from_secs(30))
                        .max(Duration::from_secs(10));
                }
                Err(error) => {
                    warn!(%error, "Could not issue the signer's serving certificate; retrying in 30 s")
                }
            }
        }
        tokio::select! {
            changed = authority.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(renew_in) => {}
        }
    }
}

/// Accepts TLS connections on `listener` with the configuration `configs` holds at each
/// accept, and serves `app` on them until `shutdown`; open connections then get `grace`.
/// Connections wait for the first configuration (no certificate, nothing to present).
///
/// The same loop as the webhook's `server::serve`, except that the TLS configuration is
/// re-read at every accept (the serving certificate follows the issuer); component crates do
/// not depend on one another, so it is not shared.
pub async fn serve(
    listener: TcpListener,
    mut configs: watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    tokio::select! {
        ready = configs.wait_for(Option::is_some) => if ready.is_err() { return },
        () = &mut shutdown => return,
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Some(config) = configs.borrow().clone() else { continue };
                    let acceptor = TlsAcceptor::from(config);
                    let watcher = graceful.watcher();
                    let app = app.clone();
                    tokio::spawn(async move {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => return debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => return debug!(%peer, "TLS handshake timed out"),
                        };
                        let mut builder = auto::Builder::new(TokioExecutor::new());
                        // Each idle watch keeps its connection's buffers: queue the body's
                        // lines as they are (a flattened write buffer would keep the capacity
                        // of the largest snapshot per connection) and never grow the read
                        // buffer past its first 8 KiB (requests here are a few hundred bytes).
                        builder.http1().writev(true).max_buf_size(MIN_READ_BUFFER);
                        let serving = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
                        if let Err(error) = watcher.watch(serving.into_owned()).await {
                            debug!(%peer, %error, "Connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "Signer connections still open after the grace period; closing them"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use base64::Engine as _;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    use super::*;

    fn review(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    fn refused(error: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error.to_owned()),
            ..TokenReviewStatus::default()
        }
    }

    /// An unsigned JWT-shaped token with these claims (its signature is never checked here).
    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.c2ln",
            part(&serde_json::json!({"alg": "RS256"})),
            part(&claims)
        )
    }

    fn pod(uid: &str, service_account: &str, phase: &str) -> Pod {
        let mut pod = Pod {
            spec: Some(PodSpec {
                service_account_name: Some(service_account.to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        pod.metadata.uid = Some(uid.to_owned());
        pod
    }

    #[test]
    fn the_identity_is_the_reviewed_service_account_in_the_configured_trust_domain() {
        let status = review("system:serviceaccount:shop:web", &["tandem"], &[]);
        let (id, binding) = identity_of(&status, "opaque", "example.org").unwrap();
        assert_eq!(id.uri(), "spiffe://example.org/ns/shop/sa/web");
        assert_eq!(binding, None);
    }

    #[test]
    fn a_pod_bound_token_names_its_pod() {
        let status = review(
            "system:serviceaccount:shop:web",
            &["tandem"],
            &[(POD_NAME_EXTRA, "web-1"), (POD_UID_EXTRA, "u-1")],
        );
        let (_, binding) = identity_of(&status, "opaque", "cluster.local").unwrap();
        assert_eq!(
            binding,
            Some(PodBinding {
                name: "web-1".into(),
                uid: "u-1".into()
            })
        );
    }

    #[test]
    fn refusals_name_their_reason_and_status() {
        let cases = [
            (
                refused("invalid bearer token"),
                "garbage".to_owned(),
                "Unauthenticated",
                401,
            ),
            (
                refused("token audiences [\"other\"] is invalid for the target audiences"),
                jwt(serde_json::json!({"aud": ["other"], "sub": "x"})),
                "WrongAudience",
                403,
            ),
            (
                refused("token has expired"),
                jwt(serde_json::json!({"aud": ["tandem"]})),
                "Unauthenticated",
                401,
            ),
            (
                review(
                    "system:serviceaccount:shop:web",
                    &["https://kubernetes.default.svc"],
                    &[],
                ),
                "opaque".to_owned(),
                "WrongAudience",
                403,
            ),
            (
                review("alice", &["tandem"], &[]),
                "opaque".to_owned(),
                "NotAServiceAccount",
                403,
            ),
            (
                review(
                    "system:serviceaccount:shop:web",
                    &["tandem"],
                    &[(POD_NAME_EXTRA, "web-1")],
                ),
                "opaque".to_owned(),
                "PodNotFound",
                403,
            ),
        ];
        for (status, token, reason, code) in cases {
            let refusal = identity_of(&status, &token, "cluster.local").unwrap_err();
            assert_eq!(refusal.reason(), reason, "{refusal:?}");
            assert_eq!(refusal.status().as_u16(), code, "{refusal:?}");
        }
    }

    #[test]
    fn a_bound_token_counts_only_while_its_pod_lives_with_the_same_uid() {
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let binding = PodBinding {
            name: "web-1".into(),
            uid: "u-1".into(),
        };
        assert_eq!(
            check_pod(Some(&pod("u-1", "web", "Running")), &id, &binding),
            Ok(())
        );
        assert_eq!(
            check_pod(Some(&pod("u-1", "web", "Pending")), &id, &binding),
            Ok(())
        );
        for (pod, why) in [
            (None, "does not exist"),
            (Some(pod("u-2", "web", "Running")), "UID differs"),
            (Some(pod("u-1", "web", "Succeeded")), "terminated"),
            (Some(pod("u-1", "web", "Failed")), "terminated"),
            (Some(pod("u-1", "db", "Running")), "runs as db"),
        ] {
            let refusal = check_pod(pod.as_ref(), &id, &binding).unwrap_err();
            assert_eq!(refusal.reason(), "PodNotFound");
            assert!(refusal.message().contains(why), "{refusal:?}");
        }
    }

    #[test]
    fn only_a_bearer_authorization_header_carries_a_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "bearer tok.en".parse().unwrap());
        assert_eq!(bearer(&headers), Some("tok.en"));
    }
}
