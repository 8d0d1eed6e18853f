//! The mesh's certificate authority.
//!
//! A self-signed root is generated on first start and persisted in the CA
//! directory (`root-cert.pem`, `root-key.pem`, key mode 0600), or loaded from
//! there when it exists, so a restarted control plane keeps signing for the
//! same trust. Leaves carry exactly one URI SAN, the caller's SPIFFE identity,
//! whatever else the CSR asks for: the CSR contributes only its public key.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use mesh_hbone::Identity;

/// Default leaf lifetime (Istio's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a caller may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Root lifetime.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start being valid a little before now, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not start or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing the CA directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The stored root could not be used.
    #[error("CA root in {dir}: {message}")]
    BadRoot {
        /// CA directory.
        dir: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The CSR is not a valid PKCS#10 request.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// Requested lifetime out of range.
    #[error("requested validity of {0} s is not in 1..={max} s", max = MAX_TTL.as_secs())]
    BadTtl(i64),
    /// A serving certificate name is not a valid DNS name.
    #[error("invalid serving certificate name {0}")]
    BadName(String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A serving certificate the CA issued to the control plane itself.
#[derive(Clone)]
pub struct ServingCert {
    /// The leaf, DER.
    pub cert_der: Vec<u8>,
    /// Its private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// When it expires.
    pub not_after: std::time::SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Signs workload certificates with the mesh root.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the root from `dir`, or creates and persists one for
    /// `trust_domain` when `dir` holds none.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = dir.join("root-cert.pem");
        let key_path = dir.join("root-key.pem");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        if cert_path.exists() {
            let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let bad = |message: String| CaError::BadRoot {
                dir: dir.to_owned(),
                message,
            };
            let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("key: {e}")))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| bad(format!("certificate: {e}")))?;
            return Ok(Self {
                issuer,
                root_pem: cert_pem,
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Self {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs the public key of `csr_pem` for `identity`, valid for `ttl`.
    /// Returns the chain as `IstioCertificateService` does: leaf, then root.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial()?);
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }

    /// Issues the control plane's own serving certificate for `dns_names`
    /// and `ip_sans`, valid for `ttl`, with a fresh key. Returns the leaf
    /// (DER), its PKCS#8 key (DER) and when it expires.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ip_sans: &[IpAddr],
        ttl: Duration,
    ) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            dns_names.first().map_or("mesh-control", String::as_str),
        );
        params.distinguished_name = name;
        params.subject_alt_names = dns_names
            .iter()
            .map(|dns| {
                dns.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| CaError::BadName(format!("{dns}: {e}")))
            })
            .chain(ip_sans.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial()?);
        let leaf = params.signed_by(&key, &self.issuer)?;
        Ok(ServingCert {
            cert_der: leaf.der().to_vec(),
            key_der: key.serialize_der(),
            not_after: std::time::SystemTime::now() + ttl,
        })
    }

    /// The lifetime to grant for a requested `validity_duration` in seconds
    /// (0: the default).
    pub fn ttl_for(requested_secs: i64) -> Result<Duration, CaError> {
        match requested_secs {
            0 => Ok(DEFAULT_TTL),
            s if s > 0 && (s as u64) <= MAX_TTL.as_secs() => Ok(Duration::from_secs(s as u64)),
            s => Err(CaError::BadTtl(s)),
        }
    }
}

/// The identities a CSR asks for, from its URI SANs.
pub fn requested_identities(csr_pem: &str) -> Result<Vec<String>, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    Ok(csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str().to_owned()),
            _ => None,
        })
        .collect())
}

fn random_serial() -> Result<SerialNumber, CaError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Sign(rcgen::Error::RingUnspecified))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(uri: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn root_persists_and_leaves_carry_only_the_granted_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.root_pem(), again.root_pem());

        let id: Identity = "spiffe://cluster.local/ns/shop/sa/reviews".parse().unwrap();
        let chain = again
            .sign(
                &csr("spiffe://cluster.local/ns/shop/sa/reviews"),
                &id,
                DEFAULT_TTL,
            )
            .unwrap();
        assert_eq!(chain.len(), 2);
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
        let leaf = pem.parse_x509().unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["URI(spiffe://cluster.local/ns/shop/sa/reviews)"]);
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, (DEFAULT_TTL + BACKDATE).as_secs() as i64);
        assert!(!leaf.is_ca());
    }

    #[test]
    fn garbage_csr_and_bad_ttl_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        assert!(matches!(
            ca.sign("not a csr", &id, DEFAULT_TTL),
            Err(CaError::BadCsr(_))
        ));
        assert!(matches!(
            CertificateAuthority::ttl_for(-5),
            Err(CaError::BadTtl(-5))
        ));
        assert_eq!(CertificateAuthority::ttl_for(0).unwrap(), DEFAULT_TTL);
    }

    #[test]
    fn requested_identities_reads_uri_sans() {
        assert_eq!(
            requested_identities(&csr("spiffe://cluster.local/ns/a/sa/b")).unwrap(),
            ["spiffe://cluster.local/ns/a/sa/b"]
        );
    }
}
