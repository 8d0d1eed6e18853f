//! From manifests to a lab plan: which pods exist, on which node, with which
//! addresses, and which VIP each Service gets. Pure computation, no side effects.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Container, ContainerPort, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use mesh_config::Manifests;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Port the stand-in app answers plain TCP echo on in every pod.
pub const ECHO_PORT: u16 = 7;
/// Port the stand-in app speaks a server-first protocol on in every pod.
pub const BANNER_PORT: u16 = 22;
/// Cluster domain used for Service host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A whole lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabPlan {
    /// Lab name; prefix of everything it creates.
    pub name: String,
    /// Nodes.
    pub nodes: Vec<NodePlan>,
    /// Pod replicas, in manifest order.
    pub pods: Vec<PodPlan>,
    /// Services with their VIPs.
    pub services: Vec<ServicePlan>,
    /// Namespaces and their labels (declared or implied by resources).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// A node: one network namespace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodePlan {
    /// Node name, e.g. `node0`.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Address on the inter-node link.
    pub ip: Ipv4Addr,
    /// First address of its /24 pod CIDR.
    pub pod_cidr: Ipv4Addr,
}

/// Application protocol the stand-in app speaks on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 and h2c.
    Http,
    /// TCP echo.
    Tcp,
    /// Server-first: a banner, then echo.
    Banner,
}

/// One pod replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodPlan {
    /// Pod name, e.g. `reviews-v2-0`.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Index into [`LabPlan::nodes`].
    pub node: usize,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub netns: String,
    /// Host-side veth name (in the node namespace).
    pub veth: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// Ports the app listens on.
    pub ports: Vec<(u16, PortProtocol)>,
    /// Downstream calls the app makes on a path: `(path, urls)`.
    pub calls: Vec<(String, Vec<String>)>,
}

/// Label naming the Gateway a waypoint pod serves (Istio sets it on the
/// Deployment it creates for a waypoint).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Ports a waypoint pod listens on: HBONE, metrics, readiness.
pub const WAYPOINT_PORTS: [u16; 3] = [15008, 15020, 15021];

impl PodPlan {
    /// The Gateway this pod is the waypoint of, if it is one.
    pub fn waypoint(&self) -> Option<&str> {
        self.labels.get(GATEWAY_NAME_LABEL).map(String::as_str)
    }

    /// The `app` label, or the pod name.
    pub fn app(&self) -> &str {
        self.labels.get("app").map_or(&self.name, String::as_str)
    }

    /// The `version` label, or empty.
    pub fn version(&self) -> &str {
        self.labels.get("version").map_or("", String::as_str)
    }

    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One Service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicePlan {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Its virtual IP.
    pub vip: Ipv4Addr,
    /// `(service port, port name, backend addresses)`.
    pub ports: Vec<ServicePortPlan>,
}

/// One port of a Service and the endpoints behind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicePortPlan {
    /// Port name (may be empty).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Ready endpoints: pod IP and target port.
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePlan {
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }
}

/// Builds the plan of lab `name` with `node_count` nodes from `manifests`.
pub fn plan(name: &str, node_count: usize, manifests: &Manifests) -> Result<LabPlan> {
    if !(1..=2).contains(&node_count) {
        return Err(Error::Invalid(format!(
            "a lab has 1 or 2 nodes, not {node_count}"
        )));
    }
    let nodes: Vec<NodePlan> = (0..node_count)
        .map(|i| NodePlan {
            name: format!("node{i}"),
            netns: format!("{name}-node{i}"),
            ip: Ipv4Addr::new(10, 255, 0, 1 + i as u8),
            pod_cidr: Ipv4Addr::new(10, 244, i as u8, 0),
        })
        .collect();

    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for ns in &manifests.namespaces {
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        namespaces.insert(ns.metadata.name.clone().unwrap_or_default(), labels);
    }

    let mut pods = Vec::new();
    let mut next_host = vec![10u8; node_count];
    let mut add_pod = |pod_name: String,
                       namespace: &str,
                       labels: BTreeMap<String, String>,
                       spec: &mesh_config::pod::PodSpec|
     -> Result<()> {
        // `spec.nodeName` pins a pod as in Kubernetes; others go round robin.
        let node = match spec.node_name.as_deref() {
            Some(wanted) => nodes.iter().position(|n| n.name == wanted).ok_or_else(|| {
                Error::Invalid(format!(
                    "pod {namespace}/{pod_name}: spec.nodeName {wanted:?} is not a lab node \
                     (node0..node{})",
                    node_count - 1
                ))
            })?,
            None => pods.len() % node_count,
        };
        let host = next_host[node];
        if host == 250 {
            return Err(Error::Invalid(format!(
                "node{node} is out of pod addresses"
            )));
        }
        next_host[node] += 1;
        let mut ports: Vec<(u16, PortProtocol)> = Vec::new();
        for port in &spec.ports {
            let port = u16::try_from(port.container_port).map_err(|_| {
                Error::Invalid(format!(
                    "pod {namespace}/{pod_name}: containerPort {} out of range",
                    port.container_port
                ))
            })?;
            if !ports.iter().any(|(p, _)| *p == port) {
                ports.push((port, PortProtocol::Http));
            }
        }
        let octets = nodes[node].pod_cidr.octets();
        let index = pods.len();
        pods.push(PodPlan {
            netns: format!("{name}-{namespace}-{pod_name}"),
            veth: format!("vp{index}"),
            name: pod_name,
            namespace: namespace.to_owned(),
            node,
            ip: Ipv4Addr::new(octets[0], octets[1], octets[2], host),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            calls: sample_calls(&labels),
            labels,
            ports,
        });
        Ok(())
    };
    for deployment in &manifests.deployments {
        let dep_name = deployment.metadata.name.as_deref().unwrap_or_default();
        let namespace = deployment
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(mesh_config::DEFAULT_NAMESPACE);
        let spec = &deployment.spec;
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let Some(pod_spec) = spec
            .template
            .spec
            .as_ref()
            .map(mesh_config::pod::PodSpec::from)
        else {
            continue;
        };
        for replica in 0..spec.replicas.unwrap_or(1).max(0) {
            add_pod(
                format!("{dep_name}-{replica}"),
                namespace,
                labels.clone(),
                &pod_spec,
            )?;
        }
    }
    for pod in &manifests.pods {
        let namespace = pod
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(mesh_config::DEFAULT_NAMESPACE);
        let labels = pod.metadata.labels.clone();
        if let Some(spec) = &pod.spec {
            add_pod(
                pod.metadata.name.clone().unwrap_or_default(),
                namespace,
                labels,
                spec,
            )?;
        }
    }
    for pod in &mut pods {
        namespaces.entry(pod.namespace.clone()).or_default();
        if pod.waypoint().is_some() {
            continue;
        }
        for (port, protocol) in [
            (ECHO_PORT, PortProtocol::Tcp),
            (BANNER_PORT, PortProtocol::Banner),
        ] {
            if !pod.ports.iter().any(|(p, _)| *p == port) {
                pod.ports.push((port, protocol));
            }
        }
    }

    let mut services = Vec::new();
    for (index, service) in manifests.services.iter().enumerate() {
        let svc_name = service.metadata.name.clone().unwrap_or_default();
        let namespace = service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| mesh_config::DEFAULT_NAMESPACE.to_owned());
        namespaces.entry(namespace.clone()).or_default();
        let Some(spec) = &service.spec else { continue };
        let selector = spec.selector.clone().unwrap_or_default();
        let selected: Vec<usize> = pods
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.namespace == namespace
                    && !selector.is_empty()
                    && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .map(|(i, _)| i)
            .collect();
        let vip_index = u16::try_from(index + 10)
            .ok()
            .filter(|i| *i < 0xff00)
            .ok_or_else(|| Error::Invalid("too many services".into()))?;
        let mut ports = Vec::new();
        for sp in spec.ports.iter().flatten() {
            let port = u16::try_from(sp.port).map_err(|_| {
                Error::Invalid(format!(
                    "Service {namespace}/{svc_name}: port {} out of range",
                    sp.port
                ))
            })?;
            let target = match &sp.target_port {
                None => port,
                Some(IntOrString::Int(p)) => u16::try_from(*p).map_err(|_| {
                    Error::Invalid(format!(
                        "Service {namespace}/{svc_name}: targetPort {p} out of range"
                    ))
                })?,
                // Named target ports resolve per pod; the stand-in app serves the
                // service port number under that name.
                Some(IntOrString::String(_)) => port,
            };
            let name = sp.name.clone().unwrap_or_default();
            let is_tcp = name == "tcp"
                || name.starts_with("tcp-")
                || sp.app_protocol.as_deref() == Some("tcp");
            let mut endpoints = Vec::new();
            for &i in &selected {
                let pod = &mut pods[i];
                let gateway = pod.waypoint().is_some();
                match pod.ports.iter_mut().find(|(p, _)| *p == target) {
                    Some(entry) if is_tcp => entry.1 = PortProtocol::Tcp,
                    Some(_) => {}
                    // A gateway proxy binds its ports from its config; the
                    // stand-in app is what serves every target port.
                    None if gateway => {}
                    None => pod.ports.push((
                        target,
                        if is_tcp {
                            PortProtocol::Tcp
                        } else {
                            PortProtocol::Http
                        },
                    )),
                }
                endpoints.push(SocketAddrV4::new(pod.ip, target));
            }
            ports.push(ServicePortPlan {
                name,
                port,
                endpoints,
            });
        }
        let [hi, lo] = vip_index.to_be_bytes();
        services.push(ServicePlan {
            name: svc_name,
            namespace,
            vip: Ipv4Addr::new(10, 96, hi, lo),
            ports,
        });
    }

    Ok(LabPlan {
        name: name.to_owned(),
        nodes,
        pods,
        services,
        namespaces,
    })
}

/// Deploys what Istio deploys for each waypoint (a Gateway API `Gateway` of
/// class `istio-waypoint`): a Deployment named after the Gateway, running
/// as a service account of that name, outside the mesh's capture, and a
/// Service of that name exposing HBONE (15008).
pub fn add_waypoints(manifests: &mut Manifests) {
    let gateways: Vec<(String, String)> = manifests
        .kube_gateways
        .iter()
        .filter(|gw| gw.spec.gateway_class_name == "istio-waypoint")
        .filter_map(|gw| {
            Some((
                gw.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| mesh_config::DEFAULT_NAMESPACE.to_owned()),
                gw.metadata.name.clone()?,
            ))
        })
        .collect();
    for (namespace, name) in gateways {
        add_gateway_deployment(
            manifests,
            &namespace,
            &name,
            &name,
            BTreeMap::new(),
            &WAYPOINT_PORTS,
            &[("mesh", 15008, 15008), ("status-port", 15021, 15021)],
        );
    }
}

/// Namespace and name of the ingress gateway the lab deploys, as Istio's
/// default install does.
pub const INGRESS_GATEWAY: (&str, &str) = ("istio-system", "istio-ingressgateway");
/// Ports the ingress gateway pod listens on from the start: metrics and
/// readiness. It binds its Gateway servers' ports (8080, 8443 in Istio's
/// samples) when their config arrives.
pub const INGRESS_PORTS: [u16; 2] = [15020, 15021];

/// For Istio `Gateway` resources selecting `istio: ingressgateway` (Istio's
/// default ingress) when no Deployment provides it, adds Istio's
/// `istio-ingressgateway` Deployment and Service in `istio-system`, as an
/// Istio install would have: Service ports 80 and 443 to the pod's 8080 and
/// 8443, and 31400 (Istio's former default TCP port). The lab runs the waypoint binary in such pods; it binds the ports
/// of the Gateway servers it is sent.
pub fn add_ingress_gateway(manifests: &mut Manifests) {
    let wanted = manifests
        .istio_gateways
        .iter()
        .any(|gw| gw.spec.selector.get("istio").map(String::as_str) == Some("ingressgateway"));
    let provided = manifests.deployments.iter().any(|d| {
        let labels = d
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref());
        labels.and_then(|l| l.get("istio")).map(String::as_str) == Some("ingressgateway")
    });
    if !wanted || provided {
        return;
    }
    let (namespace, name) = INGRESS_GATEWAY;
    add_gateway_deployment(
        manifests,
        namespace,
        name,
        name,
        BTreeMap::from([
            ("istio".to_owned(), "ingressgateway".to_owned()),
            ("app".to_owned(), name.to_owned()),
        ]),
        &INGRESS_PORTS,
        &[
            ("http2", 80, 8080),
            ("https", 443, 8443),
            ("tcp", 31400, 31400),
            ("status-port", 15021, 15021),
        ],
    );
}

/// Deploys what Istio deploys for each Gateway API ingress Gateway (class
/// `istio`): a Deployment and a Service `<gateway>-istio`, the pod labelled
/// with the Gateway's name, the Service exposing every listener's port.
pub fn add_kube_ingress_gateways(manifests: &mut Manifests) {
    let gateways: Vec<mesh_config::istio::KubeGateway> = manifests
        .kube_gateways
        .iter()
        .filter(|gw| gw.spec.gateway_class_name == "istio")
        .cloned()
        .collect();
    for gateway in gateways {
        let Some(name) = gateway.metadata.name.as_deref() else {
            continue;
        };
        let mut service_ports: Vec<(&str, i32, i32)> = Vec::new();
        for listener in &gateway.spec.listeners {
            let Ok(port) = i32::try_from(listener.port) else {
                continue;
            };
            if !service_ports.iter().any(|(_, p, _)| *p == port) {
                service_ports.push((listener.name.as_str(), port, port));
            }
        }
        service_ports.push(("status-port", 15021, 15021));
        add_gateway_deployment(
            manifests,
            mesh_config::namespace(&gateway.metadata),
            &format!("{name}-istio"),
            name,
            BTreeMap::new(),
            &INGRESS_PORTS,
            &service_ports,
        );
    }
}

/// Adds a gateway proxy's Deployment `name` (one replica, outside the
/// mesh's capture, labelled with [`GATEWAY_NAME_LABEL`]` = gateway` so the
/// lab runs the proxy for that Gateway) and its Service with
/// `service_ports` (`name`, port, target port), unless a Deployment of
/// that name exists.
fn add_gateway_deployment(
    manifests: &mut Manifests,
    namespace: &str,
    name: &str,
    gateway: &str,
    extra_labels: BTreeMap<String, String>,
    container_ports: &[u16],
    service_ports: &[(&str, i32, i32)],
) {
    let exists = manifests.deployments.iter().any(|d| {
        d.metadata.name.as_deref() == Some(name)
            && d.metadata.namespace.as_deref() == Some(namespace)
    });
    if exists {
        return;
    }
    let mut selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), gateway.to_owned())]);
    selector.extend(extra_labels);
    let mut labels = selector.clone();
    labels.insert(
        mesh_config::node::DATAPLANE_MODE_LABEL.to_owned(),
        "none".to_owned(),
    );
    let meta = |labels: Option<BTreeMap<String, String>>| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels,
        ..Default::default()
    };
    manifests.deployments.push(Deployment {
        metadata: meta(None),
        spec: DeploymentSpec {
            replicas: Some(1),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.to_owned()),
                    containers: vec![Container {
                        name: "istio-proxy".into(),
                        ports: Some(
                            container_ports
                                .iter()
                                .map(|p| ContainerPort {
                                    container_port: i32::from(*p),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    });
    manifests.services.push(Service {
        metadata: meta(Some(selector.clone())),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(
                service_ports
                    .iter()
                    .map(|(port_name, port, target)| ServicePort {
                        name: Some((*port_name).into()),
                        port: *port,
                        target_port: Some(IntOrString::Int(*target)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// The call graph of the samples the lab knows, so their traffic is real:
/// bookinfo's productpage calls details and reviews; reviews v2 and v3 call
/// ratings (v1 shows no stars, as in the sample).
fn sample_calls(labels: &BTreeMap<String, String>) -> Vec<(String, Vec<String>)> {
    let app = labels.get("app").map(String::as_str);
    let version = labels.get("version").map(String::as_str);
    match (app, version) {
        (Some("productpage"), _) => vec![(
            "/productpage".to_owned(),
            vec![
                "http://details:9080/details/0".to_owned(),
                "http://reviews:9080/reviews/0".to_owned(),
            ],
        )],
        (Some("reviews"), Some("v2" | "v3")) => {
            vec![(
                "/reviews/0".to_owned(),
                vec!["http://ratings:9080/ratings/0".to_owned()],
            )]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bookinfo() -> LabPlan {
        let path = crate::istio_samples_dir().join("bookinfo/platform/bookinfo.yaml");
        let loaded = mesh_config::load_file(&path);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        plan("t", 2, &loaded.manifests).expect("bookinfo plans")
    }

    #[test]
    fn bookinfo_pods_spread_over_two_nodes() {
        let plan = bookinfo();
        let names: Vec<_> = plan.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "details-v1-0",
                "ratings-v1-0",
                "reviews-v1-0",
                "reviews-v2-0",
                "reviews-v3-0",
                "productpage-v1-0"
            ]
        );
        assert_eq!(plan.pods.iter().filter(|p| p.node == 0).count(), 3);
        assert_eq!(plan.pods[1].ip, Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(plan.pods[2].ip, Ipv4Addr::new(10, 244, 0, 11));
        assert_eq!(plan.pods[0].service_account, "bookinfo-details");
        assert!(plan.pods[0].ports.contains(&(9080, PortProtocol::Http)));
        assert!(
            plan.pods[0]
                .ports
                .contains(&(BANNER_PORT, PortProtocol::Banner))
        );
    }

    #[test]
    fn services_get_vips_and_selected_endpoints() {
        let plan = bookinfo();
        let reviews = plan
            .services
            .iter()
            .find(|s| s.name == "reviews")
            .expect("reviews service");
        assert_eq!(reviews.hostname(), "reviews.default.svc.cluster.local");
        assert_eq!(reviews.ports[0].port, 9080);
        assert_eq!(reviews.ports[0].endpoints.len(), 3);
        let vips: std::collections::BTreeSet<_> = plan.services.iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), plan.services.len(), "VIPs are unique");
    }

    #[test]
    fn bookinfo_call_graph() {
        let plan = bookinfo();
        let calls = |name: &str| {
            plan.pods
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.calls.len())
        };
        assert_eq!(calls("productpage-v1-0"), Some(1));
        assert_eq!(calls("reviews-v1-0"), Some(0));
        assert_eq!(calls("reviews-v3-0"), Some(1));
    }

    #[test]
    fn tcp_service_ports_make_echo_listeners() {
        let loaded = mesh_config::load_str(
            "t",
            "apiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo}\nspec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 9000}]}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tcp-echo}\nspec: {selector: {matchLabels: {app: tcp-echo}}, template: {metadata: {labels: {app: tcp-echo}}, spec: {containers: [{name: c, ports: [{containerPort: 9000}]}]}}}\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let plan = plan("t", 1, &loaded.manifests).expect("plans");
        assert!(plan.pods[0].ports.contains(&(9000, PortProtocol::Tcp)));
    }

    #[test]
    fn node_name_pins_a_pod() {
        let pod = |name: &str, node: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\n---\n"
            )
        };
        let text = pod("a", "node1") + &pod("b", "node1");
        let loaded = mesh_config::load_str("t", &text);
        let plan = plan("t", 2, &loaded.manifests).expect("plans");
        assert!(plan.pods.iter().all(|p| p.node == 1), "{:?}", plan.pods);

        let loaded = mesh_config::load_str("t", &pod("c", "node7"));
        let err = super::plan("t", 2, &loaded.manifests).unwrap_err();
        assert!(err.to_string().contains("spec.nodeName \"node7\""), "{err}");
    }

    #[test]
    fn node_count_is_checked() {
        assert!(plan("t", 3, &Manifests::default()).is_err());
    }
}
