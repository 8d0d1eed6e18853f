//! Certificate rotation under load: with 4-second workload certificates,
//! ztunnel renews every identity several times while a persistent
//! connection and a stream of new connections run through the mesh across
//! nodes, and not one exchange fails.

use mesh_lab::plan::ECHO_PORT;
use mesh_tests::Lab;
use serde_json::Value;

/// Certificate lifetime: renewed at half life, so every 2 s.
const TTL_SECONDS: &str = "4";
/// How long the load runs: long enough for three renewals.
const LOAD_SECONDS: &str = "7";

fn issued(log: &str, service_account: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("workload certificate issued"))
        .filter(|l| l.contains(&format!("/sa/{service_account}")))
        .count()
}

#[test]
fn certificates_rotate_under_load_without_dropping_connections() {
    // SAFETY: the only test of this binary sets it before any lab thread or
    // child process exists; ztunnels read it through their command line.
    unsafe { std::env::set_var("MESH_LAB_CERT_TTL", TTL_SECONDS) };
    let mut lab = Lab::bookinfo("trot");
    lab.enrol_namespace("default");
    let state = &lab.state;
    let productpage = state.pod("productpage").expect("productpage").clone();
    let details = state.pod("details").expect("details").clone();
    assert_ne!(productpage.node, details.node, "the load crosses nodes");
    let target = format!("{}:{ECHO_PORT}", details.ip);

    let spawn = |extra: &[&str]| {
        let mut args = vec!["load", target.as_str(), "--seconds", LOAD_SECONDS];
        args.extend_from_slice(extra);
        state
            .app_client(&productpage, &args)
            .expect("client command")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start load")
    };
    let persistent = spawn(&["--mode", "rr", "--rate", "200"]);
    let fresh = spawn(&["--mode", "connect"]);
    let report = |child: std::process::Child, what: &str| -> Value {
        let output = child.wait_with_output().expect("load finished");
        assert!(
            output.status.success(),
            "{what} failed during rotation: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("load report")
    };
    let persistent = report(persistent, "the persistent connection");
    let fresh = report(fresh, "new connections");

    // 200/s for 7 s on one connection: no stall while certificates changed.
    let ops = persistent["ops"].as_u64().unwrap_or(0);
    assert!(
        ops >= 1300,
        "persistent connection completed {ops} of 1400 exchanges"
    );
    assert!(fresh["ops"].as_u64().unwrap_or(0) > 50, "{fresh}");

    for (pod, account) in [
        (&productpage, "bookinfo-productpage"),
        (&details, "bookinfo-details"),
    ] {
        let log = std::fs::read_to_string(state.ztunnel_log(pod.node)).expect("ztunnel log");
        let count = issued(&log, account);
        assert!(
            count >= 4,
            "{account}: {count} certificates issued on node{} (first plus three renewals expected)",
            pod.node
        );
    }
}
