//! Garbage input closes only the offending connection; the server survives.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use mesh_hbone::{ServerConfig, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (EOF or error).
async fn expect_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 1024];
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(res.is_ok(), "server did not close the connection");
}

#[tokio::test]
async fn raw_garbage_instead_of_client_hello() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let _ = tcp.write_all(&junk).await;
    expect_closed(&mut tcp).await;
    // Plain HTTP/1.1 too.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    expect_closed(&mut tcp).await;
    assert_server_healthy(&env, &server).await;
}

#[tokio::test]
async fn garbage_instead_of_http2_preface() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let cfg = tls::client_config(env.client_store.clone(), id(A), vec![id(B)]).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tls::connect(cfg, tcp, server.addr).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nthis is not an HTTP/2 preface at all")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    expect_closed(&mut tls).await;
    assert!(server.handler.requests.lock().unwrap().is_empty());
    assert_server_healthy(&env, &server).await;
}

#[tokio::test]
async fn silent_client_hits_handshake_timeout() {
    let env = Env::new();
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = start_server_with(env.server_store.clone(), TestHandler::default(), config).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    expect_closed(&mut tcp).await;
    assert_server_healthy(&env, &server).await;
}

#[tokio::test]
async fn many_streams_beyond_limit_are_queued_not_fatal() {
    let env = Env::new();
    let config = ServerConfig {
        max_concurrent_streams: 5,
        ..Default::default()
    };
    let server = start_server_with(env.server_store.clone(), TestHandler::default(), config).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();
    // Hold 5 streams open; the pool sees the server's limit and opens a
    // second connection for the rest instead of failing.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(pool.connect(request(server.addr, upstream)).await.unwrap());
    }
    assert!(pool.stats().connections_opened >= 3, "{:?}", pool.stats());
    drop(held);
    assert_server_healthy(&env, &server).await;
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: literal header field without indexing, indexed name, raw value.
fn literal(name_index: u8, value: &str) -> Vec<u8> {
    let mut v = vec![name_index, value.len() as u8];
    v.extend_from_slice(value.as_bytes());
    v
}

#[tokio::test]
async fn stream_flood_beyond_max_concurrent_streams_is_contained() {
    let env = Env::new();
    let handler = TestHandler {
        // Keep streams open as long as possible: upstream is a listener that
        // never answers.
        ..Default::default()
    };
    let server = start_server(env.server_store.clone(), handler).await;
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = sink.accept().await {
            held.push(s);
        }
    });

    let cfg = tls::client_config(env.client_store.clone(), id(A), vec![id(B)]).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tls::connect(cfg, tcp, server.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    let mut block = literal(0x02, "CONNECT"); // :method
    block.extend(literal(0x01, &sink_addr.to_string())); // :authority
    // 500 CONNECT streams at once, ignoring the server's limit of 100.
    for i in 0..500u32 {
        out.extend(frame(0x1, 0x4, 2 * i + 1, &block)); // HEADERS, END_HEADERS
    }
    let _ = tls.write_all(&out).await;
    let _ = tls.flush().await;
    // Whatever the server does (refuse streams, GOAWAY, close), it must not
    // hang or crash; drain for a bit.
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let accepted = server.handler.requests.lock().unwrap().len();
    assert!(accepted <= 100, "server accepted {accepted} streams");
    drop(tls);
    assert_server_healthy(&env, &server).await;
}
