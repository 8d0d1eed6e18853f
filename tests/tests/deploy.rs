//! The Kubernetes install: the checked-in `deploy/rendered/mesh.yaml` is a
//! fresh render of `deploy/chart`, every document is a well-formed object of
//! a known kind, and each component's ServiceAccount is bound to the access it
//! needs. Pure file checks: no cluster, no root.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        batch::v1::Job,
        core::v1::{ConfigMap, Namespace, PodSpec, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use mesh_lab::deploy::{
    HOOKS_PATH, RELEASE_NAMESPACE, RENDERED_PATH, render_workspace, render_workspace_hooks,
};

/// What the control plane reads and does: (apiGroup, resource, verb).
const CONTROL_NEEDS: &[(&str, &str, &str)] = &[
    ("", "namespaces", "get"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "services", "get"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("", "serviceaccounts", "get"),
    ("", "serviceaccounts", "list"),
    ("", "serviceaccounts", "watch"),
    ("discovery.k8s.io", "endpointslices", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("networking.istio.io", "virtualservices", "list"),
    ("networking.istio.io", "virtualservices", "watch"),
    ("networking.istio.io", "destinationrules", "list"),
    ("networking.istio.io", "destinationrules", "watch"),
    ("networking.istio.io", "gateways", "list"),
    ("networking.istio.io", "gateways", "watch"),
    ("networking.istio.io", "serviceentries", "list"),
    ("networking.istio.io", "serviceentries", "watch"),
    ("security.istio.io", "authorizationpolicies", "list"),
    ("security.istio.io", "authorizationpolicies", "watch"),
    ("security.istio.io", "peerauthentications", "list"),
    ("security.istio.io", "peerauthentications", "watch"),
    ("gateway.networking.k8s.io", "gateways", "list"),
    ("gateway.networking.k8s.io", "gateways", "watch"),
    ("authentication.k8s.io", "tokenreviews", "create"),
];

/// What the node agent reads: (apiGroup, resource, verb).
const ZTUNNEL_NEEDS: &[(&str, &str, &str)] = &[
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "namespaces", "get"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
];

/// Every document of the rendered file, typed by kind.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    jobs: Vec<Job>,
    /// Kinds in document order.
    kinds: Vec<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn rendered_text() -> String {
    let path = root().join(RENDERED_PATH);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Deserialises `doc` as `T`, and checks that serialising it back gives the
/// same document: a misspelt or misplaced field (which k8s-openapi would
/// silently drop) fails here.
fn typed<T: DeserializeOwned + Serialize>(index: usize, kind: &str, doc: serde_yaml::Value) -> T {
    let original: serde_json::Value = serde_json::to_value(&doc)
        .unwrap_or_else(|err| panic!("document {index} ({kind}) is not JSON-like: {err}"));
    let object: T = serde_json::from_value(original.clone())
        .unwrap_or_else(|err| panic!("document {index} is not a valid {kind}: {err}"));
    let back = serde_json::to_value(&object).expect("serialise");
    assert_eq!(
        back, original,
        "document {index} ({kind}) has fields the {kind} type does not know"
    );
    object
}

fn parse(text: &str) -> Manifests {
    let mut manifests = Manifests::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|err| panic!("document {index} is not YAML: {err}"));
        if doc.is_null() {
            continue;
        }
        let kind = doc
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_else(|| panic!("document {index} has no kind"))
            .to_owned();
        match kind.as_str() {
            "Namespace" => manifests.namespaces.push(typed(index, &kind, doc)),
            "ServiceAccount" => manifests.service_accounts.push(typed(index, &kind, doc)),
            "ClusterRole" => manifests.cluster_roles.push(typed(index, &kind, doc)),
            "ClusterRoleBinding" => manifests
                .cluster_role_bindings
                .push(typed(index, &kind, doc)),
            "Role" => manifests.roles.push(typed(index, &kind, doc)),
            "RoleBinding" => manifests.role_bindings.push(typed(index, &kind, doc)),
            "ConfigMap" => manifests.config_maps.push(typed(index, &kind, doc)),
            "Deployment" => manifests.deployments.push(typed(index, &kind, doc)),
            "DaemonSet" => manifests.daemon_sets.push(typed(index, &kind, doc)),
            "Service" => manifests.services.push(typed(index, &kind, doc)),
            "Job" => manifests.jobs.push(typed(index, &kind, doc)),
            other => panic!("document {index}: unexpected kind {other}"),
        }
        manifests.kinds.push(kind);
    }
    manifests
}

fn rule_covers(rule: &PolicyRule, group: &str, resource: &str, verb: &str) -> bool {
    let has = |list: &Option<Vec<String>>, want: &str| {
        list.iter()
            .flatten()
            .any(|item| item == want || item == "*")
    };
    has(&rule.api_groups, group)
        && has(&rule.resources, resource)
        && rule.verbs.iter().any(|v| v == verb || v == "*")
}

/// The rules bound cluster-wide to ServiceAccount `name` of the release
/// namespace.
fn rules_of(manifests: &Manifests, name: &str) -> Vec<PolicyRule> {
    let mut rules = Vec::new();
    for binding in &manifests.cluster_role_bindings {
        let bound = binding.subjects.iter().flatten().any(|subject| {
            subject.kind == "ServiceAccount"
                && subject.name == name
                && subject.namespace.as_deref() == Some(RELEASE_NAMESPACE)
        });
        if !bound {
            continue;
        }
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(
            binding.role_ref.api_group.as_deref(),
            Some("rbac.authorization.k8s.io")
        );
        let role = manifests
            .cluster_roles
            .iter()
            .find(|role| role.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
            .unwrap_or_else(|| panic!("binding refers to missing {}", binding.role_ref.name));
        rules.extend(role.rules.iter().flatten().cloned());
    }
    rules
}

/// The rules bound by RoleBindings of the release namespace to its
/// ServiceAccount `name`: access within that namespace only.
fn namespaced_rules_of(manifests: &Manifests, name: &str) -> Vec<PolicyRule> {
    let mut rules = Vec::new();
    for binding in &manifests.role_bindings {
        assert_eq!(
            binding.metadata.namespace.as_deref(),
            Some(RELEASE_NAMESPACE)
        );
        let bound = binding.subjects.iter().flatten().any(|subject| {
            subject.kind == "ServiceAccount"
                && subject.name == name
                && subject.namespace.as_deref() == Some(RELEASE_NAMESPACE)
        });
        if !bound {
            continue;
        }
        assert_eq!(
            binding.role_ref.kind, "Role",
            "a RoleBinding binds a Role here"
        );
        let role = manifests
            .roles
            .iter()
            .find(|role| {
                role.metadata.name.as_deref() == Some(binding.role_ref.name.as_str())
                    && role.metadata.namespace == binding.metadata.namespace
            })
            .unwrap_or_else(|| panic!("binding refers to missing Role {}", binding.role_ref.name));
        rules.extend(role.rules.iter().flatten().cloned());
    }
    rules
}

fn assert_access(manifests: &Manifests, service_account: &str, needs: &[(&str, &str, &str)]) {
    assert!(
        manifests.service_accounts.iter().any(|sa| {
            sa.metadata.name.as_deref() == Some(service_account)
                && sa.metadata.namespace.as_deref() == Some(RELEASE_NAMESPACE)
        }),
        "no ServiceAccount {RELEASE_NAMESPACE}/{service_account}"
    );
    let rules = rules_of(manifests, service_account);
    let missing: Vec<_> = needs
        .iter()
        .filter(|(group, resource, verb)| {
            !rules
                .iter()
                .any(|rule| rule_covers(rule, group, resource, verb))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ServiceAccount {service_account} lacks (apiGroup, resource, verb): {missing:?}"
    );
}

fn pod_spec<'a>(spec: Option<&'a PodSpec>, what: &str) -> &'a PodSpec {
    spec.unwrap_or_else(|| panic!("{what} has no pod spec"))
}

#[test]
fn rendered_file_is_a_fresh_render_of_the_chart() {
    let fresh = render_workspace(&root()).unwrap_or_else(|err| panic!("render: {err}"));
    assert!(
        fresh == rendered_text(),
        "{RENDERED_PATH} is out of date: run `cargo xtask render-deploy`"
    );
}

/// The Helm hooks: a fresh render, typed, each annotated as a pre-delete
/// hook; none in the manifest `kubectl apply` and `meshctl install` use.
/// The Job runs `meshctl uninstall --nodes-only` with the meshctl image
/// as the hook's own ServiceAccount (its Role is checked against meshctl's
/// requests in meshctl's tests).
#[test]
fn the_pre_delete_hook_removes_capture_with_meshctl() {
    let path = root().join(HOOKS_PATH);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fresh = render_workspace_hooks(&root()).unwrap_or_else(|err| panic!("render: {err}"));
    assert!(
        fresh == text,
        "{HOOKS_PATH} is out of date: run `cargo xtask render-deploy`"
    );
    assert!(
        !rendered_text().contains("helm.sh/hook"),
        "a Helm hook in {RENDERED_PATH} would run at `kubectl apply`"
    );
    let hooks = parse(&text);
    assert_eq!(
        hooks.kinds,
        ["ServiceAccount", "Role", "RoleBinding", "Job"]
    );
    let annotations = [
        hooks.service_accounts[0].metadata.annotations.as_ref(),
        hooks.roles[0].metadata.annotations.as_ref(),
        hooks.role_bindings[0].metadata.annotations.as_ref(),
        hooks.jobs[0].metadata.annotations.as_ref(),
    ];
    for annotation in annotations {
        let annotation = annotation.expect("hook annotations");
        assert_eq!(annotation["helm.sh/hook"], "pre-delete");
    }
    let job = &hooks.jobs[0];
    let weight = |a: Option<&std::collections::BTreeMap<String, String>>| -> i32 {
        a.and_then(|a| a.get("helm.sh/hook-weight"))
            .and_then(|w| w.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        weight(hooks.roles[0].metadata.annotations.as_ref())
            < weight(job.metadata.annotations.as_ref()),
        "the Role exists before the Job runs"
    );
    let spec = pod_spec(
        job.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
        "Job",
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("mesh-uninstall"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let container = &spec.containers[0];
    assert!(
        container
            .image
            .as_deref()
            .is_some_and(|i| i.contains("/meshctl:")),
        "{:?}",
        container.image
    );
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[..2], ["uninstall", "--nodes-only"]);
    assert!(args.contains(&format!("--namespace={RELEASE_NAMESPACE}")));
    // The hook's binding: its Role, in the release namespace.
    let rules = namespaced_rules_of(&hooks, "mesh-uninstall");
    for (group, resource, verb) in [
        ("apps", "daemonsets", "delete"),
        ("apps", "daemonsets", "patch"),
        ("", "pods", "list"),
    ] {
        assert!(
            rules.iter().any(|r| rule_covers(r, group, resource, verb)),
            "{verb} {group}/{resource}: {rules:?}"
        );
    }
}

#[test]
fn every_document_is_a_typed_kubernetes_object() {
    let manifests = parse(&rendered_text());
    assert_eq!(
        manifests.kinds.first().map(String::as_str),
        Some("Namespace"),
        "the namespace comes first, so `kubectl apply -f` creates it before its contents"
    );
    assert_eq!(manifests.namespaces.len(), 1);
    assert_eq!(
        manifests.namespaces[0].metadata.name.as_deref(),
        Some(RELEASE_NAMESPACE)
    );
    assert_eq!(manifests.deployments.len(), 1);
    assert_eq!(manifests.daemon_sets.len(), 1);
    assert_eq!(manifests.services.len(), 1);
}

#[test]
fn control_plane_and_ztunnel_have_the_access_they_need() {
    let manifests = parse(&rendered_text());
    assert_access(&manifests, "mesh-control", CONTROL_NEEDS);
    assert_access(&manifests, "ztunnel", ZTUNNEL_NEEDS);
    // The node agent gets no more than it needs: no writes anywhere.
    for rule in rules_of(&manifests, "ztunnel") {
        assert!(
            rule.verbs
                .iter()
                .all(|verb| ["get", "list", "watch"].contains(&verb.as_str())),
            "ztunnel may only read: {rule:?}"
        );
    }

    let control = &manifests.deployments[0];
    let spec = pod_spec(control.spec.template.spec.as_ref(), "Deployment");
    assert_eq!(spec.service_account_name.as_deref(), Some("mesh-control"));
    let ztunnel = &manifests.daemon_sets[0];
    let spec = pod_spec(ztunnel.spec.template.spec.as_ref(), "DaemonSet");
    assert_eq!(spec.service_account_name.as_deref(), Some("ztunnel"));
}

/// The access the control plane's Kubernetes watchers use, from the code
/// itself: adding a watched kind without granting it fails here, not in a
/// cluster.
#[test]
fn control_plane_cluster_role_grants_what_its_watchers_use() {
    let manifests = parse(&rendered_text());
    let needs: Vec<(&str, &str, &str)> = mesh_control::source::kubernetes::WATCHED
        .iter()
        .flat_map(|watched| {
            watched
                .verbs
                .iter()
                .map(|verb| (watched.group, watched.resource, *verb))
        })
        .collect();
    assert!(needs.contains(&("", "pods", "watch")), "{needs:?}");
    assert_access(&manifests, "mesh-control", &needs);
    // TokenReview of the node agents' service-account tokens.
    let review: Vec<(&str, &str, &str)> = mesh_control::auth::token_review::API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    assert!(
        review.contains(&("authentication.k8s.io", "tokenreviews", "create")),
        "{review:?}"
    );
    assert_access(&manifests, "mesh-control", &review);
    // Waypoint Deployments, Services, ServiceAccounts and Gateway status.
    let waypoints: Vec<(&str, &str, &str)> = mesh_control::waypoint_deploy::API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    for need in [
        ("apps", "deployments", "patch"),
        ("gateway.networking.k8s.io", "gateways/status", "patch"),
    ] {
        assert!(waypoints.contains(&need), "{need:?}: {waypoints:?}");
    }
    assert_access(&manifests, "mesh-control", &waypoints);
    // The routes' status.
    let routes: Vec<(&str, &str, &str)> = mesh_control::route_status::API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    assert!(
        routes.contains(&("gateway.networking.k8s.io", "httproutes/status", "patch")),
        "{routes:?}"
    );
    assert_access(&manifests, "mesh-control", &routes);
    // The mesh root, published for proxies to verify 15012.
    let root: Vec<(&str, &str, &str)> = mesh_control::root_cert::API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    assert!(root.contains(&("", "configmaps", "patch")), "{root:?}");
    assert_access(&manifests, "mesh-control", &root);
}

/// Leader election's Lease and the shared CA's Secret, from the code's
/// lists, are granted in the control plane's namespace only (a Role), and
/// the chart passes the timing, the pod's name as identity and the Secret.
#[test]
fn control_plane_replicas_elect_a_leader_with_a_lease_in_their_namespace() {
    let manifests = parse(&rendered_text());
    let needs: Vec<(&str, &str, &str)> = mesh_control::leader::API_ACCESS
        .iter()
        .chain(mesh_control::ca_secret::API_ACCESS)
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    assert!(
        needs.contains(&("coordination.k8s.io", "leases", "update")),
        "{needs:?}"
    );
    let rules = namespaced_rules_of(&manifests, "mesh-control");
    let missing: Vec<_> = needs
        .iter()
        .filter(|(g, r, v)| !rules.iter().any(|rule| rule_covers(rule, g, r, v)))
        .collect();
    assert!(missing.is_empty(), "the Role lacks {missing:?}");
    for rule in rules_of(&manifests, "mesh-control") {
        assert!(
            !rule_covers(&rule, "coordination.k8s.io", "leases", "update")
                && !rule_covers(&rule, "", "secrets", "create"),
            "leases or secret writes are granted cluster-wide: {rule:?}"
        );
    }
    let spec = pod_spec(
        manifests.deployments[0].spec.template.spec.as_ref(),
        "Deployment",
    );
    let container = &spec.containers[0];
    let args = container.args.clone().unwrap_or_default();
    for flag in [
        "--ca-secret=istio-ca-secret",
        "--leader-election-lease-seconds=",
        "--leader-election-renew-deadline-seconds=",
        "--leader-election-retry-seconds=",
    ] {
        assert!(args.iter().any(|a| a.starts_with(flag)), "{flag}: {args:?}");
    }
    let pod_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(pod_name, Some("metadata.name"));
}

/// Proxies reach the control plane only over TLS (15012), verified with
/// the root the control plane publishes: no token crosses the network in
/// plaintext.
#[test]
fn proxies_dial_the_control_plane_over_tls_with_the_published_root() {
    let text = rendered_text();
    assert!(
        !text.contains("svc:15010"),
        "a proxy dials plaintext 15010:\n{text}"
    );
    let ztunnel = format!(
        "--xds-address=https://mesh-control.{}.svc:15012",
        RELEASE_NAMESPACE
    );
    assert!(text.contains(&ztunnel), "{ztunnel} missing");
    let root = format!(
        "--xds-root-cert={}/{}",
        mesh_control::root_cert::MOUNT_DIR,
        mesh_control::root_cert::KEY
    );
    assert!(text.contains(&root), "{root} missing");
    assert!(
        text.contains(&format!("name: {}", mesh_control::root_cert::CONFIG_MAP)),
        "the DaemonSet mounts the published root"
    );
    assert!(text.contains("--waypoint-xds-address=https://"));
}

/// The control plane deploys waypoints with the chart's waypoint image and
/// resources, and accepts their tokens only as waypoints (own identity).
#[test]
fn control_plane_deploys_waypoints_from_the_chart_values() {
    let manifests = parse(&rendered_text());
    let spec = pod_spec(
        manifests.deployments[0].spec.template.spec.as_ref(),
        "Deployment",
    );
    let args = spec.containers[0].args.clone().unwrap_or_default();
    let control_image = spec.containers[0].image.clone().unwrap_or_default();
    let (hub_and_name, tag) = control_image.rsplit_once(':').expect("tagged image");
    let hub = hub_and_name.rsplit_once('/').expect("hub/name").0;
    for arg in [
        "--deploy-waypoints".to_owned(),
        format!("--waypoint-image={hub}/waypoint:{tag}"),
        "--waypoint-cpu-request=100m".to_owned(),
        "--waypoint-memory-limit=512Mi".to_owned(),
        format!("--waypoint-xds-address=https://mesh-control.{RELEASE_NAMESPACE}.svc:15012"),
        "--waypoint-token-audience=istio-ca".to_owned(),
        "--token-review-waypoint-service-account=*/*".to_owned(),
    ] {
        assert!(args.contains(&arg), "{arg}: {args:?}");
    }
    // Waypoints are never accepted as node agents (node-wide signing).
    let node_agents: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--token-review-service-account="))
        .collect();
    assert_eq!(
        node_agents,
        [&format!(
            "--token-review-service-account={RELEASE_NAMESPACE}/ztunnel"
        )]
    );
}

#[test]
fn control_plane_watches_the_api_and_reviews_node_agent_tokens() {
    let manifests = parse(&rendered_text());
    let spec = pod_spec(
        manifests.deployments[0].spec.template.spec.as_ref(),
        "Deployment",
    );
    let args = spec.containers[0].args.clone().unwrap_or_default();
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--config-dir")),
        "--config-dir and --kubernetes are exclusive: {args:?}"
    );
    // Node agents are authenticated by TokenReview of the token the
    // DaemonSet projects (service account ztunnel, audience istio-ca).
    for arg in [
        "--token-review",
        "--token-review-service-account=istio-system/ztunnel",
        "--token-review-audience=istio-ca",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg}: {args:?}");
    }
    let ztunnel = pod_spec(
        manifests.daemon_sets[0].spec.template.spec.as_ref(),
        "DaemonSet",
    );
    let audience = ztunnel
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .and_then(|t| t.audience.as_deref());
    assert_eq!(audience, Some("istio-ca"));
}

/// The node agent's watches, from the code, against its ClusterRole; and
/// the host paths its pod discovery reads.
#[test]
fn ztunnel_watches_its_nodes_pods_with_the_access_and_mounts_it_needs() {
    let manifests = parse(&rendered_text());
    let needs: Vec<(&str, &str, &str)> = ztunnel::kube_pods::API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |verb| (*group, *resource, *verb))
        })
        .collect();
    assert!(needs.contains(&("", "pods", "watch")), "{needs:?}");
    assert_access(&manifests, "ztunnel", &needs);

    let spec = pod_spec(
        manifests.daemon_sets[0].spec.template.spec.as_ref(),
        "DaemonSet",
    );
    let container = &spec.containers[0];
    let args = container.args.clone().unwrap_or_default();
    for arg in [
        "--kubernetes",
        "--cgroup-root=/sys/fs/cgroup",
        "--proc-root=/host/proc",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg}: {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--node-pods")),
        "--node-pods and --kubernetes are exclusive: {args:?}"
    );
    let host_path = |name: &str| {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mount = |path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    let proc_mount = mount("/host/proc");
    assert_eq!(host_path(&proc_mount.name).as_deref(), Some("/proc"));
    assert_eq!(proc_mount.read_only, Some(true), "host /proc is read-only");
    assert_eq!(
        host_path(&mount("/sys/fs/cgroup").name).as_deref(),
        Some("/sys/fs/cgroup")
    );
}

#[test]
fn ztunnel_daemonset_runs_on_every_node_with_what_ebpf_needs() {
    let manifests = parse(&rendered_text());
    let ds = &manifests.daemon_sets[0];
    let spec = pod_spec(ds.spec.template.spec.as_ref(), "DaemonSet");
    assert_eq!(spec.host_network, Some(true));
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let host_paths: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/var/run/netns"] {
        assert!(
            host_paths.contains(&path),
            "hostPath {path}: {host_paths:?}"
        );
    }
    let container = &spec.containers[0];
    let caps = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "NET_RAW"] {
        assert!(caps.iter().any(|c| c == cap), "capability {cap}: {caps:?}");
    }
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("HTTP readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );
    let ports: Vec<i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    for port in [15008, 15020, 15000] {
        assert!(ports.contains(&port), "port {port}: {ports:?}");
    }

    // Lifecycle: one node at a time, and a drain that ends before the
    // kubelet's grace period does.
    let strategy = ds.spec.update_strategy.as_ref();
    assert_eq!(
        strategy.and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    assert_eq!(
        strategy
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.clone()),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let args = container.args.clone().unwrap_or_default();
    let drain: i64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-seconds="))
        .unwrap_or_else(|| panic!("no --drain-seconds: {args:?}"))
        .parse()
        .expect("--drain-seconds is a number");
    let grace = spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        0 < drain && drain < grace,
        "drain {drain}s must end before the grace period {grace}s"
    );

    let service = &manifests.services[0];
    let ports: Vec<(Option<&str>, i32)> = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| (p.name.as_deref(), p.port))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("grpc-xds"), 15010),
            (Some("https-ca"), 15012),
            (Some("http-monitoring"), 15014)
        ]
    );
}
