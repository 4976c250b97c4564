//! A test certificate authority (rcgen) issuing SPIFFE leaf certificates, filled straight into
//! an `IdentityState` as the identity client would.

use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tandem_crds::identity::SpiffeId;
use tandem_proxy::identity::{Credentials, IdentityState, TrustBundle};

/// A root that signs leaves directly.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a leaf looks like; [`Leaf::new`] is a good one.
pub struct Leaf {
    /// The URI SAN (and the derived DNS SAN).
    pub id: SpiffeId,
    /// Validity, in years relative to now (negative: in the past).
    pub valid: (i32, i32),
}

impl Leaf {
    /// A leaf for `ns/sa` in `cluster.local`, valid from a year ago to a year ahead.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            id: SpiffeId::new("cluster.local", namespace, service_account),
            valid: (-1, 1),
        }
    }

    /// In another trust domain.
    pub fn in_trust_domain(mut self, trust_domain: &str) -> Self {
        self.id.trust_domain = trust_domain.to_owned();
        self
    }

    /// Expired a year ago.
    pub fn expired(mut self) -> Self {
        self.valid = (-2, -1);
        self
    }
}

/// This year (give or take a day around New Year, which January 1st bounds absorb).
fn this_year() -> i32 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    1970 + (now / 31_556_952) as i32
}

fn random_serial() -> SerialNumber {
    let mut bytes = fastrand::u64(..).to_be_bytes().to_vec();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(this_year() - 5, 1, 1);
        params.not_after = rcgen::date_time_ymd(this_year() + 5, 1, 1);
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf certificate and its key, as the signer would issue them.
    pub fn issue(&self, leaf: Leaf) -> Arc<Credentials> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.id.uri());
        params.subject_alt_names = vec![
            SanType::URI(leaf.id.uri().try_into().unwrap()),
            SanType::DnsName(leaf.id.dns_name().try_into().unwrap()),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(this_year() + leaf.valid.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(this_year() + leaf.valid.1, 1, 1);
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(pkcs8.clone_key()))
            .unwrap();
        let to_system =
            |unix: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
        Arc::new(Credentials {
            id: leaf.id,
            certified: Arc::new(CertifiedKey::new(chain.clone(), signing)),
            chain,
            key: pkcs8,
            not_before: to_system(params.not_before.unix_timestamp()),
            not_after: to_system(params.not_after.unix_timestamp()),
            serial: serial.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// A trust bundle of these roots.
pub fn bundle(roots: &[&TestCa]) -> Arc<TrustBundle> {
    let certificates: Vec<_> = roots.iter().map(|ca| ca.root()).collect();
    let mut store = rustls::RootCertStore::empty();
    for c in &certificates {
        store.add(c.clone()).unwrap();
    }
    Arc::new(TrustBundle {
        roots: Arc::new(store),
        fingerprints: certificates
            .iter()
            .map(|c| format!("{}", c.len()))
            .collect(),
        certificates,
    })
}

/// An identity state holding `credentials` and trusting `roots`.
pub fn identity(credentials: Arc<Credentials>, roots: &[&TestCa]) -> Arc<IdentityState> {
    let state = IdentityState::default();
    state.set_credentials(credentials);
    state.set_trust(bundle(roots));
    Arc::new(state)
}
