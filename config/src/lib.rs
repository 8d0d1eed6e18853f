//! Loading Kubernetes-shaped YAML into typed resources.
//!
//! A manifest file holds any number of `---`-separated documents. Each one is
//! parsed on its own into the k8s-openapi type of its `kind`, so one broken
//! document is reported with its file, position, resource name and the field
//! path that failed, while every other document still loads.

mod load;
pub mod node;

pub use load::{LoadError, LoadErrorKind, Loaded, load_dir, load_file, load_str};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Service, ServiceAccount},
};

/// Namespace given to namespaced resources that do not name one, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One parsed resource.
#[derive(Clone, Debug)]
pub enum Resource {
    /// `v1/Namespace`.
    Namespace(Box<Namespace>),
    /// `v1/Service`.
    Service(Box<Service>),
    /// `v1/ServiceAccount`.
    ServiceAccount(Box<ServiceAccount>),
    /// `apps/v1/Deployment`.
    Deployment(Box<Deployment>),
    /// `v1/Pod`.
    Pod(Box<Pod>),
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
    /// Deployments.
    pub deployments: Vec<Deployment>,
    /// Bare pods.
    pub pods: Vec<Pod>,
    /// Resources of kinds not modelled here.
    pub others: Vec<ResourceId>,
}

impl Manifests {
    /// Adds one resource to its group.
    pub fn push(&mut self, resource: Resource) {
        match resource {
            Resource::Namespace(r) => self.namespaces.push(*r),
            Resource::Service(r) => self.services.push(*r),
            Resource::ServiceAccount(r) => self.service_accounts.push(*r),
            Resource::Deployment(r) => self.deployments.push(*r),
            Resource::Pod(r) => self.pods.push(*r),
            Resource::Other(id) => self.others.push(id),
        }
    }

    /// Appends every resource of `other`.
    pub fn extend(&mut self, other: Manifests) {
        self.namespaces.extend(other.namespaces);
        self.services.extend(other.services);
        self.service_accounts.extend(other.service_accounts);
        self.deployments.extend(other.deployments);
        self.pods.extend(other.pods);
        self.others.extend(other.others);
    }
}
