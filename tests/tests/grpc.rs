//! gRPC end to end through the waypoint: a tonic client and server
//! (`lab-app grpc`, lab-app's gRPC test service) make unary,
//! server-streaming, client-streaming and bidirectional calls through a
//! VirtualService; statuses, messages, custom trailers and every streamed
//! message arrive, the waypoint's own answers (injected faults) are gRPC
//! statuses, and `istio_requests_total` counts the calls as gRPC; a
//! Gateway API GRPCRoute routes them by service, method and metadata.

use std::{path::PathBuf, time::Duration};

use mesh_lab::PodPlan;
use mesh_tests::Lab;
use serde_json::Value;

fn manifest(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(name)
}

const SERVER: &str = "http://echo-grpc:9090";

/// `lab-app grpc SERVER --call <call> <extra>` from `from`: its JSON report.
fn call(lab: &Lab, from: &PodPlan, call: &str, extra: &[&str]) -> Value {
    let mut args = vec!["grpc", SERVER, "--call", call];
    args.extend(extra);
    let output = lab
        .state
        .app_client(from, &args)
        .expect("client command")
        .output()
        .expect("lab-app grpc");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        Value::String(format!(
            "no report: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    })
}

#[test]
fn grpc_calls_through_the_waypoint() {
    let mut lab = Lab::up(
        "tgrpc",
        vec![manifest("grpc.yaml"), manifest("waypoint.yaml")],
        2,
    );
    lab.enrol_namespace("default");
    lab.use_waypoint("default", "waypoint");
    mesh_lab::cluster::apply(&lab.state.plan.name, &manifest("grpc-route.yaml")).expect("apply");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("waypoint ready");
    let client = lab.state.pod("grpc-client").expect("client").clone();
    let waypoint = lab.state.pod("waypoint").expect("waypoint pod").clone();

    // Unary, OK, through the VirtualService (its response header shows).
    mesh_tests::eventually(
        "routed by the VirtualService",
        Duration::from_secs(30),
        || {
            let answer = call(&lab, &client, "unary", &["--text", "hi"]);
            (answer["code"] == 0
                && answer["text"] == "hi"
                && answer["metadata"]["x-routed-by"] == "echo-grpc-vs")
                .then_some(())
                .ok_or(format!("{answer}"))
        },
    );

    // Unary, failed: status, message and the custom trailer arrive.
    let failed = call(
        &lab,
        &client,
        "unary",
        &["--code", "5", "--text", "no such thing"],
    );
    assert_eq!(failed["code"], 5, "{failed}");
    assert_eq!(failed["message"], "no such thing", "{failed}");
    assert!(
        failed["metadata"]["x-lab-detail"]
            .as_str()
            .is_some_and(|pod| pod.starts_with("echo-grpc")),
        "the custom trailer: {failed}"
    );

    // The waypoint's own answers are gRPC statuses, as Envoy's are: an
    // injected gRPC abort carries its code, an injected HTTP 503 becomes
    // UNAVAILABLE, both with Envoy's message, and the app never sees them.
    let aborted = call(&lab, &client, "unary", &["--header", "x-fault=abort"]);
    assert_eq!(
        (&aborted["code"], &aborted["message"]),
        (&Value::from(8), &Value::from("fault filter abort")),
        "{aborted}"
    );
    let unavailable = call(&lab, &client, "unary", &["--header", "x-fault=http"]);
    assert_eq!(
        (&unavailable["code"], &unavailable["message"]),
        (&Value::from(14), &Value::from("fault filter abort")),
        "{unavailable}"
    );

    // Server streaming: 10 000 notes in order, then OK.
    let streamed = call(&lab, &client, "count", &["--count", "10000"]);
    assert_eq!(
        (
            &streamed["received"],
            &streamed["in_order"],
            &streamed["status"]["code"]
        ),
        (&Value::from(10000), &Value::from(true), &Value::from(0)),
        "{streamed}"
    );
    // A stream that ends with a status after its messages: the trailers
    // (status, message, custom metadata) follow the data.
    let ended = call(
        &lab,
        &client,
        "count",
        &["--count", "50", "--code", "9", "--text", "stopped"],
    );
    assert_eq!(ended["received"], 50, "{ended}");
    assert_eq!(ended["status"]["code"], 9, "{ended}");
    assert_eq!(ended["status"]["message"], "stopped", "{ended}");
    assert_eq!(ended["status"]["metadata"]["x-lab-sent"], "50", "{ended}");

    // Client streaming: 500 notes, counted and joined by the server.
    let collected = call(&lab, &client, "collect", &["--count", "500"]);
    assert_eq!(collected["count"], 500, "{collected}");
    let joined = collected["joined"].as_str().unwrap_or_default();
    assert!(
        joined.starts_with("n0,n1,") && joined.ends_with(",n499"),
        "{collected}"
    );

    // Bidirectional: each note answered before the next is sent.
    let chat = call(&lab, &client, "chat", &["--count", "100"]);
    assert_eq!(
        (&chat["replies"], &chat["in_order"], &chat["status"]["code"]),
        (&Value::from(100), &Value::from(true), &Value::from(0)),
        "{chat}"
    );

    let metrics = lab
        .state
        .waypoint_metrics(&waypoint)
        .expect("waypoint metrics");
    let grpc_calls: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("destination_service=\"echo-grpc.default.svc.cluster.local\"")
        })
        .collect();
    for status in ["0", "5", "8", "9", "14"] {
        let label = format!("grpc_response_status=\"{status}\"");
        assert!(
            grpc_calls
                .iter()
                .any(|l| l.contains(&label) && l.contains("response_code=\"200\"")),
            "no gRPC call with {label} in\n{}",
            grpc_calls.join("\n")
        );
    }
}

/// A Gateway API GRPCRoute attached to the Service routes calls by service,
/// method and metadata through the waypoint: the exact method with its
/// header first, then the whole service with a header, then the service.
#[test]
fn grpc_route_through_the_waypoint() {
    let mut lab = Lab::up(
        "tgrr",
        vec![
            manifest("grpc.yaml"),
            manifest("waypoint.yaml"),
            manifest("grpcroute.yaml"),
        ],
        2,
    );
    lab.enrol_namespace("default");
    lab.use_waypoint("default", "waypoint");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("waypoint ready");
    let client = lab.state.pod("grpc-client").expect("client").clone();
    let routed_by = |extra: &[&str]| {
        let mut args = vec!["--text", "hi"];
        args.extend(extra);
        let answer = call(&lab, &client, "unary", &args);
        (answer["code"] == 0 && answer["text"] == "hi")
            .then(|| {
                answer["metadata"]["x-routed-by"]
                    .as_str()
                    .map(str::to_owned)
            })
            .flatten()
            .ok_or(format!("{answer}"))
    };
    mesh_tests::eventually("routed by the GRPCRoute", Duration::from_secs(30), || {
        routed_by(&[]).and_then(|by| {
            (by == "grpcroute-service")
                .then_some(())
                .ok_or(format!("routed by {by}"))
        })
    });
    assert_eq!(
        routed_by(&["--header", "x-variant=b"]).as_deref(),
        Ok("grpcroute-unary-b")
    );
    assert_eq!(
        routed_by(&["--header", "x-variant=c"]).as_deref(),
        Ok("grpcroute-service-c")
    );
    // Streaming calls of the service take its catch-all rule.
    let streamed = call(&lab, &client, "count", &["--count", "100"]);
    assert_eq!(
        (&streamed["received"], &streamed["status"]["code"]),
        (&Value::from(100), &Value::from(0)),
        "{streamed}"
    );
}
