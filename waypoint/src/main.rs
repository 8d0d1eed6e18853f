//! waypoint: the per-namespace L7 proxy.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use mesh_admin::{not_found, response};
use mesh_hbone::Identity;
use mesh_identity::CertManager;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use waypoint::{
    access_log::AccessLog,
    config::{Store, XdsHandler},
    metrics::Metrics,
    workers::{Shared, Workers},
};

/// Command line of the waypoint.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The control plane's xDS and CA address:
    /// `https://mesh-control.istio-system.svc:15012`, or plaintext
    /// `http://...:15010` (lab and debugging only: the token crosses it in
    /// the clear).
    #[arg(long)]
    xds_address: String,
    /// PEM file of the mesh root the control plane's certificate must
    /// verify against (used with an `https://` address; default Istio's
    /// `/var/run/secrets/istio/root-cert.pem`).
    #[arg(long)]
    xds_root_cert: Option<PathBuf>,
    /// File holding the bearer token for the control plane.
    #[arg(long)]
    xds_token_file: Option<PathBuf>,
    /// Namespace of the waypoint's Gateway.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Name of the waypoint's Gateway.
    #[arg(long, env = "GATEWAY_NAME")]
    gateway: String,
    /// Service account the waypoint runs as (its SPIFFE identity).
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: String,
    /// This pod's IP.
    #[arg(long, env = "INSTANCE_IP")]
    pod_ip: std::net::IpAddr,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Where HBONE is accepted.
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Admin endpoint (`/config_dump`); keep it local.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Lifetime requested for the waypoint's certificate, in seconds.
    #[arg(long, default_value_t = 86_400)]
    cert_ttl: u64,
    /// Threads serving requests, each a single-threaded runtime with its
    /// own listeners and upstream pools (default: one per core).
    #[arg(long, env = "WAYPOINT_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    mesh_admin::process::init_tracing();
    mesh_admin::process::raise_fd_limit();
    let cli = Cli::parse();
    if let Some(threads) = cli.worker_threads {
        anyhow::ensure!(threads > 0, "--worker-threads must be at least 1");
    }
    // The main thread's runtime runs the control side (xDS, certificates,
    // admin, metrics, readiness, signals); requests are served by the
    // workers' runtimes (`waypoint::workers`).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let identity = Identity::new(&cli.trust_domain, &cli.namespace, &cli.service_account);
    let target = mesh_xds::Target {
        address: cli.xds_address.clone(),
        root_cert: cli
            .xds_root_cert
            .clone()
            .or_else(|| mesh_xds::channel::default_root_cert(&cli.xds_address)),
    };
    let certs = CertManager::new(
        Some(target.clone()),
        cli.xds_token_file.clone(),
        Duration::from_secs(cli.cert_ttl),
    );
    certs.prefetch(&identity.to_string());

    let store = Arc::new(Store::default());
    let metrics = Metrics::default();
    let access_log = AccessLog::stderr();

    let key = format!("{}/{}", cli.namespace, cli.gateway);
    tokio::spawn(mesh_xds::run(
        mesh_xds::ClientConfig {
            address: target.address.clone(),
            root_cert: target.root_cert.clone(),
            token_file: cli.xds_token_file.clone(),
            node_id: format!(
                "waypoint~{}~{}.{}~{}.svc.cluster.local",
                cli.pod_ip, cli.gateway, cli.namespace, cli.namespace
            ),
            types: vec![
                mesh_api::type_url::LISTENER,
                mesh_api::type_url::ROUTE,
                mesh_api::type_url::CLUSTER,
                mesh_api::type_url::ENDPOINT,
            ],
            metadata: vec![("WAYPOINT".to_owned(), key.clone())],
        },
        XdsHandler::new(store.clone()),
    ));

    // HBONE on every worker, and the ingress gateway listeners when the
    // config has any (a waypoint's has none).
    let workers = cli.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut workers = Workers::start(
        workers,
        Shared {
            store: store.clone(),
            metrics: metrics.clone(),
            access_log: access_log.clone(),
            certs: certs.store().clone(),
            identity: identity.clone(),
            local_addr: SocketAddr::new(cli.pod_ip, 0),
            connect_timeout: Duration::from_secs(10),
        },
        Some(cli.hbone_addr),
    )
    .with_context(|| format!("binding {}", cli.hbone_addr))?;

    let registry = Arc::new(metrics.registry());
    mesh_admin::serve(cli.metrics_addr, mesh_admin::metrics(registry))
        .await
        .with_context(|| format!("serving metrics on {}", cli.metrics_addr))?;
    let ready_store = store.clone();
    let ready_certs = certs.clone();
    let me = identity.clone();
    mesh_admin::serve(cli.readiness_addr, move |path| match path {
        "/healthz/ready" => readiness(&ready_store, &ready_certs, &me),
        _ => not_found(),
    })
    .await
    .with_context(|| format!("serving readiness on {}", cli.readiness_addr))?;
    let dump_certs = certs.clone();
    mesh_admin::serve(cli.admin_addr, move |path| match path {
        "/config_dump" => {
            let mut dump = store.dump();
            dump["certificates"] = dump_certs.dump();
            mesh_admin::json(&dump)
        }
        _ => not_found(),
    })
    .await
    .with_context(|| format!("serving admin on {}", cli.admin_addr))?;

    info!(waypoint = %key, identity = %identity, workers = workers.len(), "waypoint running");
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let stopped = tokio::select! {
        _ = terminate.recv() => None,
        _ = interrupt.recv() => None,
        worker = workers.stopped() => Some(worker),
    };
    // Lines of the last requests are still in the log's batch.
    access_log.flush();
    if let Some(worker) = stopped {
        anyhow::bail!("worker {worker} stopped");
    }
    info!("waypoint stopping");
    Ok(())
}

/// Ready once the first config arrived and the certificate is held.
fn readiness(store: &Store, certs: &CertManager, me: &Identity) -> Response<Full<Bytes>> {
    let synced = store.synced.load(std::sync::atomic::Ordering::Acquire);
    let has_cert = certs.store().get(me).is_some();
    match (synced, has_cert) {
        (true, true) => response(StatusCode::OK, "text/plain", "ready\n".into()),
        (false, _) => response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the first xDS config\n".into(),
        ),
        (true, false) => response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the certificate\n".into(),
        ),
    }
}
