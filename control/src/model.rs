//! The cluster as the control plane sees it, and its translation into Istio's
//! workload API (`istio.workload.Address`) for ztunnels.
//!
//! Input is the typed [`Manifests`] of a config source: namespaces (labels
//! decide enrolment), pods (with `status.podIP` and `spec.nodeName`, as the
//! API server reports them), services (with their `clusterIP`) and service
//! accounts, and the EndpointSlices of Services without a selector
//! ([`slices`]). Pure computation: no I/O.

mod slices;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};
use mesh_api::workload::{
    self as wl, Address, NetworkAddress, PortList, TunnelProtocol, WorkloadStatus, WorkloadType,
    address,
};
use mesh_api::{security::Authorization, type_url};
use mesh_config::{Manifests, Pod, node::is_enrolled};

use crate::{
    authz::Policies,
    rbac::WaypointPolicies,
    waypoint::{self, EndpointRef, EnvoyResources, ServiceRef},
    xds::{Snapshot, SnapshotBuilder},
};

/// Cluster id stamped into workload uids, as Istio's default single cluster.
pub const CLUSTER_ID: &str = "Kubernetes";

/// Settings that shape the translation.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// DNS suffix of Service host names, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Namespace whose selector-less policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// A pod the mesh knows: where it runs and who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Node it is scheduled on.
    pub node: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Service account.
    pub service_account: String,
    /// Whether it is in the mesh (namespace and pod labels).
    pub enrolled: bool,
}

/// Everything computed from one version of the config.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Pods with an IP, by `namespace/name`.
    pub pods: BTreeMap<String, PodInfo>,
    /// Workload API resources by xDS resource name (workload uid, or
    /// `namespace/hostname` for services).
    pub addresses: BTreeMap<String, Address>,
    /// L4 policies (`istio.security.Authorization`) by `namespace/name`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// Envoy resources of the waypoints.
    pub envoy: EnvoyResources,
    /// What the translation could not honour (e.g. L7 rules at L4).
    pub warnings: Vec<String>,
    /// What each Gateway API route's parents got (written to the routes'
    /// `status` on Kubernetes, [`crate::route_status`]).
    pub route_statuses: Vec<crate::route_status::RouteStatus>,
}

impl Model {
    /// Encodes every resource into the xDS snapshot of config `version`,
    /// reusing `previous`'s encoding of whatever did not change.
    pub fn encode(&self, previous: &Snapshot, version: u64) -> Snapshot {
        let mut snapshot = SnapshotBuilder::new(previous);
        for (name, address) in &self.addresses {
            snapshot.insert(type_url::ADDRESS, name, address);
        }
        for (name, policy) in &self.authorizations {
            snapshot.insert(type_url::AUTHORIZATION, name, policy);
        }
        let envoy = &self.envoy;
        for (name, (scope, listener)) in &envoy.listeners {
            snapshot.insert_with(type_url::LISTENER, name, listener, Some(scope), None);
        }
        for (name, (scope, routes)) in &envoy.routes {
            snapshot.insert_with(type_url::ROUTE, name, routes, Some(scope), None);
        }
        for (name, cluster) in &envoy.clusters {
            snapshot.insert(type_url::CLUSTER, name, cluster);
        }
        for (name, (hash, endpoints)) in &envoy.endpoints {
            snapshot.insert_with(type_url::ENDPOINT, name, endpoints, None, Some(*hash));
        }
        snapshot.build(version)
    }

    /// Translates `manifests`.
    pub fn build(manifests: &Manifests, settings: &MeshSettings) -> Model {
        // Gateway API HTTPRoutes (and GRPCRoutes, as HTTPRoutes) are routed
        // as the VirtualServices they are equivalent to, and Gateway API
        // ingress Gateways as the Istio Gateways they stand for (a copy only
        // when there are any).
        let mut route_warnings = Vec::new();
        let mut route_statuses = Vec::new();
        let with_routes;
        let untouched = manifests.http_routes.is_empty()
            && manifests.grpc_routes.is_empty()
            && manifests.tcp_routes.is_empty()
            && manifests.tls_routes.is_empty()
            && !manifests
                .kube_gateways
                .iter()
                .any(crate::kube_gateway::is_ingress);
        let manifests = if untouched {
            manifests
        } else {
            let mut copy = manifests.clone();
            copy.http_routes
                .extend(crate::grpc_route::http_routes(manifests));
            let routes = crate::http_route::virtual_services(
                &copy,
                &mut route_warnings,
                &mut route_statuses,
            );
            copy.virtual_services.extend(routes);
            copy.virtual_services
                .extend(crate::l4_route::virtual_services(
                    manifests,
                    &mut route_warnings,
                    &mut route_statuses,
                ));
            copy.istio_gateways
                .extend(crate::kube_gateway::istio_gateways(
                    manifests,
                    &mut route_warnings,
                ));
            with_routes = copy;
            &with_routes
        };
        let namespace_labels: HashMap<&str, BTreeMap<String, String>> = manifests
            .namespaces
            .iter()
            .filter_map(|ns| {
                Some((
                    ns.metadata.name.as_deref()?,
                    ns.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let no_labels = BTreeMap::new();

        let mut model = Model {
            warnings: route_warnings,
            route_statuses,
            ..Model::default()
        };
        let services: Vec<ServiceView<'_>> = manifests
            .services
            .iter()
            .filter_map(|svc| ServiceView::new(svc, settings))
            .collect();
        let selectors = SelectorIndex::new(&services);
        let mut policies =
            Policies::build(manifests, &settings.root_namespace, &mut model.warnings);
        let service_refs: Vec<ServiceRef> = services.iter().map(ServiceView::to_ref).collect();
        let waypoints = waypoint::waypoints(manifests, &service_refs);
        let mut bound = BTreeMap::new();
        for svc in &service_refs {
            let ns_labels = namespace_labels
                .get(svc.namespace.as_str())
                .unwrap_or(&no_labels);
            let Some(key) = waypoint::binding(svc, ns_labels) else {
                continue;
            };
            if waypoints
                .get(&key)
                .is_some_and(|w| w.hostname == svc.hostname)
            {
                continue; // a waypoint does not route through itself
            }
            match waypoints.get(&key) {
                Some(_) => {
                    bound.insert(format!("{}/{}", svc.namespace, svc.hostname), key);
                }
                None => model.warnings.push(format!(
                    "Service {}/{} uses waypoint {key}, which does not exist (no Gateway of class {} with a Service); its traffic bypasses L7 processing",
                    svc.namespace, svc.name, waypoint::WAYPOINT_CLASS
                )),
            }
        }
        let mut endpoints: HashMap<String, Vec<EndpointRef>> = HashMap::new();
        let mut slice_endpoints = if manifests.endpoint_slices.is_empty() {
            slices::SliceEndpoints::default()
        } else {
            let pods: HashSet<String> = manifests
                .pods
                .iter()
                .filter_map(|p| {
                    Some(format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref()?,
                        p.metadata.name.as_deref()?
                    ))
                })
                .collect();
            slices::SliceEndpoints::new(&manifests.endpoint_slices, &services, &pods, settings)
        };
        model.warnings.append(&mut slice_endpoints.warnings);
        let service_accounts: HashSet<(&str, &str)> = manifests
            .service_accounts
            .iter()
            .filter_map(|sa| {
                Some((
                    sa.metadata.namespace.as_deref()?,
                    sa.metadata.name.as_deref()?,
                ))
            })
            .collect();
        let mut missing_accounts: BTreeSet<(String, String)> = BTreeSet::new();

        for pod in &manifests.pods {
            let Some(info) = pod_info(pod, |ns| namespace_labels.get(ns).unwrap_or(&no_labels))
            else {
                continue;
            };
            // Every namespace has `default`; any other must be declared.
            if info.enrolled
                && info.service_account != "default"
                && !service_accounts.contains(&(&*info.namespace, &*info.service_account))
            {
                missing_accounts.insert((info.namespace.clone(), info.service_account.clone()));
            }
            let mut workload = workload(pod, &info, &selectors, settings);
            if let Some(extra) = slice_endpoints
                .by_pod
                .remove(&format!("{}/{}", info.namespace, info.name))
            {
                for (key, ports) in extra {
                    workload.services.entry(key).or_insert(ports);
                }
            }
            let labels = &pod.metadata.labels;
            if info.enrolled {
                workload.authorization_policies = policies.for_workload(&info.namespace, labels);
            }
            for (key, ports) in &workload.services {
                endpoints.entry(key.clone()).or_default().push(EndpointRef {
                    uid: workload.uid.clone(),
                    ip: info.ip,
                    ports: ports
                        .ports
                        .iter()
                        .map(|p| (p.service_port, p.target_port))
                        .collect(),
                    labels: labels.clone(),
                    identity: info.enrolled.then(|| {
                        format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            settings.trust_domain, info.namespace, info.service_account
                        )
                    }),
                    healthy: workload.status == WorkloadStatus::Healthy as i32,
                });
            }
            let uid = workload.uid.clone();
            model.addresses.insert(
                uid,
                Address {
                    r#type: Some(address::Type::Workload(workload)),
                },
            );
            model
                .pods
                .insert(format!("{}/{}", info.namespace, info.name), info);
        }
        for (namespace, account) in missing_accounts {
            model.warnings.push(format!(
                "ServiceAccount {namespace}/{account} does not exist, yet pods in the mesh run as it (spec.serviceAccountName); their identity spiffe://{}/ns/{namespace}/sa/{account} has no account behind it",
                settings.trust_domain
            ));
        }
        for workload in slice_endpoints.external {
            for (key, ports) in &workload.services {
                endpoints.entry(key.clone()).or_default().push(EndpointRef {
                    uid: workload.uid.clone(),
                    ip: ip_from_bytes(&workload.addresses[0]),
                    ports: ports
                        .ports
                        .iter()
                        .map(|p| (p.service_port, p.target_port))
                        .collect(),
                    labels: BTreeMap::new(),
                    identity: None,
                    healthy: workload.status == WorkloadStatus::Healthy as i32,
                });
            }
            model.addresses.insert(
                workload.uid.clone(),
                Address {
                    r#type: Some(address::Type::Workload(workload)),
                },
            );
        }
        for svc in &services {
            let key = format!("{}/{}", svc.namespace, svc.hostname);
            let mut proto = svc.to_proto();
            if let Some(waypoint) = bound.get(&key).and_then(|k| waypoints.get(k)) {
                proto.waypoint = Some(wl::GatewayAddress {
                    destination: Some(wl::gateway_address::Destination::Hostname(
                        wl::NamespacedHostname {
                            namespace: waypoint.namespace.clone(),
                            hostname: waypoint.hostname.clone(),
                        },
                    )),
                    hbone_mtls_port: waypoint::WAYPOINT_HBONE_PORT,
                });
            }
            model.addresses.insert(
                key,
                Address {
                    r#type: Some(address::Type::Service(proto)),
                },
            );
        }
        let waypoint_policies =
            WaypointPolicies::new(manifests, &settings.root_namespace, &mut model.warnings);
        model.envoy = waypoint::build(
            manifests,
            &service_refs,
            &waypoints,
            &bound,
            &endpoints,
            &waypoint_policies,
            &mut model.warnings,
        );
        crate::ingress::build(
            manifests,
            &service_refs,
            &mut model.envoy.listeners,
            &mut model.envoy.routes,
            &mut model.warnings,
        );
        model.authorizations = policies.authorizations;
        model
    }

    /// Whether a pod of node `node` runs as `namespace`/`service_account`:
    /// what a node may ask the CA to sign.
    pub fn node_runs_identity(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.pods.values().any(|pod| {
            pod.node == node && pod.namespace == namespace && pod.service_account == service_account
        })
    }
}

/// Reads what the mesh needs of a pod; `None` until it has an IP and a node.
fn pod_info<'a>(
    pod: &Pod,
    namespace_labels: impl Fn(&str) -> &'a BTreeMap<String, String>,
) -> Option<PodInfo> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let node = spec.node_name.clone()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodInfo {
        enrolled: is_enrolled(namespace_labels(&namespace), &pod.metadata.labels)
            && !spec.host_network.unwrap_or(false),
        namespace,
        name,
        node,
        ip,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
    })
}

fn workload(
    pod: &Pod,
    info: &PodInfo,
    services: &SelectorIndex<'_, '_>,
    settings: &MeshSettings,
) -> wl::Workload {
    let labels = &pod.metadata.labels;
    let ready = pod.status.as_ref().is_some_and(|s| s.ready);
    let canonical_name = labels
        .get("service.istio.io/canonical-name")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .or_else(|| labels.get("app"))
        .cloned()
        .unwrap_or_else(|| workload_name(pod));
    let canonical_revision = labels
        .get("service.istio.io/canonical-revision")
        .or_else(|| labels.get("app.kubernetes.io/version"))
        .or_else(|| labels.get("version"))
        .cloned()
        .unwrap_or_else(|| "latest".to_owned());

    let mut service_ports = HashMap::new();
    for svc in services.selecting(&info.namespace, labels) {
        let ports = svc
            .ports
            .iter()
            .filter_map(|port| {
                Some(wl::Port {
                    service_port: port.port,
                    target_port: resolve_target_port(pod, port.target.as_ref(), port.port)?,
                    app_protocol: port.app_protocol as i32,
                })
            })
            .collect();
        service_ports.insert(
            format!("{}/{}", svc.namespace, svc.hostname),
            PortList { ports },
        );
    }

    wl::Workload {
        uid: format!("{CLUSTER_ID}//Pod/{}/{}", info.namespace, info.name),
        name: info.name.clone(),
        namespace: info.namespace.clone(),
        addresses: vec![ip_bytes(info.ip)],
        tunnel_protocol: if info.enrolled {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        trust_domain: settings.trust_domain.clone(),
        service_account: info.service_account.clone(),
        node: info.node.clone(),
        canonical_name,
        canonical_revision,
        workload_type: WorkloadType::Pod as i32,
        workload_name: workload_name(pod),
        services: service_ports,
        status: if ready {
            WorkloadStatus::Healthy
        } else {
            WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: CLUSTER_ID.to_owned(),
        ..Default::default()
    }
}

/// The owning Deployment's name when the pod says (owner reference to a
/// ReplicaSet `<deployment>-<hash>` or to a Deployment), else the pod's name.
fn workload_name(pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    match owner.kind.as_str() {
        "ReplicaSet" => owner
            .name
            .rsplit_once('-')
            .map_or(owner.name.clone(), |(deployment, _)| deployment.to_owned()),
        _ => owner.name.clone(),
    }
}

/// A Service's numeric target port for `pod`: a number as is, a name looked
/// up among the pod's container ports, none given → the service port.
fn resolve_target_port(pod: &Pod, target: Option<&IntOrString>, service_port: u32) -> Option<u32> {
    match target {
        None => Some(service_port),
        Some(IntOrString::Int(port)) => u32::try_from(*port).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u32::try_from(p.container_port).ok()),
    }
}

/// The inverse of [`ip_bytes`] (4 or 16 bytes).
fn ip_from_bytes(bytes: &[u8]) -> IpAddr {
    match <[u8; 16]>::try_from(bytes) {
        Ok(v6) => IpAddr::from(v6),
        Err(_) => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Services by namespace and by one of their selector's labels, so finding
/// the services of a pod costs a few lookups instead of a scan of them all.
struct SelectorIndex<'s, 'a> {
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'s ServiceView<'a>>>,
}

impl<'s, 'a> SelectorIndex<'s, 'a> {
    fn new(services: &'s [ServiceView<'a>]) -> Self {
        let mut by_label: HashMap<_, Vec<_>> = HashMap::new();
        for svc in services {
            // Any one pair will do: every selecting service has all of them.
            if let Some((key, value)) = svc.selector.and_then(|s| s.iter().next()) {
                by_label
                    .entry((svc.namespace, key.as_str(), value.as_str()))
                    .or_default()
                    .push(svc);
            }
        }
        Self { by_label }
    }

    /// The services in `namespace` whose selector matches `labels`.
    fn selecting<'q>(
        &'q self,
        namespace: &'q str,
        labels: &'q BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'s ServiceView<'a>> + 'q {
        labels
            .iter()
            .filter_map(move |(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
            .flatten()
            .copied()
            .filter(move |svc| svc.selects(labels))
    }
}

/// The parts of a Service the translation uses.
struct ServiceView<'a> {
    labels: Option<&'a BTreeMap<String, String>>,
    name: &'a str,
    namespace: &'a str,
    hostname: String,
    vips: Vec<IpAddr>,
    selector: Option<&'a BTreeMap<String, String>>,
    ports: Vec<ServicePortView>,
}

struct ServicePortView {
    /// Port name, `""` when unnamed (as EndpointSlice ports name it).
    name: String,
    port: u32,
    target: Option<IntOrString>,
    app_protocol: wl::AppProtocol,
}

impl<'a> ServiceView<'a> {
    fn new(svc: &'a Service, settings: &MeshSettings) -> Option<Self> {
        let name = svc.metadata.name.as_deref()?;
        let namespace = svc.metadata.namespace.as_deref()?;
        let spec = svc.spec.as_ref()?;
        let vips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut acc: Vec<IpAddr>, ip| {
                if !acc.contains(&ip) {
                    acc.push(ip);
                }
                acc
            });
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some(ServicePortView {
                    name: p.name.clone().unwrap_or_default(),
                    port: u32::try_from(p.port).ok()?,
                    target: p.target_port.clone(),
                    app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
                })
            })
            .collect();
        Some(Self {
            labels: svc.metadata.labels.as_ref(),
            name,
            namespace,
            hostname: format!("{name}.{namespace}.svc.{}", settings.cluster_domain),
            vips,
            selector: spec.selector.as_ref().filter(|s| !s.is_empty()),
            ports,
        })
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .is_some_and(|selector| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    fn to_ref(&self) -> ServiceRef {
        ServiceRef {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
            hostname: self.hostname.clone(),
            vips: self.vips.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| {
                    let protocol = match p.app_protocol {
                        wl::AppProtocol::Http11 => waypoint::Protocol::Http1,
                        wl::AppProtocol::Http2 | wl::AppProtocol::Grpc => waypoint::Protocol::Http2,
                        _ => waypoint::Protocol::Tcp,
                    };
                    (p.port, protocol)
                })
                .collect(),
            labels: self.labels.cloned().unwrap_or_default(),
        }
    }

    fn to_proto(&self) -> wl::Service {
        wl::Service {
            name: self.name.to_owned(),
            namespace: self.namespace.to_owned(),
            hostname: self.hostname.clone(),
            addresses: self
                .vips
                .iter()
                .map(|ip| NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(*ip),
                    length: None,
                })
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|port| wl::Port {
                    service_port: port.port,
                    target_port: match port.target {
                        Some(IntOrString::Int(n)) => u32::try_from(n).unwrap_or(0),
                        None => port.port,
                        // Named: each workload says which number it is.
                        Some(IntOrString::String(_)) => 0,
                    },
                    app_protocol: port.app_protocol as i32,
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// Istio's protocol selection: `appProtocol`, then the port name's prefix.
fn app_protocol(app_protocol: Option<&str>, port_name: Option<&str>) -> wl::AppProtocol {
    let hint = app_protocol
        .or_else(|| port_name.map(|n| n.split('-').next().unwrap_or(n)))
        .unwrap_or("")
        .to_ascii_lowercase();
    match hint.as_str() {
        "http" | "http1" => wl::AppProtocol::Http11,
        "http2" | "h2c" | "kubernetes.io/h2c" => wl::AppProtocol::Http2,
        "grpc" | "grpc-web" => wl::AppProtocol::Grpc,
        "tcp" => wl::AppProtocol::Tcp,
        "tls" | "https" => wl::AppProtocol::Tls,
        _ => wl::AppProtocol::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: web}]
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v2-0
  namespace: shop
  labels: {app: reviews, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v2-5d8f, uid: x, controller: true}]
spec:
  nodeName: node1
  serviceAccountName: bookinfo-reviews
  containers: [{name: app, ports: [{name: web, containerPort: 9081}]}]
status:
  podIP: 10.244.1.10
  phase: Running
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain}
spec: {nodeName: node0, containers: [{name: app}]}
status: {podIP: 10.244.0.10}
"#;

    fn model() -> Model {
        let loaded = mesh_config::load_str("cluster.yaml", CLUSTER);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        Model::build(&loaded.manifests, &MeshSettings::default())
    }

    fn workload<'a>(model: &'a Model, uid: &str) -> &'a wl::Workload {
        match &model.addresses[uid].r#type {
            Some(address::Type::Workload(w)) => w,
            other => panic!("{uid}: {other:?}"),
        }
    }

    #[test]
    fn enrolled_pod_becomes_an_hbone_workload_with_its_service_ports() {
        let model = model();
        let w = workload(&model, "Kubernetes//Pod/shop/reviews-v2-0");
        assert_eq!(w.addresses, vec![vec![10, 244, 1, 10]]);
        assert_eq!(w.tunnel_protocol, TunnelProtocol::Hbone as i32);
        assert_eq!(w.service_account, "bookinfo-reviews");
        assert_eq!(w.node, "node1");
        assert_eq!(w.workload_name, "reviews-v2");
        assert_eq!(
            (w.canonical_name.as_str(), w.canonical_revision.as_str()),
            ("reviews", "v2")
        );
        assert_eq!(w.status, WorkloadStatus::Healthy as i32);
        let ports = &w.services["shop/reviews.shop.svc.cluster.local"].ports;
        assert_eq!((ports[0].service_port, ports[0].target_port), (9080, 9081));
        assert_eq!(ports[0].app_protocol, wl::AppProtocol::Http11 as i32);
    }

    #[test]
    fn pods_without_ip_are_skipped_and_unlabelled_namespaces_are_plaintext() {
        let model = model();
        assert!(!model.addresses.keys().any(|k| k.contains("pending")));
        let w = workload(&model, "Kubernetes//Pod/plain/outside");
        assert_eq!(w.tunnel_protocol, TunnelProtocol::None as i32);
        assert_eq!(w.status, WorkloadStatus::Unhealthy as i32);
    }

    #[test]
    fn service_carries_vip_and_ports() {
        let model = model();
        let Some(address::Type::Service(svc)) =
            &model.addresses["shop/reviews.shop.svc.cluster.local"].r#type
        else {
            panic!("service missing");
        };
        assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 12]);
        assert_eq!(
            (svc.ports[0].service_port, svc.ports[0].target_port),
            (9080, 0)
        );
    }

    const SELECTORLESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: sql, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432, protocol: TCP}]
endpoints:
- addresses: [10.244.1.20]
  targetRef: {kind: Pod, name: db-0, namespace: shop}
- addresses: [192.168.7.7]
  conditions: {ready: false}
  nodeName: node0
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [10.244.9.9]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {role: db}}
spec: {nodeName: node1, serviceAccountName: db, containers: [{name: db}]}
status: {podIP: 10.244.1.20, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ghost-0, namespace: shop}
spec: {nodeName: node1, serviceAccountName: ghost, containers: [{name: app}]}
status: {podIP: 10.244.1.21}
"#;

    #[test]
    fn endpoint_slices_give_a_selectorless_service_its_pods_and_external_addresses() {
        let loaded = mesh_config::load_str("db.yaml", SELECTORLESS);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.manifests.endpoint_slices.len(), 2);
        let model = Model::build(&loaded.manifests, &MeshSettings::default());
        let key = "shop/db.shop.svc.cluster.local";
        let pod = workload(&model, "Kubernetes//Pod/shop/db-0");
        let ports = &pod.services[key].ports;
        assert_eq!((ports[0].service_port, ports[0].target_port), (5432, 15432));
        let external = workload(
            &model,
            "Kubernetes/discovery.k8s.io/EndpointSlice/shop/db-1/192.168.7.7",
        );
        assert_eq!(external.addresses, vec![vec![192, 168, 7, 7]]);
        assert_eq!(external.tunnel_protocol, TunnelProtocol::None as i32);
        assert_eq!(external.status, WorkloadStatus::Unhealthy as i32);
        assert_eq!(external.services[key].ports[0].target_port, 15432);
        // A slice of a selecting (or unknown) Service adds nothing.
        assert!(!model.addresses.keys().any(|k| k.contains("other-1")));
    }

    #[test]
    fn a_pod_running_as_an_undeclared_service_account_is_warned_about() {
        let loaded = mesh_config::load_str("db.yaml", SELECTORLESS);
        let model = Model::build(&loaded.manifests, &MeshSettings::default());
        let about: Vec<_> = model
            .warnings
            .iter()
            .filter(|w| w.starts_with("ServiceAccount "))
            .collect();
        assert_eq!(about.len(), 1, "{:?}", model.warnings);
        assert!(about[0].contains("shop/ghost"), "{}", about[0]);
    }

    #[test]
    fn node_identity_check_is_per_node() {
        let model = model();
        assert!(model.node_runs_identity("node1", "shop", "bookinfo-reviews"));
        assert!(!model.node_runs_identity("node0", "shop", "bookinfo-reviews"));
        assert!(!model.node_runs_identity("node1", "shop", "default"));
    }
}
