//! Gateway API ingress: a `Gateway` of class `istio` and the HTTPRoutes
//! attached to it (bookinfo's Gateway API sample) let clients outside the
//! mesh reach productpage through the `bookinfo-gateway-istio` Deployment
//! and Service the lab creates for it, as Istio does; a second listener
//! with a wildcard hostname serves only the route hosts under it, the
//! routes' filters apply, and a route's backend in another namespace is
//! served only while a ReferenceGrant there permits it, and a TCPRoute on
//! a TCP listener relays bytes to its backend.

use std::time::Duration;

use mesh_tests::{Lab, bookinfo_manifest};

/// How long config may take to show in traffic.
const SETTLE: Duration = Duration::from_secs(10);

/// The gateway's Service, as Istio names it.
const GATEWAY: &str = "bookinfo-gateway-istio.default";

#[test]
fn gateway_api_ingress_routes_outside_traffic_by_path_and_host() {
    let manifests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let manifest = manifests.join("bookinfo-gateway-api.yaml");
    let mut lab = Lab::up("tga", vec![bookinfo_manifest(), manifest], 2);
    lab.enrol_namespace("default");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("gateway ready");
    let gateway = lab
        .state
        .pod("bookinfo-gateway-istio")
        .expect("the lab deploys the Gateway's proxy")
        .clone();
    assert_eq!(
        gateway.waypoint(),
        Some("bookinfo-gateway"),
        "labelled with its Gateway's name"
    );
    // A client outside the mesh: a pod that opted out.
    let outside = lab.opt_out("details");

    // The sample's paths reach productpage over HBONE (its identity
    // checked by the gateway's ztunnel-side client).
    let url = format!("http://{GATEWAY}/productpage");
    mesh_tests::eventually(
        "productpage through the Gateway API gateway",
        SETTLE,
        || {
            let (ok, body, text) = lab.get(&outside, &url, &[]);
            if !(ok && body["app"] == "productpage") {
                return Err(text);
            }
            let metrics = lab
                .state
                .waypoint_metrics(&gateway)
                .map_err(|e| e.to_string())?;
            metrics
            .lines()
            .any(|l| {
                l.starts_with("istio_requests_total")
                    && l.contains("response_code=\"200\"")
                    && l.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"")
            })
            .then_some(())
            .ok_or(metrics)
        },
    );
    let (ok, body, text) = lab.get(&outside, &format!("http://{GATEWAY}/static/app.css"), &[]);
    assert!(
        ok && body["app"] == "productpage",
        "PathPrefix /static: {text}"
    );
    // `PathPrefix` matches whole segments; unrouted paths are 404.
    for path in ["/staticfiles", "/admin", "/productpage/extra"] {
        let (ok, _, text) = lab.get(&outside, &format!("http://{GATEWAY}{path}"), &[]);
        assert!(!ok && text.contains("404"), "{path}: {text}");
    }
    // The route without a sectionName attached to both listeners, but only
    // its host under `*.example.com` is served on that listener; on the
    // `http` listener (no hostname) both of its hosts are.
    let connect = format!("{GATEWAY}:8080");
    let (ok, body, text) = lab.get(
        &outside,
        "http://reviews.example.com:8080/reviews/0",
        &["--connect-to", &connect, "--show-headers"],
    );
    assert!(
        ok && body["app"] == "reviews",
        "reviews.example.com: {text}"
    );
    assert!(text.contains("x-routed-by: reviews-by-host"), "{text}");
    for host in ["reviews.other.org", "productpage.example.com"] {
        let (ok, _, text) = lab.get(
            &outside,
            &format!("http://{host}:8080/reviews/0"),
            &["--connect-to", &connect],
        );
        assert!(!ok && text.contains("404"), "{host} on 8080: {text}");
    }
    let (ok, body, text) = lab.get(
        &outside,
        "http://reviews.other.org/reviews/0",
        &["--connect-to", &format!("{GATEWAY}:80")],
    );
    assert!(
        ok && body["app"] == "reviews",
        "reviews.other.org on 80: {text}"
    );

    // The route from namespace `team` to reviews in `default` is refused
    // (its requests answered 500) until a ReferenceGrant in `default`
    // permits it, and refused again once the grant is deleted.
    let shared = format!("http://{GATEWAY}:8081/reviews/0");
    let answers = |granted: bool| {
        let (ok, body, text) = lab.get(&outside, &shared, &[]);
        let expected = if granted {
            ok && body["app"] == "reviews"
        } else {
            !ok && text.contains("500")
        };
        expected.then_some(()).ok_or(text)
    };
    mesh_tests::eventually("500 without a ReferenceGrant", SETTLE, || answers(false));
    mesh_lab::cluster::apply(
        &lab.state.plan.name,
        &manifests.join("reference-grant.yaml"),
    )
    .expect("apply the grant");
    mesh_tests::eventually("reviews once granted", SETTLE, || answers(true));
    mesh_lab::cluster::unapply(&lab.state.plan.name, "reference-grant.yaml")
        .expect("delete the grant");
    mesh_tests::eventually("500 once the grant is deleted", SETTLE, || answers(false));

    // The TCPRoute on the TCP listener: the bytes reach productpage as they
    // are (an HTTP/1.0 request, answered and closed by productpage; sent
    // without shutting down the write side, which productpage's HTTP server
    // would take for the client going away).
    let request = "GET /productpage HTTP/1.0\r\nHost: bookinfo\r\n\r\n";
    let answer = mesh_lab::probe::tcp(
        &lab.state,
        &outside,
        &format!("{GATEWAY}:9000"),
        &["--send", request, "--trickle-ms", "1"],
    )
    .expect("a TCP exchange through the gateway");
    assert!(
        answer.contains("HTTP/1.0 200") && answer.contains("\"app\":\"productpage\""),
        "TCPRoute: {answer}"
    );
}
