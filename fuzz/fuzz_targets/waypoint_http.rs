//! Any bytes as the client side of one tunnel's HTTP connection into the
//! waypoint (HTTP/1.1, or HTTP/2 after its preface), with a fixed config:
//! a direct-response route, and a route with a timeout and retries to a
//! cluster whose only endpoint refuses connections. The server answers or
//! closes, never panics, and ends once the client has closed its side.
#![no_main]

use std::{net::SocketAddr, sync::Arc, sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_api::{
    envoy::{
        envoy::config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
            },
            core::v3::{Address, SocketAddress, address, socket_address},
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
            },
            route::v3::{
                DirectResponseAction, RetryPolicy, Route, RouteAction, RouteConfiguration,
                RouteMatch, VirtualHost, route, route_action, route_match,
            },
        },
        google::protobuf::{Duration as ProtoDuration, UInt32Value},
    },
    type_url,
};
use mesh_hbone::{CertStore, Identity, Pool, PoolConfig};
use mesh_xds::{Handler, Resource, Update};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint::{
    access_log::AccessLog,
    config::{Store, XdsHandler},
    metrics::Metrics,
    proxy::{Waypoint, serve_http_for_fuzzing},
    upstream::{Clients, Connector, ConnectorInner},
};

const ROUTES: &str = "inbound-vip|80|http|fuzz";
const CLUSTER: &str = "outbound|80||fuzz.default.svc.cluster.local";
/// Nothing listens there: every upstream try fails to connect.
const REFUSING: u16 = 9;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    waypoint: Arc<Waypoint>,
}

fn prefix(prefix: &str) -> Option<RouteMatch> {
    Some(RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.into())),
        ..Default::default()
    })
}

fn resources() -> [(&'static str, Vec<u8>); 3] {
    let routes = RouteConfiguration {
        name: ROUTES.into(),
        virtual_hosts: vec![VirtualHost {
            name: "fuzz".into(),
            domains: vec!["*".into()],
            routes: vec![
                Route {
                    name: "direct".into(),
                    r#match: prefix("/direct"),
                    action: Some(route::Action::DirectResponse(DirectResponseAction {
                        status: 204,
                        ..Default::default()
                    })),
                    ..Default::default()
                },
                Route {
                    name: "forward".into(),
                    r#match: prefix("/"),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            CLUSTER.into(),
                        )),
                        timeout: Some(ProtoDuration {
                            seconds: 0,
                            nanos: 500_000_000,
                        }),
                        retry_policy: Some(RetryPolicy {
                            retry_on: "connect-failure,reset,5xx".into(),
                            num_retries: Some(UInt32Value { value: 1 }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let cluster = Cluster {
        name: CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            service_name: CLUSTER.into(),
            ..Default::default()
        }),
        connect_timeout: Some(ProtoDuration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        ..Default::default()
    };
    let endpoints = ClusterLoadAssignment {
        cluster_name: CLUSTER.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "127.0.0.1".into(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                REFUSING.into(),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    [
        (type_url::ROUTE, routes.encode_to_vec()),
        (type_url::CLUSTER, cluster.encode_to_vec()),
        (type_url::ENDPOINT, endpoints.encode_to_vec()),
    ]
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let entered = runtime.enter();
        let store = Arc::new(Store::default());
        let mut handler = XdsHandler::new(store.clone());
        for (type_url, value) in resources() {
            handler
                .apply(Update {
                    type_url: type_url.to_owned(),
                    resources: vec![Resource {
                        name: "fuzz".to_owned(),
                        value: value.into(),
                    }],
                    removed: Vec::new(),
                })
                .expect("the fixed config compiles");
        }
        let connector = Connector::new(ConnectorInner {
            pool: Pool::new(CertStore::new(), PoolConfig::default()),
            local: Identity::new("cluster.local", "default", "waypoint"),
            local_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: store.clone(),
            connect_timeout: Duration::from_millis(100),
        });
        let waypoint = Arc::new(Waypoint {
            store,
            clients: Clients::new(connector.clone()),
            connector,
            metrics: Metrics::default(),
            access_log: AccessLog::off(),
        });
        drop(entered);
        Fixture { runtime, waypoint }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    fixture.runtime.block_on(async {
        let (mut client, server_io) = tokio::io::duplex(64 * 1024);
        let service = SocketAddr::from(([10, 96, 0, 1], 80));
        let serve = serve_http_for_fuzzing(fixture.waypoint.clone(), ROUTES, service, server_io);
        let feed = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Drain what the server answers so it never blocks on writing.
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        // Every wait in the path is bounded (route timeout 0.5 s, connect
        // 0.1 s, retry back-off), so a connection whose client has closed
        // must end well within this.
        let both = async { tokio::join!(serve, feed) };
        if tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .is_err()
        {
            panic!("the HTTP server did not end after the client closed");
        }
    });
});
