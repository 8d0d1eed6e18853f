//! Criterion benchmarks of the waypoint's per-request work: choosing a route
//! (virtual host by authority, then the first matching route), applying a
//! route's header edits, and picking an endpoint by each load balancer.
//! `cargo bench -p waypoint --bench l7_paths`.
//!
//! Every table is built through the public compile functions from Envoy
//! protos, as the xDS handler builds them.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{collections::HashMap, hint::black_box, sync::Arc};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, request::Parts};
use mesh_api::envoy::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
            },
            core::v3::{
                Address, HeaderValue, HeaderValueOption, Metadata, SocketAddress, address,
                header_value_option::HeaderAppendAction, socket_address,
            },
            endpoint::v3::{
                ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
            },
            route::v3::{
                HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
                VirtualHost, WeightedCluster, header_matcher::HeaderMatchSpecifier, route,
                route_action, route_match, weighted_cluster,
            },
        },
        r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
    },
    google::protobuf::{Duration as ProtoDuration, Struct, UInt32Value, Value, value},
};
use waypoint::{
    cluster::{ClusterConfig, ClusterEntry, ClusterRuntime, compile_endpoints},
    route::{Action, HeaderEdits, RouteTable},
};

const HOST: &str = "reviews.bench.svc.cluster.local";

/// A request as the waypoint sees it after HTTP/1 parsing: ~12 headers.
fn request(path: &str, authority: &str, end_user: &str) -> Parts {
    http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", authority)
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench/1.0")
        .header("accept", "application/json, text/plain, */*")
        .header("accept-encoding", "gzip, deflate, br")
        .header("accept-language", "en-US,en;q=0.9")
        .header("end-user", end_user)
        .header("cookie", "session=4f2a9c0e1b7d; theme=dark")
        .header("x-request-id", "7b6c3f0e-5a1d-4c8e-9f2b-3d4e5f6a7b8c")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-for", "10.244.3.17")
        .header("content-length", "0")
        .body(())
        .expect("valid request")
        .into_parts()
        .0
}

fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.into())),
            ignore_case: false,
        })),
        ..Default::default()
    }
}

fn header_option(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

/// What Istio makes of a VirtualService `http[i]`: a prefix and header
/// match, an 80/20 split over two subsets, a timeout and retries.
fn istio_route(name: String, prefix: String, headers: Vec<HeaderMatcher>) -> Route {
    let subset = |s: &str, weight: u32| weighted_cluster::ClusterWeight {
        name: format!("outbound|9080|{s}|{HOST}"),
        weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    };
    Route {
        name,
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(prefix)),
            headers,
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: vec![subset("v1", 80), subset("v2", 20)],
                    ..Default::default()
                },
            )),
            timeout: Some(ProtoDuration {
                seconds: 15,
                nanos: 0,
            }),
            retry_policy: Some(RetryPolicy {
                retry_on:
                    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                        .into(),
                num_retries: Some(UInt32Value { value: 2 }),
                retriable_status_codes: vec![503],
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// One virtual host (`*`, as at a waypoint) with 100 routes, each matching
/// its own path prefix and `end-user: jason-<i>`.
fn header_routes() -> RouteTable {
    let routes = (0..100)
        .map(|i| {
            istio_route(
                format!("bench/reviews.http[{i}]"),
                format!("/api/v{i}/"),
                vec![exact_header("end-user", &format!("jason-{i}"))],
            )
        })
        .collect();
    RouteTable::compile(&RouteConfiguration {
        name: format!("inbound-vip|9080|http|{HOST}"),
        virtual_hosts: vec![VirtualHost {
            name: format!("{HOST}:9080"),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    })
    .expect("valid routes")
}

/// 200 virtual hosts (as at an ingress gateway), each with Istio's domain
/// forms of one service and two routes.
fn virtual_hosts() -> RouteTable {
    let virtual_hosts = (0..200)
        .map(|i| VirtualHost {
            name: format!("svc-{i}.bench.svc.cluster.local:80"),
            domains: vec![
                format!("svc-{i}.bench.svc.cluster.local"),
                format!("svc-{i}.bench.svc"),
                format!("svc-{i}.bench"),
                format!("svc-{i}.example.com"),
            ],
            routes: vec![
                istio_route(
                    format!("bench/svc-{i}.http[0]"),
                    "/admin/".into(),
                    vec![exact_header("end-user", "admin")],
                ),
                istio_route(format!("bench/svc-{i}.http[1]"), "/".into(), Vec::new()),
            ],
            ..Default::default()
        })
        .collect();
    RouteTable::compile(&RouteConfiguration {
        name: "http.80".into(),
        virtual_hosts,
        ..Default::default()
    })
    .expect("valid virtual hosts")
}

/// The request edits of a route that sets, adds and removes headers.
fn edit_table() -> RouteTable {
    let mut route = istio_route("bench/edits.http[0]".into(), "/".into(), Vec::new());
    route.request_headers_to_add = vec![
        header_option(
            "x-envoy-upstream-service",
            "reviews",
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ),
        header_option(
            "x-forwarded-proto",
            "https",
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ),
        header_option(
            "x-forwarded-for",
            "10.244.0.1",
            HeaderAppendAction::AppendIfExistsOrAdd,
        ),
        header_option(
            "x-mesh-canary",
            "v2",
            HeaderAppendAction::AppendIfExistsOrAdd,
        ),
    ];
    route.request_headers_to_remove = vec!["cookie".into(), "x-debug".into()];
    RouteTable::compile(&RouteConfiguration {
        name: "edits".into(),
        virtual_hosts: vec![VirtualHost {
            domains: vec!["*".into()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    })
    .expect("valid header edits")
}

/// A cluster of 100 healthy HBONE endpoints, compiled from CDS and EDS.
fn cluster(lb: LbPolicy) -> ClusterEntry {
    let name = format!("outbound|9080|v1|{HOST}");
    let config = ClusterConfig::compile(&Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            service_name: name.clone(),
            ..Default::default()
        }),
        lb_policy: lb as i32,
        connect_timeout: Some(ProtoDuration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    })
    .expect("valid cluster");
    let lb_endpoints = (0..100)
        .map(|i| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: format!("10.244.{}.{}", i / 50, 10 + i % 50),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(9080)),
                        ..Default::default()
                    })),
                }),
                hostname: format!("Kubernetes//Pod/bench/reviews-v1-{i}"),
                ..Default::default()
            })),
            metadata: Some(Metadata {
                filter_metadata: HashMap::from([(
                    "istio".to_owned(),
                    Struct {
                        fields: HashMap::from([(
                            "identity".to_owned(),
                            Value {
                                kind: Some(value::Kind::StringValue(
                                    "spiffe://cluster.local/ns/bench/sa/reviews".into(),
                                )),
                            },
                        )]),
                    },
                )]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let endpoints = compile_endpoints(&ClusterLoadAssignment {
        cluster_name: name,
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    })
    .expect("valid endpoints");
    assert_eq!(endpoints.len(), 100);
    assert!(endpoints.iter().all(|e| e.healthy && e.identity.is_some()));
    // As the xDS handler publishes it.
    let runtime = Arc::new(ClusterRuntime::default());
    ClusterEntry {
        config: Arc::new(config),
        endpoints: endpoints
            .into_iter()
            .map(|e| {
                let health = runtime.health(e.addr);
                (Arc::new(e), health)
            })
            .collect(),
        runtime,
    }
}

fn bench_routes(c: &mut Criterion) {
    let table = header_routes();
    assert_eq!(table.len(), 100);
    let first = request("/api/v0/reviews/1", "reviews:9080", "jason-0");
    let last = request("/api/v99/reviews/1", "reviews:9080", "jason-99");
    let found = |r: &Parts| table.find(r).map(|r| r.name.as_str());
    assert_eq!(found(&first), Some("bench/reviews.http[0]"));
    assert_eq!(found(&last), Some("bench/reviews.http[99]"));
    c.bench_function("route/first_of_100", |b| {
        b.iter(|| black_box(table.find(black_box(&first)).is_some()))
    });
    c.bench_function("route/last_of_100", |b| {
        b.iter(|| black_box(table.find(black_box(&last)).is_some()))
    });

    let hosts = virtual_hosts();
    assert_eq!(hosts.len(), 400);
    let to_last = request(
        "/productpage",
        "SVC-199.bench.svc.cluster.local:80",
        "jason",
    );
    assert_eq!(
        hosts.find(&to_last).map(|r| r.name.as_str()),
        Some("bench/svc-199.http[1]")
    );
    c.bench_function("route/host_of_200_vhosts", |b| {
        b.iter(|| black_box(hosts.find(black_box(&to_last)).is_some()))
    });
}

fn bench_headers(c: &mut Criterion) {
    let table = edit_table();
    let parts = request("/reviews/1", "reviews:9080", "jason");
    let route = table.find(&parts).expect("catch-all route");
    let edits: &HeaderEdits = &route.request_headers;
    assert!(matches!(route.action, Action::Forward(_)));
    assert_eq!(parts.headers.len(), 12);
    let mut edited = parts.headers.clone();
    edits.apply(&mut edited);
    assert!(!edited.contains_key("cookie"));
    assert_eq!(edited["x-forwarded-proto"], "https");
    assert_eq!(edited.get_all("x-forwarded-for").iter().count(), 2);
    assert_eq!(edited["x-mesh-canary"], "v2");
    c.bench_function("headers/edit_request", |b| {
        b.iter_batched(
            || parts.headers.clone(),
            |mut headers: HeaderMap| {
                edits.apply(&mut headers);
                headers
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_endpoints(c: &mut Criterion) {
    for (name, lb) in [
        ("endpoint/round_robin_100", LbPolicy::RoundRobin),
        ("endpoint/least_request_100", LbPolicy::LeastRequest),
        ("endpoint/hash_100", LbPolicy::RingHash),
    ] {
        let entry = cluster(lb);
        assert!(entry.pick(1, 1).is_ok());
        let mut seq = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                // Fresh request hash and random roll each time, as requests
                // bring.
                seq = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let picked = entry.pick(black_box(seq), black_box(seq.rotate_left(17)));
                black_box(picked.is_ok())
            })
        });
    }
}

criterion_group!(benches, bench_routes, bench_headers, bench_endpoints);
criterion_main!(benches);
