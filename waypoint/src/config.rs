//! The waypoint's config: Envoy LDS, RDS, CDS and EDS resources from the
//! control plane, each compiled on arrival (a resource that cannot be
//! honoured is NACKed with the reason and its previous version stays), and
//! published as one immutable [`Config`] that requests read without locks.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use mesh_api::{
    envoy::envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{address, socket_address},
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::{FilterChain, FilterChainMatch, Listener, filter},
            route::v3::RouteConfiguration,
        },
        extensions::filters::{
            http::rbac::v3::Rbac as HttpRbac,
            network::{
                http_connection_manager::v3::{
                    HttpConnectionManager, http_connection_manager, http_filter,
                },
                rbac::v3::Rbac as NetworkRbac,
                tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
        },
    },
    type_url,
};
use mesh_hbone::Identity;
use prost::Message;
use serde_json::json;

use crate::{
    cluster::{ClusterConfig, ClusterEntry, ClusterRuntime, EndpointConfig, compile_endpoints},
    ingress::{IngressChain, IngressListener, compile_chain_tls},
    rbac::Authorizer,
    route::{FAULT_FILTER, RouteTable},
};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const ROUTER: &str = "envoy.filters.http.router";
const HTTP_RBAC: &str = "envoy.filters.http.rbac";
const NETWORK_RBAC: &str = "envoy.filters.network.rbac";

/// What a tunnel to one service address gets.
#[derive(Debug, Clone)]
pub enum Chain {
    /// HTTP, routed by the named route configuration.
    Http {
        /// Filter chain name (`inbound-vip|<port>|http|<host>`).
        name: String,
        /// RDS name.
        route_config: String,
        /// The RBAC filters, checked per request.
        authz: Arc<Authorizer>,
    },
    /// Opaque TCP to weighted clusters.
    Tcp {
        /// Filter chain name.
        name: String,
        /// `(cluster, weight)`.
        clusters: Vec<(String, u32)>,
        /// The RBAC filters, checked per connection.
        authz: Arc<Authorizer>,
    },
}

impl Chain {
    /// The service host the chain serves (the last `|` field of its name).
    pub fn service(&self) -> &str {
        let name = match self {
            Chain::Http { name, .. } | Chain::Tcp { name, .. } => name,
        };
        name.rsplit('|').next().unwrap_or(name)
    }

    /// The chain's authorization.
    pub fn authz(&self) -> &Authorizer {
        match self {
            Chain::Http { authz, .. } | Chain::Tcp { authz, .. } => authz,
        }
    }
}

/// One consistent version of everything.
#[derive(Debug, Default)]
pub struct Config {
    /// Service address (VIP and port) to its chain (waypoint, over HBONE).
    pub chains: HashMap<SocketAddr, Chain>,
    /// Port to its filter chains (ingress gateway listeners).
    pub ingress: BTreeMap<u16, Arc<IngressListener>>,
    /// Route tables by name.
    pub routes: HashMap<String, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<ClusterEntry>>,
    /// Endpoint address to its identity (HBONE) or none (plaintext).
    pub identities: HashMap<SocketAddr, Option<Identity>>,
    /// Listener names, for `/config_dump`.
    pub listeners: Vec<String>,
}

/// The published config.
#[derive(Debug, Default)]
pub struct Store {
    current: ArcSwap<Config>,
    /// Every type has had its first response.
    pub synced: AtomicBool,
    /// Signalled on every publish (the ingress listener manager waits on it).
    pub changed: tokio::sync::Notify,
}

impl Store {
    /// The current config.
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Makes `config` the current one and wakes everything following
    /// changes (every worker's ingress listeners).
    pub fn publish(&self, config: Config) {
        self.current.store(Arc::new(config));
        self.changed.notify_waiters();
    }

    /// `/config_dump`'s body, built from the current config on request.
    pub fn dump(&self) -> serde_json::Value {
        let config = self.load();
        let mut chains: Vec<_> = config.chains.iter().collect();
        chains.sort_by_key(|(addr, _)| **addr);
        let mut routes: Vec<_> = config.routes.values().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut clusters: Vec<_> = config.clusters.values().collect();
        clusters.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        json!({
            "listeners": config.listeners,
            "ingress": config.ingress.iter().flat_map(|(port, listener)| listener.chains.iter().map(move |c| match &c.chain {
                Chain::Http { name, route_config, authz } => json!({"port": port, "server_names": c.server_names, "tls": c.tls.is_some(), "name": name, "rds": route_config, "rbac": authz.summary()}),
                Chain::Tcp { name, clusters, authz } => json!({"port": port, "server_names": c.server_names, "tls": c.tls.is_some(), "name": name, "tcp_proxy": clusters, "rbac": authz.summary()}),
            })).collect::<Vec<_>>(),
            "filter_chains": chains.iter().map(|(addr, chain)| match chain {
                Chain::Http { name, route_config, authz } => json!({"match": addr.to_string(), "name": name, "rds": route_config, "rbac": authz.summary()}),
                Chain::Tcp { name, clusters, authz } => json!({"match": addr.to_string(), "name": name, "tcp_proxy": clusters, "rbac": authz.summary()}),
            }).collect::<Vec<_>>(),
            "routes": routes.iter().map(|t| json!({"name": t.name, "routes": t.route_names()})).collect::<Vec<_>>(),
            "clusters": clusters.iter().map(|c| json!({
                "name": c.config.name,
                "lb": format!("{:?}", c.config.lb),
                "protocol": format!("{:?}", c.config.protocol),
                "limits": format!("{:?}", c.config.limits),
                "outlier": c.config.outlier.map(|o| format!("{o:?}")),
                "endpoints": c.endpoints.iter().map(|(e, _)| json!({
                    "address": e.addr.to_string(),
                    "workload": e.workload,
                    "identity": e.identity.as_ref().map(ToString::to_string),
                    "healthy": e.healthy,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Compiled resources by type, kept between updates.
#[derive(Default)]
pub struct XdsHandler {
    store: Arc<Store>,
    listeners: BTreeMap<String, Compiled>,
    routes: BTreeMap<String, Arc<RouteTable>>,
    clusters: BTreeMap<String, Arc<ClusterConfig>>,
    endpoints: BTreeMap<String, Vec<Arc<EndpointConfig>>>,
    runtimes: HashMap<String, Arc<ClusterRuntime>>,
}

impl XdsHandler {
    /// A handler publishing into `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            ..Default::default()
        }
    }

    fn publish(&mut self) {
        let mut config = Config::default();
        for listener in self.listeners.values() {
            match listener {
                Compiled::Waypoint(chains) => {
                    for (addr, chain) in chains {
                        config.chains.insert(*addr, chain.clone());
                    }
                }
                Compiled::Ingress(port, listener) => {
                    config.ingress.insert(*port, listener.clone());
                }
            }
        }
        config.routes = self
            .routes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.runtimes
            .retain(|name, _| self.clusters.contains_key(name));
        for (name, cluster) in &self.clusters {
            let runtime = self.runtimes.entry(name.clone()).or_default().clone();
            let endpoints: Vec<_> = self
                .endpoints
                .get(&cluster.eds_name)
                .into_iter()
                .flatten()
                .map(|e| {
                    config.identities.insert(e.addr, e.identity.clone());
                    (e.clone(), runtime.health(e.addr))
                })
                .collect();
            config.clusters.insert(
                name.clone(),
                Arc::new(ClusterEntry {
                    config: cluster.clone(),
                    endpoints,
                    runtime,
                }),
            );
        }
        config.listeners = self.listeners.keys().cloned().collect();
        self.store.publish(config);
    }
}

impl mesh_xds::Handler for XdsHandler {
    fn apply(&mut self, update: mesh_xds::Update) -> Result<(), mesh_xds::Rejected> {
        let mut rejected = Vec::new();
        match update.type_url.as_str() {
            type_url::LISTENER => apply_type(&mut self.listeners, update, &mut rejected, |bytes| {
                compile_listener(&decode::<Listener>(bytes)?)
            }),
            type_url::ROUTE => apply_type(&mut self.routes, update, &mut rejected, |bytes| {
                RouteTable::compile(&decode::<RouteConfiguration>(bytes)?).map(Arc::new)
            }),
            type_url::CLUSTER => apply_type(&mut self.clusters, update, &mut rejected, |bytes| {
                ClusterConfig::compile(&decode::<Cluster>(bytes)?).map(Arc::new)
            }),
            type_url::ENDPOINT => apply_type(&mut self.endpoints, update, &mut rejected, |bytes| {
                let list = compile_endpoints(&decode::<ClusterLoadAssignment>(bytes)?)?;
                Ok(list.into_iter().map(Arc::new).collect())
            }),
            other => {
                return Err(mesh_xds::Rejected(vec![(
                    other.to_owned(),
                    "type not served by the waypoint".to_owned(),
                )]));
            }
        }
        self.publish();
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(mesh_xds::Rejected(rejected))
        }
    }

    fn synced(&mut self) {
        self.store.synced.store(true, Ordering::Release);
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, String> {
    M::decode(bytes).map_err(|e| e.to_string())
}

/// Applies one type's update to its compiled map: removals, then each
/// resource compiled; one that fails is named in `rejected` and its previous
/// version stays.
fn apply_type<T>(
    map: &mut BTreeMap<String, T>,
    update: mesh_xds::Update,
    rejected: &mut Vec<(String, String)>,
    compile: impl Fn(&[u8]) -> Result<T, String>,
) {
    for name in &update.removed {
        map.remove(name);
    }
    for resource in update.resources {
        match compile(&resource.value) {
            Ok(compiled) => {
                map.insert(resource.name, compiled);
            }
            Err(reason) => rejected.push((resource.name, reason)),
        }
    }
}

/// A compiled listener.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// The waypoint's HBONE listener: a chain per service address.
    Waypoint(Vec<(SocketAddr, Chain)>),
    /// An ingress gateway port: one plain chain, or TLS chains by SNI.
    Ingress(u16, Arc<IngressListener>),
}

/// Reads a listener: the waypoint's (filter chains matching service
/// addresses) or an ingress gateway's (one chain for its port).
pub fn compile_listener(listener: &Listener) -> Result<Compiled, String> {
    let port = listener
        .address
        .as_ref()
        .and_then(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).ok(),
                _ => None,
            },
            _ => None,
        })
        .ok_or("address: a socket address with a port value is required")?;
    // The waypoint's HBONE port; any other port is an ingress listener.
    if port == mesh_hbone::HBONE_PORT {
        return compile_waypoint_listener(listener).map(Compiled::Waypoint);
    }
    let mut chains = Vec::new();
    for (i, chain) in listener.filter_chains.iter().enumerate() {
        let at = format!("filter_chains[{i}] ({})", chain.name);
        if let Some(m) = &chain.filter_chain_match {
            let only_names = FilterChainMatch {
                server_names: m.server_names.clone(),
                ..Default::default()
            };
            if *m != only_names {
                return Err(format!(
                    "{at}.filter_chain_match: only server_names is supported on ingress listeners"
                ));
            }
        }
        let (server_names, tls) = compile_chain_tls(chain, &at)?;
        let compiled = compile_chain(chain, &at)?;
        if tls.is_none() && !server_names.is_empty() && !matches!(compiled, Chain::Tcp { .. }) {
            return Err(format!(
                "{at}: a chain matched by server_names without a TLS transport socket passes TLS through, so it must be a TCP proxy"
            ));
        }
        chains.push(IngressChain {
            server_names,
            tls,
            chain: compiled,
        });
    }
    let plain = chains
        .iter()
        .filter(|c| c.tls.is_none() && c.server_names.is_empty())
        .count();
    let by_sni = chains.len() - plain;
    if chains.is_empty() || (plain > 0 && by_sni > 0) || plain > 1 {
        return Err(format!(
            "filter_chains: an ingress listener (port {port}) has one plain chain, or chains chosen by SNI only"
        ));
    }
    Ok(Compiled::Ingress(
        port,
        Arc::new(IngressListener { chains }),
    ))
}

/// The waypoint listener's chains, each matching one service address.
fn compile_waypoint_listener(listener: &Listener) -> Result<Vec<(SocketAddr, Chain)>, String> {
    let mut out = Vec::new();
    for (i, chain) in listener.filter_chains.iter().enumerate() {
        let at = format!("filter_chains[{i}] ({})", chain.name);
        let m = chain
            .filter_chain_match
            .as_ref()
            .ok_or_else(|| format!("{at}: no filter_chain_match"))?;
        let port = m
            .destination_port
            .as_ref()
            .and_then(|p| u16::try_from(p.value).ok())
            .ok_or_else(|| {
                format!("{at}.filter_chain_match.destination_port: missing or out of range")
            })?;
        let built = compile_chain(chain, &at)?;
        if m.prefix_ranges.is_empty() {
            return Err(format!(
                "{at}.filter_chain_match.prefix_ranges: a service address is required"
            ));
        }
        for range in &m.prefix_ranges {
            let ip: IpAddr = range
                .address_prefix
                .parse()
                .map_err(|_| format!("{at}: {:?} is not an IP", range.address_prefix))?;
            let full = if ip.is_ipv4() { 32 } else { 128 };
            if range.prefix_len.as_ref().is_some_and(|l| l.value != full) {
                return Err(format!(
                    "{at}: only single-address prefix ranges are supported"
                ));
            }
            out.push((SocketAddr::new(ip, port), built.clone()));
        }
    }
    Ok(out)
}

/// One filter chain: network RBAC filters, then an HTTP connection manager
/// (RDS, with RBAC, fault and router HTTP filters) or a TCP proxy.
fn compile_chain(chain: &FilterChain, at: &str) -> Result<Chain, String> {
    // Network RBAC filters, then one terminal filter.
    let Some((terminal, rbac_filters)) = chain.filters.split_last() else {
        return Err(format!("{at}.filters: no filter"));
    };
    let mut authz = Authorizer::default();
    for (j, f) in rbac_filters.iter().enumerate() {
        let at = format!("{at}.filters[{j}]");
        if f.name != NETWORK_RBAC {
            return Err(format!(
                "{at}: network filter {} is not supported before the terminal filter",
                f.name
            ));
        }
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return Err(format!("{at}: no typed_config"));
        };
        let rbac = NetworkRbac::decode(any.value.as_slice()).map_err(|e| format!("{at}: {e}"))?;
        if rbac.matcher.is_some() {
            return Err(format!("{at}.matcher: the matcher API is not supported"));
        }
        authz.push(rbac.rules.as_ref(), &at)?;
    }
    let at_terminal = format!("{at}.filters[{}]", rbac_filters.len());
    let Some(filter::ConfigType::TypedConfig(any)) = &terminal.config_type else {
        return Err(format!("{at_terminal}: no typed_config"));
    };
    Ok(match terminal.name.as_str() {
        HCM if rbac_filters.is_empty() => {
            let hcm = HttpConnectionManager::decode(any.value.as_slice())
                .map_err(|e| format!("{at}: {e}"))?;
            let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier
            else {
                return Err(format!("{at}: the HTTP connection manager must use RDS"));
            };
            let mut authz = Authorizer::default();
            for (j, f) in hcm.http_filters.iter().enumerate() {
                let at = format!("{at}.http_filters[{j}]");
                match f.name.as_str() {
                    ROUTER | FAULT_FILTER => {}
                    HTTP_RBAC => {
                        let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                            return Err(format!("{at}: no typed_config"));
                        };
                        let rbac = HttpRbac::decode(any.value.as_slice())
                            .map_err(|e| format!("{at}: {e}"))?;
                        if rbac.matcher.is_some() || rbac.shadow_matcher.is_some() {
                            return Err(format!("{at}.matcher: the matcher API is not supported"));
                        }
                        authz.push(rbac.rules.as_ref(), &at)?;
                    }
                    other => return Err(format!("{at}: HTTP filter {other} is not supported")),
                }
            }
            Chain::Http {
                name: chain.name.clone(),
                route_config: rds.route_config_name.clone(),
                authz: Arc::new(authz),
            }
        }
        TCP_PROXY => {
            let proxy = TcpProxy::decode(any.value.as_slice()).map_err(|e| format!("{at}: {e}"))?;
            let clusters = match proxy.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![(c, 1)],
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                    w.clusters.into_iter().map(|c| (c.name, c.weight)).collect()
                }
                None => return Err(format!("{at}: tcp_proxy without a cluster")),
            };
            if clusters.iter().map(|c| c.1).sum::<u32>() == 0 {
                return Err(format!("{at}: tcp_proxy weights sum to 0"));
            }
            Chain::Tcp {
                name: chain.name.clone(),
                clusters,
                authz: Arc::new(authz),
            }
        }
        HCM => {
            return Err(format!(
                "{at}.filters: network RBAC before an HTTP connection manager is not supported; use the HTTP RBAC filter"
            ));
        }
        other => {
            return Err(format!(
                "{at_terminal}: network filter {other} is not supported"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::envoy::envoy::config::{
        cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType},
        core::v3::{Address, SocketAddress, address, socket_address},
        endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint},
    };
    use mesh_xds::{Handler, Resource, Update};

    fn update(type_url: &str, name: &str, message: &impl Message) -> Update {
        Update {
            type_url: type_url.to_owned(),
            resources: vec![Resource {
                name: name.to_owned(),
                value: message.encode_to_vec().into(),
            }],
            removed: Vec::new(),
        }
    }

    #[test]
    fn bad_resource_is_nacked_alone_and_dump_shows_what_is_held() {
        let store = Arc::new(Store::default());
        let mut handler = XdsHandler::new(store.clone());
        let cluster = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        handler
            .apply(update(type_url::CLUSTER, "c", &cluster))
            .unwrap();
        let endpoint = |ip: &str| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let assignment = |ip: &str| ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint(ip)],
                ..Default::default()
            }],
            ..Default::default()
        };
        handler
            .apply(update(type_url::ENDPOINT, "c", &assignment("10.0.0.1")))
            .unwrap();
        let Err(mesh_xds::Rejected(rejected)) =
            handler.apply(update(type_url::ENDPOINT, "c", &assignment("not-an-ip")))
        else {
            panic!("a bad address must be rejected");
        };
        assert!(rejected[0].1.contains("not an IP"), "{rejected:?}");
        let dump = store.dump();
        assert_eq!(
            dump["clusters"][0]["endpoints"][0]["address"], "10.0.0.1:80",
            "the previous endpoints stay: {dump}"
        );
    }
}
