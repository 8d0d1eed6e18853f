//! The mesh in the lab: one ztunnel per node, fed the node's pods (with
//! their enrolment computed from namespace and pod labels) through a file it
//! watches, the lab's stand-in for Istio's CNI agent.

use std::{
    fs,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use mesh_config::node::{NodePod, NodePods, is_enrolled};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{Error, LabState, Result, io_err, netns::NETNS_DIR, pin_dir, process, run_dir};

/// What a label change applies to.
#[derive(Clone, Debug)]
pub enum LabelTarget {
    /// A namespace, by name.
    Namespace(String),
    /// A pod, by name, `namespace/name` or unique prefix.
    Pod(String),
}

impl LabState {
    /// The file node `node`'s ztunnel watches.
    pub fn node_pods_file(&self, node: usize) -> PathBuf {
        run_dir(&self.plan.name).join(format!("{}-pods.json", self.plan.nodes[node].name))
    }

    /// bpffs directory of node `node`'s capture pins.
    pub fn node_pin_dir(&self, node: usize) -> PathBuf {
        pin_dir(&self.plan.name).join(&self.plan.nodes[node].name)
    }

    /// The cgroup node `node`'s ztunnel runs in (outside every pod's).
    pub fn ztunnel_cgroup(&self, node: usize) -> PathBuf {
        self.node_cgroup(node).join("ztunnel")
    }

    /// Where node `node`'s ztunnel logs (including its access records).
    pub fn ztunnel_log(&self, node: usize) -> PathBuf {
        run_dir(&self.plan.name)
            .join("logs")
            .join(format!("ztunnel-{}.log", self.plan.nodes[node].name))
    }

    /// A command that runs on node `node`: in its network namespace and in
    /// ztunnel's cgroup, so it is never captured.
    pub fn command_on_node(
        &self,
        node: usize,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<std::process::Command> {
        let mut command = std::process::Command::new(program);
        process::enter(
            &mut command,
            &self.plan.nodes[node].netns,
            &self.ztunnel_cgroup(node),
        )?;
        Ok(command)
    }

    /// Scrapes node `node`'s ztunnel metrics (Prometheus text).
    pub fn ztunnel_metrics(&self, node: usize) -> Result<String> {
        self.get_on_node(node, "http://127.0.0.1:15020/metrics")
    }

    /// Node `node`'s ztunnel's `/config_dump` (JSON): the workloads and
    /// services it learned from the control plane.
    pub fn ztunnel_config_dump(&self, node: usize) -> Result<serde_json::Value> {
        let text = self.get_on_node(node, "http://127.0.0.1:15000/config_dump")?;
        serde_json::from_str(&text).map_err(|err| Error::Invalid(format!("config_dump: {err}")))
    }

    /// Waits until every ztunnel holds a valid certificate for each identity
    /// it serves (at least one).
    pub fn wait_for_certificates(&self, timeout: Duration) -> Result<()> {
        self.wait_for_ztunnels(timeout, |_, dump| {
            dump["certificates"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "valid"))
        })
    }

    /// Waits until every ztunnel's view of workloads satisfies `done`
    /// (called with the node and that node's `/config_dump`).
    pub fn wait_for_ztunnels(
        &self,
        timeout: Duration,
        done: impl Fn(usize, &serde_json::Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for node in 0..self.plan.nodes.len() {
            loop {
                let dump = self.ztunnel_config_dump(node)?;
                if done(node, &dump) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Invalid(format!(
                        "ztunnel on {} did not converge within {timeout:?}",
                        self.plan.nodes[node].name
                    )));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Waits until every waypoint pod answers ready (its config arrived and
    /// it holds its certificate).
    pub fn wait_for_waypoints(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for pod in self.plan.pods.iter().filter(|p| p.waypoint().is_some()) {
            let url = format!("http://{}:15021/healthz/ready", pod.ip);
            loop {
                match self.get_on_node(pod.node, &url) {
                    Ok(_) => break,
                    Err(err) if Instant::now() > deadline => {
                        return Err(Error::Invalid(format!(
                            "waypoint {} not ready after {timeout:?}: {err}",
                            pod.qualified_name()
                        )));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        Ok(())
    }

    /// The Prometheus text of waypoint pod `pod`.
    pub fn waypoint_metrics(&self, pod: &crate::PodPlan) -> Result<String> {
        self.get_on_node(pod.node, &format!("http://{}:15020/metrics", pod.ip))
    }

    pub(crate) fn get_on_node(&self, node: usize, url: &str) -> Result<String> {
        let output = self
            .command_on_node(node, &self.app_binary)?
            .args(["get", url])
            .output()
            .map_err(io_err(format!("running lab-app get {url}")))?;
        if !output.status.success() {
            return Err(Error::Invalid(format!(
                "GET {url} on {}: {}",
                self.plan.nodes[node].name,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Whether `pod` is enrolled under the current labels.
    pub fn is_enrolled(&self, pod: &crate::PodPlan) -> bool {
        let empty = Default::default();
        let namespace_labels = self.plan.namespaces.get(&pod.namespace).unwrap_or(&empty);
        is_enrolled(namespace_labels, &pod.labels)
    }

    /// Writes every node's pods file; ztunnel picks changes up within its
    /// watch interval. Written to a temporary file and renamed, so ztunnel
    /// never reads half a file.
    pub fn write_node_pods(&self) -> Result<()> {
        for (index, node) in self.plan.nodes.iter().enumerate() {
            let pods = NodePods {
                node: node.name.clone(),
                pods: self
                    .plan
                    .pods
                    .iter()
                    .filter(|pod| pod.node == index)
                    .map(|pod| NodePod {
                        name: pod.name.clone(),
                        namespace: pod.namespace.clone(),
                        ip: pod.ip,
                        netns: PathBuf::from(NETNS_DIR).join(&pod.netns),
                        cgroup: self.pod_cgroup(pod),
                        service_account: pod.service_account.clone(),
                        enrolled: self.is_enrolled(pod),
                    })
                    .collect(),
            };
            let path = self.node_pods_file(index);
            let tmp = path.with_extension("json.tmp");
            let text = serde_json::to_string_pretty(&pods)
                .map_err(|err| Error::Invalid(err.to_string()))?;
            fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
            fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) label `key` on `target`, saves the
    /// state and tells the ztunnels.
    pub fn set_label(
        &mut self,
        target: &LabelTarget,
        key: &str,
        value: Option<&str>,
    ) -> Result<()> {
        let labels = match target {
            LabelTarget::Namespace(name) => {
                self.plan.namespaces.get_mut(name).ok_or_else(|| {
                    Error::Invalid(format!("lab {} has no namespace {name:?}", self.plan.name))
                })?
            }
            LabelTarget::Pod(query) => {
                let name = self.pod(query)?.qualified_name();
                let pod = self
                    .plan
                    .pods
                    .iter_mut()
                    .find(|p| p.qualified_name() == name)
                    .ok_or_else(|| Error::Invalid(format!("no pod {name}")))?;
                &mut pod.labels
            }
        };
        match value {
            Some(value) => labels.insert(key.to_owned(), value.to_owned()),
            None => labels.remove(key),
        };
        self.save()?;
        self.write_cluster_state()?;
        self.write_node_pods()
    }

    /// Deletes a pod as Kubernetes would: its processes, cgroup, namespace
    /// (and veth and route) go, its Service endpoints are withdrawn, and its
    /// node's ztunnel is told.
    pub fn delete_pod(&mut self, query: &str) -> Result<()> {
        let pod = self.pod(query)?.clone();
        crate::cgroup::kill_and_remove(&self.pod_cgroup(&pod))?;
        if let Some(pid) = self.app_pids.remove(&pod.qualified_name()) {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        crate::netns::delete(&pod.netns)?;
        self.plan
            .pods
            .retain(|p| p.qualified_name() != pod.qualified_name());
        let mut lb = mesh_ebpf_loader::lab_lb::LabServiceLb::open(&pin_dir(&self.plan.name))?;
        for svc in &mut self.plan.services {
            for port in &mut svc.ports {
                let before = port.endpoints.len();
                port.endpoints.retain(|e| *e.ip() != pod.ip);
                if port.endpoints.len() != before {
                    lb.set_service(
                        std::net::SocketAddrV4::new(svc.vip, port.port),
                        &port.endpoints,
                    )?;
                }
            }
        }
        self.save()?;
        self.write_cluster_state()?;
        self.write_node_pods()
    }

    /// Starts node `node`'s ztunnel and waits until it serves: its admin
    /// endpoint answers only once capture is installed (a pin left by an
    /// earlier process proves nothing about this one).
    pub fn start_ztunnel(&mut self, node: usize) -> Result<u32> {
        let name = self.plan.nodes[node].name.clone();
        let log_path = self.ztunnel_log(node);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let mut command = std::process::Command::new(&self.ztunnel_binary);
        process::enter(
            &mut command,
            &self.plan.nodes[node].netns,
            &self.ztunnel_cgroup(node),
        )?;
        process::detach(&mut command);
        command
            .arg("run")
            .arg("--node-pods")
            .arg(self.node_pods_file(node))
            .arg("--pods-cgroup")
            .arg(self.node_cgroup(node))
            .arg("--pin-dir")
            .arg(self.node_pin_dir(node))
            // The node's own address plays the kubelet's for health probes.
            .arg("--probe-source")
            .arg(self.plan.nodes[node].ip.to_string())
            .arg("--node-name")
            .arg(&name)
            .arg(format!("--same-node-fast-path={}", self.ztunnel_fast_path))
            .arg("--xds-address")
            .arg(self.control_xds_url())
            .arg("--xds-root-cert")
            .arg(self.control_root_cert())
            .arg("--xds-token-file")
            .arg(self.node_token_file(node))
            .args(std::env::var_os("MESH_EBPF_DEBUG_LOGS").map(|_| "--ebpf-debug-logs"))
            // Short-lived certificates, to watch rotation (tests, demos).
            .args(
                std::env::var("MESH_LAB_CERT_TTL")
                    .ok()
                    .map(|ttl| format!("--workload-cert-ttl={ttl}")),
            )
            .env(
                "RUST_LOG",
                std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("duplicating log fd"))?)
            .stderr(log);
        let pid = command
            .spawn()
            .map_err(io_err(format!("starting ztunnel on {name}")))?
            .id();
        self.ztunnel_pids.insert(name.clone(), pid);
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ztunnel_config_dump(node).is_err() {
            if Instant::now() > deadline || !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                // A failed `up` removes the run directory, log included: carry
                // the log's last lines in the error.
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(6)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(Error::App {
                    pod: format!("ztunnel on {name}"),
                    message: format!("did not start serving:\n{}", tail.join("\n")),
                    log: log_path.display().to_string(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(pid)
    }

    /// Stops node `node`'s ztunnel (SIGTERM) and waits for it to exit.
    /// Capture stays installed: the node's enrolled pods are cut off until
    /// the next [`start_ztunnel`](Self::start_ztunnel).
    pub fn stop_ztunnel(&mut self, node: usize) -> Result<()> {
        let name = self.plan.nodes[node].name.clone();
        let Some(pid) = self.ztunnel_pids.remove(&name) else {
            return Ok(());
        };
        let pid = Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Reap it if we are its parent; otherwise watch /proc.
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Its in-pod listeners die with it; wait until the kernel agrees, so
        // callers observe a node whose pods are really cut off.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.ztunnel_listeners_remain(node) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.save()
    }

    /// Whether any pod of `node` still has one of ztunnel's listeners open,
    /// read from the pod's own socket table.
    fn ztunnel_listeners_remain(&self, node: usize) -> bool {
        use mesh_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
        self.plan.pods.iter().filter(|p| p.node == node).any(|pod| {
            let Some(pid) = self.app_pids.get(&pod.qualified_name()) else {
                return false;
            };
            let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
            crate::up::listening_ports(&table)
                .iter()
                .any(|port| [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(port))
        })
    }
}
