//! Criterion benchmarks of ztunnel's per-connection work: resolving a
//! destination (service VIP → endpoint, or pod IP) and the L4 policy check.
//! `cargo bench -p ztunnel` (also listed in docs/performance.md).

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_api::{
    security::{self as sec, Action, Authorization, Clause, Match, Scope, StringMatch},
    type_url,
    workload::{
        Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
        address,
    },
};
use mesh_xds::{Resource, Update};
use prost::Message;
use ztunnel::{
    discovery::{Discovery, Resolved},
    policy::{Connection, PolicyStore, Target},
};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i)
}

/// 10,000 workloads; the first `endpoints` serve one service on port 80.
fn discovery(endpoints: u32) -> Discovery {
    let key = "default/web.default.svc.cluster.local";
    let mut resources = vec![resource(
        key,
        address::Type::Service(Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: SERVICE_VIP.octets().to_vec(),
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        }),
    )];
    for i in 0..10_000 {
        let uid = format!("Kubernetes//Pod/default/pod-{i}");
        let mut services = HashMap::new();
        if i < endpoints {
            services.insert(
                key.to_owned(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            );
        }
        resources.push(resource(
            &uid,
            address::Type::Workload(Workload {
                uid: uid.clone(),
                name: format!("pod-{i}"),
                namespace: "default".into(),
                addresses: vec![pod_ip(i).octets().to_vec()],
                tunnel_protocol: TunnelProtocol::Hbone as i32,
                trust_domain: "cluster.local".into(),
                service_account: "web".into(),
                node: "node0".into(),
                services,
                status: WorkloadStatus::Healthy as i32,
                ..Default::default()
            }),
        ));
    }
    let discovery = Discovery::default();
    discovery
        .apply(Update {
            type_url: type_url::ADDRESS.into(),
            resources,
            removed: Vec::new(),
        })
        .expect("valid addresses");
    discovery
}

fn resource(name: &str, r#type: address::Type) -> Resource {
    Resource {
        name: name.to_owned(),
        value: Address {
            r#type: Some(r#type),
        }
        .encode_to_vec()
        .into(),
    }
}

fn exact(value: &str) -> StringMatch {
    StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(value.to_owned())),
    }
}

/// 50 namespace-scoped policies: 10 DENY that do not match, 40 ALLOW of
/// which only the last matches the caller.
fn policies() -> PolicyStore {
    let store = PolicyStore::new("istio-system");
    let resources = (0..50)
        .map(|i| {
            let action = if i < 10 { Action::Deny } else { Action::Allow };
            let principal = if i == 49 {
                "cluster.local/ns/default/sa/client".to_owned()
            } else {
                format!("cluster.local/ns/other/sa/sa-{i}")
            };
            let policy = Authorization {
                name: format!("p{i}"),
                namespace: "default".into(),
                scope: Scope::Namespace as i32,
                action: action as i32,
                rules: vec![sec::Rule {
                    clauses: vec![
                        Clause {
                            matches: vec![Match {
                                principals: vec![exact(&principal)],
                                ..Default::default()
                            }],
                        },
                        Clause {
                            matches: vec![Match {
                                destination_ports: vec![8080, 9080],
                                ..Default::default()
                            }],
                        },
                    ],
                }],
                ..Default::default()
            };
            Resource {
                name: format!("default/p{i}"),
                value: policy.encode_to_vec().into(),
            }
        })
        .collect();
    store
        .apply(Update {
            type_url: type_url::AUTHORIZATION.into(),
            resources,
            removed: Vec::new(),
        })
        .expect("valid policies");
    store
}

fn bench(c: &mut Criterion) {
    let discovery = discovery(100);
    let vip = SocketAddr::new(IpAddr::V4(SERVICE_VIP), 80);
    let pod = SocketAddr::new(IpAddr::V4(pod_ip(5_000)), 8080);
    assert!(matches!(discovery.resolve(vip), Resolved::Workload { .. }));
    c.bench_function("resolve/service_vip_100_endpoints", |b| {
        b.iter(|| black_box(discovery.resolve(black_box(vip))))
    });
    c.bench_function("resolve/pod_ip_of_10000", |b| {
        b.iter(|| black_box(discovery.resolve(black_box(pod))))
    });

    let store = policies();
    let connection = Connection {
        source_identity: Some("spiffe://cluster.local/ns/default/sa/client"),
        source_ip: IpAddr::V4(pod_ip(1)),
        destination_ip: IpAddr::V4(pod_ip(2)),
        destination_port: 8080,
    };
    let target = Target {
        namespace: "default",
        selected_by: &[],
    };
    assert_eq!(
        store.check(target, &connection),
        ztunnel::policy::Decision::Allow
    );
    c.bench_function("policy/check_50_policies", |b| {
        b.iter(|| black_box(store.check(black_box(target), black_box(&connection))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
