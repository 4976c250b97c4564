//! A throwaway PKI for one local cluster, laid out the way kubeadm lays out its own: one cluster
//! CA that signs the apiserver's serving certificate, every client certificate and the
//! webhook's serving certificate, plus a separate key that signs ServiceAccount tokens.
//!
//! Keys are ECDSA P-256, which every component here (Go's crypto/tls, rustls, the apiserver's
//! JWT signer) accepts.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{Error, Result};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// The cluster CA and the ServiceAccount token signing key.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    service_account_key: KeyPair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// Creates a new CA and ServiceAccount signing key.
    pub fn new() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(Error::Pki)?;
        params.distinguished_name = name("tandem-test-cluster-ca", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(Error::Pki)?)
            .map_err(Error::Pki)?;
        let service_account_key = KeyPair::generate().map_err(Error::Pki)?;
        Ok(Self {
            ca,
            service_account_key,
        })
    }

    /// The CA certificate (what clients trust, and what a webhook's `caBundle` holds), PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The CA's private key, PEM (for kube-controller-manager's CSR signer).
    pub fn ca_key_pem(&self) -> String {
        self.ca.key().serialize_pem()
    }

    /// The ServiceAccount token signing key, PKCS#8 PEM.
    pub fn service_account_key_pem(&self) -> String {
        self.service_account_key.serialize_pem()
    }

    /// The ServiceAccount token verifying key, SubjectPublicKeyInfo PEM (the apiserver reads
    /// public keys only from `PUBLIC KEY` blocks or SEC1/PKCS#1 private keys).
    pub fn service_account_public_key_pem(&self) -> String {
        self.service_account_key.public_key_pem()
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn serving_cert(
        &self,
        common_name: &str,
        dns: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(Error::Pki)?;
        params.distinguished_name = name(common_name, None);
        for dns_name in dns {
            let ia5 = (*dns_name).try_into().map_err(Error::Pki)?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params)
    }

    /// A client certificate for `user`, optionally in `group`: the apiserver maps the CN to the
    /// user name and the O to a group. (rcgen keeps one value per attribute, so one group.)
    pub fn client_cert(&self, user: &str, group: Option<&str>) -> Result<CertPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(Error::Pki)?;
        params.distinguished_name = name(user, group);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    fn sign(&self, params: &CertificateParams) -> Result<CertPair> {
        let key = KeyPair::generate().map_err(Error::Pki)?;
        let cert = params.signed_by(&key, &self.ca).map_err(Error::Pki)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}
