//! ztunnel: the mesh's per-node agent.
//!
//! It owns the node's capture programs (embedded in the binary, pinned in
//! bpffs so a restart keeps capture on), opens its listeners inside every
//! enrolled pod's network namespace, and relays what is captured. The HBONE
//! mTLS tunnel replaces the plaintext relay in a later step.

mod agent;
mod inpod;
mod metrics;
mod proxy;

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
    Run(RunArgs),
    /// Load every eBPF program of the embedded object into the kernel (without
    /// attaching it) and report which ones the verifier accepted.
    EbpfCheck,
    /// Detach all capture programs of a node and remove their pins: pods'
    /// traffic flows directly again.
    Uninstall {
        /// The node's pin directory.
        #[arg(long)]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// JSON file listing the node's pods (netns, cgroup, enrolment); watched.
    #[arg(long)]
    node_pods: PathBuf,
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
    /// Source address of the node's health probes (the kubelet's); its
    /// connections to enrolled pods are not captured. Repeatable.
    #[arg(long = "probe-source")]
    probe_sources: Vec<std::net::Ipv4Addr>,
    /// Where Prometheus metrics are served (`/metrics`, `/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: std::net::SocketAddr,
}

/// How often the node pods file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::EbpfCheck => {
            let verified = mesh_ebpf_loader::verify::verify_all()
                .context("loading the embedded eBPF object")?;
            for program in &verified {
                println!("ok {} ({})", program.name, program.kind);
            }
            println!("{} program(s) accepted by the kernel", verified.len());
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            mesh_ebpf_loader::capture::Capture::uninstall(&pin_dir)?;
            println!("capture removed ({})", pin_dir.display());
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut agent = agent::Agent::new(
        &args.pods_cgroup,
        &args.pin_dir,
        args.ebpf_debug_logs,
        &args.probe_sources,
    )?;
    metrics::serve(args.metrics_addr, metrics::registry(agent.capture()))
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut last_seen = None;
    let mut last_good = None;
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    info!(node_pods = %args.node_pods.display(), "ztunnel running");
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let modified = std::fs::metadata(&args.node_pods).and_then(|m| m.modified()).ok();
                if modified.is_some() && modified != last_seen {
                    last_seen = modified;
                    // A malformed file keeps the last good set in force.
                    if let Some(pods) = agent::read_node_pods(&args.node_pods) {
                        last_good = Some(pods);
                    } else {
                        continue;
                    }
                } else if !agent.needs_retry() {
                    continue;
                }
                if let Some(pods) = &last_good {
                    agent.reconcile(pods).await;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Capture stays attached and pinned: while ztunnel is away, enrolled pods'
    // connections are refused, never sent around the mesh.
    info!("ztunnel stopping; capture stays in place until the next start");
    Ok(())
}
