//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io`), as Istio's ambient
//! mode uses it: routes attached to a Service (`parentRefs` of kind
//! `Service`, the GAMMA pattern) are applied by the waypoint serving it.
//! Field names and meanings are the Gateway API's.

use serde::{Deserialize, Serialize};

use super::IstioDuration;

/// `HTTPRoute.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// What the route attaches to: Services (or Gateways).
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (for Gateway parents; Service parents ignore them).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, in order; the first whose match holds wins.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent of a route.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group: `""` (core) for a Service, `gateway.networking.k8s.io`
    /// for a Gateway.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` or `Gateway` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port of the parent the route applies to (default: every port).
    #[serde(default)]
    pub port: Option<u32>,
    /// Listener of a Gateway parent.
    #[serde(default)]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether it names a Gateway (kind `Gateway`, the default, of the
    /// Gateway API group, the default).
    pub fn is_gateway(&self) -> bool {
        self.kind.as_deref().is_none_or(|k| k == "Gateway")
            && self
                .group
                .as_deref()
                .is_none_or(|g| g == "gateway.networking.k8s.io")
    }

    /// Whether it names a Service (core group, kind `Service`).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && self
                .group
                .as_deref()
                .is_none_or(|g| g.is_empty() || g == "core")
    }
}

/// One rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Name of the rule (Gateway API v1.2+).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions, any of which selects the rule (none: every request).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Request processing before forwarding.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Time limits.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// Conditions that all hold for a match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// The path (default: prefix `/`).
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Headers.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<PathMatchType>,
    /// The path or pattern (default `/`).
    #[serde(default)]
    pub value: Option<String>,
}

/// How a path is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// Whole leading path segments: `/a` matches `/a` and `/a/b`, not `/ab`.
    PathPrefix,
    /// A regular expression over the whole path.
    RegularExpression,
}

/// A header or query parameter condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<ValueMatchType>,
    /// Header or parameter name.
    pub name: String,
    /// Value or pattern.
    pub value: String,
}

/// How a header or query value is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchType {
    /// The whole value.
    Exact,
    /// A regular expression over the whole value.
    RegularExpression,
}

/// A filter of a rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`,
    /// `URLRewrite`, `RequestMirror`, `ExtensionRef`, `CORS`.
    #[serde(rename = "type")]
    pub type_: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replaced (or added).
    #[serde(default)]
    pub set: Vec<NameValue>,
    /// Appended.
    #[serde(default)]
    pub add: Vec<NameValue>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct NameValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A redirect answered instead of forwarding.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host of the `Location`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path of the `Location`.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port of the `Location`.
    #[serde(default)]
    pub port: Option<u32>,
    /// 301 or 302 (the default).
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// A rewrite of the forwarded request.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    /// New `Host`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// A path replacement.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// How a path is replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathModifierType {
    /// The whole path.
    #[default]
    ReplaceFullPath,
    /// The part a `PathPrefix` match matched.
    ReplacePrefixMatch,
}

/// A copy of each request sent to another backend.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where.
    pub backend_ref: BackendObjectRef,
    /// Share of requests mirrored, in percent (default 100).
    #[serde(default)]
    pub percent: Option<u32>,
}

/// A weighted backend.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// The Service.
    #[serde(flatten)]
    pub backend: BackendObjectRef,
    /// Relative weight (default 1).
    #[serde(default)]
    pub weight: Option<i64>,
    /// Filters for this backend only.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

/// A Service a route sends to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectRef {
    /// API group (`""` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// Time limits of a rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default)]
    pub request: Option<IstioDuration>,
    /// Each try to a backend.
    #[serde(default)]
    pub backend_request: Option<IstioDuration>,
}

/// `GRPCRoute.spec`: routes of gRPC calls, by service and method.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// What the route attaches to: Services (or Gateways).
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (for Gateway parents; Service parents ignore them).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, in order.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Name of the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions, any of which selects the rule (none: every call).
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Request processing before forwarding (header modifiers, mirror).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// Conditions that all hold for a GRPCRoute match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// The called service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Request metadata (headers).
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
}

/// A GRPCRoute method condition: the request path is `/<service>/<method>`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<ValueMatchType>,
    /// Fully qualified service, e.g. `lab.v1.Lab` (absent: any).
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `Unary` (absent: any).
    #[serde(default)]
    pub method: Option<String>,
}

/// `ReferenceGrant.spec`: which resources of other namespaces may refer to
/// resources of this one (a route's backend, a Gateway's certificate).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantSpec {
    /// The referrers trusted: kinds in other namespaces.
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    /// What they may refer to in this namespace.
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// A trusted referrer: every resource of one kind in one namespace.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantFrom {
    /// API group (required; `""` is the core group).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind, such as `HTTPRoute` or `Gateway`.
    #[serde(default)]
    pub kind: String,
    /// The referrers' namespace.
    #[serde(default)]
    pub namespace: String,
}

/// What may be referred to: one kind, optionally one name.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantTo {
    /// API group (required; `""` is the core group).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind, such as `Service` or `Secret`.
    #[serde(default)]
    pub kind: String,
    /// Only this resource (default: every resource of the kind).
    #[serde(default)]
    pub name: Option<String>,
}

/// `TCPRoute.spec` (Gateway API experimental channel): connections on a
/// Gateway's `TCP` listener, relayed to weighted backends.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    /// The Gateways (and listeners) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Rules: exactly one here (TCP has nothing to match on).
    #[serde(default)]
    pub rules: Vec<L4RouteRule>,
}

/// `TLSRoute.spec`: TLS connections on a Gateway's `TLS` listener in
/// `Passthrough` mode, chosen by SNI and relayed unterminated.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRouteSpec {
    /// The Gateways (and listeners) the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// SNI host names served (default: the listener's).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules: exactly one here.
    #[serde(default)]
    pub rules: Vec<L4RouteRule>,
}

/// A rule of a TCPRoute or TLSRoute: where connections go.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4RouteRule {
    /// Name of the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A weighted backend without filters (TCPRoute, TLSRoute).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// The Service.
    #[serde(flatten)]
    pub backend: BackendObjectRef,
    /// Relative weight (default 1).
    #[serde(default)]
    pub weight: Option<i64>,
}
