//! What the control plane's integration tests share: a CSR, a raw HTTP GET
//! of the status endpoint, and a certificate request as a bearer.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;

use mesh_api::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use tonic::transport::Channel;

/// A PEM CSR for the SPIFFE URI `uri`, with a fresh key.
pub fn csr(uri: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// `GET path` on `addr` over HTTP/1.1; the whole response, head included.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// A plaintext gRPC channel to `grpc`.
pub async fn plaintext(grpc: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Asks the CA on `channel` to sign `csr` for an hour, as the bearer of
/// `token` (anonymously without one); the PEM chain, or the refusal.
pub async fn create_certificate(
    channel: Channel,
    token: Option<&str>,
    csr: String,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: None,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
}
