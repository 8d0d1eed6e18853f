//! Capture of enrolled pods' TCP into ztunnel, with socket-level hooks only
//! (no packet rewriting, no iptables):
//!
//! - `capture_connect4` (cgroup, attached above the pods' cgroups): a connect
//!   from an enrolled cgroup to anything but loopback goes to ztunnel's
//!   outbound listener at `127.0.0.1:15001` inside the pod's own namespace;
//!   the original destination is kept by socket cookie.
//! - `capture_sockops` (cgroup): when that connect is sent, the source port is
//!   known; the original destination is re-keyed by (netns cookie, port), which
//!   is what ztunnel sees of its peer after `accept`.
//! - `capture_sk_lookup` (per enrolled pod namespace): a connection arriving on
//!   the pod's interface goes to ztunnel's in-pod listener (15008 for HBONE,
//!   15006 for everything else). Without that listener it is refused, never
//!   handed to the app in plaintext. Connections from the pod's own address
//!   (ztunnel delivering to the app from inside the pod, or the pod calling
//!   itself, already captured on the way out), from the node's configured
//!   health-probe address, and to loopback are left alone, as are those
//!   ztunnel announced in `CAPTURE_DELIVER`: its own connections to the app
//!   that carry the original client's address as their source.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action},
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_ebpf_common::{
    CAPTURE_COUNTERS, CaptureCounter, DeliverKey, EnrolledPod, HBONE_PORT, Ipv4Endpoint,
    ListenerKey, ListenerKind, OUTBOUND_PORT, OutboundKey,
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
/// 127.0.0.1 in network byte order.
const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Enrolled cgroups (pods), by cgroup id; maintained by ztunnel.
#[map]
static CAPTURE_ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(16384, 0);

/// Original destinations by client socket cookie, between connect and send.
#[map]
static CAPTURE_PENDING: LruHashMap<u64, Ipv4Endpoint> = LruHashMap::with_max_entries(65536, 0);

/// Original destinations by (netns cookie, client port); read (and removed) by ztunnel.
#[map]
static CAPTURE_ORIG_DST: LruHashMap<OutboundKey, Ipv4Endpoint> =
    LruHashMap::with_max_entries(65536, 0);

/// ztunnel's in-pod listeners, by pod IP and kind.
#[map]
static CAPTURE_LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(32768, 0);

/// Source addresses (the node's health-probe address) never captured inbound.
#[map]
static CAPTURE_PROBE_SOURCES: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// ztunnel's transparent connections to apps, announced just before connect.
#[map]
static CAPTURE_DELIVER: LruHashMap<DeliverKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU counters indexed by [`CaptureCounter`].
#[map]
static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CAPTURE_COUNTERS, 0);

/// connect4 verdicts.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to connect4 programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return CONNECT_ALLOW;
    }
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { CAPTURE_ENROLLED.get(&cgroup) }.is_none() {
        return CONNECT_ALLOW;
    }
    let original = Ipv4Endpoint {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    if u32::from_be(original.addr) >> 24 == 127 {
        bump(CaptureCounter::OutboundBypassed);
        return CONNECT_ALLOW;
    }
    // SAFETY: connect4 contexts carry a socket; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if CAPTURE_PENDING.insert(&cookie, &original, 0).is_err() {
        // Without the original destination ztunnel could not proxy: refuse
        // rather than let the connection bypass the mesh.
        bump(CaptureCounter::Errors);
        return CONNECT_REFUSE;
    }
    // Separate volatile stores: a merged wider store is rejected by the verifier.
    // SAFETY: both fields are writable for connect4 programs.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip4, LOCALHOST_BE);
        core::ptr::write_volatile(&mut sa.user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    bump(CaptureCounter::OutboundCaptured);
    debug!(
        &ctx,
        "capture: cgroup {} connect to {:i}:{} -> ztunnel",
        cgroup,
        u32::from_be(original.addr),
        u16::from_be(original.port)
    );
    CONNECT_ALLOW
}

#[sock_ops]
pub fn capture_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB || ctx.family() != AF_INET {
        return 0;
    }
    // SAFETY: sock_ops contexts carry a full socket at TCP_CONNECT_CB.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(original) = (unsafe { CAPTURE_PENDING.get(&cookie) }).copied() else {
        return 0;
    };
    let key = OutboundKey {
        // SAFETY: valid context pointer.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port(),
        pad: 0,
    };
    if CAPTURE_ORIG_DST.insert(&key, &original, 0).is_err() {
        bump(CaptureCounter::Errors);
    }
    let _ = CAPTURE_PENDING.remove(&cookie);
    0
}

#[sk_lookup]
pub fn capture_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup` to sk_lookup programs.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP
        || lookup.family != AF_INET
        || lookup.remote_ip4 == lookup.local_ip4
        || u32::from_be(lookup.local_ip4) >> 24 == 127
    {
        return sk_action::SK_PASS;
    }
    // Map keys must live on the stack, not in the context.
    let remote = lookup.remote_ip4;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { CAPTURE_PROBE_SOURCES.get(&remote) }.is_some() {
        bump(CaptureCounter::InboundProbe);
        return sk_action::SK_PASS;
    }
    let deliver = DeliverKey {
        remote_ip4: remote,
        local_ip4: lookup.local_ip4,
        remote_port: lookup.remote_port,
        pad: 0,
        local_port: lookup.local_port,
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { CAPTURE_DELIVER.get(&deliver) }.is_some() {
        return sk_action::SK_PASS;
    }
    let kind = if lookup.local_port == u32::from(HBONE_PORT) {
        ListenerKind::Hbone
    } else {
        ListenerKind::InboundPlaintext
    };
    let key = ListenerKey {
        pod_ip: lookup.local_ip4,
        kind: kind as u32,
    };
    match CAPTURE_LISTENERS.redirect_sk_lookup(&ctx, &key, 0) {
        Ok(()) => {
            bump(CaptureCounter::InboundCaptured);
            sk_action::SK_PASS
        }
        Err(_) => {
            // ztunnel is not there (restarting, or the pod is being enrolled):
            // refuse rather than deliver around the mesh.
            bump(CaptureCounter::InboundRefused);
            sk_action::SK_DROP
        }
    }
}

#[inline(always)]
fn bump(counter: CaptureCounter) {
    if let Some(slot) = CAPTURE_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}
