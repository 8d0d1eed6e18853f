//! The L4 tunnel on the wire: between nodes, enrolled pods' traffic is TLS
//! to port 15008 and nothing of the application's bytes is visible; the
//! same request from unenrolled pods is plaintext (which proves the capture
//! would have seen it).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_config::node::DATAPLANE_MODE_LABEL;
use mesh_lab::{LabState, mesh::LabelTarget, probe};
use mesh_tests::{Lab, eventually};

/// A packet capture on an interface of a node, written to a file.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    /// Captures node `node`'s inter-node link.
    fn start(state: &LabState, node: usize, name: &str) -> Self {
        Self::start_on(state, node, "eth1", name)
    }

    /// Captures interface `interface` of node `node`'s namespace.
    fn start_on(state: &LabState, node: usize, interface: &str, name: &str) -> Self {
        let file = std::env::temp_dir().join(format!("{}-{name}.pcap", state.plan.name));
        let _ = std::fs::remove_file(&file);
        let child = Command::new("ip")
            .args(["netns", "exec", &state.plan.nodes[node].netns])
            .args([
                "tcpdump",
                "--immediate-mode",
                "-i",
                interface,
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (install it: apt-get install tcpdump)");
        // tcpdump writes the file header once the capture is armed.
        let wait_until = std::time::Instant::now() + Duration::from_secs(5);
        while !file.exists() && std::time::Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        Self { child, file }
    }

    /// Stops the capture; returns the raw pcap bytes and the packets to or
    /// from `port`.
    fn stop(mut self, port: u16) -> (Vec<u8>, usize) {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).expect("pcap file");
        let listing = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .arg(format!("tcp port {port}"))
            .output()
            .expect("tcpdump -r");
        let packets = String::from_utf8_lossy(&listing.stdout).lines().count();
        let _ = std::fs::remove_file(&self.file);
        (bytes, packets)
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn only_tls_crosses_the_node_link_for_enrolled_pods() {
    let mut lab = Lab::bookinfo("tenc");
    let productpage = lab.state.pod("productpage").expect("productpage").clone();
    let details = lab.state.pod("details").expect("details").clone();
    assert_ne!(productpage.node, details.node, "the call crosses nodes");
    let url = |marker: &str| format!("http://{}:9080/{marker}", details.ip);

    // Unenrolled: the request line is on the wire in clear.
    let capture = Capture::start(&lab.state, details.node, "plain");
    probe::http_get(&lab.state, &productpage, &url("plaintext-marker-8c1f"), &[])
        .expect("direct call");
    let (bytes, _) = capture.stop(15008);
    assert!(
        contains(&bytes, "plaintext-marker-8c1f"),
        "the capture sees unencrypted traffic (control): {} bytes captured",
        bytes.len()
    );

    // Enrolled: the same call crosses the link as TLS to 15008 only.
    lab.state
        .set_label(
            &LabelTarget::Namespace("default".into()),
            DATAPLANE_MODE_LABEL,
            Some("ambient"),
        )
        .expect("label");
    let state = &lab.state;
    state
        .wait_for_ztunnels(Duration::from_secs(3), |_, dump| {
            dump["workloads"]
                .as_array()
                .is_some_and(|w| w.iter().all(|w| w["hbone"] == true))
                && dump["certificates"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "valid"))
        })
        .expect("enrolled and certified");
    std::thread::sleep(Duration::from_millis(300));
    let capture = Capture::start(state, details.node, "mesh");
    let answer = probe::http_get(state, &productpage, &url("secret-marker-77d2"), &[])
        .expect("call through the mesh");
    assert_eq!(answer[0].field("pod"), details.name);
    let (bytes, hbone_packets) = capture.stop(15008);
    assert!(
        !contains(&bytes, "secret-marker-77d2"),
        "application bytes crossed the node link in clear"
    );
    assert!(hbone_packets > 0, "no HBONE (15008) traffic on the link");
    assert!(
        !contains(&bytes, "\"pod\":"),
        "the app's response crossed the node link in clear"
    );
}

/// `ztunnel_fast_path_spliced_bytes_total` of node `node`'s ztunnel.
fn spliced_bytes(state: &LabState, node: usize) -> u64 {
    let metrics = state.ztunnel_metrics(node).expect("scrape ztunnel");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ztunnel_fast_path_spliced_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fast-path bytes in:\n{metrics}"))
}

#[test]
fn same_node_hbone_bytes_skip_the_tcp_stack() {
    let mut lab = Lab::bookinfo("tfast");
    lab.enrol_namespace("default");
    let state = &lab.state;
    // Two pods of one node, and one of the other node.
    let (client, server) = state
        .plan
        .pods
        .iter()
        .flat_map(|a| state.plan.pods.iter().map(move |b| (a, b)))
        .find(|(a, b)| a.name != b.name && a.node == b.node)
        .map(|(a, b)| (a.clone(), b.clone()))
        .expect("two pods on one node");
    let remote = state
        .plan
        .pods
        .iter()
        .find(|p| p.node != client.node)
        .expect("a pod on the other node")
        .clone();
    const BULK: u64 = 4 << 20;

    // Same node: 4 MiB each way, echoed exactly, and the HBONE bytes never
    // cross the server pod's veth: the kernel put them straight into the
    // peer socket's receive queue.
    let before = spliced_bytes(state, client.node);
    let capture = Capture::start_on(state, server.node, &server.veth, "fast");
    let bulk = probe::tcp(
        state,
        &client,
        &format!("{}:7", server.ip),
        &["--bytes", &BULK.to_string()],
    )
    .expect("same-node bulk via mesh");
    assert_eq!(bulk.trim(), format!("ok {BULK}"));
    let (pcap, hbone_packets) = capture.stop(15008);
    let spliced = spliced_bytes(state, client.node) - before;
    assert!(
        spliced >= 2 * BULK,
        "only {spliced} bytes spliced for {BULK} bytes each way"
    );
    assert!(
        pcap.len() < 256 * 1024,
        "{} bytes of packets ({hbone_packets} to or from 15008) crossed {}'s veth",
        pcap.len(),
        server.name
    );
    // ztunnel still accounts for every byte of the connection.
    eventually("the access record", Duration::from_secs(3), || {
        let log = std::fs::read_to_string(state.ztunnel_log(client.node)).unwrap_or_default();
        log.lines()
            .any(|l| {
                l.contains(r#"direction="outbound""#)
                    && l.contains(&format!("dst={}:7", server.ip))
                    && l.contains(&format!("bytes_sent={BULK} bytes_received={BULK}"))
            })
            .then_some(())
            .ok_or_else(|| "no outbound record with both byte counts".to_owned())
    });

    // Across nodes there is no peer socket to splice into: nothing is.
    let before = spliced_bytes(state, client.node);
    let bulk = probe::tcp(
        state,
        &client,
        &format!("{}:7", remote.ip),
        &["--bytes", "1048576"],
    )
    .expect("cross-node bulk via mesh");
    assert_eq!(bulk.trim(), "ok 1048576");
    assert_eq!(spliced_bytes(state, client.node), before);
}
