//! Wiring: the config loop, the gRPC server (ADS + CA) and the status
//! endpoint.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_api::{
    ads::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    ca::istio_certificate_service_server::IstioCertificateServiceServer,
};
use mesh_config::{
    Manifests, ResourceId,
    validate::{self, ValidationError},
};
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    auth::{
        Authenticator, TokenAuthenticator,
        token_review::{TokenReviewOptions, TokenReviewer},
    },
    ca::CertificateAuthority,
    ca_service::CaService,
    metrics::Metrics,
    model::{MeshSettings, Model},
    route_status::RouteStatus,
    source::{ConfigSource, DirSource, KubeSource, kubernetes::KubeOptions},
    status::{self, ConfigStatus, StatusState},
    tls::{self, SERVING_TTL, ServingCerts, TlsOptions},
    xds::{AdsService, ProxyRegistry, Snapshot},
};

/// Where the control plane reads its config.
#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// Directories of YAML, loaded in order and watched.
    Dirs(Vec<PathBuf>),
    /// The Kubernetes API server `client` points at (`kube::Config::infer()`
    /// for the binary), watching the CRDs at `options`' versions.
    Kubernetes {
        /// How to reach the API server.
        client: Box<kube::Config>,
        /// Served CRD versions.
        options: KubeOptions,
    },
}

/// Authentication of callers by Kubernetes service-account tokens.
#[derive(Clone, Debug)]
pub struct TokenReviewSetup {
    /// How to reach the API server.
    pub client: Box<kube::Config>,
    /// Accepted service accounts, audiences, caching.
    pub options: TokenReviewOptions,
}

/// How the control plane runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the config comes from.
    pub source: SourceOptions,
    /// Where the CA root lives (created on first start).
    pub ca_dir: PathBuf,
    /// Static bearer tokens of the node agents (the lab's).
    pub tokens_file: Option<PathBuf>,
    /// Service-account tokens checked with TokenReview.
    pub token_review: Option<TokenReviewSetup>,
    /// Plaintext gRPC (ADS and CA) listen address, Istio's 15010: for the
    /// lab and debugging only, since callers' tokens cross it in the clear.
    pub grpc_addr: SocketAddr,
    /// The TLS gRPC listener (Istio's 15012), if any.
    pub tls: Option<TlsOptions>,
    /// Monitoring listen address (15014).
    pub status_addr: SocketAddr,
    /// Trust domain and cluster domain.
    pub settings: MeshSettings,
}

/// Where a running control plane listens.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Plaintext gRPC.
    pub grpc: SocketAddr,
    /// TLS gRPC, when configured.
    pub grpc_tls: Option<SocketAddr>,
    /// Monitoring.
    pub status: SocketAddr,
}

/// A running control plane.
pub struct ControlPlane {
    ports: Ports,
    root_pem: String,
    servers: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    route_statuses: watch::Receiver<Arc<Vec<RouteStatus>>>,
}

impl ControlPlane {
    /// Loads the CA and the first config version, binds both ports and
    /// starts serving.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let ca =
            CertificateAuthority::load_or_create(&options.ca_dir, &options.settings.trust_domain)
                .context("starting the CA")?;
        let tokens = options
            .tokens_file
            .as_deref()
            .map(TokenAuthenticator::from_file)
            .transpose()?;
        let review = match &options.token_review {
            Some(setup) => {
                let url = setup.client.cluster_url.to_string();
                let client = kube::Client::try_from((*setup.client).clone())
                    .with_context(|| format!("building a Kubernetes client for {url}"))?;
                Some(TokenReviewer::new(client, setup.options.clone()))
            }
            None => None,
        };
        let auth = Authenticator::new(tokens, review);
        anyhow::ensure!(
            auth.is_configured(),
            "no way to authenticate callers: give a tokens file, TokenReview, or both"
        );
        let auth = Arc::new(auth);
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(ProxyRegistry::default());
        let source = match &options.source {
            SourceOptions::Dirs(dirs) => ConfigSource::dirs(DirSource::new(dirs.clone())),
            SourceOptions::Kubernetes { client, options } => {
                let url = client.cluster_url.to_string();
                let client = kube::Client::try_from((**client).clone())
                    .with_context(|| format!("building a Kubernetes client for {url}"))?;
                let source = KubeSource::start(client, options)
                    .await
                    .with_context(|| format!("watching the Kubernetes API at {url}"))?;
                ConfigSource::Kubernetes(source)
            }
        };

        let model = Arc::new(ArcSwap::from_pointee(Model::default()));
        let config = Arc::new(ArcSwap::from_pointee(ConfigStatus::default()));
        let (snapshots_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (route_statuses_tx, route_statuses) = watch::channel(Arc::default());
        let mut config_loop = ConfigLoop {
            route_statuses: route_statuses_tx,
            source,
            settings: options.settings.clone(),
            model: model.clone(),
            config: config.clone(),
            snapshots: snapshots_tx,
            metrics: metrics.clone(),
            version: 0,
            last_good: Arc::default(),
        };
        // The source marks what it has seen as it loads: a change racing
        // the first load is then seen as a change, never lost.
        config_loop.reload();
        tokio::spawn(config_loop.run());

        let status = status::spawn(
            options.status_addr,
            StatusState {
                config,
                registry: registry.clone(),
                metrics: metrics.clone(),
            },
        )
        .await
        .with_context(|| format!("binding the status endpoint on {}", options.status_addr))?;

        let listener = TcpListener::bind(options.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC on {}", options.grpc_addr))?;
        let grpc = listener.local_addr()?;
        let ca = Arc::new(ca);
        let root_pem = ca.root_pem().to_owned();
        let ads = AdsService::new(snapshots, auth.clone(), registry, metrics.clone());
        let ca_service = CaService::new(
            ca.clone(),
            auth,
            model,
            options.settings.trust_domain.clone(),
            metrics,
        );
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(AggregatedDiscoveryServiceServer::new(ads))
            .add_service(IstioCertificateServiceServer::new(ca_service));
        let mut servers = Vec::new();
        let mut grpc_tls = None;
        if let Some(tls_options) = &options.tls {
            let (certs, not_after) = ServingCerts::new(ca, tls_options, SERVING_TTL)
                .context("issuing the control plane's serving certificate")?;
            let config = tls::server_config(certs.resolver())?;
            tokio::spawn(certs.keep_fresh(not_after));
            let listener = TcpListener::bind(tls_options.addr)
                .await
                .with_context(|| format!("binding TLS gRPC on {}", tls_options.addr))?;
            grpc_tls = Some(listener.local_addr()?);
            let incoming = tls::incoming(listener, Arc::new(config).into());
            servers.push(tokio::spawn(router.clone().serve_with_incoming(incoming)));
        }
        servers.push(tokio::spawn(
            router.serve_with_incoming(TcpListenerStream::new(listener)),
        ));
        tracing::info!(%grpc, grpc_tls = ?grpc_tls, %status, "control plane serving");
        Ok(Self {
            root_pem,
            ports: Ports {
                grpc,
                grpc_tls,
                status,
            },
            servers,
            route_statuses,
        })
    }

    /// The status of every Gateway API route of the config being served,
    /// updated with each version (what [`crate::route_status::run`] writes).
    pub fn route_statuses(&self) -> watch::Receiver<Arc<Vec<RouteStatus>>> {
        self.route_statuses.clone()
    }

    /// The mesh root certificate (PEM): what proxies verify 15012 with.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Where it listens.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// Runs until a gRPC server (plaintext or TLS) fails.
    pub async fn wait(self) -> anyhow::Result<()> {
        let (ended, _, _) = futures::future::select_all(self.servers).await;
        ended?.context("gRPC server")
    }
}

/// Puts `new` in `current` when it differs; whether it did.
fn replace_if_changed(current: &mut Arc<Vec<RouteStatus>>, new: Vec<RouteStatus>) -> bool {
    if **current == new {
        return false;
    }
    *current = Arc::new(new);
    true
}

/// Turns each config change into a model and a snapshot.
struct ConfigLoop {
    source: ConfigSource,
    settings: MeshSettings,
    model: Arc<ArcSwap<Model>>,
    config: Arc<ArcSwap<ConfigStatus>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    route_statuses: watch::Sender<Arc<Vec<RouteStatus>>>,
    metrics: Arc<Metrics>,
    version: u64,
    /// The config behind the snapshot being served.
    last_good: Arc<Manifests>,
}

impl ConfigLoop {
    async fn run(mut self) {
        loop {
            self.source.changed().await;
            self.reload();
        }
    }

    fn reload(&mut self) {
        let started = std::time::Instant::now();
        let loaded = self.source.load();
        let load_ms = started.elapsed().as_millis() as u64;
        let (manifests, mut invalid) = validate::partition(loaded.manifests);
        let (manifests, kept) = self.keep_last_good(manifests, &loaded.errors, &mut invalid);
        let mut errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        errors.extend(invalid.iter().map(|error| {
            if kept.contains(&error.resource) {
                format!("{error} (last good version kept)")
            } else {
                error.to_string()
            }
        }));
        for error in &errors {
            tracing::warn!(%error, "config rejected; the rest stays in force");
        }
        let model = Model::build(&manifests, &self.settings);
        let mut warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
        warnings.extend(model.warnings.iter().cloned());
        for warning in &warnings {
            tracing::debug!(%warning, "config warning");
        }
        self.version += 1;
        let previous = self.snapshots.borrow().clone();
        let snapshot = model.encode(&previous, self.version);
        let translate_ms = started.elapsed().as_millis() as u64 - load_ms;
        tracing::info!(
            version = self.version,
            addresses = model.addresses.len(),
            authorizations = model.authorizations.len(),
            errors = errors.len(),
            warnings = warnings.len(),
            load_ms,
            translate_ms,
            "config version computed"
        );
        self.metrics.config_versions.inc();
        self.metrics.config_errors.set(errors.len() as i64);
        self.config.store(Arc::new(ConfigStatus {
            version: self.version,
            errors,
            warnings,
            load_ms,
            translate_ms,
        }));
        // Only the CA reads the served model (which identities run on which
        // node); the translated resources live on, encoded, in the snapshot.
        self.model.store(Arc::new(Model {
            pods: model.pods,
            ..Model::default()
        }));
        self.snapshots.send_replace(Arc::new(snapshot));
        self.route_statuses
            .send_if_modified(|current| replace_if_changed(current, model.route_statuses));
        self.last_good = Arc::new(manifests);
    }

    /// Puts back the last good version of every resource rejected this time
    /// (a document that no longer parses, or a resource that no longer
    /// validates), so one bad edit never removes config that was working.
    /// Returns the result and the ids that were put back.
    fn keep_last_good(
        &self,
        mut manifests: Manifests,
        load_errors: &[mesh_config::LoadError],
        invalid: &mut Vec<ValidationError>,
    ) -> (Manifests, BTreeSet<ResourceId>) {
        // A file that failed as a whole (unreadable, YAML syntax) rejects
        // every resource it held.
        let broken_files: BTreeSet<&str> = load_errors
            .iter()
            .filter(|e| e.resource.is_none())
            .map(|e| e.source_name.as_str())
            .collect();
        let rejected: BTreeSet<&ResourceId> = load_errors
            .iter()
            .filter_map(|e| e.resource.as_ref())
            .chain(invalid.iter().map(|e| &e.resource))
            .chain(
                self.last_good
                    .sources
                    .iter()
                    .filter(|(_, file)| broken_files.contains(file.as_str()))
                    .map(|(id, _)| id),
            )
            .collect();
        let mut kept = BTreeSet::new();
        for id in rejected {
            if manifests.find(id).is_none()
                && let Some(previous) = self.last_good.find(id)
            {
                manifests.push(previous);
                kept.insert(id.clone());
            }
        }
        if kept.is_empty() {
            return (manifests, kept);
        }
        // What was valid may no longer be, next to today's config.
        let (manifests, again) = validate::partition(manifests);
        for error in again {
            if kept.remove(&error.resource) || !invalid.contains(&error) {
                invalid.push(error);
            }
        }
        (manifests, kept)
    }
}
