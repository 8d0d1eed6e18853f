//! The waypoint controller against an in-process fake API server: a Gateway
//! of class `istio-waypoint` gets a ServiceAccount, Deployment and Service
//! by server-side apply (field manager `mesh-control`), one of class
//! `istio` (ingress) the same named `<gateway>-istio` with a LoadBalancer
//! Service of its listeners' ports, other Gateways get nothing, and the
//! Gateway's status reports the Service's address once it has one, without
//! patching again when nothing changed.

use std::time::Duration;

use mesh_control::waypoint_deploy::{self, FIELD_MANAGER, WaypointTemplate};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};

const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";

fn template() -> WaypointTemplate {
    WaypointTemplate {
        image: "ghcr.io/mesh/waypoint:0.1.0".into(),
        image_pull_policy: "IfNotPresent".into(),
        cpu_request: "100m".into(),
        memory_request: "128Mi".into(),
        memory_limit: "512Mi".into(),
        xds_address: "http://mesh-control.istio-system.svc:15010".into(),
        token_audience: "istio-ca".into(),
        trust_domain: "cluster.local".into(),
        log_level: "info".into(),
        root_cert: None,
    }
}

fn gateway(name: &str, class: &str) -> Value {
    json!({"apiVersion": GATEWAY_API, "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(value) = check() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn status_patches(server: &FakeApiServer) -> usize {
    server
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/status"))
        .count()
}

#[tokio::test]
async fn a_waypoint_gateway_gets_its_deployment_service_and_status() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::new(GATEWAY_API, "Gateway", "gateways", true));
    server.serve(Kind::deployment());
    server.serve(Kind::service());
    server.serve(Kind::service_account());
    let stored = server.apply(gateway("waypoint", "istio-waypoint"));
    let uid = stored["metadata"]["uid"].as_str().unwrap().to_owned();
    server.apply(gateway("other", "example.com/other"));
    server.apply(json!({"apiVersion": GATEWAY_API, "kind": "Gateway",
        "metadata": {"name": "ingress", "namespace": "shop", "generation": 1},
        "spec": {"gatewayClassName": "istio",
                 "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}));
    let controller = tokio::spawn(waypoint_deploy::run(
        server.client(),
        "v1".into(),
        template(),
    ));

    let deployment = eventually("the waypoint Deployment", || {
        server.get("apps/v1", "Deployment", "shop", "waypoint")
    })
    .await;
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0],
        json!({"apiVersion": GATEWAY_API, "kind": "Gateway", "name": "waypoint",
               "uid": uid, "controller": true})
    );
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(
        pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "waypoint"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "ghcr.io/mesh/waypoint:0.1.0"
    );
    let status = eventually("the Gateway's status", || {
        let gw = server.get(GATEWAY_API, "Gateway", "shop", "waypoint")?;
        (!gw["status"].is_null()).then(|| gw["status"].clone())
    })
    .await;
    assert!(server.get("v1", "Service", "shop", "waypoint").is_some());
    assert!(
        server
            .get("v1", "ServiceAccount", "shop", "waypoint")
            .is_some()
    );
    assert_eq!(status["conditions"][0]["type"], "Accepted");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][1]["type"], "Programmed");
    assert_eq!(
        status["conditions"][1]["status"], "False",
        "no cluster IP yet"
    );

    // Every write was a forced server-side apply by mesh-control, in
    // dependency order: identity, pods, Service, then the status.
    let patches = server.patches();
    let paths: Vec<&str> = patches.iter().map(|p| p.path.as_str()).collect();
    let waypoint_paths: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| p.ends_with("/waypoint") || p.contains("/waypoint/"))
        .collect();
    assert_eq!(
        &waypoint_paths[..4],
        [
            "/api/v1/namespaces/shop/serviceaccounts/waypoint",
            "/apis/apps/v1/namespaces/shop/deployments/waypoint",
            "/api/v1/namespaces/shop/services/waypoint",
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status",
        ],
        "{paths:?}"
    );
    for patch in &patches {
        assert_eq!(patch.content_type, "application/apply-patch+yaml");
        assert_eq!(patch.field_manager.as_deref(), Some(FIELD_MANAGER));
        assert!(patch.force, "{}", patch.path);
    }
    // A Gateway of another class is neither a waypoint nor an ingress.
    assert!(
        server
            .get("apps/v1", "Deployment", "shop", "other")
            .is_none()
    );
    assert!(!paths.iter().any(|p| p.contains("other")), "{paths:?}");
    // The ingress Gateway's proxy is named as Istio names it, labelled with
    // the Gateway, and exposed by a LoadBalancer on its listener's port.
    let ingress = eventually("the ingress Deployment", || {
        server.get("apps/v1", "Deployment", "shop", "ingress-istio")
    })
    .await;
    assert_eq!(
        ingress["spec"]["template"]["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "ingress"
    );
    let ingress_service = eventually("the ingress Service", || {
        server.get("v1", "Service", "shop", "ingress-istio")
    })
    .await;
    assert_eq!(ingress_service["spec"]["type"], "LoadBalancer");
    assert!(
        ingress_service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 80 && p["name"] == "http"),
        "{ingress_service}"
    );

    // The API server assigns the Service its cluster IP; the next event of
    // the Gateway reports it.
    let mut service = server.get("v1", "Service", "shop", "waypoint").unwrap();
    service["spec"]["clusterIP"] = "10.96.0.20".into();
    server.apply(service);
    let mut gw = server
        .get(GATEWAY_API, "Gateway", "shop", "waypoint")
        .unwrap();
    gw["metadata"]["labels"] = json!({"touched": "yes"});
    server.apply(gw);
    let status = eventually("the Gateway's address", || {
        let gw = server.get(GATEWAY_API, "Gateway", "shop", "waypoint")?;
        (gw["status"]["addresses"] == json!([{"type": "IPAddress", "value": "10.96.0.20"}]))
            .then(|| gw["status"].clone())
    })
    .await;
    assert_eq!(status["conditions"][1]["status"], "True");
    // Its own status update is an event of the Gateway too; an unchanged
    // status is not patched again, so this settles (a reconcile queued by
    // an earlier event may still patch once from its older view).
    let mut settled = status_patches(&server);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = status_patches(&server);
        if now == settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Gateway's status is patched again and again: {now} patches"
        );
        settled = now;
    }
    controller.abort();
}

#[tokio::test]
async fn a_failed_apply_is_retried() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::new(GATEWAY_API, "Gateway", "gateways", true));
    // Deployments are not served yet: the first apply fails with 404.
    server.serve(Kind::service());
    server.serve(Kind::service_account());
    server.apply(gateway("waypoint", "istio-waypoint"));
    let controller = tokio::spawn(waypoint_deploy::run(
        server.client(),
        "v1".into(),
        template(),
    ));
    eventually("a failed Deployment apply", || {
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("PATCH /apis/apps/v1/namespaces/shop/deployments/waypoint"))
            .then_some(())
    })
    .await;
    server.serve(Kind::deployment());
    tokio::time::sleep(waypoint_deploy::RETRY).await;
    eventually("the Deployment after the retry", || {
        server.get("apps/v1", "Deployment", "shop", "waypoint")
    })
    .await;
    controller.abort();
}

#[tokio::test]
async fn over_tls_the_mesh_root_is_published_in_the_waypoints_namespace() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::new(GATEWAY_API, "Gateway", "gateways", true));
    server.serve(Kind::deployment());
    server.serve(Kind::service());
    server.serve(Kind::service_account());
    server.serve(Kind::new("v1", "ConfigMap", "configmaps", true));
    server.apply(gateway("waypoint", "istio-waypoint"));
    let mut tls = template();
    tls.xds_address = "https://mesh-control.istio-system.svc:15012".into();
    tls.root_cert = Some("-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n".into());
    let controller = tokio::spawn(waypoint_deploy::run(server.client(), "v1".into(), tls));

    let root = eventually("the published root", || {
        server.get(
            "v1",
            "ConfigMap",
            "shop",
            mesh_control::root_cert::CONFIG_MAP,
        )
    })
    .await;
    assert_eq!(
        root["data"][mesh_control::root_cert::KEY],
        "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
    );
    // Shared by the namespace's waypoints: no owner to collect it with one.
    assert!(root["metadata"]["ownerReferences"].is_null());
    let deployment = eventually("the waypoint Deployment", || {
        server.get("apps/v1", "Deployment", "shop", "waypoint")
    })
    .await;
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array().unwrap().contains(&json!(
            "--xds-root-cert=/var/run/secrets/istio/root-cert.pem"
        )),
        "{args}"
    );
    controller.abort();
}

/// The controller watches what it applied: a waypoint Deployment deleted
/// by hand comes back, and one edited by hand is put back as rendered;
/// objects of the same name it does not manage are not watched.
#[tokio::test]
async fn a_waypoint_deleted_or_edited_by_hand_is_restored() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::new(GATEWAY_API, "Gateway", "gateways", true));
    server.serve(Kind::deployment());
    server.serve(Kind::service());
    server.serve(Kind::service_account());
    server.apply(gateway("waypoint", "istio-waypoint"));
    let controller = tokio::spawn(waypoint_deploy::run(
        server.client(),
        "v1".into(),
        template(),
    ));
    let first = eventually("the waypoint Deployment", || {
        server.get("apps/v1", "Deployment", "shop", "waypoint")
    })
    .await;
    eventually("the Service", || {
        server.get("v1", "Service", "shop", "waypoint")
    })
    .await;

    // Deleted by hand: applied again from the Deployment's DELETED event
    // (the Gateway did not change).
    assert!(server.delete("apps/v1", "Deployment", "shop", "waypoint"));
    let restored = eventually("the Deployment to come back", || {
        server.get("apps/v1", "Deployment", "shop", "waypoint")
    })
    .await;
    assert_eq!(restored["spec"], first["spec"]);
    assert_ne!(
        restored["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );

    // Edited by hand (another image): the desired state is applied again.
    let mut edited = restored.clone();
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest".into();
    server.apply(edited);
    eventually("the rendered image back", || {
        let d = server.get("apps/v1", "Deployment", "shop", "waypoint")?;
        (d["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/mesh/waypoint:0.1.0")
            .then_some(())
    })
    .await;

    // The Service too.
    assert!(server.delete("v1", "Service", "shop", "waypoint"));
    eventually("the Service to come back", || {
        server.get("v1", "Service", "shop", "waypoint")
    })
    .await;

    // The watches select the controller's own objects only.
    let requests = server.requests();
    let watches: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET /apis/apps/v1/deployments?") && r.contains("watch=true"))
        .collect();
    assert!(!watches.is_empty(), "{requests:?}");
    for watch in watches {
        assert!(
            watch.contains("labelSelector=app.kubernetes.io/managed-by=mesh-control"),
            "{watch}"
        );
    }
    controller.abort();
}
