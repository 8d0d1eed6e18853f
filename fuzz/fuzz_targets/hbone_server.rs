//! Any bytes from an authenticated peer as the HTTP/2 side of an HBONE
//! connection: the server answers or closes, never panics or hangs, and
//! the handler only ever sees well-formed CONNECT requests.
#![no_main]

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_hbone::{
    CertStore, Identity, InboundRequest, Refusal, Server, handler_fn, testing::TestCa,
};
use tokio::io::{AsyncWriteExt, DuplexStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Refuse = fn(InboundRequest) -> std::future::Ready<Result<DuplexStream, Refusal>>;

/// Refuses every tunnel: the target is the server's parsing, not a backend.
fn refuse(_: InboundRequest) -> std::future::Ready<Result<DuplexStream, Refusal>> {
    std::future::ready(Err(Refusal::Denied("fuzz".into())))
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: Server<mesh_hbone::server::FnHandler<Refuse>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = TestCa::new("fuzz");
        let identity = Identity::new("cluster.local", "default", "server");
        let store = CertStore::new();
        store.insert(ca.issue(&identity.to_uri()));
        let server = Server::new(store, identity, handler_fn(refuse as Refuse)).expect("server");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Fixture { runtime, server }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let ca_peer = Identity::new("cluster.local", "default", "client");
    let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    fixture.runtime.block_on(async {
        let (mut client, server_io) = tokio::io::duplex(64 * 1024);
        let serve = fixture
            .server
            .serve_h2_for_fuzzing(server_io, ca_peer, peer);
        let feed = async move {
            // Most inputs should get past the preface to reach frame parsing.
            if !data.starts_with(b"PRI") {
                let _ = client.write_all(PREFACE).await;
            }
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Drain what the server answers so it never blocks on writing.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let both = async { tokio::join!(serve, feed) };
        let (_served, ()) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the server neither answered nor closed within 5 s");
    });
});
