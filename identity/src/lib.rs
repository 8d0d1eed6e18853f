//! Workload certificates: one per SPIFFE identity of this node's enrolled
//! pods, obtained from the control plane's CA with a CSR made here (the
//! private key never leaves the node), cached, and renewed at half life.
//! Every issued certificate goes into the HBONE [`CertStore`], where new TLS
//! handshakes pick it up; established connections keep theirs.
//!
//! Callers ask [`CertManager::get`] when they need a certificate; the first
//! request for an identity fetches it (concurrent callers share the fetch),
//! and a background task keeps it fresh until [`CertManager::retain`] drops
//! the identity.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use mesh_api::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use mesh_hbone::{CertStore, Identity, WorkloadCert};
use mesh_xds::{ChannelError, Target};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use tracing::{info, warn};

/// A certificate as the CA issued it.
#[derive(Debug)]
pub struct IssuedCert {
    /// The identity it proves.
    pub identity: String,
    /// PEM chain: leaf first, root last.
    pub chain_pem: Vec<String>,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// When it was issued (start of the renewal clock).
    pub issued_at: SystemTime,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// No CA is configured.
    #[error("no CA address configured")]
    NoCa,
    /// Making the key or CSR failed.
    #[error("creating the CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// Reaching the CA (or, over TLS, verifying it) failed.
    #[error("CA: {0}")]
    Connect(#[from] ChannelError),
    /// The CA refused.
    #[error("CA refused: {} ({:?})", .0.message(), .0.code())]
    Refused(#[from] tonic::Status),
    /// The token could not be read.
    #[error("reading the CA token {path}: {source}")]
    Token {
        /// Token file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The CA's answer was not usable.
    #[error("CA answer unusable: {0}")]
    BadChain(String),
}

type Slot = watch::Receiver<Option<Result<Arc<IssuedCert>, Arc<CertError>>>>;

/// Obtains and renews workload certificates.
pub struct CertManager {
    store: CertStore,
    ca: Option<Target>,
    token_file: Option<PathBuf>,
    validity: Duration,
    slots: Mutex<HashMap<String, (Slot, tokio::task::JoinHandle<()>)>>,
}

impl CertManager {
    /// A manager asking the CA at `ca` (e.g.
    /// `https://mesh-control.istio-system.svc:15012` verified with the mesh
    /// root), authenticated by the bearer token in `token_file`, for
    /// certificates valid for `validity`.
    pub fn new(ca: Option<Target>, token_file: Option<PathBuf>, validity: Duration) -> Arc<Self> {
        Arc::new(Self {
            store: CertStore::new(),
            ca,
            token_file,
            validity,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The current certificate of `identity`, fetching it first if needed.
    pub async fn get(self: &Arc<Self>, identity: &str) -> Result<Arc<IssuedCert>, Arc<CertError>> {
        let mut slot = self.slot(identity);
        loop {
            if let Some(current) = slot.borrow_and_update().clone() {
                return current;
            }
            if slot.changed().await.is_err() {
                return Err(Arc::new(CertError::BadChain("renewal task ended".into())));
            }
        }
    }

    /// Starts fetching `identity` now (when a pod is enrolled), so the first
    /// connection does not wait for the CA.
    pub fn prefetch(self: &Arc<Self>, identity: &str) {
        drop(self.slot(identity));
    }

    /// What is held, for `/config_dump`: identity, expiry, chain length, or
    /// the last error of identities that have no certificate.
    pub fn dump(&self) -> serde_json::Value {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<serde_json::Value> = slots
            .iter()
            .map(|(identity, (slot, _))| match &*slot.borrow() {
                Some(Ok(cert)) => serde_json::json!({
                    "identity": cert.identity,
                    "state": "valid",
                    "expires_in_seconds": cert.not_after
                        .duration_since(SystemTime::now())
                        .map_or(0, |d| d.as_secs()),
                    "chain_length": cert.chain_pem.len(),
                }),
                Some(Err(err)) => serde_json::json!({
                    "identity": identity, "state": "error", "error": err.to_string(),
                }),
                None => serde_json::json!({ "identity": identity, "state": "pending" }),
            })
            .collect();
        out.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        serde_json::Value::Array(out)
    }

    /// The store TLS reads certificates from.
    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// Drops every identity not in `keep` (pods that left).
    pub fn retain(&self, keep: &[String]) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|identity, (_, task)| {
            let kept = keep.contains(identity);
            if !kept {
                task.abort();
                if let Ok(id) = identity.parse::<Identity>() {
                    self.store.remove(&id);
                }
            }
            kept
        });
    }

    fn slot(self: &Arc<Self>, identity: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slot, _)) = slots.get(identity) {
            return slot.clone();
        }
        let (tx, rx) = watch::channel(None);
        let manager = self.clone();
        let owned = identity.to_owned();
        let task = tokio::spawn(async move { manager.keep_fresh(owned, tx).await });
        slots.insert(identity.to_owned(), (rx.clone(), task));
        rx
    }

    /// Fetches, then renews at half life; retries failures with backoff
    /// while an older certificate (if any) stays in use.
    async fn keep_fresh(
        &self,
        identity: String,
        tx: watch::Sender<Option<Result<Arc<IssuedCert>, Arc<CertError>>>>,
    ) {
        let mut retry = Duration::from_millis(200);
        loop {
            match self.fetch(&identity).await {
                Ok(cert) => {
                    let lifetime = cert
                        .not_after
                        .duration_since(cert.issued_at)
                        .unwrap_or(Duration::ZERO);
                    let usable = WorkloadCert::from_pem(&cert.chain_pem.concat(), &cert.key_pem)
                        .map_err(|e| CertError::BadChain(e.to_string()))
                        .and_then(|workload| {
                            if workload.identity().to_string() == identity {
                                Ok(workload)
                            } else {
                                Err(CertError::BadChain(format!(
                                    "the CA issued {} instead",
                                    workload.identity()
                                )))
                            }
                        });
                    match usable {
                        Ok(workload) => self.store.insert(workload),
                        Err(err) => {
                            warn!(%identity, error = %err, retry_in = ?retry, "unusable certificate");
                            tokio::time::sleep(retry).await;
                            retry = (retry * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                    info!(%identity, expires_in = ?lifetime, "workload certificate issued");
                    tx.send_replace(Some(Ok(Arc::new(cert))));
                    retry = Duration::from_millis(200);
                    tokio::time::sleep((lifetime / 2).max(Duration::from_secs(1))).await;
                }
                Err(err) => {
                    warn!(%identity, error = %err, retry_in = ?retry, "certificate request failed");
                    let err = Arc::new(err);
                    // Keep a still-valid certificate; report the error only
                    // to callers that have nothing.
                    let has_valid =
                        matches!(&*tx.borrow(), Some(Ok(c)) if c.not_after > SystemTime::now());
                    if !has_valid {
                        tx.send_replace(Some(Err(err)));
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn fetch(&self, identity: &str) -> Result<IssuedCert, CertError> {
        let target = self.ca.as_ref().ok_or(CertError::NoCa)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;

        let channel = target
            .connect(|endpoint| {
                endpoint
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(10))
            })
            .await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.validity.as_secs() as i64,
            metadata: None,
        });
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| CertError::Token {
                path: path.clone(),
                source,
            })?;
            if let Ok(value) = format!("Bearer {}", token.trim()).parse() {
                request.metadata_mut().insert("authorization", value);
            }
        }
        let issued_at = SystemTime::now();
        let chain_pem = client
            .create_certificate(request)
            .await?
            .into_inner()
            .cert_chain;
        let leaf = chain_pem
            .first()
            .ok_or_else(|| CertError::BadChain("empty chain".into()))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.as_bytes())
            .map_err(|e| CertError::BadChain(format!("leaf PEM: {e}")))?;
        let parsed = pem
            .parse_x509()
            .map_err(|e| CertError::BadChain(format!("leaf: {e}")))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        Ok(IssuedCert {
            identity: identity.to_owned(),
            chain_pem,
            key_pem: key.serialize_pem(),
            not_after,
            issued_at,
        })
    }
}
