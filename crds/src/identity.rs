//! Workload identity: the names and the wire contract shared by the signer (in the operator),
//! the webhook that bootstraps a proxy, and the proxy that asks for its certificate.
//!
//! A workload's identity is its ServiceAccount, written as a SPIFFE ID,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` (the URI SAN of its
//! certificate, as in Istio), plus one DNS SAN derived from it, `<sa>.<ns>.sa.<trust-domain>`
//! (X.509-SVID §2 allows other SANs). The DNS form exists so that stock TLS stacks (webpki,
//! Pingora's upstream connector) can check a server's identity through SNI; the signer only ever
//! issues the two together, so under Tandem's trust anchors one implies the other.
//!
//! Issuance (`POST /v1/certify` on the signer, HTTPS): the proxy sends a CSR for a key it made in
//! memory, with its projected ServiceAccount token (audience [`TOKEN_AUDIENCE`]) as a bearer
//! token. The signer reviews the token (TokenReview) and takes the identity from the token only:
//! the CSR contributes its public key and nothing else.
//!
//! Pure: no I/O, no kube, so the proxy can depend on it.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The trust domain when none is configured (as in Istio and Linkerd).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Audience of the projected ServiceAccount token a proxy presents to the signer.
pub const TOKEN_AUDIENCE: &str = "tandem";
/// Lifetime the webhook asks for the projected token (the kubelet refreshes it at 80 %).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3_600;
/// Directory of the projected token volume inside the proxy container.
pub const TOKEN_DIR: &str = "/var/run/secrets/tandem.dev/identity";
/// File name of the token inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";

/// ConfigMap, in every namespace with injected pods, holding the trust anchors (PEM, one or more
/// roots: during a rotation the old and the new root are both in it).
pub const TRUST_ROOTS_CONFIG_MAP: &str = "tandem-trust-roots";
/// Key of the PEM bundle in [`TRUST_ROOTS_CONFIG_MAP`], and file name in [`TRUST_ROOTS_DIR`].
pub const TRUST_ROOTS_KEY: &str = "roots.pem";
/// Directory the trust-roots ConfigMap is mounted at inside the proxy container.
pub const TRUST_ROOTS_DIR: &str = "/var/run/secrets/tandem.dev/trust";

/// Secret in the system namespace holding the issuer (cert-manager layout: `tls.crt` is the
/// issuer certificate (chain), `tls.key` its key, `ca.crt` the trust anchors).
pub const ISSUER_SECRET: &str = "tandem-identity-issuer";
/// Key of the issuer certificate (and any intermediates) in [`ISSUER_SECRET`].
pub const ISSUER_CERT_KEY: &str = "tls.crt";
/// Key of the issuer private key in [`ISSUER_SECRET`].
pub const ISSUER_KEY_KEY: &str = "tls.key";
/// Key of the trust anchors in [`ISSUER_SECRET`].
pub const ISSUER_ROOTS_KEY: &str = "ca.crt";

/// Port the signer listens on (HTTPS).
pub const SIGNER_PORT: u16 = 15030;
/// The Service in front of the signer, in the system namespace.
pub const SIGNER_SERVICE: &str = "tandem-identity";
/// The path of the certify call.
pub const CERTIFY_PATH: &str = "/v1/certify";

/// ALPN protocol a proxy offers when it carries opaque TCP over mutual TLS to a peer proxy.
/// HTTP over mutual TLS negotiates `h2` or `http/1.1`, which tells the inbound proxy the inner
/// protocol without sniffing decrypted bytes (see `proxy/README.md`).
pub const ALPN_TCP: &[u8] = b"tandem/1";

/// Default certificate lifetime, in seconds (24 h, as Linkerd and Istio).
pub const DEFAULT_CERT_TTL_SECONDS: u64 = 86_400;
/// Fraction of a certificate's lifetime after which the proxy renews it.
pub const RENEW_AT_FRACTION: f64 = 0.7;

/// The signer's DNS name inside the cluster, which its serving certificate carries.
pub fn signer_dns_name() -> String {
    format!("{SIGNER_SERVICE}.{}.svc", crate::names::SYSTEM_NAMESPACE)
}

/// A workload identity: trust domain, namespace and ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain (`cluster.local` by default).
    pub trust_domain: String,
    /// Namespace of the workload.
    pub namespace: String,
    /// ServiceAccount of the workload.
    pub service_account: String,
}

/// Why a string is not a Tandem SPIFFE ID.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID (no spiffe:// scheme)")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{0:?} is not a workload SPIFFE ID (path must be /ns/<namespace>/sa/<service-account>)"
    )]
    Path(String),
    /// A part is empty or holds characters a Kubernetes name cannot.
    #[error("{0:?} has an invalid trust domain, namespace or ServiceAccount name")]
    Name(String),
}

impl SpiffeId {
    /// The identity of a ServiceAccount.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(uri.to_owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(uri.to_owned()))?;
        let parts: Vec<&str> = path.split('/').collect();
        let ["ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(SpiffeIdError::Path(uri.to_owned()));
        };
        let id = Self::new(trust_domain, namespace, service_account);
        if !(is_dns_label_list(trust_domain)
            && is_dns_label(namespace)
            && is_dns_label_list(service_account))
        {
            return Err(SpiffeIdError::Name(uri.to_owned()));
        }
        Ok(id)
    }

    /// The URI SAN: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// The derived DNS SAN, also the SNI a client sends: `<sa>.<ns>.sa.<td>`.
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.sa.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }

    /// The Kubernetes username a TokenReview reports for this ServiceAccount.
    pub fn service_account_username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Parses a TokenReview username `system:serviceaccount:<ns>:<sa>` into namespace and name.
pub fn parse_service_account_username(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (is_dns_label(namespace) && is_dns_label_list(name)).then_some((namespace, name))
}

/// An RFC 1123 label: lower-case alphanumerics and `-`, 1–63 characters, alphanumeric at both
/// ends (what a namespace name is).
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS subdomain: labels joined by dots (what a ServiceAccount name and a trust domain are).
fn is_dns_label_list(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The body of `POST /v1/certify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertifyRequest {
    /// PEM `CERTIFICATE REQUEST` (PKCS#10) for the proxy's key. Only its public key is used.
    pub csr: String,
}

/// The answer to a successful certify call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertifyResponse {
    /// PEM chain: the leaf first, then the issuer (and any intermediates), not the root.
    pub certificate_chain: String,
    /// The identity the certificate was issued for (from the token).
    pub identity: String,
    /// Expiry of the leaf, in seconds since the Unix epoch.
    pub not_after_unix: u64,
}

/// The answer to a refused certify call (4xx / 5xx), as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertifyError {
    /// A stable reason (`Unauthenticated`, `BadCsr`, `PodNotFound`, `IssuerUnavailable`, …).
    pub reason: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Whether a workload accepts plaintext inbound traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    /// Accept mutual TLS from meshed peers and plaintext from anyone else (the default, so
    /// unmeshed clients keep working). Outbound, mutual TLS is always used towards meshed
    /// endpoints whose identity is known.
    #[default]
    Permissive,
    /// Refuse plaintext and TLS that is not Tandem's: only meshed peers with a valid certificate
    /// under the trust anchors get through.
    Strict,
}

impl MtlsMode {
    /// The annotation value (`permissive`, `strict`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }

    /// Parses an annotation value (case-insensitive).
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "permissive" => Some(Self::Permissive),
            "strict" => Some(Self::Strict),
            _ => None,
        }
    }
}

/// Annotation on a namespace or a ServiceAccount choosing its [`MtlsMode`]; the ServiceAccount's
/// wins over its namespace's, which wins over the mesh-wide default (operator flag).
pub const MTLS_MODE_ANNOTATION: &str = "tandem.dev/mtls";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spiffe_id_round_trips_through_its_uri() {
        let id = SpiffeId::new("cluster.local", "shop", "web");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string(), id.uri());
        assert_eq!(SpiffeId::parse(&id.uri()), Ok(id.clone()));
        assert_eq!(id.dns_name(), "web.shop.sa.cluster.local");
        assert_eq!(
            id.service_account_username(),
            "system:serviceaccount:shop:web"
        );
    }

    #[test]
    fn malformed_spiffe_ids_are_refused_with_the_reason() {
        assert!(matches!(
            SpiffeId::parse("https://cluster.local/ns/a/sa/b"),
            Err(SpiffeIdError::Scheme(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://cluster.local/ns/a"),
            Err(SpiffeIdError::Path(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b/extra"),
            Err(SpiffeIdError::Path(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://cluster.local/ns/A/sa/b"),
            Err(SpiffeIdError::Name(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe:///ns/a/sa/b"),
            Err(SpiffeIdError::Name(_))
        ));
    }

    #[test]
    fn service_account_usernames_parse_and_others_do_not() {
        assert_eq!(
            parse_service_account_username("system:serviceaccount:shop:web"),
            Some(("shop", "web"))
        );
        assert_eq!(parse_service_account_username("system:node:n1"), None);
        assert_eq!(parse_service_account_username("alice"), None);
        assert_eq!(
            parse_service_account_username("system:serviceaccount:shop:"),
            None
        );
    }

    #[test]
    fn mtls_modes_parse_from_annotations() {
        assert_eq!(MtlsMode::parse("Strict"), Some(MtlsMode::Strict));
        assert_eq!(MtlsMode::parse(" permissive "), Some(MtlsMode::Permissive));
        assert_eq!(MtlsMode::parse("off"), None);
        assert_eq!(MtlsMode::default().as_str(), "permissive");
    }
}
