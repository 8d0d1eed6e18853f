//! Test helpers: an in-memory CA issuing SPIFFE workload certificates.
//!
//! Enabled by the `testing` feature. Not for production use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::WorkloadCert;

static SERIAL: AtomicU64 = AtomicU64::new(1);

fn next_serial() -> SerialNumber {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&nanos.to_be_bytes());
    bytes.extend_from_slice(&n.to_be_bytes());
    SerialNumber::from_slice(&bytes)
}

/// A self-signed test CA.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate issued by a [`TestCa`], in PEM.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    /// Leaf first, root last.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

impl TestCa {
    /// Creates a CA with the given common name.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mesh test");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(next_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa {
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The root certificate (DER).
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a leaf for `spiffe_id` valid for `validity`, as PEM.
    pub fn issue_pem(&self, spiffe_id: &str, validity: Duration) -> IssuedPem {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id.try_into().expect("SPIFFE ID must be IA5"),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(next_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        IssuedPem {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// Issues a [`WorkloadCert`] for `spiffe_id`, valid for one day, trusting this CA.
    pub fn issue(&self, spiffe_id: &str) -> WorkloadCert {
        self.issue_with_validity(spiffe_id, Duration::from_secs(86400))
    }

    /// Issues a [`WorkloadCert`] for `spiffe_id` valid for `validity`.
    pub fn issue_with_validity(&self, spiffe_id: &str, validity: Duration) -> WorkloadCert {
        let p = self.issue_pem(spiffe_id, validity);
        WorkloadCert::from_pem(&p.chain_pem, &p.key_pem).expect("valid workload cert")
    }

    /// Issues a leaf from this CA but trusting `roots` instead (e.g. another
    /// CA, to test rejection by the peer).
    pub fn issue_trusting(
        &self,
        spiffe_id: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> WorkloadCert {
        let p = self.issue_pem(spiffe_id, Duration::from_secs(86400));
        let mut certs = parse_pem(&p.chain_pem);
        let leaf = certs.remove(0);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            KeyPair::from_pem(&p.key_pem).expect("key").serialize_der(),
        ));
        WorkloadCert::from_parts(vec![leaf], key, roots).expect("valid workload cert")
    }
}

fn parse_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("valid PEM")
}
