//! The node's pods from the Kubernetes API, as the [`NodePods`] the agent
//! reconciles (the same value the lab writes to `--node-pods`).
//!
//! Two kube-rs watchers feed reflector stores: Pods with the field selector
//! `spec.nodeName=<node>` (this node's only) and Namespaces (their
//! enrolment label). Whenever either changes, the enrolled pods
//! ([`is_enrolled`]) that have an IPv4 address, are not on the host network
//! and have not finished are located on the host ([`crate::pod_host`]);
//! pods not found there yet are left out and tried again every
//! [`RETRY`]. Nothing is published until both kinds have been listed, so a
//! restarted agent never sees a partial node and releases pods by mistake.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, reflector::store::Writer, watcher},
};
use mesh_config::node::{NodePod, NodePods, is_enrolled};
use tokio::sync::watch;

use crate::pod_host::{HostRoots, PodLocator};

/// How often pods that could not be located are tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What the node agent reads from the API: (apiGroup, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["list", "watch"]),
    ("", "namespaces", &["list", "watch"]),
];

/// The node's pods, kept current from the API; the watches stop when this
/// is dropped.
pub struct KubePods {
    pods: watch::Receiver<NodePods>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubePods {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubePods {
    /// Starts watching `node`'s pods, locating them under `roots`.
    pub fn start(client: Client, node: &str, roots: HostRoots) -> Self {
        let (tx, pods) = watch::channel(NodePods {
            node: node.to_owned(),
            pods: Vec::new(),
        });
        let task = tokio::spawn(run(client, node.to_owned(), PodLocator::new(roots), tx));
        Self { pods, task }
    }

    /// Waits for the next different set of pods (the first once both kinds
    /// are listed) and returns it. Cancel-safe.
    pub async fn changed(&mut self) -> NodePods {
        if self.pods.changed().await.is_err() {
            // The task only ends with this value.
            std::future::pending::<()>().await;
        }
        self.pods.borrow_and_update().clone()
    }
}

/// Logs each distinct error of a watch once.
#[derive(Default)]
struct WatchErrors(Option<String>);

impl WatchErrors {
    fn report(&mut self, kind: &str, err: watcher::Error) {
        if matches!(&err, watcher::Error::WatchError(s) if s.code == 410) {
            tracing::debug!(kind, "watch expired (410 Gone); listing again");
            return;
        }
        let error = format!("{:#}", anyhow::Error::new(err));
        if self.0.as_ref() != Some(&error) {
            tracing::warn!(kind, %error, "watch failed; retrying with backoff");
            self.0 = Some(error);
        }
    }
}

async fn run(client: Client, node: String, mut locator: PodLocator, tx: watch::Sender<NodePods>) {
    let pods_api: Api<Pod> = Api::all(client.clone());
    let namespaces_api: Api<Namespace> = Api::all(client);
    let mut pods_writer = Writer::<Pod>::default();
    let mut namespaces_writer = Writer::<Namespace>::default();
    let pod_store = pods_writer.as_reader();
    let namespace_store = namespaces_writer.as_reader();
    let pods = watcher(
        pods_api,
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .modify(|pod| pod.managed_fields_mut().clear())
    .default_backoff();
    let namespaces = watcher(namespaces_api, watcher::Config::default())
        .modify(|ns| ns.managed_fields_mut().clear())
        .default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut namespaces = std::pin::pin!(namespaces);
    let (mut pods_listed, mut namespaces_listed) = (false, false);
    let (mut pod_errors, mut namespace_errors) = (WatchErrors::default(), WatchErrors::default());
    let mut missing = false;
    // The first complete set is published even when empty: it is what
    // releases pods that left while the agent was away.
    let mut first = true;
    loop {
        tokio::select! {
            Some(event) = pods.next() => match event {
                Ok(event) => {
                    pods_listed |= matches!(event, watcher::Event::InitDone);
                    pods_writer.apply_watcher_event(&event);
                    pod_errors.0 = None;
                }
                Err(err) => pod_errors.report("Pod", err),
            },
            Some(event) = namespaces.next() => match event {
                Ok(event) => {
                    namespaces_listed |= matches!(event, watcher::Event::InitDone);
                    namespaces_writer.apply_watcher_event(&event);
                    namespace_errors.0 = None;
                }
                Err(err) => namespace_errors.report("Namespace", err),
            },
            () = tokio::time::sleep(RETRY), if missing => {}
            else => return,
        }
        if !(pods_listed && namespaces_listed) {
            continue;
        }
        let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = namespace_store
            .state()
            .iter()
            .map(|ns| (ns.name_any(), ns.labels().clone()))
            .collect();
        let (pods, unlocated) =
            node_pods(&node, &pod_store.state(), &namespace_labels, &mut locator);
        missing = unlocated > 0;
        tx.send_if_modified(|current| {
            let changed = first || *current != pods;
            *current = pods;
            changed
        });
        first = false;
    }
}

/// The enrolled pods of `pods` found on the host, sorted by namespace and
/// name, and how many enrolled pods could not be located yet.
pub fn node_pods(
    node: &str,
    pods: &[Arc<Pod>],
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
    locator: &mut PodLocator,
) -> (NodePods, usize) {
    let no_labels = BTreeMap::new();
    let mut found = Vec::new();
    let mut unlocated = 0;
    let mut keys = Vec::new();
    let mut uids = Vec::new();
    for pod in pods {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let key = format!("{namespace}/{name}");
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let labels = namespace_labels.get(&namespace).unwrap_or(&no_labels);
        if !is_enrolled(labels, pod.labels())
            || spec.and_then(|s| s.host_network) == Some(true)
            || matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        {
            continue;
        }
        // No address yet: the sandbox is still being set up.
        let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let Some(uid) = pod.uid() else { continue };
        keys.push(key.clone());
        uids.push(uid.clone());
        let Some(paths) = locator.locate(&key, &uid, status.and_then(|s| s.qos_class.as_deref()))
        else {
            unlocated += 1;
            continue;
        };
        found.push(NodePod {
            name,
            namespace,
            ip,
            netns: paths.netns,
            cgroup: paths.cgroup,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            enrolled: true,
        });
    }
    locator.retain(&keys, &uids);
    found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (
        NodePods {
            node: node.to_owned(),
            pods: found,
        },
        unlocated,
    )
}
