//! Delta ADS (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`): the control plane's push channel.
//!
//! Each config version becomes an immutable [`Snapshot`] of resources per
//! type URL, each with a content hash as its version. A stream remembers which
//! versions it sent and pushes only differences (changed resources, and
//! `removed_resources` for those gone), so a change to one pod costs one
//! resource on the wire. ACKs and NACKs are recorded per proxy and type in the
//! [`ProxyRegistry`], the data behind the status endpoint.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use futures::Stream;
use mesh_api::{
    ads::aggregated_discovery_service_server::AggregatedDiscoveryService,
    encoded::{EncodedDeltaResponse, EncodedResource},
    envoy::{
        envoy::service::discovery::v3::{
            DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse, Resource,
        },
        google::protobuf::Any,
    },
};
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{auth::Authenticator, metrics::Metrics};

/// Resources of one type, by name, in name order.
pub type TypeMap = BTreeMap<Arc<str>, Arc<Entry>>;

/// One resource, encoded once and shared by every stream that sends it.
#[derive(Debug)]
pub struct Entry {
    /// Hash of the encoded message: equal versions mean equal content.
    pub version: u64,
    /// The `Resource` (name, version, message) as it goes on the wire.
    pub encoded: EncodedResource,
    /// The one proxy scope (a waypoint's `<namespace>/<name>`) it is for;
    /// `None`: every subscriber of the type gets it.
    pub scope: Option<Arc<str>>,
}

/// One version of everything the control plane serves.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Monotonic config version.
    pub version: u64,
    /// Resources by type URL, then by name.
    pub types: HashMap<&'static str, Arc<TypeMap>>,
}

/// Builds a [`Snapshot`], reusing the previous snapshot's entries whose
/// content did not change, so consecutive versions share memory.
#[derive(Debug)]
pub struct SnapshotBuilder<'a> {
    previous: &'a Snapshot,
    types: HashMap<&'static str, TypeMap>,
}

impl<'a> SnapshotBuilder<'a> {
    /// Starts a snapshot following `previous`.
    pub fn new(previous: &'a Snapshot) -> Self {
        Self {
            previous,
            types: HashMap::new(),
        }
    }

    /// Adds `message` as resource `name` of `type_url`, for every proxy.
    pub fn insert(&mut self, type_url: &'static str, name: &str, message: &impl Message) {
        self.insert_with(type_url, name, message, None, None);
    }

    /// Adds `message` as resource `name` of `type_url`, only for proxies of
    /// `scope` when given. Its version is the hash of its encoding, or
    /// `content_hash` for messages holding maps (whose encoding order
    /// varies from one build to the next).
    pub fn insert_with(
        &mut self,
        type_url: &'static str,
        name: &str,
        message: &impl Message,
        scope: Option<&str>,
        content_hash: Option<u64>,
    ) {
        let value = message.encode_to_vec();
        let version = content_hash.unwrap_or_else(|| {
            let mut hasher = std::hash::DefaultHasher::new();
            value.hash(&mut hasher);
            hasher.finish()
        });
        let reused = self
            .previous
            .types
            .get(type_url)
            .and_then(|map| map.get_key_value(name))
            .filter(|(_, entry)| entry.version == version && entry.scope.as_deref() == scope)
            .map(|(name, entry)| (name.clone(), entry.clone()));
        let (name, entry) = reused.unwrap_or_else(|| {
            let entry = Entry {
                version,
                encoded: EncodedResource::new(&Resource {
                    name: name.to_owned(),
                    version: format!("{version:016x}"),
                    resource: Some(Any {
                        type_url: type_url.to_owned(),
                        value,
                    }),
                    ..Default::default()
                }),
                scope: scope.map(Arc::from),
            };
            (Arc::from(name), Arc::new(entry))
        });
        self.types.entry(type_url).or_default().insert(name, entry);
    }

    /// The snapshot, with config version `version`.
    pub fn build(self, version: u64) -> Snapshot {
        Snapshot {
            version,
            types: self
                .types
                .into_iter()
                .map(|(type_url, map)| (type_url, Arc::new(map)))
                .collect(),
        }
    }
}

/// What one proxy has been sent and has acknowledged, per type.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyStatus {
    /// `node.id` the proxy announced.
    pub proxy: String,
    /// The node its token belongs to.
    pub node: String,
    /// Seconds since the epoch when the stream opened.
    pub connected_at: u64,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// Sync state of one type on one stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    /// Config version of the last response sent.
    pub sent_version: u64,
    /// Config version of the last response acknowledged.
    pub acked_version: Option<u64>,
    /// The last NACK: version and the proxy's reason.
    pub last_nack: Option<(u64, String)>,
    /// Resources the proxy holds, as far as we know.
    pub resources: usize,
}

/// Every connected proxy's status.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    /// A copy of every connected proxy's status.
    pub fn statuses(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        // The map stays consistent even if a holder panicked: every update is
        // a single insert or field write.
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, stream: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.lock().get_mut(&stream) {
            f(status);
        }
    }
}

/// The ADS service.
pub struct AdsService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    auth: Arc<Authenticator>,
    registry: Arc<ProxyRegistry>,
    metrics: Arc<Metrics>,
    next_stream: AtomicU64,
}

impl AdsService {
    /// Serves the snapshots published on `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        auth: Arc<Authenticator>,
        registry: Arc<ProxyRegistry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            snapshots,
            auth,
            registry,
            metrics,
            next_stream: AtomicU64::new(1),
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<EncodedDeltaResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world ADS is not served; use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(2);
        self.registry.lock().insert(
            id,
            ProxyStatus {
                node: caller.node.clone(),
                connected_at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                ..Default::default()
            },
        );
        self.metrics.xds_connections.inc();
        let stream = DeltaStream {
            id,
            requests: request.into_inner(),
            responses: tx,
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            subscriptions: HashMap::new(),
            scope: None,
            nonce: 0,
            sent_nonces: VecDeque::new(),
        };
        let span = tracing::info_span!("xds", stream = id, node = %caller.node);
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one stream subscribed to for one type, and what it was sent.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    held: Held,
    answered: bool,
}

/// What the proxy holds of one type.
#[derive(Debug)]
enum Held {
    /// Exactly this map, as of the last push: the usual state of a wildcard
    /// subscriber, and O(1) memory however large the cluster.
    Map(Arc<TypeMap>),
    /// Names and versions: announced on reconnect, or a named subscription.
    Versions(HashMap<String, u64>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Versions(HashMap::new())
    }
}

impl Held {
    fn version(&self, name: &str) -> Option<u64> {
        match self {
            Held::Map(map) => map.get(name).map(|e| e.version),
            Held::Versions(versions) => versions.get(name).copied(),
        }
    }

    fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Held::Map(map) => Box::new(map.keys().map(|k| &**k)),
            Held::Versions(versions) => Box::new(versions.keys().map(String::as_str)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Held::Map(map) => map.len(),
            Held::Versions(versions) => versions.len(),
        }
    }
}

/// Most resources in one response: a large first push goes out as several
/// responses, each built only when the stream can take it, so a proxy that
/// reads slowly costs a bounded amount of memory.
const MAX_RESOURCES_PER_RESPONSE: usize = 500;

struct DeltaStream {
    id: u64,
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<EncodedDeltaResponse, Status>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<ProxyRegistry>,
    metrics: Arc<Metrics>,
    subscriptions: HashMap<String, Subscription>,
    /// The waypoint this proxy is (node metadata), which scoped resources
    /// must name to be sent to it.
    scope: Option<String>,
    nonce: u64,
    /// Recent nonces with their type URL and config version, for matching
    /// ACKs; bounded, as a proxy that never answers must not grow it.
    sent_nonces: VecDeque<(String, String, u64)>,
}

/// How many unanswered responses a stream remembers: more than one full
/// push of a large type is chunked into (a 512,000-resource type at
/// [`MAX_RESOURCES_PER_RESPONSE`]), so an ACK or NACK of a push's first
/// chunks is still matched while its last ones are in flight.
const MAX_PENDING_NONCES: usize = 1024;

impl DeltaStream {
    async fn run(mut self) {
        tracing::debug!("stream opened");
        let outcome = self.serve().await;
        self.registry.lock().remove(&self.id);
        self.metrics.xds_connections.dec();
        match outcome {
            Ok(()) => tracing::info!("stream closed by the proxy"),
            Err(reason) => tracing::info!(%reason, "stream ended"),
        }
    }

    async fn serve(&mut self) -> Result<(), String> {
        loop {
            tokio::select! {
                request = self.requests.next() => match request {
                    None => return Ok(()),
                    Some(Err(status)) => return Err(status.to_string()),
                    Some(Ok(request)) => self.on_request(request).await?,
                },
                changed = self.snapshots.changed() => {
                    changed.map_err(|_| "control plane shutting down".to_owned())?;
                    let types: Vec<String> = self.subscriptions.keys().cloned().collect();
                    for type_url in types {
                        self.push(&type_url).await?;
                    }
                }
            }
        }
    }

    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), String> {
        let type_url = request.type_url.clone();
        if let Some(node) = &request.node {
            let proxy = node.id.clone();
            self.registry.update(self.id, |s| s.proxy = proxy);
            self.scope = node
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get(crate::waypoint::NODE_METADATA_WAYPOINT))
                .and_then(|v| match &v.kind {
                    Some(mesh_api::envoy::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                });
        }
        if !request.response_nonce.is_empty() {
            self.on_ack(&request);
        }
        let first = !self.subscriptions.contains_key(&type_url);
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        let mut changed = first;
        if first {
            subscription.wildcard = request.resource_names_subscribe.is_empty();
            // Versions we did not produce (unparseable) mean "resend".
            subscription.held = Held::Versions(
                request
                    .initial_resource_versions
                    .iter()
                    .map(|(name, version)| {
                        (name.clone(), u64::from_str_radix(version, 16).unwrap_or(0))
                    })
                    .collect(),
            );
        }
        for name in &request.resource_names_subscribe {
            changed = true;
            if name == "*" {
                subscription.wildcard = true;
            } else {
                subscription.names.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            changed = true;
            if name == "*" {
                subscription.wildcard = false;
            } else {
                subscription.names.remove(name);
            }
        }
        if changed {
            self.push(&type_url).await?;
        }
        Ok(())
    }

    fn on_ack(&mut self, request: &DeltaDiscoveryRequest) {
        let position = self
            .sent_nonces
            .iter()
            .position(|(nonce, _, _)| *nonce == request.response_nonce);
        let Some((_, type_url, version)) = position.and_then(|i| self.sent_nonces.remove(i)) else {
            tracing::debug!(nonce = %request.response_nonce, "response to an unknown nonce");
            return;
        };
        match &request.error_detail {
            Some(error) => {
                tracing::warn!(
                    r#type = %type_url,
                    version,
                    reason = %error.message,
                    "proxy rejected config (NACK); it keeps its previous config"
                );
                self.metrics
                    .xds_rejects
                    .get_or_create(&Metrics::type_labels(&type_url))
                    .inc();
                let reason = error.message.clone();
                self.registry.update(self.id, |s| {
                    s.types.entry(type_url).or_default().last_nack = Some((version, reason));
                });
            }
            None => self.registry.update(self.id, |s| {
                s.types.entry(type_url).or_default().acked_version = Some(version);
            }),
        }
    }

    /// Sends what changed for `type_url` since the last push, if anything
    /// did (or if the type was never answered), in chunks of at most
    /// [`MAX_RESOURCES_PER_RESPONSE`].
    async fn push(&mut self, type_url: &str) -> Result<(), String> {
        let snapshot = self.snapshots.borrow().clone();
        let current = snapshot.types.get(type_url).cloned().unwrap_or_default();
        let Some(subscription) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        if let Held::Map(held) = &subscription.held
            && subscription.wildcard
            && Arc::ptr_eq(held, &current)
        {
            return Ok(());
        }
        let scope = self.scope.as_deref();
        let visible = |entry: &Entry| entry.scope.is_none() || entry.scope.as_deref() == scope;
        let wanted = |name: &str| subscription.wildcard || subscription.names.contains(name);
        let changed: Vec<Arc<Entry>> = current
            .iter()
            .filter(|(name, entry)| {
                wanted(name)
                    && visible(entry)
                    && subscription.held.version(name) != Some(entry.version)
            })
            .map(|(_, entry)| entry.clone())
            .collect();
        let removed: Vec<String> = subscription
            .held
            .names()
            .filter(|name| !wanted(name) || current.get(*name).is_none_or(|entry| !visible(entry)))
            .map(str::to_owned)
            .collect();
        if changed.is_empty() && removed.is_empty() && subscription.answered {
            subscription.held = held_after(subscription, &current, scope);
            return Ok(());
        }
        subscription.answered = true;
        subscription.held = held_after(subscription, &current, scope);
        let holding = subscription.held.len();

        let chunks = changed.len().div_ceil(MAX_RESOURCES_PER_RESPONSE).max(1);
        let mut removed = Some(removed);
        for (index, chunk) in changed
            .chunks(MAX_RESOURCES_PER_RESPONSE)
            .chain(std::iter::once(&[][..]))
            .take(chunks)
            .enumerate()
        {
            self.nonce += 1;
            let nonce = format!("{}-{}", snapshot.version, self.nonce);
            if self.sent_nonces.len() == MAX_PENDING_NONCES {
                self.sent_nonces.pop_front();
            }
            self.sent_nonces
                .push_back((nonce.clone(), type_url.to_owned(), snapshot.version));
            let removed = if index == 0 {
                removed.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            tracing::debug!(
                r#type = type_url,
                version = snapshot.version,
                changed = chunk.len(),
                removed = removed.len(),
                part = index + 1,
                parts = chunks,
                "push"
            );
            let response = EncodedDeltaResponse::new(
                &snapshot.version.to_string(),
                type_url,
                &nonce,
                chunk.iter().map(|entry| &entry.encoded),
                &removed,
            );
            self.responses
                .send(Ok(response))
                .await
                .map_err(|_| "proxy went away".to_owned())?;
            self.metrics
                .xds_pushes
                .get_or_create(&Metrics::type_labels(type_url))
                .inc();
        }
        let version = snapshot.version;
        self.registry.update(self.id, |s| {
            let status = s.types.entry(type_url.to_owned()).or_default();
            status.sent_version = version;
            status.resources = holding;
        });
        Ok(())
    }
}

/// What a subscriber of `scope` holds once `current` is pushed to it.
fn held_after(subscription: &Subscription, current: &Arc<TypeMap>, scope: Option<&str>) -> Held {
    let scoped = current.values().any(|entry| entry.scope.is_some());
    if subscription.wildcard && !scoped {
        Held::Map(current.clone())
    } else {
        Held::Versions(
            current
                .iter()
                .filter(|(name, entry)| {
                    (subscription.wildcard || subscription.names.contains(&***name))
                        && (entry.scope.is_none() || entry.scope.as_deref() == scope)
                })
                .map(|(name, entry)| (name.to_string(), entry.version))
                .collect(),
        )
    }
}
