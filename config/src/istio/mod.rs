//! Typed Istio and Gateway API resources.
//!
//! Every custom resource is a [`Crd`]: the standard `metadata` plus a typed
//! `spec`. Field names and meanings are Istio's; enum-like strings are Rust
//! enums, so a misspelt value is an error at its field path; durations
//! (`"1.5s"`, `"100ms"`) are parsed into [`IstioDuration`].

mod duration;
pub mod gateway_api;
pub mod networking;
pub mod security;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use duration::IstioDuration;

/// A custom resource: metadata and a typed spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Crd<S> {
    /// `apiVersion` as written.
    #[serde(default)]
    pub api_version: String,
    /// `kind` as written.
    #[serde(default)]
    pub kind: String,
    /// Standard metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: S,
    /// Status, as a controller wrote it (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// Workloads selected by labels.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels every selected workload has.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `networking.istio.io` VirtualService.
pub type VirtualService = Crd<networking::VirtualServiceSpec>;
/// `networking.istio.io` DestinationRule.
pub type DestinationRule = Crd<networking::DestinationRuleSpec>;
/// `networking.istio.io` Gateway.
pub type IstioGateway = Crd<networking::GatewaySpec>;
/// `networking.istio.io` ServiceEntry.
pub type ServiceEntry = Crd<networking::ServiceEntrySpec>;
/// `security.istio.io` AuthorizationPolicy.
pub type AuthorizationPolicy = Crd<security::AuthorizationPolicySpec>;
/// `security.istio.io` PeerAuthentication.
pub type PeerAuthentication = Crd<security::PeerAuthenticationSpec>;
/// Gateway API `gateway.networking.k8s.io` Gateway (waypoints and ingress).
pub type KubeGateway = Crd<KubeGatewaySpec>;
/// Gateway API `gateway.networking.k8s.io` HTTPRoute.
pub type KubeHttpRoute = Crd<gateway_api::HttpRouteSpec>;
/// Gateway API `gateway.networking.k8s.io` GRPCRoute.
pub type KubeGrpcRoute = Crd<gateway_api::GrpcRouteSpec>;
/// Gateway API `gateway.networking.k8s.io` TCPRoute.
pub type KubeTcpRoute = Crd<gateway_api::TcpRouteSpec>;
/// Gateway API `gateway.networking.k8s.io` TLSRoute.
pub type KubeTlsRoute = Crd<gateway_api::TlsRouteSpec>;
/// Gateway API `gateway.networking.k8s.io` ReferenceGrant.
pub type ReferenceGrant = Crd<gateway_api::ReferenceGrantSpec>;

/// Gateway API `Gateway.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeGatewaySpec {
    /// `istio-waypoint` for waypoints.
    #[serde(default)]
    pub gateway_class_name: String,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<KubeListener>,
    /// Requested addresses (kept as given).
    #[serde(default)]
    pub addresses: Vec<serde_json::Value>,
    /// Infrastructure labels and annotations (kept as given).
    #[serde(default)]
    pub infrastructure: Option<serde_json::Value>,
}

/// A Gateway API listener.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeListener {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Port.
    #[serde(default)]
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TCP`, `TLS`, `HBONE`...
    #[serde(default)]
    pub protocol: String,
    /// TLS of an `HTTPS` or `TLS` listener.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Which routes may attach (default: routes in the Gateway's namespace).
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

impl KubeListener {
    /// `allowedRoutes.kinds`; empty when not given (the protocol's kinds).
    pub fn allowed_kinds(&self) -> &[RouteGroupKind] {
        self.allowed_routes.as_ref().map_or(&[], |a| &a.kinds)
    }

    /// The route kinds the listener's protocol carries.
    pub fn protocol_kinds(&self) -> &'static [&'static str] {
        match self.protocol.as_str() {
            "HTTP" | "HTTPS" => &["HTTPRoute", "GRPCRoute"],
            "TLS" => &["TLSRoute"],
            "TCP" => &["TCPRoute"],
            "UDP" => &["UDPRoute"],
            _ => &[],
        }
    }
}

/// A Gateway API listener's `tls`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// `Terminate` (the default) or `Passthrough`.
    #[serde(default)]
    pub mode: Option<String>,
    /// The Secrets holding the certificate and key (`tls.crt`, `tls.key`).
    #[serde(default)]
    pub certificate_refs: Vec<SecretRef>,
    /// Implementation-specific options (kept as given).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// A reference to a Secret (Gateway API `SecretObjectReference`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// API group: `""` (core).
    #[serde(default)]
    pub group: Option<String>,
    /// `Secret` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the Gateway's).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A Gateway API listener's `allowedRoutes`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    /// The namespaces routes may attach from.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// The route kinds that may attach; empty: the kinds of the
    /// listener's protocol (HTTPRoute and GRPCRoute on HTTP and HTTPS).
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// One entry of `allowedRoutes.kinds`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupKind {
    /// API group; `gateway.networking.k8s.io` when not given.
    #[serde(default)]
    pub group: Option<String>,
    /// Route kind, such as `HTTPRoute`.
    pub kind: String,
}

impl RouteGroupKind {
    /// Whether this entry names `kind` of the Gateway API's group.
    pub fn is(&self, kind: &str) -> bool {
        self.group.as_deref().is_none_or(|g| g == GATEWAY_API_GROUP) && self.kind == kind
    }
}

/// The Gateway API's API group.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// `allowedRoutes.namespaces`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    /// For `Selector`: the labels a route's namespace must have.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
}

/// API versions accepted for `networking.istio.io` kinds.
pub const NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];
/// API versions accepted for `security.istio.io` kinds.
pub const SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1beta1", "security.istio.io/v1"];
/// API versions of the Gateway API's experimental kinds (TCPRoute,
/// TLSRoute), accepted for those kinds only.
pub const GATEWAY_API_EXPERIMENTAL_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1alpha2",
    "gateway.networking.k8s.io/v1alpha3",
];
/// API versions accepted for Gateway API kinds.
pub const GATEWAY_API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1",
];
