//! `mesh-control`: the control plane binary.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;
use mesh_control::{ControlPlane, Options, model::MeshSettings};

/// Serves xDS and signs workload certificates from a directory of
/// Kubernetes and Istio YAML.
#[derive(Debug, Parser)]
#[command(name = "mesh-control", version)]
struct Args {
    /// Config directory (repeatable); every `.yaml`/`.yml` below it is loaded
    /// and the directory is watched.
    #[arg(long = "config-dir", required = true)]
    config_dirs: Vec<PathBuf>,
    /// CA directory: `root-cert.pem` and `root-key.pem`, created when absent.
    #[arg(long, default_value = "/var/lib/mesh-control/ca")]
    ca_dir: PathBuf,
    /// JSON file of node agents' bearer tokens:
    /// `{"tokens": {"<token>": {"node": "<node>"}}}`.
    #[arg(long)]
    tokens_file: PathBuf,
    /// gRPC listen address (ADS and CA).
    #[arg(long, default_value = "0.0.0.0:15010")]
    grpc_addr: SocketAddr,
    /// Monitoring listen address.
    #[arg(long, default_value = "0.0.0.0:15014")]
    status_addr: SocketAddr,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// DNS suffix of Service host names.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Root namespace: its selector-less policies apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let control = ControlPlane::start(Options {
        config_dirs: args.config_dirs,
        ca_dir: args.ca_dir,
        tokens_file: args.tokens_file,
        grpc_addr: args.grpc_addr,
        status_addr: args.status_addr,
        settings: MeshSettings {
            trust_domain: args.trust_domain,
            cluster_domain: args.cluster_domain,
            root_namespace: args.root_namespace,
        },
    })
    .await?;
    control.wait().await
}
