//! Criterion benchmarks of the control plane's xDS translation: a synthetic
//! ambient cluster (500 Services with their Deployments' pods, 200
//! VirtualServices with DestinationRules, one waypoint) through
//! [`Model::build`], and the result encoded into an xDS snapshot.
//! `cargo bench -p mesh-control --bench translate`.
//!
//! The YAML is generated in memory and loaded with `mesh_config::load_str`,
//! as the control plane loads its config directory; loading is not timed.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{fmt::Write as _, hint::black_box};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_api::{
    envoy::envoy::config::route::v3::{route, route_action},
    type_url,
    workload::address,
};
use mesh_config::Manifests;
use mesh_control::{
    model::{MeshSettings, Model},
    xds::Snapshot,
};

const NAMESPACES: usize = 5;
const SERVICES: usize = 500;
const REPLICAS: usize = 2;
const VIRTUAL_SERVICES: usize = 200;
const NODES: usize = 20;
/// The waypoint's namespace (the first one).
const WAYPOINT_NS: &str = "bench-0";

fn namespace(s: usize) -> String {
    format!("bench-{}", s % NAMESPACES)
}

/// The cluster as `kubectl get -o yaml` would show it: namespaces, the
/// waypoint, Services with their Deployments and those Deployments' pods
/// (the model reads pods, as the API server reports them), VirtualServices
/// and DestinationRules.
fn cluster_yaml() -> String {
    let mut y = String::new();
    for n in 0..NAMESPACES {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench-{n}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
        );
    }
    let _ = write!(
        y,
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: {WAYPOINT_NS}
  labels: {{istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: waypoint, namespace: {WAYPOINT_NS}}}
spec:
  clusterIP: 10.96.255.250
  selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
  ports: [{{name: mesh, port: 15008}}]
"#
    );
    for s in 0..SERVICES {
        let ns = namespace(s);
        let _ = write!(
            y,
            r#"---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: svc-{s}, namespace: {ns}}}
---
apiVersion: v1
kind: Service
metadata:
  name: svc-{s}
  namespace: {ns}
  labels: {{app: svc-{s}, istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: {WAYPOINT_NS}}}
spec:
  clusterIP: 10.96.{}.{}
  selector: {{app: svc-{s}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: svc-{s}, namespace: {ns}, labels: {{app: svc-{s}}}}}
spec:
  replicas: {REPLICAS}
  selector: {{matchLabels: {{app: svc-{s}, version: v1}}}}
  template:
    metadata: {{labels: {{app: svc-{s}, version: v1}}}}
    spec:
      serviceAccountName: svc-{s}
      containers: [{{name: app, image: "registry.local/app:1.0", ports: [{{containerPort: 8080}}]}}]
"#,
            s / 250,
            s % 250 + 1,
        );
        for r in 0..REPLICAS {
            let p = s * REPLICAS + r;
            let _ = write!(
                y,
                r#"---
apiVersion: v1
kind: Pod
metadata:
  name: svc-{s}-5d8f7c9b4-{r}
  namespace: {ns}
  labels: {{app: svc-{s}, version: v1, pod-template-hash: 5d8f7c9b4}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: svc-{s}-5d8f7c9b4, uid: rs-{s}, controller: true}}]
spec:
  nodeName: node-{}
  serviceAccountName: svc-{s}
  containers: [{{name: app, image: "registry.local/app:1.0", ports: [{{containerPort: 8080}}]}}]
status:
  podIP: 10.244.{}.{}
  phase: Running
  conditions: [{{type: Ready, status: "True"}}]
"#,
                p % NODES,
                p / 250,
                p % 250 + 1,
            );
        }
    }
    for v in 0..VIRTUAL_SERVICES {
        let ns = namespace(v);
        let _ = write!(
            y,
            r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{v}, namespace: {ns}}}
spec:
  hosts: [svc-{v}]
  http:
  - name: jason
    match: [{{headers: {{end-user: {{exact: jason}}}}, uri: {{prefix: /api/}}}}]
    route: [{{destination: {{host: svc-{v}, subset: v2}}}}]
  - name: canary
    match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
    route:
    - {{destination: {{host: svc-{v}, subset: v1}}, weight: 50}}
    - {{destination: {{host: svc-{v}, subset: v2}}, weight: 50}}
  - name: default
    timeout: 10s
    retries: {{attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure"}}
    route:
    - {{destination: {{host: svc-{v}, subset: v1}}, weight: 80}}
    - {{destination: {{host: svc-{v}, subset: v2}}, weight: 20}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{v}, namespace: {ns}}}
spec:
  host: svc-{v}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    connectionPool: {{tcp: {{maxConnections: 100}}, http: {{http1MaxPendingRequests: 64, http2MaxRequests: 1000}}}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
"#
        );
    }
    y
}

/// The generated cluster, loaded and validated as the control plane does.
fn manifests() -> Manifests {
    let loaded = mesh_config::load_str("bench.yaml", &cluster_yaml());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let (manifests, invalid) = mesh_config::validate::partition(loaded.manifests);
    assert!(invalid.is_empty(), "{invalid:?}");
    assert_eq!(manifests.services.len(), SERVICES + 1);
    assert_eq!(manifests.deployments.len(), SERVICES);
    assert_eq!(manifests.pods.len(), SERVICES * REPLICAS);
    assert_eq!(manifests.virtual_services.len(), VIRTUAL_SERVICES);
    assert_eq!(manifests.destination_rules.len(), VIRTUAL_SERVICES);
    assert_eq!(manifests.kube_gateways.len(), 1);
    manifests
}

/// Checks the translation produced the whole config, so the benchmark
/// cannot silently measure an empty one.
fn check(model: &Model) {
    assert!(model.warnings.is_empty(), "{:?}", model.warnings);
    let services = model
        .addresses
        .values()
        .filter(|a| matches!(a.r#type, Some(address::Type::Service(_))))
        .count();
    let waypointed = model
        .addresses
        .values()
        .filter(|a| matches!(&a.r#type, Some(address::Type::Service(s)) if s.waypoint.is_some()))
        .count();
    assert_eq!(services, SERVICES + 1, "the waypoint's Service too");
    assert_eq!(waypointed, SERVICES);
    assert_eq!(model.addresses.len(), SERVICES + 1 + SERVICES * REPLICAS);

    let envoy = &model.envoy;
    // A default cluster per service port (the waypoint's included), and one
    // per DestinationRule subset.
    assert_eq!(envoy.clusters.len(), SERVICES + 1 + VIRTUAL_SERVICES * 2);
    assert_eq!(envoy.endpoints.len(), envoy.clusters.len());
    let (_, v1) = &envoy.endpoints["outbound|80|v1|svc-0.bench-0.svc.cluster.local"];
    assert_eq!(v1.endpoints[0].lb_endpoints.len(), REPLICAS);
    // One listener for the waypoint, a filter chain and a route
    // configuration per bound service port.
    assert_eq!(envoy.listeners.len(), 1);
    let (_, listener) = &envoy.listeners["waypoint~bench-0~waypoint"];
    assert_eq!(listener.filter_chains.len(), SERVICES);
    assert_eq!(envoy.routes.len(), SERVICES);
    let routes: Vec<_> = envoy
        .routes
        .values()
        .flat_map(|(_, config)| &config.virtual_hosts)
        .flat_map(|host| &host.routes)
        .collect();
    // Three routes per VirtualService, one default route for the others.
    assert_eq!(
        routes.len(),
        VIRTUAL_SERVICES * 3 + (SERVICES - VIRTUAL_SERVICES)
    );
    let weighted = routes
        .iter()
        .filter(|r| {
            matches!(
                &r.action,
                Some(route::Action::Route(a)) if matches!(
                    a.cluster_specifier,
                    Some(route_action::ClusterSpecifier::WeightedClusters(_))
                )
            )
        })
        .count();
    assert_eq!(weighted, VIRTUAL_SERVICES * 2);
    let with_headers = routes
        .iter()
        .filter(|r| r.r#match.as_ref().is_some_and(|m| !m.headers.is_empty()))
        .count();
    assert_eq!(with_headers, VIRTUAL_SERVICES * 2);
}

fn bench(c: &mut Criterion) {
    let manifests = manifests();
    let settings = MeshSettings::default();
    let model = Model::build(&manifests, &settings);
    check(&model);
    c.bench_function("translate/500_services", |b| {
        b.iter(|| black_box(Model::build(black_box(&manifests), black_box(&settings))))
    });

    // A first version: nothing to reuse, every resource encoded.
    let empty = Snapshot::default();
    let first = model.encode(&empty, 1);
    let held = |t: &str| first.types.get(t).map_or(0, |m| m.len());
    assert_eq!(held(type_url::ADDRESS), model.addresses.len());
    assert_eq!(held(type_url::CLUSTER), model.envoy.clusters.len());
    assert_eq!(held(type_url::ENDPOINT), model.envoy.endpoints.len());
    assert_eq!(held(type_url::ROUTE), SERVICES);
    assert_eq!(held(type_url::LISTENER), 1);
    c.bench_function("translate/snapshot_500_services", |b| {
        b.iter(|| black_box(black_box(&model).encode(&empty, 1)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
