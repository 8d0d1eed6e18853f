//! The `status` of Gateway API routes (HTTPRoute, GRPCRoute), as a Gateway
//! API controller reports it: one `status.parents[]` entry per parent this
//! control plane serves (a Service, or a Gateway of class `istio` or
//! `istio-waypoint`), with the conditions `Accepted` (the route attached,
//! or why not) and `ResolvedRefs` (every backend may be referred to).
//!
//! The translation ([`crate::http_route`]) says what each route's parents
//! got; [`run`], on the leader, writes it to the API server whenever it
//! changes. Entries of other controllers are kept, and a condition's
//! `lastTransitionTime` only moves when its status does, so an unchanged
//! config writes nothing.

use std::{collections::HashMap, sync::Arc, time::Duration};

use kube::{
    Client,
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
};
use mesh_config::istio::gateway_api::ParentRef;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

/// The `controllerName` of our entries: Istio's, so tools that look for
/// Istio's status find it.
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";

/// The field manager of the status patches.
pub const FIELD_MANAGER: &str = "mesh-control";

/// The access [`run`] needs: (API group, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("gateway.networking.k8s.io", "httproutes/status", &["patch"]),
    ("gateway.networking.k8s.io", "grpcroutes/status", &["patch"]),
    ("gateway.networking.k8s.io", "tcproutes/status", &["patch"]),
    ("gateway.networking.k8s.io", "tlsroutes/status", &["patch"]),
];

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// One condition of a parent entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `True` or `False`.
    pub ok: bool,
    /// The Gateway API reason, such as `Accepted` or `RefNotPermitted`.
    pub reason: &'static str,
    /// What a person reads.
    pub message: String,
}

impl Condition {
    /// A condition that holds.
    pub fn holds(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ok: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn fails(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason,
            message: message.into(),
        }
    }
}

/// What one parent of a route got.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentStatus {
    /// The `parentRefs` entry, as written.
    pub parent_ref: ParentRef,
    /// Whether the route attached to it.
    pub accepted: Condition,
    /// Whether all of the route's backends may be referred to.
    pub resolved_refs: Condition,
}

/// The status of one route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteStatus {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// `apiVersion` the route was read at.
    pub api_version: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation` (the conditions' `observedGeneration`).
    pub generation: Option<i64>,
    /// The route's status as read (other controllers' entries are kept).
    pub previous: Option<Value>,
    /// Our entries, one per parent we serve.
    pub parents: Vec<ParentStatus>,
}

impl RouteStatus {
    /// The whole `status` to write at time `now` (RFC 3339): the previous
    /// entries of other controllers, then ours, each condition keeping its
    /// `lastTransitionTime` while its status is unchanged.
    pub fn to_json(&self, now: &str) -> Value {
        let previous_parents: &[Value] = self
            .previous
            .as_ref()
            .and_then(|s| s.get("parents"))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let mut parents: Vec<Value> = previous_parents
            .iter()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .cloned()
            .collect();
        for parent in &self.parents {
            let parent_ref = parent_ref_json(&parent.parent_ref);
            let before = previous_parents.iter().find(|p| {
                p["controllerName"] == CONTROLLER_NAME && same_parent(&p["parentRef"], &parent_ref)
            });
            let condition = |kind: &str, c: &Condition| {
                let status = if c.ok { "True" } else { "False" };
                let since = before
                    .and_then(|p| p["conditions"].as_array())
                    .and_then(|list| list.iter().find(|x| x["type"] == kind))
                    .filter(|x| x["status"] == status)
                    .and_then(|x| x["lastTransitionTime"].as_str())
                    .unwrap_or(now);
                json!({
                    "type": kind,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": self.generation.unwrap_or(0),
                    "lastTransitionTime": since,
                })
            };
            parents.push(json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": [
                    condition("Accepted", &parent.accepted),
                    condition("ResolvedRefs", &parent.resolved_refs),
                ],
            }));
        }
        json!({ "parents": parents })
    }
}

/// Whether two `parentRef`s name the same parent, the API server's
/// defaults (group `gateway.networking.k8s.io`, kind `Gateway`) applied to
/// either; without it a defaulted read-back would look like a new parent,
/// and its conditions would get a new time on every write.
fn same_parent(a: &Value, b: &Value) -> bool {
    let field = |v: &Value, key: &str, default: &'static str| -> Value {
        match v.get(key) {
            Some(Value::Null) | None => Value::from(default),
            Some(x) => x.clone(),
        }
    };
    field(a, "group", mesh_config::istio::GATEWAY_API_GROUP)
        == field(b, "group", mesh_config::istio::GATEWAY_API_GROUP)
        && field(a, "kind", "Gateway") == field(b, "kind", "Gateway")
        && ["name", "namespace", "sectionName", "port"]
            .iter()
            .all(|key| a.get(*key) == b.get(*key))
}

/// A `parentRef` as the API server returns it: only the fields given.
fn parent_ref_json(parent: &ParentRef) -> Value {
    let mut out = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            out.insert(key.to_owned(), value);
        }
    };
    put("group", parent.group.clone().map(Value::from));
    put("kind", parent.kind.clone().map(Value::from));
    put("name", Some(Value::from(parent.name.clone())));
    put("namespace", parent.namespace.clone().map(Value::from));
    put("sectionName", parent.section_name.clone().map(Value::from));
    put("port", parent.port.map(Value::from));
    Value::Object(out)
}

/// Writes the status of every route in `statuses` whenever it changes,
/// with JSON merge patches of `status` at the version the route was read
/// at (`gateway_api_version` when that is not known); runs until the future is dropped (the leader
/// runs it).
pub async fn run(
    client: Client,
    gateway_api_version: String,
    mut statuses: watch::Receiver<Arc<Vec<RouteStatus>>>,
) {
    // What was last written per route, so a write is not repeated before
    // the watch brings it back in the route's `previous`.
    let mut written: HashMap<(String, String, String), Value> = HashMap::new();
    loop {
        let current = statuses.borrow_and_update().clone();
        let mut failed = false;
        for route in current.iter() {
            let key = (
                route.kind.clone(),
                route.namespace.clone(),
                route.name.clone(),
            );
            let previous = route.previous.clone().unwrap_or(Value::Null);
            let status = route.to_json(&now());
            if status == previous || written.get(&key) == Some(&status) {
                continue;
            }
            match write(&client, &gateway_api_version, route, &status).await {
                Ok(()) => {
                    written.insert(key, status);
                }
                Err(err) => {
                    failed = true;
                    tracing::warn!(
                        route = %format!("{} {}/{}", route.kind, route.namespace, route.name),
                        error = %err,
                        "writing the route's status failed; retrying"
                    );
                }
            }
        }
        written.retain(|key, _| {
            current
                .iter()
                .any(|r| (&r.kind, &r.namespace, &r.name) == (&key.0, &key.1, &key.2))
        });
        if failed {
            // Retry after a while, or sooner when the config changes.
            let _ = tokio::time::timeout(RETRY, statuses.changed()).await;
        } else if statuses.changed().await.is_err() {
            return;
        }
    }
}

async fn write(
    client: &Client,
    version: &str,
    route: &RouteStatus,
    status: &Value,
) -> Result<(), kube::Error> {
    let plural = match route.kind.as_str() {
        "GRPCRoute" => "grpcroutes",
        "TCPRoute" => "tcproutes",
        "TLSRoute" => "tlsroutes",
        _ => "httproutes",
    };
    // The version the route was read at (TCPRoute and TLSRoute are served
    // at other versions than the standard kinds).
    let version = route
        .api_version
        .strip_prefix(mesh_config::istio::GATEWAY_API_GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .filter(|v| !v.is_empty())
        .unwrap_or(version);
    let resource = ApiResource {
        group: mesh_config::istio::GATEWAY_API_GROUP.into(),
        version: version.into(),
        api_version: format!("{}/{version}", mesh_config::istio::GATEWAY_API_GROUP),
        kind: route.kind.clone(),
        plural: plural.into(),
    };
    let patch = json!({ "status": status });
    Api::<DynamicObject>::namespaced_with(client.clone(), &route.namespace, &resource)
        .patch_status(
            &route.name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await?;
    tracing::info!(
        route = %format!("{} {}/{}", route.kind, route.namespace, route.name),
        "route status written"
    );
    Ok(())
}

/// Now, to the second, in RFC 3339.
fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(parents: Vec<ParentStatus>, previous: Option<Value>) -> RouteStatus {
        RouteStatus {
            kind: "HTTPRoute".into(),
            api_version: "gateway.networking.k8s.io/v1".into(),
            namespace: "shop".into(),
            name: "r".into(),
            generation: Some(3),
            previous,
            parents,
        }
    }

    fn gateway_parent(accepted: Condition) -> ParentStatus {
        ParentStatus {
            parent_ref: ParentRef {
                name: "gw".into(),
                section_name: Some("http".into()),
                ..Default::default()
            },
            accepted,
            resolved_refs: Condition::holds("ResolvedRefs", "all references resolved"),
        }
    }

    #[test]
    fn entries_name_their_parent_and_keep_others_and_transition_times() {
        let foreign = json!({"parentRef": {"name": "other"}, "controllerName": "example.com/gw",
                             "conditions": []});
        let first = route(
            vec![gateway_parent(Condition::holds("Accepted", "attached"))],
            Some(json!({"parents": [foreign.clone()]})),
        )
        .to_json("2026-12-04T10:00:00Z");
        let parents = first["parents"].as_array().unwrap();
        assert_eq!(parents[0], foreign, "another controller's entry is kept");
        assert_eq!(
            parents[1]["parentRef"],
            json!({"name": "gw", "sectionName": "http"})
        );
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        let accepted = &parents[1]["conditions"][0];
        assert_eq!(
            (
                &accepted["type"],
                &accepted["status"],
                &accepted["observedGeneration"]
            ),
            (&json!("Accepted"), &json!("True"), &json!(3))
        );
        // Unchanged: the same status, times kept, so nothing to write.
        let again = route(
            vec![gateway_parent(Condition::holds("Accepted", "attached"))],
            Some(first.clone()),
        )
        .to_json("2026-12-04T11:00:00Z");
        assert_eq!(again, first);
        // Read back with the API server's defaults in the parentRef: the
        // same parent, so the times stay.
        let mut defaulted = first.clone();
        defaulted["parents"][1]["parentRef"] = json!({"group": "gateway.networking.k8s.io",
            "kind": "Gateway", "name": "gw", "sectionName": "http"});
        let again = route(
            vec![gateway_parent(Condition::holds("Accepted", "attached"))],
            Some(defaulted),
        )
        .to_json("2026-12-04T11:00:00Z");
        assert_eq!(again, first);
        // A condition that changes status moves its time; the other keeps it.
        let refused = route(
            vec![gateway_parent(Condition::fails(
                "NotAllowedByListeners",
                "listener http does not allow routes from namespace shop",
            ))],
            Some(first),
        )
        .to_json("2026-12-04T12:00:00Z");
        let conditions = &refused["parents"][1]["conditions"];
        assert_eq!(conditions[0]["status"], "False");
        assert_eq!(conditions[0]["reason"], "NotAllowedByListeners");
        assert_eq!(conditions[0]["lastTransitionTime"], "2026-12-04T12:00:00Z");
        assert_eq!(conditions[1]["lastTransitionTime"], "2026-12-04T10:00:00Z");
    }
}
