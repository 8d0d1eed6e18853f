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
