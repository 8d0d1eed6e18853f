//! A delta ADS client: one gRPC stream to the control plane carrying every
//! subscribed type, each response applied by a [`Handler`] and answered with
//! an ACK, or a NACK naming what was rejected.
//!
//! The handler's state is the proxy's config: it survives disconnects, so a
//! proxy keeps serving its last good config while the control plane is away.
//! On reconnect the client announces the versions it holds
//! (`initial_resource_versions`) so only differences come back. Reconnects
//! back off exponentially (with jitter) up to [`MAX_BACKOFF`].

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use bytes::Bytes;
use mesh_api::envoy::{
    envoy::{config::core::v3::Node, service::discovery::v3::DeltaDiscoveryRequest},
    google::{
        protobuf::{Struct, Value, value},
        rpc::Status as RpcStatus,
    },
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, metadata::MetadataValue};

pub mod channel;
mod wire;

/// Names to versions held, per type URL: every resource a proxy holds is an
/// entry, so hashing is on the path of every update (foldhash: the names
/// come from the control plane, which is trusted).
type Known = foldhash::HashMap<String, foldhash::HashMap<String, String>>;

pub use channel::{ChannelError, Target};

/// Largest HTTP/2 frame the client accepts: a first push is megabytes, and
/// HTTP/2's default 16 KiB frames cost a frame per 16 KiB on both ends.
const MAX_FRAME_SIZE: u32 = 1 << 20;

/// First reconnect delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Control plane address: `https://mesh-control.istio-system.svc:15012`,
    /// or plaintext `http://10.255.0.254:15010` (lab and debugging only).
    pub address: String,
    /// PEM file of the mesh root the server's certificate must verify
    /// against; required for `https://`.
    pub root_cert: Option<PathBuf>,
    /// File holding the bearer token (read at every connect, so it can be
    /// rotated); none sends no token.
    pub token_file: Option<PathBuf>,
    /// `node.id` announced to the control plane.
    pub node_id: String,
    /// Type URLs to subscribe to (wildcard).
    pub types: Vec<&'static str>,
    /// `node.metadata` string fields (a waypoint names itself here).
    pub metadata: Vec<(String, String)>,
}

/// One resource of a response (its version is the client's bookkeeping,
/// announced on reconnect, not the handler's).
#[derive(Debug)]
pub struct Resource {
    /// Resource name.
    pub name: String,
    /// Encoded message (the `Any`'s value), a slice of the received
    /// response (not a copy).
    pub value: Bytes,
}

/// A response for one type: resources added or changed, names removed.
#[derive(Debug)]
pub struct Update {
    /// Type URL.
    pub type_url: String,
    /// Added or changed resources.
    pub resources: Vec<Resource>,
    /// Names of removed resources.
    pub removed: Vec<String>,
}

/// Resources a handler refused, with why; the rest of the update applied.
#[derive(Debug, Default)]
pub struct Rejected(pub Vec<(String, String)>);

/// Applies updates to the proxy's config.
pub trait Handler: Send + 'static {
    /// Applies `update`. Resources that cannot be decoded or honoured are
    /// returned in `Rejected` (the client NACKs with their reasons) and must
    /// leave the previous version of that resource in force.
    fn apply(&mut self, update: Update) -> Result<(), Rejected>;

    /// Called once every subscribed type has had its first response on a
    /// stream (the proxy is in sync).
    fn synced(&mut self) {}
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Could not connect (or, over TLS, verify the server).
    #[error(transparent)]
    Connect(#[from] ChannelError),
    /// The token file could not be read.
    #[error("reading token {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The server refused or ended the stream.
    #[error("stream: {}", channel::chain(.0))]
    Status(#[from] tonic::Status),
    /// The stream ended cleanly.
    #[error("control plane closed the stream")]
    Closed,
}

/// Runs forever: connect, sync, apply; reconnect with backoff on failure.
pub async fn run(config: ClientConfig, mut handler: impl Handler) {
    let mut known = Known::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let error = stream_once(&config, &mut handler, &mut known).await;
        // A stream that lived a while was healthy: start over from the floor.
        if started.elapsed() > MAX_BACKOFF {
            backoff = MIN_BACKOFF;
        }
        let delay = jitter(backoff);
        tracing::warn!(%error, retry_in = ?delay, "xDS stream down; keeping the last good config");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// 50–100 % of `base`, so many proxies do not reconnect in lockstep.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

async fn stream_once(
    config: &ClientConfig,
    handler: &mut impl Handler,
    known: &mut Known,
) -> StreamError {
    match stream_inner(config, handler, known).await {
        Ok(()) => StreamError::Closed,
        Err(error) => error,
    }
}

async fn stream_inner(
    config: &ClientConfig,
    handler: &mut impl Handler,
    known: &mut Known,
) -> Result<(), StreamError> {
    let token = match &config.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| StreamError::Token {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let target = Target {
        address: config.address.clone(),
        root_cert: config.root_cert.clone(),
    };
    let channel = target
        .connect(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .max_frame_size(MAX_FRAME_SIZE)
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .await?;
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(64 * 1024 * 1024);

    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: config.node_id.clone(),
        metadata: (!config.metadata.is_empty()).then(|| Struct {
            fields: config
                .metadata
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        Value {
                            kind: Some(value::Kind::StringValue(v.clone())),
                        },
                    )
                })
                .collect(),
        }),
        ..Default::default()
    };
    for type_url in &config.types {
        let initial_resource_versions = known
            .get(*type_url)
            .map(|held| held.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: (*type_url).to_owned(),
                resource_names_subscribe: vec!["*".to_owned()],
                initial_resource_versions,
                ..Default::default()
            })
            .await;
    }
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(token) = token
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
    {
        request.metadata_mut().insert("authorization", value);
    }
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("xDS channel not ready: {e}")))?;
    // The generated client would decode into Envoy's full message; this
    // reads the same bytes into the client's view ([`wire`]).
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, wire::DeltaResponse>::default();
    let mut responses = client
        .streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(DELTA_ADS_PATH),
            codec,
        )
        .await?
        .into_inner();
    tracing::info!(address = %config.address, "xDS stream open");

    let mut unsynced: Vec<&str> = config.types.clone();
    while let Some(response) = responses.next().await {
        let response = response?;
        let reply = apply(handler, known, response);
        let type_url = reply.type_url.clone();
        if tx.send(reply).await.is_err() {
            return Err(StreamError::Closed);
        }
        if !unsynced.is_empty() {
            unsynced.retain(|t| *t != type_url);
            if unsynced.is_empty() {
                tracing::info!("xDS in sync");
                handler.synced();
            }
        }
    }
    Ok(())
}

/// gRPC path of `AggregatedDiscoveryService.DeltaAggregatedResources`.
const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Applies one response and builds its ACK or NACK.
///
/// The versions held are recorded as the resources pass to the handler
/// (each name copied once, each version moved); a resource the handler
/// rejects gets back the version it had, as the handler keeps that one.
fn apply(
    handler: &mut impl Handler,
    known: &mut Known,
    response: wire::DeltaResponse,
) -> DeltaDiscoveryRequest {
    let held = known.entry(response.type_url.clone()).or_default();
    for name in &response.removed_resources {
        held.remove(name);
    }
    held.reserve(response.resources.len());
    // Versions replaced by this response: empty for a first push, and as
    // long as what changed otherwise.
    let mut replaced: Vec<(String, String)> = Vec::new();
    let resources = response
        .resources
        .into_iter()
        .map(|r| {
            if let Some(old) = held.insert(r.name.clone(), r.version) {
                replaced.push((r.name.clone(), old));
            }
            Resource {
                name: r.name,
                value: r.resource.map(|any| any.value).unwrap_or_default(),
            }
        })
        .collect();
    let outcome = handler.apply(Update {
        type_url: response.type_url.clone(),
        resources,
        removed: response.removed_resources,
    });
    let rejected = match outcome {
        Ok(()) => Vec::new(),
        Err(Rejected(list)) => list,
    };
    for (name, _) in &rejected {
        match replaced.iter().position(|(n, _)| n == name) {
            Some(i) => {
                let (name, old) = replaced.swap_remove(i);
                held.insert(name, old);
            }
            None => {
                held.remove(name);
            }
        }
    }
    let error_detail = (!rejected.is_empty()).then(|| {
        let message = rejected
            .iter()
            .map(|(name, why)| format!("{name}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(r#type = %response.type_url, %message, "rejecting config (NACK)");
        RpcStatus {
            code: tonic::Code::InvalidArgument as i32,
            message,
            ..Default::default()
        }
    });
    DeltaDiscoveryRequest {
        type_url: response.type_url,
        response_nonce: response.nonce,
        error_detail,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the names it is given and refuses those in `refuse`.
    #[derive(Default)]
    struct Recorder {
        refuse: Vec<&'static str>,
        applied: Vec<Vec<String>>,
    }

    impl Handler for Recorder {
        fn apply(&mut self, update: Update) -> Result<(), Rejected> {
            self.applied
                .push(update.resources.iter().map(|r| r.name.clone()).collect());
            let refused: Vec<(String, String)> = update
                .resources
                .iter()
                .filter(|r| self.refuse.contains(&r.name.as_str()))
                .map(|r| (r.name.clone(), "bad".to_owned()))
                .collect();
            if refused.is_empty() {
                Ok(())
            } else {
                Err(Rejected(refused))
            }
        }
    }

    fn response(nonce: &str, resources: &[(&str, &str)], removed: &[&str]) -> wire::DeltaResponse {
        wire::DeltaResponse {
            resources: resources
                .iter()
                .map(|(name, version)| wire::WireResource {
                    version: (*version).to_owned(),
                    resource: Some(wire::WireAny {
                        value: Bytes::from_static(b"x"),
                    }),
                    name: (*name).to_owned(),
                })
                .collect(),
            type_url: "t".to_owned(),
            nonce: nonce.to_owned(),
            removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn held(known: &Known) -> Vec<(String, String)> {
        let mut held: Vec<_> = known["t"]
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        held.sort();
        held
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn acks_and_records_versions_held() {
        let mut handler = Recorder::default();
        let mut known = Known::default();
        let ack = apply(
            &mut handler,
            &mut known,
            response("1-1", &[("a", "1"), ("b", "1")], &[]),
        );
        assert_eq!(ack.response_nonce, "1-1");
        assert_eq!(ack.type_url, "t");
        assert!(ack.error_detail.is_none());
        assert_eq!(handler.applied, vec![vec!["a".to_owned(), "b".to_owned()]]);
        assert_eq!(held(&known), pairs(&[("a", "1"), ("b", "1")]));

        apply(
            &mut handler,
            &mut known,
            response("2-2", &[("b", "2")], &["a"]),
        );
        assert_eq!(held(&known), pairs(&[("b", "2")]));
    }

    #[test]
    fn a_rejected_resource_keeps_the_version_the_proxy_still_has() {
        let mut handler = Recorder::default();
        let mut known = Known::default();
        apply(
            &mut handler,
            &mut known,
            response("1-1", &[("a", "1"), ("b", "1")], &[]),
        );
        handler.refuse = vec!["a", "new"];
        let nack = apply(
            &mut handler,
            &mut known,
            response("2-2", &[("a", "2"), ("b", "2"), ("new", "2")], &[]),
        );
        let error = nack.error_detail.expect("a NACK");
        assert_eq!(error.message, "a: bad; new: bad");
        assert_eq!(nack.response_nonce, "2-2");
        // `a` stays at the version before the rejected one; `new` was never
        // held; `b` was accepted.
        assert_eq!(held(&known), pairs(&[("a", "1"), ("b", "2")]));
    }
}
