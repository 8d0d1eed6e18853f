//! What a running lab is made of, saved as JSON in its run directory so
//! `status`, `exec` and tests can find pods without recomputing anything.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use serde::{Deserialize, Serialize};

use crate::{Error, LabPlan, PodPlan, Result, io_err, run_dir};

/// A lab that is up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    /// The plan it was built from.
    pub plan: LabPlan,
    /// The lab's cgroup (root of its tree).
    pub cgroup: PathBuf,
    /// PID of each pod's app, by `namespace/name`.
    pub app_pids: BTreeMap<String, u32>,
    /// The hosts file pods resolve Service names with.
    pub hosts_file: PathBuf,
    /// The stand-in app binary the pods run.
    pub app_binary: PathBuf,
    /// The node agent binary each node runs.
    pub ztunnel_binary: PathBuf,
    /// PID of each node's ztunnel, by node name.
    pub ztunnel_pids: BTreeMap<String, u32>,
    /// Whether ztunnels splice same-node HBONE connections in the kernel
    /// (on, as in production; turned off to measure what it gains).
    #[serde(default = "fast_path_default")]
    pub ztunnel_fast_path: bool,
    /// The control plane binary.
    pub control_binary: PathBuf,
    /// PID of the control plane.
    pub control_pid: Option<u32>,
}

fn fast_path_default() -> bool {
    true
}

impl LabState {
    /// Path of the state file of lab `lab`.
    pub fn path(lab: &str) -> PathBuf {
        run_dir(lab).join("state.json")
    }

    /// Loads the state of lab `lab`.
    pub fn load(lab: &str) -> Result<Self> {
        let path = Self::path(lab);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotUp(lab.to_owned(), path.display().to_string()));
            }
            Err(err) => return Err(io_err(format!("reading {}", path.display()))(err)),
        };
        serde_json::from_str(&text)
            .map_err(|err| Error::Invalid(format!("{}: {err}", path.display())))
    }

    /// Writes the state file.
    pub fn save(&self) -> Result<()> {
        let path = Self::path(&self.plan.name);
        let text =
            serde_json::to_string_pretty(self).map_err(|err| Error::Invalid(err.to_string()))?;
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Finds a pod by `name`, `namespace/name`, or a unique prefix of its name
    /// (so `productpage` finds `productpage-v1-0`).
    pub fn pod(&self, query: &str) -> Result<&PodPlan> {
        let pods = &self.plan.pods;
        if let Some(pod) = pods
            .iter()
            .find(|p| p.name == query || p.qualified_name() == query)
        {
            return Ok(pod);
        }
        let matches: Vec<&PodPlan> = pods.iter().filter(|p| p.name.starts_with(query)).collect();
        match matches.as_slice() {
            [pod] => Ok(pod),
            [] => Err(Error::Invalid(format!(
                "lab {} has no pod {query:?}",
                self.plan.name
            ))),
            many => Err(Error::Invalid(format!(
                "{query:?} matches several pods: {}",
                many.iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The cgroup of `pod`.
    pub fn pod_cgroup(&self, pod: &PodPlan) -> PathBuf {
        self.node_cgroup(pod.node)
            .join(format!("pod-{}-{}", pod.namespace, pod.name))
    }

    /// The cgroup of node `node` (pods and node agents live below it).
    pub fn node_cgroup(&self, node: usize) -> PathBuf {
        self.cgroup.join(&self.plan.nodes[node].name)
    }

    /// A command that runs `program` as `pod`: in its network namespace and cgroup.
    pub fn command_in_pod(
        &self,
        pod: &PodPlan,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let mut command = Command::new(program);
        crate::process::enter(&mut command, &pod.netns, &self.pod_cgroup(pod))?;
        Ok(command)
    }

    /// The waypoint binary: built next to ztunnel's.
    pub fn waypoint_binary(&self) -> PathBuf {
        self.ztunnel_binary.with_file_name("waypoint")
    }

    /// A `lab-app` client command (`get`, `tcp`) run from `pod`, resolving names as pods do.
    pub fn app_client(&self, pod: &PodPlan, args: &[&str]) -> Result<Command> {
        let mut command = self.command_in_pod(pod, &self.app_binary)?;
        command.args(args);
        if matches!(args.first(), Some(&"get" | &"tcp" | &"upgrade" | &"grpc")) {
            command
                .arg("--hosts")
                .arg(&self.hosts_file)
                .args(["--namespace", &pod.namespace]);
        }
        Ok(command)
    }

    /// Where `pod`'s app writes its log.
    pub fn pod_log(&self, pod: &PodPlan) -> PathBuf {
        log_path(&self.plan.name, pod)
    }
}

pub(crate) fn log_path(lab: &str, pod: &PodPlan) -> PathBuf {
    run_dir(lab)
        .join("logs")
        .join(format!("{}-{}.log", pod.namespace, pod.name))
}
