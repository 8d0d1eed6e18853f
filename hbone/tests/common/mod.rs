//! Shared helpers for the HBONE integration tests.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_hbone::testing::TestCa;
use mesh_hbone::{
    CertStore, ConnectRequest, Handler, Identity, InboundRequest, Pool, PoolConfig, Refusal,
    Server, ServerConfig, StreamStats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const A: &str = "spiffe://cluster.local/ns/default/sa/a";
pub const B: &str = "spiffe://cluster.local/ns/default/sa/b";

pub fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// Handler that records requests and completions and forwards to the
/// authority over TCP, or refuses with a fixed refusal.
#[derive(Clone, Default)]
pub struct TestHandler {
    pub requests: Arc<Mutex<Vec<InboundRequest>>>,
    pub completions: Arc<Mutex<Vec<StreamStats>>>,
    pub refuse: Option<Refusal>,
}

impl Handler for TestHandler {
    type Upstream = TcpStream;

    async fn connect(&self, req: InboundRequest) -> Result<TcpStream, Refusal> {
        self.requests.lock().unwrap().push(req.clone());
        if let Some(r) = &self.refuse {
            return Err(r.clone());
        }
        Ok(TcpStream::connect(req.authority).await?)
    }

    fn on_complete(&self, _req: &InboundRequest, stats: &StreamStats) {
        self.completions.lock().unwrap().push(stats.clone());
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub handler: TestHandler,
    pub store: CertStore,
}

impl TestServer {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Starts an HBONE server for identity B on 127.0.0.1 (own accept loop so
/// accepted TCP connections can be counted; uses `serve_connection`).
pub async fn start_server(store: CertStore, handler: TestHandler) -> TestServer {
    start_server_with(store, handler, ServerConfig::default()).await
}

pub async fn start_server_with(
    store: CertStore,
    handler: TestHandler,
    config: ServerConfig,
) -> TestServer {
    let server = Server::with_config(store.clone(), id(B), handler.clone(), config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            acc.fetch_add(1, Ordering::SeqCst);
            let s = server.clone();
            tokio::spawn(async move {
                let _ = s.serve_connection(tcp, peer).await;
            });
        }
    });
    TestServer {
        addr,
        accepted,
        handler,
        store,
    }
}

/// Echo upstream: echoes bytes, half-closes after reading EOF.
pub async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Upstream that reads until EOF, then replies `got <n> bytes` and closes.
pub async fn count_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(format!("got {} bytes", buf.len()).as_bytes())
                    .await
                    .unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

pub struct Env {
    pub ca: TestCa,
    pub server_store: CertStore,
    pub client_store: CertStore,
}

impl Env {
    pub fn new() -> Self {
        let ca = TestCa::new("test root");
        let server_store = CertStore::with_cert(ca.issue(B));
        let client_store = CertStore::with_cert(ca.issue(A));
        Env {
            ca,
            server_store,
            client_store,
        }
    }

    pub fn pool(&self) -> Pool {
        Pool::new(self.client_store.clone(), PoolConfig::default())
    }
}

pub fn request(peer: SocketAddr, authority: SocketAddr) -> ConnectRequest {
    ConnectRequest {
        local: id(A),
        peer_addr: peer,
        expected: vec![id(B)],
        authority,
        forwarded_for: "10.1.2.3:4567".parse().unwrap(),
        host: None,
        baggage: None,
        traceparent: None,
    }
}

/// Opens a tunnel through `pool`, sends `msg`, half-closes and expects the
/// echo back.
pub async fn echo_once(pool: &Pool, peer: SocketAddr, upstream: SocketAddr, msg: &[u8]) {
    let mut t = pool.connect(request(peer, upstream)).await.unwrap();
    t.write_all(msg).await.unwrap();
    t.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, msg);
}

/// Asserts that a fresh, well-configured client can still use the server.
pub async fn assert_server_healthy(env: &Env, server: &TestServer) {
    let upstream = echo_upstream().await;
    let pool = env.pool();
    echo_once(&pool, server.addr, upstream, b"still alive").await;
}
