//! The lab itself: bookinfo comes up as real namespaces, pods and VIPs, every
//! pod answers over real sockets, and `down` leaves nothing behind.

use std::{path::Path, process::Command};

use mesh_lab::{LabState, PodPlan, probe};
use mesh_tests::{Lab, bookinfo_manifest};

fn pod<'a>(state: &'a LabState, name: &str) -> &'a PodPlan {
    state.pod(name).unwrap_or_else(|err| panic!("{err}"))
}

/// Asserts nothing named after `lab` is left: namespaces, cgroups, pins, files.
fn assert_no_trace(lab: &str) {
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{lab}-"))),
        "namespaces left: {netns}"
    );
    let cgroup = mesh_lab::cgroup::lab_cgroup(lab).expect("cgroup root");
    assert!(!cgroup.exists(), "cgroup {} left", cgroup.display());
    assert!(!mesh_lab::pin_dir(lab).exists(), "bpffs pins left");
    assert!(!mesh_lab::run_dir(lab).exists(), "run dir left");
}

#[test]
fn bookinfo_pods_answer_by_ip_vip_and_name() {
    let lab = Lab::bookinfo("tbook");
    let state = &lab.state;
    assert_eq!(state.plan.pods.len(), 6);
    assert_eq!(state.plan.nodes.len(), 2);

    // Every pod answers on its pod IP, from a pod on the other node and from
    // one on the same node, and reports who it is and who called.
    let productpage = pod(state, "productpage");
    let details = pod(state, "details");
    assert_ne!(
        productpage.node, details.node,
        "the round robin puts them on different nodes"
    );
    for target in &state.plan.pods {
        for from in [productpage, details] {
            let url = format!("http://{}:9080/", target.ip);
            let answers = probe::http_get(state, from, &url, &[])
                .unwrap_or_else(|err| panic!("{url}: {err}"));
            let answer = &answers[0];
            assert_eq!(answer.field("pod"), target.name);
            assert_eq!(answer.field("version"), target.version());
            assert_eq!(answer.field("service_account"), target.service_account);
            assert_eq!(answer.field("node"), state.plan.nodes[target.node].name);
            let caller = answer.field("caller");
            assert!(
                caller.starts_with(&format!("{}:", from.ip)),
                "caller {caller} is {}'s own address",
                from.name
            );
        }
    }

    // Every Service answers on its VIP and by short name, from a backend it selects.
    for svc in &state.plan.services {
        let backends: Vec<String> = state
            .plan
            .pods
            .iter()
            .filter(|p| svc.ports[0].endpoints.iter().any(|e| *e.ip() == p.ip))
            .map(|p| p.name.clone())
            .collect();
        for host in [svc.vip.to_string(), svc.name.clone(), svc.hostname()] {
            let url = format!("http://{host}:9080/");
            let answers = probe::http_get(state, details, &url, &[])
                .unwrap_or_else(|err| panic!("{url}: {err}"));
            assert!(
                backends.iter().any(|b| b == answers[0].field("pod")),
                "{url} answered by {}",
                answers[0].field("pod")
            );
        }
    }

    // Requests to the reviews VIP spread over its three versions.
    let answers = probe::http_get(
        state,
        productpage,
        "http://reviews:9080/",
        &["--count", "60", "--new-connection"],
    )
    .expect("reviews x60");
    assert_eq!(answers.len(), 60);
    let versions: std::collections::BTreeSet<&str> =
        answers.iter().map(|a| a.field("version")).collect();
    // Those connects were translated by the lab's eBPF load balancer.
    let lb = mesh_ebpf_loader::lab_lb::LabServiceLb::open(&mesh_lab::pin_dir(&state.plan.name))
        .expect("open pinned service map");
    let stats = lb.stats().expect("read counters");
    assert!(stats.translated >= 60, "{stats:?}");
    assert_eq!(stats.no_backend, 0);
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        ["v1", "v2", "v3"],
        "60 connects reach every reviews version"
    );
}

#[test]
fn bookinfo_call_graph_and_protocols() {
    let lab = Lab::bookinfo("tgraph");
    let state = &lab.state;
    let details = pod(state, "details");

    // productpage -> details and reviews; reviews v2/v3 -> ratings.
    for _ in 0..6 {
        let answers = probe::http_get(state, details, "http://productpage:9080/productpage", &[])
            .expect("productpage");
        let page = &answers[0];
        assert_eq!(page.field("app"), "productpage");
        let calls = page.calls();
        assert_eq!(calls.len(), 2, "{:?}", page.body);
        assert_eq!(calls[0].field("app"), "details");
        assert_eq!(calls[1].field("app"), "reviews");
        let ratings = calls[1].calls();
        match calls[1].field("version") {
            "v1" => assert!(ratings.is_empty()),
            "v2" | "v3" => assert_eq!(ratings[0].field("app"), "ratings"),
            other => panic!("unexpected reviews version {other}"),
        }
    }

    // HTTP/2 (prior knowledge) on the same port.
    let answers =
        probe::http_get(state, details, "http://ratings:9080/", &["--http2"]).expect("h2");
    assert_eq!(answers[0].field("protocol"), "HTTP/2");

    // Plain TCP echo with half-close, a large transfer, and a server-first protocol.
    let ratings = pod(state, "ratings");
    let echoed = probe::tcp(
        state,
        details,
        &format!("{}:7", ratings.ip),
        &["--send", "hello mesh"],
    )
    .expect("echo");
    assert_eq!(echoed.trim_end(), "hello mesh");
    let bulk = probe::tcp(
        state,
        details,
        &format!("{}:7", ratings.ip),
        &["--bytes", "4194304"],
    )
    .expect("bulk echo");
    assert_eq!(bulk.trim(), "ok 4194304");
    let banner = probe::tcp(
        state,
        details,
        &format!("{}:22", ratings.ip),
        &["--expect-banner"],
    )
    .expect("banner");
    assert!(
        banner.starts_with(&format!("LAB-BANNER {}", ratings.name)),
        "{banner}"
    );
}

#[test]
fn down_removes_everything_and_is_idempotent() {
    let lab = Lab::bookinfo("tdown");
    let name = lab.state.plan.name.clone();
    let pids: Vec<u32> = lab.state.app_pids.values().copied().collect();
    assert!(
        mesh_lab::pin_dir(&name).join("LAB_SERVICES").exists(),
        "service map is pinned"
    );
    drop(lab);
    assert_no_trace(&name);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "app {pid} still runs"
        );
    }
    let again = mesh_lab::down(&name).expect("second down");
    assert!(!again.removed_anything());
}

#[test]
fn down_cleans_up_after_a_crash() {
    // What a crashed `up` leaves: a namespace, a cgroup with a process, a pin dir.
    let name = "tcrash";
    mesh_tests::require_root();
    mesh_lab::netns::create(&format!("{name}-node0")).expect("netns");
    let cgroup = mesh_lab::cgroup::lab_cgroup(name)
        .expect("cgroup root")
        .join("node0");
    mesh_lab::cgroup::create(&cgroup).expect("cgroup");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    mesh_lab::process::enter(&mut sleeper, &format!("{name}-node0"), &cgroup).expect("enter");
    let mut child = sleeper.spawn().expect("sleep");
    std::fs::create_dir_all(mesh_lab::run_dir(name)).expect("run dir");

    let report = mesh_lab::down(name).expect("down");
    assert!(report.cgroup && report.run_dir);
    assert_eq!(report.namespaces, [format!("{name}-node0")]);
    assert!(child.wait().is_ok(), "the stray process was killed");
    assert_no_trace(name);
}

#[test]
fn bad_manifests_are_refused_before_anything_is_built() {
    mesh_tests::require_root();
    let dir = std::env::temp_dir().join("mesh-tests-bad-manifest");
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
    )
    .expect("write");
    let err = mesh_lab::up(&mesh_lab::UpOptions {
        name: "tbad".into(),
        manifests: vec![file.clone(), bookinfo_manifest()],
        nodes: 2,
        app_binary: mesh_tests::workspace_binary("lab-app"),
        ztunnel_binary: mesh_tests::workspace_binary("ztunnel"),
        control_binary: mesh_tests::workspace_binary("mesh-control"),
    })
    .expect_err("a malformed Service is refused");
    let message = err.to_string();
    assert!(
        message.contains("bad.yaml")
            && message.contains("Service default/web")
            && message.contains("spec.ports[0].port"),
        "{message}"
    );
    assert_no_trace("tbad");
}

#[test]
fn a_one_node_lab_serves_bookinfo_in_the_mesh() {
    let mut lab = Lab::up("tone", vec![bookinfo_manifest()], 1);
    assert_eq!(lab.state.plan.nodes.len(), 1);
    // The control plane listens on the node's own address, which a lone
    // node has without a peer link; enrolling needs it for certificates.
    lab.enrol_namespace("default");
    let state = &lab.state;
    let productpage = pod(state, "productpage");
    for target in ["details", "reviews", "ratings"] {
        let url = format!("http://{target}:9080/");
        let answers = probe::http_get(state, productpage, &url, &[])
            .unwrap_or_else(|err| panic!("{url}: {err}"));
        assert_eq!(answers[0].field("app"), target);
    }
}
