//! Capture end to end: ztunnel on each lab node, pods enrolled and released
//! live by labels, every captured byte accounted for in ztunnel's access
//! records, and no plaintext around the mesh while ztunnel restarts.

use std::time::{Duration, Instant};

use mesh_config::node::DATAPLANE_MODE_LABEL;
use mesh_lab::{LabState, PodPlan, mesh::LabelTarget, probe};
use mesh_tests::Lab;

/// Access records (`ztunnel::access` lines) of node `node` so far.
fn access_records(state: &LabState, node: usize) -> Vec<String> {
    std::fs::read_to_string(state.ztunnel_log(node))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("ztunnel::access"))
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 1 s: records are written when ztunnel sees the connection
/// close, which can be just after the client returns) until node `node` has
/// at least `count` records matching every one of `needles`; returns them.
fn wait_for_records(state: &LabState, node: usize, needles: &[&str], count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let records = access_records(state, node);
        let matching: Vec<String> = records
            .iter()
            .filter(|r| needles.iter().all(|n| r.contains(n)))
            .cloned()
            .collect();
        if matching.len() >= count {
            return matching;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "node{node}: no {count} record(s) matching {needles:?} in {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn all_records(state: &LabState) -> Vec<String> {
    (0..state.plan.nodes.len())
        .flat_map(|n| access_records(state, n))
        .collect()
}

/// Waits until node `node`'s ztunnel logged `needle` at least `times` times,
/// at most `limit`.
fn wait_for_log_n(
    state: &LabState,
    node: usize,
    needle: &str,
    times: usize,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(state.ztunnel_log(node)).unwrap_or_default();
        if log.matches(needle).count() >= times {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "ztunnel on node{node} did not log {needle:?} within {limit:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until node `node`'s ztunnel logged `needle` once.
fn wait_for_log(state: &LabState, node: usize, needle: &str, limit: Duration) -> Duration {
    wait_for_log_n(state, node, needle, 1, limit)
}

fn pod<'a>(state: &'a LabState, name: &str) -> &'a PodPlan {
    state.pod(name).unwrap_or_else(|err| panic!("{err}"))
}

/// Labels namespace `default` ambient and waits (at most 1 s, the promise)
/// until every pod's ztunnel reports it enrolled.
fn enrol_default_namespace(lab: &mut Lab) {
    lab.state
        .set_label(
            &LabelTarget::Namespace("default".into()),
            DATAPLANE_MODE_LABEL,
            Some("ambient"),
        )
        .expect("label namespace");
    for pod in &lab.state.plan.pods {
        wait_for_log(
            &lab.state,
            pod.node,
            &enrolled_marker(pod),
            Duration::from_secs(1),
        );
    }
}

fn enrolled_marker(pod: &PodPlan) -> String {
    format!("enrolled in the mesh pod={}", pod.qualified_name())
}

#[test]
fn enrolled_traffic_goes_through_ztunnel_and_only_it() {
    let mut lab = Lab::bookinfo("tmesh");
    let productpage = pod(&lab.state, "productpage").clone();
    let details = pod(&lab.state, "details").clone();
    let ratings = pod(&lab.state, "ratings").clone();
    let details_vip = lab
        .state
        .plan
        .services
        .iter()
        .find(|s| s.name == "details")
        .expect("details")
        .vip;

    // Nothing is enrolled: traffic flows, ztunnel sees none of it.
    probe::http_get(
        &lab.state,
        &productpage,
        "http://productpage:9080/productpage",
        &[],
    )
    .expect("direct call graph");
    assert!(
        all_records(&lab.state).is_empty(),
        "un-enrolled traffic reached ztunnel"
    );

    // Enrol the namespace: every pod is captured within 1 s, nothing restarts.
    let app_pids = lab.state.app_pids.clone();
    enrol_default_namespace(&mut lab);
    assert_eq!(lab.state.app_pids, app_pids, "no app was restarted");

    // Outbound to a VIP and to a pod IP, across nodes: ztunnel on the client's
    // node records the original destination; the server's node records inbound.
    let answer = probe::http_get(
        &lab.state,
        &productpage,
        &format!("http://{details_vip}:9080/x"),
        &[],
    )
    .expect("via VIP");
    assert_eq!(answer[0].field("pod"), details.name);
    // The app sees the real client: ztunnel delivers with the caller's address.
    let caller = answer[0].field("caller");
    assert!(
        caller.starts_with(&format!("{}:", productpage.ip)),
        "details saw {caller}, not productpage's {}",
        productpage.ip
    );
    probe::http_get(
        &lab.state,
        &productpage,
        &format!("http://{}:9080/y", details.ip),
        &[],
    )
    .expect("via pod IP");
    let outbound = r#"direction="outbound""#;
    let inbound = r#"direction="inbound""#;
    wait_for_records(
        &lab.state,
        productpage.node,
        &[outbound, &format!("dst={details_vip}:9080")],
        1,
    );
    wait_for_records(
        &lab.state,
        productpage.node,
        &[outbound, &format!("dst={}:9080", details.ip)],
        1,
    );
    wait_for_records(
        &lab.state,
        details.node,
        &[inbound, &format!("dst={}:9080", details.ip)],
        2,
    );

    // A health probe from the node's own address reaches the app directly.
    let records_before = access_records(&lab.state, productpage.node).len();
    let probe = lab
        .state
        .command_on_node(productpage.node, &lab.state.app_binary)
        .expect("node command")
        .args(["tcp", &format!("{}:7", productpage.ip), "--send", "probe"])
        .output()
        .expect("probe from the node");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout),
        "probe",
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        access_records(&lab.state, productpage.node).len(),
        records_before,
        "the probe bypassed ztunnel"
    );

    // The per-program counters are on ztunnel's metrics endpoint.
    let client_metrics = lab
        .state
        .ztunnel_metrics(productpage.node)
        .expect("scrape client node");
    assert!(
        counter(&client_metrics, "capture_connect4", "captured") >= 2,
        "{client_metrics}"
    );
    assert_eq!(
        counter(&client_metrics, "capture", "error"),
        0,
        "{client_metrics}"
    );
    let server_metrics = lab
        .state
        .ztunnel_metrics(details.node)
        .expect("scrape server node");
    // Both calls share one pooled HBONE connection: one inbound capture.
    assert!(
        counter(&server_metrics, "capture_sk_lookup", "captured") >= 1,
        "{server_metrics}"
    );

    // Istio's TCP metrics, with Istio's labels, from both ends.
    let istio_line = |metrics: &str, name: &str, needles: &[&str]| -> Option<u64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let outbound_opened = istio_line(
        &client_metrics,
        "istio_tcp_connections_opened_total",
        &[
            r#"reporter="source""#,
            r#"source_workload="productpage-v1""#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage""#,
            r#"destination_workload="details-v1""#,
            r#"destination_service="details.default.svc.cluster.local""#,
        ],
    );
    assert!(outbound_opened.is_some_and(|n| n >= 1), "{client_metrics}");
    let inbound_bytes = istio_line(
        &server_metrics,
        "istio_tcp_received_bytes_total",
        &[
            r#"reporter="destination""#,
            r#"destination_workload="details-v1""#,
        ],
    );
    assert!(inbound_bytes.is_some_and(|n| n > 0), "{server_metrics}");

    // No packet-filter rule anywhere: capture is eBPF only.
    assert_no_packet_filter_rules(&lab.state);

    // The whole call graph still works through the mesh.
    let page = probe::http_get(
        &lab.state,
        &productpage,
        "http://productpage:9080/productpage",
        &[],
    )
    .expect("mesh call graph");
    assert_eq!(page[0].calls().len(), 2);

    // Server-first protocols and large transfers pass unchanged, and the
    // record accounts for every byte.
    let banner = probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:22", ratings.ip),
        &["--expect-banner", "--send", "hi"],
    )
    .expect("banner via mesh");
    assert!(
        banner.starts_with(&format!("LAB-BANNER {}", ratings.name)),
        "{banner}"
    );
    let bulk = probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:7", ratings.ip),
        &["--bytes", "4194304"],
    )
    .expect("bulk via mesh");
    assert_eq!(bulk.trim(), "ok 4194304");
    wait_for_records(
        &lab.state,
        productpage.node,
        &[
            &format!("dst={}:7", ratings.ip),
            "bytes_sent=4194304 bytes_received=4194304",
        ],
        1,
    );

    // A pod that opts out is no longer captured on its way out.
    let before = access_records(&lab.state, productpage.node).len();
    lab.state
        .set_label(
            &LabelTarget::Pod(productpage.name.clone()),
            DATAPLANE_MODE_LABEL,
            Some("none"),
        )
        .expect("opt out");
    wait_for_log(
        &lab.state,
        productpage.node,
        &format!(
            "released from the mesh pod={}",
            productpage.qualified_name()
        ),
        Duration::from_secs(1),
    );
    probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:7", ratings.ip),
        &["--send", "direct"],
    )
    .expect("opted-out pod reaches ratings");
    let after: Vec<_> = access_records(&lab.state, productpage.node)
        .into_iter()
        .skip(before)
        .collect();
    assert!(
        !after
            .iter()
            .any(|r| r.contains(&format!("pod={}", productpage.qualified_name()))),
        "{after:#?}"
    );
    lab.state
        .set_label(
            &LabelTarget::Pod(productpage.name.clone()),
            DATAPLANE_MODE_LABEL,
            None,
        )
        .expect("opt back in");
    wait_for_log_n(
        &lab.state,
        productpage.node,
        &enrolled_marker(&productpage),
        2,
        Duration::from_secs(1),
    );

    // A port nobody listens on, through both ztunnels: the destination
    // pod's refusal comes back as fast as it would directly.
    let started = Instant::now();
    let err = probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:9999", details.ip),
        &["--send", "x"],
    )
    .expect_err("a closed port through the mesh");
    let message = err.to_string();
    assert!(
        message.contains("refused") || message.contains("reset") || message.contains("closed"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a closed port was refused after {:?}",
        started.elapsed()
    );

    // ztunnel down: the node's enrolled pods fail fast both ways, never bypass.
    lab.state
        .stop_ztunnel(productpage.node)
        .expect("stop ztunnel");
    let started = Instant::now();
    let err = probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:7", details.ip),
        &["--send", "x"],
    )
    .expect_err("outbound while ztunnel is down");
    assert!(err.to_string().contains("refused"), "{err}");
    let err = probe::tcp(
        &lab.state,
        &details,
        &format!("{}:7", productpage.ip),
        &["--send", "x"],
    )
    .expect_err("inbound while ztunnel is down");
    // details is enrolled too: its own ztunnel accepts, productpage's
    // sk_lookup refuses that ztunnel's SYN, and the client is reset.
    let message = err.to_string();
    assert!(
        message.contains("refused") || message.contains("reset"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals are immediate"
    );

    // ztunnel back: capture resumes with the pinned programs and maps.
    lab.state
        .start_ztunnel(productpage.node)
        .expect("start ztunnel");
    wait_for_log(
        &lab.state,
        productpage.node,
        "ztunnel running",
        Duration::from_secs(2),
    );
    let echoed = retry(|| {
        probe::tcp(
            &lab.state,
            &productpage,
            &format!("{}:7", details.ip),
            &["--send", "back"],
        )
    });
    assert_eq!(echoed.trim_end(), "back");

    // Unlabel: released everywhere, traffic direct again.
    let log_count = |pod: &PodPlan, needle: &str| {
        std::fs::read_to_string(lab.state.ztunnel_log(pod.node))
            .unwrap_or_default()
            .matches(needle)
            .count()
    };
    let releases: Vec<(PodPlan, String, usize)> = lab
        .state
        .plan
        .pods
        .iter()
        .map(|pod| {
            let marker = format!("released from the mesh pod={}", pod.qualified_name());
            let seen = log_count(pod, &marker);
            (pod.clone(), marker, seen)
        })
        .collect();
    lab.state
        .set_label(
            &LabelTarget::Namespace("default".into()),
            DATAPLANE_MODE_LABEL,
            None,
        )
        .expect("unlabel");
    for (pod, marker, seen) in &releases {
        wait_for_log_n(
            &lab.state,
            pod.node,
            marker,
            seen + 1,
            Duration::from_secs(1),
        );
    }
    // Records of connections closed earlier are flushed by now.
    std::thread::sleep(Duration::from_millis(300));
    let counts: Vec<usize> = (0..2)
        .map(|n| access_records(&lab.state, n).len())
        .collect();
    probe::http_get(
        &lab.state,
        &productpage,
        "http://productpage:9080/productpage",
        &[],
    )
    .expect("direct again");
    std::thread::sleep(Duration::from_millis(300));
    let now: Vec<usize> = (0..2)
        .map(|n| access_records(&lab.state, n).len())
        .collect();
    assert_eq!(counts, now, "released pods no longer go through ztunnel");
}

/// Retries `f` for up to a second (ztunnel reopening its in-pod listeners).
fn retry<T>(f: impl Fn() -> mesh_lab::Result<T>) -> T {
    let started = Instant::now();
    loop {
        match f() {
            Ok(value) => return value,
            Err(err) if started.elapsed() > Duration::from_secs(1) => panic!("{err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Asserts that neither iptables nor nftables holds a rule in the host's or
/// any lab namespace (the tools are installed by CI only to check this).
fn assert_no_packet_filter_rules(state: &LabState) {
    let namespaces = state
        .plan
        .nodes
        .iter()
        .map(|n| Some(n.netns.clone()))
        .chain(state.plan.pods.iter().map(|p| Some(p.netns.clone())))
        .chain([None]);
    for netns in namespaces {
        for (tool, args) in [
            ("iptables-save", &[][..]),
            ("nft", &["list", "ruleset"][..]),
        ] {
            let mut command = match &netns {
                Some(ns) => {
                    let mut c = std::process::Command::new("ip");
                    c.args(["netns", "exec", ns, tool]);
                    c
                }
                None => std::process::Command::new(tool),
            };
            let output = command
                .args(args)
                .output()
                .unwrap_or_else(|err| panic!("{tool}: {err} (install iptables and nftables)"));
            assert!(
                output.status.success(),
                "{tool} in {netns:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8_lossy(&output.stdout);
            let rules: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("-A ") || l.trim_start().starts_with("chain "))
                .collect();
            assert!(rules.is_empty(), "{tool} in {netns:?} has rules: {rules:?}");
        }
    }
}

/// The value of `ztunnel_ebpf_connections_total{program, outcome}` in a scrape.
fn counter(metrics: &str, program: &str, outcome: &str) -> u64 {
    let prefix =
        format!("ztunnel_ebpf_connections_total{{program=\"{program}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
}

#[test]
fn deleted_pod_is_released_and_the_rest_keeps_working() {
    let mut lab = Lab::bookinfo("tgone");
    enrol_default_namespace(&mut lab);
    let gone = pod(&lab.state, "reviews-v1").clone();
    let productpage = pod(&lab.state, "productpage").clone();
    let [a, b, c, d] = gone.ip.octets();
    let link_pin = lab
        .state
        .node_pin_dir(gone.node)
        .join("sk_lookup")
        .join(format!("{a}_{b}_{c}_{d}"));
    assert!(link_pin.exists(), "sk_lookup is attached to the pod");

    // The pod vanishes (namespace, cgroup and all) under ztunnel's feet.
    lab.state.delete_pod(&gone.name).expect("delete pod");
    wait_for_log(
        &lab.state,
        gone.node,
        &format!("released from the mesh pod={}", gone.qualified_name()),
        Duration::from_secs(1),
    );
    assert!(!link_pin.exists(), "its sk_lookup link is gone");
    let log = std::fs::read_to_string(lab.state.ztunnel_log(gone.node)).expect("ztunnel log");
    assert!(
        !log.contains("failed"),
        "ztunnel reported a failure:\n{log}"
    );

    // The control plane withdraws it from every ztunnel within a second.
    let gone_name = gone.name.clone();
    lab.state
        .wait_for_ztunnels(Duration::from_secs(2), |_, dump| {
            !dump["workloads"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["name"] == gone_name.as_str()))
        })
        .expect("deleted pod withdrawn from ztunnels");

    // The remaining reviews pods answer through the mesh, as before.
    let answers = probe::http_get(
        &lab.state,
        &productpage,
        "http://reviews:9080/",
        &["--count", "20", "--new-connection"],
    )
    .expect("reviews after the deletion");
    assert!(answers.iter().all(|a| a.field("pod") != gone.name));
    let reviews_vip = lab
        .state
        .plan
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .expect("reviews")
        .vip;
    wait_for_records(
        &lab.state,
        productpage.node,
        &[
            r#"direction="outbound""#,
            &format!("dst={reviews_vip}:9080"),
        ],
        20,
    );

    // A malformed pods file is reported and the last good set stays in force.
    std::fs::write(lab.state.node_pods_file(productpage.node), "{ not json")
        .expect("corrupt pods file");
    wait_for_log(
        &lab.state,
        productpage.node,
        "node pods file is malformed; keeping the last good set",
        Duration::from_secs(1),
    );
    let outbound = r#"direction="outbound""#;
    let before = access_records(&lab.state, productpage.node)
        .iter()
        .filter(|r| r.contains(outbound))
        .count();
    probe::http_get(&lab.state, &productpage, "http://reviews:9080/", &[])
        .expect("still through the mesh");
    wait_for_records(&lab.state, productpage.node, &[outbound], before + 1);
}

#[test]
fn pod_deleted_mid_connection_fails_that_connection_only() {
    let mut lab = Lab::bookinfo("tmid");
    enrol_default_namespace(&mut lab);
    let details = pod(&lab.state, "details").clone();
    let ratings = pod(&lab.state, "ratings").clone();
    let productpage = pod(&lab.state, "productpage").clone();
    assert_ne!(details.node, productpage.node, "the transfer crosses nodes");

    // A long transfer through both ztunnels to details' echo port.
    let mut transfer = lab
        .state
        .app_client(
            &productpage,
            &[
                "tcp",
                &format!("{}:7", details.ip),
                "--bytes",
                "17179869184",
                "--timeout-ms",
                "60000",
            ],
        )
        .expect("client command")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start transfer");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        transfer.try_wait().expect("poll").is_none(),
        "transfer still running"
    );

    // details vanishes under it: the transfer fails promptly, as a reset,
    // not a hang and not a clean end.
    let deleted = Instant::now();
    lab.state.delete_pod(&details.name).expect("delete pod");
    let status = loop {
        if let Some(status) = transfer.try_wait().expect("poll") {
            break status;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "the transfer did not notice the deletion within 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a cut transfer must not look successful");

    // Both ztunnels are still up, recorded the cut connection, and carry
    // other traffic as before.
    for node in 0..lab.state.plan.nodes.len() {
        let pid = lab.state.ztunnel_pids[&lab.state.plan.nodes[node].name];
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "ztunnel on node{node} died"
        );
    }
    wait_for_records(
        &lab.state,
        productpage.node,
        &[r#"direction="outbound""#, &format!("dst={}:7", details.ip)],
        1,
    );
    probe::http_get(
        &lab.state,
        &productpage,
        &format!("http://{}:9080/", ratings.ip),
        &[],
    )
    .expect("other traffic unaffected");
}

#[test]
fn full_enrolment_map_leaves_the_pod_as_it_was_and_capture_goes_on() {
    use aya::maps::{HashMap, Map, MapData};
    use mesh_ebpf_common::{CAPTURE_ENROLLED_MAP, EnrolledPod};

    let mut lab = Lab::bookinfo("tfull");
    let details = pod(&lab.state, "details").clone();
    let productpage = pod(&lab.state, "productpage").clone();
    let node = details.node;
    assert_ne!(productpage.node, node, "productpage's node stays healthy");

    // Fill node `node`'s enrolment map with cgroups that do not exist. They
    // carry details' IP so ztunnel's sweep of departed pods keeps them.
    let pin = lab.state.node_pin_dir(node).join(CAPTURE_ENROLLED_MAP);
    let data = MapData::from_pin(&pin).expect("open the pinned enrolment map");
    let mut enrolled: HashMap<MapData, u64, EnrolledPod> =
        HashMap::try_from(Map::HashMap(data)).expect("a hash map");
    let filler = EnrolledPod {
        pod_ip: u32::from_ne_bytes(details.ip.octets()),
        flags: 0,
    };
    let mut fillers = Vec::new();
    for id in (0..u64::from(u16::MAX)).map(|i| u64::MAX - i) {
        if enrolled.insert(&id, &filler, 0).is_err() {
            break;
        }
        fillers.push(id);
    }
    assert!(fillers.len() >= 16_000, "filled {} entries", fillers.len());

    lab.state
        .set_label(
            &LabelTarget::Namespace("default".into()),
            DATAPLANE_MODE_LABEL,
            Some("ambient"),
        )
        .expect("label namespace");
    // The failing pod: one clear error naming the map, logged once although
    // ztunnel retries every second.
    let failure = format!(
        "enrolling pod failed; will retry every second pod={}",
        details.qualified_name()
    );
    wait_for_log(&lab.state, node, &failure, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(2500));
    let log = std::fs::read_to_string(lab.state.ztunnel_log(node)).expect("ztunnel log");
    let failures: Vec<&str> = log.lines().filter(|l| l.contains(&failure)).collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(
        failures[0].contains(CAPTURE_ENROLLED_MAP),
        "{}",
        failures[0]
    );
    // Not half enrolled: no sk_lookup left refusing its inbound connections.
    let [a, b, c, d] = details.ip.octets();
    let link = lab
        .state
        .node_pin_dir(node)
        .join("sk_lookup")
        .join(format!("{a}_{b}_{c}_{d}"));
    assert!(!link.exists(), "{} left attached", link.display());

    // The other node's pods are enrolled and captured all the same.
    wait_for_log(
        &lab.state,
        productpage.node,
        &enrolled_marker(&productpage),
        Duration::from_secs(1),
    );
    let neighbour = lab
        .state
        .plan
        .pods
        .iter()
        .find(|p| p.node == productpage.node && p.name != productpage.name)
        .expect("a second pod on productpage's node")
        .clone();
    probe::tcp(
        &lab.state,
        &productpage,
        &format!("{}:7", neighbour.ip),
        &["--send", "still-captured"],
    )
    .expect("healthy pods talk through the mesh");
    wait_for_records(
        &lab.state,
        productpage.node,
        &[
            r#"direction="outbound""#,
            &format!("dst={}:7", neighbour.ip),
        ],
        1,
    );

    // Room again: the next retry enrols the pod, and calls to it go through
    // both ztunnels.
    for id in &fillers {
        enrolled.remove(id).expect("remove filler");
    }
    wait_for_log(
        &lab.state,
        node,
        &enrolled_marker(&details),
        Duration::from_secs(3),
    );
    let answer = probe::http_get(
        &lab.state,
        &productpage,
        &format!("http://{}:9080/after-full", details.ip),
        &[],
    )
    .expect("call to the pod enrolled late");
    assert_eq!(answer[0].field("pod"), details.name);
    wait_for_records(
        &lab.state,
        node,
        &[
            r#"direction="inbound""#,
            &format!("dst={}:9080", details.ip),
        ],
        1,
    );
}
