//! Same-node fast path: when both ends of one of ztunnel's HBONE connections
//! live on this node (a pod calling a pod of the same node), ztunnel puts
//! both sockets in `FASTPATH_SOCKS`. `fastpath_sk_msg` then runs on every
//! `sendmsg` of either socket and moves the bytes straight into the other
//! socket's receive queue, so they skip TCP segmentation, the veth pairs,
//! routing and the receiving TCP stack. The connection's handshake and
//! teardown (SYN, FIN, RST) still go the ordinary way.
//!
//! Only ztunnel's own HBONE sockets are ever inserted: both ends read their
//! data promptly and HTTP/2 flow control bounds what is in flight, which is
//! what keeps the receive queues bounded (an ingress redirect is not limited
//! by the receiver's buffer). A message whose peer is not (or no longer) in
//! the map is sent the ordinary way.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action},
    macros::{map, sk_msg},
    maps::{PerCpuArray, SockHash},
    programs::SkMsgContext,
};
use mesh_ebpf_common::{FASTPATH_COUNTERS, FastPathCounter, SocketTuple};

const AF_INET: u32 = 2;

/// ztunnel's same-node HBONE sockets, keyed by their own 4-tuple.
#[map]
static FASTPATH_SOCKS: SockHash<SocketTuple> = SockHash::with_max_entries(65536, 0);

/// Per-CPU counters indexed by [`FastPathCounter`].
#[map]
static FASTPATH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FASTPATH_COUNTERS, 0);

#[sk_msg]
pub fn fastpath_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // One 4-byte load per field: the verifier refuses wider context reads.
    // SAFETY: the kernel hands a valid `sk_msg_md` to sk_msg programs.
    let (family, remote_ip4, local_ip4, remote_port, local_port, size) = unsafe {
        (
            core::ptr::read_volatile(&(*md).family),
            core::ptr::read_volatile(&(*md).remote_ip4),
            core::ptr::read_volatile(&(*md).local_ip4),
            core::ptr::read_volatile(&(*md).remote_port),
            core::ptr::read_volatile(&(*md).local_port),
            core::ptr::read_volatile(&(*md).size),
        )
    };
    if family != AF_INET {
        return sk_action::SK_PASS;
    }
    // The peer's own view of the connection: our remote end is its local one.
    let mut peer = SocketTuple {
        local_ip4: remote_ip4,
        remote_ip4: local_ip4,
        local_port: remote_port_host(remote_port),
        remote_port: local_port,
    };
    if FASTPATH_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
        == i64::from(sk_action::SK_PASS)
    {
        bump(FastPathCounter::Spliced, 1);
        bump(FastPathCounter::SplicedBytes, u64::from(size));
    } else {
        bump(FastPathCounter::Passed, 1);
    }
    sk_action::SK_PASS
}

/// `sk_msg_md.remote_port` holds the port in network byte order, in the
/// upper half of the word on little-endian kernels and the lower half on
/// others; this returns it in host order either way.
#[inline(always)]
fn remote_port_host(raw: u32) -> u32 {
    let word = u32::from_be(raw);
    if word > 0xffff { word >> 16 } else { word }
}

#[inline(always)]
fn bump(counter: FastPathCounter, by: u64) {
    if let Some(slot) = FASTPATH_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += by };
    }
}
