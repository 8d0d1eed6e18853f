//! Layouts of the eBPF maps, shared by the kernel programs (`ebpf/`) and the
//! userspace loader (`ebpf-loader/`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding, and stores addresses and
//! ports in network byte order exactly as the kernel hands them to programs, so
//! the kernel side never converts anything on the hot path.
#![no_std]

/// Most backends one service entry can hold in the lab's socket load balancer
/// (a power of two: the program masks indexes with it).
pub const MAX_BACKENDS: usize = 16;
const _: () = assert!(MAX_BACKENDS.is_power_of_two());

/// Name of the lab's service map (VIP:port to backends), as pinned in bpffs.
pub const LAB_SERVICES_MAP: &str = "LAB_SERVICES";
/// Name of the lab load balancer's counters map.
pub const LAB_LB_STATS_MAP: &str = "LAB_LB_STATS";
/// Name of the lab's cgroup `connect4` load-balancer program.
pub const LAB_SERVICE_LB_PROG: &str = "lab_service_lb";

/// An IPv4 socket address in network byte order: the key of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv4Endpoint {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// TCP port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero so keys hash identically.
    pub pad: u16,
}

impl Ipv4Endpoint {
    /// Builds an endpoint from host-order octets and port.
    pub const fn new(octets: [u8; 4], port: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
            port: port.to_be(),
            pad: 0,
        }
    }
}

/// The backends of one service: the value of the lab's service map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ServiceBackends {
    /// Number of valid entries at the front of `backends`.
    pub count: u32,
    /// Backend endpoints; entries at `count` and after are ignored.
    pub backends: [Ipv4Endpoint; MAX_BACKENDS],
}

impl Default for ServiceBackends {
    fn default() -> Self {
        Self {
            count: 0,
            backends: [Ipv4Endpoint::default(); MAX_BACKENDS],
        }
    }
}

/// Indexes of the lab load balancer's per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabLbCounter {
    /// Connects whose destination was a service VIP and got a backend.
    Translated = 0,
    /// Connects to a VIP whose service had no backend (left unchanged, so they fail).
    NoBackend = 1,
}

/// Number of lab load-balancer counters.
pub const LAB_LB_COUNTERS: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Ipv4Endpoint {}
    // SAFETY: plain `repr(C)` data; `count` (4 bytes) is followed by 8-byte
    // entries aligned to 4, so there is no implicit padding.
    unsafe impl aya::Pod for super::ServiceBackends {}
}

/// Name of the map of enrolled cgroups (key: cgroup id, value: [`EnrolledPod`]).
pub const CAPTURE_ENROLLED_MAP: &str = "CAPTURE_ENROLLED";
/// Name of the map of original destinations of captured outbound connects,
/// by client socket cookie, until the source port is known.
pub const CAPTURE_PENDING_MAP: &str = "CAPTURE_PENDING";
/// Name of the map of original destinations by [`OutboundKey`], read by ztunnel.
pub const CAPTURE_ORIG_DST_MAP: &str = "CAPTURE_ORIG_DST";
/// Name of the SOCKHASH of ztunnel's in-pod listeners, by [`ListenerKey`].
pub const CAPTURE_LISTENERS_MAP: &str = "CAPTURE_LISTENERS";
/// Name of the set of source addresses whose connections to enrolled pods
/// are never captured (the node's health-probe address), key: IPv4 in
/// network byte order, value: unused.
pub const CAPTURE_PROBE_SOURCES_MAP: &str = "CAPTURE_PROBE_SOURCES";
/// Connections ztunnel is about to open to a pod's app with the original
/// client's address as source: `capture_sk_lookup` lets them through.
pub const CAPTURE_DELIVER_MAP: &str = "CAPTURE_DELIVER";
/// Name of the per-CPU capture counters, indexed by [`CaptureCounter`].
pub const CAPTURE_STATS_MAP: &str = "CAPTURE_STATS";
/// Program steering enrolled pods' outbound connects to ztunnel.
pub const CAPTURE_CONNECT4_PROG: &str = "capture_connect4";
/// Program re-keying original destinations once the source port is known.
pub const CAPTURE_SOCKOPS_PROG: &str = "capture_sockops";
/// Program steering inbound connections of an enrolled pod to ztunnel.
pub const CAPTURE_SK_LOOKUP_PROG: &str = "capture_sk_lookup";

/// ztunnel's outbound listener port, bound to 127.0.0.1 in each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext listener port in each enrolled pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// ztunnel's HBONE listener port in each enrolled pod.
pub const HBONE_PORT: u16 = 15008;

/// What an enrolled cgroup maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address, network byte order.
    pub pod_ip: u32,
    /// Reserved; zero.
    pub flags: u32,
}

/// Key of [`CAPTURE_ORIG_DST_MAP`]: a captured client socket, as ztunnel sees
/// its peer after `accept` in the pod's namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OutboundKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// The client's source port, host byte order.
    pub port: u32,
    /// Explicit padding; always zero.
    pub pad: u32,
}

/// Key of [`CAPTURE_DELIVER_MAP`]: a connection as `sk_lookup` sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliverKey {
    /// Source address (the original client's), network byte order.
    pub remote_ip4: u32,
    /// Destination address (the pod's), network byte order.
    pub local_ip4: u32,
    /// Source port, network byte order (as `bpf_sk_lookup.remote_port`).
    pub remote_port: u16,
    /// Explicit padding; always zero.
    pub pad: u16,
    /// Destination port, host byte order (as `bpf_sk_lookup.local_port`).
    pub local_port: u32,
}

/// Which of ztunnel's in-pod listeners a [`ListenerKey`] names.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// 15006: plaintext inbound.
    InboundPlaintext = 1,
    /// 15008: HBONE.
    Hbone = 2,
}

/// Key of [`CAPTURE_LISTENERS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The pod's IPv4 address, network byte order.
    pub pod_ip: u32,
    /// A [`ListenerKind`] as `u32`.
    pub kind: u32,
}

/// Indexes of the capture counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureCounter {
    /// Outbound connects of enrolled pods steered to ztunnel.
    OutboundCaptured = 0,
    /// Outbound connects of enrolled pods left alone (loopback destinations).
    OutboundBypassed = 1,
    /// Inbound connections assigned to ztunnel's listeners.
    InboundCaptured = 2,
    /// Inbound connections refused because ztunnel's listener was missing.
    InboundRefused = 3,
    /// Map updates that failed (a full map); the connect was refused.
    Errors = 4,
    /// Inbound connections from a health-probe source, left to the app.
    InboundProbe = 5,
}

/// Number of capture counters.
pub const CAPTURE_COUNTERS: u32 = 6;

/// Name of the SOCKHASH of ztunnel's same-node HBONE sockets, by
/// [`SocketTuple`]: a message sent on one is put straight into its peer's
/// receive queue when the peer is in the map too.
pub const FASTPATH_SOCKS_MAP: &str = "FASTPATH_SOCKS";
/// Name of the per-CPU fast-path counters, indexed by [`FastPathCounter`].
pub const FASTPATH_STATS_MAP: &str = "FASTPATH_STATS";
/// Program (`sk_msg`) splicing messages between paired same-node sockets.
pub const FASTPATH_SK_MSG_PROG: &str = "fastpath_sk_msg";

/// Key of [`FASTPATH_SOCKS_MAP`]: a connected IPv4 TCP socket as seen from
/// its own side. Its peer's key swaps local and remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketTuple {
    /// Local address, network byte order.
    pub local_ip4: u32,
    /// Remote address, network byte order.
    pub remote_ip4: u32,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
}

impl SocketTuple {
    /// The key of the socket at the other end of this connection.
    pub const fn peer(&self) -> Self {
        Self {
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Indexes of the fast-path counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathCounter {
    /// Messages put straight into the peer socket's receive queue.
    Spliced = 0,
    /// Bytes of those messages.
    SplicedBytes = 1,
    /// Messages sent the ordinary way: the peer was not (or no longer) in the map.
    Passed = 2,
}

/// Number of fast-path counters.
pub const FASTPATH_COUNTERS: u32 = 3;

#[cfg(feature = "user")]
mod user_capture {
    // SAFETY: plain `repr(C)` data without implicit padding or pointers.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above (u64, u32, u32).
    unsafe impl aya::Pod for super::OutboundKey {}
    // SAFETY: as above (u32, u32).
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above (u32, u32, u16, u16, u32).
    unsafe impl aya::Pod for super::DeliverKey {}
    // SAFETY: as above (four u32).
    unsafe impl aya::Pod for super::SocketTuple {}
}
