//! The ingress gateway: bookinfo's `bookinfo-gateway` sample (an Istio
//! `Gateway` selecting `istio: ingressgateway` and the VirtualService bound
//! to it) lets clients outside the mesh reach productpage through the
//! gateway the lab deploys, as Istio's install does.

use std::time::{Duration, Instant};

use mesh_lab::PodPlan;
use mesh_tests::{Lab, bookinfo_manifest};
use serde_json::Value;

const GATEWAY_URL: &str = "http://istio-ingressgateway.istio-system";

/// One GET from `from`: the status line's code and the JSON body (if any).
fn get(lab: &Lab, from: &PodPlan, url: &str, headers: &[&str]) -> (bool, Value, String) {
    let mut args = vec!["get", url, "--timeout-ms", "5000"];
    for h in headers {
        args.extend(["--header", h]);
    }
    let output = lab
        .state
        .app_client(from, &args)
        .expect("client")
        .output()
        .expect("lab-app get");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (
        output.status.success(),
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
    )
}

fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return,
            Err(err) if Instant::now() > deadline => panic!("{what}: {err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn bookinfo_gateway_routes_outside_traffic_to_productpage() {
    let gateway_sample =
        mesh_lab::istio_samples_dir().join("bookinfo/networking/bookinfo-gateway.yaml");
    let mut lab = Lab::up("tig", vec![bookinfo_manifest(), gateway_sample], 2);
    lab.enrol_namespace("default");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("ingress gateway ready");
    let gateway = lab
        .state
        .pod("istio-ingressgateway")
        .expect("the lab deploys Istio's ingress gateway")
        .clone();
    assert_eq!(gateway.namespace, "istio-system");
    // A client outside the mesh: a pod that opted out.
    lab.state
        .set_label(
            &mesh_lab::mesh::LabelTarget::Pod("details".into()),
            mesh_config::node::DATAPLANE_MODE_LABEL,
            Some("none"),
        )
        .expect("opt details out");
    let outside = lab.state.pod("details").expect("details").clone();

    // The routed paths reach productpage (which calls details and reviews).
    let url = format!("{GATEWAY_URL}/productpage");
    eventually("productpage through the gateway", || {
        let (ok, body, text) = get(&lab, &outside, &url, &[]);
        (ok && body["app"] == "productpage")
            .then_some(())
            .ok_or(text)
    });
    let (ok, body, text) = get(
        &lab,
        &outside,
        &format!("{GATEWAY_URL}/api/v1/products"),
        &[],
    );
    assert!(ok && body["app"] == "productpage", "{text}");

    // Paths the VirtualService does not route are 404 at the gateway.
    let (ok, _, text) = get(&lab, &outside, &format!("{GATEWAY_URL}/admin"), &[]);
    assert!(!ok && text.contains("404"), "{text}");

    let metrics = lab
        .state
        .waypoint_metrics(&gateway)
        .expect("gateway metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("reporter=\"source\"")
            && l.contains("response_code=\"200\"")
            && l.contains("destination_service=\"productpage.default.svc.cluster.local\"")
            // Over HBONE to the enrolled pod, its identity checked.
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"")),
        "no 200 to productpage over HBONE in\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"404\"")
                && l.contains("response_flags=\"NR\"")),
        "no 404 NR in\n{metrics}"
    );
}
