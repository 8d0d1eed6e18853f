//! Connection pooling: many tunnels share one TCP/TLS/HTTP2 connection.
#![allow(missing_docs)]

mod common;

use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn fifty_sequential_tunnels_share_one_connection() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    for i in 0..50 {
        echo_once(&pool, server.addr, upstream, format!("msg {i}").as_bytes()).await;
    }
    let s = pool.stats();
    assert_eq!(s.connections_opened, 1, "{s:?}");
    assert_eq!(s.connections_reused, 49, "{s:?}");
    assert_eq!(s.tunnels_opened, 50, "{s:?}");
    assert_eq!(s.open_connections, 1, "{s:?}");
    assert_eq!(server.accepted(), 1);
    assert_eq!(server.handler.requests.lock().unwrap().len(), 50);
}

#[tokio::test]
async fn fifty_concurrent_tunnels_share_one_connection() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    let peer = server.addr;
    // All 50 connect at once, and all 50 tunnels are open at the same time
    // (barrier after connect) before any data flows.
    let barrier = Arc::new(tokio::sync::Barrier::new(51));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let pool = pool.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = pool.connect(request(peer, upstream)).await.unwrap();
            barrier.wait().await;
            barrier.wait().await;
            let msg = format!("concurrent {i}");
            t.write_all(msg.as_bytes()).await.unwrap();
            t.shutdown().await.unwrap();
            let mut out = Vec::new();
            t.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, msg.as_bytes());
        }));
    }
    barrier.wait().await;
    assert_eq!(pool.stats().active_streams, 50);
    barrier.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.connections_opened, 1, "{s:?}");
    assert_eq!(s.connections_reused, 49, "{s:?}");
    assert_eq!(s.active_streams, 0, "{s:?}");
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn stream_limit_opens_second_connection() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = mesh_hbone::Pool::new(
        env.client_store.clone(),
        mesh_hbone::PoolConfig {
            max_streams_per_connection: 2,
            ..Default::default()
        },
    );
    let t1 = pool.connect(request(server.addr, upstream)).await.unwrap();
    let t2 = pool.connect(request(server.addr, upstream)).await.unwrap();
    let t3 = pool.connect(request(server.addr, upstream)).await.unwrap();
    assert_eq!(t1.connection_id(), t2.connection_id());
    assert_ne!(t1.connection_id(), t3.connection_id());
    assert_eq!(pool.stats().connections_opened, 2);
    assert_eq!(server.accepted(), 2);
    drop((t1, t2, t3));
}
