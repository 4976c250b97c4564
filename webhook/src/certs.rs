//! A CA and a serving certificate for the webhook, for clusters without cert-manager. Pure:
//! generation and the renewal rule; no I/O.
//!
//! The CA signs only the webhook's serving certificate; the apiserver trusts it through the
//! MutatingWebhookConfiguration's `caBundle`. A serving certificate is renewed once a third of
//! its lifetime remains, so a webhook that checks daily renews weeks before expiry.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Common name of the webhook's CA.
pub const CA_COMMON_NAME: &str = "tandem-webhook-ca";

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or the key.
    #[error("could not {action}")]
    Rcgen {
        /// What was being done.
        action: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A validity period does not fit in a date.
    #[error("a validity of {0:?} is out of range")]
    Validity(Duration),
}

fn rcgen(action: &'static str) -> impl FnOnce(rcgen::Error) -> CertError {
    move |source| CertError::Rcgen { action, source }
}

/// A certificate and its key, as PEM, with its validity.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Issued {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// Whether less than a third of the lifetime is left at `now` (or it is already over).
    pub fn needs_renewal(&self, now: OffsetDateTime) -> bool {
        let lifetime = self.not_after - self.not_before;
        now >= self.not_after - lifetime / 3
    }
}

/// The DNS names the apiserver may use for the webhook Service.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A new self-signed CA (ECDSA P-256) valid from `now` for `validity`.
pub fn new_ca(now: OffsetDateTime, validity: Duration) -> Result<Issued, CertError> {
    let key = KeyPair::generate().map_err(rcgen("generate the CA key"))?;
    let mut params = ca_params();
    let (not_before, not_after) = window(now, validity)?;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen("self-sign the CA"))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_before,
        not_after,
    })
}

/// A serving certificate for `dns_names`, signed by `ca`, valid from `now` for `validity`.
pub fn issue_serving(
    ca: &Issued,
    dns_names: &[String],
    now: OffsetDateTime,
    validity: Duration,
) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(rcgen("read the CA key"))?;
    // The issuer is rebuilt from our fixed CA parameters and its key: the subject and the key
    // identifier (derived from the key) are all a signature needs, so no X.509 parser is.
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate().map_err(rcgen("generate the serving key"))?;
    let mut params =
        CertificateParams::new(dns_names.to_vec()).map_err(rcgen("use the DNS names"))?;
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        dns_names.first().map_or("tandem-webhook", String::as_str),
    );
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (not_before, not_after) = window(now, validity)?;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(rcgen("sign the serving certificate"))?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_before,
        not_after,
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// `[now - 5 min, now + validity]`: a little back-dating absorbs clock skew between nodes.
fn window(
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let skew = time::Duration::minutes(5);
    let span = time::Duration::try_from(validity).map_err(|_| CertError::Validity(validity))?;
    let not_after = now.checked_add(span).ok_or(CertError::Validity(validity))?;
    Ok((now - skew, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_serving_certificate_is_renewed_when_a_third_of_its_life_is_left() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca(now, 3650 * DAY).unwrap();
        let cert = issue_serving(&ca, &service_dns_names("w", "ns"), now, 90 * DAY).unwrap();
        assert!(!cert.needs_renewal(now));
        assert!(!cert.needs_renewal(now + time::Duration::days(55)));
        assert!(cert.needs_renewal(now + time::Duration::days(61)));
        assert!(cert.needs_renewal(now + time::Duration::days(91)));
    }

    #[test]
    fn the_names_cover_every_way_the_apiserver_may_address_the_service() {
        let names = service_dns_names("tandem-webhook", "tandem-system");
        assert!(names.contains(&"tandem-webhook.tandem-system.svc".to_owned()));
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn an_absurd_validity_is_an_error_not_a_panic() {
        let error = new_ca(OffsetDateTime::now_utc(), Duration::MAX).unwrap_err();
        assert!(error.to_string().contains("out of range"), "{error}");
    }

    #[test]
    fn keys_are_not_printed() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca(now, DAY).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
