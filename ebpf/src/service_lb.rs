//! The lab's stand-in for kube-proxy: a cgroup `connect4` program that turns a
//! connect to a Service VIP:port into a connect to one of its endpoints,
//! chosen at random, inside the socket call (no NAT, no iptables).
//!
//! It is attached at the root of a lab's cgroup tree, so it runs after any
//! program attached lower down (the mesh's capture programs see the VIP first).

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_ebpf_common::{
    Ipv4Endpoint, LAB_LB_COUNTERS, LabLbCounter, MAX_BACKENDS, ServiceBackends,
};

/// Service VIP:port to its endpoints; filled by the lab.
#[map]
static LAB_SERVICES: HashMap<Ipv4Endpoint, ServiceBackends> = HashMap::with_max_entries(4096, 0);

/// Per-CPU counters indexed by [`LabLbCounter`].
#[map]
static LAB_LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LAB_LB_COUNTERS, 0);

/// Allow the connect (1); the program only ever rewrites, never refuses.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn lab_service_lb(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to connect4 programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = Ipv4Endpoint {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    // SAFETY: entries are only replaced whole by userspace; a torn read picks
    // a stale but valid backend.
    let Some(svc) = (unsafe { LAB_SERVICES.get(&key) }) else {
        return ALLOW;
    };
    let count = svc.count as usize;
    if count == 0 || count > MAX_BACKENDS {
        bump(LabLbCounter::NoBackend);
        return ALLOW;
    }
    // SAFETY: helper with no arguments and no side effects.
    let random = unsafe { bpf_get_prandom_u32() } as usize;
    // The verifier cannot bound a modulo by a register, and LLVM drops a mask
    // it can prove redundant; hiding the value from LLVM keeps the mask, which
    // changes nothing (count <= MAX_BACKENDS, a power of two) but bounds it.
    let idx = core::hint::black_box(random % count) & (MAX_BACKENDS - 1);
    let Some(backend) = svc.backends.get(idx) else {
        return ALLOW;
    };
    let (addr, port) = (backend.addr, backend.port);
    // Separate volatile stores: LLVM may otherwise merge them into one wider
    // store to the context, which the verifier rejects.
    // SAFETY: both fields are writable for connect4 programs.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip4, addr);
        core::ptr::write_volatile(&mut sa.user_port, u32::from(port));
    }
    bump(LabLbCounter::Translated);
    debug!(
        &ctx,
        "lab lb: {:i}:{} -> backend {}",
        u32::from_be(key.addr),
        u16::from_be(key.port),
        idx
    );
    ALLOW
}

#[inline(always)]
fn bump(counter: LabLbCounter) {
    if let Some(slot) = LAB_LB_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}
