//! The node agent's Kubernetes pod source against an in-process fake API
//! server and a fake host (cgroup tree, `/proc`, netns pins in a tempdir):
//! only this node's enrolled pods are listed, each with the cgroup and
//! network namespace found on the host, and pods not on the host yet
//! appear once they are.

use std::{path::Path, time::Duration};

use mesh_config::node::{NodePod, NodePods};
use mesh_fake_apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};
use ztunnel::{kube_pods::KubePods, pod_host::HostRoots};

const PATIENCE: Duration = Duration::from_secs(10);

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let labels = match mode {
        Some(mode) => json!({"istio.io/dataplane-mode": mode}),
        None => json!({}),
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

struct PodSpec<'a> {
    ns: &'a str,
    name: &'a str,
    uid: &'a str,
    node: &'a str,
    ip: Option<&'a str>,
    qos: &'a str,
}

fn pod(p: PodSpec<'_>) -> Value {
    let mut status = json!({"phase": "Running", "qosClass": p.qos});
    if let Some(ip) = p.ip {
        status["podIP"] = ip.into();
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": p.name, "namespace": p.ns, "uid": p.uid, "labels": {"app": p.name}},
           "spec": {"nodeName": p.node, "serviceAccountName": format!("{}-sa", p.name),
                    "containers": [{"name": "app", "image": "app:1"}]},
           "status": status})
}

/// A container process of a pod: `cgroup.procs` in a container cgroup below
/// `pod_cgroup`, and `/proc/<pid>/ns/net`.
fn process(host: &Path, pod_cgroup: &str, pid: u32) {
    let container = host
        .join("cgroup")
        .join(pod_cgroup)
        .join("cri-containerd-0123.scope");
    std::fs::create_dir_all(&container).unwrap();
    std::fs::write(container.join("cgroup.procs"), format!("{pid}\n")).unwrap();
    let ns = host.join(format!("proc/{pid}/ns"));
    std::fs::create_dir_all(&ns).unwrap();
    std::fs::write(ns.join("net"), "netns").unwrap();
}

fn roots(host: &Path) -> HostRoots {
    HostRoots {
        cgroup_root: host.join("cgroup"),
        proc_root: host.join("proc"),
        netns_dir: host.join("netns"),
    }
}

async fn next(pods: &mut KubePods) -> NodePods {
    tokio::time::timeout(PATIENCE, pods.changed())
        .await
        .expect("node pods within the patience")
}

fn names(pods: &NodePods) -> Vec<String> {
    pods.pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

/// An API server serving Pods and Namespaces, none of them yet.
async fn node_api() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve(Kind::pod());
    server.serve(Kind::namespace());
    server
}

/// [`node_api`] with namespace `shop` enrolled and `plain` not.
async fn shop_and_plain() -> FakeApiServer {
    let server = node_api().await;
    server.apply(namespace("shop", Some("ambient")));
    server.apply(namespace("plain", None));
    server
}

#[tokio::test]
async fn this_nodes_enrolled_pods_are_located_on_the_host() {
    let host = tempfile::tempdir().unwrap();
    let h = host.path();
    let server = shop_and_plain().await;
    // systemd driver, Burstable.
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "web-0",
        uid: "1111-aaaa",
        node: "node0",
        ip: Some("10.244.0.10"),
        qos: "Burstable",
    }));
    process(
        h,
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_aaaa.slice",
        101,
    );
    // cgroupfs driver, Guaranteed, with the runtime's pinned netns.
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "db-0",
        uid: "2222-bbbb",
        node: "node0",
        ip: Some("10.244.0.11"),
        qos: "Guaranteed",
    }));
    process(h, "kubepods/pod2222-bbbb", 102);
    std::fs::create_dir_all(h.join("netns")).unwrap();
    std::fs::hard_link(h.join("proc/102/ns/net"), h.join("netns/cni-5678")).unwrap();
    // Not enrolled: namespace not ambient.
    server.apply(pod(PodSpec {
        ns: "plain",
        name: "other-0",
        uid: "3333",
        node: "node0",
        ip: Some("10.244.0.12"),
        qos: "BestEffort",
    }));
    process(h, "kubepods/besteffort/pod3333", 103);
    // Another node's pod.
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "web-1",
        uid: "4444",
        node: "node1",
        ip: Some("10.244.1.10"),
        qos: "BestEffort",
    }));
    // Opted out, on the host network, and not started yet.
    let mut opted_out = pod(PodSpec {
        ns: "shop",
        name: "debug-0",
        uid: "5555",
        node: "node0",
        ip: Some("10.244.0.13"),
        qos: "BestEffort",
    });
    opted_out["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
    server.apply(opted_out);
    let mut host_network = pod(PodSpec {
        ns: "shop",
        name: "agent-0",
        uid: "6666",
        node: "node0",
        ip: Some("10.255.0.1"),
        qos: "BestEffort",
    });
    host_network["spec"]["hostNetwork"] = true.into();
    server.apply(host_network);
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "new-0",
        uid: "7777",
        node: "node0",
        ip: None,
        qos: "BestEffort",
    }));

    let mut pods = KubePods::start(server.client(), "node0", roots(h));
    let first = next(&mut pods).await;
    assert_eq!(first.node, "node0");
    assert_eq!(
        first.pods,
        [
            NodePod {
                name: "db-0".into(),
                namespace: "shop".into(),
                ip: "10.244.0.11".parse().unwrap(),
                netns: h.join("netns/cni-5678"),
                cgroup: h.join("cgroup/kubepods/pod2222-bbbb"),
                service_account: "db-0-sa".into(),
                enrolled: true,
            },
            NodePod {
                name: "web-0".into(),
                namespace: "shop".into(),
                ip: "10.244.0.10".parse().unwrap(),
                netns: h.join("proc/101/ns/net"),
                cgroup: h.join(
                    "cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_aaaa.slice"
                ),
                service_account: "web-0-sa".into(),
                enrolled: true,
            },
        ]
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName=node0")),
        "{:?}",
        server.requests()
    );

    // The pending pod gets its address, then its cgroup appears: it is
    // listed once it is on the host, without any API event.
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "new-0",
        uid: "7777",
        node: "node0",
        ip: Some("10.244.0.14"),
        qos: "BestEffort",
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    process(
        h,
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7777.slice",
        107,
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = next(&mut pods).await;
        if names(&now) == ["shop/db-0", "shop/new-0", "shop/web-0"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:?}", names(&now));
    }

    // Labelling a namespace enrols its pods, unlabelling one releases them,
    // and a deleted pod is dropped.
    server.apply(namespace("plain", Some("ambient")));
    assert_eq!(
        names(&next(&mut pods).await),
        ["plain/other-0", "shop/db-0", "shop/new-0", "shop/web-0"]
    );
    server.apply(namespace("shop", None));
    assert_eq!(names(&next(&mut pods).await), ["plain/other-0"]);
    assert!(server.delete("v1", "Pod", "plain", "other-0"));
    assert!(next(&mut pods).await.pods.is_empty());
}

#[tokio::test]
async fn an_empty_node_is_published_once_listed() {
    let host = tempfile::tempdir().unwrap();
    let server = node_api().await;
    let mut pods = KubePods::start(server.client(), "node0", roots(host.path()));
    // Empty, but published: this is what releases pods that left while the
    // agent was away.
    assert!(next(&mut pods).await.pods.is_empty());
}

#[tokio::test]
async fn after_410_gone_the_relisted_pods_and_labels_are_published() {
    let host = tempfile::tempdir().unwrap();
    let h = host.path();
    let server = shop_and_plain().await;
    server.apply(pod(PodSpec {
        ns: "shop",
        name: "web-0",
        uid: "1111-aaaa",
        node: "node0",
        ip: Some("10.244.0.10"),
        qos: "BestEffort",
    }));
    process(
        h,
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1111_aaaa.slice",
        101,
    );
    server.apply(pod(PodSpec {
        ns: "plain",
        name: "batch-0",
        uid: "4444-dddd",
        node: "node0",
        ip: Some("10.244.0.12"),
        qos: "BestEffort",
    }));
    process(
        h,
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod4444_dddd.slice",
        104,
    );
    let mut pods = KubePods::start(server.client(), "node0", roots(host.path()));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while names(&next(&mut pods).await) != ["shop/web-0"] {
        assert!(tokio::time::Instant::now() < deadline, "first list");
    }

    // While no watch hears of it, `plain` is enrolled and web-0 goes away;
    // then the watch history is compacted (410 Gone) and the agent relists.
    let plain = namespace("plain", Some("ambient"));
    server.apply_unannounced(plain);
    assert!(server.delete_unannounced("v1", "Pod", "shop", "web-0"));
    server.expire_watches();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = next(&mut pods).await;
        if names(&now) == ["plain/batch-0"] {
            assert!(now.pods[0].enrolled);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relisted state not published: {:?}",
            names(&now)
        );
    }

    // The watches that follow the relist still deliver.
    server.apply(namespace("plain", None));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !names(&next(&mut pods).await).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "watch after relist");
    }
}
