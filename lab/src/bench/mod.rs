//! The benchmark harness behind `cargo xtask bench`: scenarios in the lab,
//! every variant of a scenario interleaved in the same run, medians and
//! ratios to the direct path, written as Markdown, JSON and SVG.
//!
//! Topology (one lab, two nodes, every pod pinned by `spec.nodeName`,
//! nothing relabelled between runs):
//! - `direct`: `bench-plain/client` (node0) → `bench-plain/server` (node1),
//!   a namespace outside the mesh;
//! - `mesh-cross-node`: `bench-mesh/client` (node0) → `bench-mesh/server`
//!   (node1), captured and carried over HBONE by both ztunnels;
//! - `mesh-same-node`: `bench-mesh/client` → `bench-mesh/server-local`
//!   (node0), through node0's ztunnel alone;
//! - `waypoint`: `bench-mesh/client` → Service `web` (bound to the
//!   namespace's waypoint on node0) → `bench-mesh/web` (node1): both
//!   ztunnels and the waypoint;
//! - `nginx`: `bench-plain/client` → nginx in `bench-plain/proxy` (node0)
//!   → `bench-plain/server` (node1), plain HTTP;
//! - `gateway`: the same path through the waypoint binary as an ingress
//!   gateway in `bench-plain/proxy` (an Istio `Gateway` selecting that pod,
//!   a VirtualService routing to Service `bench-plain/server`), plain HTTP:
//!   the L7 engine without the mesh's mTLS legs;
//! - `reference-ztunnel`: `bench-ref/client` (node0) → `bench-ref/server`
//!   (node1) through the ztunnel binary named by
//!   `MESH_BENCH_REFERENCE_ZTUNNEL` ([`reference`]), when it is set.
//!
//! Every load is `lab-app load` run in the client pod, bounded in time;
//! each proxy's CPU and resident memory are read from `/proc` while it runs
//! ([`procs`]).

pub mod control;
mod iperf3;
mod nginx;
mod procs;
pub mod reference;
mod report;

use std::{collections::BTreeMap, path::PathBuf, process::Stdio, time::Duration};

use serde::{Deserialize, Serialize};

pub use report::write_report;

use crate::{Error, LabState, PodPlan, Result, UpOptions, io_err, plan::ECHO_PORT};

/// The lab the benchmarks build (and tear down).
pub const LAB_NAME: &str = "meshbench";

/// The HTTP port of the bench servers (and of nginx).
const HTTP_PORT: u16 = 8080;
/// The port of the `gateway` variant's Gateway server (in nginx's pod).
const GATEWAY_PORT: u16 = 8081;
/// The pod running both nginx and the waypoint binary as a gateway.
const PROXY_POD: &str = "bench-plain/proxy";
/// Concurrent connections of the HTTP scenario.
const HTTP_CONNECTIONS: &str = "4";

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench-plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench-mesh}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bench-mesh, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-plain, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-plain, labels: {app: server}}
spec: {nodeName: node1, containers: [{name: app, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench-plain}
spec: {selector: {app: server}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: proxy, namespace: bench-plain}
spec:
  selector: {app: proxy}
  servers: [{port: {number: 8081, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: bench-plain}
spec:
  hosts: ["*"]
  gateways: [proxy]
  http: [{route: [{destination: {host: server.bench-plain.svc.cluster.local, port: {number: 8080}}}]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: proxy
  namespace: bench-plain
  # The lab runs the waypoint binary, as the gateway `proxy`, in this pod;
  # nginx is started in it too.
  labels: {app: proxy, gateway.networking.k8s.io/gateway-name: proxy}
spec: {nodeName: node0, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-mesh, labels: {app: client}}
spec: {nodeName: node0, serviceAccountName: client, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-mesh, labels: {app: server}}
spec: {nodeName: node1, serviceAccountName: server, containers: [{name: app, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-local, namespace: bench-mesh, labels: {app: server-local}}
spec: {nodeName: node0, serviceAccountName: server, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: bench-mesh, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, ports: [{containerPort: 8080}]}]}
"#;

/// A path the load takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No mesh: plain TCP across the node link.
    Direct,
    /// Through both nodes' ztunnels, over HBONE.
    MeshCrossNode,
    /// Through one node's ztunnel.
    MeshSameNode,
    /// Through one node's ztunnel, without the sockmap fast path.
    MeshSameNodeNoFastPath,
    /// Through both ztunnels and the namespace's waypoint.
    Waypoint,
    /// Through nginx as a reverse proxy, outside the mesh.
    Nginx,
    /// Through the waypoint binary as a plaintext ingress gateway, on
    /// nginx's path.
    Gateway,
    /// Through two instances of the reference ztunnel (Istio's), over HBONE.
    ReferenceZtunnel,
}

impl Variant {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::MeshCrossNode => "mesh L4 cross-node",
            Self::MeshSameNode => "mesh L4 same-node",
            Self::MeshSameNodeNoFastPath => "mesh L4 same-node, no fast path",
            Self::Waypoint => "mesh L7 waypoint",
            Self::Nginx => "nginx L7 proxy",
            Self::Gateway => "gateway L7 proxy",
            Self::ReferenceZtunnel => "reference ztunnel cross-node",
        }
    }

    /// The client pod.
    fn client(self) -> &'static str {
        match self {
            Self::Direct | Self::Nginx | Self::Gateway => "bench-plain/client",
            Self::ReferenceZtunnel => reference::CLIENT,
            _ => "bench-mesh/client",
        }
    }

    /// The pod whose address the client dials (the waypoint variant dials
    /// Service `web`'s VIP instead).
    fn target_pod(self) -> &'static str {
        match self {
            Self::Direct => "bench-plain/server",
            Self::MeshCrossNode => "bench-mesh/server",
            Self::MeshSameNode | Self::MeshSameNodeNoFastPath => "bench-mesh/server-local",
            Self::Waypoint => "bench-mesh/web",
            Self::Nginx | Self::Gateway => PROXY_POD,
            Self::ReferenceZtunnel => reference::SERVER,
        }
    }

    /// The proxies on its path, as named in [`procs::Proxies`].
    fn proxies(self) -> &'static [&'static str] {
        match self {
            Self::Direct => &[],
            Self::MeshCrossNode => &["ztunnel node0", "ztunnel node1"],
            Self::MeshSameNode | Self::MeshSameNodeNoFastPath => &["ztunnel node0"],
            Self::Waypoint => &["ztunnel node0", "ztunnel node1", "waypoint"],
            Self::Nginx => &["nginx"],
            Self::Gateway => &["gateway"],
            Self::ReferenceZtunnel => &reference::PROXY_NAMES,
        }
    }

    /// Whether the ztunnels run with the same-node fast path.
    fn fast_path(self) -> bool {
        self != Self::MeshSameNodeNoFastPath
    }
}

/// A load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One bulk stream: echoed bytes per second.
    Throughput,
    /// One bulk stream driven by iperf3: received bytes per second.
    Iperf3,
    /// 1 KiB request/response at a fixed 1,000/s on one connection: latency.
    Latency,
    /// 1 KiB request/response as fast as possible on one connection.
    MaxRate,
    /// New connections per second, one 1 KiB exchange each.
    Connections,
    /// HTTP/1.1 keep-alive `GET` of 1 KiB on 4 connections, closed loop.
    Http,
    /// 1,000 connections opened and held: setup rate, proxies' memory.
    Open1k,
    /// 10,000 connections opened and held.
    Open10k,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 8] = [
        Self::Throughput,
        Self::Iperf3,
        Self::Latency,
        Self::MaxRate,
        Self::Connections,
        Self::Http,
        Self::Open1k,
        Self::Open10k,
    ];

    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Iperf3 => "iperf3",
            Self::Latency => "latency",
            Self::MaxRate => "max-rate",
            Self::Connections => "connections",
            Self::Http => "http",
            Self::Open1k => "open-1k",
            Self::Open10k => "open-10k",
        }
    }

    /// Parses a command-line name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The paths it is run on; the first is the baseline of the ratios.
    pub fn variants(self) -> &'static [Variant] {
        use Variant::*;
        match self {
            Self::Http => &[Direct, MeshCrossNode, Waypoint, Nginx, Gateway],
            // What the same-node fast path gains: the same path without it.
            Self::Throughput | Self::Iperf3 | Self::Latency | Self::MaxRate => &[
                Direct,
                MeshCrossNode,
                ReferenceZtunnel,
                MeshSameNode,
                MeshSameNodeNoFastPath,
            ],
            _ => &[Direct, MeshCrossNode, ReferenceZtunnel, MeshSameNode],
        }
    }

    /// How many connections it opens and holds, for the scenarios that
    /// measure memory per held connection.
    pub fn held_connections(self) -> Option<u64> {
        match self {
            Self::Open1k => Some(1000),
            Self::Open10k => Some(10_000),
            _ => None,
        }
    }

    /// Whether each run starts with freshly restarted ztunnels: the
    /// scenarios that hold connections to measure their memory.
    fn fresh_ztunnels(self) -> bool {
        self.held_connections().is_some()
    }

    /// The unit of its rate in the report, and the factor from the measured
    /// per-second value to it.
    pub fn unit(self) -> (&'static str, f64) {
        match self {
            Self::Throughput | Self::Iperf3 => ("MiB/s", 1.0 / (1024.0 * 1024.0)),
            Self::Connections | Self::Open1k | Self::Open10k => ("conn/s", 1.0),
            Self::Latency | Self::MaxRate | Self::Http => ("req/s", 1.0),
        }
    }

    /// Whether it measures bytes per second (no per-operation latency).
    pub fn is_bulk(self) -> bool {
        matches!(self, Self::Throughput | Self::Iperf3)
    }

    fn port(self, variant: Variant) -> u16 {
        match self {
            Self::Http if variant == Variant::Gateway => GATEWAY_PORT,
            Self::Http => HTTP_PORT,
            Self::Iperf3 => iperf3::PORT,
            _ => ECHO_PORT,
        }
    }

    fn load_args(self) -> &'static [&'static str] {
        match self {
            Self::Throughput => &["--mode", "stream"],
            Self::Iperf3 => &[],
            Self::Latency => &["--mode", "rr", "--rate", "1000"],
            Self::MaxRate => &["--mode", "rr"],
            Self::Connections => &["--mode", "connect"],
            Self::Http => &["--mode", "http", "--connections", HTTP_CONNECTIONS],
            Self::Open1k => &["--mode", "hold", "--connections", "1000"],
            Self::Open10k => &["--mode", "hold", "--connections", "10000"],
        }
    }
}

/// How to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Binaries, as for `up`.
    pub up: UpOptions,
    /// Lab scenarios to run.
    pub scenarios: Vec<Scenario>,
    /// The control plane's scale benchmark (`mesh-control-bench`) and the
    /// size to run it at, if wanted.
    pub control_plane: Option<(PathBuf, control::Size)>,
    /// Rounds of A B C ... interleaving.
    pub rounds: usize,
    /// Seconds per run.
    pub seconds: f64,
    /// Where the report goes.
    pub out_dir: PathBuf,
    /// The reference ztunnel binary (`MESH_BENCH_REFERENCE_ZTUNNEL`), if
    /// given: the `reference ztunnel cross-node` variant runs with it.
    pub reference_ztunnel: Option<PathBuf>,
}

/// What `lab-app load` printed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Operations.
    pub ops: u64,
    /// Bytes echoed.
    pub bytes: u64,
    /// Seconds.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_second: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Median latency (µs).
    pub p50_us: u64,
    /// p90 (µs).
    pub p90_us: u64,
    /// p99 (µs).
    pub p99_us: u64,
    /// p99.9 (µs).
    pub p999_us: u64,
}

/// One run: a scenario on a variant in a round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// Round number.
    pub round: usize,
    /// Scenario.
    pub scenario: Scenario,
    /// Variant.
    pub variant: Variant,
    /// What the load measured.
    pub load: LoadReport,
    /// What each proxy on the variant's path spent during the run.
    pub proxies: BTreeMap<String, procs::Cost>,
}

impl Run {
    /// CPU of the proxies on the path, user+system seconds.
    pub fn proxy_cpu_seconds(&self) -> f64 {
        self.proxies.values().map(|c| c.cpu_seconds).sum()
    }

    /// Peak resident memory of the proxies on the path, summed (KiB).
    pub fn proxy_peak_rss_kib(&self) -> u64 {
        self.proxies.values().map(|c| c.peak_rss_kib).sum()
    }
}

/// Everything a bench run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// Every run, in order.
    pub runs: Vec<Run>,
    /// Resident memory of each proxy (KiB) once the lab was up and before
    /// any load.
    pub idle_rss_kib: BTreeMap<String, u64>,
    /// Highest resident memory of each proxy (KiB) over the whole bench.
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// Rounds and seconds per run.
    pub rounds: usize,
    /// Seconds per run.
    pub seconds: f64,
    /// The control plane's scale benchmark, if it ran.
    pub control_plane: Option<control::ControlPlaneResult>,
    /// Runs that could not be made here, and why.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// The reference ztunnel, if it ran.
    #[serde(default)]
    pub reference: Option<ReferenceSummary>,
}

/// What the reference variant ran and what proves its path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReferenceSummary {
    /// The binary.
    pub binary: PathBuf,
    /// What `<binary> version` printed.
    pub version: String,
    /// Connections its server-side instance accepted over HBONE with
    /// mutual TLS during the measured runs (warm-ups excluded).
    pub mutual_tls_connections: u64,
}

/// Brings the bench lab up, runs everything, writes the report, tears the
/// lab down (also on failure).
pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    std::fs::create_dir_all(&options.out_dir)
        .map_err(io_err(format!("creating {}", options.out_dir.display())))?;
    let mut report = if options.scenarios.is_empty() {
        BenchReport {
            runs: Vec::new(),
            idle_rss_kib: BTreeMap::new(),
            peak_rss_kib: BTreeMap::new(),
            rounds: options.rounds,
            seconds: options.seconds,
            control_plane: None,
            skipped: Vec::new(),
            reference: None,
        }
    } else {
        let manifest = options.out_dir.join("bench-pods.yaml");
        let mut text = MANIFEST.to_owned();
        if options.reference_ztunnel.is_some() {
            text.push_str(reference::MANIFEST);
        }
        std::fs::write(&manifest, text)
            .map_err(io_err(format!("writing {}", manifest.display())))?;
        let mut up = options.up.clone();
        up.name = LAB_NAME.to_owned();
        up.manifests = vec![manifest];
        up.nodes = 2;
        let state = crate::up(&up)?;
        let result = measure(&state, options);
        let _ = crate::down(LAB_NAME);
        result?
    };
    if let Some((binary, size)) = &options.control_plane {
        eprintln!("control plane: {size:?}");
        report.control_plane = Some(control::run(binary, *size)?);
    }
    write_report(&report, &options.out_dir)?;
    Ok(report)
}

fn pod<'a>(state: &'a LabState, qualified: &str) -> Result<&'a PodPlan> {
    state
        .plan
        .pods
        .iter()
        .find(|p| p.qualified_name() == qualified)
        .ok_or_else(|| Error::Invalid(format!("bench pod {qualified} missing")))
}

/// Where `variant` sends the load of `scenario`.
fn target(state: &LabState, variant: Variant, scenario: Scenario) -> Result<String> {
    let ip = if variant == Variant::Waypoint {
        state
            .plan
            .services
            .iter()
            .find(|s| s.namespace == "bench-mesh" && s.name == "web")
            .map(|s| s.vip)
            .ok_or_else(|| Error::Invalid("bench Service bench-mesh/web missing".into()))?
    } else {
        pod(state, variant.target_pod())?.ip
    };
    Ok(format!("{ip}:{}", scenario.port(variant)))
}

fn measure(state: &LabState, options: &BenchOptions) -> Result<BenchReport> {
    // Restarting ztunnels (see `Scenario::fresh_ztunnels`) changes the state.
    let mut state = state.clone();
    let state = &mut state;
    state.wait_for_certificates(Duration::from_secs(10))?;
    state.wait_for_waypoints(Duration::from_secs(20))?;
    let mut clients = vec![Variant::Direct.client(), Variant::MeshCrossNode.client()];
    if options.reference_ztunnel.is_some() {
        clients.push(Variant::ReferenceZtunnel.client());
    }
    for client in clients {
        tune_client(state, pod(state, client)?)?;
    }
    let scenarios = &options.scenarios;
    let nginx = if scenarios
        .iter()
        .any(|s| s.variants().contains(&Variant::Nginx))
    {
        let proxy = pod(state, Variant::Nginx.target_pod())?;
        let upstream = pod(state, Variant::Direct.target_pod())?.ip;
        let nginx = nginx::Nginx::start(
            state,
            proxy,
            HTTP_PORT,
            upstream,
            &crate::run_dir(LAB_NAME).join("nginx"),
        )?;
        wait_until_serving(state, proxy, "nginx", HTTP_PORT)?;
        Some(nginx)
    } else {
        None
    };
    if scenarios
        .iter()
        .any(|s| s.variants().contains(&Variant::Gateway))
    {
        // Ready means config and certificate held; the listener is bound
        // once the Gateway's config arrived.
        wait_until_serving(state, pod(state, PROXY_POD)?, "gateway", GATEWAY_PORT)?;
    }
    let proxies = |state: &LabState| {
        let mut proxies = procs::Proxies::default();
        for (node, pid) in &state.ztunnel_pids {
            proxies.0.insert(format!("ztunnel {node}"), vec![*pid]);
        }
        if let Some(pid) = state.app_pids.get("bench-mesh/waypoint-0") {
            proxies.0.insert("waypoint".to_owned(), vec![*pid]);
        }
        if let Some(pid) = state.app_pids.get(PROXY_POD) {
            proxies.0.insert("gateway".to_owned(), vec![*pid]);
        }
        if let Some(nginx) = &nginx {
            proxies
                .0
                .insert("nginx".to_owned(), procs::with_children(nginx.pid()));
        }
        proxies
    };
    let mut idle_rss_kib = proxies(state).rss_kib();
    let mut peak_rss_kib: BTreeMap<String, u64> = BTreeMap::new();
    let wants_reference = scenarios
        .iter()
        .any(|s| s.variants().contains(&Variant::ReferenceZtunnel));
    let mut skipped = Vec::new();
    let mut reference = match &options.reference_ztunnel {
        Some(binary) if wants_reference => Some(ReferenceSummary {
            binary: binary.clone(),
            version: reference::version(binary),
            mutual_tls_connections: 0,
        }),
        Some(_) => None,
        None => {
            if wants_reference {
                skipped.push(format!(
                    "{}: {} is not set (the path of a ztunnel binary, e.g. Istio's, runs it)",
                    Variant::ReferenceZtunnel.name(),
                    reference::ENV
                ));
            }
            None
        }
    };
    let reference_dir = options.out_dir.join("reference-ztunnel");

    let seconds = format!("{}", options.seconds);
    let mut runs = Vec::new();
    let mut after_memory_run = false;
    for round in 0..options.rounds {
        for &scenario in scenarios {
            for &variant in scenario.variants() {
                let reference_binary = match (variant, &reference) {
                    (Variant::ReferenceZtunnel, None) => continue,
                    (Variant::ReferenceZtunnel, Some(r)) => Some(r.binary.clone()),
                    _ => None,
                };
                if let Err(reason) = fits_fd_limit(state, scenario, variant) {
                    if round == 0 {
                        eprintln!(
                            "skipping {} on {}: {reason}",
                            scenario.name(),
                            variant.name()
                        );
                        skipped.push(format!(
                            "{} on {}: {reason}",
                            scenario.name(),
                            variant.name()
                        ));
                    }
                    continue;
                }
                // Memory runs start from fresh ztunnels, and so do the runs
                // after them, whose RSS would otherwise include what the
                // allocator kept from thousands of held connections. The
                // reference instances are fresh for every run.
                let instances = match &reference_binary {
                    None => {
                        let toggle = variant.fast_path() != state.ztunnel_fast_path;
                        if scenario.fresh_ztunnels() || after_memory_run || toggle {
                            state.ztunnel_fast_path = variant.fast_path();
                            restart_ztunnels(state, &mut peak_rss_kib)?;
                        }
                        after_memory_run = scenario.fresh_ztunnels();
                        None
                    }
                    Some(binary) => {
                        let instances =
                            reference::ReferenceZtunnels::start(state, binary, &reference_dir)?;
                        for (name, kib) in instances.idle_rss_kib() {
                            idle_rss_kib.entry(name.clone()).or_insert(*kib);
                        }
                        Some(instances)
                    }
                };
                let mut proxies = proxies(state);
                if let Some(instances) = &instances {
                    proxies.0.extend(instances.proxies().0);
                }
                let client = pod(state, variant.client())?;
                let target = target(state, variant, scenario)?;
                let mut args = vec!["load", target.as_str(), "--seconds", seconds.as_str()];
                args.extend_from_slice(scenario.load_args());
                let (mut command, _server) = if scenario == Scenario::Iperf3 {
                    let server = pod(state, variant.target_pod())?;
                    let started = iperf3::Server::start(state, server)?;
                    (
                        iperf3::client(state, client, server, options.seconds)?,
                        Some(started),
                    )
                } else {
                    (state.app_client(client, &args)?, None)
                };
                let child = command
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(io_err(format!("running lab-app load in {}", client.name)))?;
                let (output, mut costs) = proxies
                    .measure(child)
                    .map_err(io_err(format!("measuring lab-app load in {}", client.name)))?;
                costs.retain(|name, _| variant.proxies().contains(&name.as_str()));
                if !output.status.success() {
                    // iperf3 -J reports its errors on stdout.
                    return Err(Error::Invalid(format!(
                        "{} on {}: {}{}",
                        scenario.name(),
                        variant.name(),
                        String::from_utf8_lossy(&output.stderr).trim(),
                        String::from_utf8_lossy(&output.stdout).trim()
                    )));
                }
                let load: LoadReport = if scenario == Scenario::Iperf3 {
                    iperf3::parse(&output.stdout)?
                } else {
                    serde_json::from_slice(&output.stdout).map_err(|e| {
                        Error::Invalid(format!("lab-app load printed no report: {e}"))
                    })?
                };
                if let (Some(instances), Some(summary)) = (instances, &mut reference) {
                    // Proof the load took the reference path: its server
                    // side accepted the connections over HBONE with mTLS.
                    let connections = instances.measured_connections(state)?;
                    if connections == 0 {
                        return Err(Error::Invalid(format!(
                            "{} on {}: the reference ztunnel in {} accepted no mutual-TLS \
                             connection during the run, so the load did not go through it (logs: {})",
                            scenario.name(),
                            variant.name(),
                            reference::SERVER,
                            reference_dir.display()
                        )));
                    }
                    summary.mutual_tls_connections += connections;
                    for (name, kib) in instances.stop()? {
                        let entry = peak_rss_kib.entry(name).or_default();
                        *entry = (*entry).max(kib);
                    }
                }
                let run = Run {
                    round,
                    scenario,
                    variant,
                    load,
                    proxies: costs,
                };
                eprintln!(
                    "round {round} {:<12} {:<20} {:>10.0} ops/s {:>8.1} MiB/s p50 {:>6} µs p99 {:>6} µs proxies {:>6.1} MiB",
                    scenario.name(),
                    variant.name(),
                    run.load.ops_per_second,
                    run.load.bytes_per_second / (1024.0 * 1024.0),
                    run.load.p50_us,
                    run.load.p99_us,
                    run.proxy_peak_rss_kib() as f64 / 1024.0,
                );
                runs.push(run);
            }
        }
    }
    record_peaks(&proxies(state), &mut peak_rss_kib);
    Ok(BenchReport {
        runs,
        idle_rss_kib,
        peak_rss_kib,
        rounds: options.rounds,
        seconds: options.seconds,
        control_plane: None,
        skipped,
        reference,
    })
}

/// Lets a client pod open connections back to back for minutes: the whole
/// ephemeral port range, and reuse of ports in TIME_WAIT (safe with TCP
/// timestamps). Without it, the `connections` scenario's tens of thousands
/// of closed connections would slow the setup of the runs after it.
fn tune_client(state: &LabState, client: &PodPlan) -> Result<()> {
    let output = state
        .command_in_pod(client, "sysctl")?
        .args([
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])
        .output()
        .map_err(io_err(format!(
            "running sysctl in {}",
            client.qualified_name()
        )))?;
    if !output.status.success() {
        return Err(Error::Invalid(format!(
            "sysctl in {}: {}",
            client.qualified_name(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Adds each of `proxies`' peak RSS so far to `peaks` (the higher wins).
fn record_peaks(proxies: &procs::Proxies, peaks: &mut BTreeMap<String, u64>) {
    for (name, pids) in &proxies.0 {
        let peak = pids.iter().map(|p| procs::peak_rss_kib(*p)).sum();
        let entry = peaks.entry(name.clone()).or_default();
        *entry = (*entry).max(peak);
    }
}

/// Restarts every ztunnel (capture stays pinned), so the next run's memory
/// is measured from a fresh process rather than one whose allocator still
/// holds what an earlier run freed. The old processes' peaks are kept.
fn restart_ztunnels(state: &mut LabState, peaks: &mut BTreeMap<String, u64>) -> Result<()> {
    let mut old = procs::Proxies::default();
    for (node, pid) in &state.ztunnel_pids {
        old.0.insert(format!("ztunnel {node}"), vec![*pid]);
    }
    record_peaks(&old, peaks);
    for node in 0..state.plan.nodes.len() {
        state.stop_ztunnel(node)?;
        state.start_ztunnel(node)?;
    }
    state.wait_for_certificates(Duration::from_secs(10))?;
    state.wait_for_waypoints(Duration::from_secs(10))
}

/// Whether the ztunnels on `variant`'s path may open enough files for
/// `scenario`: a held connection costs a ztunnel two sockets on each node it
/// passes (client side and upstream side), so same-node costs one ztunnel
/// both. Where the machine caps open files below that (a sandbox without
/// `CAP_SYS_RESOURCE`), the run is skipped rather than failed.
fn fits_fd_limit(state: &LabState, scenario: Scenario, variant: Variant) -> Result<(), String> {
    let Some(connections) = scenario.held_connections() else {
        return Ok(());
    };
    let needed = match variant {
        Variant::MeshSameNode | Variant::MeshSameNodeNoFastPath => 2 * connections + 100,
        _ => connections + 100,
    };
    for (node, pid) in &state.ztunnel_pids {
        let limit = procs::open_file_limit(*pid);
        if limit < needed {
            return Err(format!(
                "ztunnel {node} may open {limit} files, this needs about {needed}"
            ));
        }
    }
    Ok(())
}

/// Waits until `what` in `proxy` answers on `port` through to its upstream.
fn wait_until_serving(state: &LabState, proxy: &PodPlan, what: &str, port: u16) -> Result<()> {
    let url = format!("http://{}:{port}/bytes/1", proxy.ip);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match state.get_on_node(proxy.node, &url) {
            Ok(_) => return Ok(()),
            Err(err) if std::time::Instant::now() > deadline => {
                return Err(Error::Invalid(format!(
                    "{what} in {} not serving on port {port} after 10 s: {err}",
                    proxy.qualified_name()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
