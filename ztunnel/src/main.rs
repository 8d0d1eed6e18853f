//! ztunnel: the mesh's per-node agent.
//!
//! It owns the node's capture programs (embedded in the binary, pinned in
//! bpffs so a restart keeps capture on), opens its listeners inside every
//! enrolled pod's network namespace, and carries what is captured over HBONE
//! (mTLS) to the destination's ztunnel.

mod admin;
mod agent;
mod fastpath;
use mesh_identity as identity;
mod inpod;
mod metrics;
mod pod_source;
mod proxy;

use ztunnel::{discovery, policy};

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Command line of the node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Load every eBPF program of the embedded object into the kernel (without
    /// attaching it) and report which ones the verifier accepted.
    EbpfCheck,
    /// Detach all capture programs of a node and remove their pins: pods'
    /// traffic flows directly again.
    Uninstall {
        /// The node's pin directory.
        #[arg(long)]
        pin_dir: PathBuf,
        /// Then stay up until SIGTERM or SIGINT (the main container of the
        /// cleanup DaemonSet `meshctl uninstall` runs: its pod is ready once
        /// the node is clean).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// JSON file listing the node's pods (netns, cgroup, enrolment); watched.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    node_pods: Option<PathBuf>,
    /// Learn the node's pods from the Kubernetes API (pods with
    /// `spec.nodeName` = `--node-name`, and their namespaces), found as
    /// kubectl does (kubeconfig, else in-cluster), and locate each on the
    /// host under `--cgroup-root`, `--proc-root` and `--netns-dir`.
    #[arg(long)]
    kubernetes: bool,
    /// The host's cgroup v2 mount, where the kubelet's `kubepods` tree is.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// The host's `/proc` as mounted in this container.
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Where the container runtime pins pod network namespaces.
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// The cgroup all pods of the node live under; capture attaches there.
    #[arg(long)]
    pods_cgroup: PathBuf,
    /// bpffs directory for this node's pins (must be on a mounted bpffs).
    #[arg(long)]
    pin_dir: PathBuf,
    /// Emit the eBPF programs' debug records into this log (off by default:
    /// they cost a ring-buffer write per captured connect).
    #[arg(long)]
    ebpf_debug_logs: bool,
    /// Splice HBONE connections between two pods of this node in the kernel
    /// (sockmap and `sk_msg`), so their bytes skip the TCP/IP stack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    same_node_fast_path: bool,
    /// Source address of the node's health probes (the kubelet's); its
    /// connections to enrolled pods are not captured. Repeatable.
    #[arg(long = "probe-source")]
    probe_sources: Vec<std::net::Ipv4Addr>,
    /// Where Prometheus metrics are served (`/metrics`, `/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Where readiness is served (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: std::net::SocketAddr,
    /// Where the admin endpoint is served (`/config_dump`); keep it local.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: std::net::SocketAddr,
    /// The mesh's root namespace: policies there without a selector apply
    /// to every workload.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// This node's name, as pods' `spec.nodeName` says.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The control plane's xDS and CA address:
    /// `https://mesh-control.istio-system.svc:15012`, or plaintext
    /// `http://...:15010` (lab and debugging only: the token crosses it in
    /// the clear).
    #[arg(long)]
    xds_address: Option<String>,
    /// PEM file of the mesh root the control plane's certificate must
    /// verify against (used with an `https://` address; default Istio's
    /// `/var/run/secrets/istio/root-cert.pem`).
    #[arg(long)]
    xds_root_cert: Option<PathBuf>,
    /// File holding this node agent's bearer token for the control plane.
    #[arg(long)]
    xds_token_file: Option<PathBuf>,
    /// Lifetime requested for workload certificates, in seconds; they are
    /// renewed at half life (Istio's default: 24 h).
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(2..=7_776_000))]
    workload_cert_ttl: u64,
    /// On SIGTERM, how long to wait for open connections (captured relays
    /// and inbound HBONE tunnels) to close after accepting stops; keep it
    /// below the pod's termination grace period.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// Threads that run the proxy (Istio's `ZTUNNEL_WORKER_THREADS`); 1 runs
    /// everything on one thread, which saves the cross-thread wake-ups a
    /// request would otherwise pay on its way through.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: u16,
}

/// How often pods that failed to enrol are looked at again.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);

fn main() -> anyhow::Result<()> {
    mesh_admin::process::init_tracing();
    mesh_admin::process::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = match &cli.command {
        Command::Run(args) if args.worker_threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Run(args) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(args.worker_threads.into());
            builder
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    runtime.block_on(run_command(cli.command))
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::EbpfCheck => {
            let verified = mesh_ebpf_loader::verify::verify_all()
                .context("loading the embedded eBPF object")?;
            for program in &verified {
                println!("ok {} ({})", program.name, program.kind);
            }
            println!("{} program(s) accepted by the kernel", verified.len());
            Ok(())
        }
        Command::Uninstall { pin_dir, wait } => {
            mesh_ebpf_loader::capture::Capture::uninstall(&pin_dir)?;
            println!("capture removed ({})", pin_dir.display());
            if wait {
                let mut terminate =
                    signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
                let mut interrupt =
                    signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let discovery = std::sync::Arc::new(discovery::Discovery::default());
    let policy = std::sync::Arc::new(policy::PolicyStore::new(&args.root_namespace));
    let synced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tcp_metrics = metrics::TcpMetrics::default();
    let target = args.xds_address.as_ref().map(|address| mesh_xds::Target {
        address: address.clone(),
        root_cert: args
            .xds_root_cert
            .clone()
            .or_else(|| mesh_xds::channel::default_root_cert(address)),
    });
    let certs = identity::CertManager::new(
        target.clone(),
        args.xds_token_file.clone(),
        Duration::from_secs(args.workload_cert_ttl),
    );
    let mut agent = agent::Agent::new(
        agent::CaptureConfig {
            pods_cgroup: &args.pods_cgroup,
            pin_dir: &args.pin_dir,
            ebpf_debug_logs: args.ebpf_debug_logs,
            probe_sources: &args.probe_sources,
            same_node_fast_path: args.same_node_fast_path,
        },
        agent::MeshState {
            discovery: discovery.clone(),
            policy: policy.clone(),
            certs: certs.clone(),
            trust_domain: args.trust_domain.clone(),
            tcp_metrics: tcp_metrics.clone(),
        },
    )?;
    if let Some(target) = &target {
        tokio::spawn(mesh_xds::run(
            mesh_xds::ClientConfig {
                address: target.address.clone(),
                root_cert: target.root_cert.clone(),
                token_file: args.xds_token_file.clone(),
                node_id: format!("ztunnel~{}", args.node_name),
                types: vec![
                    mesh_api::type_url::ADDRESS,
                    mesh_api::type_url::AUTHORIZATION,
                ],
                metadata: Vec::new(),
            },
            discovery::XdsHandler {
                discovery: discovery.clone(),
                policy: policy.clone(),
                synced: synced.clone(),
            },
        ));
    }
    if args.xds_address.is_none() {
        // No control plane: ready as soon as capture is in place.
        synced.store(true, std::sync::atomic::Ordering::Release);
    }
    admin::serve(
        args.metrics_addr,
        mesh_admin::metrics(metrics::registry(agent.capture(), &tcp_metrics)),
    )
    .await
    .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    admin::serve(args.readiness_addr, admin::readiness(synced.clone()))
        .await
        .with_context(|| format!("serving readiness on {}", args.readiness_addr))?;
    admin::serve(
        args.admin_addr,
        admin::config_dump(discovery.clone(), policy.clone(), certs.clone()),
    )
    .await
    .with_context(|| format!("serving admin on {}", args.admin_addr))?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut pods = match &args.node_pods {
        Some(path) => {
            info!(node_pods = %path.display(), "ztunnel running");
            pod_source::PodSource::file(path.clone())
        }
        None => {
            let config = kube::Config::infer()
                .await
                .context("finding the Kubernetes API (kubeconfig or in-cluster)")?;
            let client =
                kube::Client::try_from(config).context("building the Kubernetes client")?;
            info!(node = %args.node_name, "ztunnel running; pods from the Kubernetes API");
            pod_source::PodSource::Kubernetes(ztunnel::kube_pods::KubePods::start(
                client,
                &args.node_name,
                ztunnel::pod_host::HostRoots {
                    cgroup_root: args.cgroup_root.clone(),
                    proc_root: args.proc_root.clone(),
                    netns_dir: args.netns_dir.clone(),
                },
            ))
        }
    };
    let mut last_good = None;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    loop {
        tokio::select! {
            next = pods.next() => {
                agent.reconcile(last_good.insert(next)).await;
            }
            _ = retry.tick() => {
                if agent.needs_retry() && let Some(pods) = &last_good {
                    agent.reconcile(pods).await;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Not ready any more; stop accepting and let open relays finish.
    synced.store(false, std::sync::atomic::Ordering::Release);
    let left = agent.drain(Duration::from_secs(args.drain_seconds)).await;
    if left > 0 {
        tracing::warn!(
            open = left,
            drain_seconds = args.drain_seconds,
            "drain period over; closing the connections still open"
        );
    }
    // Capture stays attached and pinned: while ztunnel is away, enrolled pods'
    // connections are refused, never sent around the mesh.
    info!("ztunnel stopping; capture stays in place until the next start");
    Ok(())
}
