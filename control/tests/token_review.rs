//! TokenReview authentication against an in-process fake API server: the
//! caller's node comes from the token (or its pod), only allowed service
//! accounts get in, answers are cached, and an API server that cannot be
//! asked is `Unavailable`, not a refusal.

mod common;
use common::{create_certificate, csr, plaintext};

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_control::auth::{
    Authenticator, TokenAuthenticator,
    token_review::{
        NODE_NAME_EXTRA, POD_NAME_EXTRA, POD_UID_EXTRA, TokenReviewOptions, TokenReviewer,
    },
};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};
use tonic::{Code, metadata::MetadataMap};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// What the fake API server says about each token.
fn review(token: &str) -> Value {
    let user = |sa: &str, extra: Value| {
        json!({"authenticated": true,
               "user": {"username": format!("system:serviceaccount:{sa}"), "uid": "u", "extra": extra},
               "audiences": ["istio-ca"]})
    };
    match token {
        "ztunnel-node0" => user(
            "istio-system:ztunnel",
            json!({NODE_NAME_EXTRA: ["node0"], POD_NAME_EXTRA: ["ztunnel-a"]}),
        ),
        "ztunnel-old-cluster" => user(
            "istio-system:ztunnel",
            json!({POD_NAME_EXTRA: ["ztunnel-b"], POD_UID_EXTRA: ["uid-b"]}),
        ),
        "ztunnel-reused-pod-name" => user(
            "istio-system:ztunnel",
            json!({POD_NAME_EXTRA: ["ztunnel-b"], POD_UID_EXTRA: ["uid-of-an-older-pod"]}),
        ),
        "ztunnel-unbound" => user("istio-system:ztunnel", json!({})),
        "waypoint-shop" => user("shop:waypoint", json!({NODE_NAME_EXTRA: ["node2"]})),
        "waypoint-node0" => user("shop:waypoint", json!({NODE_NAME_EXTRA: ["node0"]})),
        "app" => user("shop:web", json!({NODE_NAME_EXTRA: ["node0"]})),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}

struct Fixture {
    server: FakeApiServer,
    bodies: Arc<Mutex<Vec<Value>>>,
}

async fn fixture() -> Fixture {
    let server = FakeApiServer::start().await;
    server.serve(Kind::pod());
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-b", "namespace": "istio-system", "uid": "uid-b"},
        "spec": {"nodeName": "node1", "containers": [{"name": "ztunnel"}]}}));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    answer_reviews(&server, bodies.clone());
    Fixture { server, bodies }
}

fn answer_reviews(server: &FakeApiServer, bodies: Arc<Mutex<Vec<Value>>>) {
    server.on_post(REVIEWS, move |body| {
        bodies.lock().unwrap().push(body.clone());
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        let mut reviewed = body.clone();
        reviewed["status"] = review(token);
        (201, reviewed)
    });
}

fn reviewer(server: &FakeApiServer) -> TokenReviewer {
    TokenReviewer::new(
        server.client(),
        TokenReviewOptions {
            service_accounts: vec!["istio-system/ztunnel".into()],
            waypoint_service_accounts: vec!["*/waypoint".into()],
            ..TokenReviewOptions::default()
        },
    )
}

fn bearer(token: &str) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    metadata
}

#[tokio::test]
async fn the_node_comes_from_the_token_or_its_pod() {
    let f = fixture().await;
    let auth = Authenticator::new(None, Some(reviewer(&f.server)));
    let node = |token: &'static str| {
        let auth = &auth;
        async move { auth.authenticate(&bearer(token)).await.map(|c| c.node) }
    };
    assert_eq!(node("ztunnel-node0").await.unwrap(), "node0");
    // No node in the token (clusters before 1.30): its pod says.
    assert_eq!(node("ztunnel-old-cluster").await.unwrap(), "node1");
    assert_eq!(node("waypoint-shop").await.unwrap(), "node2");
    // A node agent may get certificates for its node's pods; a waypoint
    // only for itself.
    let scope = |token: &'static str| {
        let auth = &auth;
        async move {
            auth.authenticate(&bearer(token))
                .await
                .unwrap()
                .only_identity
        }
    };
    assert_eq!(scope("ztunnel-node0").await, None);
    assert_eq!(
        scope("waypoint-shop").await,
        Some(("shop".to_owned(), "waypoint".to_owned()))
    );
    // The review asked for the audience the DaemonSet's token is issued for.
    let body = f.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["spec"]["audiences"], json!(["istio-ca"]));
}

#[tokio::test]
async fn only_allowed_and_authenticated_service_accounts_get_in() {
    let f = fixture().await;
    let auth = Authenticator::new(None, Some(reviewer(&f.server)));
    let refused = |token: &'static str| {
        let auth = &auth;
        async move {
            let status = auth.authenticate(&bearer(token)).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{token}: {status:?}");
            status.message().to_owned()
        }
    };
    let app = refused("app").await;
    assert!(
        app.contains("service account shop/web may not connect"),
        "{app}"
    );
    let bad = refused("forged").await;
    assert!(bad.contains("invalid bearer token"), "{bad}");
    let reused = refused("ztunnel-reused-pod-name").await;
    assert!(
        reused.contains("not the pod the token was issued to"),
        "{reused}"
    );
    let unbound = refused("ztunnel-unbound").await;
    assert!(unbound.contains("not bound to a pod"), "{unbound}");
    assert_eq!(
        auth.authenticate(&MetadataMap::new())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn answers_are_cached_and_static_tokens_need_no_review() {
    let f = fixture().await;
    let auth = Authenticator::new(
        Some(TokenAuthenticator::new([(
            "lab-token-0123456789".into(),
            "lab-node".into(),
        )])),
        Some(reviewer(&f.server)),
    );
    for _ in 0..3 {
        assert_eq!(
            auth.authenticate(&bearer("ztunnel-node0"))
                .await
                .unwrap()
                .node,
            "node0"
        );
        assert!(auth.authenticate(&bearer("forged")).await.is_err());
    }
    assert_eq!(
        auth.authenticate(&bearer("lab-token-0123456789"))
            .await
            .unwrap()
            .node,
        "lab-node"
    );
    let reviews = f
        .server
        .requests()
        .iter()
        .filter(|r| r.starts_with(&format!("POST {REVIEWS}")))
        .count();
    assert_eq!(reviews, 2, "one review per distinct token");

    // A short cache: an accepted token is reviewed again once it expires.
    let short = Authenticator::new(
        None,
        Some(TokenReviewer::new(
            f.server.client(),
            TokenReviewOptions {
                cache_ttl: Duration::from_millis(100),
                ..TokenReviewOptions::default()
            },
        )),
    );
    short.authenticate(&bearer("ztunnel-node0")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    short.authenticate(&bearer("ztunnel-node0")).await.unwrap();
    assert_eq!(f.bodies.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn an_api_server_that_cannot_review_makes_callers_unavailable_not_refused() {
    // No TokenReview handler: the API server answers 404.
    let server = FakeApiServer::start().await;
    let auth = Authenticator::new(None, Some(reviewer(&server)));
    let status = auth
        .authenticate(&bearer("ztunnel-node0"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Not cached: once reviews work, the same token gets in.
    answer_reviews(&server, Arc::default());
    assert_eq!(
        auth.authenticate(&bearer("ztunnel-node0"))
            .await
            .unwrap()
            .node,
        "node0"
    );
}

/// The whole control plane on the fake API server, with no tokens file:
/// config from the API, callers by TokenReview, and the CA signing only
/// identities that run on the reviewed caller's node.
#[tokio::test]
async fn the_ca_signs_for_service_account_callers_on_their_node_only() {
    use mesh_control::{
        ControlPlane, Options, SourceOptions, TokenReviewSetup,
        model::MeshSettings,
        source::kubernetes::{KubeOptions, WATCHED},
    };

    let f = fixture().await;
    let options = KubeOptions::default();
    for watched in WATCHED {
        let resource = options.api_resource(watched);
        f.server.serve(Kind::new(
            &resource.api_version,
            &resource.kind,
            &resource.plural,
            watched.namespaced,
        ));
    }
    f.server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    f.server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node0", "serviceAccountName": "web", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.10", "conditions": [{"type": "Ready", "status": "True"}]}}));
    // The waypoint of shop, on the same node, outside capture.
    f.server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waypoint-0", "namespace": "shop",
                     "labels": {"istio.io/dataplane-mode": "none",
                                "gateway.networking.k8s.io/gateway-name": "waypoint"}},
        "spec": {"nodeName": "node0", "serviceAccountName": "waypoint", "containers": [{"name": "waypoint"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.11", "conditions": [{"type": "Ready", "status": "True"}]}}));
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::start(Options {
        source: SourceOptions::Kubernetes {
            client: Box::new(f.server.config()),
            options,
        },
        ca_dir: dir.path().join("ca"),
        tokens_file: None,
        token_review: Some(TokenReviewSetup {
            client: Box::new(f.server.config()),
            options: TokenReviewOptions {
                waypoint_service_accounts: vec!["*/waypoint".into()],
                ..TokenReviewOptions::default()
            },
        }),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        status_addr: "127.0.0.1:0".parse().unwrap(),
        settings: MeshSettings::default(),
    })
    .await
    .expect("control plane");
    let grpc = control.ports().grpc;
    let sign_as = |token: &'static str, identity: &'static str| async move {
        create_certificate(plaintext(grpc).await, Some(token), csr(identity)).await
    };
    let sign = |token: &'static str| sign_as(token, "spiffe://cluster.local/ns/shop/sa/web");
    assert!(
        !sign("ztunnel-node0")
            .await
            .expect("node0's ztunnel gets web's certificate")
            .is_empty()
    );
    let other_node = sign("ztunnel-old-cluster").await.unwrap_err();
    assert_eq!(other_node.code(), Code::PermissionDenied, "{other_node:?}");
    assert!(
        other_node.message().contains("no pod on node node1"),
        "{other_node:?}"
    );
    assert_eq!(
        sign("forged").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A waypoint gets its own certificate, never that of another pod of
    // its node.
    sign_as(
        "waypoint-node0",
        "spiffe://cluster.local/ns/shop/sa/waypoint",
    )
    .await
    .expect("the waypoint's own certificate");
    let stolen = sign("waypoint-node0").await.unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied, "{stolen:?}");
    assert!(
        stolen.message().contains("only its own certificate"),
        "{stolen:?}"
    );
}
