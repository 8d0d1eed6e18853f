//! Userspace side of capture: attaching the capture programs of one node,
//! enrolling and releasing pods, registering ztunnel's in-pod listeners and
//! reading the original destinations of captured connects.
//!
//! Everything is pinned under the node's pin directory:
//!
//! ```text
//! <pin dir>/CAPTURE_*            maps (adopted, not recreated, on restart)
//! <pin dir>/connect4_link        cgroup/connect4 on the node's pods cgroup
//! <pin dir>/sockops_link         sock_ops on the same cgroup
//! <pin dir>/fastpath_link        sk_msg on FASTPATH_SOCKS (same-node fast path)
//! <pin dir>/sk_lookup/<a_b_c_d>  sk_lookup on each enrolled pod's namespace
//! ```
//!
//! A restarted agent calls [`Capture::install`] again: it adopts the pinned
//! maps and links instead of attaching twice, so capture never stops.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use mesh_ebpf_common::{
    CAPTURE_CONNECT4_PROG, CAPTURE_DELIVER_MAP, CAPTURE_ENROLLED_MAP, CAPTURE_LISTENERS_MAP,
    CAPTURE_ORIG_DST_MAP, CAPTURE_PENDING_MAP, CAPTURE_PROBE_SOURCES_MAP, CAPTURE_SK_LOOKUP_PROG,
    CAPTURE_SOCKOPS_PROG, CAPTURE_STATS_MAP, CaptureCounter, DeliverKey, EnrolledPod,
    FASTPATH_SK_MSG_PROG, FASTPATH_SOCKS_MAP, FASTPATH_STATS_MAP, FastPathCounter, Ipv4Endpoint,
    ListenerKey, ListenerKind, OutboundKey, SocketTuple,
};

use crate::{
    Error, OBJECT, Result,
    object::{
        attach_cgroup_pinned, fd_link, map_err, open, pin_link, prog_err, program, remove_pin,
        take_map,
    },
};

const CONNECT4_LINK: &str = "connect4_link";
/// aya-log's ring buffer, pinned so a restarted agent reads adopted programs' logs.
const AYA_LOGS_MAP: &str = "AYA_LOGS";
/// aya-log-ebpf's level filter (a global of the object).
const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
/// aya-log's `Level::Debug`.
const LOG_LEVEL_DEBUG: u8 = 4;
const SOCKOPS_LINK: &str = "sockops_link";
const SK_LOOKUP_DIR: &str = "sk_lookup";
const FASTPATH_LINK: &str = "fastpath_link";

/// The capture programs and maps of one node.
pub struct Capture {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    orig_dst: HashMap<MapData, OutboundKey, Ipv4Endpoint>,
    listeners: SockHash<MapData, ListenerKey>,
    probe_sources: HashMap<MapData, u32, u8>,
    deliver: HashMap<MapData, DeliverKey, u8>,
    stats: PerCpuArray<MapData, u64>,
    fastpath_socks: SockHash<MapData, SocketTuple>,
    fastpath_stats: PerCpuArray<MapData, u64>,
    /// Whether `fastpath_sk_msg` is attached to `fastpath_socks`.
    fastpath_enabled: bool,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

/// A pod as capture needs it.
#[derive(Clone, Debug)]
pub struct PodTarget {
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Its network namespace (e.g. `/var/run/netns/<name>`).
    pub netns: PathBuf,
}

/// Capture counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Outbound connects steered to ztunnel.
    pub outbound_captured: u64,
    /// Outbound connects of enrolled pods left alone (loopback).
    pub outbound_bypassed: u64,
    /// Inbound connections handed to ztunnel.
    pub inbound_captured: u64,
    /// Inbound connections refused for want of ztunnel's listener.
    pub inbound_refused: u64,
    /// Failed map updates (connect refused).
    pub errors: u64,
    /// Inbound connections from a health-probe source, left to the app.
    pub inbound_probe: u64,
}

/// Same-node fast-path counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathStats {
    /// Messages moved straight into the peer socket's receive queue.
    pub spliced: u64,
    /// Bytes of those messages.
    pub spliced_bytes: u64,
    /// Messages of paired-map sockets sent the ordinary way (peer missing).
    pub passed: u64,
}

impl Capture {
    /// Loads the capture programs, adopting pinned maps in `pin_dir`, and
    /// attaches connect4 and sock_ops to `pods_cgroup` unless a previous run
    /// left them attached (pinned).
    ///
    /// `debug_logs` turns on the programs' aya-log debug records (read them
    /// with [`take_logger`](Self::take_logger)); off, the programs skip the
    /// ring buffer entirely. It applies to programs this call attaches, not
    /// to ones adopted from pins.
    pub fn install(pods_cgroup: &Path, pin_dir: &Path, debug_logs: bool) -> Result<Self> {
        fs::create_dir_all(pin_dir.join(SK_LOOKUP_DIR)).map_err(|source| Error::Io {
            what: "creating pin directory",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        let maps = [
            CAPTURE_ENROLLED_MAP,
            CAPTURE_PENDING_MAP,
            CAPTURE_ORIG_DST_MAP,
            CAPTURE_LISTENERS_MAP,
            CAPTURE_STATS_MAP,
            CAPTURE_PROBE_SOURCES_MAP,
            CAPTURE_DELIVER_MAP,
            FASTPATH_SOCKS_MAP,
            FASTPATH_STATS_MAP,
        ];
        for name in maps.into_iter().chain([AYA_LOGS_MAP]) {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let log_level: u8 = if debug_logs { LOG_LEVEL_DEBUG } else { 0 };
        loader.override_global(AYA_LOG_LEVEL, &log_level, false);
        let mut ebpf = loader.load(OBJECT)?;

        let connect4: &mut CgroupSockAddr = program(&mut ebpf, CAPTURE_CONNECT4_PROG)?;
        connect4.load().map_err(prog_err(CAPTURE_CONNECT4_PROG))?;
        let sockops: &mut SockOps = program(&mut ebpf, CAPTURE_SOCKOPS_PROG)?;
        sockops.load().map_err(prog_err(CAPTURE_SOCKOPS_PROG))?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, CAPTURE_SK_LOOKUP_PROG)?;
        sk_lookup.load().map_err(prog_err(CAPTURE_SK_LOOKUP_PROG))?;

        let cgroup = open(pods_cgroup, "opening cgroup")?;
        // Adopted from a previous run when pinned: never attach twice.
        let connect4_pin = pin_dir.join(CONNECT4_LINK);
        if !connect4_pin.exists() {
            attach_cgroup_pinned!(
                &mut ebpf,
                CgroupSockAddr,
                CAPTURE_CONNECT4_PROG,
                &cgroup,
                &connect4_pin
            )?;
        }
        let sockops_pin = pin_dir.join(SOCKOPS_LINK);
        if !sockops_pin.exists() {
            attach_cgroup_pinned!(
                &mut ebpf,
                SockOps,
                CAPTURE_SOCKOPS_PROG,
                &cgroup,
                &sockops_pin
            )?;
        }

        Ok(Self {
            enrolled: take_map(&mut ebpf, CAPTURE_ENROLLED_MAP, HashMap::try_from)?,
            orig_dst: take_map(&mut ebpf, CAPTURE_ORIG_DST_MAP, HashMap::try_from)?,
            listeners: take_map(&mut ebpf, CAPTURE_LISTENERS_MAP, SockHash::try_from)?,
            probe_sources: take_map(&mut ebpf, CAPTURE_PROBE_SOURCES_MAP, HashMap::try_from)?,
            deliver: take_map(&mut ebpf, CAPTURE_DELIVER_MAP, HashMap::try_from)?,
            stats: take_map(&mut ebpf, CAPTURE_STATS_MAP, PerCpuArray::try_from)?,
            fastpath_socks: take_map(&mut ebpf, FASTPATH_SOCKS_MAP, SockHash::try_from)?,
            fastpath_stats: take_map(&mut ebpf, FASTPATH_STATS_MAP, PerCpuArray::try_from)?,
            fastpath_enabled: false,
            pin_dir: pin_dir.to_path_buf(),
            ebpf,
        })
    }

    /// Turns the same-node fast path on: loads `fastpath_sk_msg` and attaches
    /// it to `FASTPATH_SOCKS` (adopting the pinned link a previous run left).
    /// Until this succeeds, [`splice_same_node`](Self::splice_same_node)
    /// does nothing and every byte takes the ordinary path.
    pub fn enable_fast_path(&mut self) -> Result<()> {
        let sk_msg: &mut SkMsg = program(&mut self.ebpf, FASTPATH_SK_MSG_PROG)?;
        sk_msg.load().map_err(prog_err(FASTPATH_SK_MSG_PROG))?;
        let link_pin = self.pin_dir.join(FASTPATH_LINK);
        if !link_pin.exists() {
            let id = sk_msg
                .attach(self.fastpath_socks.fd())
                .map_err(prog_err(FASTPATH_SK_MSG_PROG))?;
            // Since Linux 6.10 the attachment is a link, pinned so a restart
            // adopts it. Older kernels attach to the map directly; that
            // attachment stays with the program, for this process's life,
            // and the next run attaches again.
            let links = aya::util::KernelVersion::current()
                .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 10, 0));
            if links {
                let link = sk_msg
                    .take_link(id)
                    .map_err(prog_err(FASTPATH_SK_MSG_PROG))?;
                pin_link(fd_link(link, FASTPATH_SK_MSG_PROG)?, &link_pin)?;
            }
        }
        self.fastpath_enabled = true;
        Ok(())
    }

    /// Whether the same-node fast path is on.
    pub fn fast_path_enabled(&self) -> bool {
        self.fastpath_enabled
    }

    /// Puts one end of a same-node connection in `FASTPATH_SOCKS`, keyed by
    /// its own `local` and `peer` addresses. Once the socket at the other
    /// end is there too, their bytes skip the TCP/IP stack. The kernel drops
    /// the entry when the socket closes. Returns whether it was inserted
    /// (`false` with the fast path off).
    pub fn splice_same_node(
        &mut self,
        socket: &impl AsRawFd,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Result<bool> {
        if !self.fastpath_enabled {
            return Ok(false);
        }
        let key = SocketTuple {
            local_ip4: u32::from_ne_bytes(local.ip().octets()),
            remote_ip4: u32::from_ne_bytes(peer.ip().octets()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(peer.port()),
        };
        self.fastpath_socks
            .insert(&key, socket.as_raw_fd(), 0)
            .map_err(map_err(FASTPATH_SOCKS_MAP))?;
        Ok(true)
    }

    /// Reads the fast-path counters, summed over CPUs.
    pub fn fast_path_stats(&self) -> Result<FastPathStats> {
        let read = |counter: FastPathCounter| -> Result<u64> {
            let values = self
                .fastpath_stats
                .get(&(counter as u32), 0)
                .map_err(map_err(FASTPATH_STATS_MAP))?;
            Ok(values.iter().sum())
        };
        Ok(FastPathStats {
            spliced: read(FastPathCounter::Spliced)?,
            spliced_bytes: read(FastPathCounter::SplicedBytes)?,
            passed: read(FastPathCounter::Passed)?,
        })
    }

    /// Starts capturing `pod`: its new outbound connects go to ztunnel, and
    /// connections arriving in its namespace go to ztunnel's listeners there.
    /// Enrolling a pod twice is a no-op.
    pub fn enroll(&mut self, pod: &PodTarget) -> Result<()> {
        // Everything that can fail without side effects comes first.
        let cgroup = cgroup_id(&pod.cgroup)?;
        let link_pin = self.sk_lookup_pin(pod.ip);
        if !link_pin.exists() {
            let netns = open(&pod.netns, "opening netns")?;
            let sk_lookup: &mut SkLookup = program(&mut self.ebpf, CAPTURE_SK_LOOKUP_PROG)?;
            let id = sk_lookup
                .attach(&netns)
                .map_err(prog_err(CAPTURE_SK_LOOKUP_PROG))?;
            let link = sk_lookup
                .take_link(id)
                .map_err(prog_err(CAPTURE_SK_LOOKUP_PROG))?;
            pin_link(link.into(), &link_pin)?;
        }
        let value = EnrolledPod {
            pod_ip: u32::from_ne_bytes(pod.ip.octets()),
            flags: 0,
        };
        if let Err(source) = self.enrolled.insert(&cgroup, &value, 0) {
            // A full map: leave the pod as it was rather than half enrolled,
            // with its inbound connections refused by a lone sk_lookup.
            remove_pin(&link_pin)?;
            return Err(map_err(CAPTURE_ENROLLED_MAP)(source));
        }
        Ok(())
    }

    /// Stops capturing `pod` for new connections; open ones are not touched.
    ///
    /// Works from the pod's IP alone, so a pod whose cgroup and namespace are
    /// already gone is released all the same.
    pub fn release(&mut self, pod: &PodTarget) -> Result<()> {
        self.retain(|ip| ip != pod.ip)?;
        remove_pin(&self.sk_lookup_pin(pod.ip))
    }

    /// Releases every enrolled pod whose IP `keep` rejects (its enrolment
    /// entries and its sk_lookup link), e.g. pods that went away while the
    /// agent was restarting. Returns their IPs.
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr) -> bool) -> Result<Vec<Ipv4Addr>> {
        let stale: Vec<(u64, Ipv4Addr)> = self
            .enrolled
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(cgroup, pod)| (cgroup, Ipv4Addr::from(pod.pod_ip.to_ne_bytes())))
            .filter(|(_, ip)| !keep(*ip))
            .collect();
        for (cgroup, ip) in &stale {
            match self.enrolled.remove(cgroup) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(CAPTURE_ENROLLED_MAP)(source)),
            }
            remove_pin(&self.sk_lookup_pin(*ip))?;
        }
        Ok(stale.into_iter().map(|(_, ip)| ip).collect())
    }

    /// Makes `sources` the complete set of addresses (the node's health-probe
    /// address, as the kubelet's) whose connections to enrolled pods go
    /// straight to the app.
    pub fn set_probe_sources(&mut self, sources: &[Ipv4Addr]) -> Result<()> {
        let wanted: Vec<u32> = sources
            .iter()
            .map(|ip| u32::from_ne_bytes(ip.octets()))
            .collect();
        let stale: Vec<u32> = self
            .probe_sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            let _ = self.probe_sources.remove(&key);
        }
        for key in wanted {
            self.probe_sources
                .insert(&key, &1, 0)
                .map_err(map_err(CAPTURE_PROBE_SOURCES_MAP))?;
        }
        Ok(())
    }

    /// Registers ztunnel's listener `socket` of `kind` for `pod_ip`, replacing
    /// a previous one. The kernel drops the entry when the socket closes.
    pub fn register_listener(
        &mut self,
        pod_ip: Ipv4Addr,
        kind: ListenerKind,
        socket: &impl AsRawFd,
    ) -> Result<()> {
        let key = ListenerKey {
            pod_ip: u32::from_ne_bytes(pod_ip.octets()),
            kind: kind as u32,
        };
        self.listeners
            .insert(&key, socket.as_raw_fd(), 0)
            .map_err(map_err(CAPTURE_LISTENERS_MAP))
    }

    /// Lets ztunnel's next connection from `source` to `destination` (a pod's
    /// app) through `capture_sk_lookup`: it carries the original client's
    /// address, so without this it would be captured again. Entries age out
    /// of the LRU map; the 4-tuple is unique while the connection lives.
    pub fn allow_delivery(
        &mut self,
        source: SocketAddrV4,
        destination: SocketAddrV4,
    ) -> Result<()> {
        let key = DeliverKey {
            remote_ip4: u32::from_ne_bytes(source.ip().octets()),
            local_ip4: u32::from_ne_bytes(destination.ip().octets()),
            remote_port: source.port().to_be(),
            pad: 0,
            local_port: u32::from(destination.port()),
        };
        self.deliver
            .insert(&key, &1, 0)
            .map_err(map_err(CAPTURE_DELIVER_MAP))
    }

    /// Takes the original destination of a captured connect, identified by
    /// its pod's network namespace cookie and its source port (the peer port
    /// of the connection ztunnel accepted on 15001).
    pub fn take_original_destination(
        &mut self,
        netns_cookie: u64,
        port: u16,
    ) -> Result<Option<SocketAddrV4>> {
        let key = OutboundKey {
            netns_cookie,
            port: u32::from(port),
            pad: 0,
        };
        match self.orig_dst.get(&key, 0) {
            Ok(endpoint) => {
                // Best effort: the map is LRU, a stale entry is evicted anyway.
                let _ = self.orig_dst.remove(&key);
                let addr = Ipv4Addr::from(endpoint.addr.to_ne_bytes());
                Ok(Some(SocketAddrV4::new(addr, u16::from_be(endpoint.port))))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_err(CAPTURE_ORIG_DST_MAP)(source)),
        }
    }

    /// The reader of the programs' aya-log records, which it forwards to the
    /// `log` facade. `None` after the first call.
    pub fn take_logger(&mut self) -> Option<Result<aya_log::EbpfLogger<&'static dyn log::Log>>> {
        self.ebpf.map(AYA_LOGS_MAP)?;
        Some(
            aya_log::EbpfLogger::init(&mut self.ebpf)
                .map_err(|source| Error::Log(source.to_string())),
        )
    }

    /// Reads the counters, summed over CPUs.
    pub fn stats(&self) -> Result<CaptureStats> {
        let read = |counter: CaptureCounter| -> Result<u64> {
            let values = self
                .stats
                .get(&(counter as u32), 0)
                .map_err(map_err(CAPTURE_STATS_MAP))?;
            Ok(values.iter().sum())
        };
        Ok(CaptureStats {
            outbound_captured: read(CaptureCounter::OutboundCaptured)?,
            outbound_bypassed: read(CaptureCounter::OutboundBypassed)?,
            inbound_captured: read(CaptureCounter::InboundCaptured)?,
            inbound_refused: read(CaptureCounter::InboundRefused)?,
            errors: read(CaptureCounter::Errors)?,
            inbound_probe: read(CaptureCounter::InboundProbe)?,
        })
    }

    /// Detaches everything this node's capture attached and removes its
    /// pins: pods' traffic flows directly again.
    pub fn uninstall(pin_dir: &Path) -> Result<()> {
        if pin_dir.exists() {
            fs::remove_dir_all(pin_dir).map_err(|source| Error::Io {
                what: "removing pins",
                path: pin_dir.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    fn sk_lookup_pin(&self, pod_ip: Ipv4Addr) -> PathBuf {
        // bpffs refuses names with dots: 10.244.1.12 -> 10_244_1_12.
        let [a, b, c, d] = pod_ip.octets();
        self.pin_dir
            .join(SK_LOOKUP_DIR)
            .join(format!("{a}_{b}_{c}_{d}"))
    }
}

/// The id of a cgroup v2 directory: its inode number.
pub fn cgroup_id(cgroup: &Path) -> Result<u64> {
    fs::metadata(cgroup)
        .map(|m| m.ino())
        .map_err(|source| Error::Io {
            what: "reading cgroup",
            path: cgroup.to_path_buf(),
            source,
        })
}

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`,
/// Linux 5.14+): with the peer port, the key of a captured connect's
/// original destination.
pub fn netns_cookie(socket: &impl std::os::fd::AsFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
