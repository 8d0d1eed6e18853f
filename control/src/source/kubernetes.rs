//! Config from the Kubernetes API: one kube-rs watcher and reflector store
//! per kind the model reads ([`WATCHED`]).
//!
//! Every kind is watched as a [`DynamicObject`] (the core kinds too), and
//! each object is decoded by mesh-config's own parser
//! ([`mesh_config::load_value`]) under the source name
//! `kubernetes:<Kind>/<namespace>/<name>`, so an invalid object is reported
//! exactly as an invalid document in a file would be, and the rest of the
//! control plane cannot tell this source from a directory.
//!
//! A kind the API server does not serve (a CRD that is not installed: 404 on
//! list) or that the control plane may not read (403) is logged once, treated
//! as empty and retried with the watcher's backoff (0.8 s doubling to 30 s);
//! the other kinds are not affected. Any watch event wakes
//! [`KubeSource::changed`], which then waits for [`SETTLE`] of quiet.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        reflector::{Store, store::Writer},
        watcher,
    },
};
use mesh_config::{
    Loaded,
    istio::{GATEWAY_API_VERSIONS, NETWORKING_VERSIONS, SECURITY_VERSIONS},
    load_value,
};
use tokio::sync::watch;

use super::SETTLE;

/// Which API version of a kind is watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServedVersion {
    /// Always this one (core kinds).
    Fixed(&'static str),
    /// [`KubeOptions::istio_version`].
    Istio,
    /// [`KubeOptions::gateway_api_version`].
    GatewayApi,
}

/// One kind the source watches, and the access that needs.
#[derive(Clone, Copy, Debug)]
pub struct Watched {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource (plural), as RBAC rules name it.
    pub resource: &'static str,
    /// `kind`.
    pub kind: &'static str,
    /// API version watched.
    pub version: ServedVersion,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Field selector of the watch, if any.
    pub field_selector: Option<&'static str>,
    /// RBAC verbs the watch needs.
    pub verbs: &'static [&'static str],
}

/// What a list-then-watch needs from RBAC.
const LIST_WATCH: &[&str] = &["list", "watch"];

/// Secrets that can never hold a gateway certificate are not watched.
const SECRET_FIELDS: &str = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1,type!=bootstrap.kubernetes.io/token";

/// Every kind the model reads, in load order. Deployments are not watched:
/// the model reads pods' owner references, never those objects.
/// ServiceAccounts are, so a pod running as one that does not exist is
/// warned about; EndpointSlices give endpoints to Services without a
/// selector.
pub const WATCHED: &[Watched] = &[
    core("namespaces", "Namespace", false, None),
    core("services", "Service", true, None),
    core("serviceaccounts", "ServiceAccount", true, None),
    Watched {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        kind: "EndpointSlice",
        version: ServedVersion::Fixed("v1"),
        namespaced: true,
        field_selector: None,
        verbs: LIST_WATCH,
    },
    core("pods", "Pod", true, None),
    core("secrets", "Secret", true, Some(SECRET_FIELDS)),
    crd(
        "networking.istio.io",
        "virtualservices",
        "VirtualService",
        ServedVersion::Istio,
    ),
    crd(
        "networking.istio.io",
        "destinationrules",
        "DestinationRule",
        ServedVersion::Istio,
    ),
    crd(
        "networking.istio.io",
        "gateways",
        "Gateway",
        ServedVersion::Istio,
    ),
    crd(
        "networking.istio.io",
        "serviceentries",
        "ServiceEntry",
        ServedVersion::Istio,
    ),
    crd(
        "security.istio.io",
        "authorizationpolicies",
        "AuthorizationPolicy",
        ServedVersion::Istio,
    ),
    crd(
        "security.istio.io",
        "peerauthentications",
        "PeerAuthentication",
        ServedVersion::Istio,
    ),
    crd(
        "gateway.networking.k8s.io",
        "gateways",
        "Gateway",
        ServedVersion::GatewayApi,
    ),
    crd(
        "gateway.networking.k8s.io",
        "httproutes",
        "HTTPRoute",
        ServedVersion::GatewayApi,
    ),
    crd(
        "gateway.networking.k8s.io",
        "grpcroutes",
        "GRPCRoute",
        ServedVersion::GatewayApi,
    ),
    // The experimental channel's kinds, at the version every release
    // that has them serves.
    crd(
        "gateway.networking.k8s.io",
        "tcproutes",
        "TCPRoute",
        ServedVersion::Fixed("v1alpha2"),
    ),
    crd(
        "gateway.networking.k8s.io",
        "tlsroutes",
        "TLSRoute",
        ServedVersion::Fixed("v1alpha2"),
    ),
    // Served as v1beta1 by every Gateway API release since 0.6 (v1 only
    // by the newest).
    crd(
        "gateway.networking.k8s.io",
        "referencegrants",
        "ReferenceGrant",
        ServedVersion::Fixed("v1beta1"),
    ),
];

const fn core(
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    field_selector: Option<&'static str>,
) -> Watched {
    Watched {
        group: "",
        resource,
        kind,
        version: ServedVersion::Fixed("v1"),
        namespaced,
        field_selector,
        verbs: LIST_WATCH,
    }
}

const fn crd(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    version: ServedVersion,
) -> Watched {
    Watched {
        group,
        resource,
        kind,
        version,
        namespaced: true,
        field_selector: None,
        verbs: LIST_WATCH,
    }
}

/// Which versions of the CRDs to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOptions {
    /// Served version of `networking.istio.io` and `security.istio.io`
    /// (`v1` since Istio 1.22).
    pub istio_version: String,
    /// Served version of `gateway.networking.k8s.io`.
    pub gateway_api_version: String,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            istio_version: "v1".into(),
            gateway_api_version: "v1".into(),
        }
    }
}

impl KubeOptions {
    /// The `ApiResource` watched for `watched`.
    pub fn api_resource(&self, watched: &Watched) -> ApiResource {
        let version = match watched.version {
            ServedVersion::Fixed(v) => v,
            ServedVersion::Istio => &self.istio_version,
            ServedVersion::GatewayApi => &self.gateway_api_version,
        };
        let api_version = if watched.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", watched.group)
        };
        ApiResource {
            group: watched.group.into(),
            version: version.into(),
            api_version,
            kind: watched.kind.into(),
            plural: watched.resource.into(),
        }
    }

    /// Refuses versions mesh-config cannot parse.
    fn check(&self) -> anyhow::Result<()> {
        let known = |group: &str, version: &str, list: &[&str]| {
            let api = format!("{group}/{version}");
            anyhow::ensure!(
                list.contains(&api.as_str()),
                "{api} is not a supported API version (supported: {})",
                list.join(", ")
            );
            Ok(())
        };
        known(
            "networking.istio.io",
            &self.istio_version,
            &NETWORKING_VERSIONS,
        )?;
        known("security.istio.io", &self.istio_version, &SECURITY_VERSIONS)?;
        known(
            "gateway.networking.k8s.io",
            &self.gateway_api_version,
            &GATEWAY_API_VERSIONS,
        )
    }
}

/// Watches on every kind of [`WATCHED`]; stops them when dropped.
pub struct KubeSource {
    kinds: Vec<KindWatch>,
    generation: watch::Receiver<u64>,
    /// The generation the last load saw.
    loaded: u64,
}

struct KindWatch {
    resource: ApiResource,
    store: Store<DynamicObject>,
    status: Arc<Mutex<KindStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KindWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where one kind's watch stands.
#[derive(Clone, Debug, Default)]
struct KindStatus {
    /// Listed at least once, or known to be unavailable (404/403).
    synced: bool,
    /// Why the kind is unavailable, while it is.
    unavailable: Option<String>,
    /// The last other error, logged once.
    last_error: Option<String>,
}

/// How often the wait for the first list says what it still waits for.
const SYNC_REPORT: Duration = Duration::from_secs(10);

impl KubeSource {
    /// Starts a watcher per kind and waits until each has listed once (or
    /// is known to be unavailable), so the first config version is
    /// complete.
    pub async fn start(client: Client, options: &KubeOptions) -> anyhow::Result<Self> {
        options.check()?;
        let (generation_tx, generation) = watch::channel(0u64);
        let generation_tx = Arc::new(generation_tx);
        let kinds: Vec<KindWatch> = WATCHED
            .iter()
            .map(|watched| {
                let resource = options.api_resource(watched);
                let writer = Writer::new(resource.clone());
                let store = writer.as_reader();
                let status = Arc::new(Mutex::new(KindStatus::default()));
                let task = tokio::spawn(run_watch(
                    Api::all_with(client.clone(), &resource),
                    resource.clone(),
                    *watched,
                    writer,
                    status.clone(),
                    generation_tx.clone(),
                ));
                KindWatch {
                    resource,
                    store,
                    status,
                    task,
                }
            })
            .collect();
        let mut source = Self {
            kinds,
            generation,
            loaded: 0,
        };
        source.wait_synced().await?;
        Ok(source)
    }

    async fn wait_synced(&mut self) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        let mut report = started + SYNC_REPORT;
        loop {
            self.generation.borrow_and_update();
            let pending = self.pending();
            if pending.is_empty() {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Kubernetes API listed"
                );
                return Ok(());
            }
            tokio::select! {
                changed = self.generation.changed() => changed.context("Kubernetes watches stopped")?,
                () = tokio::time::sleep_until(report) => {
                    report += SYNC_REPORT;
                    tracing::warn!(waiting_for = %pending.join(", "), "still waiting for the first list from the Kubernetes API");
                }
            }
        }
    }

    /// Kinds not listed yet, with the last error if any.
    fn pending(&self) -> Vec<String> {
        self.kinds
            .iter()
            .filter_map(|kind| {
                let status = lock(&kind.status);
                (!status.synced).then(|| match &status.last_error {
                    Some(error) => format!("{} ({error})", kind.resource.api_version_kind()),
                    None => kind.resource.api_version_kind(),
                })
            })
            .collect()
    }

    /// Converts every object held into a [`Loaded`]: per kind, oldest
    /// first (Istio's rule for conflicting config), then by namespace and
    /// name.
    pub fn load(&mut self) -> Loaded {
        self.loaded = *self.generation.borrow_and_update();
        let mut loaded = Loaded::default();
        for kind in &self.kinds {
            let mut objects = kind.store.state();
            objects.sort_by(|a, b| {
                (a.creation_timestamp(), a.namespace(), a.name_any()).cmp(&(
                    b.creation_timestamp(),
                    b.namespace(),
                    b.name_any(),
                ))
            });
            for object in objects {
                loaded.merge(convert(&kind.resource, &object));
            }
        }
        loaded
    }

    /// Waits for a watch event after the last [`load`](Self::load), then
    /// until the watches have been quiet for [`SETTLE`].
    pub async fn changed(&mut self) {
        while *self.generation.borrow_and_update() == self.loaded {
            if self.generation.changed().await.is_err() {
                // Watch tasks only end when the source is dropped.
                std::future::pending::<()>().await;
            }
        }
        loop {
            let seen = *self.generation.borrow_and_update();
            tokio::time::sleep(SETTLE).await;
            if *self.generation.borrow() == seen {
                return;
            }
        }
    }
}

/// One object through mesh-config's parser.
fn convert(resource: &ApiResource, object: &DynamicObject) -> Loaded {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let source_name = if namespace.is_empty() {
        format!("kubernetes:{}/{name}", resource.kind)
    } else {
        format!("kubernetes:{}/{namespace}/{name}", resource.kind)
    };
    let mut value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(err) => {
            return Loaded {
                errors: vec![mesh_config::LoadError {
                    source_name,
                    document: 1,
                    resource: None,
                    kind: mesh_config::LoadErrorKind::Yaml(err.to_string()),
                }],
                ..Loaded::default()
            };
        }
    };
    // List items carry no apiVersion/kind; the watched resource says them.
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    load_value(&source_name, &value)
}

/// Runs one kind's watcher into its store until the source is dropped.
async fn run_watch(
    api: Api<DynamicObject>,
    resource: ApiResource,
    watched: Watched,
    mut writer: Writer<DynamicObject>,
    status: Arc<Mutex<KindStatus>>,
    generation: Arc<watch::Sender<u64>>,
) {
    let kind = resource.api_version_kind();
    let mut config = watcher::Config::default();
    if let Some(fields) = watched.field_selector {
        config = config.fields(fields);
    }
    let bump = || generation.send_modify(|g| *g += 1);
    let stream = watcher(api, config)
        // Server-side apply bookkeeping: large, and never read.
        .modify(|object| object.managed_fields_mut().clear())
        .default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                writer.apply_watcher_event(&event);
                match event {
                    watcher::Event::InitDone => {
                        let mut status = lock(&status);
                        if let Some(reason) = status.unavailable.take() {
                            tracing::info!(%kind, was = %reason, "kind now served; watching it");
                        }
                        status.synced = true;
                        status.last_error = None;
                        drop(status);
                        bump();
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => bump(),
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
            Err(err) => {
                let unavailable = match &err {
                    // On list, or on a new watch after the CRD was removed.
                    watcher::Error::InitialListFailed(kube::Error::Api(status))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(status))
                        if status.code == 404 || status.code == 403 =>
                    {
                        Some(if status.code == 404 {
                            "not served by the API server (CRD not installed?)".to_owned()
                        } else {
                            format!("forbidden by RBAC: {}", status.message)
                        })
                    }
                    _ => None,
                };
                let mut status = lock(&status);
                match unavailable {
                    Some(reason) => {
                        if status.unavailable.is_none() {
                            tracing::warn!(%kind, %reason, "treating the kind as empty; retrying with backoff");
                        }
                        status.unavailable = Some(reason);
                        let was_synced = status.synced;
                        status.synced = true;
                        drop(status);
                        // Forget what it held: it is gone from the cluster.
                        let held = !writer.as_reader().is_empty();
                        writer.apply_watcher_event(&watcher::Event::Init);
                        writer.apply_watcher_event(&watcher::Event::InitDone);
                        if held || !was_synced {
                            bump();
                        }
                    }
                    // Normal after etcd compaction: the watcher lists again.
                    None if matches!(&err, watcher::Error::WatchError(s) if s.code == 410) => {
                        tracing::debug!(%kind, "watch expired (410 Gone); listing again");
                    }
                    None => {
                        let error = format!("{:#}", anyhow::Error::new(err));
                        if status.last_error.as_ref() != Some(&error) {
                            tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
                        } else {
                            tracing::debug!(%kind, %error, "watch failed again");
                        }
                        status.last_error = Some(error);
                    }
                }
            }
        }
    }
}

fn lock(status: &Mutex<KindStatus>) -> std::sync::MutexGuard<'_, KindStatus> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// `networking.istio.io/v1 VirtualService`.
trait ApiVersionKind {
    fn api_version_kind(&self) -> String;
}

impl ApiVersionKind for ApiResource {
    fn api_version_kind(&self) -> String {
        format!("{} {}", self.api_version, self.kind)
    }
}
