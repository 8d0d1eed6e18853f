//! Waypoints: which services each waypoint serves, and the Envoy v3 resources
//! (LDS, RDS, CDS, EDS) that tell it how, computed from VirtualServices,
//! DestinationRules and Services.
//!
//! - A waypoint is a Gateway API `Gateway` of class `istio-waypoint`, reached
//!   through the Service of the same name (port 15008).
//! - A Service uses it when labelled `istio.io/use-waypoint=<gateway>` (or its
//!   namespace is; `none` opts a service out), optionally with
//!   `istio.io/use-waypoint-namespace`.
//! - Each waypoint gets one Listener (`waypoint~<ns>~<name>`) with a filter
//!   chain per bound service port, matched on the service VIP and port the
//!   HBONE `CONNECT` names. HTTP ports use an HTTP connection manager whose
//!   routes come over RDS (`inbound-vip|<port>|http|<host>`); other ports a
//!   TCP proxy. Listener and routes are scoped to their waypoint: no other
//!   proxy is sent them.
//! - Clusters are Istio's `outbound|<port>|<subset>|<host>` (EDS), with the
//!   DestinationRule's load balancer, connection pool and outlier detection;
//!   endpoints carry the workload's SPIFFE identity in
//!   `metadata.filter_metadata["istio"]["identity"]` when reached over HBONE.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    net::IpAddr,
    time::Duration,
};

use mesh_api::envoy::{
    envoy::{
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier,
                circuit_breakers::Thresholds,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                Address as EnvoyAddress, AggregatedConfigSource, CidrRange, ConfigSource,
                HeaderValue, HeaderValueOption, HealthStatus, Http1ProtocolOptions,
                Http2ProtocolOptions, HttpProtocolOptions as HttpCommonOptions, Metadata,
                RuntimeFractionalPercent, SocketAddress, address, config_source,
                header_value_option::HeaderAppendAction, socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
            },
            listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter},
            route::v3::{
                CorsPolicy as EnvoyCors, HeaderMatcher, QueryParameterMatcher, RedirectAction,
                RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
                WeightedCluster, header_matcher, query_parameter_matcher, redirect_action, route,
                route_action, route_match, weighted_cluster,
            },
        },
        extensions::filters::{
            common::fault::v3::{FaultDelay, fault_delay},
            http::fault::v3::{FaultAbort, HttpFault, fault_abort},
            network::{
                http_connection_manager::v3::{
                    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
                },
                tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
        },
        extensions::upstreams::http::v3::{self as upstream_http, HttpProtocolOptions},
        r#type::{
            matcher::v3::{
                AddressMatcher, FilterStateMatcher, RegexMatcher, StringMatcher,
                filter_state_matcher, string_matcher,
            },
            v3::{FractionalPercent, fractional_percent},
        },
    },
    google::protobuf::{
        Any, BoolValue, Duration as ProtoDuration, Struct, UInt32Value, Value, value,
    },
};
use mesh_config::{
    Manifests,
    istio::{
        DestinationRule, VirtualService,
        networking::{
            self as net, ConnectionPool, HttpRoute, LoadBalancer, OutlierDetection, SimpleLb,
            TrafficPolicy,
        },
    },
    validate::fqdn,
};
use prost::{Message, Name};

use crate::rbac::{
    self, HTTP_RBAC_FILTER, Layer, NETWORK_RBAC_FILTER, RbacFilter, WaypointPolicies,
};

/// Gateway class of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Service or namespace label naming the waypoint to use.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Namespace of the waypoint named by [`USE_WAYPOINT_LABEL`], when not the
/// service's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Port a waypoint accepts HBONE on.
pub const WAYPOINT_HBONE_PORT: u32 = 15008;
/// The fault filter's name (key of `typed_per_filter_config`).
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// The router filter's name.
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// The HTTP connection manager's name.
pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// The TCP proxy's name.
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
/// Filter metadata namespace of endpoint identities.
pub const ISTIO_METADATA: &str = "istio";
/// Key of a cluster's upstream HTTP options in `typed_extension_protocol_options`.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Node metadata key a waypoint announces itself with (`<ns>/<name>`).
pub const NODE_METADATA_WAYPOINT: &str = "WAYPOINT";

/// Istio's default retry policy: 2 retries on connection failures and 503.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service as the waypoint translation needs it.
#[derive(Clone, Debug)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `<name>.<namespace>.svc.<domain>`.
    pub hostname: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// `(port, speaks HTTP)`.
    pub ports: Vec<(u32, Protocol)>,
    /// The service's labels.
    pub labels: BTreeMap<String, String>,
}

/// How a waypoint handles a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (and h2c upgrades).
    Http1,
    /// HTTP/2 or gRPC end to end.
    Http2,
    /// Opaque TCP.
    Tcp,
}

/// One workload serving a service port.
#[derive(Clone, Debug, Hash)]
pub struct EndpointRef {
    /// Workload uid.
    pub uid: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Service port to target port.
    pub ports: Vec<(u32, u32)>,
    /// Pod labels (for subsets).
    pub labels: BTreeMap<String, String>,
    /// SPIFFE identity when reached over HBONE.
    pub identity: Option<String>,
    /// Ready.
    pub healthy: bool,
}

/// A waypoint (Gateway of class `istio-waypoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointRef {
    /// Namespace.
    pub namespace: String,
    /// Gateway name.
    pub name: String,
    /// Its Service's host name.
    pub hostname: String,
}

impl WaypointRef {
    /// `<namespace>/<name>`: the scope of its listener and routes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Envoy resources for waypoints.
#[derive(Clone, Debug, Default)]
pub struct EnvoyResources {
    /// Listener name to (waypoint key, listener).
    pub listeners: BTreeMap<String, (String, Listener)>,
    /// Route configuration name to (waypoint key, routes).
    pub routes: BTreeMap<String, (String, RouteConfiguration)>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// Endpoints by cluster name, with a content hash (the message holds
    /// maps, whose encoding order is not stable).
    pub endpoints: BTreeMap<String, (u64, ClusterLoadAssignment)>,
}

/// The waypoints of `manifests` by key, those whose Service exists.
pub fn waypoints(manifests: &Manifests, services: &[ServiceRef]) -> BTreeMap<String, WaypointRef> {
    manifests
        .kube_gateways
        .iter()
        .filter(|gw| gw.spec.gateway_class_name == WAYPOINT_CLASS)
        .filter_map(|gw| {
            let namespace = gw
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| mesh_config::DEFAULT_NAMESPACE.to_owned());
            let name = gw.metadata.name.clone()?;
            let svc = services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name)?;
            let waypoint = WaypointRef {
                hostname: svc.hostname.clone(),
                namespace,
                name,
            };
            Some((waypoint.key(), waypoint))
        })
        .collect()
}

/// The waypoint key `service` is bound to by its labels or its namespace's,
/// if any (`none` opts out).
pub fn binding(
    service: &ServiceRef,
    namespace_labels: &BTreeMap<String, String>,
) -> Option<String> {
    let (labels, name) = match service.labels.get(USE_WAYPOINT_LABEL) {
        Some(name) => (&service.labels, name),
        None => (namespace_labels, namespace_labels.get(USE_WAYPOINT_LABEL)?),
    };
    if name == "none" || name.is_empty() {
        return None;
    }
    let namespace = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .unwrap_or(&service.namespace);
    Some(format!("{namespace}/{name}"))
}

/// Builds every waypoint's resources. `bound` maps service keys
/// (`namespace/hostname`) to their waypoint key; `endpoints` maps service
/// keys to their workloads. What cannot be expressed is added to `warnings`.
pub fn build(
    manifests: &Manifests,
    services: &[ServiceRef],
    waypoints: &BTreeMap<String, WaypointRef>,
    bound: &BTreeMap<String, String>,
    endpoints: &HashMap<String, Vec<EndpointRef>>,
    policies: &WaypointPolicies<'_>,
    warnings: &mut Vec<String>,
) -> EnvoyResources {
    let mut out = EnvoyResources::default();
    // Clusters serve waypoints and ingress gateways; without either there
    // is nobody to send them to.
    if bound.is_empty() && manifests.istio_gateways.is_empty() {
        return out;
    }
    let rules = DestinationRules::new(&manifests.destination_rules);
    let by_host: HashMap<&str, &ServiceRef> =
        services.iter().map(|s| (s.hostname.as_str(), s)).collect();
    let sources = SourcePods::new(manifests);

    for svc in services {
        let key = format!("{}/{}", svc.namespace, svc.hostname);
        let empty = Vec::new();
        let workloads = endpoints.get(&key).unwrap_or(&empty);
        let rule = rules.for_host(&svc.hostname);
        let mut subsets: Vec<Option<&net::Subset>> = vec![None];
        subsets.extend(rule.iter().flat_map(|r| r.spec.subsets.iter().map(Some)));
        for &(port, protocol) in &svc.ports {
            for subset in &subsets {
                let name =
                    cluster_name(port, subset.map_or("", |s| s.name.as_str()), &svc.hostname);
                let policy = rule.map(|r| effective_policy(&r.spec, *subset, port));
                out.clusters
                    .insert(name.clone(), cluster(&name, protocol, policy.as_ref()));
                let selected = workloads.iter().filter(|w| {
                    subset.is_none_or(|s| s.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                });
                out.endpoints
                    .insert(name.clone(), load_assignment(&name, port, selected));
            }
        }
    }

    let mut listeners: BTreeMap<String, Vec<FilterChain>> = BTreeMap::new();
    for svc in services {
        let service_key = format!("{}/{}", svc.namespace, svc.hostname);
        let Some((waypoint, waypoint_ref)) = bound
            .get(&service_key)
            .and_then(|key| Some((key, waypoints.get(key)?)))
        else {
            continue;
        };
        let virtual_services: Vec<&VirtualService> = manifests
            .virtual_services
            .iter()
            .filter(|vs| applies_to(vs, &svc.hostname))
            .collect();
        for &(port, protocol) in &svc.ports {
            let chain_name = route_name(port, &svc.hostname);
            let layer = if protocol == Protocol::Tcp {
                Layer::Tcp
            } else {
                Layer::Http
            };
            let authz = policies.filters(waypoint_ref, svc, layer, warnings);
            let filters = if protocol == Protocol::Tcp {
                let mut filters: Vec<Filter> = authz
                    .iter()
                    .map(|f| Filter {
                        name: NETWORK_RBAC_FILTER.to_owned(),
                        config_type: Some(filter::ConfigType::TypedConfig(rbac::typed_config(
                            f,
                            Layer::Tcp,
                            &chain_name,
                        ))),
                    })
                    .collect();
                filters.push(tcp_filter(svc, port, &virtual_services, warnings));
                filters
            } else {
                let mut routes =
                    http_routes(svc, port, &virtual_services, &by_host, &sources, warnings);
                add_hash_policies(&mut routes, &rules, warnings);
                out.routes.insert(
                    chain_name.clone(),
                    (
                        waypoint.clone(),
                        RouteConfiguration {
                            name: chain_name.clone(),
                            virtual_hosts: vec![VirtualHost {
                                name: format!("{}:{port}", svc.hostname),
                                domains: vec!["*".to_owned()],
                                routes,
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    ),
                );
                vec![hcm_filter(&chain_name, &authz)]
            };
            listeners
                .entry(waypoint.clone())
                .or_default()
                .push(FilterChain {
                    name: chain_name,
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: Some(UInt32Value { value: port }),
                        prefix_ranges: svc
                            .vips
                            .iter()
                            .map(|ip| CidrRange {
                                address_prefix: ip.to_string(),
                                prefix_len: Some(UInt32Value {
                                    value: if ip.is_ipv4() { 32 } else { 128 },
                                }),
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    filters,
                    ..Default::default()
                });
        }
    }
    for (waypoint, filter_chains) in listeners {
        let name = listener_name(&waypoint);
        out.listeners.insert(
            name.clone(),
            (
                waypoint,
                Listener {
                    name,
                    address: Some(socket_address(
                        "0.0.0.0".parse().expect("literal"),
                        WAYPOINT_HBONE_PORT,
                    )),
                    filter_chains,
                    ..Default::default()
                },
            ),
        );
    }
    out
}

/// `waypoint~<namespace>~<name>` for waypoint key `<namespace>/<name>`.
pub fn listener_name(waypoint_key: &str) -> String {
    format!("waypoint~{}", waypoint_key.replace('/', "~"))
}

/// Istio's cluster name: `outbound|<port>|<subset>|<host>`.
pub fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The route configuration of a service port at its waypoint.
pub fn route_name(port: u32, host: &str) -> String {
    format!("inbound-vip|{port}|http|{host}")
}

/// Whether `vs` routes mesh traffic for `hostname`.
fn applies_to(vs: &VirtualService, hostname: &str) -> bool {
    let namespace = vs
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(mesh_config::DEFAULT_NAMESPACE);
    let mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
    mesh && vs
        .spec
        .hosts
        .iter()
        .any(|h| host_matches(&fqdn(h, namespace), hostname))
}

/// Istio host matching: exact, or a `*.suffix` wildcard.
pub(crate) fn host_matches(pattern: &str, hostname: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => hostname.ends_with(suffix),
        None => pattern == hostname,
    }
}

fn vs_namespace(vs: &VirtualService) -> &str {
    vs.metadata
        .namespace
        .as_deref()
        .unwrap_or(mesh_config::DEFAULT_NAMESPACE)
}

pub(crate) fn hcm_filter(route_config: &str, authz: &[RbacFilter]) -> Filter {
    let mut http_filters: Vec<HttpFilter> = authz
        .iter()
        .map(|f| HttpFilter {
            name: HTTP_RBAC_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(rbac::typed_config(
                f,
                Layer::Http,
                route_config,
            ))),
            ..Default::default()
        })
        .collect();
    let fault = HttpFilter {
        name: FAULT_FILTER.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            &HttpFault::default(),
        ))),
        ..Default::default()
    };
    let router = HttpFilter {
        name: ROUTER_FILTER.to_owned(),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: route_config.to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            route_config_name: route_config.to_owned(),
            config_source: Some(ads()),
        })),
        http_filters: {
            http_filters.extend([fault, router]);
            http_filters
        },
        ..Default::default()
    };
    Filter {
        name: HCM_FILTER.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
    }
}

fn tcp_filter(
    svc: &ServiceRef,
    port: u32,
    virtual_services: &[&VirtualService],
    warnings: &mut Vec<String>,
) -> Filter {
    let route = virtual_services.iter().find_map(|vs| {
        vs.spec
            .tcp
            .iter()
            .find(|r| {
                r.matches.is_empty() || r.matches.iter().any(|m| m.port.is_none_or(|p| p == port))
            })
            .map(|r| (vs_namespace(vs), r))
    });
    let cluster = match route {
        None => tcp_proxy::ClusterSpecifier::Cluster(cluster_name(port, "", &svc.hostname)),
        Some((namespace, route)) => {
            if route
                .matches
                .iter()
                .any(|m| !m.source_labels.is_empty() || m.source_namespace.is_some())
            {
                warnings.push(format!(
                    "VirtualService for {}: tcp sourceLabels/sourceNamespace are not supported at a waypoint; matching on port only",
                    svc.hostname
                ));
            }
            return tcp_route_filter(
                &route_name(port, &svc.hostname),
                &route.route,
                namespace,
                port,
            );
        }
    };
    tcp_proxy(&route_name(port, &svc.hostname), cluster)
}

/// A TCP proxy filter to the weighted destinations of a VirtualService
/// `tcp` or `tls` route written in `namespace` (on `port` unless they say).
pub(crate) fn tcp_route_filter(
    stat_prefix: &str,
    destinations: &[net::RouteDestination],
    namespace: &str,
    port: u32,
) -> Filter {
    let clusters: Vec<(String, u32)> = destinations
        .iter()
        .map(|d| {
            (
                destination_cluster(&d.destination, namespace, port),
                d.weight.map_or(100, |w| w.max(0) as u32),
            )
        })
        .collect();
    tcp_proxy_filter(stat_prefix, &clusters)
}

/// A TCP proxy filter to `clusters` (`(name, weight)`): one cluster, or
/// weighted ones.
fn tcp_proxy_filter(stat_prefix: &str, clusters: &[(String, u32)]) -> Filter {
    let cluster = match clusters {
        [(one, _)] => tcp_proxy::ClusterSpecifier::Cluster(one.clone()),
        _ => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: clusters
                .iter()
                .map(
                    |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                        name: name.clone(),
                        weight: *weight,
                        ..Default::default()
                    },
                )
                .collect(),
        }),
    };
    tcp_proxy(stat_prefix, cluster)
}

fn tcp_proxy(stat_prefix: &str, cluster: tcp_proxy::ClusterSpecifier) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_owned(),
        cluster_specifier: Some(cluster),
        ..Default::default()
    };
    Filter {
        name: TCP_PROXY_FILTER.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&proxy))),
    }
}

/// The cluster a VirtualService destination names, on `port` unless it says.
fn destination_cluster(destination: &net::Destination, namespace: &str, port: u32) -> String {
    let port = destination
        .port
        .as_ref()
        .and_then(|p| p.number)
        .unwrap_or(port);
    cluster_name(
        port,
        destination.subset.as_deref().unwrap_or(""),
        &fqdn(&destination.host, namespace),
    )
}

fn http_routes(
    svc: &ServiceRef,
    port: u32,
    virtual_services: &[&VirtualService],
    services: &HashMap<&str, &ServiceRef>,
    sources: &SourcePods<'_>,
    warnings: &mut Vec<String>,
) -> Vec<Route> {
    let mut routes = Vec::new();
    for vs in virtual_services {
        routes.extend(vs_routes(
            vs,
            port,
            |g| g == "mesh",
            services,
            Some(sources),
            warnings,
        ));
    }
    if virtual_services.is_empty() {
        routes.push(Route {
            name: "default".to_owned(),
            r#match: Some(prefix_match("/")),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster_name(
                    port,
                    "",
                    &svc.hostname,
                ))),
                retry_policy: Some(default_retry()),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    routes
}

/// Gives each route the hash policy of its destinations' DestinationRule
/// `consistentHash` (Envoy hashes per route, Istio configures per
/// destination): when every destination agrees; otherwise none, with a
/// warning, as Istio does.
pub(crate) fn add_hash_policies(
    routes: &mut [Route],
    rules: &DestinationRules<'_>,
    warnings: &mut Vec<String>,
) {
    for route in routes {
        let Some(route::Action::Route(action)) = &mut route.action else {
            continue;
        };
        let clusters: Vec<&str> = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => vec![c.as_str()],
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                w.clusters.iter().map(|c| c.name.as_str()).collect()
            }
            _ => continue,
        };
        let hashes: Vec<Option<net::ConsistentHash>> = clusters
            .iter()
            .map(|cluster| {
                let mut fields = cluster.splitn(4, '|').skip(1);
                let (Some(port), Some(subset), Some(host)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    return None;
                };
                let rule = rules.for_host(host)?;
                let subset = rule.spec.subsets.iter().find(|s| s.name == subset);
                effective_policy(&rule.spec, subset, port.parse().ok()?)
                    .load_balancer?
                    .consistent_hash
            })
            .collect();
        let Some(first) = hashes.first().cloned().flatten() else {
            continue;
        };
        if hashes.iter().any(|h| h.as_ref() != Some(&first)) {
            warnings.push(format!(
                "route {}: its destinations use different consistentHash settings; requests are not hashed",
                route.name
            ));
            continue;
        }
        action.hash_policy = hash_policy(&first);
    }
}

/// Envoy's hash policy for a DestinationRule `consistentHash`.
fn hash_policy(hash: &net::ConsistentHash) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    let specifier = if let Some(name) = &hash.http_header_name {
        PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        })
    } else if let Some(cookie) = &hash.http_cookie {
        PolicySpecifier::Cookie(Cookie {
            name: cookie.name.clone(),
            ttl: cookie.ttl.map(|d| proto_duration(d.0)),
            path: cookie.path.clone().unwrap_or_default(),
            ..Default::default()
        })
    } else if let Some(name) = &hash.http_query_parameter_name {
        PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
    } else if hash.use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    }]
}

/// The mesh's pods as a VirtualService's `sourceLabels` select them: the
/// client workloads a waypoint's route may be limited to.
pub(crate) struct SourcePods<'a> {
    pods: Vec<(&'a str, &'a BTreeMap<String, String>, IpAddr)>,
}

impl<'a> SourcePods<'a> {
    /// Every running pod with an IP.
    pub(crate) fn new(manifests: &'a Manifests) -> Self {
        let pods = manifests
            .pods
            .iter()
            .filter_map(|pod| {
                let status = pod.status.as_ref()?;
                if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return None;
                }
                let ip = status.pod_ip.as_deref()?.parse().ok()?;
                Some((pod.namespace(), &pod.metadata.labels, ip))
            })
            .collect();
        Self { pods }
    }

    /// The addresses of the pods carrying every one of `labels`, in
    /// `namespace` when given.
    fn addresses(&self, labels: &BTreeMap<String, String>, namespace: Option<&str>) -> Vec<IpAddr> {
        self.pods
            .iter()
            .filter(|(ns, pod_labels, _)| {
                namespace.is_none_or(|n| n == *ns)
                    && labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
            })
            .map(|(_, _, ip)| *ip)
            .collect()
    }
}

/// Filter-state matches (the waypoint's keys) for a match's
/// `sourceNamespace` (the caller's SPIFFE identity) and `sourceLabels` (the
/// addresses of the pods they select, so pods added or removed later change
/// the route with the next push).
fn source_matches(m: &net::HttpMatchRequest, sources: &SourcePods<'_>) -> Vec<FilterStateMatcher> {
    let mut out = Vec::new();
    if let Some(namespace) = &m.source_namespace {
        out.push(FilterStateMatcher {
            key: mesh_api::filter_state::PEER_PRINCIPAL.to_owned(),
            matcher: Some(filter_state_matcher::Matcher::StringMatch(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                    regex: format!("spiffe://[^/]+/ns/{}/sa/[^/]+", regex::escape(namespace)),
                    ..Default::default()
                })),
                ignore_case: false,
            })),
        });
    }
    if !m.source_labels.is_empty() {
        let ranges = sources
            .addresses(&m.source_labels, m.source_namespace.as_deref())
            .into_iter()
            .map(|ip| mesh_api::envoy::xds::core::v3::CidrRange {
                address_prefix: ip.to_string(),
                prefix_len: Some(UInt32Value {
                    value: if ip.is_ipv4() { 32 } else { 128 },
                }),
            })
            .collect();
        // No pod selected: no range, so the route matches nobody (yet).
        out.push(FilterStateMatcher {
            key: mesh_api::filter_state::SOURCE_ADDRESS.to_owned(),
            matcher: Some(filter_state_matcher::Matcher::AddressMatch(
                AddressMatcher {
                    ranges,
                    invert_match: false,
                },
            )),
        });
    }
    out
}

/// The Envoy routes of `vs`'s `http` section on `port`, one per match, in
/// order; a match whose `gateways` are given must name one `gateway`
/// accepts (written as in the VirtualService). With `sources` (at a
/// waypoint), `sourceLabels` and `sourceNamespace` become matches on the
/// caller; without (at a gateway, whose clients are outside the mesh), a
/// match using them is skipped with a warning.
pub(crate) fn vs_routes(
    vs: &VirtualService,
    port: u32,
    gateway: impl Fn(&str) -> bool,
    services: &HashMap<&str, &ServiceRef>,
    sources: Option<&SourcePods<'_>>,
    warnings: &mut Vec<String>,
) -> Vec<Route> {
    let namespace = vs_namespace(vs);
    let vs_name = vs.metadata.name.as_deref().unwrap_or_default();
    let mut routes = Vec::new();
    for (index, http) in vs.spec.http.iter().enumerate() {
        let name = http
            .name
            .clone()
            .unwrap_or_else(|| format!("{namespace}/{vs_name}.http[{index}]"));
        let matches: Vec<Option<&net::HttpMatchRequest>> = if http.matches.is_empty() {
            vec![None]
        } else {
            http.matches.iter().map(Some).collect()
        };
        for m in matches {
            if let Some(m) = m {
                if m.port.is_some_and(|p| p != port) {
                    continue;
                }
                if !m.gateways.is_empty() && !m.gateways.iter().any(|g| gateway(g)) {
                    continue;
                }
                if sources.is_none()
                    && (!m.source_labels.is_empty() || m.source_namespace.is_some())
                {
                    warnings.push(format!(
                        "VirtualService {namespace}/{vs_name}: spec.http[{index}].match sourceLabels/sourceNamespace are not supported at a gateway; that match is skipped"
                    ));
                    continue;
                }
            }
            let mut route = http_route(&name, http, m, namespace, port, services);
            if let (Some(m), Some(sources), Some(route_match)) = (m, sources, &mut route.r#match) {
                route_match.filter_state = source_matches(m, sources);
            }
            routes.push(route);
        }
    }
    routes
}

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_owned())),
        ..Default::default()
    }
}

fn http_route(
    name: &str,
    http: &HttpRoute,
    m: Option<&net::HttpMatchRequest>,
    namespace: &str,
    port: u32,
    services: &HashMap<&str, &ServiceRef>,
) -> Route {
    let action = match &http.redirect {
        Some(redirect) => route::Action::Redirect(redirect_action(redirect)),
        None => route::Action::Route(route_action(http, m, namespace, port, services)),
    };
    let (request_add, request_remove, response_add, response_remove) =
        header_edits(http.headers.as_ref());
    let mut typed_per_filter_config = HashMap::new();
    if let Some(fault) = &http.fault {
        typed_per_filter_config.insert(FAULT_FILTER.to_owned(), any(&fault_config(fault)));
    }
    Route {
        name: name.to_owned(),
        r#match: Some(route_match(m)),
        action: Some(action),
        request_headers_to_add: request_add,
        request_headers_to_remove: request_remove,
        response_headers_to_add: response_add,
        response_headers_to_remove: response_remove,
        typed_per_filter_config,
        ..Default::default()
    }
}

fn route_match(m: Option<&net::HttpMatchRequest>) -> RouteMatch {
    let Some(m) = m else {
        return prefix_match("/");
    };
    let path_specifier = match &m.uri {
        Some(net::StringMatch { exact: Some(e), .. }) => {
            route_match::PathSpecifier::Path(e.clone())
        }
        Some(net::StringMatch {
            prefix: Some(p), ..
        }) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(net::StringMatch { regex: Some(r), .. }) => {
            route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            })
        }
        _ => route_match::PathSpecifier::Prefix("/".to_owned()),
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    for (name, value) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(value) = value {
            headers.push(header_matcher(name, value, false));
        }
    }
    headers.extend(
        m.headers
            .iter()
            .map(|(name, value)| header_matcher(name, value, false)),
    );
    headers.extend(
        m.without_headers
            .iter()
            .map(|(name, value)| header_matcher(name, value, true)),
    );
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, value)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(match string_matcher(value, false) {
                Some(matcher) => {
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(matcher)
                }
                None => query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path_specifier),
        case_sensitive: m.ignore_uri_case.map(|ignore| BoolValue { value: !ignore }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

/// An Istio string match as an Envoy one; `None` for an empty match object
/// (`{}`), which Istio reads as "present".
fn string_matcher(value: &net::StringMatch, ignore_case: bool) -> Option<StringMatcher> {
    let pattern = if let Some(exact) = &value.exact {
        string_matcher::MatchPattern::Exact(exact.clone())
    } else if let Some(prefix) = &value.prefix {
        string_matcher::MatchPattern::Prefix(prefix.clone())
    } else if let Some(regex) = &value.regex {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: regex.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    })
}

fn header_matcher(name: &str, value: &net::StringMatch, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        invert_match: invert,
        header_match_specifier: Some(match string_matcher(value, false) {
            Some(matcher) => header_matcher::HeaderMatchSpecifier::StringMatch(matcher),
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn route_action(
    http: &HttpRoute,
    m: Option<&net::HttpMatchRequest>,
    namespace: &str,
    port: u32,
    services: &HashMap<&str, &ServiceRef>,
) -> RouteAction {
    // A destination without a port uses the service's only port, else ours.
    let dest_port = |d: &net::Destination| -> u32 {
        d.port.as_ref().and_then(|p| p.number).unwrap_or_else(|| {
            match services.get(fqdn(&d.host, namespace).as_str()) {
                Some(svc) if svc.ports.len() == 1 => svc.ports[0].0,
                _ => port,
            }
        })
    };
    let cluster_of = |d: &net::Destination| {
        cluster_name(
            dest_port(d),
            d.subset.as_deref().unwrap_or(""),
            &fqdn(&d.host, namespace),
        )
    };
    let cluster_specifier = match http.route.as_slice() {
        [single] if single.headers.is_none() => {
            route_action::ClusterSpecifier::Cluster(cluster_of(&single.destination))
        }
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|d| {
                    let (request_add, request_remove, response_add, response_remove) =
                        header_edits(d.headers.as_ref());
                    weighted_cluster::ClusterWeight {
                        name: cluster_of(&d.destination),
                        weight: Some(UInt32Value {
                            value: d.weight.map_or(100, |w| w.max(0) as u32),
                        }),
                        request_headers_to_add: request_add,
                        request_headers_to_remove: request_remove,
                        response_headers_to_add: response_add,
                        response_headers_to_remove: response_remove,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = match &http.retries {
        None => Some(default_retry()),
        Some(retry) if retry.attempts == Some(0) => None,
        Some(retry) => Some(RetryPolicy {
            retry_on: retry
                .retry_on
                .clone()
                .unwrap_or_else(|| DEFAULT_RETRY_ON.to_owned()),
            num_retries: Some(UInt32Value {
                value: retry.attempts.map_or(DEFAULT_RETRIES, |a| a.max(0) as u32),
            }),
            per_try_timeout: retry.per_try_timeout.map(|d| proto_duration(d.0)),
            retriable_status_codes: vec![503],
            ..Default::default()
        }),
    };
    // CORS goes in the route action's own field, not in a second
    // `typed_per_filter_config` entry next to the fault filter's: one map
    // entry keeps the encoding (and so the resource version) stable.
    #[allow(deprecated)]
    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: http.timeout.map(|d| proto_duration(d.0)),
        retry_policy,
        cors: http.cors_policy.as_ref().map(cors),
        ..Default::default()
    };
    if let Some(rewrite) = &http.rewrite {
        if let Some(uri) = &rewrite.uri {
            action.prefix_rewrite = uri.clone();
            // An exact match rewrites the whole path.
            if let Some(net::StringMatch { exact: Some(_), .. }) = m.and_then(|m| m.uri.as_ref()) {
                action.regex_rewrite = Some(
                    mesh_api::envoy::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                        pattern: Some(RegexMatcher {
                            regex: ".*".to_owned(),
                            ..Default::default()
                        }),
                        substitution: uri.clone(),
                    },
                );
                action.prefix_rewrite.clear();
            }
        }
        if let Some(regex) = &rewrite.uri_regex_rewrite {
            action.regex_rewrite = Some(
                mesh_api::envoy::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: regex.pattern.clone(),
                        ..Default::default()
                    }),
                    substitution: regex.rewrite.clone(),
                },
            );
        }
        if let Some(authority) = &rewrite.authority {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(authority.clone()),
            );
        }
    }
    let mirrors = http
        .mirror
        .iter()
        .map(|d| (d, http.mirror_percentage.as_ref()))
        .chain(
            http.mirrors
                .iter()
                .map(|m| (&m.destination, m.percentage.as_ref())),
        );
    action.request_mirror_policies = mirrors
        .map(
            |(destination, percentage)| route_action::RequestMirrorPolicy {
                cluster: cluster_of(destination),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(fraction(percentage.map_or(100.0, |p| p.value))),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .collect();
    action
}

fn default_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.to_owned(),
        num_retries: Some(UInt32Value {
            value: DEFAULT_RETRIES,
        }),
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn cors(policy: &net::CorsPolicy) -> EnvoyCors {
    EnvoyCors {
        allow_origin_string_match: policy
            .allow_origins
            .iter()
            .filter_map(|o| string_matcher(o, false))
            .collect(),
        allow_methods: policy.allow_methods.join(","),
        allow_headers: policy.allow_headers.join(","),
        expose_headers: policy.expose_headers.join(","),
        max_age: policy
            .max_age
            .map(|d| d.0.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: policy.allow_credentials.map(|value| BoolValue { value }),
        ..Default::default()
    }
}

fn redirect_action(redirect: &net::HttpRedirect) -> RedirectAction {
    use redirect_action::RedirectResponseCode as Code;
    let response_code = match redirect.redirect_code.unwrap_or(301) {
        302 => Code::Found,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::MovedPermanently,
    };
    RedirectAction {
        host_redirect: redirect.authority.clone().unwrap_or_default(),
        port_redirect: redirect.port.unwrap_or(0),
        scheme_rewrite_specifier: redirect
            .scheme
            .clone()
            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: redirect
            .uri
            .clone()
            .map(redirect_action::PathRewriteSpecifier::PathRedirect),
        response_code: response_code as i32,
        ..Default::default()
    }
}

type HeaderEdits = (
    Vec<HeaderValueOption>,
    Vec<String>,
    Vec<HeaderValueOption>,
    Vec<String>,
);

fn header_edits(headers: Option<&net::Headers>) -> HeaderEdits {
    let ops = |ops: Option<&net::HeaderOperations>| -> (Vec<HeaderValueOption>, Vec<String>) {
        let Some(ops) = ops else {
            return (Vec::new(), Vec::new());
        };
        let option =
            |(key, value): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
                header: Some(HeaderValue {
                    key: key.to_ascii_lowercase(),
                    value: value.clone(),
                    ..Default::default()
                }),
                append_action: action as i32,
                ..Default::default()
            };
        let add = ops
            .set
            .iter()
            .map(|kv| option(kv, HeaderAppendAction::OverwriteIfExistsOrAdd))
            .chain(
                ops.add
                    .iter()
                    .map(|kv| option(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
            )
            .collect();
        (
            add,
            ops.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        )
    };
    let (request_add, request_remove) = ops(headers.and_then(|h| h.request.as_ref()));
    let (response_add, response_remove) = ops(headers.and_then(|h| h.response.as_ref()));
    (request_add, request_remove, response_add, response_remove)
}

fn fault_config(fault: &net::HttpFault) -> HttpFault {
    let delay = fault.delay.as_ref().map(|d| FaultDelay {
        fault_delay_secifier: d
            .fixed_delay
            .map(|f| fault_delay::FaultDelaySecifier::FixedDelay(proto_duration(f.0))),
        percentage: Some(fraction(
            d.percentage
                .as_ref()
                .map(|p| p.value)
                .or(d.percent.map(|p| p as f64))
                .unwrap_or(100.0),
        )),
    });
    let abort = fault.abort.as_ref().map(|a| FaultAbort {
        error_type: a
            .http_status
            .map(|s| fault_abort::ErrorType::HttpStatus(s.clamp(0, 999) as u32))
            .or_else(|| {
                a.grpc_status
                    .as_deref()
                    .and_then(mesh_config::istio::networking::grpc_status_code)
                    .map(fault_abort::ErrorType::GrpcStatus)
            }),
        percentage: Some(fraction(a.percentage.as_ref().map_or(100.0, |p| p.value))),
        ..Default::default()
    });
    HttpFault {
        delay,
        abort,
        ..Default::default()
    }
}

/// A percentage as parts per million.
fn fraction(percent: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

fn proto_duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

pub(crate) fn socket_address(ip: IpAddr, port: u32) -> EnvoyAddress {
    EnvoyAddress {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// DestinationRules by the FQDN of their host.
pub(crate) struct DestinationRules<'a> {
    by_host: HashMap<String, &'a DestinationRule>,
}

impl<'a> DestinationRules<'a> {
    pub(crate) fn new(rules: &'a [DestinationRule]) -> Self {
        let by_host = rules
            .iter()
            .map(|r| {
                let namespace = r
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(mesh_config::DEFAULT_NAMESPACE);
                (fqdn(&r.spec.host, namespace), r)
            })
            .collect();
        Self { by_host }
    }

    /// The rule for `hostname`: exact, else the longest matching wildcard.
    fn for_host(&self, hostname: &str) -> Option<&'a DestinationRule> {
        if let Some(rule) = self.by_host.get(hostname) {
            return Some(rule);
        }
        self.by_host
            .iter()
            .filter(|(pattern, _)| pattern.starts_with('*') && host_matches(pattern, hostname))
            .max_by_key(|(pattern, _)| pattern.len())
            .map(|(_, rule)| *rule)
    }
}

/// The policy in force for `subset` on `port`: the rule's, overridden by its
/// port-level settings, then by the subset's, then by the subset's port level.
fn effective_policy(
    rule: &net::DestinationRuleSpec,
    subset: Option<&net::Subset>,
    port: u32,
) -> Policy {
    let mut policy = Policy::default();
    let layers = [
        rule.traffic_policy.as_ref(),
        subset.and_then(|s| s.traffic_policy.as_ref()),
    ];
    for layer in layers.into_iter().flatten() {
        policy.apply(
            layer.load_balancer.as_ref(),
            layer.connection_pool.as_ref(),
            layer.outlier_detection.as_ref(),
        );
        if let Some(level) = port_level(layer, port) {
            policy.apply(
                level.load_balancer.as_ref(),
                level.connection_pool.as_ref(),
                level.outlier_detection.as_ref(),
            );
        }
    }
    policy
}

fn port_level(policy: &TrafficPolicy, port: u32) -> Option<&net::PortTrafficPolicy> {
    policy
        .port_level_settings
        .iter()
        .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(port))
}

#[derive(Clone, Debug, Default)]
struct Policy {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
}

impl Policy {
    fn apply(
        &mut self,
        lb: Option<&LoadBalancer>,
        pool: Option<&ConnectionPool>,
        outlier: Option<&OutlierDetection>,
    ) {
        if let Some(lb) = lb {
            self.load_balancer = Some(lb.clone());
        }
        if let Some(pool) = pool {
            self.connection_pool = Some(pool.clone());
        }
        if let Some(outlier) = outlier {
            self.outlier_detection = Some(outlier.clone());
        }
    }
}

fn cluster(name: &str, protocol: Protocol, policy: Option<&Policy>) -> Cluster {
    let lb = policy.and_then(|p| p.load_balancer.as_ref());
    let lb_policy = match lb {
        Some(LoadBalancer {
            consistent_hash: Some(_),
            ..
        }) => LbPolicy::RingHash,
        Some(LoadBalancer {
            simple: Some(SimpleLb::Random),
            ..
        }) => LbPolicy::Random,
        Some(LoadBalancer {
            simple: Some(SimpleLb::RoundRobin),
            ..
        }) => LbPolicy::RoundRobin,
        // Istio's default (and UNSPECIFIED, LEAST_CONN) is least request.
        _ => LbPolicy::LeastRequest,
    };
    let pool = policy.and_then(|p| p.connection_pool.as_ref());
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let limit = |v: Option<i64>| {
        v.filter(|v| *v > 0).map(|v| UInt32Value {
            value: u32::try_from(v).unwrap_or(u32::MAX),
        })
    };
    let thresholds = Thresholds {
        max_connections: limit(tcp.and_then(|t| t.max_connections)),
        max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: limit(http.and_then(|h| h.http2_max_requests)),
        max_retries: limit(http.and_then(|h| h.max_retries)),
        ..Default::default()
    };
    let outlier = policy
        .and_then(|p| p.outlier_detection.as_ref())
        .map(|o| EnvoyOutlier {
            consecutive_5xx: limit(o.consecutive_5xx_errors.or(o.consecutive_errors)),
            consecutive_gateway_failure: limit(o.consecutive_gateway_errors),
            interval: Some(proto_duration(
                o.interval.map_or(Duration::from_secs(10), |d| d.0),
            )),
            base_ejection_time: Some(proto_duration(
                o.base_ejection_time
                    .map_or(Duration::from_secs(30), |d| d.0),
            )),
            max_ejection_percent: limit(Some(o.max_ejection_percent.unwrap_or(10))),
            ..Default::default()
        });
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_owned(),
        }),
        connect_timeout: Some(proto_duration(
            tcp.and_then(|t| t.connect_timeout)
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
        )),
        lb_policy: lb_policy as i32,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![thresholds],
            ..Default::default()
        }),
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS.to_owned(),
            any(&http_protocol_options(
                protocol,
                limit(http.and_then(|h| h.max_requests_per_connection)),
            )),
        )]),
        outlier_detection: outlier,
        ..Default::default()
    }
}

/// Upstream protocol and per-connection request limit.
fn http_protocol_options(
    protocol: Protocol,
    max_requests: Option<UInt32Value>,
) -> HttpProtocolOptions {
    use upstream_http::http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    };
    let protocol_config = match protocol {
        Protocol::Http2 => ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()),
        _ => ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default()),
    };
    HttpProtocolOptions {
        common_http_protocol_options: max_requests.map(|max| HttpCommonOptions {
            max_requests_per_connection: Some(max),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        ..Default::default()
    }
}

fn load_assignment<'a>(
    name: &str,
    port: u32,
    workloads: impl Iterator<Item = &'a EndpointRef>,
) -> (u64, ClusterLoadAssignment) {
    let mut hasher = std::hash::DefaultHasher::new();
    let mut lb_endpoints = Vec::new();
    for w in workloads {
        let Some(&(_, target)) = w.ports.iter().find(|(p, _)| *p == port) else {
            continue;
        };
        (w, target).hash(&mut hasher);
        let metadata = w.identity.as_ref().map(|identity| Metadata {
            filter_metadata: HashMap::from([(
                ISTIO_METADATA.to_owned(),
                Struct {
                    fields: HashMap::from([(
                        "identity".to_owned(),
                        Value {
                            kind: Some(value::Kind::StringValue(identity.clone())),
                        },
                    )]),
                },
            )]),
            ..Default::default()
        });
        lb_endpoints.push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(w.ip, target)),
                hostname: w.uid.clone(),
                ..Default::default()
            })),
            health_status: if w.healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            } as i32,
            metadata,
            ..Default::default()
        });
    }
    (
        hasher.finish(),
        ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use crate::model::{MeshSettings, Model};
    use mesh_api::{envoy::envoy::config::route::v3::route, workload::address};

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.9, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-0, namespace: shop, labels: {app: reviews, version: v2}}
spec: {nodeName: node1, serviceAccountName: reviews, containers: [{name: app}]}
status: {podIP: 10.244.1.10, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 50}}}
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#;

    fn model() -> Model {
        let loaded = mesh_config::load_str("cluster.yaml", CLUSTER);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        Model::build(&loaded.manifests, &MeshSettings::default())
    }

    #[test]
    fn source_labels_and_namespace_become_matches_on_the_caller() {
        let extra = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-0, namespace: shop, labels: {app: productpage, version: v1}}
spec: {nodeName: node0, serviceAccountName: productpage, containers: [{name: app}]}
status: {podIP: 10.244.0.20, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-1, namespace: other, labels: {app: productpage, version: v1}}
spec: {nodeName: node0, serviceAccountName: productpage, containers: [{name: app}]}
status: {podIP: 10.244.0.21, phase: Running}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-by-source, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}, sourceNamespace: shop}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{sourceLabels: {app: nobody}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
        let cluster = CLUSTER.replace(
            "kind: VirtualService\nmetadata: {name: reviews, namespace: shop}",
            "kind: VirtualService\nmetadata: {name: reviews, namespace: unused}",
        );
        let loaded = mesh_config::load_str("cluster.yaml", &format!("{cluster}{extra}"));
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let model = Model::build(&loaded.manifests, &MeshSettings::default());
        assert!(
            !model.warnings.iter().any(|w| w.contains("sourceLabels")),
            "{:?}",
            model.warnings
        );
        let (_, routes) =
            &model.envoy.routes["inbound-vip|9080|http|reviews.shop.svc.cluster.local"];
        let routes = &routes.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 3);
        let state = |i: usize| routes[i].r#match.as_ref().unwrap().filter_state.clone();
        use mesh_api::envoy::envoy::r#type::matcher::v3::{
            filter_state_matcher::Matcher, string_matcher::MatchPattern,
        };
        let first = state(0);
        assert_eq!(first.len(), 2, "{first:?}");
        assert_eq!(first[0].key, mesh_api::filter_state::PEER_PRINCIPAL);
        let Some(Matcher::StringMatch(principal)) = &first[0].matcher else {
            panic!("{first:?}");
        };
        let Some(MatchPattern::SafeRegex(re)) = &principal.match_pattern else {
            panic!("{principal:?}");
        };
        assert_eq!(re.regex, "spiffe://[^/]+/ns/shop/sa/[^/]+");
        assert_eq!(first[1].key, mesh_api::filter_state::SOURCE_ADDRESS);
        let Some(Matcher::AddressMatch(addresses)) = &first[1].matcher else {
            panic!("{first:?}");
        };
        // Only the pod in the VirtualService's sourceNamespace.
        let ips: Vec<_> = addresses
            .ranges
            .iter()
            .map(|r| r.address_prefix.as_str())
            .collect();
        assert_eq!(ips, ["10.244.0.20"]);
        // Labels nobody has: a match with no address, which matches no one.
        let Some(Matcher::AddressMatch(none)) = &state(1)[0].matcher else {
            panic!("{:?}", state(1));
        };
        assert!(none.ranges.is_empty());
        assert!(state(2).is_empty());
    }

    #[test]
    fn bound_service_names_its_waypoint_and_the_waypoint_not_itself() {
        let model = model();
        let service = |key: &str| match &model.addresses[key].r#type {
            Some(address::Type::Service(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        let reviews = service("shop/reviews.shop.svc.cluster.local");
        let waypoint = reviews.waypoint.expect("reviews uses the waypoint");
        assert_eq!(waypoint.hbone_mtls_port, 15008);
        assert!(
            service("shop/waypoint.shop.svc.cluster.local")
                .waypoint
                .is_none()
        );
    }

    #[test]
    fn virtual_service_becomes_listener_routes_clusters_and_endpoints() {
        let envoy = model().envoy;
        let (scope, listener) = &envoy.listeners["waypoint~shop~waypoint"];
        assert_eq!(scope, "shop/waypoint");
        assert_eq!(listener.filter_chains.len(), 1, "one chain: reviews:9080");
        let (_, routes) = &envoy.routes["inbound-vip|9080|http|reviews.shop.svc.cluster.local"];
        let routes = &routes.virtual_hosts[0].routes;
        assert_eq!(
            routes.len(),
            2,
            "no default route when a VirtualService exists"
        );
        assert!(
            routes[0]
                .typed_per_filter_config
                .contains_key(super::FAULT_FILTER)
        );
        let Some(route::Action::Route(action)) = &routes[1].action else {
            panic!("forwarding route");
        };
        let Some(super::route_action::ClusterSpecifier::WeightedClusters(w)) =
            &action.cluster_specifier
        else {
            panic!("weighted");
        };
        let names: Vec<_> = w.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|9080|v1|reviews.shop.svc.cluster.local",
                "outbound|9080|v2|reviews.shop.svc.cluster.local"
            ]
        );
        let (_, v2) = &envoy.endpoints["outbound|9080|v2|reviews.shop.svc.cluster.local"];
        assert_eq!(v2.endpoints[0].lb_endpoints.len(), 1);
        let (_, v1) = &envoy.endpoints["outbound|9080|v1|reviews.shop.svc.cluster.local"];
        assert!(v1.endpoints[0].lb_endpoints.is_empty());
        assert_eq!(
            envoy.clusters["outbound|9080|v1|reviews.shop.svc.cluster.local"].lb_policy,
            super::LbPolicy::RoundRobin as i32
        );
    }
}
