//! The lab's socket-level service load balancer (its stand-in for kube-proxy).
//!
//! [`LabServiceLb::install`] attaches the `connect4` program at the root of a
//! lab's cgroup tree and pins its link and maps in a bpffs directory; later
//! processes reopen the pinned service map with [`LabServiceLb::open`].

use std::{
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
    programs::CgroupSockAddr,
};
use mesh_ebpf_common::{
    Ipv4Endpoint, LAB_LB_STATS_MAP, LAB_SERVICE_LB_PROG, LAB_SERVICES_MAP, LabLbCounter,
    MAX_BACKENDS, ServiceBackends,
};

use crate::{
    Error, OBJECT, Result,
    object::{attach_cgroup_pinned, map_err, open, prog_err, program},
};

/// File name of the pinned cgroup link inside the pin directory.
const LINK_PIN: &str = "lab_service_lb_link";

/// Handle to the pinned service map of one lab.
pub struct LabServiceLb {
    services: HashMap<MapData, Ipv4Endpoint, ServiceBackends>,
    stats: PerCpuArray<MapData, u64>,
}

/// Counters of the lab load balancer, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabLbStats {
    /// Connects to a VIP that were sent to a backend.
    pub translated: u64,
    /// Connects to a VIP with no backend.
    pub no_backend: u64,
}

impl LabServiceLb {
    /// Loads the program, attaches it to `cgroup` and pins link and maps in `pin_dir`.
    pub fn install(cgroup: &Path, pin_dir: &Path) -> Result<Self> {
        fs::create_dir_all(pin_dir).map_err(|source| Error::Io {
            what: "creating pin directory",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let program: &mut CgroupSockAddr = program(&mut ebpf, LAB_SERVICE_LB_PROG)?;
        program.load().map_err(prog_err(LAB_SERVICE_LB_PROG))?;
        let cgroup_file = open(cgroup, "opening cgroup")?;
        attach_cgroup_pinned!(
            &mut ebpf,
            CgroupSockAddr,
            LAB_SERVICE_LB_PROG,
            &cgroup_file,
            &pin_dir.join(LINK_PIN)
        )?;
        for name in [LAB_SERVICES_MAP, LAB_LB_STATS_MAP] {
            let map = ebpf.map(name).ok_or_else(|| {
                map_err(name)(MapError::InvalidName {
                    name: name.to_owned(),
                })
            })?;
            let path = pin_dir.join(name);
            map.pin(&path).map_err(|source| Error::Pin {
                what: "map",
                path,
                source,
            })?;
        }
        tracing::debug!(cgroup = %cgroup.display(), pins = %pin_dir.display(), "lab service load balancer attached");
        Self::open(pin_dir)
    }

    /// Opens the maps a previous [`install`](Self::install) pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let services = open_pinned(pin_dir, LAB_SERVICES_MAP, HashMap::try_from)?;
        let stats = open_pinned(pin_dir, LAB_LB_STATS_MAP, PerCpuArray::try_from)?;
        Ok(Self { services, stats })
    }

    /// Points `vip` at `backends` (at most [`MAX_BACKENDS`]; extra ones are dropped
    /// with a warning). An empty list keeps the VIP known but unroutable.
    pub fn set_service(&mut self, vip: SocketAddrV4, backends: &[SocketAddrV4]) -> Result<()> {
        if backends.len() > MAX_BACKENDS {
            tracing::warn!(%vip, backends = backends.len(), max = MAX_BACKENDS, "service has more backends than the lab balancer holds; using the first ones");
        }
        let mut value = ServiceBackends::default();
        for (slot, backend) in value.backends.iter_mut().zip(backends) {
            *slot = endpoint(*backend);
        }
        value.count = backends.len().min(MAX_BACKENDS) as u32;
        self.services
            .insert(&endpoint(vip), &value, 0)
            .map_err(|source| Error::Map {
                name: LAB_SERVICES_MAP,
                source,
            })
    }

    /// Forgets `vip`; connects to it are no longer translated.
    pub fn remove_service(&mut self, vip: SocketAddrV4) -> Result<()> {
        self.services
            .remove(&endpoint(vip))
            .map_err(|source| Error::Map {
                name: LAB_SERVICES_MAP,
                source,
            })
    }

    /// Reads the counters, summed over CPUs.
    pub fn stats(&self) -> Result<LabLbStats> {
        let read = |counter: LabLbCounter| -> Result<u64> {
            let per_cpu = self
                .stats
                .get(&(counter as u32), 0)
                .map_err(|source| Error::Map {
                    name: LAB_LB_STATS_MAP,
                    source,
                })?;
            Ok(per_cpu.iter().sum())
        };
        Ok(LabLbStats {
            translated: read(LabLbCounter::Translated)?,
            no_backend: read(LabLbCounter::NoBackend)?,
        })
    }
}

fn endpoint(addr: SocketAddrV4) -> Ipv4Endpoint {
    Ipv4Endpoint::new(addr.ip().octets(), addr.port())
}

fn open_pinned<T>(
    pin_dir: &Path,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T> {
    let path: PathBuf = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    convert(map).map_err(map_err(name))
}
