//! `mesh-control`: the control plane binary.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use mesh_control::{
    ControlPlane, Options, SourceOptions, TokenReviewSetup,
    auth::token_review::TokenReviewOptions,
    ca_secret,
    leader::{self, Election, ElectionOptions},
    model::MeshSettings,
    root_cert, route_status,
    source::kubernetes::KubeOptions,
    tls::TlsOptions,
    waypoint_deploy::{self, WaypointTemplate},
};

/// mimalloc rather than glibc's allocator: loading a large cluster frees
/// many short-lived YAML values among long-lived typed resources, which
/// glibc's arenas turn into resident fragmentation (and the push's many
/// small allocations into lock and consolidation time).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves xDS and signs workload certificates from Kubernetes and Istio
/// config: watched directories of YAML, or the Kubernetes API.
#[derive(Debug, Parser)]
#[command(name = "mesh-control", version)]
struct Args {
    /// Config directory (repeatable); every `.yaml`/`.yml` below it is loaded
    /// and the directory is watched.
    #[arg(
        long = "config-dir",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dirs: Vec<PathBuf>,
    /// Watch the Kubernetes API instead of directories, found as kubectl
    /// does (`$KUBECONFIG` or `~/.kube/config`), else in-cluster (the pod's
    /// service account).
    #[arg(long)]
    kubernetes: bool,
    /// Served version of the `networking.istio.io` and `security.istio.io`
    /// CRDs (used with `--kubernetes`).
    #[arg(long, default_value = "v1")]
    istio_api_version: String,
    /// Served version of the `gateway.networking.k8s.io` CRDs (used with
    /// `--kubernetes`).
    #[arg(long, default_value = "v1")]
    gateway_api_version: String,
    /// CA directory: `root-cert.pem` and `root-key.pem`, created when absent.
    #[arg(long, default_value = "/var/lib/mesh-control/ca")]
    ca_dir: PathBuf,
    /// Share the CA with the other replicas through this Secret of
    /// `--namespace` (keys `ca-cert.pem`, `ca-key.pem`): its root is written
    /// into `--ca-dir` at start, or `--ca-dir`'s root is stored in it when
    /// there is none (needs `--kubernetes`).
    #[arg(long, requires = "kubernetes")]
    ca_secret: Option<String>,
    /// JSON file of node agents' bearer tokens:
    /// `{"tokens": {"<token>": {"node": "<node>"}}}`.
    #[arg(long, required_unless_present = "token_review")]
    tokens_file: Option<PathBuf>,
    /// Also accept Kubernetes service-account tokens, checked with
    /// TokenReview (the API server found as for `--kubernetes`); the
    /// caller's node comes from the token's pod.
    #[arg(long)]
    token_review: bool,
    /// Service account whose tokens are accepted, `<namespace>/<name>`
    /// (`*` matches any namespace or name); repeatable.
    #[arg(
        long = "token-review-service-account",
        default_value = "istio-system/ztunnel"
    )]
    token_review_service_accounts: Vec<String>,
    /// Service account of waypoints whose tokens are accepted (same syntax;
    /// repeatable): such a caller may get a certificate only for its own
    /// service account, never for other pods of its node.
    #[arg(long = "token-review-waypoint-service-account")]
    token_review_waypoint_service_accounts: Vec<String>,
    /// Audience the tokens must be issued for; repeatable.
    #[arg(long = "token-review-audience", default_value = "istio-ca")]
    token_review_audiences: Vec<String>,
    /// How long an accepted token is trusted before it is reviewed again.
    #[arg(long, default_value_t = 60)]
    token_review_cache_seconds: u64,
    /// Plaintext gRPC listen address (ADS and CA), Istio's 15010: for the
    /// lab and debugging only, since callers' bearer tokens cross it in the
    /// clear.
    #[arg(long, default_value = "0.0.0.0:15010")]
    grpc_addr: SocketAddr,
    /// TLS 1.3 gRPC listen address (the same ADS and CA), Istio's 15012;
    /// clients verify the serving certificate with the mesh root.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_tls_addr: SocketAddr,
    /// DNS name of the serving certificate (repeatable).
    #[arg(
        long = "tls-dns-name",
        default_values_t = ["mesh-control.istio-system.svc".to_owned(), "istiod.istio-system.svc".to_owned()]
    )]
    tls_dns_names: Vec<String>,
    /// IP address SAN of the serving certificate, for clients that dial the
    /// control plane by IP (repeatable).
    #[arg(long = "tls-ip-san")]
    tls_ip_sans: Vec<IpAddr>,
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
    /// The control plane's own namespace (with `--kubernetes`, the mesh
    /// root is published there as ConfigMap `istio-ca-root-cert`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// Deploy a waypoint (ServiceAccount, Deployment, Service) for every
    /// Gateway of class `istio-waypoint` (needs `--kubernetes` and
    /// `--waypoint-image`).
    #[arg(long, requires_all = ["kubernetes", "waypoint_image"])]
    deploy_waypoints: bool,
    /// Container image of deployed waypoints.
    #[arg(long)]
    waypoint_image: Option<String>,
    /// `imagePullPolicy` of deployed waypoints.
    #[arg(long, default_value = "IfNotPresent")]
    waypoint_image_pull_policy: String,
    /// CPU request of deployed waypoints.
    #[arg(long, default_value = "100m")]
    waypoint_cpu_request: String,
    /// Memory request of deployed waypoints.
    #[arg(long, default_value = "128Mi")]
    waypoint_memory_request: String,
    /// Memory limit of deployed waypoints.
    #[arg(long, default_value = "512Mi")]
    waypoint_memory_limit: String,
    /// xDS and CA address deployed waypoints connect to.
    #[arg(long, default_value = "http://mesh-control.istio-system.svc:15010")]
    waypoint_xds_address: String,
    /// Audience of deployed waypoints' service-account token (one the
    /// TokenReview audiences accept).
    #[arg(long, default_value = "istio-ca")]
    waypoint_token_audience: String,
    /// Log filter (`RUST_LOG`) of deployed waypoints.
    #[arg(long, default_value = "info")]
    waypoint_log_level: String,
    /// Run the singleton writers (waypoint deployer, Gateway status, mesh
    /// root ConfigMap) without leader election: only for a single replica.
    #[arg(long)]
    no_leader_election: bool,
    /// Name of the leader election Lease in `--namespace`.
    #[arg(long, default_value = mesh_control::leader::DEFAULT_LEASE_NAME)]
    leader_election_lease_name: String,
    /// This replica's `holderIdentity` (default: the host name, which is
    /// the pod's name).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// How long the Lease stays another replica's after its last renewal.
    #[arg(long, default_value_t = 15)]
    leader_election_lease_seconds: u64,
    /// How long the leader keeps leading when it cannot renew (below the
    /// lease duration, so it stops before another replica may start).
    #[arg(long, default_value_t = 10)]
    leader_election_renew_deadline_seconds: u64,
    /// How often every replica reads, renews or tries the Lease.
    #[arg(long, default_value_t = 2)]
    leader_election_retry_seconds: u64,
}

/// The host name (a pod's is its name), else one made from the process id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("mesh-control-{}", std::process::id()))
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_control::alloc::configure();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let kube_config = if args.kubernetes || args.token_review {
        Some(Box::new(kube::Config::infer().await.context(
            "finding the Kubernetes API (kubeconfig or in-cluster)",
        )?))
    } else {
        None
    };
    let token_review = match (&kube_config, args.token_review) {
        (Some(client), true) => Some(TokenReviewSetup {
            client: client.clone(),
            options: TokenReviewOptions {
                service_accounts: args.token_review_service_accounts,
                waypoint_service_accounts: args.token_review_waypoint_service_accounts,
                audiences: args.token_review_audiences,
                cache_ttl: Duration::from_secs(args.token_review_cache_seconds),
            },
        }),
        _ => None,
    };
    let waypoints = match (&kube_config, args.deploy_waypoints) {
        (Some(config), true) => {
            let url = config.cluster_url.to_string();
            let client = kube::Client::try_from((**config).clone())
                .with_context(|| format!("building a Kubernetes client for {url}"))?;
            Some((
                client,
                WaypointTemplate {
                    image: args.waypoint_image.clone().unwrap_or_default(),
                    image_pull_policy: args.waypoint_image_pull_policy.clone(),
                    cpu_request: args.waypoint_cpu_request.clone(),
                    memory_request: args.waypoint_memory_request.clone(),
                    memory_limit: args.waypoint_memory_limit.clone(),
                    xds_address: args.waypoint_xds_address.clone(),
                    token_audience: args.waypoint_token_audience.clone(),
                    trust_domain: args.trust_domain.clone(),
                    log_level: args.waypoint_log_level.clone(),
                    // Set once the CA is loaded.
                    root_cert: None,
                },
            ))
        }
        _ => None,
    };
    let kube_client_for_root = kube_config.clone().filter(|_| args.kubernetes);
    let source = if let Some(client) = kube_config.filter(|_| args.kubernetes) {
        SourceOptions::Kubernetes {
            client,
            options: KubeOptions {
                istio_version: args.istio_api_version,
                gateway_api_version: args.gateway_api_version.clone(),
            },
        }
    } else {
        SourceOptions::Dirs(args.config_dirs)
    };
    if let (Some(name), Some(config)) = (&args.ca_secret, &kube_client_for_root) {
        let client = kube::Client::try_from((**config).clone())
            .context("building a Kubernetes client to share the CA")?;
        ca_secret::sync(
            client,
            &args.namespace,
            name,
            &args.ca_dir,
            &args.trust_domain,
        )
        .await
        .context("sharing the mesh CA with the other replicas")?;
    }
    let control = ControlPlane::start(Options {
        source,
        ca_dir: args.ca_dir,
        tokens_file: args.tokens_file,
        token_review,
        grpc_addr: args.grpc_addr,
        tls: Some(TlsOptions {
            addr: args.grpc_tls_addr,
            dns_names: args.tls_dns_names,
            ip_sans: args.tls_ip_sans,
        }),
        status_addr: args.status_addr,
        settings: MeshSettings {
            trust_domain: args.trust_domain,
            cluster_domain: args.cluster_domain,
            root_namespace: args.root_namespace,
        },
    })
    .await?;
    // The singleton writers run on the leader only (or here, without
    // election); every replica serves xDS and the CA.
    let mut election = None;
    let leadership = match &kube_client_for_root {
        Some(config) if !args.no_leader_election => {
            let client = kube::Client::try_from((**config).clone())
                .context("building a Kubernetes client for leader election")?;
            let options = ElectionOptions {
                namespace: args.namespace.clone(),
                lease_name: args.leader_election_lease_name.clone(),
                identity: args
                    .leader_election_identity
                    .clone()
                    .unwrap_or_else(host_name),
                lease_duration: Duration::from_secs(args.leader_election_lease_seconds),
                renew_deadline: Duration::from_secs(args.leader_election_renew_deadline_seconds),
                retry_period: Duration::from_secs(args.leader_election_retry_seconds),
            };
            let started = Election::spawn(client, options)?;
            let leadership = started.leadership();
            election = Some(started);
            leadership
        }
        // Always leading.
        _ => tokio::sync::watch::channel(true).1,
    };
    if let Some(config) = &kube_client_for_root {
        // ztunnel, in this namespace, verifies 15012 with it.
        let client = kube::Client::try_from((**config).clone())
            .context("building a Kubernetes client to publish the mesh root")?;
        let namespace = args.namespace.clone();
        let root_pem = control.root_pem().to_owned();
        tokio::spawn(leader::while_leading(
            leadership.clone(),
            "mesh root publisher",
            move || {
                root_cert::publish_until_done(client.clone(), namespace.clone(), root_pem.clone())
            },
        ));
    }
    if let Some(config) = &kube_client_for_root {
        // Routes' `status.parents`, as a Gateway API controller writes them.
        let client = kube::Client::try_from((**config).clone())
            .context("building a Kubernetes client to write route status")?;
        let version = args.gateway_api_version.clone();
        let statuses = control.route_statuses();
        tokio::spawn(leader::while_leading(
            leadership.clone(),
            "route status writer",
            move || route_status::run(client.clone(), version.clone(), statuses.clone()),
        ));
    }
    if let Some((client, mut template)) = waypoints {
        if template.xds_address.starts_with("https://") {
            template.root_cert = Some(control.root_pem().to_owned());
        }
        let version = args.gateway_api_version;
        tokio::spawn(leader::while_leading(
            leadership.clone(),
            "waypoint deployer",
            move || waypoint_deploy::run(client.clone(), version.clone(), template.clone()),
        ));
    }
    tokio::select! {
        served = control.wait() => served,
        signalled = terminated() => {
            signalled?;
            tracing::info!("terminating");
            if let Some(election) = election {
                election.release().await;
            }
            Ok(())
        }
    }
}
