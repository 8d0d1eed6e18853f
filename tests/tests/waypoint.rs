//! L7 traffic management through a waypoint: bookinfo's `networking/`
//! samples applied to a lab whose default namespace uses a waypoint, with
//! the observed behaviour asserted: version routing, the 80/20 split within
//! statistical bounds, header-based routing, fault aborts and delays; then
//! L7 AuthorizationPolicies bound to the waypoint, by caller, path and
//! header.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_lab::PodPlan;
use mesh_tests::{Lab, bookinfo_manifest};

/// How long config may take to show in traffic.
const SETTLE: Duration = Duration::from_secs(5);

fn eventually(what: &str, check: impl FnMut() -> Result<(), String>) {
    mesh_tests::eventually(what, SETTLE, check);
}
use serde_json::Value;

fn sample(name: &str) -> PathBuf {
    mesh_lab::istio_samples_dir()
        .join("bookinfo/networking")
        .join(name)
}

fn manifest(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(name)
}

/// Runs `lab-app <args>` in pod `from` and waits for it.
fn run(lab: &Lab, from: &PodPlan, args: &[&str]) -> std::process::Output {
    lab.state
        .app_client(from, args)
        .expect("client command")
        .output()
        .expect("lab-app")
}

/// Sends `count` GETs from `from` (a new connection each) and returns each
/// answer's `version`, or `status <code>` for failures.
fn versions(lab: &Lab, from: &PodPlan, url: &str, count: u32, headers: &[&str]) -> Vec<String> {
    let count = count.to_string();
    let mut args = vec![
        "get",
        url,
        "--count",
        &count,
        "--new-connection",
        "--timeout-ms",
        "10000",
    ];
    for h in headers {
        args.extend(["--header", h]);
    }
    let output = run(lab, from, &args);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(v) => v["version"].as_str().unwrap_or("?").to_owned(),
            Err(_) => format!("body {line}"),
        })
        .collect()
}

fn tally(list: &[String]) -> BTreeMap<String, usize> {
    list.iter().fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v.clone()).or_default() += 1;
        m
    })
}

fn apply(lab: &Lab, file: &str) {
    apply_path(lab, &sample(file));
}

fn apply_path(lab: &Lab, path: &std::path::Path) {
    mesh_lab::cluster::apply(&lab.state.plan.name, path).expect("apply");
}

fn unapply(lab: &Lab, file: &str) {
    mesh_lab::cluster::unapply(&lab.state.plan.name, file).expect("unapply");
}

#[test]
fn bookinfo_networking_samples_through_the_waypoint() {
    let mut lab = Lab::up(
        "twp",
        vec![
            bookinfo_manifest(),
            manifest("details-v2.yaml"),
            manifest("echo-h2.yaml"),
            manifest("waypoint.yaml"),
        ],
        2,
    );
    lab.enrol_namespace("default");
    lab.use_waypoint("default", "waypoint");
    apply(&lab, "destination-rule-all.yaml");
    apply(&lab, "virtual-service-all-v1.yaml");
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("waypoint ready");
    let client = lab.state.pod("productpage").expect("productpage").clone();
    let reviews = "http://reviews:9080/reviews/0";

    // virtual-service-all-v1: every request to reviews lands on v1.
    eventually("all-v1", || {
        let seen = versions(&lab, &client, reviews, 30, &[]);
        (tally(&seen) == BTreeMap::from([("v1".to_owned(), 30)]))
            .then_some(())
            .ok_or(format!("{:?}", tally(&seen)))
    });

    // The waypoint starts a W3C trace for requests without one.
    let output = run(&lab, &client, &["get", reviews]);
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON answer");
    let traceparent = answer["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default();
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "traceparent {traceparent:?} in {answer}"
    );

    // Request heads over the 64 KiB limit get 431; the waypoint stays up.
    let big = format!("x-big:{}", "a".repeat(100 * 1024));
    let output = run(&lab, &client, &["get", reviews, "--header", &big]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("431"),
        "an oversized head: {stderr}"
    );
    assert_eq!(versions(&lab, &client, reviews, 3, &[]), ["v1", "v1", "v1"]);

    // An HTTP/2 port (`grpc`): the waypoint speaks HTTP/2 to the endpoint
    // and presents the service's authority, not the pod's address.
    let output = run(&lab, &client, &["get", "http://echo-h2:9090/echo"]);
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert_eq!(
        (answer["protocol"].as_str(), answer["host"].as_str()),
        (Some("HTTP/2"), Some("echo-h2:9090")),
        "{answer} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An HTTP/1.1 upgrade (WebSocket's mechanism) is routed like any
    // request, then the switched connection is relayed both ways.
    let output = run(
        &lab,
        &client,
        &["upgrade", "http://reviews:9080/ws", "--send", "hello"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "reviews-v1\nhello",
        "the v1 pod switched protocols and echoed"
    );

    // virtual-service-reviews-test-v2: jason gets v2, everyone else v1.
    unapply(&lab, "virtual-service-all-v1.yaml");
    apply(&lab, "virtual-service-reviews-test-v2.yaml");
    eventually("test-v2", || {
        let jason = tally(&versions(&lab, &client, reviews, 20, &["end-user:jason"]));
        let others = tally(&versions(&lab, &client, reviews, 20, &["end-user:json"]));
        (jason == BTreeMap::from([("v2".to_owned(), 20)])
            && others == BTreeMap::from([("v1".to_owned(), 20)]))
        .then_some(())
        .ok_or(format!("jason {jason:?}, others {others:?}"))
    });
    // Propagated through productpage: its call to reviews carries end-user.
    let page = versions(
        &lab,
        &client,
        "http://productpage:9080/productpage",
        1,
        &["end-user:jason"],
    );
    assert_eq!(page.len(), 1, "{page:?}");

    // virtual-service-reviews-80-20: 400 requests, v1 share within ±5σ of 80 %.
    unapply(&lab, "virtual-service-reviews-test-v2.yaml");
    apply(&lab, "virtual-service-reviews-80-20.yaml");
    eventually("80-20 split applied", || {
        let seen = tally(&versions(&lab, &client, reviews, 20, &[]));
        if seen.contains_key("v3") {
            return Err(format!("v3 answered: {seen:?}"));
        }
        seen.contains_key("v2")
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    let split = tally(&versions(&lab, &client, reviews, 400, &[]));
    let v1 = split.get("v1").copied().unwrap_or(0);
    let v2 = split.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 400, "only v1 and v2 answer: {split:?}");
    // σ = sqrt(400 · 0.8 · 0.2) = 8.
    assert!(
        (280..=360).contains(&v1),
        "v1 got {v1} of 400 (expected 320 ± 40): {split:?}"
    );

    // virtual-service-reviews-v2-v3: 200 requests, v2's share within ±5σ of 50 %.
    unapply(&lab, "virtual-service-reviews-80-20.yaml");
    apply(&lab, "virtual-service-reviews-v2-v3.yaml");
    eventually("v2-v3 split applied", || {
        let seen = tally(&versions(&lab, &client, reviews, 20, &[]));
        (!seen.contains_key("v1") && seen.contains_key("v3"))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    let split = tally(&versions(&lab, &client, reviews, 200, &[]));
    let v2 = split.get("v2").copied().unwrap_or(0);
    let v3 = split.get("v3").copied().unwrap_or(0);
    assert_eq!(v2 + v3, 200, "only v2 and v3 answer: {split:?}");
    // σ = sqrt(200 · 0.5 · 0.5) ≈ 7.
    assert!(
        (65..=135).contains(&v2),
        "v2 got {v2} of 200 (expected 100 ± 35): {split:?}"
    );

    // virtual-service-details-v2: details answers from v2 only.
    let details = "http://details:9080/details/0";
    apply(&lab, "virtual-service-details-v2.yaml");
    eventually("details-v2", || {
        let seen = tally(&versions(&lab, &client, details, 20, &[]));
        (seen == BTreeMap::from([("v2".to_owned(), 20)]))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    unapply(&lab, "virtual-service-details-v2.yaml");

    // virtual-service-reviews-v3: everything to v3.
    unapply(&lab, "virtual-service-reviews-v2-v3.yaml");
    apply(&lab, "virtual-service-reviews-v3.yaml");
    eventually("v3", || {
        let seen = tally(&versions(&lab, &client, reviews, 20, &[]));
        (seen == BTreeMap::from([("v3".to_owned(), 20)]))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });

    // sourceLabels / sourceNamespace: productpage gets v2, ratings (another
    // client in the namespace) v1, and nobody is in namespace "elsewhere".
    unapply(&lab, "virtual-service-reviews-v3.yaml");
    apply_path(&lab, &manifest("reviews-by-source.yaml"));
    let other_client = lab.state.pod("ratings").expect("ratings pod").clone();
    eventually("routes by source", || {
        let from_productpage = tally(&versions(&lab, &client, reviews, 10, &[]));
        let from_ratings = tally(&versions(&lab, &other_client, reviews, 10, &[]));
        (from_productpage == BTreeMap::from([("v2".to_owned(), 10)])
            && from_ratings == BTreeMap::from([("v1".to_owned(), 10)]))
        .then_some(())
        .ok_or(format!(
            "productpage {from_productpage:?}, ratings {from_ratings:?}"
        ))
    });
    unapply(&lab, "reviews-by-source.yaml");
    apply(&lab, "virtual-service-reviews-v3.yaml");

    // virtual-service-ratings-test-abort: jason's ratings calls get 500.
    let ratings = "http://ratings:9080/ratings/0";
    apply(&lab, "virtual-service-ratings-test-abort.yaml");
    eventually("ratings abort", || {
        let jason = versions(&lab, &client, ratings, 5, &["end-user:jason"]);
        let others = tally(&versions(&lab, &client, ratings, 5, &[]));
        (jason.iter().all(|v| v.contains("fault filter abort")) && others.get("v1") == Some(&5))
            .then_some(())
            .ok_or(format!("jason {jason:?}, others {others:?}"))
    });
    let waypoint = lab.state.pod("waypoint").expect("waypoint pod").clone();
    let metrics = lab
        .state
        .waypoint_metrics(&waypoint)
        .expect("waypoint metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_flags=\"FI\"")
                && l.contains("response_code=\"500\"")
                && l.contains("destination_service=\"ratings.default.svc.cluster.local\"")),
        "no FI 500 for ratings in\n{metrics}"
    );

    // virtual-service-ratings-test-delay: jason waits 7 s, others do not.
    unapply(&lab, "virtual-service-ratings-test-abort.yaml");
    apply(&lab, "virtual-service-ratings-test-delay.yaml");
    eventually("ratings delay", || {
        let started = Instant::now();
        let jason = versions(&lab, &client, ratings, 1, &["end-user:jason"]);
        let waited = started.elapsed();
        (waited >= Duration::from_secs(7) && jason == ["v1"])
            .then_some(())
            .ok_or(format!("jason waited {waited:?} for {jason:?}"))
    });
    let started = Instant::now();
    assert_eq!(versions(&lab, &client, ratings, 1, &[]), ["v1"]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "others are not delayed"
    );
    unapply(&lab, "virtual-service-ratings-test-delay.yaml");

    authorization_policies(&lab, &client, &waypoint);
    consistent_hashing(&lab, &client);

    // fault-injection-details-v1 (its own DestinationRule for details, so
    // after destination-rule-all is gone): every details call aborts 555.
    apply(&lab, "fault-injection-details-v1.yaml");
    eventually("details abort 555", || {
        let seen = versions(&lab, &client, "http://details:9080/details/0", 5, &[]);
        seen.iter()
            .all(|v| v.contains("fault filter abort"))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    let metrics = lab.state.waypoint_metrics(&waypoint).expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"555\"")
                && l.contains("response_flags=\"FI\"")),
        "no FI 555 in\n{metrics}"
    );
}

/// DestinationRule `consistentHash` on a header: one user, one pod.
fn consistent_hashing(lab: &Lab, client: &PodPlan) {
    let reviews = "http://reviews:9080/reviews/0";
    // The sticky rule replaces the subsets rule (one per host), so the
    // route that needs subset v3 goes first.
    unapply(lab, "virtual-service-reviews-v3.yaml");
    unapply(lab, "destination-rule-all.yaml");
    apply_path(lab, &manifest("reviews-sticky.yaml"));
    let users = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    eventually("each user sticks to one version", || {
        let mut spread = BTreeMap::new();
        for user in users {
            let header = format!("x-user:{user}");
            let seen = tally(&versions(lab, client, reviews, 8, &[&header]));
            if seen.len() != 1 {
                return Err(format!("{user} reached {seen:?}"));
            }
            spread.extend(seen);
        }
        // 8 users on 3 pods all landing on one: probability 3 · 3⁻⁸ < 0.05 %.
        (spread.len() > 1)
            .then_some(())
            .ok_or(format!("every user on {spread:?}"))
    });
}

/// L7 AuthorizationPolicies at the waypoint: an ALLOW policy on reviews by
/// caller, method and path, and a DENY policy on every service by header.
fn authorization_policies(lab: &Lab, productpage: &PodPlan, waypoint: &PodPlan) {
    let details = lab.state.pod("details-v1").expect("details").clone();
    let reviews = "http://reviews:9080/reviews/0";
    let ratings = "http://ratings:9080/ratings/0";
    let denied = "body RBAC: access denied";
    apply_path(lab, &manifest("waypoint-authz.yaml"));
    eventually("reviews only for productpage", || {
        let from_details = versions(lab, &details, reviews, 3, &[]);
        (from_details.iter().all(|v| v == denied))
            .then_some(())
            .ok_or(format!("details got {from_details:?}"))
    });
    let ok = |seen: &[String]| seen.iter().all(|v| v.starts_with('v'));
    let allowed = versions(lab, productpage, reviews, 10, &[]);
    assert!(ok(&allowed), "productpage GET /reviews/0: {allowed:?}");
    assert_eq!(
        versions(lab, productpage, "http://reviews:9080/health", 1, &[]),
        [denied],
        "a path outside /reviews/* is not allowed"
    );
    // The DENY policy covers every service bound to the waypoint.
    assert_eq!(
        versions(lab, productpage, reviews, 1, &["x-debug:1"]),
        [denied]
    );
    assert_eq!(
        versions(lab, &details, ratings, 1, &["x-debug:1"]),
        [denied]
    );
    let others = versions(lab, &details, ratings, 3, &["x-debug:0"]);
    assert!(ok(&others), "ratings without x-debug: {others:?}");

    let metrics = lab.state.waypoint_metrics(waypoint).expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                && l.contains("response_code=\"403\"")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-details\""
                )
                && l.contains("destination_service=\"reviews.default.svc.cluster.local\"")),
        "no 403 from details to reviews in\n{metrics}"
    );

    // Removed, the policies stop applying.
    unapply(lab, "waypoint-authz.yaml");
    eventually("policies removed", || {
        let seen = versions(lab, &details, reviews, 3, &["x-debug:1"]);
        ok(&seen).then_some(()).ok_or(format!("{seen:?}"))
    });
}

/// One GET from `from`: the status (from `lab-app get`'s report of a
/// non-2xx, else 200), the body, and how long it took.
fn status_of(lab: &Lab, from: &PodPlan, url: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let output = run(lab, from, &["get", url, "--timeout-ms", "15000"]);
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let status = if output.status.success() {
        200
    } else {
        // `GET <uri> from <peer>: 503 Service Unavailable`
        stderr
            .rsplit(": ")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status for {url}: {stderr}"))
    };
    (status, stdout, elapsed)
}

/// Lines of `pod`'s app log that mention all of `needles`.
fn log_lines(lab: &Lab, pod: &PodPlan, needles: &[&str]) -> usize {
    std::fs::read_to_string(lab.state.pod_log(pod))
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Whether the waypoint's `istio_requests_total` has a series with all of
/// `labels` (`name="value"` each).
fn counted(metrics: &str, labels: &[&str]) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with("istio_requests_total") && labels.iter().all(|x| l.contains(x)))
}

/// Gateway API routing at the waypoint: an HTTPRoute attached to Service
/// reviews sends `end-user: jason` to v2, `/reviews/9...` (whole segments)
/// to v3 with its prefix rewritten, and the rest 90/10 to v1/v2 with a
/// response header, through the per-version Services.
#[test]
fn gateway_api_http_routes_through_the_waypoint() {
    let versions_sample =
        mesh_lab::istio_samples_dir().join("bookinfo/platform/bookinfo-versions.yaml");
    let mut lab = Lab::up(
        "twph",
        vec![
            bookinfo_manifest(),
            versions_sample,
            manifest("waypoint.yaml"),
        ],
        2,
    );
    lab.enrol_namespace("default");
    lab.use_waypoint("default", "waypoint");
    apply_path(&lab, &manifest("reviews-httproute.yaml"));
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("waypoint ready");
    let client = lab.state.pod("productpage").expect("productpage").clone();
    let reviews = "http://reviews:9080/reviews/0";

    eventually("the HTTPRoute is applied", || {
        let seen = versions(&lab, &client, reviews, 10, &["end-user:jason"]);
        (tally(&seen) == BTreeMap::from([("v2".to_owned(), 10)]))
            .then_some(())
            .ok_or(format!("{:?}", tally(&seen)))
    });

    // Whole segments: /reviews/9 and /reviews/9/x go to v3, rewritten;
    // /reviews/90 is not under /reviews/9.
    for (path, rewritten) in [
        ("/reviews/9", "/reviews/1"),
        ("/reviews/9/x", "/reviews/1/x"),
    ] {
        let output = run(
            &lab,
            &client,
            &["get", &format!("http://reviews:9080{path}")],
        );
        let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON answer");
        assert_eq!(
            (answer["version"].as_str(), answer["path"].as_str()),
            (Some("v3"), Some(rewritten)),
            "{path}: {answer}"
        );
    }
    let split = tally(&versions(
        &lab,
        &client,
        "http://reviews:9080/reviews/90",
        100,
        &[],
    ));
    let v1 = split.get("v1").copied().unwrap_or(0);
    let v2 = split.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 100, "90/10 split: {split:?}");
    // Binomial(100, 0.1): 1..=25 holds with overwhelming probability.
    assert!((1..=25).contains(&v2), "90/10 split: {split:?}");

    let output = run(&lab, &client, &["get", reviews, "--show-headers"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("x-routed-by: httproute"),
        "the rule's response header: {stderr}"
    );
}

/// Lab `name` with flaky.yaml behind the waypoint and flaky-routes.yaml
/// in effect; returns it with the client, flaky and waypoint pods.
fn flaky_lab(name: &str) -> (Lab, PodPlan, PodPlan, PodPlan) {
    let mut lab = Lab::up(
        name,
        vec![manifest("flaky.yaml"), manifest("waypoint.yaml")],
        2,
    );
    lab.enrol_namespace("default");
    lab.use_waypoint("default", "waypoint");
    apply_path(&lab, &manifest("flaky-routes.yaml"));
    lab.state
        .wait_for_waypoints(Duration::from_secs(15))
        .expect("waypoint ready");
    let client = lab.state.pod("client").expect("client").clone();
    let flaky = lab.state.pod("flaky").expect("flaky").clone();
    let waypoint = lab.state.pod("waypoint").expect("waypoint pod").clone();
    mesh_tests::eventually("routes applied", Duration::from_secs(30), || {
        let warmup = "http://flaky:9080/timeout/warmup?delay_ms=1500";
        match status_of(&lab, &client, warmup) {
            (504, _, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    (lab, client, flaky, waypoint)
}

/// Upstream failures answered as Envoy answers them: a reset before the
/// response is a 503 `UC` (retried only when the policy says `reset`, then
/// `UC,URX`), a 503 answer retried by Istio's default policy is passed on
/// as `URX`, a route timeout is a 504 `UT`, per-try timeouts with retries
/// a 504 `UT,URX`, a dead upstream a prompt 503 `UF,URX`; the flags show
/// in the metrics and the access log, and requests on other connections
/// are served while one hangs.
#[test]
fn upstream_failures_through_the_waypoint() {
    let (lab, client, flaky, waypoint) = flaky_lab("twpf");
    let url = |path: &str| format!("http://flaky:9080{path}");

    // A hanging upstream (route timeout) and another connection: the
    // other is served at once while the first waits for its timeout.
    let hanging = lab
        .state
        .app_client(
            &client,
            &[
                "get",
                &url("/timeout/hang?delay_ms=20000"),
                "--timeout-ms",
                "15000",
            ],
        )
        .expect("client command")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lab-app");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let others = versions(&lab, &client, &url("/ok"), 10, &[]);
    assert_eq!(others, vec!["v1"; 10], "requests next to a hanging one");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "10 requests next to a hanging one took {:?}",
        started.elapsed()
    );
    let output = hanging.wait_with_output().expect("hanging client");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(": 504"), "the hanging request: {stderr}");

    // Route timeout: 504 after 1 s, one try.
    let (status, body, took) = status_of(&lab, &client, &url("/timeout/t1?delay_ms=5000"));
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "route timeout of 1 s answered after {took:?}"
    );

    // Per-try timeouts, retried: three tries of 300 ms each.
    let (status, _, took) = status_of(&lab, &client, &url("/per-try/p1?delay_ms=5000"));
    assert_eq!(status, 504);
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&took),
        "3 tries of 300 ms took {took:?}"
    );
    assert_eq!(
        log_lines(&lab, &flaky, &["/per-try/p1", "delaying the answer"]),
        3,
        "tries of /per-try/p1"
    );

    // A reset before the response, not retried by Istio's default policy.
    let (status, body, _) = status_of(&lab, &client, &url("/plain/r1?reset=1"));
    assert_eq!(status, 503);
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    assert_eq!(
        log_lines(&lab, &flaky, &["/plain/r1"]),
        1,
        "tries of /plain/r1"
    );
    // Resets retried by a `reset` policy: three tries.
    let (status, _, _) = status_of(&lab, &client, &url("/retry-reset/r2?reset=1"));
    assert_eq!(status, 503);
    assert_eq!(
        log_lines(&lab, &flaky, &["/retry-reset/r2"]),
        3,
        "tries of /retry-reset/r2"
    );
    // A 503 answer is retried by the default policy, then passed on.
    let (status, _, _) = status_of(&lab, &client, &url("/plain/s1?status=503"));
    assert_eq!(status, 503);
    assert_eq!(
        log_lines(&lab, &flaky, &["/plain/s1"]),
        3,
        "tries of /plain/s1"
    );

    let metrics = lab.state.waypoint_metrics(&waypoint).expect("metrics");
    let flaky_svc = "destination_service=\"flaky.default.svc.cluster.local\"";
    for (code, flags) in [
        ("504", "UT"),
        ("504", "UT,URX"),
        ("503", "UC"),
        ("503", "UC,URX"),
        ("503", "URX"),
    ] {
        let code = format!("response_code=\"{code}\"");
        let flags = format!("response_flags=\"{flags}\"");
        assert!(
            counted(&metrics, &[&code, &flags, flaky_svc]),
            "no {code} {flags} for flaky in\n{metrics}"
        );
    }
    // The access log writes its lines in batches, a few milliseconds after
    // the request.
    for (path, flags) in [
        ("/per-try/p1", "flags=UT,URX"),
        ("/plain/r1", "flags=UC "),
        ("/retry-reset/r2", "flags=UC,URX"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let access = std::fs::read_to_string(lab.state.pod_log(&waypoint)).unwrap_or_default();
            if access
                .lines()
                .any(|l| l.contains(path) && l.contains(flags) && l.contains("waypoint::access"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no access log line for {path} with {flags}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The upstream app dies (SIGKILL): its port refuses connections, so
    // each try fails to connect, and the answer is a prompt 503 `UF`, with
    // Istio's default policy retrying `connect-failure`.
    std::fs::write(lab.state.pod_cgroup(&flaky).join("cgroup.kill"), "1").expect("kill flaky");
    let (status, body, took) = status_of(&lab, &client, &url("/plain/dead"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(5),
        "a refused upstream answered after {took:?}"
    );
    let metrics = lab.state.waypoint_metrics(&waypoint).expect("metrics");
    assert!(
        counted(
            &metrics,
            &[
                "response_code=\"503\"",
                "response_flags=\"UF,URX\"",
                flaky_svc
            ]
        ),
        "no 503 UF,URX for flaky in\n{metrics}"
    );
}

/// Sends `count` GETs of `url` at once from `from` (one process each) and
/// returns how many succeeded.
fn burst(lab: &Lab, from: &PodPlan, url: &str, count: usize) -> usize {
    let children: Vec<_> = (0..count)
        .map(|_| {
            lab.state
                .app_client(from, &["get", url, "--timeout-ms", "15000"])
                .expect("client command")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("lab-app")
        })
        .collect();
    children
        .into_iter()
        .map(|mut c| c.wait().expect("lab-app"))
        .filter(|s| s.success())
        .count()
}

/// The value of the Prometheus sample line starting with `series`.
fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A retry storm is bounded: 24 requests failing at once with 503 (which
/// Istio's default policy retries twice) make at most 24 + 2 × 3 tries
/// under Envoy's default limit of 3 outstanding retries, not 72; the
/// refused retries answer with flag `UO` and count in
/// `envoy_cluster_upstream_rq_retry_overflow`. A DestinationRule's
/// `maxRetries: 1` lowers the bound to 24 + 2.
#[test]
fn retry_limit_bounds_a_retry_storm() {
    const BURST: usize = 24;
    let (lab, client, flaky, waypoint) = flaky_lab("twpr");
    let tries = |path: &str| log_lines(&lab, &flaky, &[path, "delaying the answer"]);

    let ok = burst(
        &lab,
        &client,
        "http://flaky:9080/plain/b1?status=503&delay_ms=1000",
        BURST,
    );
    assert_eq!(ok, 0, "every request fails");
    let made = tries("/plain/b1?");
    assert!(
        (BURST + 1..=BURST + 2 * 3).contains(&made),
        "{made} tries for {BURST} requests under a limit of 3 retries"
    );
    let metrics = lab.state.waypoint_metrics(&waypoint).expect("metrics");
    let overflow = counter(
        &metrics,
        "envoy_cluster_upstream_rq_retry_overflow_total{cluster_name=\"outbound|9080||flaky.default.svc.cluster.local\"}",
    );
    assert!(
        overflow >= (BURST - 3) as f64,
        "{overflow} retries refused of {BURST} failing requests:\n{metrics}"
    );
    assert!(
        counted(
            &metrics,
            &["response_code=\"503\"", "response_flags=\"UO\""]
        ),
        "no 503 UO in\n{metrics}"
    );

    apply_path(&lab, &manifest("flaky-max-retries.yaml"));
    // In effect once a burst of 4 makes at most 4 + 2 tries.
    let mut round = 0;
    mesh_tests::eventually("maxRetries: 1 applied", Duration::from_secs(20), || {
        round += 1;
        let path = format!("/plain/probe{round}?");
        burst(
            &lab,
            &client,
            &format!("http://flaky:9080{path}status=503&delay_ms=500"),
            4,
        );
        let made = tries(&path);
        (made <= 4 + 2)
            .then_some(())
            .ok_or(format!("{made} tries for 4 requests"))
    });
    burst(
        &lab,
        &client,
        "http://flaky:9080/plain/b2?status=503&delay_ms=1000",
        BURST,
    );
    let made = tries("/plain/b2?");
    assert!(
        (BURST + 1..=BURST + 2).contains(&made),
        "{made} tries for {BURST} requests under maxRetries: 1"
    );
}
