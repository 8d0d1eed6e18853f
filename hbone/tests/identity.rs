//! Identity verification failures; the server keeps serving afterwards.
#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, Request};
use mesh_hbone::testing::TestCa;
use mesh_hbone::tls::{self, IdentityServerVerifier};
use mesh_hbone::{CertStore, Pool, PoolConfig};
use tokio::net::TcpStream;

#[tokio::test]
async fn unexpected_server_identity_fails_tls() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    let mut req = request(server.addr, upstream);
    req.expected = vec![id("spiffe://cluster.local/ns/default/sa/c")];
    let err = pool.connect(req).await.unwrap_err();
    assert!(err.is_tls(), "expected TLS error, got {err}");
    assert_eq!(pool.stats().connections_failed, 1);
    assert!(server.handler.requests.lock().unwrap().is_empty());
    assert_server_healthy(&env, &server).await;
}

async fn assert_rejected(store: CertStore, local: &str, server: &TestServer) {
    let upstream = echo_upstream().await;
    let pool = Pool::new(store, PoolConfig::default());
    let mut req = request(server.addr, upstream);
    req.local = id(local);
    let res = tokio::time::timeout(Duration::from_secs(10), pool.connect(req))
        .await
        .expect("rejection must not hang");
    let err = res.expect_err("tunnel must not open");
    assert!(err.is_tls(), "expected a TLS error, got {err}");
    assert!(server.handler.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn client_cert_from_other_ca_is_refused() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let other = TestCa::new("other root");
    // The client trusts the server's CA, but its own cert is from another CA.
    let store = CertStore::with_cert(other.issue_trusting(A, vec![env.ca.root_der()]));
    assert_rejected(store, A, &server).await;
    assert_server_healthy(&env, &server).await;
}

#[tokio::test]
async fn client_from_other_trust_domain_is_refused() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let foreign = "spiffe://other.domain/ns/default/sa/a";
    let store = CertStore::with_cert(env.ca.issue(foreign));
    assert_rejected(store, foreign, &server).await;
    assert_server_healthy(&env, &server).await;
}

async fn try_tunnel_without_client_cert(
    env: &Env,
    addr: SocketAddr,
) -> Result<http::StatusCode, String> {
    let verifier = IdentityServerVerifier::new(env.client_store.clone(), id(A), vec![id(B)]);
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tls::connect(Arc::new(cfg), tcp, addr)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("127.0.0.1:80")
        .body(())
        .unwrap();
    let (resp, _s) = send.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[tokio::test]
async fn client_without_cert_is_refused() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        try_tunnel_without_client_cert(&env, server.addr),
    )
    .await
    .expect("must not hang");
    assert!(res.is_err(), "client without certificate got through");
    eprintln!("rejected as expected: {}", res.unwrap_err());
    assert!(server.handler.requests.lock().unwrap().is_empty());
    assert_server_healthy(&env, &server).await;
}
