//! What ztunnel knows of the mesh: workloads and services learned over xDS
//! (Istio's workload API), indexed for the per-connection lookups: by pod IP,
//! by service VIP, and service to endpoints.
//!
//! Updates replace single resources, so a change to one pod costs one index
//! update; a resource that fails to decode is rejected alone (NACK) and its
//! previous version stays.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use mesh_api::{
    type_url,
    workload::{
        Address, Service, TunnelProtocol, Workload, WorkloadStatus, address, gateway_address,
    },
};
use prost::Message;
use serde::Serialize;

/// A workload ztunnel can reach, decoded once.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadInfo {
    /// xDS name (uid).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Its IPs.
    pub ips: Vec<IpAddr>,
    /// Node.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Whether it is reached over HBONE (in the mesh).
    pub hbone: bool,
    /// Whether it is ready.
    pub healthy: bool,
    /// Canonical service name (`app` label), for metrics.
    pub canonical_name: String,
    /// Canonical revision (`version` label), for metrics.
    pub canonical_revision: String,
    /// Deployment name, for metrics.
    pub workload_name: String,
    /// Service key (`namespace/hostname`) to `(service port, target port)`.
    pub services: HashMap<String, Vec<(u16, u16)>>,
    /// Authorization policies selecting it (`namespace/name`).
    pub authorization_policies: Vec<String>,
    /// Its values of Istio's metric labels, shared by every connection's
    /// metrics.
    #[serde(skip)]
    pub labels: Arc<WorkloadLabels>,
}

/// A workload's values of Istio's `source_*` / `destination_*` metric
/// labels, computed once per xDS update so a connection's labels are a few
/// reference counts rather than a dozen strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// Deployment (workload) name.
    pub workload: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// SPIFFE identity.
    pub principal: Arc<str>,
    /// Canonical service (`app` label).
    pub canonical_service: Arc<str>,
    /// Canonical revision (`version` label).
    pub canonical_revision: Arc<str>,
}

/// The label value of anything the mesh does not know.
pub const UNKNOWN: &str = "unknown";

impl WorkloadLabels {
    /// The labels of a peer the mesh does not know: every value `unknown`.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN_LABELS: std::sync::LazyLock<Arc<WorkloadLabels>> =
            std::sync::LazyLock::new(|| {
                let unknown: Arc<str> = Arc::from(UNKNOWN);
                Arc::new(WorkloadLabels {
                    workload: unknown.clone(),
                    namespace: unknown.clone(),
                    principal: unknown.clone(),
                    canonical_service: unknown.clone(),
                    canonical_revision: unknown,
                })
            });
        UNKNOWN_LABELS.clone()
    }

    fn of(workload: &WorkloadInfo) -> Self {
        let value = |v: &str| Arc::from(if v.is_empty() { UNKNOWN } else { v });
        WorkloadLabels {
            workload: value(&workload.workload_name),
            namespace: value(&workload.namespace),
            principal: Arc::from(workload.identity()),
            canonical_service: value(&workload.canonical_name),
            canonical_revision: value(&workload.canonical_revision),
        }
    }
}

impl WorkloadInfo {
    /// Its SPIFFE identity.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A service ztunnel can resolve.
#[derive(Debug, Serialize)]
pub struct ServiceInfo {
    /// `namespace/hostname`.
    pub key: String,
    /// Host name.
    pub hostname: String,
    /// VIPs.
    pub vips: Vec<IpAddr>,
    /// `(service port, target port)`; target 0 means per workload.
    pub ports: Vec<(u16, u16)>,
    /// The waypoint its traffic goes through, if bound to one.
    pub waypoint: Option<WaypointAddr>,
    #[serde(skip)]
    next: AtomicUsize,
}

/// Where a service's waypoint is reached.
#[derive(Clone, Debug, Serialize)]
pub struct WaypointAddr {
    /// The waypoint's service key (`namespace/hostname`), or its address.
    pub destination: WaypointDestination,
    /// Its HBONE port.
    pub hbone_port: u16,
}

/// The two ways the workload API names a waypoint.
#[derive(Clone, Debug, Serialize)]
pub enum WaypointDestination {
    /// A service (`namespace/hostname`) whose endpoints are the waypoint's.
    Service(String),
    /// An address: a service VIP or a workload IP.
    Address(IpAddr),
}

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub enum Resolved {
    /// A mesh workload (picked from a service, or dialled by pod IP).
    Workload {
        /// The workload.
        workload: Arc<WorkloadInfo>,
        /// Its address and target port.
        addr: SocketAddr,
        /// The service it was picked from, if any (its hostname).
        service: Option<String>,
    },
    /// A service bound to a waypoint: the tunnel goes to the waypoint, with
    /// the service's address as its target.
    Waypoint {
        /// A waypoint instance.
        workload: Arc<WorkloadInfo>,
        /// Its HBONE address.
        addr: SocketAddr,
        /// The service's hostname.
        service: String,
    },
    /// A service with no healthy endpoint on that port.
    NoHealthyEndpoint {
        /// The service's hostname.
        service: String,
    },
    /// Something the mesh does not know: passed through as dialled.
    Passthrough,
}

/// The index.
#[derive(Debug, Default)]
pub struct Discovery {
    inner: RwLock<Index>,
}

/// A workload serving a service, with its ports for that service.
#[derive(Debug)]
struct Endpoint {
    workload: Arc<WorkloadInfo>,
    ports: Vec<(u16, u16)>,
}

#[derive(Debug, Default)]
struct Index {
    workloads: HashMap<String, Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, String>,
    services: HashMap<String, Arc<ServiceInfo>>,
    by_vip: HashMap<IpAddr, String>,
    /// Service key to the workloads that serve it, by uid (ordered, so
    /// round robin is stable), each with its ports for that service, so
    /// picking an endpoint needs no further lookup.
    endpoints: HashMap<String, BTreeMap<String, Endpoint>>,
}

impl Discovery {
    /// Resolves the destination of an outbound connection.
    pub fn resolve(&self, destination: SocketAddr) -> Resolved {
        let index = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let ip = destination.ip();
        if let Some(service) = index.by_vip.get(&ip).and_then(|k| index.services.get(k)) {
            if let Some(waypoint) = &service.waypoint {
                return index.pick_waypoint(service, waypoint);
            }
            return index.pick_endpoint(service, destination.port());
        }
        if let Some(workload) = index
            .by_ip
            .get(&ip)
            .and_then(|uid| index.workloads.get(uid))
        {
            return Resolved::Workload {
                workload: workload.clone(),
                addr: destination,
                service: None,
            };
        }
        Resolved::Passthrough
    }

    /// The workload with address `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<WorkloadInfo>> {
        let index = self.inner.read().unwrap_or_else(|e| e.into_inner());
        index
            .by_ip
            .get(&ip)
            .and_then(|uid| index.workloads.get(uid))
            .cloned()
    }

    /// Counts, for logs and readiness.
    pub fn counts(&self) -> (usize, usize) {
        let index = self.inner.read().unwrap_or_else(|e| e.into_inner());
        (index.workloads.len(), index.services.len())
    }

    /// Everything held, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let index = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut workloads: Vec<_> = index.workloads.values().cloned().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<_> = index.services.values().cloned().collect();
        services.sort_by(|a, b| a.key.cmp(&b.key));
        serde_json::json!({ "workloads": workloads, "services": services })
    }

    /// Applies one xDS update of the address type.
    pub fn apply(&self, update: mesh_xds::Update) -> Result<(), mesh_xds::Rejected> {
        if update.type_url != type_url::ADDRESS {
            return Err(mesh_xds::Rejected(vec![(
                update.type_url.clone(),
                "type not handled by the workload store".to_owned(),
            )]));
        }
        let mut rejected = Vec::new();
        let mut index = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for name in &update.removed {
            index.remove(name);
        }
        for resource in update.resources {
            match decode(&resource.value) {
                Ok(Decoded::Workload(workload)) => index.insert_workload(&resource.name, *workload),
                Ok(Decoded::Service(service)) => index.insert_service(&resource.name, service),
                Err(reason) => rejected.push((resource.name, reason)),
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(mesh_xds::Rejected(rejected))
        }
    }
}

enum Decoded {
    Workload(Box<WorkloadInfo>),
    Service(ServiceInfo),
}

fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let address =
        Address::decode(bytes).map_err(|e| format!("not an istio.workload.Address: {e}"))?;
    match address.r#type {
        Some(address::Type::Workload(w)) => {
            workload_info(w).map(|w| Decoded::Workload(Box::new(w)))
        }
        Some(address::Type::Service(s)) => service_info(s).map(Decoded::Service),
        None => Err("Address has neither workload nor service".to_owned()),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let octets: [u8; 16] = bytes.try_into().map_err(|_| "bad IPv6".to_owned())?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        n => Err(format!("address of {n} bytes is neither IPv4 nor IPv6")),
    }
}

fn port(value: u32, what: &str) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("{what} {value} is not a port"))
}

fn workload_info(w: Workload) -> Result<WorkloadInfo, String> {
    let ips = w
        .addresses
        .iter()
        .map(|a| ip_from_bytes(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut services = HashMap::new();
    for (key, list) in w.services {
        let ports = list
            .ports
            .iter()
            .map(|p| {
                Ok((
                    port(p.service_port, "service port")?,
                    port(p.target_port, "target port")?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        services.insert(key, ports);
    }
    let mut info = WorkloadInfo {
        hbone: w.tunnel_protocol == TunnelProtocol::Hbone as i32,
        healthy: w.status == WorkloadStatus::Healthy as i32,
        trust_domain: if w.trust_domain.is_empty() {
            "cluster.local".to_owned()
        } else {
            w.trust_domain
        },
        service_account: if w.service_account.is_empty() {
            "default".to_owned()
        } else {
            w.service_account
        },
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        ips,
        node: w.node,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        authorization_policies: w.authorization_policies,
        services,
        labels: WorkloadLabels::unknown(),
    };
    info.labels = Arc::new(WorkloadLabels::of(&info));
    Ok(info)
}

fn service_info(s: Service) -> Result<ServiceInfo, String> {
    let vips = s
        .addresses
        .iter()
        .map(|a| ip_from_bytes(&a.address))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok((
                port(p.service_port, "service port")?,
                port(p.target_port, "target port")?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let waypoint = match s.waypoint {
        None => None,
        Some(gateway) => {
            let destination = match gateway.destination {
                Some(gateway_address::Destination::Hostname(h)) => {
                    WaypointDestination::Service(format!("{}/{}", h.namespace, h.hostname))
                }
                Some(gateway_address::Destination::Address(a)) => {
                    WaypointDestination::Address(ip_from_bytes(&a.address)?)
                }
                None => return Err("waypoint has no destination".to_owned()),
            };
            Some(WaypointAddr {
                destination,
                hbone_port: port(gateway.hbone_mtls_port, "waypoint HBONE port")?,
            })
        }
    };
    Ok(ServiceInfo {
        waypoint,
        key: format!("{}/{}", s.namespace, s.hostname),
        hostname: s.hostname,
        vips,
        ports,
        next: AtomicUsize::new(0),
    })
}

impl Index {
    fn remove(&mut self, name: &str) {
        if let Some(old) = self.workloads.remove(name) {
            for ip in &old.ips {
                if self.by_ip.get(ip).is_some_and(|uid| uid == name) {
                    self.by_ip.remove(ip);
                }
            }
            for key in old.services.keys() {
                if let Some(set) = self.endpoints.get_mut(key) {
                    set.remove(name);
                }
            }
        }
        if let Some(old) = self.services.remove(name) {
            for vip in &old.vips {
                if self.by_vip.get(vip).is_some_and(|key| key == name) {
                    self.by_vip.remove(vip);
                }
            }
        }
    }

    fn insert_workload(&mut self, name: &str, workload: WorkloadInfo) {
        self.remove(name);
        for ip in &workload.ips {
            self.by_ip.insert(*ip, name.to_owned());
        }
        let workload = Arc::new(workload);
        for (key, ports) in &workload.services {
            self.endpoints.entry(key.clone()).or_default().insert(
                name.to_owned(),
                Endpoint {
                    workload: workload.clone(),
                    ports: ports.clone(),
                },
            );
        }
        self.workloads.insert(name.to_owned(), workload);
    }

    fn insert_service(&mut self, name: &str, service: ServiceInfo) {
        self.remove(name);
        for vip in &service.vips {
            self.by_vip.insert(*vip, name.to_owned());
        }
        self.services.insert(name.to_owned(), Arc::new(service));
    }

    /// A waypoint instance for traffic to `service`.
    fn pick_waypoint(&self, service: &ServiceInfo, waypoint: &WaypointAddr) -> Resolved {
        let via_service = |key: &str| {
            let waypoint_service = self.services.get(key)?;
            match self.pick_endpoint(waypoint_service, waypoint.hbone_port) {
                Resolved::Workload { workload, addr, .. } => Some((workload, addr)),
                _ => None,
            }
        };
        let picked = match &waypoint.destination {
            WaypointDestination::Service(key) => via_service(key),
            WaypointDestination::Address(ip) => match self.by_vip.get(ip) {
                Some(key) => via_service(key),
                None => self
                    .by_ip
                    .get(ip)
                    .and_then(|uid| self.workloads.get(uid))
                    .map(|w| (w.clone(), SocketAddr::new(*ip, waypoint.hbone_port))),
            },
        };
        match picked {
            Some((workload, addr)) => Resolved::Waypoint {
                workload,
                addr,
                service: service.hostname.clone(),
            },
            None => Resolved::NoHealthyEndpoint {
                service: service.hostname.clone(),
            },
        }
    }

    /// Round robin over the healthy endpoints serving `port` of `service`.
    fn pick_endpoint(&self, service: &ServiceInfo, port: u16) -> Resolved {
        let no_endpoint = || Resolved::NoHealthyEndpoint {
            service: service.hostname.clone(),
        };
        let Some(&(_, service_target)) = service.ports.iter().find(|(p, _)| *p == port) else {
            return no_endpoint();
        };
        let Some(endpoints) = self.endpoints.get(&service.key) else {
            return no_endpoint();
        };
        // Two passes over the set instead of collecting the candidates: no
        // allocation on the connection path.
        let usable = |e: &Endpoint| -> Option<u16> {
            if !e.workload.healthy || e.workload.ips.is_empty() {
                return None;
            }
            let (_, target) = e.ports.iter().find(|(p, _)| *p == port)?;
            [*target, service_target, port]
                .into_iter()
                .find(|t| *t != 0)
        };
        let count = endpoints.values().filter(|e| usable(e).is_some()).count();
        if count == 0 {
            return no_endpoint();
        }
        let nth = service.next.fetch_add(1, Ordering::Relaxed) % count;
        let Some((workload, target)) = endpoints
            .values()
            .filter_map(|e| Some((&e.workload, usable(e)?)))
            .nth(nth)
        else {
            return no_endpoint();
        };
        Resolved::Workload {
            workload: workload.clone(),
            addr: SocketAddr::new(workload.ips[0], target),
            service: Some(service.hostname.clone()),
        }
    }
}

/// Feeds xDS updates into the shared [`Discovery`] and [`PolicyStore`].
pub struct XdsHandler {
    /// Where workloads and services go.
    pub discovery: Arc<Discovery>,
    /// Where authorization policies go.
    pub policy: Arc<crate::policy::PolicyStore>,
    /// Set once the first full config arrived (readiness).
    pub synced: Arc<std::sync::atomic::AtomicBool>,
}

impl mesh_xds::Handler for XdsHandler {
    fn apply(&mut self, update: mesh_xds::Update) -> Result<(), mesh_xds::Rejected> {
        if update.type_url == type_url::AUTHORIZATION {
            return self.policy.apply(update);
        }
        let outcome = self.discovery.apply(update);
        let (workloads, services) = self.discovery.counts();
        tracing::debug!(workloads, services, "workload store updated");
        outcome
    }

    fn synced(&mut self) {
        self.synced.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::workload::{NetworkAddress, Port, PortList};

    use super::*;

    fn workload(name: &str, ip: [u8; 4], healthy: bool) -> mesh_xds::Resource {
        let w = Workload {
            uid: format!("Kubernetes//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            service_account: "web".into(),
            status: if healthy { 0 } else { 1 },
            services: [(
                "shop/web.shop.svc.cluster.local".to_owned(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        };
        resource(&w.uid.clone(), address::Type::Workload(w))
    }

    fn resource(name: &str, t: address::Type) -> mesh_xds::Resource {
        mesh_xds::Resource {
            name: name.into(),
            value: Address { r#type: Some(t) }.encode_to_vec().into(),
        }
    }

    fn service() -> mesh_xds::Resource {
        let s = Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 20],
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            }],
            ..Default::default()
        };
        resource("shop/web.shop.svc.cluster.local", address::Type::Service(s))
    }

    fn update(resources: Vec<mesh_xds::Resource>, removed: Vec<String>) -> mesh_xds::Update {
        mesh_xds::Update {
            type_url: type_url::ADDRESS.into(),
            resources,
            removed,
        }
    }

    #[test]
    fn vip_round_robins_over_healthy_endpoints_with_their_target_port() {
        let d = Discovery::default();
        d.apply(update(
            vec![
                service(),
                workload("a", [10, 244, 0, 10], true),
                workload("b", [10, 244, 1, 10], true),
                workload("c", [10, 244, 1, 11], false),
            ],
            vec![],
        ))
        .unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match d.resolve("10.96.0.20:80".parse().unwrap()) {
                Resolved::Workload { addr, service, .. } => {
                    assert_eq!(service.as_deref(), Some("web.shop.svc.cluster.local"));
                    seen.push(addr.to_string());
                }
                other => panic!("{other:?}"),
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "10.244.0.10:8080",
                "10.244.0.10:8080",
                "10.244.1.10:8080",
                "10.244.1.10:8080"
            ]
        );
        assert!(matches!(
            d.resolve("10.96.0.20:81".parse().unwrap()),
            Resolved::NoHealthyEndpoint { .. }
        ));
        assert!(matches!(
            d.resolve("10.244.1.11:9".parse().unwrap()),
            Resolved::Workload { .. }
        ));
        assert!(matches!(
            d.resolve("8.8.8.8:53".parse().unwrap()),
            Resolved::Passthrough
        ));
    }

    #[test]
    fn removal_and_bad_resources() {
        let d = Discovery::default();
        d.apply(update(
            vec![service(), workload("a", [10, 244, 0, 10], true)],
            vec![],
        ))
        .unwrap();
        let bad = mesh_xds::Resource {
            name: "junk".into(),
            value: vec![0xff, 0xff].into(),
        };
        let rejected = d.apply(update(vec![bad], vec![])).unwrap_err();
        assert_eq!(rejected.0[0].0, "junk");
        assert!(matches!(
            d.resolve("10.96.0.20:80".parse().unwrap()),
            Resolved::Workload { .. }
        ));
        d.apply(update(vec![], vec!["Kubernetes//Pod/shop/a".into()]))
            .unwrap();
        assert!(matches!(
            d.resolve("10.96.0.20:80".parse().unwrap()),
            Resolved::NoHealthyEndpoint { .. }
        ));
        assert!(d.workload_by_ip("10.244.0.10".parse().unwrap()).is_none());
    }
}
