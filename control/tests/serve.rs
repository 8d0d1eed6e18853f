//! The control plane over real gRPC: delta ADS pushes, ACK/NACK status, and
//! the CA's authorization, driven by the same client the proxies use.

mod common;
use common::{create_certificate, csr, http_get, plaintext};

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::{
    security::Authorization,
    type_url,
    workload::{Address, address},
};
use mesh_control::{ControlPlane, Options, SourceOptions, model::MeshSettings};
use mesh_xds::{ClientConfig, Handler, Rejected, Update};
use prost::Message;
use tokio::sync::watch;

const TOKEN0: &str = "node0-token-0123456789";
const TOKEN1: &str = "node1-token-0123456789";

const PLATFORM: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node0, serviceAccountName: web, containers: [{name: app}]}
status: {podIP: 10.244.0.10, conditions: [{type: Ready, status: "True"}]}
"#;

const SECOND_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app}]}
status: {podIP: 10.244.1.10, conditions: [{type: Ready, status: "True"}]}
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    control: ControlPlane,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("platform.yaml"), PLATFORM).unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        format!(
            r#"{{"tokens": {{"{TOKEN0}": {{"node": "node0"}}, "{TOKEN1}": {{"node": "node1"}}}}}}"#
        ),
    )
    .unwrap();
    let control = ControlPlane::start(Options {
        source: SourceOptions::Dirs(vec![config.clone()]),
        ca_dir: dir.path().join("ca"),
        tokens_file: Some(tokens),
        token_review: None,
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        status_addr: "127.0.0.1:0".parse().unwrap(),
        settings: MeshSettings::default(),
    })
    .await
    .unwrap();
    Fixture {
        _dir: dir,
        config,
        control,
    }
}

/// What a proxy holds: address resource names to decoded addresses.
type Held = BTreeMap<String, Address>;

/// L4 policies a proxy holds, by resource name.
type Policies = BTreeMap<String, Authorization>;

struct Recorder {
    held: Arc<Mutex<Held>>,
    policies: Arc<Mutex<Policies>>,
    changes: watch::Sender<usize>,
    /// Names whose resources this proxy refuses (to provoke NACKs).
    refuse: Option<&'static str>,
}

impl Handler for Recorder {
    fn apply(&mut self, update: Update) -> Result<(), Rejected> {
        let mut rejected = Rejected::default();
        if update.type_url == type_url::AUTHORIZATION {
            let mut policies = self.policies.lock().unwrap();
            for name in update.removed {
                policies.remove(&name);
            }
            for resource in update.resources {
                let policy = Authorization::decode(&resource.value[..]).unwrap();
                policies.insert(resource.name, policy);
            }
            drop(policies);
            self.changes.send_modify(|n| *n += 1);
            return Ok(());
        }
        let mut held = self.held.lock().unwrap();
        for name in update.removed {
            held.remove(&name);
        }
        for resource in update.resources {
            if self.refuse.is_some_and(|r| resource.name.contains(r)) {
                rejected.0.push((resource.name, "refused by test".into()));
                continue;
            }
            held.insert(resource.name, Address::decode(&resource.value[..]).unwrap());
        }
        drop(held);
        self.changes.send_modify(|n| *n += 1);
        if rejected.0.is_empty() {
            Ok(())
        } else {
            Err(rejected)
        }
    }
}

fn token_file(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{token}.txt"));
    std::fs::write(&path, token).unwrap();
    path
}

fn proxy(
    grpc: SocketAddr,
    token: std::path::PathBuf,
    refuse: Option<&'static str>,
) -> (Arc<Mutex<Held>>, watch::Receiver<usize>) {
    let (held, _, rx) = proxy_with_policies(grpc, token, refuse);
    (held, rx)
}

fn proxy_with_policies(
    grpc: SocketAddr,
    token: std::path::PathBuf,
    refuse: Option<&'static str>,
) -> (
    Arc<Mutex<Held>>,
    Arc<Mutex<Policies>>,
    watch::Receiver<usize>,
) {
    let held = Arc::new(Mutex::new(Held::new()));
    let policies = Arc::new(Mutex::new(Policies::new()));
    let (changes, rx) = watch::channel(0);
    let recorder = Recorder {
        held: held.clone(),
        policies: policies.clone(),
        changes,
        refuse,
    };
    tokio::spawn(mesh_xds::run(
        ClientConfig {
            address: format!("http://{grpc}"),
            root_cert: None,
            token_file: Some(token),
            node_id: "test~proxy".into(),
            types: vec![type_url::ADDRESS, type_url::AUTHORIZATION],
            metadata: Vec::new(),
        },
        recorder,
    ));
    (held, policies, rx)
}

async fn wait_for(
    held: &Arc<Mutex<Held>>,
    mut rx: watch::Receiver<usize>,
    what: &str,
    f: impl Fn(&Held) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        if f(&held.lock().unwrap()) {
            return;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "within 1 s: {what}; held {:?}",
                held.lock().unwrap().keys().collect::<Vec<_>>()
            );
        }
    }
}

#[tokio::test]
async fn workloads_and_services_are_pushed_and_changes_arrive_within_a_second() {
    let fixture = start().await;
    let ports = fixture.control.ports();
    let (held, rx) = proxy(ports.grpc, token_file(fixture._dir.path(), TOKEN0), None);
    wait_for(&held, rx.clone(), "initial workload and service", |h| {
        h.contains_key("Kubernetes//Pod/shop/web-0")
            && h.contains_key("shop/web.shop.svc.cluster.local")
    })
    .await;
    match &held.lock().unwrap()["Kubernetes//Pod/shop/web-0"].r#type {
        Some(address::Type::Workload(w)) => assert_eq!(w.addresses, vec![vec![10, 244, 0, 10]]),
        other => panic!("{other:?}"),
    }

    std::fs::write(fixture.config.join("more.yaml"), SECOND_POD).unwrap();
    wait_for(&held, rx.clone(), "second pod pushed", |h| {
        h.contains_key("Kubernetes//Pod/shop/web-1")
    })
    .await;
    std::fs::remove_file(fixture.config.join("more.yaml")).unwrap();
    wait_for(&held, rx.clone(), "second pod removed", |h| {
        !h.contains_key("Kubernetes//Pod/shop/web-1")
            && h.contains_key("Kubernetes//Pod/shop/web-0")
    })
    .await;

    let syncz = http_get(ports.status, "/debug/syncz").await;
    assert!(syncz.contains("\"proxy\": \"test~proxy\""), "{syncz}");
    assert!(syncz.contains("\"acked_version\": 3"), "{syncz}");
    let metrics = http_get(ports.status, "/metrics").await;
    assert!(
        metrics.contains("pilot_xds_pushes_total{type=\"Address\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn broken_config_keeps_the_rest_and_is_reported() {
    let fixture = start().await;
    let ports = fixture.control.ports();
    std::fs::write(
        fixture.config.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: [{port: eighty}]}\n",
    )
    .unwrap();
    let (held, rx) = proxy(ports.grpc, token_file(fixture._dir.path(), TOKEN0), None);
    wait_for(&held, rx, "healthy config still served", |h| {
        h.contains_key("Kubernetes//Pod/shop/web-0")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let errors = http_get(ports.status, "/debug/config_errors").await;
    assert!(
        errors.contains("broken.yaml: document 1 (Service shop/bad): field `spec.ports[0].port`"),
        "{errors}"
    );
}

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

/// Polls `f` over what the proxy holds until it holds, for up to 1 s.
async fn wait_policies(policies: &Arc<Mutex<Policies>>, what: &str, f: impl Fn(&Policies) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !f(&policies.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "within 1 s: {what}; held {:?}",
            policies.lock().unwrap().keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn policies_of(held: &Held, uid: &str) -> Vec<String> {
    match held.get(uid).and_then(|a| a.r#type.as_ref()) {
        Some(address::Type::Workload(w)) => w.authorization_policies.clone(),
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn policies_are_pushed_and_a_broken_edit_keeps_the_last_good_version() {
    let fixture = start().await;
    let ports = fixture.control.ports();
    let file = fixture.config.join("policy.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let (held, policies, rx) =
        proxy_with_policies(ports.grpc, token_file(fixture._dir.path(), TOKEN0), None);
    wait_policies(&policies, "policy and converted STRICT pushed", |p| {
        p.contains_key("shop/web-allow")
            && p.contains_key("shop/converted_peer_authentication_default")
    })
    .await;
    wait_for(&held, rx.clone(), "workload names its policies", |h| {
        policies_of(h, "Kubernetes//Pod/shop/web-0")
            == [
                "shop/web-allow",
                "shop/converted_peer_authentication_default",
            ]
    })
    .await;

    // An invalid edit: rejected with its field, the previous version stays.
    std::fs::write(
        &file,
        POLICY.replace("namespaces: [shop]", "ipBlocks: [nope]"),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let errors = loop {
        let errors = http_get(ports.status, "/debug/config_errors").await;
        if errors.contains("ipBlocks") || tokio::time::Instant::now() > deadline {
            break errors;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        errors.contains("AuthorizationPolicy shop/web-allow: field `spec.rules[0].from[0].source.ipBlocks[0]`: `nope` is not an IP address or CIDR (last good version kept)"),
        "{errors}"
    );
    // A YAML syntax error in the file: everything it held stays too.
    std::fs::write(&file, "apiVersion: [\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let kept = policies
        .lock()
        .unwrap()
        .get("shop/web-allow")
        .cloned()
        .unwrap();
    let namespaces = &kept.rules[0].clauses[0].matches[0].namespaces;
    assert_eq!(namespaces.len(), 1, "the last good version is still served");
    assert!(policies_of(&held.lock().unwrap(), "Kubernetes//Pod/shop/web-0").len() == 2);

    // Deleting the file removes them.
    std::fs::remove_file(&file).unwrap();
    wait_policies(&policies, "policies removed", |p| p.is_empty()).await;
}

#[tokio::test]
async fn nacks_are_recorded_per_proxy() {
    let fixture = start().await;
    let ports = fixture.control.ports();
    let (held, rx) = proxy(
        ports.grpc,
        token_file(fixture._dir.path(), TOKEN0),
        Some("web-0"),
    );
    wait_for(&held, rx, "service applied", |h| {
        h.contains_key("shop/web.shop.svc.cluster.local")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let syncz = http_get(ports.status, "/debug/syncz").await;
    assert!(syncz.contains("refused by test"), "{syncz}");
    let metrics = http_get(ports.status, "/metrics").await;
    assert!(
        metrics.contains("pilot_total_xds_rejects_total{type=\"Address\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unauthenticated_streams_are_refused() {
    let fixture = start().await;
    let ports = fixture.control.ports();
    let (held, _rx) = proxy(
        ports.grpc,
        token_file(fixture._dir.path(), "not-a-token-at-all"),
        None,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.lock().unwrap().is_empty());
}

#[tokio::test]
async fn ca_signs_only_identities_running_on_the_callers_node() {
    let fixture = start().await;
    let grpc = fixture.control.ports().grpc;
    let web = "spiffe://cluster.local/ns/shop/sa/web";

    let chain = create_certificate(plaintext(grpc).await, Some(TOKEN0), csr(web))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert!(chain[0].starts_with("-----BEGIN CERTIFICATE-----"));

    let other_node = create_certificate(plaintext(grpc).await, Some(TOKEN1), csr(web))
        .await
        .unwrap_err();
    assert_eq!(
        other_node.code(),
        tonic::Code::PermissionDenied,
        "{other_node:?}"
    );
    assert!(
        other_node
            .message()
            .contains("no pod on node node1 runs as")
    );

    let other_domain = create_certificate(
        plaintext(grpc).await,
        Some(TOKEN0),
        csr("spiffe://evil.org/ns/shop/sa/web"),
    )
    .await
    .unwrap_err();
    assert_eq!(other_domain.code(), tonic::Code::PermissionDenied);

    let anonymous = create_certificate(plaintext(grpc).await, None, csr(web))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

    let garbage = create_certificate(plaintext(grpc).await, Some(TOKEN0), "garbage".into())
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument);
}

/// A control plane process (the real binary), killed on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_control(dir: &Path, grpc: SocketAddr) -> Process {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--tokens-file")
        .arg(dir.join("tokens.json"))
        .arg("--grpc-addr")
        .arg(grpc.to_string())
        .arg("--grpc-tls-addr")
        .arg("127.0.0.1:0")
        .arg("--status-addr")
        .arg("127.0.0.1:0")
        .env("MESH_LOG", "warn")
        .spawn()
        .expect("start mesh-control");
    Process(child)
}

#[tokio::test]
async fn proxies_keep_the_last_config_while_the_control_plane_is_away() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/platform.yaml"), PLATFORM).unwrap();
    std::fs::write(
        dir.path().join("tokens.json"),
        format!(r#"{{"tokens": {{"{TOKEN0}": {{"node": "node0"}}}}}}"#),
    )
    .unwrap();
    let grpc: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let control = spawn_control(dir.path(), grpc);
    let (held, rx) = proxy(grpc, token_file(dir.path(), TOKEN0), None);
    let mut rx_slow = rx.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !held
        .lock()
        .unwrap()
        .contains_key("Kubernetes//Pod/shop/web-0")
    {
        tokio::time::timeout_at(deadline, rx_slow.changed())
            .await
            .expect("initial sync")
            .unwrap();
    }
    let updates_before = *rx.borrow();

    // The control plane goes away: the proxy keeps everything it had.
    drop(control);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        held.lock()
            .unwrap()
            .contains_key("Kubernetes//Pod/shop/web-0")
    );
    assert!(
        held.lock()
            .unwrap()
            .contains_key("shop/web.shop.svc.cluster.local")
    );

    // It comes back with a change: the proxy reconnects by itself, announces
    // what it holds, and receives just the difference.
    std::fs::write(dir.path().join("config/more.yaml"), SECOND_POD).unwrap();
    let _control = spawn_control(dir.path(), grpc);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut rx_wait = rx.clone();
    while !held
        .lock()
        .unwrap()
        .contains_key("Kubernetes//Pod/shop/web-1")
    {
        tokio::time::timeout_at(deadline, rx_wait.changed())
            .await
            .expect("reconnected within 10 s")
            .unwrap();
    }
    assert!(
        held.lock()
            .unwrap()
            .contains_key("Kubernetes//Pod/shop/web-0")
    );
    // One response for the new pod (the service's endpoints live on the
    // workloads, so the service itself is unchanged) plus one, empty, for
    // the authorization type at most: nothing unchanged is resent.
    let updates_after = *rx.borrow() - updates_before;
    assert!(
        updates_after <= 2,
        "{updates_after} responses after reconnect"
    );
}
