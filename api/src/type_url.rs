//! xDS type URLs.

/// Istio workload API resources (a `Workload` or a `Service`).
pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
/// Istio L4 authorization policies.
pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
/// Envoy listeners.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Envoy route configurations.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Envoy clusters.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Envoy cluster load assignments (endpoints).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
