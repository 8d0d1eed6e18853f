//! Relaying captured connections.
//!
//! Outbound: the original destination comes from the capture maps, a service
//! VIP is load balanced over its healthy endpoints (from xDS), and the
//! connection goes to the chosen endpoint: over HBONE (mutual TLS, the
//! pod's own certificate, the destination's identity checked) when the
//! destination is in the mesh, in plaintext otherwise, always from inside
//! the pod so its own address is the source.
//! Inbound: HBONE tunnels (15008) and plaintext (15006) alike go through L4
//! policy, then are delivered to the app with the client's own address as
//! source.
//!
//! Every connection leaves one access record (`ztunnel::access`): direction,
//! pod, source, destination, endpoint, bytes each way, duration, and the
//! reason when it failed or was denied.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use mesh_ebpf_loader::capture::{Capture, netns_cookie};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    discovery::{Discovery, Resolved, WorkloadInfo, WorkloadLabels},
    fastpath::SameNode,
    identity::CertManager,
    inpod::PodNetns,
    metrics::{TcpLabels, TcpMetrics},
    policy::{Connection, Decision, PolicyStore, Target},
};

/// What the proxy knows of the pod a connection belongs to.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub name: String,
    /// The pod's IP: the source of its outbound connections.
    pub ip: std::net::Ipv4Addr,
    /// Its network namespace, where upstream sockets are created.
    pub netns: PodNetns,
    /// Its SPIFFE identity.
    pub identity: mesh_hbone::Identity,
    /// Its HBONE connections (dialled from inside the pod).
    pub pool: mesh_hbone::Pool,
}

/// State shared by every connection of the node.
pub struct Proxy {
    /// The capture maps (original destinations, delivery announcements).
    pub capture: Arc<Mutex<Capture>>,
    /// Workloads and services.
    pub discovery: Arc<Discovery>,
    /// L4 authorization policies.
    pub policy: Arc<PolicyStore>,
    /// Istio's TCP metrics.
    pub metrics: TcpMetrics,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// The relays open now, for the drain on shutdown.
    pub open: Arc<ztunnel::drain::OpenConnections>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

fn connection_id() -> u64 {
    NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed)
}

/// One connection's access record, written when it ends, and its metrics.
struct Access<'a> {
    id: u64,
    direction: &'static str,
    pod: &'a str,
    source: SocketAddr,
    destination: SocketAddr,
    endpoint: SocketAddr,
    started: Instant,
    metrics: &'a TcpMetrics,
    labels: TcpLabels,
}

/// Istio's labels for a connection between two (possibly unknown)
/// workloads; `source_principal` is the client's authenticated identity.
fn tcp_labels(
    reporter: &'static str,
    source: Option<&WorkloadInfo>,
    source_principal: Option<Arc<str>>,
    destination: Option<&WorkloadInfo>,
    service: Option<&str>,
    security: &'static str,
) -> TcpLabels {
    let labels =
        |w: Option<&WorkloadInfo>| w.map_or_else(WorkloadLabels::unknown, |w| w.labels.clone());
    let unknown = WorkloadLabels::unknown().workload.clone();
    TcpLabels {
        reporter,
        source: labels(source),
        source_principal: source_principal.unwrap_or_else(|| unknown.clone()),
        destination: labels(destination),
        destination_service: service.map_or(unknown, Arc::from),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security,
    }
}

impl Access<'_> {
    fn failed(&mut self, flags: &'static str, error: &str) {
        self.labels.response_flags = flags;
        self.metrics.opened.get_or_create(&self.labels).inc();
        self.metrics.closed.get_or_create(&self.labels).inc();
        info!(
            target: "ztunnel::access",
            conn = self.id,
            direction = self.direction,
            pod = %self.pod,
            src = %self.source,
            dst = %self.destination,
            endpoint = %self.endpoint,
            security = self.labels.connection_security_policy,
            error,
            "connection failed"
        );
    }

    fn opened(&self) {
        self.metrics.opened.get_or_create(&self.labels).inc();
    }

    fn closed(&self, sent: u64, received: u64, error: Option<&str>) {
        self.metrics.closed.get_or_create(&self.labels).inc();
        // From the client: what it sent us; to the client: what we sent it.
        self.metrics
            .received_bytes
            .get_or_create(&self.labels)
            .inc_by(sent);
        self.metrics
            .sent_bytes
            .get_or_create(&self.labels)
            .inc_by(received);
        info!(
            target: "ztunnel::access",
            conn = self.id,
            direction = self.direction,
            pod = %self.pod,
            src = %self.source,
            dst = %self.destination,
            endpoint = %self.endpoint,
            security = self.labels.connection_security_policy,
            src_identity = %self.labels.source_principal,
            dst_identity = %self.labels.destination.principal,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = error.unwrap_or(""),
            "connection closed"
        );
    }
}

impl Proxy {
    /// Handles a connection the pod opened, accepted on its 15001 listener.
    pub async fn outbound(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        client: TcpStream,
        peer: SocketAddr,
    ) {
        let id = connection_id();
        let span = info_span!("outbound", conn = id, pod = %pod.name);
        serve(span, self.open_outbound(&pod, client, peer, id)).await;
    }

    /// Resolves where an outbound connection goes and opens its upstream;
    /// `None` when it was refused (and recorded as such).
    async fn open_outbound<'a>(
        &'a self,
        pod: &'a PodContext,
        client: TcpStream,
        peer: SocketAddr,
        id: u64,
    ) -> Option<Box<Open<'a, Outbound>>> {
        let Some(destination) = self.original_destination(&client, peer) else {
            reset(client);
            return None;
        };
        let source = SocketAddr::new(pod.ip.into(), peer.port());
        let me = self.discovery.workload_by_ip(source.ip());
        let resolved = self.discovery.resolve(destination);
        let (endpoint, target, service) = match &resolved {
            Resolved::Workload {
                addr,
                workload,
                service,
            } => (*addr, Some(&**workload), service.as_deref()),
            Resolved::Waypoint {
                addr,
                workload,
                service,
            } => (*addr, Some(&**workload), Some(&**service)),
            Resolved::NoHealthyEndpoint { service } => (destination, None, Some(&**service)),
            Resolved::Passthrough => (destination, None, None),
        };
        let mut access = Access {
            id,
            direction: "outbound",
            pod: &pod.name,
            source,
            destination,
            endpoint,
            started: Instant::now(),
            metrics: &self.metrics,
            labels: tcp_labels(
                "source",
                me.as_deref(),
                me.as_deref().map(|w| w.labels.principal.clone()),
                target,
                service,
                "none",
            ),
        };
        // Services are load balanced here, from what the control plane
        // says; anything the mesh does not know goes where it was dialled.
        if let Resolved::NoHealthyEndpoint { service } = &resolved {
            access.failed("UH", &format!("no healthy endpoint of {service}"));
            reset(client);
            return None;
        }
        // HBONE peer and CONNECT target: a waypoint terminates HBONE
        // itself and gets the service address the pod dialled; a mesh
        // workload is reached through its own 15008.
        let hbone = match &resolved {
            Resolved::Waypoint { workload, addr, .. } => Some((&**workload, *addr, destination)),
            _ => target.filter(|w| w.hbone).map(|workload| {
                let peer = SocketAddr::new(endpoint.ip(), mesh_hbone::HBONE_PORT);
                (workload, peer, endpoint)
            }),
        };
        let upstream = match hbone {
            Some((workload, peer, target)) => {
                access.labels.connection_security_policy = "mutual_tls";
                self.tunnel(pod, workload, source, peer, target, service)
                    .await
                    .map(Outbound::Tunnel)
            }
            None => pod.netns.connect(endpoint).await.map(Outbound::Direct),
        };
        opened(access, client, upstream)
    }

    /// Handles a plaintext connection to the pod, accepted on its 15006
    /// listener: policy first, then delivery with the client's address.
    pub async fn inbound_plaintext(
        self: Arc<Self>,
        pod: Arc<PodContext>,
        client: TcpStream,
        peer: SocketAddr,
    ) {
        let id = connection_id();
        let span = info_span!("inbound", conn = id, pod = %pod.name);
        serve(span, self.open_inbound_plaintext(&pod, client, peer, id)).await;
    }

    /// Applies policy to a plaintext inbound connection and connects to the
    /// app; `None` when it was refused (and recorded as such).
    async fn open_inbound_plaintext<'a>(
        &'a self,
        pod: &'a PodContext,
        client: TcpStream,
        peer: SocketAddr,
        id: u64,
    ) -> Option<Box<Open<'a, TcpStream>>> {
        // sk_lookup handed us the connection unchanged: our local address
        // is the destination the client dialled.
        let destination = match client.local_addr() {
            Ok(addr) => addr,
            Err(err) => {
                warn!(%peer, %err, "reading the destination failed; closing the connection");
                return None;
            }
        };
        let caller = self.discovery.workload_by_ip(peer.ip());
        let me = self.discovery.workload_by_ip(destination.ip());
        let mut access = Access {
            id,
            direction: "inbound",
            pod: &pod.name,
            source: peer,
            destination,
            endpoint: destination,
            started: Instant::now(),
            metrics: &self.metrics,
            labels: tcp_labels(
                "destination",
                caller.as_deref(),
                None,
                me.as_deref(),
                None,
                "none",
            ),
        };
        let decision = self.authorize(&Connection {
            source_identity: None,
            source_ip: peer.ip(),
            destination_ip: destination.ip(),
            destination_port: destination.port(),
        });
        if decision != Decision::Allow {
            access.failed("DENY", &decision.to_string());
            reset(client);
            return None;
        }
        let upstream = self.deliver(pod, peer, destination).await;
        opened(access, client, upstream)
    }

    /// Opens an HBONE tunnel from `pod` through `peer` (the destination
    /// pod's 15008, or a waypoint's) to `target`, proving `pod`'s identity
    /// and checking that `peer` is `workload`.
    async fn tunnel(
        &self,
        pod: &PodContext,
        workload: &WorkloadInfo,
        source: SocketAddr,
        peer: SocketAddr,
        target: SocketAddr,
        service: Option<&str>,
    ) -> std::io::Result<mesh_hbone::Tunnel> {
        let expected: mesh_hbone::Identity = workload
            .identity()
            .parse()
            .map_err(|e| std::io::Error::other(format!("destination identity: {e}")))?;
        self.certs
            .get(&pod.identity.to_string())
            .await
            .map_err(|e| {
                std::io::Error::other(format!("no certificate for {}: {e}", pod.identity))
            })?;
        pod.pool
            .connect(mesh_hbone::ConnectRequest {
                local: pod.identity.clone(),
                peer_addr: peer,
                expected: vec![expected],
                authority: target,
                forwarded_for: source,
                host: service.map(str::to_owned),
                baggage: None,
                traceparent: None,
            })
            .await
            .map_err(std::io::Error::other)
    }

    /// The policy decision for a connection to a local workload.
    fn authorize(&self, connection: &Connection<'_>) -> Decision {
        match self.discovery.workload_by_ip(connection.destination_ip) {
            Some(workload) => self.policy.check(
                Target {
                    namespace: &workload.namespace,
                    selected_by: &workload.authorization_policies,
                },
                connection,
            ),
            // Not known yet (xDS still syncing): no policy can select it.
            None => Decision::Allow,
        }
    }

    /// Connects to the pod's app at `destination` on behalf of `source`,
    /// with `source` as the connection's source address when it is a remote
    /// IPv4 client (the pod calling itself goes plainly).
    pub async fn deliver(
        &self,
        pod: &PodContext,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        match (source, destination) {
            (SocketAddr::V4(source), SocketAddr::V4(destination)) if *source.ip() != pod.ip => {
                pod.netns
                    .connect_transparent(*source.ip(), destination, |bound| {
                        self.capture
                            .lock()
                            .map_err(|_| std::io::Error::other("capture state poisoned"))?
                            .allow_delivery(bound, destination)
                            .map_err(std::io::Error::other)
                    })
                    .await
            }
            _ => pod.netns.connect(destination).await,
        }
    }

    fn original_destination(&self, client: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let original = netns_cookie(client)
            .map_err(|err| err.to_string())
            .and_then(|cookie| {
                self.capture
                    .lock()
                    .map_err(|_| "capture state poisoned".to_owned())?
                    .take_original_destination(cookie, peer.port())
                    .map_err(|err| err.to_string())
            });
        match original {
            Ok(Some(destination)) => Some(SocketAddr::V4(destination)),
            Ok(None) => {
                warn!(%peer, "no original destination recorded for this connection; resetting it");
                None
            }
            Err(err) => {
                warn!(%peer, %err, "reading the original destination failed; resetting the connection");
                None
            }
        }
    }
}

/// Serves HBONE tunnels arriving at one pod's 15008: checks the target is
/// this pod, applies L4 policy with the peer's proven identity, and connects
/// to the app with the original client's address.
pub struct InboundTunnels {
    /// Shared state.
    pub proxy: Arc<Proxy>,
    /// The pod the tunnels are for.
    pub pod: Arc<PodContext>,
}

impl InboundTunnels {
    fn labels(&self, request: &mesh_hbone::InboundRequest) -> TcpLabels {
        let source_ip = request.forwarded_for.unwrap_or(request.peer_addr).ip();
        let caller = self.proxy.discovery.workload_by_ip(source_ip);
        let me = self.proxy.discovery.workload_by_ip(self.pod.ip.into());
        tcp_labels(
            "destination",
            caller.as_deref(),
            Some(Arc::from(request.peer_identity.to_string())),
            me.as_deref(),
            request.host.as_deref(),
            "mutual_tls",
        )
    }

    fn access<'a>(&'a self, request: &mesh_hbone::InboundRequest) -> Access<'a> {
        Access {
            id: connection_id(),
            direction: "inbound",
            pod: &self.pod.name,
            source: request.forwarded_for.unwrap_or(request.peer_addr),
            destination: request.authority,
            endpoint: request.authority,
            started: Instant::now(),
            metrics: &self.proxy.metrics,
            labels: self.labels(request),
        }
    }
}

impl mesh_hbone::Handler for InboundTunnels {
    /// Counted as an open relay while the tunnel lives.
    type Upstream = ztunnel::drain::Tracked<TcpStream>;

    async fn connect(
        &self,
        request: mesh_hbone::InboundRequest,
    ) -> Result<Self::Upstream, mesh_hbone::Refusal> {
        // A tunnel may only lead to the pod whose 15008 it reached.
        if request.authority.ip() != std::net::IpAddr::V4(self.pod.ip) {
            self.access(&request)
                .failed("BAD", "CONNECT to another pod's address");
            return Err(mesh_hbone::Refusal::BadRequest(format!(
                "{} is not this pod's address",
                request.authority.ip()
            )));
        }
        let source = request.forwarded_for.unwrap_or(request.peer_addr);
        let identity = request.peer_identity.to_string();
        let decision = self.proxy.authorize(&Connection {
            source_identity: Some(&identity),
            source_ip: source.ip(),
            destination_ip: request.authority.ip(),
            destination_port: request.authority.port(),
        });
        if decision != Decision::Allow {
            self.access(&request).failed("DENY", &decision.to_string());
            return Err(mesh_hbone::Refusal::Denied(decision.to_string()));
        }
        match self
            .proxy
            .deliver(&self.pod, source, request.authority)
            .await
        {
            Ok(upstream) => {
                self.access(&request).opened();
                Ok(ztunnel::drain::Tracked::new(upstream, &self.proxy.open))
            }
            Err(err) => {
                self.access(&request).failed("UF", &err.to_string());
                Err(mesh_hbone::Refusal::Unavailable(err.to_string()))
            }
        }
    }

    fn on_complete(&self, request: &mesh_hbone::InboundRequest, stats: &mesh_hbone::StreamStats) {
        let mut access = self.access(request);
        access.started = Instant::now() - stats.duration;
        access.closed(
            stats.bytes_from_client,
            stats.bytes_to_client,
            stats.error.as_deref(),
        );
    }
}

/// Dials a pod's HBONE connections from inside its network namespace, so
/// they leave with the pod's own address.
#[derive(Debug)]
pub struct PodDialer {
    /// The pod's namespace.
    pub netns: PodNetns,
    /// Pairs connections to pods of this node in the kernel.
    pub same_node: Arc<SameNode>,
}

impl mesh_hbone::Dialer for PodDialer {
    fn dial(
        &self,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send + '_>>
    {
        Box::pin(async move {
            let stream = self.netns.connect(peer).await?;
            // Before TLS starts: see `fastpath` for why the order matters.
            self.same_node.offer(&stream);
            Ok(stream)
        })
    }
}

/// A connection whose upstream is open: what its relay needs. Boxed, so
/// the task holding it keeps each piece once and nothing of the setup.
struct Open<'a, U> {
    access: Access<'a>,
    client: TcpStream,
    upstream: U,
}

impl<U: Upstream> Open<'_, U> {
    /// Relays the client to the upstream and writes the access record.
    async fn relay(&mut self) {
        self.access.opened();
        debug!(endpoint = %self.access.endpoint, "upstream connected");
        match self.upstream.relay(&mut self.client).await {
            Ok((sent, received)) => self.access.closed(sent, received, None),
            Err(err) => self.access.closed(0, 0, Some(&err.to_string())),
        }
    }
}

/// Runs a connection in `span`: `setup` boxed, so resolution, policy and
/// the upstream's setup (TLS and HTTP/2 handshakes when the pool has no
/// connection) are freed once the upstream is open and a held connection's
/// task keeps only the [`Open`] record and the relay's state; then the
/// relay.
///
/// Not an `async fn`: one keeps room for its arguments for its whole life,
/// which would put the unboxed setup back into every held connection's
/// task. The setup is boxed here, before the returned future exists.
fn serve<'a, U: Upstream + 'a>(
    span: tracing::Span,
    setup: impl Future<Output = Option<Box<Open<'a, U>>>> + 'a,
) -> impl Future<Output = ()> + 'a {
    let setup = Box::pin(setup.instrument(span.clone()));
    async move {
        if let Some(mut open) = setup.await {
            open.relay().instrument(span).await;
        }
    }
}

/// What a relay needs once `upstream` is open, or `None` after recording
/// the failure and resetting `client`.
fn opened<'a, U>(
    mut access: Access<'a>,
    client: TcpStream,
    upstream: std::io::Result<U>,
) -> Option<Box<Open<'a, U>>> {
    match upstream {
        Ok(upstream) => Some(Box::new(Open {
            access,
            client,
            upstream,
        })),
        Err(err) => {
            access.failed("UF", &err.to_string());
            reset(client);
            None
        }
    }
}

/// An outbound connection's upstream.
enum Outbound {
    /// HBONE, through the destination's ztunnel or a waypoint.
    Tunnel(mesh_hbone::Tunnel),
    /// Plain TCP, to a destination outside the mesh.
    Direct(TcpStream),
}

impl Upstream for Outbound {
    async fn relay(&mut self, client: &mut TcpStream) -> std::io::Result<(u64, u64)> {
        match self {
            Outbound::Tunnel(tunnel) => Upstream::relay(tunnel, client).await,
            Outbound::Direct(stream) => Upstream::relay(stream, client).await,
        }
    }
}

/// Where a client connection is relayed to.
trait Upstream {
    /// Copies both ways until both are done; returns the bytes from the
    /// client and the bytes to it.
    async fn relay(&mut self, client: &mut TcpStream) -> std::io::Result<(u64, u64)>;
}

impl Upstream for TcpStream {
    async fn relay(&mut self, client: &mut TcpStream) -> std::io::Result<(u64, u64)> {
        tokio::io::copy_bidirectional(client, self).await
    }
}

impl Upstream for mesh_hbone::Tunnel {
    async fn relay(&mut self, client: &mut TcpStream) -> std::io::Result<(u64, u64)> {
        // No copy buffers while the connection idles (see `mesh_hbone::relay`).
        let (to_client, from_client) = mesh_hbone::Tunnel::relay(self, client).await?;
        Ok((from_client, to_client))
    }
}

/// Closes `client` with a reset rather than a FIN, so a failed upstream
/// reaches the caller as an error instead of an empty, successful exchange.
fn reset(client: TcpStream) {
    let socket = socket2::SockRef::from(&client);
    if let Err(err) = socket.set_linger(Some(std::time::Duration::ZERO)) {
        debug!(%err, "setting SO_LINGER 0 failed; closing normally");
    }
    drop(client);
}
