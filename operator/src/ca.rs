//! The identity CA, pure: making a root and an issuer, reading them back from the issuer
//! Secret's PEM, and signing workload certificates. No I/O; [`crate::issuer`] loads and watches
//! the Secret, [`crate::signer`] serves the certify call.
//!
//! Two tiers, as in Linkerd: a root (the trust anchor proxies verify against, 10 years) signs
//! an issuer (an intermediate CA, 1 year) whose key signs every leaf. Only the issuer's key is
//! ever loaded by the operator; a generated root's key is thrown away once it has signed the
//! issuer, so replacing the issuer later means a new root too (or a user-supplied issuer under
//! the user's own root, cert-manager layout).
//!
//! A leaf carries exactly the identity it is issued for (URI SAN, derived DNS SAN); of a CSR
//! only the public key is used.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tandem_crds::identity::SpiffeId;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Error, Result};

/// Lifetime of a generated root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a generated issuer.
pub const ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back a leaf's validity starts, for clocks a little behind ours.
pub const CLOCK_SKEW: Duration = Duration::from_secs(20);
/// Common name of a generated root.
pub const ROOT_COMMON_NAME: &str = "tandem-identity-root";
/// Common name of a generated issuer.
pub const ISSUER_COMMON_NAME: &str = "tandem-identity-issuer";

fn rcgen(action: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Certificate { action, source }
}

fn unusable(reason: impl Into<String>) -> Error {
    Error::IssuerMaterial(reason.into())
}

// ---------------------------------------------------------------------------------------------
// Material: what the issuer Secret holds

/// The three PEM values of the issuer Secret (cert-manager's layout).
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// `tls.crt`: the issuer certificate, then any intermediates up to (not including) a root.
    pub cert_pem: String,
    /// `tls.key`: the issuer's private key (PKCS#8 or SEC1 PEM).
    pub key_pem: String,
    /// `ca.crt`: the trust anchors, one or more roots (two while a rotation overlaps).
    pub roots_pem: String,
}

impl std::fmt::Debug for Material {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material").finish_non_exhaustive()
    }
}

/// A new root (self-signed, 10 years) and an issuer under it (1 year), both ECDSA P-256 CAs,
/// valid from `now`. The root's key is dropped here: see the module doc.
pub fn generate(now: OffsetDateTime) -> Result<Material> {
    let root_key = KeyPair::generate().map_err(rcgen("generate the root key"))?;
    let mut root_params = ca_params(ROOT_COMMON_NAME, None);
    (root_params.not_before, root_params.not_after) = window(now, ROOT_VALIDITY)?;
    root_params.serial_number = Some(random_serial()?);
    let root = root_params
        .self_signed(&root_key)
        .map_err(rcgen("self-sign the root"))?;
    let root_issuer = Issuer::new(root_params, root_key);

    let issuer_key = KeyPair::generate().map_err(rcgen("generate the issuer key"))?;
    // The issuer signs leaves only: no CA below it.
    let mut issuer_params = ca_params(ISSUER_COMMON_NAME, Some(0));
    (issuer_params.not_before, issuer_params.not_after) = window(now, ISSUER_VALIDITY)?;
    issuer_params.serial_number = Some(random_serial()?);
    issuer_params.use_authority_key_identifier_extension = true;
    let issuer = issuer_params
        .signed_by(&issuer_key, &root_issuer)
        .map_err(rcgen("sign the issuer with the root"))?;
    Ok(Material {
        cert_pem: issuer.pem(),
        key_pem: issuer_key.serialize_pem(),
        roots_pem: root.pem(),
    })
}

fn ca_params(common_name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "tandem");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn window(now: OffsetDateTime, validity: Duration) -> Result<(OffsetDateTime, OffsetDateTime)> {
    let out_of_range = || unusable(format!("a validity of {validity:?} is out of range"));
    let validity = time::Duration::try_from(validity).map_err(|_| out_of_range())?;
    let skew = time::Duration::try_from(CLOCK_SKEW).map_err(|_| out_of_range())?;
    let not_before = now.checked_sub(skew).ok_or_else(out_of_range)?;
    let not_after = now.checked_add(validity).ok_or_else(out_of_range)?;
    Ok((not_before, not_after))
}

/// A 16-byte serial from the operating system's CSPRNG (126 random bits: the top bit is cleared
/// so the DER INTEGER is positive, the next one set so it is never zero-led). rcgen's default
/// serial is a hash of the public key, which a reused key would repeat.
pub fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| unusable("the system random number generator failed"))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

// ---------------------------------------------------------------------------------------------
// Authority: the loaded issuer

/// A certificate's summary, for logs, metrics and expiry warnings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// Subject, RFC 4514 form.
    pub subject: String,
    /// SHA-256 of the DER, lower-case hex.
    pub fingerprint: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// The issuer, ready to sign: the key, its chain and the trust anchors from [`Material`].
pub struct Authority {
    signer: Issuer<'static, KeyPair>,
    /// `tls.crt` as loaded (issuer first), appended to every leaf.
    chain_pem: String,
    /// The issuer certificate.
    pub issuer: CertSummary,
    /// `ca.crt` as loaded: what proxies trust.
    pub roots_pem: String,
    /// Every root in `ca.crt`.
    pub roots: Vec<CertSummary>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("issuer", &self.issuer)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Reads and checks the material: `tls.crt` starts with a CA certificate whose public key
    /// is `tls.key`'s, `ca.crt` holds at least one certificate, and the top of `tls.crt` is
    /// signed by (or is) one of those roots, so what is issued verifies under what is trusted.
    pub fn load(material: &Material) -> Result<Self> {
        let chain = ders(&material.cert_pem, "tls.crt")?;
        let roots_der = ders(&material.roots_pem, "ca.crt")?;
        let key = KeyPair::from_pem(&material.key_pem).map_err(rcgen("read tls.key"))?;

        let parsed_chain = chain
            .iter()
            .map(|der| parse(der, "tls.crt"))
            .collect::<Result<Vec<_>>>()?;
        let parsed_roots = roots_der
            .iter()
            .map(|der| parse(der, "ca.crt"))
            .collect::<Result<Vec<_>>>()?;
        let (Some(issuer_cert), Some(top)) = (parsed_chain.first(), parsed_chain.last()) else {
            return Err(unusable("tls.crt holds no certificate"));
        };
        if !issuer_cert.is_ca() {
            return Err(unusable(
                "the first certificate of tls.crt is not a CA (basicConstraints CA:TRUE)",
            ));
        }
        if issuer_cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(unusable(
                "tls.key is not the key of the first certificate in tls.crt",
            ));
        }
        let top_der = chain.last().map(|der| der.as_ref());
        let anchored = parsed_roots
            .iter()
            .zip(&roots_der)
            .any(|(root, der)| Some(der.as_ref()) == top_der || signed_by(top, root));
        if !anchored {
            return Err(unusable(format!(
                "tls.crt's top certificate ({}) is not signed by any root in ca.crt",
                top.subject()
            )));
        }
        let issuer_der = chain
            .first()
            .ok_or_else(|| unusable("tls.crt holds no certificate"))?;
        let issuer_summary = summary(issuer_cert, issuer_der);
        let roots = parsed_roots
            .iter()
            .zip(&roots_der)
            .map(|(cert, der)| summary(cert, der))
            .collect();
        let signer = Issuer::from_ca_cert_der(issuer_der, key).map_err(rcgen("read tls.crt"))?;
        Ok(Self {
            signer,
            chain_pem: normalized_pem(&material.cert_pem),
            issuer: issuer_summary,
            roots_pem: material.roots_pem.clone(),
            roots,
        })
    }

    /// Signs a leaf for `id` over `public_key`, valid from `now - CLOCK_SKEW` for `ttl`, cut at
    /// the issuer's own expiry. Fails once the issuer has expired.
    pub fn issue(
        &self,
        public_key: &rcgen::PublicKey,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Leaf> {
        let (not_before, wanted_end) = window(now, ttl)?;
        let not_after = wanted_end.min(self.issuer.not_after);
        if not_after <= now {
            return Err(unusable(format!(
                "the issuer expired at {}",
                self.issuer.not_after
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id
            .uri()
            .try_into()
            .map_err(rcgen("use the identity as a URI SAN"))?;
        let dns = id
            .dns_name()
            .try_into()
            .map_err(rcgen("use the identity's DNS name as a SAN"))?;
        params.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        // Only the public key of the request goes into the certificate.
        let request = CertificateSigningRequestParams {
            params,
            public_key: public_key.clone(),
        };
        let leaf = request
            .signed_by(&self.signer)
            .map_err(rcgen("sign the workload certificate"))?;
        Ok(Leaf {
            chain_pem: format!("{}{}", leaf.pem(), self.chain_pem),
            not_after,
            serial: hex(&serial.to_bytes()),
        })
    }

    /// A serving certificate for `dns_name` (the signer's own), with a fresh key: chain and
    /// key PEM. Valid for `ttl` from `now`, cut at the issuer's expiry.
    pub fn serving(
        &self,
        dns_name: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<ServingCert> {
        let key = KeyPair::generate().map_err(rcgen("generate the serving key"))?;
        let (not_before, wanted_end) = window(now, ttl)?;
        let not_after = wanted_end.min(self.issuer.not_after);
        if not_after <= now {
            return Err(unusable(format!(
                "the issuer expired at {}",
                self.issuer.not_after
            )));
        }
        let mut params =
            CertificateParams::new(vec![dns_name.to_owned()]).map_err(rcgen("use the DNS name"))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, dns_name);
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(rcgen("sign the serving certificate"))?;
        Ok(ServingCert {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }

    /// The certificates (issuer first, then the roots) that expire before `now + within`.
    pub fn expiring(
        &self,
        now: OffsetDateTime,
        within: Duration,
    ) -> Vec<(&'static str, &CertSummary)> {
        let limit = time::Duration::try_from(within)
            .ok()
            .and_then(|d| now.checked_add(d))
            .unwrap_or(now);
        std::iter::once(("issuer", &self.issuer))
            .chain(self.roots.iter().map(|r| ("root", r)))
            .filter(|(_, cert)| cert.not_after <= limit)
            .collect()
    }
}

/// A signed workload certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Leaf then issuer chain, PEM.
    pub chain_pem: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number, lower-case hex.
    pub serial: String,
}

/// The signer's own serving certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// Leaf then issuer chain, PEM.
    pub chain_pem: String,
    /// The key, PEM.
    pub key_pem: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for ServingCert {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a CSR was not usable (the certify call answers 400 BadCsr with it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadCsr(String);

/// The public key of a PEM CSR whose signature verifies (rcgen checks it: the caller holds the
/// private key). Everything else the CSR asks for is ignored by [`Authority::issue`].
pub fn csr_public_key(pem: &str) -> std::result::Result<rcgen::PublicKey, BadCsr> {
    CertificateSigningRequestParams::from_pem(pem)
        .map(|csr| csr.public_key)
        .map_err(|error| BadCsr(format!("not a usable PKCS#10 CSR: {error}")))
}

fn ders(pem: &str, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| unusable(format!("{key} is not PEM: {error}")))?;
    if ders.is_empty() {
        return Err(unusable(format!("{key} holds no certificate")));
    }
    Ok(ders)
}

fn parse<'a>(der: &'a CertificateDer<'_>, key: &str) -> Result<X509Certificate<'a>> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|error| unusable(format!("{key} holds an unreadable certificate: {error}")))
}

/// Whether `parent`'s key made `child`'s signature (any algorithm rustls verifies with).
fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    if child.issuer() != parent.subject() {
        return false;
    }
    let public_key = &parent.public_key().subject_public_key.data;
    let message = child.tbs_certificate.as_ref();
    let signature = &child.signature_value.data;
    rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all
        .iter()
        .any(|alg| alg.verify_signature(public_key, message, signature).is_ok())
}

fn summary(cert: &X509Certificate<'_>, der: &[u8]) -> CertSummary {
    CertSummary {
        subject: cert.subject().to_string(),
        fingerprint: hex(&Sha256::digest(der)),
        not_after: cert.validity().not_after.to_datetime(),
    }
}

/// The certificates of a PEM text, re-encoded one after the other (drops comments and
/// anything between blocks, and ends with a newline).
fn normalized_pem(pem: &str) -> String {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(std::result::Result::ok)
        .map(|der| pem_block(&der))
        .collect()
}

fn pem_block(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn web() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "web")
    }

    /// A CSR for a new key that asks for every name and power it should not get.
    fn greedy_csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn authority_at(now: OffsetDateTime) -> Authority {
        Authority::load(&generate(now).unwrap()).unwrap()
    }

    /// The signer's name in its Service.
    const SIGNER_DNS: &str = "tandem-identity.tandem-system.svc";

    /// A one-hour serving certificate for the signer from `authority`.
    fn signer_serving(authority: &Authority) -> ServingCert {
        authority
            .serving(SIGNER_DNS, Duration::from_secs(3600), now())
            .unwrap()
    }

    fn parsed(chain_pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .unwrap()
    }

    fn sans(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => format!("uri:{uri}"),
                GeneralName::DNSName(dns) => format!("dns:{dns}"),
                other => format!("other:{other:?}"),
            })
            .collect()
    }

    /// rustls' own (webpki) verification of a chain against the authority's roots.
    fn verifies(authority: &Authority, chain: &[CertificateDer<'static>], dns: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for root in parsed(&authority.roots_pem) {
            roots.add(root).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(dns.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn a_leaf_names_the_identity_it_is_issued_for_and_nothing_the_csr_asked() {
        let authority = authority_at(now());
        let (key, csr) = greedy_csr();
        let public_key = csr_public_key(&csr).unwrap();
        let leaf = authority
            .issue(&public_key, &web(), Duration::from_secs(3600), now())
            .unwrap();
        let chain = parsed(&leaf.chain_pem);
        assert_eq!(chain.len(), 2, "leaf then issuer");
        assert_eq!(
            sans(&chain[0]),
            [
                "uri:spiffe://cluster.local/ns/shop/sa/web",
                "dns:web.shop.sa.cluster.local"
            ]
        );
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        assert!(!cert.is_ca(), "the CSR asked to be a CA");
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        assert!(verifies(&authority, &chain, "web.shop.sa.cluster.local"));
        assert!(!verifies(&authority, &chain, "kubernetes.default.svc"));
    }

    #[test]
    fn the_same_key_gets_a_new_random_serial_every_time() {
        let authority = authority_at(now());
        let (_, csr) = greedy_csr();
        let public_key = csr_public_key(&csr).unwrap();
        let serials: std::collections::BTreeSet<String> = (0..5)
            .map(|_| {
                let leaf = authority
                    .issue(&public_key, &web(), Duration::from_secs(3600), now())
                    .unwrap();
                assert_eq!(leaf.serial.len(), 32, "16 bytes");
                leaf.serial
            })
            .collect();
        assert_eq!(serials.len(), 5);
    }

    #[test]
    fn a_leaf_starts_twenty_seconds_back_and_never_outlives_its_issuer() {
        // An issuer made a year minus an hour ago has an hour left.
        let made = now() - time::Duration::days(365) + time::Duration::hours(1);
        let authority = authority_at(made);
        let (_, csr) = greedy_csr();
        let public_key = csr_public_key(&csr).unwrap();
        let at = now();
        let leaf = authority
            .issue(&public_key, &web(), Duration::from_secs(86_400), at)
            .unwrap();
        assert_eq!(leaf.not_after, authority.issuer.not_after);
        let chain = parsed(&leaf.chain_pem);
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let not_before = cert.validity().not_before.to_datetime();
        assert_eq!(
            not_before.unix_timestamp(),
            (at - time::Duration::seconds(20)).unix_timestamp()
        );

        // A short lifetime is honoured as asked.
        let short = authority
            .issue(&public_key, &web(), Duration::from_secs(600), at)
            .unwrap();
        assert_eq!(
            short.not_after.unix_timestamp(),
            (at + time::Duration::minutes(10)).unix_timestamp()
        );
    }

    #[test]
    fn an_expired_issuer_signs_nothing() {
        let authority = authority_at(now() - time::Duration::days(366));
        let (_, csr) = greedy_csr();
        let public_key = csr_public_key(&csr).unwrap();
        let refused = authority.issue(&public_key, &web(), Duration::from_secs(3600), now());
        assert!(matches!(refused, Err(Error::IssuerMaterial(m)) if m.contains("expired")));
    }

    #[test]
    fn a_generated_authority_is_a_ten_year_root_over_a_one_year_issuer() {
        let at = now();
        let authority = authority_at(at);
        assert_eq!(authority.roots.len(), 1);
        // X.509 times have whole seconds.
        let lasts = |cert: &CertSummary| (cert.not_after - at).whole_seconds() + 1;
        assert_eq!(lasts(&authority.roots[0]), 10 * 365 * 86_400, "10 years");
        assert_eq!(lasts(&authority.issuer), 365 * 86_400, "1 year");
        assert_eq!(authority.issuer.fingerprint.len(), 64);
        assert!(
            authority
                .expiring(at, Duration::from_secs(30 * 86_400))
                .is_empty()
        );
        let in_a_year = at + time::Duration::days(340);
        let soon: Vec<&str> = authority
            .expiring(in_a_year, Duration::from_secs(30 * 86_400))
            .into_iter()
            .map(|(kind, _)| kind)
            .collect();
        assert_eq!(soon, ["issuer"]);
    }

    #[test]
    fn the_trust_bundle_is_every_root_in_ca_crt() {
        let current = generate(now()).unwrap();
        let next = generate(now()).unwrap();
        let overlap = Material {
            roots_pem: format!("{}{}", current.roots_pem, next.roots_pem),
            ..current.clone()
        };
        let authority = Authority::load(&overlap).unwrap();
        assert_eq!(authority.roots.len(), 2);
        assert_eq!(authority.roots_pem, overlap.roots_pem);
    }

    #[test]
    fn an_issuer_secret_that_does_not_hold_together_is_refused_with_the_reason() {
        let one = generate(now()).unwrap();
        let other = generate(now()).unwrap();
        let wrong_key = Material {
            key_pem: other.key_pem.clone(),
            ..one.clone()
        };
        assert!(
            matches!(Authority::load(&wrong_key), Err(Error::IssuerMaterial(m)) if m.contains("tls.key"))
        );
        let foreign_roots = Material {
            roots_pem: other.roots_pem.clone(),
            ..one.clone()
        };
        assert!(
            matches!(Authority::load(&foreign_roots), Err(Error::IssuerMaterial(m)) if m.contains("ca.crt"))
        );
        let no_roots = Material {
            roots_pem: String::new(),
            ..one.clone()
        };
        assert!(Authority::load(&no_roots).is_err());
        // A leaf is not an issuer.
        let authority = Authority::load(&one).unwrap();
        let serving = signer_serving(&authority);
        let leaf_as_issuer = Material {
            cert_pem: serving.chain_pem,
            key_pem: serving.key_pem,
            roots_pem: one.roots_pem.clone(),
        };
        assert!(
            matches!(Authority::load(&leaf_as_issuer), Err(Error::IssuerMaterial(m)) if m.contains("not a CA"))
        );
    }

    #[test]
    fn the_signers_serving_certificate_verifies_under_the_roots() {
        let authority = authority_at(now());
        let chain = parsed(&signer_serving(&authority).chain_pem);
        assert!(verifies(&authority, &chain, SIGNER_DNS));
    }

    #[test]
    fn csrs_that_are_not_signed_by_their_key_or_not_csrs_are_refused() {
        assert!(csr_public_key("not a csr").is_err());
        let (_, csr) = greedy_csr();
        // Flip one character inside the base64 body: the signature no longer verifies (or
        // the DER no longer parses).
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let middle = lines.len() / 2;
        let flipped: String = lines[middle]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 10 {
                    if c == 'A' { 'B' } else { 'A' }
                } else {
                    c
                }
            })
            .collect();
        lines[middle] = flipped;
        assert!(csr_public_key(&lines.join("\n")).is_err());
    }
}
