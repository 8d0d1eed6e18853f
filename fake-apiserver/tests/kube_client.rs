//! The fake through a real kube client: create, get, list with a field
//! selector, delete, and 404 for a kind it does not serve.

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::json;

#[tokio::test]
async fn a_kube_client_reads_and_writes_what_the_fake_serves() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::pod());
    let pods: Api<Pod> = Api::namespaced(server.client(), "shop");
    for (name, node) in [("a", "node0"), ("b", "node1")] {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        assert_eq!(created.metadata.namespace.as_deref(), Some("shop"));
        assert!(created.metadata.resource_version.is_some());
    }
    assert_eq!(
        pods.get("a")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("node0")
    );
    let on_node1 = Api::<Pod>::all(server.client())
        .list(&ListParams::default().fields("spec.nodeName=node1"))
        .await
        .unwrap();
    let names: Vec<_> = on_node1
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["b"]);
    assert!(on_node1.metadata.resource_version.is_some());

    pods.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(pods.get_opt("a").await.unwrap().is_none());
    assert!(server.get("v1", "Pod", "shop", "b").is_some());

    let missing = Api::<ConfigMap>::all(server.client())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(status) if status.code == 404),
        "{missing:?}"
    );
}

/// Replace is a compare-and-swap on `resourceVersion` (what leader election
/// relies on), and creating a name that exists is refused.
#[tokio::test]
async fn replace_and_create_conflict_as_on_a_real_server() {
    use k8s_openapi::api::coordination::v1::Lease;
    let server = FakeApiServer::start().await;
    server.serve(Kind::lease());
    let leases: Api<Lease> = Api::namespaced(server.client(), "istio-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "mesh-control"},
        "spec": {"holderIdentity": "a"},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(&again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{again:?}"
    );
    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = leases
        .replace("mesh-control", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    // A writer that read the old version loses.
    let stale = leases
        .replace("mesh-control", &PostParams::default(), &created)
        .await
        .unwrap_err();
    assert!(
        matches!(&stale, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{stale:?}"
    );
    let holder = leases.get("mesh-control").await.unwrap().spec.unwrap();
    assert_eq!(holder.holder_identity.as_deref(), Some("b"));
}

/// Metadata-only lists and watches, as `Api<PartialObjectMeta<_>>` (and
/// `Controller::owns`) read them.
#[tokio::test]
async fn metadata_only_reads_carry_only_metadata() {
    use futures::StreamExt as _;
    use kube::{
        core::PartialObjectMeta,
        runtime::{WatchStreamExt as _, watcher},
    };
    let server = FakeApiServer::start().await;
    server.serve(Kind::pod());
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app"}]}}));
    let pods: Api<Pod> = Api::all(server.client());
    let list = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        list.items[0].metadata.labels.as_ref().unwrap()["app"],
        "web"
    );
    let metas: Api<PartialObjectMeta<Pod>> = Api::all(server.client());
    let stream = watcher(metas, watcher::Config::default()).touched_objects();
    let mut stream = std::pin::pin!(stream);
    let first: PartialObjectMeta<Pod> = stream.next().await.unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("a"));
    assert!(
        first
            .types
            .is_some_and(|t| t.kind == "PartialObjectMetadata")
    );
    let raw = plain_get(&server, "/api/v1/namespaces/shop/pods").await;
    assert!(
        raw.contains("\"spec\""),
        "full objects without the Accept: {raw}"
    );
    server.delete("v1", "Pod", "shop", "a");
    let deleted = stream.next().await.unwrap().unwrap();
    assert_eq!(deleted.metadata.name.as_deref(), Some("a"));
}

/// A plain GET through kube's client, without the metadata Accept header.
async fn plain_get(server: &FakeApiServer, path: &str) -> String {
    let request = http::Request::get(path).body(Vec::new()).unwrap();
    server.client().request_text(request).await.unwrap()
}
