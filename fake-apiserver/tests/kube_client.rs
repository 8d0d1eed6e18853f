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
