//! L4 policy end to end: Istio AuthorizationPolicy and PeerAuthentication
//! applied to the lab's config, translated by the control plane, pushed to
//! both ztunnels and enforced on real connections between bookinfo pods.

use std::time::Duration;

use mesh_config::node::DATAPLANE_MODE_LABEL;
use mesh_lab::{LabState, PodPlan, cluster, mesh::LabelTarget, probe};
use mesh_tests::Lab;

/// Applies `yaml` as file `name` of the lab's config and waits until every
/// ztunnel holds exactly the policies in `expect` (by `namespace/name`).
fn apply_policy(state: &LabState, name: &str, yaml: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(name);
    std::fs::write(&file, yaml).expect("write policy");
    cluster::apply(&state.plan.name, &file).expect("apply");
    wait_for_policies(state, expect);
}

fn remove_policy(state: &LabState, name: &str) {
    cluster::unapply(&state.plan.name, name).expect("unapply");
}

fn wait_for_policies(state: &LabState, expect: &[&str]) {
    state
        .wait_for_ztunnels(Duration::from_secs(3), |_, dump| {
            let mut held: Vec<&str> = dump["policies"]
                .as_array()
                .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            held.sort_unstable();
            held == expect
        })
        .unwrap_or_else(|err| panic!("policies {expect:?} pushed: {err}"));
}

fn call(state: &LabState, from: &PodPlan, to: &PodPlan) -> Result<String, String> {
    probe::http_get(
        state,
        from,
        &format!("http://{}:9080/policy-probe", to.ip),
        &[],
    )
    .map(|answers| answers[0].field("pod").to_owned())
    .map_err(|err| err.to_string())
}

fn assert_allowed(state: &LabState, from: &PodPlan, to: &PodPlan, why: &str) {
    assert_eq!(
        call(state, from, to).as_deref(),
        Ok(to.name.as_str()),
        "{} -> {} should pass: {why}",
        from.name,
        to.name
    );
}

fn assert_denied(state: &LabState, from: &PodPlan, to: &PodPlan, why: &str) {
    let result = call(state, from, to);
    assert!(
        result.is_err(),
        "{} -> {} should be refused ({why}), got {result:?}",
        from.name,
        to.name
    );
}

const DENY_PRODUCTPAGE: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-deny-productpage, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
"#;

const ALLOW_REVIEWS: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: details-allow-reviews, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]}}]
    to: [{operation: {ports: ["9080"]}}]
"#;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

#[test]
fn authorization_and_peer_authentication_are_enforced() {
    let mut lab = Lab::bookinfo("tpol");
    lab.enrol_namespace("default");
    let state = &lab.state;
    let pod = |name: &str| state.pod(name).expect(name).clone();
    let (productpage, details, reviews) = (pod("productpage"), pod("details"), pod("reviews-v1"));
    assert_allowed(state, &productpage, &details, "no policy yet");

    apply_policy(
        state,
        "deny.yaml",
        DENY_PRODUCTPAGE,
        &["default/details-deny-productpage"],
    );
    assert_denied(state, &productpage, &details, "DENY matches its principal");
    assert_allowed(state, &reviews, &details, "DENY does not match reviews");
    remove_policy(state, "deny.yaml");

    apply_policy(
        state,
        "allow.yaml",
        ALLOW_REVIEWS,
        &["default/details-allow-reviews"],
    );
    assert_denied(
        state,
        &productpage,
        &details,
        "an ALLOW applies and does not match",
    );
    assert_allowed(state, &reviews, &details, "ALLOW matches reviews on 9080");
    remove_policy(state, "allow.yaml");
    wait_for_policies(state, &[]);

    // A pod opted out of the mesh talks plaintext; the enrolled destination
    // accepts it (PERMISSIVE, the default) until STRICT is applied.
    let ratings = pod("ratings");
    lab.state
        .set_label(
            &LabelTarget::Pod(ratings.name.clone()),
            DATAPLANE_MODE_LABEL,
            Some("none"),
        )
        .expect("opt ratings out");
    let state = &lab.state;
    state
        .wait_for_ztunnels(Duration::from_secs(3), |_, dump| {
            dump["workloads"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w["name"] == ratings.name.as_str() && w["hbone"] == false)
            })
        })
        .expect("ratings unenrolled");
    assert_allowed(state, &ratings, &details, "PERMISSIVE accepts plaintext");
    apply_policy(
        state,
        "strict.yaml",
        STRICT,
        &["default/converted_peer_authentication_default"],
    );
    assert_denied(state, &ratings, &details, "STRICT refuses plaintext");
    assert_allowed(state, &productpage, &details, "STRICT accepts mTLS");

    let log = std::fs::read_to_string(state.ztunnel_log(details.node)).unwrap_or_default();
    assert!(
        log.contains("default/details-deny-productpage"),
        "the denial names the policy in the log"
    );
}
