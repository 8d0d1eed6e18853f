//! A handler that serves tunnels in process (`Accepted::Serve`): its
//! server reads and writes the tunnel's HTTP/2 stream itself, with no
//! upstream socket, and sees the client's half-close as EOF.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use mesh_hbone::{Accepted, Handler, InboundRequest, Refusal, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Answers every tunnel with its bytes upper-cased once the client
/// half-closed; refuses port 1.
#[derive(Clone)]
struct Uppercase;

impl Handler for Uppercase {
    type Upstream = tokio::io::DuplexStream;

    async fn connect(&self, _req: InboundRequest) -> Result<Self::Upstream, Refusal> {
        Err(Refusal::Unavailable("only serves in process".into()))
    }

    async fn accept(&self, req: InboundRequest) -> Result<Accepted<Self::Upstream>, Refusal> {
        if req.authority.port() == 1 {
            return Err(Refusal::Unavailable("port 1".into()));
        }
        Ok(Accepted::Serve(Box::new(|mut stream| {
            Box::pin(async move {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                stream.write_all(&got.to_ascii_uppercase()).await.unwrap();
                stream.shutdown().await.unwrap();
            })
        })))
    }
}

#[tokio::test]
async fn served_tunnels_read_and_write_the_stream_itself() {
    let env = Env::new();
    let server = Server::with_config(
        env.server_store.clone(),
        id(B),
        Uppercase,
        ServerConfig::default(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    let pool = env.pool();

    for msg in [&b"hello"[..], &vec![b'x'; 300_000][..]] {
        let mut tunnel = pool
            .connect(request(addr, "10.0.0.9:8080".parse().unwrap()))
            .await
            .unwrap();
        tunnel.write_all(msg).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, msg.to_ascii_uppercase());
    }
    // A refusal from `accept` is still a refusal.
    let refused = pool
        .connect(request(addr, "10.0.0.9:1".parse().unwrap()))
        .await;
    assert!(refused.is_err(), "port 1 must be refused");
}
