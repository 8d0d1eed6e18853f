//! `networking.istio.io`: VirtualService, DestinationRule, Gateway,
//! ServiceEntry (API versions v1alpha3, v1beta1 and v1 share one schema).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{IstioDuration, WorkloadSelector};

/// A string match: exactly one of `exact`, `prefix`, `regex` (none at all
/// means "present" where Istio allows it, e.g. header matches).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    /// Exact value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2 regular expression, matched against the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to (short names, FQDNs, `*` wildcards).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (`mesh` for sidecars/waypoints) the routes apply to.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TCP routes.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// TLS (SNI) routes.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    /// Namespaces the resource is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// One HTTP route.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Route name (for logs).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions; any one matching selects the route. None: always.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Redirect instead of routing.
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    /// Rewrite before forwarding.
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// Overall request timeout.
    #[serde(default)]
    pub timeout: Option<IstioDuration>,
    /// Retry policy.
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<HttpFault>,
    /// Mirror destination (single).
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Share of requests mirrored.
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Mirror destinations (several).
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// CORS policy.
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    /// Header edits for every destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// Match conditions of an HTTP route (all must hold).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Name of the match (for logs).
    #[serde(default)]
    pub name: Option<String>,
    /// Path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Scheme.
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Host / :authority.
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Headers that must match.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must not match (or be absent).
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Query parameters.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels of the calling workload.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace of the calling workload.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Gateways this match applies to.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Case-insensitive URI matching.
    #[serde(default)]
    pub ignore_uri_case: Option<bool>,
}

/// A destination with its weight.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where.
    pub destination: Destination,
    /// Share of traffic (percent); defaults to all when alone.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Header edits for this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// A service (and subset, port) traffic goes to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Service host name (short names resolve in the resource's namespace).
    #[serde(default)]
    pub host: String,
    /// Subset defined by a DestinationRule.
    #[serde(default)]
    pub subset: Option<String>,
    /// Port, when the service has several.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// A port number.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    /// The number.
    #[serde(default)]
    pub number: Option<u32>,
}

/// Request and response header edits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    /// Edits of the request.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// Edits of the response.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    /// Overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// An HTTP redirect.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// New path.
    #[serde(default)]
    pub uri: Option<String>,
    /// New host.
    #[serde(default)]
    pub authority: Option<String>,
    /// New port.
    #[serde(default)]
    pub port: Option<u32>,
    /// New scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Status code (default 301).
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// A rewrite before forwarding.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the matched path prefix (or the whole path).
    #[serde(default)]
    pub uri: Option<String>,
    /// New host.
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Regex-based path rewrite.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    /// Pattern.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// Replacement (`\1` style groups).
    #[serde(default)]
    pub rewrite: String,
}

/// Retry policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Attempts after the first.
    #[serde(default)]
    pub attempts: Option<i64>,
    /// Timeout per attempt.
    #[serde(default)]
    pub per_try_timeout: Option<IstioDuration>,
    /// Conditions (`5xx,connect-failure,...`).
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Retry in other localities.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

/// A percentage, 0 to 100.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Percent {
    /// The value.
    #[serde(default)]
    pub value: f64,
}

/// Fault injection.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    /// Added latency.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Early answers.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// Injected latency.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long.
    #[serde(default)]
    pub fixed_delay: Option<IstioDuration>,
    /// Share of requests.
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Share of requests (deprecated integer form).
    #[serde(default)]
    pub percent: Option<i64>,
}

/// Injected errors.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status to answer with.
    #[serde(default)]
    pub http_status: Option<i64>,
    /// gRPC status to answer with, by name (`UNAVAILABLE`).
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Share of requests.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// gRPC's status names and their codes, as `grpcStatus` spells them.
const GRPC_STATUS_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The code of gRPC status `name` (`UNAVAILABLE` is 14), if it is one.
pub fn grpc_status_code(name: &str) -> Option<u32> {
    GRPC_STATUS_CODES
        .iter()
        .position(|known| *known == name)
        .map(|code| code as u32)
}

/// One mirror target.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    /// Where.
    pub destination: Destination,
    /// Share of requests.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// CORS.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Allowed headers.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Exposed headers.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Preflight cache time.
    #[serde(default)]
    pub max_age: Option<IstioDuration>,
    /// Credentials allowed.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

/// A TCP route.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Conditions.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// A TLS (SNI) route.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsRoute {
    /// Conditions.
    #[serde(default, rename = "match")]
    pub matches: Vec<TlsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// L4 conditions.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// Destination CIDRs.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels of the calling workload.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Namespace of the calling workload.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// TLS conditions.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatch {
    /// SNI names.
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    /// Destination CIDRs.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels of the calling workload.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
}

/// A weighted destination of a TCP or TLS route.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    /// Where.
    pub destination: Destination,
    /// Share of traffic.
    #[serde(default)]
    pub weight: Option<i64>,
}

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service.
    #[serde(default)]
    pub host: String,
    /// Policy for all of it.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets by labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Visibility.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Workloads the rule applies to (sidecar mode).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

/// A subset.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Its name, referenced by routes.
    #[serde(default)]
    pub name: String,
    /// Endpoint labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides for this subset.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS to the upstream.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// Per-port traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The port.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// Load balancing.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// A simple algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Consistent hashing.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Locality settings (kept as given).
    #[serde(default)]
    pub locality_lb_setting: Option<serde_json::Value>,
    /// Slow start.
    #[serde(default)]
    pub warmup_duration_secs: Option<IstioDuration>,
}

/// Simple load-balancing algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Default.
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    /// Random.
    Random,
    /// To the original destination.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Fewest outstanding requests of two random picks.
    LeastRequest,
}

/// Consistent hashing: exactly one key.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// By header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// By cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// By client IP.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// By query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// A hashing cookie.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    /// Cookie name.
    #[serde(default)]
    pub name: String,
    /// Path.
    #[serde(default)]
    pub path: Option<String>,
    /// Lifetime (generated when absent).
    #[serde(default)]
    pub ttl: Option<IstioDuration>,
}

/// Connection pool limits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpPool>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpPool>,
}

/// TCP limits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Most connections.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<IstioDuration>,
    /// Longest connection lifetime.
    #[serde(default)]
    pub max_connection_duration: Option<IstioDuration>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<IstioDuration>,
}

/// HTTP limits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Most queued requests.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    /// Most concurrent requests.
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    /// Requests per connection.
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    /// Concurrent retries.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<IstioDuration>,
    /// HTTP/2 upgrade policy.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Use the client's protocol upstream.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Most concurrent streams per connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

/// Outlier detection.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated: consecutive 5xx.
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    /// Consecutive 5xx before ejection.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    /// Consecutive 502/503/504 before ejection.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<i64>,
    /// Consecutive local-origin failures.
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<i64>,
    /// Tell local from remote failures.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Analysis interval.
    #[serde(default)]
    pub interval: Option<IstioDuration>,
    /// Base ejection time.
    #[serde(default)]
    pub base_ejection_time: Option<IstioDuration>,
    /// Largest share ejected.
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    /// Panic threshold.
    #[serde(default)]
    pub min_health_percent: Option<i64>,
}

/// TLS to the upstream.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    /// Mode.
    #[serde(default)]
    pub mode: Option<ClientTlsMode>,
    /// Client certificate file.
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// Client key file.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA file.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Secret holding the above.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Accepted SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// SNI.
    #[serde(default)]
    pub sni: Option<String>,
    /// Skip verification.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

/// Upstream TLS modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    /// Plaintext.
    Disable,
    /// TLS.
    Simple,
    /// Mutual TLS with given certificates.
    Mutual,
    /// The mesh's mutual TLS.
    IstioMutual,
}

/// `networking.istio.io` `Gateway.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Gateway workloads, by labels.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Listeners.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// A gateway listener.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    /// Port.
    #[serde(default)]
    pub port: Option<ServerPort>,
    /// Bind address.
    #[serde(default)]
    pub bind: Option<String>,
    /// Hosts served (`ns/host` or `host`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A gateway port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerPort {
    /// Number.
    #[serde(default)]
    pub number: u32,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// HTTP, HTTPS, GRPC, HTTP2, TCP, TLS, MONGO...
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port on the gateway workload.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// Gateway TLS.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTls {
    /// Redirect HTTP to HTTPS.
    #[serde(default)]
    pub https_redirect: Option<bool>,
    /// Mode.
    #[serde(default)]
    pub mode: Option<ServerTlsMode>,
    /// Certificate file.
    #[serde(default)]
    pub server_certificate: Option<String>,
    /// Key file.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA file (MUTUAL).
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Secret holding the above.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Accepted client SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Lowest TLS version.
    #[serde(default)]
    pub min_protocol_version: Option<String>,
    /// Highest TLS version.
    #[serde(default)]
    pub max_protocol_version: Option<String>,
}

/// Gateway TLS modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// Pass TLS through by SNI.
    Passthrough,
    /// Terminate TLS.
    Simple,
    /// Terminate with client certificates.
    Mutual,
    /// SNI-routed pass-through without VirtualServices.
    AutoPassthrough,
    /// The mesh's mutual TLS.
    IstioMutual,
    /// Client certificates optional.
    OptionalMutual,
}

/// `ServiceEntry.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Host names.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// VIPs or CIDRs.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    /// Inside or outside the mesh.
    #[serde(default)]
    pub location: Option<Location>,
    /// How endpoints are found.
    #[serde(default)]
    pub resolution: Option<Resolution>,
    /// Static endpoints.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    /// Workloads as endpoints.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Visibility.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Accepted SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// A ServiceEntry port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    /// Number.
    #[serde(default)]
    pub number: u32,
    /// Protocol.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Endpoint port.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// Where a ServiceEntry's service lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh.
    MeshExternal,
    /// Inside the mesh.
    MeshInternal,
}

/// How a ServiceEntry's endpoints are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// The destination as dialled.
    None,
    /// The listed endpoints.
    Static,
    /// DNS, all addresses.
    Dns,
    /// DNS, one address at a time.
    DnsRoundRobin,
}

/// A static endpoint.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    /// IP or host name.
    #[serde(default)]
    pub address: String,
    /// Port name to number.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network.
    #[serde(default)]
    pub network: Option<String>,
    /// Locality.
    #[serde(default)]
    pub locality: Option<String>,
    /// Load-balancing weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Identity.
    #[serde(default)]
    pub service_account: Option<String>,
}
