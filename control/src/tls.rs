//! The TLS gRPC listener (Istio's 15012): the same ADS and CA services as
//! the plaintext port, behind TLS 1.3 with a serving certificate the
//! control plane issues from its own CA. Callers verify it with the mesh
//! root (`root-cert.pem`), so their bearer tokens never cross the network
//! in the clear.
//!
//! The certificate is renewed at half life without a restart: handshakes
//! read the current one from an [`ArcSwap`]; established connections keep
//! theirs.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{CaError, CertificateAuthority};

/// Lifetime of the serving certificate; renewed at half of it.
pub const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the serving certificate is issued for.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// Listen address (15012).
    pub addr: SocketAddr,
    /// DNS SANs (`mesh-control.istio-system.svc`, ...).
    pub dns_names: Vec<String>,
    /// IP SANs (the lab dials the control plane by IP).
    pub ip_sans: Vec<IpAddr>,
}

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA could not issue it.
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] CaError),
    /// rustls refused the key or the config.
    #[error("serving certificate: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The current serving certificate, swapped on renewal; rustls asks it at
/// every handshake.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCertResolver {
    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

/// Issues serving certificates and keeps the resolver's fresh.
pub struct ServingCerts {
    ca: Arc<CertificateAuthority>,
    dns_names: Vec<String>,
    ip_sans: Vec<IpAddr>,
    ttl: Duration,
    resolver: Arc<ServingCertResolver>,
}

impl ServingCerts {
    /// Issues the first certificate for `options`' names, valid for `ttl`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        options: &TlsOptions,
        ttl: Duration,
    ) -> Result<(Self, SystemTime), TlsError> {
        let (key, not_after) = issue(&ca, &options.dns_names, &options.ip_sans, ttl)?;
        Ok((
            Self {
                ca,
                dns_names: options.dns_names.clone(),
                ip_sans: options.ip_sans.clone(),
                ttl,
                resolver: Arc::new(ServingCertResolver {
                    current: ArcSwap::new(key),
                }),
            },
            not_after,
        ))
    }

    /// The resolver handshakes read.
    pub fn resolver(&self) -> Arc<ServingCertResolver> {
        self.resolver.clone()
    }

    /// Issues a new certificate and makes new handshakes use it.
    pub fn renew(&self) -> Result<SystemTime, TlsError> {
        let (key, not_after) = issue(&self.ca, &self.dns_names, &self.ip_sans, self.ttl)?;
        self.resolver.current.store(key);
        Ok(not_after)
    }

    /// Renews at half life forever; a failed renewal is retried every
    /// minute while the current certificate keeps serving.
    pub async fn keep_fresh(self, mut not_after: SystemTime) {
        loop {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep((left.min(self.ttl) / 2).max(Duration::from_secs(1))).await;
            match self.renew() {
                Ok(next) => {
                    tracing::info!(expires_in = ?self.ttl, "serving certificate renewed");
                    not_after = next;
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the serving certificate failed; retrying");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }
}

fn issue(
    ca: &CertificateAuthority,
    dns_names: &[String],
    ip_sans: &[IpAddr],
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
    let cert = ca.issue_serving(dns_names, ip_sans, ttl)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der));
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok((
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(cert.cert_der)],
            signer,
        )),
        cert.not_after,
    ))
}

/// A TLS 1.3 server config presenting `resolver`'s certificate, speaking
/// HTTP/2 only (gRPC).
pub fn server_config(resolver: Arc<ServingCertResolver>) -> Result<ServerConfig, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts on `listener` and yields the connections whose handshake
/// succeeded. Each handshake runs in its own task (with a timeout), so a
/// slow or hostile client never holds up the others; failures are logged
/// and dropped, never ending the stream.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting on the TLS gRPC port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_swaps_the_certificate_new_handshakes_get() {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            Arc::new(CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap());
        let options = TlsOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            dns_names: vec!["mesh-control.istio-system.svc".into()],
            ip_sans: vec!["10.0.0.1".parse().unwrap()],
        };
        let (certs, _) = ServingCerts::new(ca, &options, SERVING_TTL).unwrap();
        let resolver = certs.resolver();
        let first = resolver.current();
        let (_, leaf) = x509_parser::parse_x509_certificate(&first.cert[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            sans,
            [
                "DNSName(mesh-control.istio-system.svc)",
                "IPAddress(0a:00:00:01)"
            ]
        );
        certs.renew().unwrap();
        assert_ne!(resolver.current().cert, first.cert);
    }
}
