//! Bringing a lab up.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddrV4,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use mesh_ebpf_loader::{bpffs, lab_lb::LabServiceLb};

use crate::{
    Error, LabPlan, LabState, PodPlan, PortProtocol, Result, cgroup, io_err, netns, pin_dir, plan,
    process, run_dir, state::log_path,
};

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Lab name (see [`crate::validate_name`]).
    pub name: String,
    /// Manifest files or directories.
    pub manifests: Vec<PathBuf>,
    /// Number of nodes (1 or 2).
    pub nodes: usize,
    /// The stand-in app binary every pod runs.
    pub app_binary: PathBuf,
    /// The node agent every node runs.
    pub ztunnel_binary: PathBuf,
    /// The control plane.
    pub control_binary: PathBuf,
}

/// Builds the lab described by `options`, replacing any lab of the same name.
///
/// On failure everything created so far is removed again.
pub fn up(options: &UpOptions) -> Result<LabState> {
    crate::validate_name(&options.name)?;
    for (binary, package) in [
        (&options.app_binary, "lab-app"),
        (&options.ztunnel_binary, "ztunnel"),
        (&options.control_binary, "mesh-control"),
    ] {
        if !binary.is_file() {
            return Err(Error::Invalid(format!(
                "{} not found (build it with `cargo build -p {package}`)",
                binary.display()
            )));
        }
    }
    let mut manifests = mesh_config::Manifests::default();
    for path in &options.manifests {
        let loaded = if path.is_dir() {
            mesh_config::load_dir(path)
        } else {
            mesh_config::load_file(path)
        };
        if let Some(first) = loaded.errors.first() {
            return Err(Error::Config(format!(
                "{first} ({} error(s) in all)",
                loaded.errors.len()
            )));
        }
        manifests.extend(loaded.manifests);
    }
    plan::add_waypoints(&mut manifests);
    plan::add_ingress_gateway(&mut manifests);
    plan::add_kube_ingress_gateways(&mut manifests);
    let plan = plan::plan(&options.name, options.nodes, &manifests)?;
    crate::down(&options.name)?;
    build(plan, &manifests.services, options).inspect_err(|_| {
        if let Err(err) = crate::down(&options.name) {
            tracing::warn!(%err, "cleaning up after a failed lab up");
        }
    })
}

fn build(
    plan: LabPlan,
    services: &[k8s_openapi::api::core::v1::Service],
    options: &UpOptions,
) -> Result<LabState> {
    let run = run_dir(&plan.name);
    fs::create_dir_all(run.join("logs")).map_err(io_err(format!("creating {}", run.display())))?;
    let state = LabState {
        cgroup: cgroup::lab_cgroup(&plan.name)?,
        hosts_file: run.join("hosts"),
        app_binary: options
            .app_binary
            .canonicalize()
            .map_err(io_err("resolving the app binary path"))?,
        app_pids: BTreeMap::new(),
        ztunnel_binary: options
            .ztunnel_binary
            .canonicalize()
            .map_err(io_err("resolving the ztunnel binary path"))?,
        ztunnel_pids: BTreeMap::new(),
        ztunnel_fast_path: true,
        control_binary: options
            .control_binary
            .canonicalize()
            .map_err(io_err("resolving the control plane binary path"))?,
        control_pid: None,
        plan,
    };
    // Save early so `status` and `down` see a half-built lab too.
    state.save()?;
    build_nodes(&state)?;
    for pod in &state.plan.pods {
        build_pod(&state, pod)?;
    }
    write_hosts(&state)?;
    install_services(&state)?;
    let mut state = state;
    for pod in &state.plan.pods {
        let pid = start_app(&state, pod)?;
        state.app_pids.insert(pod.qualified_name(), pid);
    }
    state.save()?;
    for pod in &state.plan.pods {
        wait_listening(&state, pod)?;
    }
    crate::cluster::write_initial(&state, services, &options.manifests)?;
    state.write_tokens()?;
    state.start_control()?;
    state.write_node_pods()?;
    for node in 0..state.plan.nodes.len() {
        state.start_ztunnel(node)?;
    }
    Ok(state)
}

fn build_nodes(state: &LabState) -> Result<()> {
    let nodes = &state.plan.nodes;
    for (i, node) in nodes.iter().enumerate() {
        netns::create(&node.netns)?;
        cgroup::create(&state.node_cgroup(i))?;
        cgroup::create(&state.ztunnel_cgroup(i))?;
        netns::sysctl_in(&node.netns, &["net.ipv4.ip_forward=1"])?;
    }
    if let [only] = nodes.as_slice() {
        // No peer to link to, but the node's address must still exist: the
        // control plane listens on it and probes come from it.
        netns::ip_in(
            &only.netns,
            &["addr", "add", &format!("{}/32", only.ip), "dev", "lo"],
        )?;
    }
    if let [a, b] = nodes.as_slice() {
        netns::ip_in(
            &a.netns,
            &[
                "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", &b.netns,
            ],
        )?;
        for (node, peer) in [(a, b), (b, a)] {
            netns::ip_in(
                &node.netns,
                &["addr", "add", &format!("{}/24", node.ip), "dev", "eth1"],
            )?;
            netns::ip_in(&node.netns, &["link", "set", "eth1", "up"])?;
            netns::ip_in(
                &node.netns,
                &[
                    "route",
                    "add",
                    &format!("{}/24", peer.pod_cidr),
                    "via",
                    &peer.ip.to_string(),
                ],
            )?;
        }
    }
    Ok(())
}

fn build_pod(state: &LabState, pod: &PodPlan) -> Result<()> {
    let node = &state.plan.nodes[pod.node];
    netns::create(&pod.netns)?;
    cgroup::create(&state.pod_cgroup(pod))?;
    netns::ip_in(
        &node.netns,
        &[
            "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ],
    )?;
    netns::ip_in(
        &pod.netns,
        &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
    )?;
    netns::ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
    // Everything leaves through eth0; the node answers ARP for all of it.
    netns::ip_in(
        &pod.netns,
        &["route", "add", "default", "dev", "eth0", "scope", "link"],
    )?;
    netns::ip_in(&node.netns, &["link", "set", &pod.veth, "up"])?;
    // Answer the pod's ARP for everything, at once: the default proxy_delay
    // (up to 0.8 s) would cost every first connection a SYN retransmit.
    netns::sysctl_in(
        &node.netns,
        &[
            &format!("net.ipv4.conf.{}.proxy_arp=1", pod.veth),
            &format!("net.ipv4.neigh.{}.proxy_delay=0", pod.veth),
        ],
    )?;
    netns::ip_in(
        &node.netns,
        &["route", "add", &format!("{}/32", pod.ip), "dev", &pod.veth],
    )
}

fn write_hosts(state: &LabState) -> Result<()> {
    let mut hosts = String::from("# Service VIPs of this lab (written by `cargo xtask lab up`)\n");
    for svc in &state.plan.services {
        let _ = writeln!(
            hosts,
            "{} {} {}.{}.svc {}.{}",
            svc.vip,
            svc.hostname(),
            svc.name,
            svc.namespace,
            svc.name,
            svc.namespace
        );
    }
    fs::write(&state.hosts_file, hosts)
        .map_err(io_err(format!("writing {}", state.hosts_file.display())))
}

fn install_services(state: &LabState) -> Result<()> {
    bpffs::ensure_mounted(std::path::Path::new(bpffs::DEFAULT_ROOT))?;
    let mut lb = LabServiceLb::install(&state.cgroup, &pin_dir(&state.plan.name))?;
    for svc in &state.plan.services {
        for port in &svc.ports {
            lb.set_service(SocketAddrV4::new(svc.vip, port.port), &port.endpoints)?;
        }
    }
    Ok(())
}

fn start_app(state: &LabState, pod: &PodPlan) -> Result<u32> {
    let node = &state.plan.nodes[pod.node];
    let log = log_path(&state.plan.name, pod);
    let log_file = fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
    if let Some(gateway) = pod.waypoint() {
        let mut command = state.command_in_pod(pod, state.waypoint_binary())?;
        command
            .arg("--xds-address")
            .arg(state.control_xds_url())
            .arg("--xds-root-cert")
            .arg(state.control_root_cert())
            // In the lab a waypoint authenticates as its node (the CA signs
            // identities of pods on the caller's node); on Kubernetes it
            // uses its own service-account token.
            .arg("--xds-token-file")
            .arg(state.node_token_file(pod.node))
            .args(["--namespace", &pod.namespace, "--gateway", gateway])
            .args(["--service-account", &pod.service_account])
            .args(["--pod-ip", &pod.ip.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io_err("duplicating log fd"))?)
            .stderr(log_file);
        process::detach(&mut command);
        return spawn(&mut command, pod);
    }
    let mut command = state.command_in_pod(pod, &state.app_binary)?;
    command
        .arg("serve")
        .args([
            "--pod",
            &pod.name,
            "--namespace",
            &pod.namespace,
            "--app",
            pod.app(),
            "--version",
            pod.version(),
        ])
        .args([
            "--node",
            &node.name,
            "--service-account",
            &pod.service_account,
        ])
        .arg("--hosts")
        .arg(&state.hosts_file);
    for (port, protocol) in &pod.ports {
        let flag = match protocol {
            PortProtocol::Http => "--http",
            PortProtocol::Tcp => "--echo",
            PortProtocol::Banner => "--banner",
        };
        command.args([flag, &port.to_string()]);
    }
    for (path, urls) in &pod.calls {
        command
            .arg("--call")
            .arg(format!("{path}={}", urls.join(",")));
    }
    command
        .env(
            "RUST_LOG",
            std::env::var("LAB_APP_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(io_err("duplicating log fd"))?)
        .stderr(log_file);
    process::detach(&mut command);
    let child = spawn(&mut command, pod)?;
    Ok(child)
}

fn spawn(command: &mut Command, pod: &PodPlan) -> Result<u32> {
    command
        .spawn()
        .map(|child| child.id())
        .map_err(io_err(format!(
            "starting the app of pod {}",
            pod.qualified_name()
        )))
}

/// Waits until `pod`'s app listens on all its ports, reading the kernel's
/// socket table of the pod's namespace through `/proc/<pid>/net/tcp`.
fn wait_listening(state: &LabState, pod: &PodPlan) -> Result<()> {
    let pid = state.app_pids[&pod.qualified_name()];
    let deadline = Instant::now() + Duration::from_secs(15);
    let app_error = |message: String| Error::App {
        pod: pod.qualified_name(),
        message,
        log: state.pod_log(pod).display().to_string(),
    };
    loop {
        let table = fs::read_to_string(format!("/proc/{pid}/net/tcp"))
            .map_err(|err| app_error(format!("app process {pid} is gone ({err})")))?;
        let listening = listening_ports(&table);
        let missing: Vec<u16> = pod
            .ports
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !listening.contains(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(app_error(format!(
                "not listening on {missing:?} after 15 s"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Local ports in state LISTEN (`0A`) in a `/proc/net/tcp` table.
pub(crate) fn listening_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            (state == "0A").then_some(())?;
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::listening_ports;

    #[test]
    fn parses_listening_sockets() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   0: 00000000:2378 00000000:0000 0A 00000000:00000000\n   1: 0A00000A:2378 0A00000B:D2F0 01 00000000:00000000\n";
        assert_eq!(listening_ports(table), [0x2378]);
    }
}
