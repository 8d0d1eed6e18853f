//! Basic tunnel behaviour: echo, metadata, half-close, large transfers.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_and_metadata_arrive_exactly() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();

    let mut req = request(server.addr, upstream);
    req.host = Some("echo.default.svc.cluster.local".into());
    req.baggage = Some("k8s.namespace.name=default".into());
    req.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let mut t = pool.connect(req).await.unwrap();
    t.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // Server presented identity B.
    let server_cert = t.peer_certificate().expect("server cert");
    assert_eq!(
        mesh_hbone::identity::identity_from_der(server_cert),
        Some(id(B))
    );
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    let reqs = server.handler.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.peer_identity, id(A));
    assert_eq!(r.peer_addr.ip().to_string(), "127.0.0.1");
    assert_eq!(r.authority, upstream);
    assert_eq!(r.forwarded_for, Some("10.1.2.3:4567".parse().unwrap()));
    assert_eq!(r.host.as_deref(), Some("echo.default.svc.cluster.local"));
    assert_eq!(r.baggage.as_deref(), Some("k8s.namespace.name=default"));
    assert_eq!(
        r.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(
        mesh_hbone::identity::identity_from_der(r.peer_certificate.as_ref().unwrap()),
        Some(id(A))
    );
}

#[tokio::test]
async fn ipv6_forwarded_for_roundtrips() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    let mut req = request(server.addr, upstream);
    req.forwarded_for = "[fd00::1]:8080".parse().unwrap();
    let mut t = pool.connect(req).await.unwrap();
    t.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
    let reqs = server.handler.requests.lock().unwrap().clone();
    assert_eq!(
        reqs[0].forwarded_for,
        Some("[fd00::1]:8080".parse().unwrap())
    );
}

#[tokio::test]
async fn half_close_propagates_both_ways() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = count_upstream().await;
    let pool = env.pool();

    let mut t = pool.connect(request(server.addr, upstream)).await.unwrap();
    t.write_all(b"abc").await.unwrap();
    // Upstream only answers after it saw EOF, so the reply proves the FIN
    // made it through; the reply followed by EOF proves the reverse.
    t.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"got 3 bytes");

    // The server reports per-stream byte counts once both sides closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(s) = server.handler.completions.lock().unwrap().first().cloned() {
            assert_eq!(s.bytes_from_client, 3);
            assert_eq!(s.bytes_to_client, 11);
            assert_eq!(s.error, None);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no completion");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn transfer_16_mib_byte_exact() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();

    const N: usize = 16 * 1024 * 1024;
    let data: Vec<u8> = (0..N).map(|i| (i * 31 % 251) as u8).collect();
    let t = pool.connect(request(server.addr, upstream)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(t);
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in d2.chunks(100_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut out = Vec::with_capacity(N);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(out.len(), N);
    assert!(out == data, "16 MiB echo differs");
}

#[tokio::test]
async fn client_relay_moves_a_socket_byte_exact_with_half_close() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();

    // An app socket pair: the relay owns one end, the "app" the other.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut relayed, _) = listener.accept().await.unwrap();
    let mut tunnel = pool.connect(request(server.addr, upstream)).await.unwrap();
    let relay = tokio::spawn(async move { tunnel.relay(&mut relayed).await });

    const N: usize = 4 * 1024 * 1024;
    let data: Vec<u8> = (0..N).map(|i| (i * 7 % 253) as u8).collect();
    let (mut r, mut w) = app.split();
    let write = async {
        for chunk in data.chunks(65_536) {
            w.write_all(chunk).await.unwrap();
        }
        // The app's FIN becomes END_STREAM; the echo server's EOF comes back.
        w.shutdown().await.unwrap();
    };
    let mut out = Vec::with_capacity(N);
    let read = r.read_to_end(&mut out);
    let ((), read) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
            .await
            .expect("relay finished in time");
    read.unwrap();
    assert!(out == data, "relayed echo differs");
    let (to_app, from_app) = relay.await.unwrap().expect("relay ended cleanly");
    assert_eq!((to_app, from_app), (N as u64, N as u64));
}
