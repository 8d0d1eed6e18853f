//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual TLS
//! with SPIFFE identity checks.
//!
//! No global crypto provider is installed; the ring provider is passed
//! explicitly to every builder.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme, version::TLS13,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::cert::CertStore;
use crate::error::Error;
use crate::identity::{Identity, identities_from_der, identity_from_der};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The ring crypto provider used for every configuration (created once).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Resolves our own certificate from a [`CertStore`] at handshake time, so
/// rotation takes effect for new handshakes.
#[derive(Debug, Clone)]
pub struct StoreResolver {
    store: CertStore,
    identity: Identity,
}

impl StoreResolver {
    /// A resolver presenting the current certificate of `identity`.
    pub fn new(store: CertStore, identity: Identity) -> Self {
        StoreResolver { store, identity }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let c = self.store.get(&self.identity);
        if c.is_none() {
            tracing::warn!(identity = %self.identity, "no certificate available");
        }
        c.map(|c| c.certified_key().clone())
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn app_failure(msg: String) -> rustls::Error {
    tracing::debug!("peer certificate rejected: {msg}");
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Server-side client certificate verifier: the chain must verify against
/// our current trust roots (webpki) and the client's SPIFFE trust domain
/// must equal ours.
#[derive(Debug, Clone)]
pub struct TrustDomainClientVerifier {
    store: CertStore,
    identity: Identity,
}

impl TrustDomainClientVerifier {
    /// A verifier using the roots of `identity`'s certificate in `store`.
    pub fn new(store: CertStore, identity: Identity) -> Self {
        TrustDomainClientVerifier { store, identity }
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ours = self
            .store
            .get(&self.identity)
            .ok_or_else(|| rustls::Error::General("no local certificate".into()))?;
        ours.client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        let theirs = identity_from_der(end_entity)
            .ok_or_else(|| app_failure("client certificate has no SPIFFE URI SAN".into()))?;
        if theirs.trust_domain != ours.identity().trust_domain {
            return Err(app_failure(format!(
                "client {theirs} is not in trust domain {}",
                ours.identity().trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// Client-side server certificate verifier: the chain must verify against
/// the current roots of our local identity, and the server leaf's URI SAN
/// must be one of the expected identities. The TLS server name is ignored.
#[derive(Debug, Clone)]
pub struct IdentityServerVerifier {
    store: CertStore,
    local: Identity,
    expected: Vec<Identity>,
}

impl IdentityServerVerifier {
    /// A verifier using `local`'s trust roots and accepting any of `expected`.
    pub fn new(store: CertStore, local: Identity, expected: Vec<Identity>) -> Self {
        IdentityServerVerifier {
            store,
            local,
            expected,
        }
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ours = self
            .store
            .get(&self.local)
            .ok_or_else(|| rustls::Error::General("no local certificate".into()))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            ours.root_store(),
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let ids = identities_from_der(end_entity);
        if ids.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(app_failure(format!(
                "server identities {:?} not in expected {:?}",
                ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                self.expected
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds the server configuration for `identity`: TLS 1.3 only, ALPN
/// `h2`, client certificate required and verified by
/// [`TrustDomainClientVerifier`], certificate resolved from `store` per
/// handshake. Session resumption is disabled so that every connection is
/// fully authenticated with the current certificates.
pub fn server_config(
    store: CertStore,
    identity: Identity,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(TrustDomainClientVerifier::new(
            store.clone(),
            identity.clone(),
        )))
        .with_cert_resolver(Arc::new(StoreResolver::new(store, identity)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Builds a client configuration presenting `local`'s certificate and
/// accepting only servers whose identity is in `expected`.
pub fn client_config(
    store: CertStore,
    local: Identity,
    expected: Vec<Identity>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(IdentityServerVerifier::new(
            store.clone(),
            local.clone(),
            expected,
        )))
        .with_client_cert_resolver(Arc::new(StoreResolver::new(store, local)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Performs the client TLS handshake over `tcp` and checks ALPN `h2`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let name = ServerName::IpAddress(peer.ip().into());
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(Error::Tls)?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(Error::NoAlpn);
    }
    Ok(tls)
}

/// Performs the server TLS handshake over `io` and returns the stream and
/// the client's SPIFFE identity.
pub async fn accept<IO>(
    config: Arc<rustls::ServerConfig>,
    io: IO,
) -> Result<(tokio_rustls::server::TlsStream<IO>, Identity), Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tls = TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(Error::Tls)?;
    let id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| identity_from_der(leaf))
        .ok_or_else(|| Error::InvalidCertificate("client presented no SPIFFE identity".into()))?;
    Ok((tls, id))
}
