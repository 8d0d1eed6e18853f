//! The same-node fast path: HBONE connections between two pods of this node
//! (both ends are ztunnel's own sockets, in the two pods' namespaces) are
//! handed to the kernel's `fastpath_sk_msg`, which moves each message
//! straight into the other socket's receive queue. TLS and HTTP/2 are
//! unchanged end to end; the bytes skip segmentation, both veth pairs,
//! routing and the receiving TCP stack.
//!
//! Both ends are inserted before either sends its first TLS flight after the
//! ClientHello, so no byte can overtake one still queued the ordinary way:
//! the dialler inserts its socket right after `connect`, the HBONE listener
//! inserts the accepted socket before the handshake starts, and the TLS 1.3
//! client sends nothing after its ClientHello until the server has answered.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
};

use mesh_ebpf_loader::capture::Capture;
use tokio::net::TcpStream;
use tracing::{debug, warn};

/// Decides which HBONE sockets are same-node and pairs them in the kernel.
#[derive(Debug)]
pub struct SameNode {
    capture: Arc<Mutex<Capture>>,
    /// IPs of the pods enrolled on this node.
    local_pods: RwLock<HashSet<Ipv4Addr>>,
}

impl SameNode {
    /// A fast path over `capture`'s maps; inert until
    /// [`Capture::enable_fast_path`] has succeeded.
    pub fn new(capture: Arc<Mutex<Capture>>) -> Self {
        Self {
            capture,
            local_pods: RwLock::default(),
        }
    }

    /// Replaces the set of this node's enrolled pods.
    pub fn set_local_pods(&self, pods: impl IntoIterator<Item = Ipv4Addr>) {
        let pods: HashSet<Ipv4Addr> = pods.into_iter().collect();
        *self
            .local_pods
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = pods;
    }

    /// Offers one end of an HBONE connection: when its peer is a pod of this
    /// node, the socket joins the kernel's fast-path map. Failures (a full
    /// map) only cost the fast path, never the connection.
    pub fn offer(&self, stream: &TcpStream) {
        let (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(peer))) =
            (stream.local_addr(), stream.peer_addr())
        else {
            return;
        };
        let is_local = self
            .local_pods
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(peer.ip());
        if !is_local {
            return;
        }
        let mut capture = self
            .capture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match capture.splice_same_node(stream, local, peer) {
            Ok(true) => debug!(%local, %peer, "same-node HBONE socket on the fast path"),
            Ok(false) => {}
            Err(err) => warn!(
                %local,
                %peer,
                error = %format!("{:#}", anyhow::Error::new(err)),
                "same-node fast path refused this socket; it takes the ordinary path"
            ),
        }
    }
}
