//! The control plane in the lab: it is the ztunnels' only source of workloads
//! and services, changes reach every ztunnel within a second, and its status
//! endpoint shows what each one acknowledged.

use std::time::Duration;

use mesh_config::node::DATAPLANE_MODE_LABEL;
use mesh_lab::mesh::LabelTarget;
use mesh_tests::Lab;
use serde_json::Value;

fn workloads(dump: &Value) -> Vec<&Value> {
    dump["workloads"]
        .as_array()
        .map(|w| w.iter().collect())
        .unwrap_or_default()
}

#[test]
fn control_plane_feeds_every_ztunnel_and_reports_their_acks() {
    let mut lab = Lab::bookinfo("tc");
    let state = &lab.state;
    let pods = state.plan.pods.len();
    let services = state.plan.services.len();

    // Every ztunnel learns every pod (IP, node, identity) and every Service VIP.
    state
        .wait_for_ztunnels(Duration::from_secs(5), |_, dump| {
            workloads(dump).len() == pods
                && dump["services"].as_array().map_or(0, Vec::len) == services
        })
        .expect("ztunnels synced");
    let dump = state.ztunnel_config_dump(1).expect("config_dump");
    for pod in &state.plan.pods {
        let workload = workloads(&dump)
            .into_iter()
            .find(|w| w["name"] == pod.name.as_str())
            .unwrap_or_else(|| panic!("{} missing from {dump:#}", pod.name));
        assert_eq!(workload["ips"][0], pod.ip.to_string());
        assert_eq!(workload["node"], state.plan.nodes[pod.node].name.as_str());
        assert_eq!(workload["service_account"], pod.service_account.as_str());
        assert_eq!(workload["hbone"], false, "default is not labelled yet");
    }
    let reviews = dump["services"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["hostname"] == "reviews.default.svc.cluster.local")
        })
        .expect("reviews service");
    let vip = state
        .plan
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .expect("reviews")
        .vip;
    assert_eq!(reviews["vips"][0], vip.to_string());

    // Labelling the namespace puts its workloads on HBONE everywhere, within 1 s.
    lab.state
        .set_label(
            &LabelTarget::Namespace("default".into()),
            DATAPLANE_MODE_LABEL,
            Some("ambient"),
        )
        .expect("label");
    let state = &lab.state;
    state
        .wait_for_ztunnels(Duration::from_secs(1), |_, dump| {
            workloads(dump).iter().all(|w| w["hbone"] == true)
        })
        .expect("enrolment pushed within 1 s");

    // Each ztunnel obtained a certificate from the CA for every identity
    // running on its node, and only those.
    for node in 0..state.plan.nodes.len() {
        let mut expected: Vec<String> = state
            .plan
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| {
                format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    p.namespace, p.service_account
                )
            })
            .collect();
        expected.sort();
        expected.dedup();
        state
            .wait_for_ztunnels(Duration::from_secs(3), |n, dump| {
                n != node || {
                    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
                    let valid: Vec<&str> = certs
                        .iter()
                        .filter(|c| c["state"] == "valid")
                        .filter_map(|c| c["identity"].as_str())
                        .collect();
                    valid == expected
                }
            })
            .unwrap_or_else(|err| {
                panic!(
                    "node{node} certificates: {err}: {:#}",
                    state.ztunnel_config_dump(node).unwrap()["certificates"]
                )
            });
    }

    // The status endpoint lists both ztunnels, each having ACKed a version.
    let syncz = state
        .command_on_node(0, &state.app_binary)
        .expect("command")
        .args([
            "get",
            &format!("http://{}/debug/syncz", state.control_status_addr()),
        ])
        .output()
        .expect("lab-app get");
    assert!(
        syncz.status.success(),
        "{}",
        String::from_utf8_lossy(&syncz.stderr)
    );
    let syncz: Value = serde_json::from_slice(&syncz.stdout).expect("syncz JSON");
    let mut proxies: Vec<&str> = syncz
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            let acked = &p["types"]["type.googleapis.com/istio.workload.Address"]["acked_version"];
            assert!(acked.as_u64().is_some_and(|v| v >= 1), "{p:#}");
            p["proxy"].as_str().unwrap_or_default()
        })
        .collect();
    proxies.sort();
    assert_eq!(proxies, ["ztunnel~node0", "ztunnel~node1"]);

    // meshctl shows the same, as a table an operator reads.
    let table = state
        .command_on_node(0, mesh_tests::workspace_binary("meshctl"))
        .expect("command")
        .env(
            "MESH_CONTROL_STATUS",
            format!("http://{}", state.control_status_addr()),
        )
        .arg("proxy-status")
        .output()
        .expect("meshctl");
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8_lossy(&table.stdout);
    for node in ["node0", "node1"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("ztunnel~{node}")))
            .unwrap_or_else(|| panic!("no row for {node} in\n{table}"));
        assert!(row.contains("SYNCED"), "{table}");
    }
}
