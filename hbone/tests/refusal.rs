//! Refused tunnels map to typed errors carrying the HTTP status.
#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use mesh_hbone::{Refusal, tls};
use tokio::net::TcpStream;

#[tokio::test]
async fn handler_denial_is_401() {
    let env = Env::new();
    let handler = TestHandler {
        refuse: Some(Refusal::Denied("policy".into())),
        ..Default::default()
    };
    let server = start_server(env.server_store.clone(), handler).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    let err = pool
        .connect(request(server.addr, upstream))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
    assert_eq!(pool.stats().tunnels_refused, 1);
    // The connection stays usable for further (refused) streams.
    let err = pool
        .connect(request(server.addr, upstream))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn handler_unavailable_is_503() {
    let env = Env::new();
    let handler = TestHandler {
        refuse: Some(Refusal::Unavailable("no upstream".into())),
        ..Default::default()
    };
    let server = start_server(env.server_store.clone(), handler).await;
    let err = env
        .pool()
        .connect(request(server.addr, "127.0.0.1:9".parse().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn upstream_connect_refused_is_503() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed: SocketAddr = l.local_addr().unwrap();
    drop(l);
    let err = env
        .pool()
        .connect(request(server.addr, closed))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

async fn raw_h2(env: &Env, addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let cfg = tls::client_config(env.client_store.clone(), id(A), vec![id(B)]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls::connect(cfg, tcp, addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

#[tokio::test]
async fn non_connect_is_400() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let mut send = raw_h2(&env, server.addr).await.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::GET)
        .uri("https://127.0.0.1:8080/")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert!(server.handler.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn connect_to_hostname_is_400() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let mut send = raw_h2(&env, server.addr).await.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert!(server.handler.requests.lock().unwrap().is_empty());
    assert_server_healthy(&env, &server).await;
}
