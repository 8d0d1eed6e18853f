//! Certificate rotation: open tunnels survive, new connections use new certs.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use mesh_hbone::cert::serial_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn ping(t: &mut mesh_hbone::Tunnel, msg: &[u8]) {
    t.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn rotation_keeps_open_tunnels_and_uses_new_certs() {
    let env = Env::new();
    let server = start_server(env.server_store.clone(), TestHandler::default()).await;
    let upstream = echo_upstream().await;
    let pool = env.pool();

    let b1 = env.server_store.get(&id(B)).unwrap();
    let a1 = env.client_store.get(&id(A)).unwrap();

    let mut t1 = pool.connect(request(server.addr, upstream)).await.unwrap();
    ping(&mut t1, b"before").await;
    assert_eq!(
        serial_of(t1.peer_certificate().unwrap()).unwrap(),
        b1.serial()
    );

    // Rotate both sides (different validity => different not_after too).
    let b2 = env.ca.issue_with_validity(B, Duration::from_secs(7200));
    let a2 = env.ca.issue_with_validity(A, Duration::from_secs(7200));
    assert_ne!(b1.serial(), b2.serial());
    assert_ne!(a1.not_after(), a2.not_after());
    env.server_store.insert(b2.clone());
    env.client_store.insert(a2.clone());
    assert_eq!(env.server_store.get(&id(B)).unwrap().serial(), b2.serial());

    // The established tunnel keeps working.
    ping(&mut t1, b"after rotation").await;

    // A new tunnel goes over a new connection presenting the new certs.
    let mut t2 = pool.connect(request(server.addr, upstream)).await.unwrap();
    assert_ne!(t1.connection_id(), t2.connection_id());
    ping(&mut t2, b"new").await;
    assert_eq!(
        serial_of(t2.peer_certificate().unwrap()).unwrap(),
        b2.serial()
    );
    assert_eq!(pool.stats().connections_opened, 2);
    assert_eq!(server.accepted(), 2);

    let reqs = server.handler.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    let client_serial = |i: usize| serial_of(reqs[i].peer_certificate.as_ref().unwrap()).unwrap();
    assert_eq!(client_serial(0), a1.serial());
    assert_eq!(client_serial(1), a2.serial());

    // Old tunnel still fine after the new connection was made.
    ping(&mut t1, b"still").await;
    t1.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t1.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[test]
fn expiry_helpers() {
    let ca = mesh_hbone::testing::TestCa::new("root");
    let c = ca.issue_with_validity(A, Duration::from_secs(3600));
    assert!(!c.is_expiring(Duration::from_secs(60)));
    assert!(c.is_expiring(Duration::from_secs(7200)));
    assert_eq!(c.identity(), &id(A));
    assert_eq!(c.chain().len(), 1);
    assert_eq!(c.roots().len(), 1);
    let store = mesh_hbone::CertStore::with_cert(c);
    assert_eq!(store.expiring(Duration::from_secs(7200)), vec![id(A)]);
    assert!(store.expiring(Duration::from_secs(60)).is_empty());
}

#[test]
fn pem_parsing_errors_are_reported() {
    let ca = mesh_hbone::testing::TestCa::new("root");
    let p = ca.issue_pem(A, Duration::from_secs(3600));
    assert!(mesh_hbone::WorkloadCert::from_pem(&p.chain_pem, &p.key_pem).is_ok());
    assert!(mesh_hbone::WorkloadCert::from_pem("garbage", &p.key_pem).is_err());
    assert!(mesh_hbone::WorkloadCert::from_pem(&p.chain_pem, "garbage").is_err());
    // Key of another certificate.
    let q = ca.issue_pem(A, Duration::from_secs(3600));
    assert!(mesh_hbone::WorkloadCert::from_pem(&p.chain_pem, &q.key_pem).is_err());
    assert!(
        mesh_hbone::WorkloadCert::from_pem_with_roots(&p.chain_pem, &p.key_pem, ca.root_pem())
            .is_ok()
    );
}
