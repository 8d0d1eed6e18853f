//! Loading Kubernetes-shaped YAML into typed resources.
//!
//! A manifest file holds any number of `---`-separated documents. Each one is
//! parsed on its own into the k8s-openapi type of its `kind`, so one broken
//! document is reported with its file, position, resource name and the field
//! path that failed, while every other document still loads.

pub mod istio;
mod load;
pub mod node;
pub mod pod;
pub mod validate;

pub use pod::Pod;

pub use load::{
    LoadError, LoadErrorKind, LoadWarning, Loaded, load_dir, load_file, load_str, load_value,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Secret, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Namespace given to namespaced resources that do not name one, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespace `meta` names, or [`DEFAULT_NAMESPACE`] when it names none.
pub fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// One parsed resource.
#[derive(Clone, Debug)]
pub enum Resource {
    /// `v1/Namespace`.
    Namespace(Box<Namespace>),
    /// `v1/Service`.
    Service(Box<Service>),
    /// `v1/ServiceAccount`.
    ServiceAccount(Box<ServiceAccount>),
    /// `v1/Secret` (gateway certificates).
    Secret(Box<Secret>),
    /// `discovery.k8s.io/v1` EndpointSlice (endpoints of Services without
    /// a selector).
    EndpointSlice(Box<EndpointSlice>),
    /// `apps/v1/Deployment`.
    Deployment(Box<Deployment>),
    /// `v1/Pod`, slim ([`pod`]).
    Pod(Box<Pod>),
    /// `networking.istio.io` VirtualService.
    VirtualService(Box<istio::VirtualService>),
    /// `networking.istio.io` DestinationRule.
    DestinationRule(Box<istio::DestinationRule>),
    /// `networking.istio.io` Gateway.
    IstioGateway(Box<istio::IstioGateway>),
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry(Box<istio::ServiceEntry>),
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy(Box<istio::AuthorizationPolicy>),
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication(Box<istio::PeerAuthentication>),
    /// `gateway.networking.k8s.io` Gateway.
    KubeGateway(Box<istio::KubeGateway>),
    /// `gateway.networking.k8s.io` HTTPRoute.
    KubeHttpRoute(Box<istio::KubeHttpRoute>),
    /// Gateway API GRPCRoute.
    KubeGrpcRoute(Box<istio::KubeGrpcRoute>),
    /// Gateway API ReferenceGrant.
    ReferenceGrant(Box<istio::ReferenceGrant>),
    /// Gateway API TCPRoute.
    KubeTcpRoute(Box<istio::KubeTcpRoute>),
    /// Gateway API TLSRoute.
    KubeTlsRoute(Box<istio::KubeTlsRoute>),
    /// A kind this crate does not model (yet): kept by identity only.
    Other(ResourceId),
}

/// Identity of a resource: what error messages and status pages name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// `apiVersion`, e.g. `networking.istio.io/v1`.
    pub api_version: String,
    /// `kind`, e.g. `VirtualService`.
    pub kind: String,
    /// `metadata.namespace` (defaulted) or empty for cluster-scoped kinds.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// All resources of a configuration, grouped by kind, in file order.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Namespaces declared explicitly.
    pub namespaces: Vec<Namespace>,
    /// Services.
    pub services: Vec<Service>,
    /// Service accounts.
    pub service_accounts: Vec<ServiceAccount>,
    /// Secrets (only gateway certificates are read).
    pub secrets: Vec<Secret>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Deployments.
    pub deployments: Vec<Deployment>,
    /// Bare pods, slim ([`pod`]).
    pub pods: Vec<Pod>,
    /// VirtualServices.
    pub virtual_services: Vec<istio::VirtualService>,
    /// DestinationRules.
    pub destination_rules: Vec<istio::DestinationRule>,
    /// Istio Gateways.
    pub istio_gateways: Vec<istio::IstioGateway>,
    /// ServiceEntries.
    pub service_entries: Vec<istio::ServiceEntry>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<istio::AuthorizationPolicy>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<istio::PeerAuthentication>,
    /// Gateway API Gateways.
    pub kube_gateways: Vec<istio::KubeGateway>,
    /// Gateway API HTTPRoutes.
    pub http_routes: Vec<istio::KubeHttpRoute>,
    /// Gateway API GRPCRoutes.
    pub grpc_routes: Vec<istio::KubeGrpcRoute>,
    /// Gateway API ReferenceGrants.
    pub reference_grants: Vec<istio::ReferenceGrant>,
    /// Gateway API TCPRoutes.
    pub tcp_routes: Vec<istio::KubeTcpRoute>,
    /// Gateway API TLSRoutes.
    pub tls_routes: Vec<istio::KubeTlsRoute>,
    /// Resources of kinds not modelled here.
    pub others: Vec<ResourceId>,
    /// Where each resource came from (file name), for error messages.
    pub sources: std::collections::BTreeMap<ResourceId, String>,
}

impl Manifests {
    /// Adds one resource to its group.
    pub fn push(&mut self, resource: Resource) {
        match resource {
            Resource::Namespace(r) => self.namespaces.push(*r),
            Resource::Service(r) => self.services.push(*r),
            Resource::ServiceAccount(r) => self.service_accounts.push(*r),
            Resource::Secret(r) => self.secrets.push(*r),
            Resource::EndpointSlice(r) => self.endpoint_slices.push(*r),
            Resource::Deployment(r) => self.deployments.push(*r),
            Resource::Pod(r) => self.pods.push(*r),
            Resource::VirtualService(r) => self.virtual_services.push(*r),
            Resource::DestinationRule(r) => self.destination_rules.push(*r),
            Resource::IstioGateway(r) => self.istio_gateways.push(*r),
            Resource::ServiceEntry(r) => self.service_entries.push(*r),
            Resource::AuthorizationPolicy(r) => self.authorization_policies.push(*r),
            Resource::PeerAuthentication(r) => self.peer_authentications.push(*r),
            Resource::KubeGateway(r) => self.kube_gateways.push(*r),
            Resource::KubeHttpRoute(r) => self.http_routes.push(*r),
            Resource::KubeGrpcRoute(r) => self.grpc_routes.push(*r),
            Resource::ReferenceGrant(r) => self.reference_grants.push(*r),
            Resource::KubeTcpRoute(r) => self.tcp_routes.push(*r),
            Resource::KubeTlsRoute(r) => self.tls_routes.push(*r),
            Resource::Other(id) => self.others.push(id),
        }
    }

    /// Appends every resource of `other`.
    pub fn extend(&mut self, other: Manifests) {
        self.namespaces.extend(other.namespaces);
        self.services.extend(other.services);
        self.service_accounts.extend(other.service_accounts);
        self.secrets.extend(other.secrets);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.deployments.extend(other.deployments);
        self.pods.extend(other.pods);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.istio_gateways.extend(other.istio_gateways);
        self.service_entries.extend(other.service_entries);
        self.authorization_policies
            .extend(other.authorization_policies);
        self.peer_authentications.extend(other.peer_authentications);
        self.kube_gateways.extend(other.kube_gateways);
        self.http_routes.extend(other.http_routes);
        self.grpc_routes.extend(other.grpc_routes);
        self.reference_grants.extend(other.reference_grants);
        self.tcp_routes.extend(other.tcp_routes);
        self.tls_routes.extend(other.tls_routes);
        self.others.extend(other.others);
        self.sources.extend(other.sources);
    }

    /// Number of resources held.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.services.len()
            + self.service_accounts.len()
            + self.secrets.len()
            + self.endpoint_slices.len()
            + self.deployments.len()
            + self.pods.len()
            + self.virtual_services.len()
            + self.destination_rules.len()
            + self.istio_gateways.len()
            + self.service_entries.len()
            + self.authorization_policies.len()
            + self.peer_authentications.len()
            + self.kube_gateways.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.reference_grants.len()
            + self.tcp_routes.len()
            + self.tls_routes.len()
            + self.others.len()
    }

    /// Whether there are no resources.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The resource with `id`'s kind, namespace and name (any API version),
    /// as a [`Resource`] that can be [`push`](Self::push)ed elsewhere.
    pub fn find(&self, id: &ResourceId) -> Option<Resource> {
        fn named<'a, T: 'a>(
            list: &'a [T],
            id: &ResourceId,
            meta: impl Fn(&T) -> &ObjectMeta,
        ) -> Option<&'a T> {
            list.iter().find(|r| {
                let m = meta(r);
                is(id, m.name.as_deref(), m.namespace.as_deref())
            })
        }
        fn is(id: &ResourceId, name: Option<&str>, namespace: Option<&str>) -> bool {
            name == Some(id.name.as_str()) && namespace.unwrap_or_default() == id.namespace
        }
        let kind = id.kind.as_str();
        let istio_gateway = id.api_version.starts_with("networking.istio.io/");
        Some(match kind {
            "Namespace" => Resource::Namespace(Box::new(
                named(&self.namespaces, id, |r| &r.metadata)?.clone(),
            )),
            "Service" => Resource::Service(Box::new(
                named(&self.services, id, |r| &r.metadata)?.clone(),
            )),
            "ServiceAccount" => Resource::ServiceAccount(Box::new(
                named(&self.service_accounts, id, |r| &r.metadata)?.clone(),
            )),
            "Secret" => {
                Resource::Secret(Box::new(named(&self.secrets, id, |r| &r.metadata)?.clone()))
            }
            "EndpointSlice" => Resource::EndpointSlice(Box::new(
                named(&self.endpoint_slices, id, |r| &r.metadata)?.clone(),
            )),
            "Deployment" => Resource::Deployment(Box::new(
                named(&self.deployments, id, |r| &r.metadata)?.clone(),
            )),
            "Pod" => Resource::Pod(Box::new(
                self.pods
                    .iter()
                    .find(|p| {
                        is(
                            id,
                            p.metadata.name.as_deref(),
                            p.metadata.namespace.as_deref(),
                        )
                    })?
                    .clone(),
            )),
            "VirtualService" => Resource::VirtualService(Box::new(
                named(&self.virtual_services, id, |r| &r.metadata)?.clone(),
            )),
            "DestinationRule" => Resource::DestinationRule(Box::new(
                named(&self.destination_rules, id, |r| &r.metadata)?.clone(),
            )),
            "Gateway" if istio_gateway => Resource::IstioGateway(Box::new(
                named(&self.istio_gateways, id, |r| &r.metadata)?.clone(),
            )),
            "Gateway" => Resource::KubeGateway(Box::new(
                named(&self.kube_gateways, id, |r| &r.metadata)?.clone(),
            )),
            "HTTPRoute" => Resource::KubeHttpRoute(Box::new(
                named(&self.http_routes, id, |r| &r.metadata)?.clone(),
            )),
            "GRPCRoute" => Resource::KubeGrpcRoute(Box::new(
                named(&self.grpc_routes, id, |r| &r.metadata)?.clone(),
            )),
            "ReferenceGrant" => Resource::ReferenceGrant(Box::new(
                named(&self.reference_grants, id, |r| &r.metadata)?.clone(),
            )),
            "TCPRoute" => Resource::KubeTcpRoute(Box::new(
                named(&self.tcp_routes, id, |r| &r.metadata)?.clone(),
            )),
            "TLSRoute" => Resource::KubeTlsRoute(Box::new(
                named(&self.tls_routes, id, |r| &r.metadata)?.clone(),
            )),
            "ServiceEntry" => Resource::ServiceEntry(Box::new(
                named(&self.service_entries, id, |r| &r.metadata)?.clone(),
            )),
            "AuthorizationPolicy" => Resource::AuthorizationPolicy(Box::new(
                named(&self.authorization_policies, id, |r| &r.metadata)?.clone(),
            )),
            "PeerAuthentication" => Resource::PeerAuthentication(Box::new(
                named(&self.peer_authentications, id, |r| &r.metadata)?.clone(),
            )),
            _ => return None,
        })
    }
}
