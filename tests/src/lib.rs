//! Shared fixtures of the end-to-end tests: a lab that tears itself down on
//! drop, and the paths of the workspace binaries it runs.

use std::path::PathBuf;

use mesh_lab::{LabState, UpOptions};

/// A lab that is brought down when dropped, also when the test panics.
pub struct Lab {
    /// The running lab.
    pub state: LabState,
}

impl Lab {
    /// Brings up lab `name` from `manifests` on `nodes` nodes.
    ///
    /// Panics with a clear message when not run as root: the lab needs to
    /// create namespaces, cgroups and eBPF programs.
    pub fn up(name: &str, manifests: Vec<PathBuf>, nodes: usize) -> Self {
        require_root();
        let state = mesh_lab::up(&UpOptions {
            name: name.to_owned(),
            manifests,
            nodes,
            app_binary: workspace_binary("lab-app"),
            ztunnel_binary: workspace_binary("ztunnel"),
            control_binary: workspace_binary("mesh-control"),
        })
        .unwrap_or_else(|err| panic!("lab {name} up: {err}"));
        Self { state }
    }

    /// Labels namespace `namespace` `istio.io/dataplane-mode=ambient` and
    /// waits until every ztunnel holds valid certificates for its pods.
    pub fn enrol_namespace(&mut self, namespace: &str) {
        self.state
            .set_label(
                &mesh_lab::mesh::LabelTarget::Namespace(namespace.to_owned()),
                mesh_config::node::DATAPLANE_MODE_LABEL,
                Some("ambient"),
            )
            .unwrap_or_else(|err| panic!("enrol {namespace}: {err}"));
        self.state
            .wait_for_certificates(std::time::Duration::from_secs(3))
            .unwrap_or_else(|err| panic!("certificates for {namespace}: {err}"));
    }

    /// Labels namespace `namespace` `istio.io/use-waypoint=<waypoint>`: its
    /// services' traffic goes through that waypoint.
    pub fn use_waypoint(&mut self, namespace: &str, waypoint: &str) {
        self.state
            .set_label(
                &mesh_lab::mesh::LabelTarget::Namespace(namespace.to_owned()),
                "istio.io/use-waypoint",
                Some(waypoint),
            )
            .unwrap_or_else(|err| panic!("bind {namespace} to waypoint {waypoint}: {err}"));
    }

    /// Labels pod `pod` `istio.io/dataplane-mode=none` (out of the mesh, a
    /// client from outside it) and returns it.
    pub fn opt_out(&mut self, pod: &str) -> mesh_lab::PodPlan {
        self.state
            .set_label(
                &mesh_lab::mesh::LabelTarget::Pod(pod.to_owned()),
                mesh_config::node::DATAPLANE_MODE_LABEL,
                Some("none"),
            )
            .unwrap_or_else(|err| panic!("opt {pod} out: {err}"));
        self.state
            .pod(pod)
            .unwrap_or_else(|err| panic!("pod {pod}: {err}"))
            .clone()
    }

    /// One `lab-app get` of `url` from pod `from` (`extra`: more of its
    /// arguments, such as `--connect-to`): whether it was a 2xx, the JSON
    /// body (`Null` when there is none), and everything it printed.
    pub fn get(
        &self,
        from: &mesh_lab::PodPlan,
        url: &str,
        extra: &[&str],
    ) -> (bool, serde_json::Value, String) {
        let mut args = vec!["get", url, "--timeout-ms", "5000"];
        args.extend(extra);
        let output = self
            .state
            .app_client(from, &args)
            .expect("client")
            .output()
            .expect("lab-app get");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        (
            output.status.success(),
            serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null),
            format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
        )
    }

    /// Brings up Istio's bookinfo sample.
    pub fn bookinfo(name: &str) -> Self {
        Self::up(name, vec![bookinfo_manifest()], 2)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(err) = mesh_lab::down(&self.state.plan.name) {
            eprintln!("lab {} down: {err}", self.state.plan.name);
        }
    }
}

/// Polls `check` every 200 ms until it holds, panicking with `what` and the
/// last error after `timeout` (config changes reach proxies within a
/// second in the lab; callers allow a few).
pub fn eventually(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(err) if std::time::Instant::now() > deadline => panic!("{what}: {err}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}

/// Istio's bookinfo platform manifest.
pub fn bookinfo_manifest() -> PathBuf {
    mesh_lab::istio_samples_dir().join("bookinfo/platform/bookinfo.yaml")
}

/// A binary of this workspace, from the same target directory as the test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` (cargo xtask test does)",
        path.display()
    );
    path
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab tests need root (namespaces, cgroups, eBPF); run `sudo cargo xtask test`"
    );
}
