//! The Kubernetes API config source against an in-process fake API server:
//! what is listed is loaded, watch events change the next load, a 410 Gone
//! relists, a CRD that is not installed leaves the rest working, and an
//! invalid object is reported by kind, namespace, name and field.

mod common;
use common::http_get;

use std::time::Duration;

use mesh_config::validate;
use mesh_control::{
    ControlPlane, Options, SourceOptions,
    model::MeshSettings,
    source::{
        KubeSource,
        kubernetes::{KubeOptions, WATCHED},
    },
};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};

/// How long a change may take to show (the watcher's backoff after an
/// error starts at 0.8 s and doubles).
const PATIENCE: Duration = Duration::from_secs(20);

/// The fake's kind for each kind the source watches, at the default versions.
fn kinds() -> Vec<Kind> {
    let options = KubeOptions::default();
    WATCHED
        .iter()
        .map(|watched| {
            let resource = options.api_resource(watched);
            Kind::new(
                &resource.api_version,
                &resource.kind,
                &resource.plural,
                watched.namespaced,
            )
        })
        .collect()
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "selector": {"app": name},
                    "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}]}})
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": app},
                        "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1"}]},
           "spec": {"nodeName": "node0", "serviceAccountName": app,
                    "containers": [{"name": "app", "image": "app:1"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn virtual_service(ns: &str, name: &str, host: &str, weights: &[Value]) -> Value {
    let route: Vec<Value> = weights
        .iter()
        .enumerate()
        .map(|(i, weight)| json!({"destination": {"host": host, "subset": format!("v{}", i + 1)}, "weight": weight}))
        .collect();
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"hosts": [host], "http": [{"route": route}]}})
}

fn destination_rule(ns: &str, host: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
           "metadata": {"name": host, "namespace": ns},
           "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                              {"name": "v2", "labels": {"version": "v2"}}]}})
}

fn authorization_policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
                    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/productpage"]}}]}]}})
}

fn kube_gateway(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

fn reference_grant(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "web"}],
                    "to": [{"group": "", "kind": "Service", "name": "reviews"}]}})
}

/// A fake serving every watched kind, holding a small shop.
async fn shop() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    for kind in kinds() {
        server.serve(kind);
    }
    server.apply(namespace("shop"));
    server.apply(service("shop", "reviews", "10.96.0.30"));
    server.apply(pod("shop", "reviews-0", "reviews", "10.244.0.30"));
    server.apply(destination_rule("shop", "reviews"));
    server.apply(virtual_service(
        "shop",
        "reviews",
        "reviews",
        &[json!(80), json!(20)],
    ));
    server.apply(authorization_policy("shop", "reviews"));
    server.apply(reference_grant("shop", "web-routes"));
    server
}

async fn source(server: &FakeApiServer) -> KubeSource {
    tokio::time::timeout(
        PATIENCE,
        KubeSource::start(server.client(), &KubeOptions::default()),
    )
    .await
    .expect("first list within the patience")
    .expect("source starts")
}

/// Waits for the next settled change and loads it.
async fn next(source: &mut KubeSource) -> mesh_config::Loaded {
    tokio::time::timeout(PATIENCE, source.changed())
        .await
        .expect("a change within the patience");
    source.load()
}

fn names<T>(
    list: &[T],
    meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Vec<String> {
    list.iter()
        .map(|r| meta(r).name.clone().unwrap_or_default())
        .collect()
}

fn pod_names(pods: &[mesh_config::Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn listed_objects_are_loaded_through_the_config_parser() {
    let server = shop().await;
    let mut source = source(&server).await;
    let loaded = source.load();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert!(
        loaded.warnings.is_empty(),
        "objects as the API server returns them (uid, resourceVersion, managedFields) warn about nothing: {:?}",
        loaded.warnings
    );
    let m = &loaded.manifests;
    assert_eq!(names(&m.namespaces, |r| &r.metadata), ["shop"]);
    assert_eq!(names(&m.services, |r| &r.metadata), ["reviews"]);
    assert_eq!(pod_names(&m.pods), ["reviews-0"]);
    assert_eq!(names(&m.destination_rules, |r| &r.metadata), ["reviews"]);
    assert_eq!(names(&m.virtual_services, |r| &r.metadata), ["reviews"]);
    assert_eq!(
        names(&m.authorization_policies, |r| &r.metadata),
        ["reviews"]
    );
    assert_eq!(names(&m.reference_grants, |r| &r.metadata), ["web-routes"]);
    // List items have no apiVersion/kind; the source restores them.
    assert_eq!(m.virtual_services[0].api_version, "networking.istio.io/v1");
    assert_eq!(
        m.reference_grants[0].api_version, "gateway.networking.k8s.io/v1beta1",
        "ReferenceGrants are watched at the version every release serves"
    );
    assert_eq!(
        m.pods[0].status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.0.30")
    );
    assert_eq!(
        m.sources
            .values()
            .filter(|s| s.starts_with("kubernetes:"))
            .count(),
        m.len()
    );
    assert!(
        m.sources
            .values()
            .any(|s| s == "kubernetes:VirtualService/shop/reviews"),
        "{:?}",
        m.sources
    );
    assert!(m.sources.values().any(|s| s == "kubernetes:Namespace/shop"));
    // The whole config validates, as it would from a directory.
    let (_, invalid) = validate::partition(loaded.manifests);
    assert!(invalid.is_empty(), "{invalid:?}");
    // Secrets are watched without service-account tokens and Helm releases.
    let secrets = server
        .requests()
        .into_iter()
        .find(|r| r.starts_with("GET /api/v1/secrets?"))
        .expect("secrets listed");
    assert!(
        secrets.contains("type!=kubernetes.io/service-account-token"),
        "{secrets}"
    );
}

#[tokio::test]
async fn added_modified_and_deleted_events_change_the_next_load() {
    let server = shop().await;
    let mut source = source(&server).await;
    assert_eq!(source.load().manifests.pods.len(), 1);

    server.apply(pod("shop", "reviews-1", "reviews", "10.244.0.31"));
    let loaded = next(&mut source).await;
    assert_eq!(
        pod_names(&loaded.manifests.pods),
        ["reviews-0", "reviews-1"]
    );

    server.apply(virtual_service(
        "shop",
        "reviews",
        "reviews",
        &[json!(50), json!(50)],
    ));
    let loaded = next(&mut source).await;
    let route = &loaded.manifests.virtual_services[0].spec.http[0].route;
    assert_eq!(
        route.iter().map(|r| r.weight).collect::<Vec<_>>(),
        [Some(50), Some(50)]
    );

    assert!(server.delete("v1", "Pod", "shop", "reviews-0"));
    let loaded = next(&mut source).await;
    assert_eq!(pod_names(&loaded.manifests.pods), ["reviews-1"]);
}

#[tokio::test]
async fn after_410_gone_the_relisted_state_is_loaded() {
    let server = shop().await;
    let mut source = source(&server).await;
    assert_eq!(source.load().manifests.pods.len(), 1);
    let lists = |server: &FakeApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(&server), 1);

    // Changes no watch hears of, then the history is compacted away.
    server.apply_unannounced(pod("shop", "reviews-2", "reviews", "10.244.0.32"));
    assert!(server.delete_unannounced("v1", "Pod", "shop", "reviews-0"));
    server.apply_unannounced(namespace("billing"));
    server.expire_watches();

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let loaded = next(&mut source).await;
        let pods = pod_names(&loaded.manifests.pods);
        let namespaces = names(&loaded.manifests.namespaces, |r| &r.metadata);
        if pods == ["reviews-2"] && namespaces == ["billing", "shop"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relisted state not loaded: pods {pods:?}, namespaces {namespaces:?}"
        );
    }
    assert!(lists(&server) >= 2, "pods were listed again after the 410");
    // And the new watches work.
    server.apply(pod("shop", "reviews-3", "reviews", "10.244.0.33"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while next(&mut source).await.manifests.pods.len() != 2 {
        assert!(tokio::time::Instant::now() < deadline, "watch after relist");
    }
}

#[tokio::test]
async fn a_crd_that_is_not_installed_leaves_the_other_kinds_working() {
    let server = FakeApiServer::start().await;
    let gateway_api = Kind::new("gateway.networking.k8s.io/v1", "Gateway", "gateways", true);
    let service_entries = Kind::new(
        "networking.istio.io/v1",
        "ServiceEntry",
        "serviceentries",
        true,
    );
    for kind in kinds() {
        if kind != gateway_api && kind != service_entries {
            server.serve(kind);
        }
    }
    server.apply(namespace("shop"));
    server.apply(virtual_service("shop", "reviews", "reviews", &[json!(100)]));
    let mut source = source(&server).await;
    let loaded = source.load();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert_eq!(loaded.manifests.virtual_services.len(), 1);
    assert!(loaded.manifests.kube_gateways.is_empty());

    // The rest keeps being watched.
    server.apply(service("shop", "reviews", "10.96.0.30"));
    assert_eq!(next(&mut source).await.manifests.services.len(), 1);

    // The missing kind is retried with backoff, not in a tight loop...
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /apis/gateway.networking.k8s.io/v1/gateways?"))
        .count();
    assert!(
        (1..=4).contains(&tries),
        "{tries} lists of a missing kind in 2 s"
    );

    // ...and picked up once the CRD is installed.
    server.serve(gateway_api);
    server.apply(kube_gateway("shop", "waypoint"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let loaded = next(&mut source).await;
        if names(&loaded.manifests.kube_gateways, |r| &r.metadata) == ["waypoint"] {
            assert_eq!(loaded.manifests.virtual_services.len(), 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Gateway never loaded"
        );
    }
}

#[tokio::test]
async fn an_invalid_virtual_service_is_reported_by_kind_namespace_name_and_field() {
    let server = shop().await;
    // Wrong type: the parser rejects it.
    server.apply(virtual_service("shop", "typo", "ratings", &[json!("half")]));
    // Well-typed, but breaks a rule: validation rejects it.
    server.apply(destination_rule("shop", "reviews-canary"));
    server.apply(virtual_service(
        "shop",
        "uneven",
        "reviews-canary",
        &[json!(70), json!(20)],
    ));
    let mut source = source(&server).await;
    let loaded = source.load();
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "kubernetes:VirtualService/shop/typo: document 1 (VirtualService shop/typo): field `spec.http[0].route[0].weight`"
        ),
        "{}",
        errors[0]
    );
    let (manifests, invalid) = validate::partition(loaded.manifests);
    let invalid: Vec<String> = invalid.iter().map(ToString::to_string).collect();
    assert_eq!(
        invalid,
        [
            "kubernetes:VirtualService/shop/uneven: VirtualService shop/uneven: field `spec.http[0].route`: destination weights sum to 90, not 100"
        ]
    );
    assert_eq!(
        names(&manifests.virtual_services, |r| &r.metadata),
        ["reviews"],
        "the valid VirtualService stays"
    );
}

/// A control plane reading `server`'s API (its CA in the returned
/// directory, which must outlive it).
async fn control_plane(server: &FakeApiServer) -> (ControlPlane, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens": {}}"#).unwrap();
    let control = ControlPlane::start(Options {
        source: SourceOptions::Kubernetes {
            client: Box::new(server.config()),
            options: KubeOptions::default(),
        },
        ca_dir: dir.path().join("ca"),
        tokens_file: Some(tokens),
        token_review: None,
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        status_addr: "127.0.0.1:0".parse().unwrap(),
        settings: MeshSettings::default(),
    })
    .await
    .expect("control plane on the fake API");
    (control, dir)
}

#[tokio::test]
async fn the_control_plane_serves_config_from_the_api_and_keeps_the_last_good_version() {
    let server = shop().await;
    let (control, _dir) = control_plane(&server).await;
    let status = control.ports().status;
    let first = http_get(status, "/debug/config_errors").await;
    assert!(first.contains("\"errors\": []"), "{first}");

    // A bad edit of a working VirtualService: reported, and the last good
    // version stays in force.
    server.apply(virtual_service(
        "shop",
        "reviews",
        "reviews",
        &[json!(80), json!(30)],
    ));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let errors = http_get(status, "/debug/config_errors").await;
        if errors.contains("kubernetes:VirtualService/shop/reviews: VirtualService shop/reviews: field `spec.http[0].route`: destination weights sum to 110, not 100 (last good version kept)") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{errors}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": name, "namespace": ns}})
}

#[tokio::test]
async fn endpoint_slices_and_service_accounts_are_watched_into_the_model() {
    let server = shop().await;
    server.apply(service_account("shop", "reviews"));
    // A Service without a selector, its endpoints written by hand.
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "legacy-db", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.40", "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]}}));
    server.apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "legacy-db-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "legacy-db"}},
        "addressType": "IPv4",
        "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["192.168.50.5"], "conditions": {"ready": true}}]}),
    );
    let mut source = source(&server).await;
    let loaded = source.load();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let m = &loaded.manifests;
    assert_eq!(names(&m.service_accounts, |r| &r.metadata), ["reviews"]);
    assert_eq!(names(&m.endpoint_slices, |r| &r.metadata), ["legacy-db-1"]);
    let model = mesh_control::model::Model::build(m, &MeshSettings::default());
    assert!(
        model.addresses.contains_key(
            "Kubernetes/discovery.k8s.io/EndpointSlice/shop/legacy-db-1/192.168.50.5"
        ),
        "{:?}",
        model.addresses.keys().collect::<Vec<_>>()
    );
    assert!(
        !model
            .warnings
            .iter()
            .any(|w| w.starts_with("ServiceAccount ")),
        "{:?}",
        model.warnings
    );

    // Deleting the account makes its pods' identity a warning.
    assert!(server.delete("v1", "ServiceAccount", "shop", "reviews"));
    let loaded = next(&mut source).await;
    let model = mesh_control::model::Model::build(&loaded.manifests, &MeshSettings::default());
    assert!(
        model
            .warnings
            .iter()
            .any(|w| w.starts_with("ServiceAccount shop/reviews does not exist")),
        "{:?}",
        model.warnings
    );
}

fn http_route(ns: &str, name: &str, parent: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": ns, "generation": 1},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 9080}],
                    "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}})
}

#[tokio::test]
async fn route_status_follows_the_config_from_the_api() {
    let server = shop().await;
    server.apply(http_route("shop", "r", "missing"));
    let (control, _dir) = control_plane(&server).await;
    let writer = tokio::spawn(mesh_control::route_status::run(
        server.client(),
        "v1".into(),
        control.route_statuses(),
    ));
    let accepted = |server: &FakeApiServer| {
        let route = server.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", "r")?;
        let condition = route["status"]["parents"][0]["conditions"][0].clone();
        Some((
            condition["status"].as_str()?.to_owned(),
            condition["reason"].as_str()?.to_owned(),
        ))
    };
    let wait_for = |want: (&'static str, &'static str)| {
        let server = &server;
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let got = accepted(server);
                if got.as_ref().map(|(s, r)| (s.as_str(), r.as_str())) == Some(want) {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "{got:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Its parent Service does not exist: not accepted, and why.
    wait_for(("False", "NoMatchingParent")).await;
    // Fixed: accepted on the next version.
    server.apply(http_route("shop", "r", "reviews"));
    wait_for(("True", "Accepted")).await;
    // Settled: the status read back is what was written, so no more
    // writes follow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writes = server
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/httproutes/r/status"))
        .count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = server
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/httproutes/r/status"))
        .count();
    assert_eq!(writes, later, "a steady config writes no status");
    assert_eq!(writes, 2, "one write per change");
    writer.abort();
}
