//! Endpoints of Services without a selector, from their EndpointSlices.
//!
//! Kubernetes fills the EndpointSlices of a selecting Service from its pods,
//! which the model already matches itself; a Service without a selector has
//! only the slices someone wrote (label `kubernetes.io/service-name`). An
//! endpoint whose `targetRef` is a known pod adds the Service to that pod's
//! workload; any other address becomes a workload of its own, outside the
//! mesh (plaintext), named after its slice.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_api::workload::{self as wl, PortList, TunnelProtocol, WorkloadStatus};

use super::{CLUSTER_ID, MeshSettings, ServiceView, ip_bytes};

/// Label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the EndpointSlices add to the model.
#[derive(Debug, Default)]
pub(super) struct SliceEndpoints {
    /// Services (key `namespace/hostname`, with ports) to add to the
    /// workload of pod `namespace/name`.
    pub by_pod: HashMap<String, Vec<(String, PortList)>>,
    /// Workloads for addresses that are not pods.
    pub external: Vec<wl::Workload>,
    /// Why a slice or endpoint was ignored.
    pub warnings: Vec<String>,
}

impl SliceEndpoints {
    /// Reads `slices` for the selector-less ones of `services`; `pods` holds
    /// the `namespace/name` of every pod the model knows.
    pub fn new(
        slices: &[EndpointSlice],
        services: &[ServiceView<'_>],
        pods: &HashSet<String>,
        settings: &MeshSettings,
    ) -> Self {
        let selectorless: HashMap<(&str, &str), &ServiceView<'_>> = services
            .iter()
            .filter(|svc| svc.selector.is_none())
            .map(|svc| ((svc.namespace, svc.name), svc))
            .collect();
        let mut out = Self::default();
        for slice in slices {
            let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
            let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
            let Some(service_name) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue; // not a Service's slice
            };
            let Some(svc) = selectorless.get(&(namespace, service_name.as_str())) else {
                // Either Kubernetes' own mirror of a selecting Service's pods
                // (already matched by selector) or a Service that is gone.
                continue;
            };
            if slice.address_type == "FQDN" {
                out.warnings.push(format!(
                    "EndpointSlice {namespace}/{slice_name}: addressType FQDN is not supported; ignored"
                ));
                continue;
            }
            let ports = PortList {
                ports: svc
                    .ports
                    .iter()
                    .filter_map(|port| {
                        // Slice ports carry the Service port's name ("" when
                        // the Service has a single unnamed port).
                        let target = slice.ports.iter().flatten().find(|p| {
                            p.name.as_deref().unwrap_or_default() == port.name
                                && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                        })?;
                        Some(wl::Port {
                            service_port: port.port,
                            target_port: u32::try_from(target.port?).ok()?,
                            app_protocol: port.app_protocol as i32,
                        })
                    })
                    .collect(),
            };
            let key = format!("{}/{}", svc.namespace, svc.hostname);
            for endpoint in slice.endpoints.iter().flatten() {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.as_deref().unwrap_or(namespace);
                        Some(format!("{ns}/{}", r.name.as_deref()?))
                    })
                    .filter(|pod| pods.contains(pod));
                if let Some(pod) = pod {
                    out.by_pod
                        .entry(pod)
                        .or_default()
                        .push((key.clone(), ports.clone()));
                    continue;
                }
                for address in &endpoint.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        out.warnings.push(format!(
                            "EndpointSlice {namespace}/{slice_name}: endpoints[].addresses: `{address}` is not an IP address; ignored"
                        ));
                        continue;
                    };
                    out.external.push(wl::Workload {
                        uid: format!(
                            "{CLUSTER_ID}/discovery.k8s.io/EndpointSlice/{namespace}/{slice_name}/{ip}"
                        ),
                        name: slice_name.to_owned(),
                        namespace: namespace.to_owned(),
                        addresses: vec![ip_bytes(ip)],
                        tunnel_protocol: TunnelProtocol::None as i32,
                        trust_domain: settings.trust_domain.clone(),
                        node: endpoint.node_name.clone().unwrap_or_default(),
                        canonical_name: svc.name.to_owned(),
                        canonical_revision: "latest".to_owned(),
                        workload_name: slice_name.to_owned(),
                        services: [(key.clone(), ports.clone())].into(),
                        status: if ready {
                            WorkloadStatus::Healthy
                        } else {
                            WorkloadStatus::Unhealthy
                        } as i32,
                        cluster_id: CLUSTER_ID.to_owned(),
                        ..Default::default()
                    });
                }
            }
        }
        out
    }
}
