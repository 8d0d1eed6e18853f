//! Clusters and their endpoints: what a DestinationRule becomes once the
//! control plane has turned it into Envoy's CDS and EDS.
//!
//! Per-cluster state that must outlive config updates (request counts for
//! circuit breaking, the round-robin cursor, each endpoint's outlier state)
//! lives in [`ClusterRuntime`] and [`EndpointHealth`], which a new config
//! version adopts from the previous one.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_api::envoy::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
            },
            core::v3::{HealthStatus, address, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        },
        extensions::upstreams::http::v3::{
            HttpProtocolOptions,
            http_protocol_options::{
                UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
            },
        },
    },
    google::protobuf::value,
};
use mesh_hbone::Identity;
use prost::Message;

use crate::route::duration;

/// Key of the upstream HTTP options in `typed_extension_protocol_options`.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbKind {
    /// Next endpoint in turn.
    RoundRobin,
    /// Uniformly random.
    Random,
    /// The less busy of two random endpoints.
    LeastRequest,
    /// Consistent hashing (rendezvous) on the request's hash key.
    Hash,
}

/// HTTP version spoken to the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (gRPC).
    Http2,
}

/// Circuit-breaker limits (none: unlimited).
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Concurrent connections (HTTP/1: concurrent requests).
    pub max_connections: Option<u32>,
    /// Requests queued waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Concurrent requests.
    pub max_requests: Option<u32>,
    /// Concurrent retries (`max_retries`; [`DEFAULT_MAX_RETRIES`] when
    /// unset, as in Envoy).
    pub max_retries: Option<u32>,
    /// `retry_budget`, which replaces `max_retries` when set.
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy's default `max_retries`: without a limit or budget, 3 retries of
/// a cluster may be outstanding at once.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Envoy's retry budget: concurrent retries limited to a share of the
/// cluster's requests in flight, but never below a floor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    /// The share in percent (Envoy's default 20).
    pub percent: f64,
    /// The floor (Envoy's default 3).
    pub min_concurrency: u32,
}

/// Outlier detection settings.
#[derive(Clone, Copy, Debug)]
pub struct Outlier {
    /// Consecutive 5xx (or connection failures) before ejection.
    pub consecutive_5xx: u32,
    /// Base ejection time; multiplied by the number of ejections.
    pub base_ejection: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
}

/// A cluster's settings.
#[derive(Debug)]
pub struct ClusterConfig {
    /// `outbound|<port>|<subset>|<host>`.
    pub name: String,
    /// The EDS name of its endpoints.
    pub eds_name: String,
    /// Algorithm.
    pub lb: LbKind,
    /// Limits.
    pub limits: Limits,
    /// Outlier detection.
    pub outlier: Option<Outlier>,
    /// Upstream HTTP version.
    pub protocol: UpstreamProtocol,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl ClusterConfig {
    /// Reads a CDS resource; errors name the field.
    pub fn compile(cluster: &Cluster) -> Result<Self, String> {
        match cluster.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {}
            _ => return Err("type: only EDS clusters are supported".into()),
        }
        let lb = match LbPolicy::try_from(cluster.lb_policy) {
            Ok(LbPolicy::RoundRobin) => LbKind::RoundRobin,
            Ok(LbPolicy::Random) => LbKind::Random,
            Ok(LbPolicy::LeastRequest) => LbKind::LeastRequest,
            Ok(LbPolicy::RingHash | LbPolicy::Maglev) => LbKind::Hash,
            _ => return Err(format!("lb_policy {}: not supported", cluster.lb_policy)),
        };
        let thresholds = cluster
            .circuit_breakers
            .as_ref()
            .and_then(|c| c.thresholds.first());
        let value = |v: Option<&mesh_api::envoy::google::protobuf::UInt32Value>| v.map(|v| v.value);
        let limits = Limits {
            max_connections: value(thresholds.and_then(|t| t.max_connections.as_ref())),
            max_pending_requests: value(thresholds.and_then(|t| t.max_pending_requests.as_ref())),
            max_requests: value(thresholds.and_then(|t| t.max_requests.as_ref())),
            max_retries: value(thresholds.and_then(|t| t.max_retries.as_ref())),
            retry_budget: thresholds
                .and_then(|t| t.retry_budget.as_ref())
                .map(|b| RetryBudget {
                    percent: b
                        .budget_percent
                        .as_ref()
                        .map_or(20.0, |p| p.value.clamp(0.0, 100.0)),
                    min_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
                }),
        };
        let outlier = cluster.outlier_detection.as_ref().map(|o| Outlier {
            consecutive_5xx: o
                .consecutive_5xx
                .as_ref()
                .or(o.consecutive_gateway_failure.as_ref())
                .map_or(5, |v| v.value.max(1)),
            base_ejection: o
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), duration),
            max_ejection_percent: o
                .max_ejection_percent
                .as_ref()
                .map_or(10, |v| v.value.min(100)),
        });
        let mut protocol = UpstreamProtocol::Http1;
        for (name, any) in &cluster.typed_extension_protocol_options {
            if name != HTTP_PROTOCOL_OPTIONS {
                return Err(format!(
                    "typed_extension_protocol_options[{name}]: not supported"
                ));
            }
            let options = HttpProtocolOptions::decode(any.value.as_slice())
                .map_err(|e| format!("typed_extension_protocol_options[{name}]: {e}"))?;
            if let Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
                &options.upstream_protocol_options
                && let Some(ProtocolConfig::Http2ProtocolOptions(_)) = &explicit.protocol_config
            {
                protocol = UpstreamProtocol::Http2;
            }
        }
        Ok(Self {
            name: cluster.name.clone(),
            eds_name: cluster
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| cluster.name.clone()),
            lb,
            limits,
            outlier,
            protocol,
            connect_timeout: cluster
                .connect_timeout
                .as_ref()
                .map_or(Duration::from_secs(10), duration),
        })
    }
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct EndpointConfig {
    /// Address and target port.
    pub addr: SocketAddr,
    /// `addr` as a URI authority, parsed once for every request's URI.
    pub authority: http::uri::Authority,
    /// The workload's SPIFFE identity: reached over HBONE when present,
    /// in plaintext otherwise.
    pub identity: Option<Identity>,
    /// Workload uid.
    pub workload: String,
    /// Ready.
    pub healthy: bool,
}

/// Reads an EDS resource.
pub fn compile_endpoints(
    assignment: &ClusterLoadAssignment,
) -> Result<Vec<EndpointConfig>, String> {
    let mut out = Vec::new();
    for (l, locality) in assignment.endpoints.iter().enumerate() {
        for (i, lb) in locality.lb_endpoints.iter().enumerate() {
            let at = format!("endpoints[{l}].lb_endpoints[{i}]");
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
                return Err(format!("{at}: only inline endpoints are supported"));
            };
            let Some(address::Address::SocketAddress(socket)) =
                endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(format!("{at}.endpoint.address: not a socket address"));
            };
            let ip: IpAddr = socket
                .address
                .parse()
                .map_err(|_| format!("{at}.endpoint.address: {:?} is not an IP", socket.address))?;
            let Some(socket_address::PortSpecifier::PortValue(port)) = socket.port_specifier else {
                return Err(format!("{at}.endpoint.address: no port"));
            };
            let port =
                u16::try_from(port).map_err(|_| format!("{at}: port {port} out of range"))?;
            let identity = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("istio"))
                .and_then(|s| s.fields.get("identity"))
                .map(|v| match &v.kind {
                    Some(value::Kind::StringValue(s)) => s
                        .parse::<Identity>()
                        .map_err(|e| format!("{at}.metadata.istio.identity: {e}")),
                    _ => Err(format!("{at}.metadata.istio.identity: not a string")),
                })
                .transpose()?;
            let addr = SocketAddr::new(ip, port);
            let authority = addr
                .to_string()
                .parse()
                .map_err(|e| format!("{at}: address {addr} is no URI authority: {e}"))?;
            out.push(EndpointConfig {
                addr,
                authority,
                identity,
                workload: endpoint.hostname.clone(),
                healthy: matches!(
                    HealthStatus::try_from(lb.health_status),
                    Ok(HealthStatus::Healthy | HealthStatus::Unknown)
                ),
            });
        }
    }
    Ok(out)
}

/// State of a cluster that survives config updates.
#[derive(Debug, Default)]
pub struct ClusterRuntime {
    next: AtomicUsize,
    /// Requests in flight.
    pub active_requests: AtomicU32,
    /// Retries outstanding: scheduled (in back-off) or in flight.
    pub active_retries: AtomicU32,
    /// Retries refused by the retry limit (Envoy's
    /// `upstream_rq_retry_overflow`).
    pub retry_overflow: AtomicU64,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointHealth>>>,
}

/// Outlier state and load of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// Requests in flight.
    pub active: AtomicU32,
    consecutive_errors: AtomicU32,
    ejections: AtomicU32,
    /// End of the current ejection ([`ticks`]), 0 when not ejected: an
    /// atomic, because every pick reads it for every endpoint.
    ejected_until: AtomicU64,
}

/// `t` as nanoseconds since the process's first use of this clock (at
/// least 1, so 0 can mean "never").
fn ticks(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    (t.saturating_duration_since(epoch).as_nanos() as u64).max(1)
}

impl EndpointHealth {
    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until > ticks(now) {
            return true;
        }
        // Back in: it gets a fresh count (once, whoever sees it first).
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
        false
    }
}

impl ClusterRuntime {
    /// The health record of `addr`, shared across config versions.
    pub fn health(&self, addr: SocketAddr) -> Arc<EndpointHealth> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }
}

/// A cluster ready to serve: settings, endpoints, runtime state.
#[derive(Debug)]
pub struct ClusterEntry {
    /// Settings.
    pub config: Arc<ClusterConfig>,
    /// Endpoints with their health records.
    pub endpoints: Vec<(Arc<EndpointConfig>, Arc<EndpointHealth>)>,
    /// Shared state.
    pub runtime: Arc<ClusterRuntime>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No healthy endpoint (Envoy's `UH`).
    NoHealthy,
}

/// A retry's hold on its cluster's retry limit, released when dropped.
#[derive(Debug)]
pub struct RetrySlot {
    runtime: Arc<ClusterRuntime>,
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.runtime.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClusterEntry {
    /// How many retries may be outstanding now: the retry budget's share
    /// of the requests in flight (at least its floor), else `max_retries`,
    /// else Envoy's default of 3.
    pub fn retry_limit(&self) -> u32 {
        let limits = &self.config.limits;
        match limits.retry_budget {
            Some(budget) => {
                let active = self.runtime.active_requests.load(Ordering::Relaxed);
                let share = (f64::from(active) * budget.percent / 100.0) as u32;
                share.max(budget.min_concurrency)
            }
            None => limits.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
        }
    }

    /// Takes a slot for one retry if the retry limit allows, as Envoy does
    /// when it schedules a retry; the caller holds it through the back-off
    /// and the retried try, until that try's result is judged. When the
    /// limit is reached, counts the overflow and returns `None`.
    pub fn try_retry(&self) -> Option<RetrySlot> {
        let limit = self.retry_limit();
        let taken = self
            .runtime
            .active_retries
            .try_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if taken {
            Some(RetrySlot {
                runtime: self.runtime.clone(),
            })
        } else {
            self.runtime.retry_overflow.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Picks an endpoint: healthy, not ejected, by the cluster's algorithm.
    /// `hash` is the request's hash key (consistent hashing), `roll` a
    /// random number.
    pub fn pick(
        &self,
        hash: u64,
        roll: u64,
    ) -> Result<(Arc<EndpointConfig>, Arc<EndpointHealth>), PickError> {
        let now = Instant::now();
        let usable =
            |e: &&(Arc<EndpointConfig>, Arc<EndpointHealth>)| e.0.healthy && !e.1.is_ejected(now);
        let count = self.endpoints.iter().filter(usable).count();
        if count == 0 {
            // Envoy's panic threshold: when everything is ejected, use all
            // healthy endpoints rather than fail.
            let healthy = self.endpoints.iter().filter(|e| e.0.healthy).count();
            if healthy == 0 {
                return Err(PickError::NoHealthy);
            }
            let nth = (roll % healthy as u64) as usize;
            let e = self
                .endpoints
                .iter()
                .filter(|e| e.0.healthy)
                .nth(nth)
                .expect("counted");
            return Ok(e.clone());
        }
        let nth = match self.config.lb {
            LbKind::RoundRobin => self.runtime.next.fetch_add(1, Ordering::Relaxed) % count,
            LbKind::Random => (roll % count as u64) as usize,
            LbKind::LeastRequest => {
                let a = (roll % count as u64) as usize;
                let b = ((roll >> 32) % count as u64) as usize;
                let load = |i: usize| {
                    self.endpoints
                        .iter()
                        .filter(usable)
                        .nth(i)
                        .map_or(u32::MAX, |e| e.1.active.load(Ordering::Relaxed))
                };
                if load(b) < load(a) { b } else { a }
            }
            LbKind::Hash => {
                // Rendezvous hashing: the endpoint with the highest score for
                // this key; stable while the endpoint set is.
                return Ok(self
                    .endpoints
                    .iter()
                    .filter(usable)
                    .max_by_key(|e| mix(hash ^ mix(addr_key(e.0.addr))))
                    .expect("counted")
                    .clone());
            }
        };
        Ok(self
            .endpoints
            .iter()
            .filter(usable)
            .nth(nth)
            .expect("counted")
            .clone())
    }

    /// Records a request's outcome on `health`, ejecting it after too many
    /// consecutive failures (within the ejection budget).
    pub fn record(&self, health: &EndpointHealth, failed: bool) {
        let Some(outlier) = self.config.outlier else {
            return;
        };
        if !failed {
            health.consecutive_errors.store(0, Ordering::Relaxed);
            return;
        }
        let errors = health.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if errors < outlier.consecutive_5xx {
            return;
        }
        let now = Instant::now();
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.1.is_ejected(now))
            .count();
        let total = self.endpoints.len().max(1);
        // At least one may always be ejected, as Envoy does.
        if ejected > 0 && (ejected + 1) * 100 > total * outlier.max_ejection_percent as usize {
            return;
        }
        let times = health.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let until = now + outlier.base_ejection * times.min(10);
        health.ejected_until.store(ticks(until), Ordering::Relaxed);
        health.consecutive_errors.store(0, Ordering::Relaxed);
        tracing::info!(cluster = %self.config.name, ejected_for = ?(until - now), "endpoint ejected (outlier detection)");
    }
}

fn addr_key(addr: SocketAddr) -> u64 {
    match addr.ip() {
        IpAddr::V4(v4) => (u64::from(u32::from(v4)) << 16) | u64::from(addr.port()),
        IpAddr::V6(v6) => (u128::from(v6) as u64) ^ u64::from(addr.port()),
    }
}

/// A 64-bit mixer (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lb: LbKind, outlier: Option<Outlier>, n: u8) -> ClusterEntry {
        let runtime = Arc::new(ClusterRuntime::default());
        ClusterEntry {
            config: Arc::new(ClusterConfig {
                name: "c".into(),
                eds_name: "c".into(),
                lb,
                limits: Limits::default(),
                outlier,
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
            }),
            endpoints: (0..n)
                .map(|i| {
                    let addr = SocketAddr::from(([10, 0, 0, i], 80));
                    (
                        Arc::new(EndpointConfig {
                            addr,
                            authority: addr.to_string().parse().unwrap(),
                            identity: None,
                            workload: format!("w{i}"),
                            healthy: true,
                        }),
                        runtime.health(addr),
                    )
                })
                .collect(),
            runtime,
        }
    }

    fn with_limits(limits: Limits) -> ClusterEntry {
        let c = entry(LbKind::RoundRobin, None, 1);
        ClusterEntry {
            config: Arc::new(ClusterConfig {
                name: "c".into(),
                eds_name: "c".into(),
                lb: LbKind::RoundRobin,
                limits,
                outlier: None,
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
            }),
            ..c
        }
    }

    #[test]
    fn retry_limit_is_held_until_released() {
        // Envoy's default without a limit: 3 outstanding retries.
        let c = entry(LbKind::RoundRobin, None, 1);
        let held: Vec<RetrySlot> = (0..3).map(|_| c.try_retry().expect("slot")).collect();
        assert!(c.try_retry().is_none(), "a fourth retry overflows");
        assert_eq!(c.runtime.retry_overflow.load(Ordering::Relaxed), 1);
        drop(held);
        assert_eq!(c.runtime.active_retries.load(Ordering::Relaxed), 0);
        assert!(c.try_retry().is_some(), "released slots are free again");

        // DestinationRule `maxRetries: 1`.
        let one = with_limits(Limits {
            max_retries: Some(1),
            ..Limits::default()
        });
        let slot = one.try_retry();
        assert!(slot.is_some() && one.try_retry().is_none());

        // A budget: 20 % of the requests in flight, at least 3.
        let budget = with_limits(Limits {
            max_retries: Some(1),
            retry_budget: Some(RetryBudget {
                percent: 20.0,
                min_concurrency: 3,
            }),
            ..Limits::default()
        });
        assert_eq!(budget.retry_limit(), 3);
        budget.runtime.active_requests.store(50, Ordering::Relaxed);
        assert_eq!(budget.retry_limit(), 10);
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let c = entry(LbKind::RoundRobin, None, 3);
        let mut seen: Vec<_> = (0..3).map(|_| c.pick(0, 0).unwrap().0.addr).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn hashing_is_stable() {
        let c = entry(LbKind::Hash, None, 5);
        let first = c.pick(42, 1).unwrap().0.addr;
        assert!((0..20).all(|r| c.pick(42, r).unwrap().0.addr == first));
    }

    #[test]
    fn failing_endpoint_is_ejected_then_returns() {
        let c = entry(
            LbKind::RoundRobin,
            Some(Outlier {
                consecutive_5xx: 2,
                base_ejection: Duration::from_millis(50),
                max_ejection_percent: 50,
            }),
            2,
        );
        let bad = c.endpoints[0].1.clone();
        c.record(&bad, true);
        c.record(&bad, true);
        assert!((0..10).all(|_| c.pick(0, 0).unwrap().0.addr != c.endpoints[0].0.addr));
        std::thread::sleep(Duration::from_millis(60));
        assert!((0..10).any(|_| c.pick(0, 0).unwrap().0.addr == c.endpoints[0].0.addr));
    }
}
