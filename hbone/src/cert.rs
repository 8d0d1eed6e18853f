//! Workload certificates and a rotating certificate store.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;
use crate::identity::{Identity, identity_from_der};
use crate::tls::provider;

/// A workload's certificate chain, private key and trust roots.
///
/// Immutable: rotation replaces the whole value in a [`CertStore`].
#[derive(Clone)]
pub struct WorkloadCert {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    serial: String,
    certified_key: Arc<CertifiedKey>,
    root_store: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidCertificate(format!("bad PEM certificate: {e}")))
}

fn is_self_signed(der: &[u8]) -> bool {
    match X509Certificate::from_der(der) {
        Ok((_, c)) => c.subject().as_raw() == c.issuer().as_raw(),
        Err(_) => false,
    }
}

impl WorkloadCert {
    /// Builds a workload certificate from what a CA returns: `chain_pem` is
    /// a sequence of PEM certificates, leaf first and root last; `key_pem` is
    /// the leaf's private key (PKCS#8, SEC1 or PKCS#1 PEM).
    ///
    /// The last certificate of the chain is used as the trust root. If it
    /// is self-signed it is not sent to peers (they have it already).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let mut chain = parse_pem_certs(chain_pem)?;
        if chain.len() < 2 {
            return Err(Error::InvalidCertificate(
                "chain must contain at least the leaf and the root".into(),
            ));
        }
        let root = chain.last().cloned().expect("len >= 2");
        if is_self_signed(&root) {
            chain.pop();
        }
        Self::from_parts(chain, parse_key(key_pem)?, vec![root])
    }

    /// Builds a workload certificate from a PEM chain (leaf first, optionally
    /// followed by intermediates), a PEM key, and separate PEM trust roots.
    pub fn from_pem_with_roots(
        chain_pem: &str,
        key_pem: &str,
        roots_pem: &str,
    ) -> Result<Self, Error> {
        let chain = parse_pem_certs(chain_pem)?;
        let roots = parse_pem_certs(roots_pem)?;
        Self::from_parts(chain, parse_key(key_pem)?, roots)
    }

    /// Builds a workload certificate from DER parts.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::InvalidCertificate("empty certificate chain".into()))?;
        if roots.is_empty() {
            return Err(Error::InvalidCertificate("no trust roots".into()));
        }
        let identity = identity_from_der(leaf)
            .ok_or_else(|| Error::InvalidCertificate("leaf has no SPIFFE URI SAN".into()))?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|e| Error::InvalidCertificate(format!("bad leaf: {e}")))?;
        let ts = parsed.validity().not_after.timestamp();
        let not_after = if ts >= 0 {
            UNIX_EPOCH + Duration::from_secs(ts as u64)
        } else {
            UNIX_EPOCH
        };
        let serial = parsed.raw_serial_as_string();

        let provider = provider();
        let certified_key = CertifiedKey::from_der(chain.clone(), key, &provider)?;
        let mut root_store = RootCertStore::empty();
        for r in &roots {
            root_store.add(r.clone())?;
        }
        let root_store = Arc::new(root_store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(root_store.clone(), provider.clone())
                .build()
                .map_err(|e| Error::InvalidCertificate(format!("client verifier: {e}")))?;
        Ok(WorkloadCert {
            identity,
            chain,
            roots,
            not_after,
            serial,
            certified_key: Arc::new(certified_key),
            root_store,
            client_verifier,
        })
    }

    /// The SPIFFE identity of the leaf certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The leaf followed by intermediates, as sent during the handshake.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The trust roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The leaf's expiry time.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number as colon-separated hex (x509-parser format).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// True if the leaf expires within `within` from now (or already has).
    pub fn is_expiring(&self, within: Duration) -> bool {
        match self.not_after.duration_since(SystemTime::now()) {
            Ok(left) => left <= within,
            Err(_) => true,
        }
    }

    pub(crate) fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    pub(crate) fn root_store(&self) -> &Arc<RootCertStore> {
        &self.root_store
    }

    pub(crate) fn client_verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.client_verifier
    }
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::InvalidCertificate(format!("bad PEM private key: {e}")))
}

/// The leaf serial of a DER certificate in the format of [`WorkloadCert::serial`].
pub fn serial_of(der: &[u8]) -> Option<String> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.raw_serial_as_string())
}

/// A shared, rotatable set of workload certificates keyed by identity.
///
/// Cloning is cheap; clones share the same certificates. Replacing a
/// certificate with [`CertStore::insert`] affects new TLS handshakes only;
/// established connections keep working.
#[derive(Clone, Default)]
pub struct CertStore {
    inner: Arc<RwLock<HashMap<Identity, Arc<ArcSwap<WorkloadCert>>>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("identities", &self.identities())
            .finish()
    }
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding one certificate.
    pub fn with_cert(cert: WorkloadCert) -> Self {
        let s = Self::new();
        s.insert(cert);
        s
    }

    /// Adds a certificate, or rotates the one held for the same identity.
    pub fn insert(&self, cert: WorkloadCert) {
        let id = cert.identity().clone();
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        match map.get(&id) {
            Some(slot) => slot.store(Arc::new(cert)),
            None => {
                map.insert(id, Arc::new(ArcSwap::from_pointee(cert)));
            }
        }
    }

    /// The current certificate for `id`.
    pub fn get(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(id).map(|slot| slot.load_full())
    }

    /// Removes the certificate for `id`.
    pub fn remove(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.remove(id).map(|slot| slot.load_full())
    }

    /// Identities currently held.
    pub fn identities(&self) -> Vec<Identity> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.keys().cloned().collect();
        v.sort();
        v
    }

    /// Identities whose certificate expires within `within`.
    pub fn expiring(&self, within: Duration) -> Vec<Identity> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(_, s)| s.load().is_expiring(within))
            .map(|(id, _)| id.clone())
            .collect()
    }
}
