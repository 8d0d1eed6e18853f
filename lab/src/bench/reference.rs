//! The reference L4 proxy: the ztunnel binary named by
//! `MESH_BENCH_REFERENCE_ZTUNNEL` (Istio's ztunnel), measured on the same
//! cross-node path as ours.
//!
//! Istio's ztunnel does not read our eBPF maps, so it runs the way Istio
//! runs it for a single workload: `PROXY_MODE=dedicated`, inside that
//! workload's own network namespace. One instance runs in `bench-ref/client`
//! (node0) and one in `bench-ref/server` (node1), a namespace outside our
//! mesh. The client pod's outbound TCP reaches its instance's 15001 through
//! a netfilter NAT redirect in that pod only ([`Redirect`]; the original
//! destination comes back with `SO_ORIGINAL_DST`); the instance tunnels it
//! over HBONE to the server pod's 15008, where the other instance connects
//! to the app. Workloads come from a local config file, certificates from
//! the lab's CA (`mesh-control` on 15012, over TLS), each instance
//! authenticated with its node's token, as our ztunnels are. Both processes
//! and the redirect exist only while a reference run lasts.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

use super::procs;
use crate::{Error, LabState, PodPlan, Result, io_err, plan::ECHO_PORT};

/// The environment variable naming the reference binary.
pub const ENV: &str = "MESH_BENCH_REFERENCE_ZTUNNEL";
/// The client pod of the reference path.
pub const CLIENT: &str = "bench-ref/client";
/// The server pod of the reference path.
pub const SERVER: &str = "bench-ref/server";
/// The instances' names in the report: client side, server side.
pub const PROXY_NAMES: [&str; 2] = ["reference ztunnel node0", "reference ztunnel node1"];

/// The pods the reference path adds to the bench lab: a namespace outside
/// our mesh, pinned to the nodes of the `mesh L4 cross-node` path.
pub const MANIFEST: &str = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-ref}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-ref, labels: {app: client}}
spec: {nodeName: node0, serviceAccountName: client, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-ref, labels: {app: server}}
spec: {nodeName: node1, serviceAccountName: server, containers: [{name: app, ports: [{containerPort: 8080}]}]}
"#;

/// The nftables table holding the redirect.
const TABLE: &str = "mesh_bench_reference";
/// The mark the instances put on their own sockets (`PACKET_MARK`), so the
/// redirect lets their HBONE connections through (Istio's 1337).
const MARK: u32 = 0x539;
/// The instances' outbound capture port.
const OUTBOUND_PORT: u16 = 15001;
/// The ports an instance listens on once it holds its config: outbound,
/// HBONE inbound, metrics.
const READY_PORTS: [u16; 3] = [OUTBOUND_PORT, 15008, 15020];
/// The instances' Prometheus port.
const METRICS_PORT: u16 = 15020;
/// Trust domain of the lab's CA.
const TRUST_DOMAIN: &str = "cluster.local";
/// How long an instance may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A NAT redirect of one pod's outbound TCP to the reference instance's
/// 15001, in that pod's network namespace only. Its own sockets (marked),
/// loopback and the CA's address are left alone. Removed by [`remove`] or
/// when dropped.
///
/// [`remove`]: Redirect::remove
#[derive(Debug)]
pub struct Redirect {
    netns: String,
    active: bool,
}

impl Redirect {
    /// Installs the redirect in network namespace `netns`, exempting
    /// `exempt` (the CA the instance dials).
    pub fn apply(netns: &str, exempt: SocketAddr) -> Result<Self> {
        nft(netns, &["-f", "-"], Some(&ruleset(exempt)))?;
        Ok(Self {
            netns: netns.to_owned(),
            active: true,
        })
    }

    /// Removes the redirect, leaving the namespace without any rule.
    pub fn remove(mut self) -> Result<()> {
        self.active = false;
        nft(&self.netns, &["delete", "table", "ip", TABLE], None)
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        if self.active
            && let Err(err) = nft(&self.netns, &["delete", "table", "ip", TABLE], None)
        {
            tracing::warn!(netns = %self.netns, %err, "removing the reference redirect");
        }
    }
}

/// The redirect as an nftables script.
fn ruleset(exempt: SocketAddr) -> String {
    format!(
        "table ip {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\toifname \"lo\" return\n\
         \t\tmeta mark & 0xfff == {MARK:#x} return\n\
         \t\tip daddr {} tcp dport {} return\n\
         \t\tmeta l4proto tcp redirect to :{OUTBOUND_PORT}\n\
         \t}}\n\
         }}\n",
        exempt.ip(),
        exempt.port(),
    )
}

/// Runs the nftables CLI with `args` in network namespace `netns`, feeding
/// it `script` (the reference variant's redirect, never our data path).
fn nft(netns: &str, args: &[&str], script: Option<&str>) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!(
            "running the nftables CLI in netns {netns} (the reference variant needs nftables)"
        )))?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin.write_all(script.as_bytes()).map_err(io_err(format!(
            "writing the nftables script in netns {netns}"
        )))?;
    }
    let output = child
        .wait_with_output()
        .map_err(io_err(format!("running the nftables CLI in netns {netns}")))?;
    if !output.status.success() {
        return Err(Error::Invalid(format!(
            "nftables `{}` in netns {netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The reference binary's version line (`ztunnel version`), or why not.
pub fn version(binary: &Path) -> String {
    match Command::new(binary).arg("version").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        Ok(output) => format!("`version` failed: {}", output.status),
        Err(err) => format!("`version` failed: {err}"),
    }
}

/// One running instance.
#[derive(Debug)]
struct Instance {
    name: &'static str,
    pod: String,
    child: Child,
    log: PathBuf,
}

/// The two reference instances of one run, with the client pod's redirect;
/// dropping them stops both and removes the redirect.
#[derive(Debug)]
pub struct ReferenceZtunnels {
    instances: Vec<Instance>,
    redirect: Option<Redirect>,
    /// Mutual-TLS connections the server side had accepted after the
    /// warm-up.
    warm_up_connections: u64,
    /// Each instance's resident memory after the warm-up (KiB).
    idle_rss_kib: BTreeMap<String, u64>,
}

impl ReferenceZtunnels {
    /// Starts an instance of `binary` in each reference pod, waits until
    /// both listen, redirects the client pod's outbound TCP to its instance
    /// and makes one short warm-up exchange through them (which also fetches
    /// both certificates and opens the pooled HBONE connection). Config and
    /// logs go to `dir`.
    pub fn start(state: &LabState, binary: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let client = super::pod(state, CLIENT)?;
        let server = super::pod(state, SERVER)?;
        let config = dir.join("workloads.yaml");
        let text = serde_json::to_string_pretty(&local_config(&[client, server]))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&config, text).map_err(io_err(format!("writing {}", config.display())))?;
        let mut started = Self {
            instances: Vec::new(),
            redirect: None,
            warm_up_connections: 0,
            idle_rss_kib: BTreeMap::new(),
        };
        for (name, pod) in PROXY_NAMES.into_iter().zip([client, server]) {
            let instance = spawn(state, binary, &config, dir, name, pod)?;
            started.instances.push(instance);
        }
        for instance in &mut started.instances {
            wait_listening(instance)?;
        }
        started.redirect = Some(Redirect::apply(
            &client.netns,
            state.control_grpc_tls_addr(),
        )?);
        let target = format!("{}:{ECHO_PORT}", server.ip);
        let output = state
            .app_client(
                client,
                &["load", &target, "--seconds", "0.3", "--mode", "rr"],
            )?
            .output()
            .map_err(io_err(format!("running the warm-up load in {CLIENT}")))?;
        if !output.status.success() {
            return Err(Error::Invalid(format!(
                "warm-up exchange {CLIENT} → {target} through the reference ztunnels failed: {} (logs: {})",
                String::from_utf8_lossy(&output.stderr).trim(),
                dir.display()
            )));
        }
        started.warm_up_connections = started.mutual_tls_connections(state)?;
        if started.warm_up_connections == 0 {
            return Err(Error::Invalid(format!(
                "the reference ztunnel in {SERVER} counted no mutual-TLS connection after the \
                 warm-up exchange: traffic did not go through it over HBONE (logs: {})",
                dir.display()
            )));
        }
        started.idle_rss_kib = started.proxies().rss_kib();
        Ok(started)
    }

    /// The instances as proxies to measure, by their report names.
    pub fn proxies(&self) -> procs::Proxies {
        procs::Proxies(
            self.instances
                .iter()
                .map(|i| (i.name.to_owned(), vec![i.child.id()]))
                .collect(),
        )
    }

    /// Each instance's resident memory after the warm-up (KiB).
    pub fn idle_rss_kib(&self) -> &BTreeMap<String, u64> {
        &self.idle_rss_kib
    }

    /// Mutual-TLS connections the server-side instance accepted since the
    /// warm-up, from its `istio_tcp_connections_opened_total`.
    pub fn measured_connections(&self, state: &LabState) -> Result<u64> {
        Ok(self
            .mutual_tls_connections(state)?
            .saturating_sub(self.warm_up_connections))
    }

    fn mutual_tls_connections(&self, state: &LabState) -> Result<u64> {
        let server = super::pod(state, SERVER)?;
        let url = format!("http://{}:{METRICS_PORT}/metrics", server.ip);
        let metrics = state.get_on_node(server.node, &url)?;
        Ok(mutual_tls_opened(&metrics))
    }

    /// Removes the redirect and stops both instances; returns each one's
    /// peak resident memory (KiB).
    pub fn stop(mut self) -> Result<BTreeMap<String, u64>> {
        if let Some(redirect) = self.redirect.take() {
            redirect.remove()?;
        }
        let peaks = self
            .instances
            .iter()
            .map(|i| (i.name.to_owned(), procs::peak_rss_kib(i.child.id())))
            .collect();
        for instance in &mut self.instances {
            terminate(&mut instance.child);
        }
        Ok(peaks)
    }
}

impl Drop for ReferenceZtunnels {
    fn drop(&mut self) {
        // The redirect goes first, so the client pod never dials a closed
        // 15001; then the processes.
        drop(self.redirect.take());
        for instance in &mut self.instances {
            terminate(&mut instance.child);
        }
    }
}

/// Starts instance `name` for `pod`, in its network namespace and cgroup.
fn spawn(
    state: &LabState,
    binary: &Path,
    config: &Path,
    dir: &Path,
    name: &'static str,
    pod: &PodPlan,
) -> Result<Instance> {
    let log = dir.join(format!("{}-{}.log", pod.namespace, pod.name));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let mut command = state.command_in_pod(pod, binary)?;
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // One workload, in its own namespace, as a sidecar would be.
        .env("PROXY_MODE", "dedicated")
        .env(
            "PROXY_WORKLOAD_INFO",
            format!("{}/{}/{}", pod.namespace, pod.name, pod.service_account),
        )
        // Config from the file, no xDS; certificates from the lab's CA.
        .env("LOCAL_XDS_PATH", config)
        .env("XDS_ADDRESS", "")
        .env(
            "CA_ADDRESS",
            format!("https://{}", state.control_grpc_tls_addr()),
        )
        .env("CA_ROOT_CA", state.control_root_cert())
        .env("AUTH_TOKEN", state.node_token_file(pod.node))
        .env("NODE_NAME", &state.plan.nodes[pod.node].name)
        // Its own sockets carry this mark, which the redirect skips.
        .env("PACKET_MARK", MARK.to_string())
        // Connections to the app leave from the pod's own address: the
        // pod's namespace has no route back to a spoofed source.
        .env("ENABLE_ORIG_SRC", "false")
        .env("IPV6_ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(io_err("duplicating log fd"))?)
        .stderr(file);
    let child = command.spawn().map_err(io_err(format!(
        "starting {} in {}",
        binary.display(),
        pod.qualified_name()
    )))?;
    Ok(Instance {
        name,
        pod: pod.qualified_name(),
        child,
        log,
    })
}

/// Waits until `instance` listens on its outbound, HBONE and metrics ports.
fn wait_listening(instance: &mut Instance) -> Result<()> {
    let pid = instance.child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let listening = crate::up::listening_ports(&table);
        if READY_PORTS.iter().all(|p| listening.contains(p)) {
            return Ok(());
        }
        let exited = instance.child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            return Err(Error::App {
                pod: instance.pod.clone(),
                message: format!(
                    "reference ztunnel {} (exit: {exited:?}):\n{}",
                    if exited.is_some() {
                        "exited"
                    } else {
                        "not listening on 15001, 15008 and 15020 after 15 s"
                    },
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ),
                log: instance.log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, up to 2 s to drain, then SIGKILL; reaped either way.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The instances' local config (ztunnel's `LOCAL_XDS_PATH` format, YAML,
/// of which JSON is a subset): both pods as HBONE workloads.
fn local_config(pods: &[&PodPlan]) -> serde_json::Value {
    let workloads: Vec<_> = pods
        .iter()
        .map(|pod| {
            json!({
                "uid": format!("Kubernetes//Pod/{}/{}", pod.namespace, pod.name),
                "name": pod.name,
                "namespace": pod.namespace,
                "serviceAccount": pod.service_account,
                "trustDomain": TRUST_DOMAIN,
                "workloadIps": [pod.ip.to_string()],
                "protocol": "HBONE",
                "node": format!("node{}", pod.node),
                "clusterId": "Kubernetes",
                "services": {},
            })
        })
        .collect();
    json!({ "workloads": workloads, "policies": [], "services": [] })
}

/// Connections a ztunnel accepted over mutual TLS, summed over
/// `istio_tcp_connections_opened_total{reporter="destination"}` series.
fn mutual_tls_opened(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains(r#"reporter="destination""#))
        .filter(|l| l.contains(r#"connection_security_policy="mutual_tls""#))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn only_mutual_tls_inbound_connections_count() {
        let metrics = "\
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\",connection_security_policy=\"mutual_tls\"} 41
istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"other\",connection_security_policy=\"mutual_tls\"} 1
istio_tcp_connections_opened_total{reporter=\"destination\",connection_security_policy=\"unknown\"} 7
istio_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"mutual_tls\"} 9
istio_tcp_connections_closed_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\"} 40
";
        assert_eq!(mutual_tls_opened(metrics), 42);
        assert_eq!(mutual_tls_opened(""), 0);
    }

    #[test]
    fn the_redirect_spares_the_proxy_loopback_and_the_ca() {
        let rules = ruleset("10.255.0.1:15012".parse().unwrap());
        assert!(rules.contains("type nat hook output"), "{rules}");
        assert!(rules.contains("oifname \"lo\" return"), "{rules}");
        assert!(
            rules.contains("meta mark & 0xfff == 0x539 return"),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr 10.255.0.1 tcp dport 15012 return"),
            "{rules}"
        );
        assert!(rules.ends_with("redirect to :15001\n\t}\n}\n"), "{rules}");
    }

    #[test]
    fn both_pods_are_hbone_workloads_with_their_identity() {
        let pod = |name: &str, node: usize, ip: Ipv4Addr| PodPlan {
            name: name.to_owned(),
            namespace: "bench-ref".to_owned(),
            node,
            ip,
            netns: String::new(),
            veth: String::new(),
            labels: BTreeMap::new(),
            service_account: name.to_owned(),
            ports: Vec::new(),
            calls: Vec::new(),
        };
        let client = pod("client", 0, Ipv4Addr::new(10, 244, 0, 9));
        let server = pod("server", 1, Ipv4Addr::new(10, 244, 1, 9));
        let config = local_config(&[&client, &server]);
        let server = &config["workloads"][1];
        assert_eq!(server["workloadIps"][0], "10.244.1.9");
        assert_eq!(server["protocol"], "HBONE");
        assert_eq!(server["serviceAccount"], "server");
        assert_eq!(server["trustDomain"], "cluster.local");
        assert_eq!(server["node"], "node1");
    }
}
