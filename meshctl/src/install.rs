//! `meshctl install` and `meshctl uninstall`: the rendered chart
//! (`deploy/rendered/mesh.yaml`, embedded at build time, or a file) applied
//! to, or removed from, the cluster kubectl would talk to.
//!
//! Install server-side applies every document in file order (the Namespace
//! first) with field manager [`FIELD_MANAGER`].
//!
//! Uninstall has to undo what deleting objects does not: ztunnel keeps its
//! capture programs pinned in bpffs when it exits (so a restart never drops
//! capture), so deleting the DaemonSet alone would leave every enrolled
//! pod's connections refused. In order:
//!
//! 1. delete the ztunnel DaemonSet and wait until its pods are gone (they
//!    drain; from here until step 2 ends, enrolled pods' new connections are
//!    refused, never sent around the mesh);
//! 2. run the cleanup DaemonSet [`CLEANUP_NAME`] ([`cleanup_daemon_set`]:
//!    ztunnel's image, every node, `ztunnel uninstall --pin-dir <pin dir>`
//!    in an init container) and wait until it is ready on every node it is
//!    scheduled on: pins removed, programs detached, pods' traffic direct;
//! 3. delete the cleanup DaemonSet, then every rendered object in reverse
//!    file order (the Namespace last).

use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        core::v1::{Container, Pod, PodSpec, PodTemplateSpec, ResourceRequirements},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
    },
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::Value;

/// Field manager of `meshctl install`'s applies.
pub const FIELD_MANAGER: &str = "meshctl";
/// Name of the cleanup DaemonSet.
pub const CLEANUP_NAME: &str = "ztunnel-uninstall";
/// Name of the node agent's DaemonSet in the rendered chart.
pub const ZTUNNEL_NAME: &str = "ztunnel";
/// The rendered chart, as checked in.
pub const RENDERED: &str = include_str!("../../deploy/rendered/mesh.yaml");

/// Kinds the rendered chart holds: (apiVersion, kind, plural, namespaced).
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "Service", "services", true),
    ("v1", "ConfigMap", "configmaps", true),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
    ("apps/v1", "Deployment", "deployments", true),
    ("apps/v1", "DaemonSet", "daemonsets", true),
];

/// One document of the manifest.
#[derive(Clone, Debug)]
pub struct Document {
    /// Where it is served.
    pub resource: ApiResource,
    /// Whether it lives in a namespace.
    pub namespaced: bool,
    /// The object as written.
    pub object: Value,
}

impl Document {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `metadata.namespace` (empty for cluster-scoped kinds).
    pub fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
    }

    /// `Kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        if self.namespaced {
            format!(
                "{} {}/{}",
                self.resource.kind,
                self.namespace(),
                self.name()
            )
        } else {
            format!("{} {}", self.resource.kind, self.name())
        }
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        if self.namespaced {
            Api::namespaced_with(client.clone(), self.namespace(), &self.resource)
        } else {
            Api::all_with(client.clone(), &self.resource)
        }
    }
}

/// The documents of a multi-document YAML manifest, in order; every one
/// must be of a kind the chart uses, with a name (and a namespace when
/// namespaced).
pub fn parse_manifest(text: &str) -> anyhow::Result<Vec<Document>> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value = k8s_openapi::serde::Deserialize::deserialize(document)
            .with_context(|| format!("document {index} is not YAML"))?;
        if value.is_null() {
            continue;
        }
        let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let Some(&(_, _, plural, namespaced)) = KINDS
            .iter()
            .find(|(v, k, _, _)| *v == api_version && *k == kind)
        else {
            bail!("document {index}: {api_version} {kind} is not a kind meshctl installs");
        };
        let (group, version) = api_version
            .split_once('/')
            .unwrap_or(("", api_version.as_str()));
        let document = Document {
            resource: ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: api_version.clone(),
                kind: kind.clone(),
                plural: plural.into(),
            },
            namespaced,
            object: value,
        };
        if document.name().is_empty() || (namespaced && document.namespace().is_empty()) {
            bail!("document {index} ({kind}) has no name or namespace");
        }
        documents.push(document);
    }
    Ok(documents)
}

/// Server-side applies every document, in order.
pub async fn install(client: &Client, documents: &[Document]) -> anyhow::Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for document in documents {
        document
            .api(client)
            .patch(document.name(), &params, &Patch::Apply(&document.object))
            .await
            .with_context(|| format!("applying {}", document.describe()))?;
        println!("applied {}", document.describe());
    }
    Ok(())
}

/// The DaemonSet that removes ztunnel's capture from every node: ztunnel's
/// image, tolerations, security context and bpffs mount; `ztunnel
/// uninstall --pin-dir <ztunnel's --pin-dir>` as init container, then a
/// container that only waits, so a pod is ready once its node is clean.
pub fn cleanup_daemon_set(ztunnel: &DaemonSet) -> anyhow::Result<DaemonSet> {
    let pod = ztunnel
        .spec
        .template
        .spec
        .as_ref()
        .context("the ztunnel DaemonSet has no pod spec")?;
    let container = pod
        .containers
        .first()
        .context("the ztunnel DaemonSet has no container")?;
    let pin_dir = container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--pin-dir="))
        .context("the ztunnel DaemonSet has no --pin-dir=… argument")?;
    let bpffs_mounts: Vec<_> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| pin_dir.starts_with(&m.mount_path))
        .cloned()
        .collect();
    if bpffs_mounts.is_empty() {
        bail!("the ztunnel DaemonSet mounts nothing above its pin directory {pin_dir}");
    }
    let volumes: Vec<_> = pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| bpffs_mounts.iter().any(|m| m.name == v.name))
        .cloned()
        .collect();
    let labels = std::collections::BTreeMap::from([("app".to_owned(), CLEANUP_NAME.to_owned())]);
    let uninstall = |name: &str, wait: bool| {
        let mut args = vec!["uninstall".to_owned(), format!("--pin-dir={pin_dir}")];
        if wait {
            args.push("--wait".into());
        }
        Container {
            name: name.into(),
            image: container.image.clone(),
            image_pull_policy: container.image_pull_policy.clone(),
            args: Some(args),
            security_context: container.security_context.clone(),
            volume_mounts: Some(bpffs_mounts.clone()),
            resources: Some(ResourceRequirements {
                requests: Some(
                    [("cpu", "10m"), ("memory", "16Mi")]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
                        .collect(),
                ),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        }
    };
    Ok(DaemonSet {
        metadata: ObjectMeta {
            name: Some(CLEANUP_NAME.into()),
            namespace: ztunnel.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // Every node ztunnel ran on, whatever its taints.
                    tolerations: pod.tolerations.clone(),
                    node_selector: pod.node_selector.clone(),
                    priority_class_name: pod.priority_class_name.clone(),
                    automount_service_account_token: Some(false),
                    init_containers: Some(vec![uninstall("uninstall", false)]),
                    containers: vec![uninstall("done", true)],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(5),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    })
}

/// How long [`uninstall`] waits, and how often it looks.
#[derive(Clone, Copy, Debug)]
pub struct Waits {
    /// Longest wait for one step.
    pub timeout: Duration,
    /// Time between two looks.
    pub poll: Duration,
}

/// Removes capture from every node, then every object of `documents` (see
/// the module documentation for the order).
pub async fn uninstall(
    client: &Client,
    documents: &[Document],
    waits: Waits,
) -> anyhow::Result<()> {
    let ztunnel_doc = documents
        .iter()
        .find(|d| d.resource.kind == "DaemonSet" && d.name() == ZTUNNEL_NAME)
        .context("the manifest has no ztunnel DaemonSet")?;
    let ztunnel: DaemonSet = serde_json::from_value(ztunnel_doc.object.clone())
        .context("reading the ztunnel DaemonSet of the manifest")?;
    remove_capture(client, &ztunnel, ztunnel_doc.namespace(), waits).await?;

    // 3. Everything else, the Namespace last.
    for document in documents.iter().rev() {
        if !std::ptr::eq(document, ztunnel_doc) {
            delete(document, client).await?;
        }
    }
    Ok(())
}

/// `uninstall --nodes-only`, as the chart's Helm pre-delete hook runs it
/// in the cluster: steps 1 and 2 only, from the DaemonSet `ztunnel` of
/// `namespace` as it runs (so the values it was installed with apply), or
/// from `fallback` (the built-in manifest's) when it is already gone.
pub async fn uninstall_nodes(
    client: &Client,
    namespace: &str,
    fallback: &[Document],
    waits: Waits,
) -> anyhow::Result<()> {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let live = daemon_sets
        .get_opt(ZTUNNEL_NAME)
        .await
        .with_context(|| format!("reading DaemonSet {namespace}/{ZTUNNEL_NAME}"))?;
    let ztunnel = match live {
        Some(live) => live,
        None => {
            let doc = fallback
                .iter()
                .find(|d| d.resource.kind == "DaemonSet" && d.name() == ZTUNNEL_NAME)
                .context("the built-in manifest has no ztunnel DaemonSet")?;
            println!(
                "DaemonSet {namespace}/{ZTUNNEL_NAME} is not there; cleaning with the built-in one's settings"
            );
            let mut ztunnel: DaemonSet = serde_json::from_value(doc.object.clone())
                .context("reading the ztunnel DaemonSet of the manifest")?;
            ztunnel.metadata.namespace = Some(namespace.to_owned());
            ztunnel
        }
    };
    remove_capture(client, &ztunnel, namespace, waits).await
}

/// Steps 1 and 2: `ztunnel` goes (and its pods drain), then the cleanup
/// DaemonSet removes every node's pins and is deleted.
async fn remove_capture(
    client: &Client,
    ztunnel: &DaemonSet,
    namespace: &str,
    waits: Waits,
) -> anyhow::Result<()> {
    let cleanup = cleanup_daemon_set(ztunnel)?;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);

    // 1. The node agents go (and drain).
    match daemon_sets
        .delete(ZTUNNEL_NAME, &DeleteParams::background())
        .await
    {
        Ok(_) => println!("deleted DaemonSet {namespace}/{ZTUNNEL_NAME}"),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            println!("DaemonSet {namespace}/{ZTUNNEL_NAME} was not there");
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("deleting DaemonSet {namespace}/{ZTUNNEL_NAME}"));
        }
    }
    let selector = ztunnel
        .spec
        .selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    wait_for(waits, "the ztunnel pods to exit", || async {
        let left = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .with_context(|| format!("listing pods {selector} in {namespace}"))?;
        Ok(left.items.is_empty())
    })
    .await?;

    // 2. Every node's pins go.
    daemon_sets
        .patch(
            CLEANUP_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cleanup),
        )
        .await
        .with_context(|| format!("applying DaemonSet {namespace}/{CLEANUP_NAME}"))?;
    println!("applied DaemonSet {namespace}/{CLEANUP_NAME}");
    wait_for(waits, "capture to be removed from every node", || async {
        let current = daemon_sets
            .get(CLEANUP_NAME)
            .await
            .with_context(|| format!("reading DaemonSet {namespace}/{CLEANUP_NAME}"))?;
        Ok(cleanup_done(&current))
    })
    .await?;
    println!("capture removed from every node");
    daemon_sets
        .delete(CLEANUP_NAME, &DeleteParams::background())
        .await
        .with_context(|| format!("deleting DaemonSet {namespace}/{CLEANUP_NAME}"))?;
    println!("deleted DaemonSet {namespace}/{CLEANUP_NAME}");
    Ok(())
}

/// Whether the cleanup DaemonSet's current generation is ready on every
/// node it is scheduled on.
pub fn cleanup_done(daemon_set: &DaemonSet) -> bool {
    let Some(status) = &daemon_set.status else {
        return false;
    };
    let observed = match (daemon_set.metadata.generation, status.observed_generation) {
        (Some(generation), Some(observed)) => observed >= generation,
        (Some(_), None) => false,
        (None, _) => true,
    };
    observed
        && status.number_ready >= status.desired_number_scheduled
        && status
            .updated_number_scheduled
            .unwrap_or(status.desired_number_scheduled)
            >= status.desired_number_scheduled
}

/// Deletes `document`'s object; one already gone is fine.
async fn delete(document: &Document, client: &Client) -> anyhow::Result<()> {
    match document
        .api(client)
        .delete(document.name(), &DeleteParams::background())
        .await
    {
        Ok(_) => println!("deleted {}", document.describe()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            println!("{} was not there", document.describe());
        }
        Err(err) => {
            return Err(err).with_context(|| format!("deleting {}", document.describe()));
        }
    }
    Ok(())
}

async fn wait_for<F, Fut>(waits: Waits, what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + waits.timeout;
    println!("waiting for {what}");
    loop {
        if done().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up waiting for {what} after {:?}", waits.timeout);
        }
        tokio::time::sleep(waits.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use mesh_fake_apiserver::{FakeApiServer, Kind};
    use serde_json::json;

    use super::*;

    fn rendered() -> Vec<Document> {
        parse_manifest(RENDERED).expect("the rendered chart parses")
    }

    async fn fake() -> FakeApiServer {
        let server = FakeApiServer::start().await;
        for (api_version, kind, plural, namespaced) in KINDS {
            server.serve(Kind::new(api_version, kind, plural, *namespaced));
        }
        server.serve(Kind::pod());
        server
    }

    const WAITS: Waits = Waits {
        timeout: Duration::from_secs(10),
        poll: Duration::from_millis(20),
    };

    #[test]
    fn the_rendered_chart_is_understood_and_its_namespace_comes_first() {
        let documents = rendered();
        assert_eq!(documents[0].describe(), "Namespace istio-system");
        assert!(
            documents
                .iter()
                .any(|d| d.describe() == "DaemonSet istio-system/ztunnel")
        );
        assert!(parse_manifest("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n").is_err());
    }

    #[test]
    fn the_cleanup_runs_ztunnel_uninstall_on_every_node_ztunnel_ran_on() {
        let ztunnel = rendered()
            .into_iter()
            .find(|d| d.name() == ZTUNNEL_NAME && d.resource.kind == "DaemonSet")
            .unwrap();
        let ztunnel: DaemonSet = serde_json::from_value(ztunnel.object).unwrap();
        let cleanup = cleanup_daemon_set(&ztunnel).unwrap();
        let pod = cleanup.spec.template.spec.as_ref().unwrap();
        let ztunnel_pod = ztunnel.spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.tolerations, ztunnel_pod.tolerations);
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.image, ztunnel_pod.containers[0].image);
        assert_eq!(
            init.args.as_deref().unwrap(),
            ["uninstall", "--pin-dir=/sys/fs/bpf/mesh"]
        );
        assert_eq!(
            init.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/sys/fs/bpf"
        );
        assert_eq!(
            pod.volumes.as_ref().unwrap()[0]
                .host_path
                .as_ref()
                .unwrap()
                .path,
            "/sys/fs/bpf"
        );
        assert!(
            pod.containers[0]
                .args
                .as_ref()
                .unwrap()
                .contains(&"--wait".to_owned())
        );
        // Typed round trip: nothing k8s-openapi would drop.
        let value = serde_json::to_value(&cleanup).unwrap();
        assert_eq!(value["kind"], "DaemonSet");
        let back: DaemonSet = serde_json::from_value(value).unwrap();
        assert_eq!(back, cleanup);
    }

    #[test]
    fn cleanup_is_done_when_every_scheduled_pod_is_ready() {
        let with = |status: Value| -> DaemonSet {
            serde_json::from_value(json!({"metadata": {"name": "x", "generation": 1},
                "spec": {"selector": {}, "template": {}}, "status": status}))
            .unwrap()
        };
        let status = |ready: i32, observed: i64| {
            json!({"desiredNumberScheduled": 3, "currentNumberScheduled": 3,
                   "numberMisscheduled": 0, "numberReady": ready,
                   "updatedNumberScheduled": 3, "observedGeneration": observed})
        };
        assert!(!cleanup_done(&with(Value::Null)));
        assert!(!cleanup_done(&with(status(2, 1))));
        assert!(!cleanup_done(&with(status(3, 0))), "an older generation");
        assert!(cleanup_done(&with(status(3, 1))));
    }

    #[tokio::test]
    async fn install_applies_every_document_in_order() {
        let server = fake().await;
        let documents = rendered();
        install(&server.client(), &documents).await.unwrap();
        let patches = server.patches();
        assert_eq!(patches.len(), documents.len());
        assert_eq!(patches[0].path, "/api/v1/namespaces/istio-system");
        for patch in &patches {
            assert_eq!(patch.content_type, "application/apply-patch+yaml");
            assert_eq!(patch.field_manager.as_deref(), Some(FIELD_MANAGER));
        }
        assert!(
            server
                .get("apps/v1", "DaemonSet", "istio-system", "ztunnel")
                .is_some()
        );
        assert!(
            server
                .get(
                    "rbac.authorization.k8s.io/v1",
                    "ClusterRole",
                    "",
                    "mesh-control"
                )
                .is_some()
        );
    }

    #[tokio::test]
    async fn uninstall_cleans_every_node_before_deleting_anything_else() {
        let server = fake().await;
        let documents = rendered();
        install(&server.client(), &documents).await.unwrap();
        server.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ztunnel-abcde", "namespace": "istio-system", "labels": {"app": "ztunnel"}},
            "spec": {"nodeName": "node0", "containers": [{"name": "ztunnel"}]}}));
        let client = server.client();
        let run = tokio::spawn({
            let documents = documents.clone();
            async move { uninstall(&client, &documents, WAITS).await }
        });

        // The kubelet's part, played by the test: the ztunnel pod exits
        // once its DaemonSet is gone...
        let gone = |server: &FakeApiServer| {
            server
                .get("apps/v1", "DaemonSet", "istio-system", "ztunnel")
                .is_none()
        };
        while !gone(&server) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            server
                .get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME)
                .is_none(),
            "the cleanup waits for the ztunnel pods"
        );
        server.delete("v1", "Pod", "istio-system", "ztunnel-abcde");
        // ...and the cleanup pods become ready on both nodes.
        let cleanup = loop {
            if let Some(ds) = server.get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME) {
                break ds;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            server
                .get("apps/v1", "Deployment", "istio-system", "mesh-control")
                .is_some(),
            "nothing else is deleted while nodes may still have capture"
        );
        let mut ready = cleanup;
        ready["status"] = json!({"desiredNumberScheduled": 2, "currentNumberScheduled": 2,
            "numberMisscheduled": 0, "numberReady": 2, "updatedNumberScheduled": 2});
        server.apply(ready);
        run.await.unwrap().expect("uninstall");

        for document in &documents {
            let kind = &document.resource;
            assert!(
                server
                    .get(
                        &kind.api_version,
                        &kind.kind,
                        document.namespace(),
                        document.name()
                    )
                    .is_none(),
                "{} left behind",
                document.describe()
            );
        }
        assert!(
            server
                .get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME)
                .is_none()
        );
        // The order of the writes: ztunnel, the cleanup (applied, then
        // deleted), the rest in reverse, the Namespace last.
        let writes: Vec<String> = server
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("DELETE") || r.starts_with("PATCH"))
            .map(|r| r.split('?').next().unwrap_or_default().to_owned())
            .skip(documents.len())
            .collect();
        assert_eq!(
            writes[..3],
            [
                "DELETE /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel",
                "PATCH /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel-uninstall",
                "DELETE /apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel-uninstall",
            ],
            "{writes:#?}"
        );
        assert_eq!(
            writes.last().map(String::as_str),
            Some("DELETE /api/v1/namespaces/istio-system")
        );
        assert_eq!(writes.len(), 3 + documents.len() - 1, "{writes:#?}");
    }

    /// The Helm hook's Role, from the rendered hooks file.
    fn hook_rules() -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
        use k8s_openapi::serde::Deserialize as _;
        let text = include_str!("../../deploy/rendered/helm-hooks.yaml");
        let role = serde_yaml::Deserializer::from_str(text)
            .filter_map(|doc| {
                let value = serde_yaml::Value::deserialize(doc).ok()?;
                (value["kind"].as_str() == Some("Role")).then_some(value)
            })
            .next()
            .expect("the hooks hold a Role");
        let role: k8s_openapi::api::rbac::v1::Role =
            serde_json::from_value(serde_json::to_value(role).unwrap()).unwrap();
        role.rules.unwrap_or_default()
    }

    /// `METHOD /path?query` → (apiGroup, resource, verb).
    fn access(request: &str) -> (String, String, String) {
        let (method, rest) = request.split_once(' ').unwrap();
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _, rest @ ..] => ("", rest),
            ["apis", group, _, rest @ ..] => (*group, rest),
            _ => panic!("unexpected path {path}"),
        };
        let (resource, named) = match rest {
            ["namespaces", _, resource] => (*resource, false),
            ["namespaces", _, resource, _] => (*resource, true),
            other => panic!("not namespaced: {other:?}"),
        };
        let verb = match (method, named) {
            ("GET", true) => "get",
            ("GET", false) if query.contains("watch=true") => "watch",
            ("GET", false) => "list",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            ("POST", _) => "create",
            _ => panic!("unexpected {request}"),
        };
        (group.into(), resource.into(), verb.into())
    }

    #[tokio::test]
    async fn nodes_only_cleans_with_the_running_daemon_set_and_the_hooks_role_allows_it() {
        let server = fake().await;
        let documents = rendered();
        install(&server.client(), &documents).await.unwrap();
        // Installed with other values: the live DaemonSet's pin directory.
        let mut live = server
            .get("apps/v1", "DaemonSet", "istio-system", ZTUNNEL_NAME)
            .unwrap();
        for arg in live["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array_mut()
            .unwrap()
        {
            if arg.as_str().is_some_and(|a| a.starts_with("--pin-dir=")) {
                *arg = "--pin-dir=/sys/fs/bpf/custom".into();
            }
        }
        server.apply(live);
        let before = server.requests().len();
        let client = server.client();
        let run = tokio::spawn({
            let documents = documents.clone();
            async move { uninstall_nodes(&client, "istio-system", &documents, WAITS).await }
        });
        let cleanup = loop {
            if let Some(ds) = server.get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME) {
                break ds;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let init = &cleanup["spec"]["template"]["spec"]["initContainers"][0]["args"];
        assert_eq!(init, &json!(["uninstall", "--pin-dir=/sys/fs/bpf/custom"]));
        let mut ready = cleanup;
        ready["status"] = json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 1,
            "numberMisscheduled": 0, "numberReady": 1, "updatedNumberScheduled": 1});
        server.apply(ready);
        run.await.unwrap().expect("uninstall --nodes-only");
        assert!(
            server
                .get("apps/v1", "DaemonSet", "istio-system", ZTUNNEL_NAME)
                .is_none()
        );
        assert!(
            server
                .get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME)
                .is_none()
        );
        // helm deletes the rest after the hook.
        assert!(
            server
                .get("apps/v1", "Deployment", "istio-system", "mesh-control")
                .is_some()
        );

        // Every request of the hook is allowed by the hook's Role.
        let rules = hook_rules();
        let requests = server.requests()[before..].to_vec();
        assert!(!requests.is_empty());
        for request in &requests {
            let (group, resource, verb) = access(request);
            let allowed = rules.iter().any(|rule| {
                rule.api_groups.iter().flatten().any(|g| *g == group)
                    && rule.resources.iter().flatten().any(|r| *r == resource)
                    && rule.verbs.contains(&verb)
            });
            assert!(
                allowed,
                "{request}: the hook's Role lacks {verb} {group}/{resource}"
            );
        }

        // Gone already: cleaned with the built-in DaemonSet's settings.
        let client = server.client();
        let again = tokio::spawn({
            let documents = documents.clone();
            async move { uninstall_nodes(&client, "istio-system", &documents, WAITS).await }
        });
        let cleanup = loop {
            if let Some(ds) = server.get("apps/v1", "DaemonSet", "istio-system", CLEANUP_NAME) {
                break ds;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut ready = cleanup;
        ready["status"] = json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 1,
            "numberMisscheduled": 0, "numberReady": 1, "updatedNumberScheduled": 1});
        server.apply(ready);
        again
            .await
            .unwrap()
            .expect("a second run finds nothing to delete");
    }
}
