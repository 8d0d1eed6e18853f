//! The route status writer against an in-process fake API server: a
//! route's `status.parents` gets our entry (Accepted, ResolvedRefs) by a
//! merge patch of its status, another controller's entry stays, an
//! unchanged status is not written again, and a change is.

use std::{sync::Arc, time::Duration};

use mesh_config::istio::gateway_api::ParentRef;
use mesh_control::route_status::{self, CONTROLLER_NAME, Condition, ParentStatus, RouteStatus};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};

const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";

fn stored(server: &FakeApiServer) -> Value {
    server
        .get(GATEWAY_API, "HTTPRoute", "shop", "r")
        .expect("the route exists")
}

fn status_patches(server: &FakeApiServer) -> usize {
    server
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/httproutes/r/status"))
        .count()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn status(previous: Option<Value>, accepted: Condition) -> Arc<Vec<RouteStatus>> {
    Arc::new(vec![RouteStatus {
        kind: "HTTPRoute".into(),
        api_version: GATEWAY_API.into(),
        namespace: "shop".into(),
        name: "r".into(),
        generation: Some(2),
        previous,
        parents: vec![ParentStatus {
            parent_ref: ParentRef {
                name: "gw".into(),
                ..Default::default()
            },
            accepted,
            resolved_refs: Condition::fails(
                "RefNotPermitted",
                "Service web/other is in another namespace",
            ),
        }],
    }])
}

#[tokio::test]
async fn route_status_is_written_once_per_change_and_keeps_other_controllers() {
    let server = FakeApiServer::start().await;
    server.serve(Kind::new(GATEWAY_API, "HTTPRoute", "httproutes", true));
    let foreign = json!({"parentRef": {"name": "elsewhere"}, "controllerName": "example.com/gateway",
                         "conditions": [{"type": "Accepted", "status": "True"}]});
    server.apply(json!({"apiVersion": GATEWAY_API, "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": 2},
        "spec": {"parentRefs": [{"name": "gw"}, {"name": "elsewhere"}]},
        "status": {"parents": [foreign.clone()]}}));
    let previous = stored(&server)["status"].clone();
    let (tx, rx) = tokio::sync::watch::channel(status(
        Some(previous),
        Condition::holds("Accepted", "attached"),
    ));
    let writer = tokio::spawn(route_status::run(server.client(), "v1".into(), rx));

    eventually("the first status", || status_patches(&server) == 1).await;
    let written = stored(&server)["status"].clone();
    let parents = written["parents"].as_array().expect("parents");
    assert_eq!(parents.len(), 2, "{written}");
    assert_eq!(parents[0], foreign);
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(parents[1]["parentRef"], json!({"name": "gw"}));
    let conditions = &parents[1]["conditions"];
    assert_eq!(
        (&conditions[0]["type"], &conditions[0]["status"]),
        (&json!("Accepted"), &json!("True"))
    );
    assert_eq!(
        (
            &conditions[1]["type"],
            &conditions[1]["status"],
            &conditions[1]["reason"]
        ),
        (
            &json!("ResolvedRefs"),
            &json!("False"),
            &json!("RefNotPermitted")
        )
    );
    assert_eq!(conditions[0]["observedGeneration"], 2);

    // The watch brings the written status back: nothing to write.
    tx.send_replace(status(
        Some(written.clone()),
        Condition::holds("Accepted", "attached"),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status_patches(&server),
        1,
        "an unchanged status is not written"
    );

    // The route is refused now: written again.
    tx.send_replace(status(
        Some(written),
        Condition::fails(
            "NotAllowedByListeners",
            "listener http does not allow routes from namespace shop",
        ),
    ));
    eventually("the changed status", || status_patches(&server) == 2).await;
    let accepted = &stored(&server)["status"]["parents"][1]["conditions"][0];
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("False"), &json!("NotAllowedByListeners"))
    );
    writer.abort();
}
