//! The container images and the manifests agree with the binaries:
//! `deploy/Dockerfile` has one target per binary the workspace builds,
//! copying that binary and starting it; every image the chart names is one
//! of those targets; and every flag the rendered manifests (and the
//! waypoint Deployments the control plane renders) pass to a container is
//! one its binary's `--help` lists. No container runtime, cluster or root
//! needed: the binaries run here with `--help`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    batch::v1::Job,
    core::v1::Container,
};
use k8s_openapi::serde::Deserialize as _;
use mesh_lab::deploy::{HOOKS_PATH, RENDERED_PATH};

/// The images, each named after its binary.
const IMAGES: &[(&str, &str)] = &[
    ("mesh-control", "mesh-control"),
    ("ztunnel", "ztunnel"),
    ("waypoint", "waypoint"),
    ("meshctl", "meshctl"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// `deploy/Dockerfile`'s targets, each with what it copies and runs.
fn dockerfile_targets() -> Vec<(String, Vec<String>, String)> {
    let text =
        std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut targets: Vec<(String, Vec<String>, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from.split(" AS ").nth(1).unwrap_or_default().to_owned();
            targets.push((name, Vec::new(), String::new()));
        } else if let (Some(copy), Some(target)) = (line.strip_prefix("COPY "), targets.last_mut())
        {
            target.1.push(copy.to_owned());
        } else if let (Some(entry), Some(target)) =
            (line.strip_prefix("ENTRYPOINT "), targets.last_mut())
        {
            target.2 = entry.to_owned();
        }
    }
    targets
}

/// Binary targets of the workspace's packages, from `cargo metadata`.
fn workspace_binaries() -> BTreeSet<String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_image_target_copies_and_starts_a_binary_of_the_workspace() {
    let targets = dockerfile_targets();
    let binaries = workspace_binaries();
    for (image, binary) in IMAGES {
        assert!(
            binaries.contains(*binary),
            "{binary} is not a workspace binary: {binaries:?}"
        );
        let (_, copies, entrypoint) = targets
            .iter()
            .find(|(name, _, _)| name == image)
            .unwrap_or_else(|| panic!("deploy/Dockerfile has no target {image}"));
        let copy = format!("bin/{binary} /usr/local/bin/{binary}");
        assert!(
            copies.contains(&copy),
            "target {image} lacks COPY {copy}: {copies:?}"
        );
        assert_eq!(
            entrypoint,
            &format!("[\"/usr/local/bin/{binary}\"]"),
            "target {image}"
        );
    }
    // The shared base copies the context's rootfs (libraries for scratch).
    let base = targets
        .iter()
        .find(|(name, _, _)| name == "base")
        .expect("target base");
    assert_eq!(base.1, ["rootfs/ /"]);
}

/// Every container of the rendered chart and its hooks, and the waypoint
/// container the control plane renders.
fn containers() -> Vec<Container> {
    let mut text = std::fs::read_to_string(root().join(RENDERED_PATH)).expect("rendered manifest");
    text.push_str(&std::fs::read_to_string(root().join(HOOKS_PATH)).expect("rendered hooks"));
    let mut containers = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let doc = serde_yaml::Value::deserialize(document).expect("YAML");
        let json = serde_json::to_value(&doc).expect("JSON-like");
        let spec = match json["kind"].as_str() {
            Some("Deployment") => {
                serde_json::from_value::<Deployment>(json)
                    .expect("Deployment")
                    .spec
                    .template
                    .spec
            }
            Some("DaemonSet") => {
                serde_json::from_value::<DaemonSet>(json)
                    .expect("DaemonSet")
                    .spec
                    .template
                    .spec
            }
            Some("Job") => serde_json::from_value::<Job>(json)
                .expect("Job")
                .spec
                .and_then(|s| s.template.spec),
            _ => None,
        };
        containers.extend(spec.into_iter().flat_map(|s| s.containers));
    }
    let gateway = mesh_control::waypoint_deploy::GatewayRef {
        api_version: "gateway.networking.k8s.io/v1".into(),
        namespace: "shop".into(),
        name: "waypoint".into(),
        uid: "uid".into(),
        role: mesh_control::waypoint_deploy::GatewayRole::Waypoint,
    };
    let template = mesh_control::waypoint_deploy::WaypointTemplate {
        image: "ghcr.io/mesh/waypoint:0.1.0".into(),
        image_pull_policy: "IfNotPresent".into(),
        cpu_request: "100m".into(),
        memory_request: "128Mi".into(),
        memory_limit: "512Mi".into(),
        xds_address: "https://mesh-control.istio-system.svc:15012".into(),
        token_audience: "istio-ca".into(),
        trust_domain: "cluster.local".into(),
        log_level: "info".into(),
        root_cert: Some("PEM".into()),
    };
    let waypoint = mesh_control::waypoint_deploy::render(&gateway, &template);
    containers.extend(
        waypoint
            .deployment
            .spec
            .template
            .spec
            .into_iter()
            .flat_map(|s| s.containers),
    );
    containers
}

/// The debug build of binary `name` beside this test's own directory,
/// built now if missing. An existing one is used as it is (a nested
/// `cargo build` from inside `cargo test` rebuilds for minutes): run
/// `cargo build -p mesh-control -p ztunnel -p waypoint -p meshctl` first
/// when their flags changed.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    if !path.exists() {
        // Each binary is its package's.
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", name, "--bin", name])
            .current_dir(root())
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {name}");
    }
    path
}

/// Whether `help` lists `flag` (not only a longer flag starting with it).
fn lists(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        help[at + flag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
    })
}

#[test]
fn every_flag_the_manifests_pass_is_one_the_binary_takes() {
    let containers = containers();
    let mut checked = BTreeSet::new();
    for container in &containers {
        let image = container.image.as_deref().expect("image");
        let name = image
            .rsplit('/')
            .next()
            .and_then(|n| n.split(':').next())
            .expect("<hub>/<name>:<tag>");
        let (_, binary_name) = IMAGES
            .iter()
            .find(|(image, _)| *image == name)
            .unwrap_or_else(|| panic!("image {image} is not built by deploy/Dockerfile"));
        assert!(
            container.command.is_none(),
            "{}: the image's entrypoint is its binary; pass args only",
            container.name
        );
        let args = container.args.clone().unwrap_or_default();
        // A leading word is a subcommand (`ztunnel run`).
        let subcommand: Vec<&str> = args
            .iter()
            .take_while(|a| !a.starts_with('-'))
            .map(String::as_str)
            .collect();
        let out = Command::new(binary(binary_name))
            .args(&subcommand)
            .arg("--help")
            .output()
            .unwrap_or_else(|err| panic!("running {binary_name} --help: {err}"));
        assert!(
            out.status.success(),
            "{binary_name} {subcommand:?} --help failed"
        );
        let help = String::from_utf8_lossy(&out.stdout);
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or(arg);
            assert!(
                lists(&help, flag),
                "{} passes {arg}, but `{binary_name} {} --help` has no {flag}",
                container.name,
                subcommand.join(" ")
            );
            checked.insert(format!("{binary_name} {flag}"));
        }
    }
    for expected in [
        "mesh-control --leader-election-lease-seconds",
        "mesh-control --ca-secret",
        "ztunnel --pin-dir",
        "waypoint --xds-root-cert",
        "meshctl --nodes-only",
    ] {
        assert!(
            checked.contains(expected),
            "{expected} not checked: {checked:?}"
        );
    }
}
