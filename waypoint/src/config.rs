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
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::{Listener, filter},
            route::v3::RouteConfiguration,
        },
        extensions::filters::network::{
            http_connection_manager::v3::{HttpConnectionManager, http_connection_manager},
            tcp_proxy::v3::{TcpProxy, tcp_proxy},
        },
    },
    type_url,
};
use mesh_hbone::Identity;
use prost::Message;
use serde_json::json;

use crate::{
    cluster::{ClusterConfig, ClusterEntry, ClusterRuntime, EndpointConfig, compile_endpoints},
    route::{FAULT_FILTER, RouteTable},
};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const ROUTER: &str = "envoy.filters.http.router";

/// What a tunnel to one service address gets.
#[derive(Debug, Clone)]
pub enum Chain {
    /// HTTP, routed by the named route configuration.
    Http {
        /// Filter chain name (`inbound-vip|<port>|http|<host>`).
        name: String,
        /// RDS name.
        route_config: String,
    },
    /// Opaque TCP to weighted clusters.
    Tcp {
        /// Filter chain name.
        name: String,
        /// `(cluster, weight)`.
        clusters: Vec<(String, u32)>,
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
}

/// One consistent version of everything.
#[derive(Debug, Default)]
pub struct Config {
    /// Service address (VIP and port) to its chain.
    pub chains: HashMap<SocketAddr, Chain>,
    /// Route tables by name.
    pub routes: HashMap<String, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<ClusterEntry>>,
    /// Endpoint address to its identity (HBONE) or none (plaintext).
    pub identities: HashMap<SocketAddr, Option<Identity>>,
}

/// The published config.
#[derive(Debug, Default)]
pub struct Store {
    current: ArcSwap<Config>,
    /// Every type has had its first response.
    pub synced: AtomicBool,
    dump: ArcSwap<serde_json::Value>,
}

impl Store {
    /// The current config.
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// `/config_dump`'s body.
    pub fn dump(&self) -> Arc<serde_json::Value> {
        self.dump.load_full()
    }
}

/// Compiled resources by type, kept between updates.
#[derive(Default)]
pub struct XdsHandler {
    store: Arc<Store>,
    listeners: BTreeMap<String, Vec<(SocketAddr, Chain)>>,
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
        for chains in self.listeners.values() {
            for (addr, chain) in chains {
                config.chains.insert(*addr, chain.clone());
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
        let dump = json!({
            "listeners": self.listeners.iter().map(|(name, chains)| json!({
                "name": name,
                "filter_chains": chains.iter().map(|(addr, chain)| match chain {
                    Chain::Http { name, route_config } => json!({"match": addr.to_string(), "name": name, "rds": route_config}),
                    Chain::Tcp { name, clusters } => json!({"match": addr.to_string(), "name": name, "tcp_proxy": clusters}),
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "routes": self.routes.values().map(|t| json!({"name": t.name, "routes": t.route_names()})).collect::<Vec<_>>(),
            "clusters": self.clusters.values().map(|c| json!({
                "name": c.name,
                "lb": format!("{:?}", c.lb),
                "protocol": format!("{:?}", c.protocol),
                "limits": format!("{:?}", c.limits),
                "outlier": c.outlier.map(|o| format!("{o:?}")),
            })).collect::<Vec<_>>(),
            "endpoints": self.endpoints.iter().map(|(name, list)| json!({
                "cluster": name,
                "endpoints": list.iter().map(|e| json!({
                    "address": e.addr.to_string(),
                    "workload": e.workload,
                    "identity": e.identity.as_ref().map(ToString::to_string),
                    "healthy": e.healthy,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        self.store.current.store(Arc::new(config));
        self.store.dump.store(Arc::new(dump));
    }
}

impl mesh_xds::Handler for XdsHandler {
    fn apply(&mut self, update: mesh_xds::Update) -> Result<(), mesh_xds::Rejected> {
        let mut rejected = Vec::new();
        match update.type_url.as_str() {
            type_url::LISTENER => {
                for name in &update.removed {
                    self.listeners.remove(name);
                }
                for r in update.resources {
                    match Listener::decode(r.value.as_slice())
                        .map_err(|e| e.to_string())
                        .and_then(|l| compile_listener(&l))
                    {
                        Ok(chains) => {
                            self.listeners.insert(r.name, chains);
                        }
                        Err(e) => rejected.push((r.name, e)),
                    }
                }
            }
            type_url::ROUTE => {
                for name in &update.removed {
                    self.routes.remove(name);
                }
                for r in update.resources {
                    match RouteConfiguration::decode(r.value.as_slice())
                        .map_err(|e| e.to_string())
                        .and_then(|c| RouteTable::compile(&c))
                    {
                        Ok(table) => {
                            self.routes.insert(r.name, Arc::new(table));
                        }
                        Err(e) => rejected.push((r.name, e)),
                    }
                }
            }
            type_url::CLUSTER => {
                for name in &update.removed {
                    self.clusters.remove(name);
                }
                for r in update.resources {
                    match Cluster::decode(r.value.as_slice())
                        .map_err(|e| e.to_string())
                        .and_then(|c| ClusterConfig::compile(&c))
                    {
                        Ok(cluster) => {
                            self.clusters.insert(r.name, Arc::new(cluster));
                        }
                        Err(e) => rejected.push((r.name, e)),
                    }
                }
            }
            type_url::ENDPOINT => {
                for name in &update.removed {
                    self.endpoints.remove(name);
                }
                for r in update.resources {
                    match ClusterLoadAssignment::decode(r.value.as_slice())
                        .map_err(|e| e.to_string())
                        .and_then(|a| compile_endpoints(&a))
                    {
                        Ok(list) => {
                            self.endpoints
                                .insert(r.name, list.into_iter().map(Arc::new).collect());
                        }
                        Err(e) => rejected.push((r.name, e)),
                    }
                }
            }
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

/// Reads a listener's filter chains: each matches one service address and
/// runs one HTTP connection manager (RDS) or TCP proxy.
pub fn compile_listener(listener: &Listener) -> Result<Vec<(SocketAddr, Chain)>, String> {
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
        let [filter] = chain.filters.as_slice() else {
            return Err(format!("{at}.filters: exactly one filter is supported"));
        };
        let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
            return Err(format!("{at}.filters[0]: no typed_config"));
        };
        let built = match filter.name.as_str() {
            HCM => {
                let hcm = HttpConnectionManager::decode(any.value.as_slice())
                    .map_err(|e| format!("{at}: {e}"))?;
                let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier
                else {
                    return Err(format!("{at}: the HTTP connection manager must use RDS"));
                };
                if let Some(f) = hcm
                    .http_filters
                    .iter()
                    .find(|f| f.name != ROUTER && f.name != FAULT_FILTER)
                {
                    return Err(format!("{at}: HTTP filter {} is not supported", f.name));
                }
                Chain::Http {
                    name: chain.name.clone(),
                    route_config: rds.route_config_name.clone(),
                }
            }
            TCP_PROXY => {
                let proxy =
                    TcpProxy::decode(any.value.as_slice()).map_err(|e| format!("{at}: {e}"))?;
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
                }
            }
            other => return Err(format!("{at}: network filter {other} is not supported")),
        };
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
