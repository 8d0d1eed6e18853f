//! Relaying captured connections. Until the HBONE tunnel lands, captured
//! connections are forwarded in plaintext to their original destination;
//! every one leaves an access record, so tests can prove its bytes went
//! through ztunnel.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use mesh_ebpf_loader::capture::{Capture, netns_cookie};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::inpod::PodNetns;

/// What the proxy knows of the pod a connection belongs to.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub name: String,
    /// The pod's IP: the source of its outbound connections.
    pub ip: std::net::Ipv4Addr,
    /// Its network namespace, where upstream sockets are created.
    pub netns: PodNetns,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

fn connection_id() -> u64 {
    NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed)
}

/// Handles a connection the pod opened, accepted on its 15001 listener.
pub async fn outbound(
    pod: Arc<PodContext>,
    capture: Arc<Mutex<Capture>>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let id = connection_id();
    let span = info_span!("outbound", conn = id, pod = %pod.name);
    async move {
        let original = netns_cookie(&client).map_err(|err| err.to_string()).and_then(|cookie| {
            capture
                .lock()
                .map_err(|_| "capture state poisoned".to_owned())?
                .take_original_destination(cookie, peer.port())
                .map_err(|err| err.to_string())
        });
        let destination = match original {
            Ok(Some(destination)) => SocketAddr::V4(destination),
            Ok(None) => {
                warn!(%peer, "no original destination recorded for this connection; resetting it");
                reset(client);
                return;
            }
            Err(err) => {
                warn!(%peer, %err, "reading the original destination failed; resetting the connection");
                reset(client);
                return;
            }
        };
        let source = SocketAddr::new(pod.ip.into(), peer.port());
        relay(id, "outbound", &pod, client, source, destination).await;
    }
    .instrument(span)
    .await
}

/// Handles a plaintext connection to the pod, accepted on its 15006 listener.
pub async fn inbound(pod: Arc<PodContext>, client: TcpStream, peer: SocketAddr) {
    let id = connection_id();
    let span = info_span!("inbound", conn = id, pod = %pod.name);
    async move {
        // sk_lookup handed us the connection unchanged: our local address is
        // the destination the client dialled.
        let destination = match client.local_addr() {
            Ok(addr) => addr,
            Err(err) => {
                warn!(%peer, %err, "reading the destination failed; closing the connection");
                return;
            }
        };
        relay(id, "inbound", &pod, client, peer, destination).await;
    }
    .instrument(span)
    .await
}

async fn relay(
    id: u64,
    direction: &str,
    pod: &PodContext,
    mut client: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
) {
    let started = Instant::now();
    let mut upstream = match pod.netns.connect(destination).await {
        Ok(upstream) => upstream,
        Err(err) => {
            info!(target: "ztunnel::access", conn = id, direction, pod = %pod.name, src = %source, dst = %destination, error = %err, "connection failed");
            reset(client);
            return;
        }
    };
    debug!(%destination, "upstream connected");
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (sent, received, error) = match result {
        Ok((sent, received)) => (sent, received, None),
        Err(err) => (0, 0, Some(err.to_string())),
    };
    info!(
        target: "ztunnel::access",
        conn = id,
        direction,
        pod = %pod.name,
        src = %source,
        dst = %destination,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "connection closed"
    );
}

/// Closes `client` with a reset rather than a FIN, so a failed upstream
/// reaches the caller as an error instead of an empty, successful exchange.
fn reset(client: TcpStream) {
    let socket = socket2::SockRef::from(&client);
    if let Err(err) = socket.set_linger(Some(std::time::Duration::ZERO)) {
        debug!(%err, "setting SO_LINGER 0 failed; closing normally");
    }
    drop(client);
}
