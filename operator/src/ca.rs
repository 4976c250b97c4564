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

/// 16 random bytes from the operating system's CSPRNG, positive as a DER INTEGER and never
/// zero-led (rcgen's default serial is a hash of the public key, which a reused key repeats).
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
    /// issued by (or is) one of those roots, so what is issued verifies under what is trusted.
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
            .any(|(root, der)| root.subject() == top.issuer() || Some(der.as_ref()) == top_der);
        if !anchored {
            return Err(unusable(format!(
                "tls.crt's top certificate is issued by {}, which is not among ca.crt's roots",
                top.issuer()
            )));
        }
        let issuer_summary = summary(issuer_cert, &chain[0]);
        let roots = parsed_roots
            .iter()
            .zip(&roots_der)
            .map(|(cert, der)| summary(cert, der))
            .collect();
        let signer = Issuer::from_ca_cert_der(&chain[0], key).map_err(rcgen("read tls.crt"))?;
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
