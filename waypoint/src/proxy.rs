//! The request path: an HBONE tunnel addressed to a service arrives, its
//! bytes are served as HTTP (or relayed as TCP), and each request is routed
//! by the service's route table: faults, redirects, weighted clusters,
//! header edits, rewrites, timeouts, retries and mirrors, to an endpoint
//! picked by the cluster's load balancer behind its circuit breaker.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_hbone::{Accepted, H2Stream, InboundRequest, Refusal};
use tokio::{io::DuplexStream, net::TcpListener};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    access_log::{self, AccessLog},
    cluster::{
        ClusterEntry, EndpointConfig, EndpointHealth, LbKind, PickError, RetrySlot,
        UpstreamProtocol, mix,
    },
    config::{Chain, Config, Store},
    metrics::{ClusterLabels, HandleCache, LabelsRef, Metrics, RequestLabels, ResponseFlags},
    rbac::{DENIED_BODY, Decision, Subject},
    route::{
        Abort, Action, AttemptFailure, CompiledRoute, Cors, Downstream, Forward, Retry,
        WeightedTarget, authority,
    },
    upstream::{Body, BoxError, Clients, Connector},
};

/// Request bodies up to this size are buffered so they can be retried and
/// mirrored; larger or unknown-length bodies stream through, tried once.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// Time to read a request's head on an HTTP/1 connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head answered normally (Istio's 60 KiB default);
/// larger ones get 431.
pub const MAX_REQUEST_HEADERS: usize = 60 * 1024;
/// The connection-level cap on a request head: beyond it the connection is
/// closed. Above [`MAX_REQUEST_HEADERS`], so a head somewhat over the limit
/// is read whole and answered with 431 instead of a reset.
const MAX_HEAD_BUFFER: usize = 256 * 1024;
/// Buffer of the in-memory pipe between a tunnel and its HTTP server.
const PIPE_BUFFER: usize = 64 * 1024;
/// First retry back-off (Envoy's default base interval).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Everything one worker's requests share: its own upstream pools, and the
/// config store and metrics all workers share (see [`crate::workers`]).
pub struct Waypoint {
    /// The config.
    pub store: Arc<Store>,
    /// Pooled upstream clients (this worker's).
    pub clients: Clients,
    /// For TCP chains.
    pub connector: Connector,
    /// Istio's request metrics.
    pub metrics: Metrics,
    /// The request access log.
    pub access_log: AccessLog,
}

/// What one tunnel's (or ingress connection's) requests know about it.
struct TunnelContext {
    chain: Chain,
    /// `reporter` of the request metrics: `waypoint`, or `source` at an
    /// ingress gateway.
    reporter: &'static str,
    /// `connection_security_policy` of the request metrics.
    security: &'static str,
    /// The caller's SPIFFE identity.
    peer: String,
    /// The caller's namespace (from its identity).
    peer_namespace: String,
    /// The original client.
    source: SocketAddr,
    /// The metric handles its requests last counted with.
    handles: HandleCache,
    /// The service address the tunnel is for.
    destination: SocketAddr,
    /// Whether the downstream connection is TLS (HBONE, or an HTTPS
    /// ingress port).
    tls: bool,
    conn: u64,
}

impl TunnelContext {
    /// What RBAC checks: the caller and, on HTTP chains, the request.
    fn subject<'a>(&'a self, request: Option<&'a Parts>) -> Subject<'a> {
        Subject {
            principal: &self.peer,
            source: self.source.ip(),
            destination: self.destination,
            request,
        }
    }
}

/// Envoy's response code details for an RBAC denial.
fn denial_detail(policy: Option<String>) -> String {
    match policy {
        Some(name) => format!("rbac_access_denied_matched_policy[{name}]"),
        None => "rbac_access_denied_matched_policy[none]".to_owned(),
    }
}

/// The HBONE handler: one server task per tunnel.
#[derive(Clone)]
pub struct Tunnels(pub Arc<Waypoint>);

impl Tunnels {
    /// The context of the tunnel `req` asks for, or why it is refused.
    fn context(&self, req: &InboundRequest) -> Result<Arc<TunnelContext>, Refusal> {
        let config = self.0.store.load();
        let chain = config.chains.get(&req.authority).cloned().ok_or_else(|| {
            Refusal::BadRequest(format!(
                "{} is not a service address this waypoint serves",
                req.authority
            ))
        })?;
        let ctx = Arc::new(TunnelContext {
            chain,
            reporter: "waypoint",
            security: "mutual_tls",
            peer: req.peer_identity.to_string(),
            peer_namespace: req.peer_identity.namespace.clone(),
            source: req.forwarded_for.unwrap_or(req.peer_addr),
            destination: req.authority,
            tls: true,
            conn: req.connection_id,
            handles: HandleCache::default(),
        });
        Ok(ctx)
    }
}

impl mesh_hbone::Handler for Tunnels {
    type Upstream = DuplexStream;

    /// Serves the tunnel through an in-memory pipe, in a task of its own
    /// (what [`Tunnels::accept`] avoids; kept for callers of `connect`).
    async fn connect(&self, req: InboundRequest) -> Result<DuplexStream, Refusal> {
        let ctx = self.context(&req)?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
        let waypoint = self.0.clone();
        let span = tunnel_span(&ctx);
        tokio::spawn(async move { serve_chain(waypoint, ctx, ours).await }.instrument(span));
        Ok(theirs)
    }

    /// Serves the tunnel's HTTP/2 stream directly (hyper reads and writes
    /// its DATA frames), in the stream's own task: no pipe, no copy.
    async fn accept(&self, req: InboundRequest) -> Result<Accepted<DuplexStream>, Refusal> {
        let ctx = self.context(&req)?;
        let waypoint = self.0.clone();
        Ok(Accepted::Serve(Box::new(move |stream: H2Stream| {
            let span = tunnel_span(&ctx);
            Box::pin(async move { serve_chain(waypoint, ctx, stream).await }.instrument(span))
        })))
    }
}

fn tunnel_span(ctx: &TunnelContext) -> tracing::Span {
    info_span!("tunnel", conn = ctx.conn, service = %ctx.chain.service(), peer = %ctx.peer)
}

/// Serves one tunnel or ingress connection as its chain says: HTTP, or a
/// TCP relay.
async fn serve_chain<IO>(waypoint: Arc<Waypoint>, ctx: Arc<TunnelContext>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match &ctx.chain {
        Chain::Http { .. } => serve_http(waypoint, ctx, io).await,
        Chain::Tcp { .. } => relay_tcp(waypoint, ctx, io).await,
    }
}

async fn serve_http<IO>(waypoint: Arc<Waypoint>, ctx: Arc<TunnelContext>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BUFFER as u32);
    let service = service_fn(move |request| {
        let waypoint = waypoint.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(waypoint.handle(&ctx, request).await) }
    });
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        debug!(error = %err, "HTTP connection ended with an error");
    }
}

/// Serves `io` as one HBONE tunnel's HTTP connection for `service` (an
/// address the config need not know), routed by `route_config`, with no
/// RBAC: the waypoint's HTTP/1.1 and HTTP/2 entry point without HBONE, for
/// fuzz targets. Returns when the connection ends.
#[cfg(feature = "fuzzing")]
pub async fn serve_http_for_fuzzing<IO>(
    waypoint: Arc<Waypoint>,
    route_config: &str,
    service: SocketAddr,
    io: IO,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(TunnelContext {
        chain: Chain::Http {
            name: format!("inbound-vip|{}|http|fuzz", service.port()),
            route_config: route_config.to_owned(),
            authz: Default::default(),
        },
        reporter: "waypoint",
        security: "mutual_tls",
        peer: "spiffe://cluster.local/ns/fuzz/sa/client".to_owned(),
        peer_namespace: "fuzz".to_owned(),
        source: SocketAddr::from(([10, 0, 0, 1], 40000)),
        destination: service,
        tls: true,
        conn: 1,
        handles: HandleCache::default(),
    });
    serve_http(waypoint, ctx, io).await;
}

async fn relay_tcp<IO>(waypoint: Arc<Waypoint>, ctx: Arc<TunnelContext>, mut io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Chain::Tcp {
        clusters, authz, ..
    } = &ctx.chain
    else {
        return;
    };
    if let Decision::Deny(policy) = authz.check(&ctx.subject(None)) {
        info!(target: "waypoint::access", src = %ctx.source, src_identity = %ctx.peer, detail = %denial_detail(policy), "tcp connection denied");
        return;
    }
    let total: u32 = clusters.iter().map(|c| c.1).sum();
    let mut point = (random() as u32) % total.max(1);
    let name = clusters
        .iter()
        .find(|(_, w)| {
            let hit = point < *w;
            point = point.saturating_sub(*w);
            hit
        })
        .map_or(&clusters[0].0, |(c, _)| c);
    let config = waypoint.store.load();
    let Some(cluster) = config.clusters.get(name) else {
        info!(target: "waypoint::access", cluster = %name, flags = "NC", "tcp connection refused: no such cluster");
        return;
    };
    let Ok((endpoint, _)) = cluster.pick(random(), random()) else {
        info!(target: "waypoint::access", cluster = %name, flags = "UH", "tcp connection refused: no healthy endpoint");
        return;
    };
    match waypoint.connector.open(endpoint.addr).await {
        Ok(mut upstream) => {
            let result = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
            info!(target: "waypoint::access", cluster = %name, endpoint = %endpoint.addr, ?result, "tcp connection closed");
        }
        Err(err) => {
            info!(target: "waypoint::access", cluster = %name, endpoint = %endpoint.addr, flags = "UF", error = %err, "tcp connect failed");
        }
    }
}

/// Runs the ingress gateway's listeners on this worker (see
/// [`crate::workers`]): binds each port of the current config (with
/// `SO_REUSEPORT`, so every worker holds a listener of its own on it), closes
/// ports that left it, and retries ports that could not be bound. Each
/// connection is served as HTTP by its port's chain, on this thread. `ids`
/// numbers connections (shared by the workers); `accepted` counts the ones
/// this worker accepted.
pub async fn run_ingress(waypoint: Arc<Waypoint>, ids: Arc<AtomicU64>, accepted: Arc<AtomicU64>) {
    let mut bound: HashMap<u16, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        // Registered before reading, so no publish is missed.
        let changed = waypoint.store.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let config = waypoint.store.load();
        bound.retain(|port, task| {
            let keep = config.ingress.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "ingress listener closed");
            }
            keep
        });
        let mut failed = false;
        for &port in config.ingress.keys() {
            if bound.contains_key(&port) {
                continue;
            }
            match bind_ingress(port) {
                Ok(listener) => {
                    info!(port, "ingress listener bound");
                    let task = tokio::spawn(
                        accept_ingress(
                            waypoint.clone(),
                            listener,
                            port,
                            ids.clone(),
                            accepted.clone(),
                        )
                        .in_current_span(),
                    );
                    bound.insert(port, task);
                }
                Err(err) => {
                    failed = true;
                    warn!(port, error = %err, "binding the ingress listener failed; retrying");
                }
            }
        }
        if failed {
            let _ = tokio::time::timeout(Duration::from_secs(2), changed).await;
        } else {
            changed.await;
        }
    }
}

fn bind_ingress(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::from_std(crate::workers::bind_reuseport(SocketAddr::from((
        [0, 0, 0, 0],
        port,
    )))?)
}

async fn accept_ingress(
    waypoint: Arc<Waypoint>,
    listener: TcpListener,
    port: u16,
    ids: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: pause, keep serving.
                warn!(port, error = %err, "ingress accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ingress) = waypoint.store.load().ingress.get(&port).cloned() else {
            continue; // the port is being closed
        };
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], port)));
        accepted.fetch_add(1, Ordering::Relaxed);
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("ingress", conn, port, src = %peer);
        let waypoint = waypoint.clone();
        tokio::spawn(
            async move {
                let context = |chain: Chain, tls| {
                    Arc::new(TunnelContext {
                        chain,
                        reporter: "source",
                        security: "none",
                        peer: String::new(),
                        peer_namespace: String::new(),
                        source: peer,
                        destination: local,
                        tls,
                        conn,
                        handles: HandleCache::default(),
                    })
                };
                if !ingress.routes_by_sni() {
                    let Some(first) = ingress.chains.first() else { return };
                    let ctx = context(first.chain.clone(), false);
                    return serve_chain(waypoint, ctx, stream).await;
                }
                // Read the ClientHello and pick the chain by SNI; then
                // either pass the untouched bytes through, or finish the
                // handshake with that chain's certificate.
                let mut stream = stream;
                let (hello, sni) = match tokio::time::timeout(
                    HEADER_READ_TIMEOUT,
                    crate::client_hello::read(&mut stream),
                )
                .await
                {
                    Ok(Ok(read)) => read,
                    Ok(Err(err)) => return debug!(error = %err, "TLS ClientHello failed"),
                    Err(_) => return debug!("no TLS ClientHello in time"),
                };
                let Some(chosen) = ingress.for_sni(sni.as_deref()) else {
                    return info!(target: "waypoint::access", sni = sni.as_deref().unwrap_or(""), flags = "NR", "no filter chain for this SNI");
                };
                let stream = crate::client_hello::Prefixed::new(hello, stream);
                let Some(tls) = chosen.tls.clone() else {
                    // Passthrough: the TLS session is the backend's.
                    let ctx = context(chosen.chain.clone(), true);
                    return serve_chain(waypoint, ctx, stream).await;
                };
                let acceptor =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
                let start = match acceptor.await {
                    Ok(start) => start,
                    Err(err) => return debug!(error = %err, "TLS ClientHello failed"),
                };
                let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, start.into_stream(tls)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => return debug!(error = %err, "TLS handshake failed"),
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                let ctx = context(chosen.chain.clone(), true);
                serve_chain(waypoint, ctx, stream).await
            }
            .instrument(span),
        );
    }
}

/// How a request ended, for metrics and the access log; names borrowed
/// from the config the request was routed by.
struct Outcome<'c> {
    flags: ResponseFlags,
    cluster: &'c str,
    endpoint: Option<Arc<EndpointConfig>>,
    route: &'c str,
    attempts: u32,
    detail: String,
}

impl Waypoint {
    async fn handle(&self, ctx: &TunnelContext, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        let request_bytes = content_length(&parts.headers).unwrap_or(0);
        let method = parts.method.clone();
        // Shares the request's bytes: the log's path without a copy.
        let uri = parts.uri.clone();
        let grpc = is_grpc(&parts.headers);
        ensure_request_id(&mut parts.headers);
        ensure_traceparent(&mut parts.headers);
        let request_id = parts.headers.get("x-request-id").cloned();
        let mut outcome = Outcome {
            flags: ResponseFlags::NONE,
            cluster: "",
            endpoint: None,
            route: "",
            attempts: 0,
            detail: String::new(),
        };
        let config = self.store.load();
        let mut response = if head_size(&parts) > MAX_REQUEST_HEADERS {
            outcome.detail = format!("request headers over {MAX_REQUEST_HEADERS} bytes");
            local_reply(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers too large",
            )
        } else {
            self.route(&config, ctx, parts, body, &mut outcome).await
        };
        if grpc {
            response = grpc_local_reply(response);
        }
        let status = response.status().as_u16();
        let response_bytes = content_length(response.headers()).unwrap_or(0);
        let labels = LabelsRef {
            reporter: ctx.reporter,
            source_workload_namespace: or_unknown(&ctx.peer_namespace),
            source_principal: or_unknown(&ctx.peer),
            // The service the request went to (a route may send it
            // elsewhere than the address it was for), else the chain's.
            destination_service: match outcome.cluster.rsplit('|').next() {
                Some(host) if !host.is_empty() => host,
                _ if ctx.reporter == "waypoint" => ctx.chain.service(),
                _ => "unknown",
            },
            destination_workload: outcome
                .endpoint
                .as_ref()
                .map_or("unknown", |e| workload_name(&e.workload)),
            destination_principal: outcome.endpoint.as_ref().and_then(|e| e.identity.as_ref()),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: status,
            response_flags: outcome.flags,
            connection_security_policy: ctx.security,
        };
        let elapsed = started.elapsed();
        if !grpc {
            ctx.handles.get(&self.metrics, &labels).record(
                elapsed.as_secs_f64() * 1000.0,
                request_bytes,
                response_bytes,
            );
        } else {
            let record = Recording {
                metrics: self.metrics.clone(),
                labels: labels.to_labels(),
                started,
                request_bytes,
                response_bytes,
            };
            if let Some(code) = response.headers().get(&GRPC_STATUS).cloned() {
                // Trailers-only: the status is in the head.
                record.finish(Some(&code));
            } else {
                // The status comes in the trailers: counted when they pass.
                response = response.map(|body| {
                    GrpcTrailers {
                        inner: body,
                        record: Some(record),
                    }
                    .boxed()
                });
            }
        }
        if self.access_log.enabled() {
            self.access_log.write(&access_log::Entry {
                conn: ctx.conn,
                source: ctx.source,
                identity: &ctx.peer,
                method: method.as_str(),
                path: uri.path(),
                status,
                flags: outcome.flags,
                route: outcome.route,
                cluster: outcome.cluster,
                endpoint: outcome.endpoint.as_ref().map(|e| e.addr),
                attempts: outcome.attempts,
                duration: elapsed,
                request_id: request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                detail: &outcome.detail,
            });
        }
        response
    }

    async fn route<'c>(
        &self,
        config: &'c Config,
        ctx: &TunnelContext,
        mut parts: Parts,
        body: Incoming,
        outcome: &mut Outcome<'c>,
    ) -> Response<Body> {
        let Chain::Http {
            route_config,
            authz,
            ..
        } = &ctx.chain
        else {
            return local_reply(StatusCode::INTERNAL_SERVER_ERROR, "not an HTTP chain");
        };
        if let Decision::Deny(policy) = authz.check(&ctx.subject(Some(&parts))) {
            outcome.detail = denial_detail(policy);
            return local_reply(StatusCode::FORBIDDEN, DENIED_BODY);
        }
        let table = config.routes.get(route_config);
        if !ctx.tls && table.is_some_and(|t| t.requires_tls(&parts)) {
            return https_redirect(&parts);
        }
        let downstream = Downstream {
            principal: &ctx.peer,
            address: ctx.source.ip(),
        };
        let Some(route) = table.and_then(|table| table.find_from(&parts, &downstream)) else {
            outcome.flags.insert(ResponseFlags::NO_ROUTE);
            outcome.detail = format!("no route in {route_config}");
            return local_reply(StatusCode::NOT_FOUND, "route not found");
        };
        outcome.route = &route.name;
        if let Some(fault) = &route.fault {
            if let Some((delay, ppm)) = fault.delay
                && roll_ppm() < ppm
            {
                outcome.flags.insert(ResponseFlags::DELAY_INJECTED);
                tokio::time::sleep(delay).await;
            }
            if let Some((abort, ppm)) = fault.abort
                && roll_ppm() < ppm
            {
                outcome.flags.insert(ResponseFlags::FAULT_INJECTED);
                let mut response = match abort {
                    Abort::Http(status) => local_reply(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        FAULT_ABORT_BODY,
                    ),
                    Abort::Grpc(code) => grpc_reply(code, FAULT_ABORT_BODY),
                };
                route.response_headers.apply(response.headers_mut());
                return response;
            }
        }
        let forward = match &route.action {
            Action::Direct { status } => {
                return local_reply(StatusCode::from_u16(*status).unwrap_or(StatusCode::OK), "");
            }
            Action::Redirect(redirect) => {
                let scheme = redirect.scheme.as_deref().unwrap_or("http");
                let host = redirect
                    .host
                    .clone()
                    .or_else(|| {
                        authority(&parts).map(|a| a.split(':').next().unwrap_or(a).to_owned())
                    })
                    .unwrap_or_default();
                let port = redirect.port.map(|p| format!(":{p}")).unwrap_or_default();
                let path = redirect.path.clone().unwrap_or_else(|| {
                    parts
                        .uri
                        .path_and_query()
                        .map_or("/".to_owned(), |p| p.as_str().to_owned())
                });
                let mut response = local_reply(
                    StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                    "",
                );
                if let Ok(location) =
                    HeaderValue::from_str(&format!("{scheme}://{host}{port}{path}"))
                {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                return response;
            }
            Action::Forward(forward) => forward,
        };
        let origin = parts.headers.get(header::ORIGIN).cloned();
        if let Some(cors) = &forward.cors
            && Cors::is_preflight(&parts)
        {
            return preflight(cors, origin.as_ref());
        }
        let target = forward.pick(random() as u32);
        outcome.cluster = &target.cluster;
        let hash = forward.request_hash(&parts, ctx.source.ip(), random);
        let upgrade = Upgrade::take(&mut parts);
        prepare_request(&mut parts, route, forward, target);
        if let Some(upgrade) = &upgrade {
            upgrade.restore(&mut parts.headers);
        }

        let mut response = match self
            .forward(
                config, ctx, parts, body, forward, target, hash.value, outcome,
            )
            .await
        {
            Ok(response) => response,
            Err(reply) => *reply,
        };
        if let Some(upgrade) = upgrade {
            upgrade.splice(&mut response, ctx.conn);
        }
        if let Some(cookie) = hash.set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        route.response_headers.apply(response.headers_mut());
        target.response_headers.apply(response.headers_mut());
        if let (Some(cors), Some(origin)) = (&forward.cors, origin)
            && origin.to_str().is_ok_and(|o| cors.allows(o))
        {
            response
                .headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            if let Some(expose) = &cors.expose {
                response
                    .headers_mut()
                    .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
            }
        }
        response
    }

    /// Sends the request to the target cluster within the route's timeout,
    /// retrying as its policy allows, and mirrors it.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        config: &Config,
        ctx: &TunnelContext,
        parts: Parts,
        body: Incoming,
        forward: &Forward,
        target: &WeightedTarget,
        hash: Option<u64>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Body>, LocalReply> {
        // Replayable bodies are buffered, so retries and mirrors can resend.
        let replayable = hyper::body::Body::is_end_stream(&body)
            || content_length(&parts.headers).is_some_and(|l| l <= MAX_BUFFERED_BODY);
        let mut payload = if replayable {
            match Limited::new(body, MAX_BUFFERED_BODY as usize)
                .collect()
                .await
            {
                Ok(collected) => Payload::Buffered(collected.to_bytes()),
                Err(err) => {
                    outcome
                        .flags
                        .insert(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR);
                    outcome.detail = format!("reading the request body: {err}");
                    return Err(local_error(StatusCode::BAD_REQUEST, "bad request body"));
                }
            }
        } else {
            Payload::Streaming(Some(body))
        };
        if let Payload::Buffered(bytes) = &payload {
            for (cluster, ppm) in &forward.mirrors {
                if roll_ppm() < *ppm {
                    self.mirror(config, &parts, bytes.clone(), cluster, ctx.source);
                }
            }
        }
        let Some(cluster) = config.clusters.get(&target.cluster).cloned() else {
            outcome.flags.insert(ResponseFlags::NO_CLUSTER);
            outcome.detail = format!("cluster {} not found", target.cluster);
            return Err(local_error(StatusCode::SERVICE_UNAVAILABLE, "no cluster"));
        };
        let retry = forward
            .retry
            .as_ref()
            .filter(|_| matches!(payload, Payload::Buffered(_)));
        let attempts = async {
            let mut tries = 0u32;
            // The retry in progress holds a slot of the cluster's retry
            // limit from its scheduling until its result is judged.
            let mut retry_slot: Option<RetrySlot> = None;
            loop {
                tries += 1;
                outcome.attempts = tries;
                let body = payload.take();
                let result = self
                    .try_once(
                        &cluster,
                        &parts,
                        body,
                        hash,
                        retry.and_then(|r| r.per_try_timeout),
                        outcome,
                    )
                    .await;
                drop(retry_slot.take());
                let Some(retry) = retry else {
                    return finish(result, outcome);
                };
                if !should_retry(retry, &result) {
                    return finish(result, outcome);
                }
                if tries > retry.attempts {
                    outcome.flags.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
                    return finish(result, outcome);
                }
                let labels = ClusterLabels {
                    cluster_name: cluster.config.name.clone(),
                };
                let Some(slot) = cluster.try_retry() else {
                    outcome.flags.insert(ResponseFlags::OVERFLOW);
                    self.metrics.retry_overflow.get_or_create(&labels).inc();
                    debug!(cluster = %cluster.config.name, tries, "retry refused by the retry limit");
                    return finish(result, outcome);
                };
                retry_slot = Some(slot);
                self.metrics.retries.get_or_create(&labels).inc();
                let backoff = RETRY_BACKOFF * 2u32.pow((tries - 1).min(4));
                tokio::time::sleep(
                    backoff / 2 + backoff.mul_f64((roll_ppm() as f64) / 2_000_000.0),
                )
                .await;
                debug!(cluster = %cluster.config.name, tries, "retrying");
            }
        };
        let result = match forward.timeout {
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(result) => result,
                Err(_) => {
                    outcome.flags.insert(ResponseFlags::UPSTREAM_TIMEOUT);
                    outcome.detail = format!("no response within the route timeout of {limit:?}");
                    return Err(local_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout",
                    ));
                }
            },
            None => attempts.await,
        };
        result.map(|r| r.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    async fn try_once(
        &self,
        cluster: &ClusterEntry,
        parts: &Parts,
        body: Body,
        hash: Option<u64>,
        per_try_timeout: Option<Duration>,
        outcome: &mut Outcome<'_>,
    ) -> Attempt {
        let limits = &cluster.config.limits;
        let active = cluster.runtime.active_requests.load(Ordering::Relaxed);
        let limit = match cluster.config.protocol {
            UpstreamProtocol::Http1 => [
                limits.max_requests,
                limits
                    .max_connections
                    .map(|c| c.saturating_add(limits.max_pending_requests.unwrap_or(0))),
            ]
            .into_iter()
            .flatten()
            .min(),
            UpstreamProtocol::Http2 => limits.max_requests,
        };
        if limit.is_some_and(|l| active >= l) {
            outcome.detail = format!(
                "circuit breaker of {} open ({active} requests)",
                cluster.config.name
            );
            let mut reply = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            );
            reply
                .headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            return Err(Failed {
                kind: AttemptFailure::NotSent,
                flag: ResponseFlags::OVERFLOW,
                reply: Box::new(reply),
            });
        }
        // Without a hash key (none configured, or none present) a hashing
        // cluster picks at random, as Envoy's ring hash does.
        let hash = match cluster.config.lb {
            LbKind::Hash => hash.unwrap_or_else(random),
            _ => 0,
        };
        let (endpoint, health) = match cluster.pick(hash, random()) {
            Ok(picked) => picked,
            Err(PickError::NoHealthy) => {
                outcome.detail = format!("no healthy endpoint in {}", cluster.config.name);
                return Err(Failed {
                    kind: AttemptFailure::NotSent,
                    flag: ResponseFlags::NO_HEALTHY_UPSTREAM,
                    reply: local_error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
                });
            }
        };
        outcome.endpoint = Some(endpoint.clone());
        let request = upstream_request(parts, &endpoint.authority, cluster.config.protocol, body);
        let _in_flight = InFlight::new(cluster, &health);
        let send = self
            .clients
            .send(cluster.config.protocol, endpoint.addr, request);
        let result = match per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| ()),
            None => Ok(send.await),
        };
        match result {
            Err(()) => {
                cluster.record(&health, true);
                outcome.detail = format!(
                    "no response within the per-try timeout of {limit:?}",
                    limit = per_try_timeout.unwrap_or_default()
                );
                Err(Failed {
                    kind: AttemptFailure::PerTryTimeout,
                    flag: ResponseFlags::UPSTREAM_TIMEOUT,
                    reply: local_error(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                })
            }
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                cluster.record(&health, matches!(status, 500..=599));
                outcome.detail.clear();
                Ok(response)
            }
            Ok(Err(err)) => {
                cluster.record(&health, true);
                let kind = if err.is_connect() {
                    AttemptFailure::ConnectFailure
                } else if err.is_refused_stream() {
                    AttemptFailure::RefusedStream
                } else {
                    AttemptFailure::Reset
                };
                outcome.detail = error_chain(&err);
                let (flag, reason) = match kind {
                    AttemptFailure::ConnectFailure => {
                        (ResponseFlags::CONNECTION_FAILURE, "connection failure")
                    }
                    AttemptFailure::RefusedStream => {
                        (ResponseFlags::CONNECTION_TERMINATION, "refused stream")
                    }
                    _ => (
                        ResponseFlags::CONNECTION_TERMINATION,
                        "connection termination",
                    ),
                };
                Err(Failed {
                    kind,
                    flag,
                    reply: local_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                        ),
                    ),
                })
            }
        }
    }

    /// Sends a copy of the request to `cluster`, answer ignored, as Envoy's
    /// shadowing does (the authority gets a `-shadow` suffix).
    fn mirror(
        &self,
        config: &Config,
        parts: &Parts,
        body: Bytes,
        cluster: &str,
        source: SocketAddr,
    ) {
        let Some(entry) = config.clusters.get(cluster).cloned() else {
            debug!(cluster, "mirror cluster not found");
            return;
        };
        let Ok((endpoint, _)) = entry.pick(mix(source.port().into()), random()) else {
            return;
        };
        let mut copy = upstream_request(
            parts,
            &endpoint.authority,
            entry.config.protocol,
            Full::new(body).map_err(|never| match never {}).boxed(),
        );
        // A mirror never switches protocols.
        copy.headers_mut().remove(header::CONNECTION);
        copy.headers_mut().remove(header::UPGRADE);
        if let Some(host) = request_authority(&copy) {
            let shadow = match host.split_once(':') {
                Some((name, port)) => format!("{name}-shadow:{port}"),
                None => format!("{host}-shadow"),
            };
            set_authority(&mut copy, entry.config.protocol, &shadow);
        }
        let clients = self.clients.clone();
        let (protocol, addr) = (entry.config.protocol, endpoint.addr);
        tokio::spawn(async move {
            match clients.send(protocol, addr, copy).await {
                Ok(response) => {
                    let _ = response.into_body().collect().await;
                }
                Err(err) => debug!(error = %err, "mirrored request failed"),
            }
        });
    }
}

/// The trailer (or trailers-only header) carrying a gRPC call's status.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A request's metrics, recorded once its outcome is known: at the
/// response head, or for gRPC when the status has passed.
struct Recording {
    metrics: Metrics,
    labels: RequestLabels,
    started: Instant,
    request_bytes: u64,
    response_bytes: u64,
}

impl Recording {
    /// Records the request; for gRPC with `grpc_status` (or, if none came,
    /// the gRPC code the HTTP status maps to, as Istio does).
    fn finish(mut self, grpc_status: Option<&HeaderValue>) {
        if self.labels.request_protocol == "grpc" {
            self.labels.grpc_response_status = match grpc_status.and_then(|v| v.to_str().ok()) {
                Some(code) => code.to_owned(),
                None => grpc_code_for_http(self.labels.response_code).to_string(),
            };
        }
        self.metrics.handles(&self.labels).record(
            self.started.elapsed().as_secs_f64() * 1000.0,
            self.request_bytes,
            self.response_bytes,
        );
    }
}

/// The gRPC status of an answer without one, by its HTTP status (gRPC's
/// HTTP-to-gRPC mapping; a 200 without a status is UNKNOWN).
fn grpc_code_for_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A gRPC response body that records the call's metrics when its trailers
/// pass (with `grpc-status`), or when it ends or is dropped without them.
struct GrpcTrailers {
    inner: Body,
    record: Option<Recording>,
}

impl hyper::body::Body for GrpcTrailers {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        let status = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| trailers.get(&GRPC_STATUS)),
            None | Some(Err(_)) => Some(None),
        };
        if let Some(status) = status
            && let Some(record) = this.record.take()
        {
            record.finish(status);
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GrpcTrailers {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(None);
        }
    }
}

/// Counts a request against its cluster and endpoint while it runs.
struct InFlight<'a> {
    cluster: &'a ClusterEntry,
    health: &'a EndpointHealth,
}

impl<'a> InFlight<'a> {
    fn new(cluster: &'a ClusterEntry, health: &'a EndpointHealth) -> Self {
        cluster
            .runtime
            .active_requests
            .fetch_add(1, Ordering::Relaxed);
        health.active.fetch_add(1, Ordering::Relaxed);
        Self { cluster, health }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.cluster
            .runtime
            .active_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.health.active.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Payload {
    Buffered(Bytes),
    Streaming(Option<Incoming>),
}

impl Payload {
    /// The body for the next try.
    fn take(&mut self) -> Body {
        match self {
            Payload::Buffered(bytes) if bytes.is_empty() => {
                Empty::new().map_err(|never| match never {}).boxed()
            }
            Payload::Buffered(bytes) => Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed(),
            Payload::Streaming(body) => match body.take() {
                Some(body) => body.map_err(|e| Box::new(e) as BoxError).boxed(),
                None => Empty::new().map_err(|never| match never {}).boxed(),
            },
        }
    }
}

/// An attempt that got no upstream response: how it failed, its response
/// flag, and the reply the caller gets unless it is retried.
struct Failed {
    kind: AttemptFailure,
    flag: ResponseFlags,
    reply: LocalReply,
}

/// One try of a request.
type Attempt = Result<Response<Incoming>, Failed>;

/// The request's result from its last attempt, its flag recorded.
fn finish(result: Attempt, outcome: &mut Outcome<'_>) -> Result<Response<Incoming>, LocalReply> {
    result.map_err(|failed| {
        outcome.flags.insert(failed.flag);
        failed.reply
    })
}

/// Whether the retry policy asks for another try after `result` (whether
/// one is allowed is the attempt limit's and the retry budget's call).
fn should_retry(retry: &Retry, result: &Attempt) -> bool {
    match result {
        Ok(response) => {
            retry.retries_status(response.status().as_u16())
                || response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .is_some_and(|code| retry.retries_grpc_status(code))
        }
        Err(failed) => retry.retries_failure(failed.kind),
    }
}

/// Header edits, rewrites and hop-by-hop removal before forwarding.
fn prepare_request(
    parts: &mut Parts,
    route: &CompiledRoute,
    forward: &Forward,
    target: &WeightedTarget,
) {
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    route.request_headers.apply(&mut parts.headers);
    target.request_headers.apply(&mut parts.headers);
    let path = parts.uri.path();
    let rewritten = if let Some((regex, substitution)) = &forward.regex_rewrite {
        Some(regex.replace_all(path, substitution.as_str()).into_owned())
    } else if let (Some(new), Some(prefix)) = (&forward.prefix_rewrite, route.matched_prefix()) {
        path.get(prefix.len()..).map(|rest| {
            if new.ends_with('/') && rest.starts_with('/') {
                format!("{new}{}", &rest[1..])
            } else {
                format!("{new}{rest}")
            }
        })
    } else {
        None
    };
    if let Some(mut new_path) = rewritten {
        if new_path.is_empty() {
            new_path.push('/');
        }
        if let Some(query) = parts.uri.query() {
            new_path.push('?');
            new_path.push_str(query);
        }
        if let Ok(uri) = new_path.parse::<Uri>() {
            parts.uri = uri;
        }
    }
    if let Some(host) = &forward.host_rewrite {
        parts.headers.insert(header::HOST, host.clone());
    }
}

/// An HTTP/1.1 protocol upgrade (WebSocket's mechanism) in flight: the
/// requested protocol and the client side of the switched connection.
struct Upgrade {
    protocol: HeaderValue,
    downstream: hyper::upgrade::OnUpgrade,
}

impl Upgrade {
    /// The upgrade `parts` asks for (`Connection: upgrade` and `Upgrade`),
    /// taking the client side of it; none for other requests.
    fn take(parts: &mut Parts) -> Option<Self> {
        let wants = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        if parts.version != Version::HTTP_11 || !wants {
            return None;
        }
        let protocol = parts.headers.get(header::UPGRADE)?.clone();
        let downstream = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some(Self {
            protocol,
            downstream,
        })
    }

    /// Puts back the upgrade headers the hop-by-hop filter removed.
    fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// When the upstream switched protocols (101), joins the two switched
    /// connections and relays bytes both ways until both sides close.
    fn splice(self, response: &mut Response<Body>, conn: u64) {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let Some(upstream) = response
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>()
        else {
            return;
        };
        let downstream = self.downstream;
        tokio::spawn(
            async move {
                let (down, up) = match tokio::try_join!(downstream, upstream) {
                    Ok(both) => both,
                    Err(err) => return debug!(error = %err, "protocol switch failed"),
                };
                let result =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up))
                        .await;
                debug!(?result, "upgraded connection closed");
            }
            .instrument(info_span!("upgraded", conn)),
        );
    }
}

/// Hop-by-hop headers, which a proxy does not forward.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// The request as sent to `addr`. HTTP/1.1: absolute URI naming the
/// endpoint (the client pools by it), the caller's authority kept in
/// `Host`. HTTP/2: the caller's authority in the URI (`:authority`), the
/// endpoint chosen by the pool.
fn upstream_request(
    parts: &Parts,
    endpoint: &Authority,
    protocol: UpstreamProtocol,
    body: Body,
) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    *request.uri_mut() = endpoint_uri(parts, endpoint);
    *request.version_mut() = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    // HTTP/1.1 to HTTP/1.1 keeps the caller's `Host`, already copied.
    let host = parts.headers.get(header::HOST);
    if !(host.is_some() && matches!(protocol, UpstreamProtocol::Http1))
        && let Some(authority) = host
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
    {
        set_authority(&mut request, protocol, authority);
    }
    request
}

/// `http://<endpoint><path>`, assembled from parsed parts (the request's
/// path shares its bytes).
fn endpoint_uri(parts: &Parts, endpoint: &Authority) -> Uri {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(endpoint.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("http://invalid/"))
}

/// The authority an upstream request presents.
fn request_authority(request: &Request<Body>) -> Option<String> {
    match request.version() {
        Version::HTTP_2 => request.uri().authority().map(|a| a.as_str().to_owned()),
        _ => request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
    }
}

/// Presents `authority`: in `Host` for HTTP/1.1, in the URI (so
/// `:authority`) for HTTP/2, where `Host` must not appear.
fn set_authority(request: &mut Request<Body>, protocol: UpstreamProtocol, authority: &str) {
    match protocol {
        UpstreamProtocol::Http1 => {
            if let Ok(value) = HeaderValue::from_str(authority) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
        UpstreamProtocol::Http2 => {
            request.headers_mut().remove(header::HOST);
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("http://{authority}{path}").parse() {
                *request.uri_mut() = uri;
            }
        }
    }
}

fn preflight(cors: &Cors, origin: Option<&HeaderValue>) -> Response<Body> {
    let mut response = local_reply(StatusCode::OK, "");
    let Some(origin) = origin.filter(|o| o.to_str().is_ok_and(|o| cors.allows(o))) else {
        return response;
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &cors.methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.headers),
        (header::ACCESS_CONTROL_MAX_AGE, &cors.max_age),
    ] {
        if let Some(value) = value {
            headers.insert(name, value.clone());
        }
    }
    if cors.credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// A response the waypoint makes itself instead of forwarding (boxed: it
/// travels in `Err` through the forwarding path).
type LocalReply = Box<Response<Body>>;

/// [`local_reply`], boxed for the `Err` path.
fn local_error(status: StatusCode, body: &str) -> LocalReply {
    Box::new(local_reply(status, body))
}

/// Body of an injected abort, as Envoy words it.
const FAULT_ABORT_BODY: &str = "fault filter abort";

/// Marks a response the waypoint made itself; holds its text, which a
/// gRPC caller gets as `grpc-message` instead.
#[derive(Clone)]
struct LocalText(Bytes);

/// A response made by the waypoint itself.
fn local_reply(status: StatusCode, body: &str) -> Response<Body> {
    let text = Bytes::from(body.to_owned());
    let mut response = Response::new(
        Full::new(text.clone())
            .map_err(|never| match never {})
            .boxed(),
    );
    response.extensions_mut().insert(LocalText(text));
    *response.status_mut() = status;
    if !body.is_empty() {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

/// Envoy's answer to a plaintext request for a virtual host that requires
/// TLS: 301 to the same host and path over `https://`.
fn https_redirect(parts: &Parts) -> Response<Body> {
    let host = authority(parts).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut response = local_reply(StatusCode::MOVED_PERMANENTLY, "");
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// A gRPC trailers-only response: HTTP 200 whose head carries
/// `grpc-status` `code` and `grpc-message` `message`, no body.
fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
    if !message.is_empty()
        && let Ok(value) = HeaderValue::from_str(&grpc_message(message))
    {
        headers.insert(GRPC_MESSAGE.clone(), value);
    }
    response
}

/// The waypoint's own reply to a gRPC request, made a gRPC status as
/// Envoy does: the HTTP status mapped to its gRPC code (gRPC's
/// HTTP-to-gRPC table), the text as `grpc-message`, the other headers
/// kept. Responses from upstream pass unchanged.
fn grpc_local_reply(response: Response<Body>) -> Response<Body> {
    let Some(LocalText(text)) = response.extensions().get::<LocalText>().cloned() else {
        return response;
    };
    let code = grpc_code_of(response.status());
    let mut reply = grpc_reply(code, &String::from_utf8_lossy(&text));
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            reply.headers_mut().append(name, value.clone());
        }
    }
    reply
}

/// gRPC code for an HTTP status (gRPC's `http-grpc-status-mapping`).
fn grpc_code_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// `message` percent-encoded as `grpc-message` requires: bytes outside
/// printable ASCII, and `%`, as `%XX`.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Adds `x-request-id` when the caller did not send one.
fn ensure_request_id(headers: &mut HeaderMap) {
    static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if headers.contains_key(&X_REQUEST_ID) {
        return;
    }
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    let id = fast_uuid().hyphenated().encode_lower(&mut text);
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert(X_REQUEST_ID.clone(), value);
    }
}

/// The size of a request head as Envoy counts it: target and headers.
fn head_size(parts: &Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    target
        + parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum::<usize>()
}

/// Starts a W3C trace for a request that carries none (`traceparent`
/// version 00, random trace and parent ids, not sampled: there is no
/// tracing backend to report spans to), so every hop after the waypoint
/// shares one trace id. An existing `traceparent` (and B3 headers) passes
/// through unchanged.
fn ensure_traceparent(headers: &mut HeaderMap) {
    use std::io::Write as _;
    static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    if headers.contains_key(&TRACEPARENT) {
        return;
    }
    // `00-<32 hex trace id>-<16 hex parent id>-00`, formatted in place.
    let mut text = [0u8; 55];
    let mut cursor = &mut text[..];
    let written = write!(
        cursor,
        "00-{}-{:016x}-00",
        fast_uuid().simple(),
        random() | 1
    );
    if written.is_ok()
        && cursor.is_empty()
        && let Ok(value) = HeaderValue::from_bytes(&text)
    {
        headers.insert(TRACEPARENT.clone(), value);
    }
}

/// `reviews-v1` from a uid `Kubernetes//Pod/default/reviews-v1-0`.
fn workload_name(uid: &str) -> &str {
    uid.rsplit('/').next().unwrap_or(uid)
}

/// `value`, or `unknown` when it is empty (Istio's label for a missing
/// value).
fn or_unknown(value: &str) -> &str {
    if value.is_empty() { "unknown" } else { value }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        out.push_str(": ");
        out.push_str(&next.to_string());
        source = next.source();
    }
    out
}

/// A random (version 4) UUID from the fast generator, for request and
/// trace ids: unique, not secret. (`Uuid::new_v4` asks the kernel for
/// every one, a system call per request.)
fn fast_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid()
}

/// A random number (fast, not cryptographic).
fn random() -> u64 {
    fastrand::u64(..)
}

/// Uniform in `0..1_000_000`.
fn roll_ppm() -> u32 {
    fastrand::u32(..1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> RequestLabels {
        RequestLabels {
            reporter: "waypoint",
            source_workload_namespace: "ns".into(),
            source_principal: "p".into(),
            destination_service: "s".into(),
            destination_workload: "w".into(),
            destination_principal: "d".into(),
            request_protocol: "grpc",
            response_code: 200,
            response_flags: ResponseFlags::NONE,
            connection_security_policy: "mutual_tls",
            grpc_response_status: String::new(),
        }
    }

    #[tokio::test]
    async fn grpc_calls_are_counted_with_the_status_of_their_trailers() {
        let metrics = Metrics::default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("9"));
        let inner = Full::new(Bytes::from_static(b"x"))
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let body = GrpcTrailers {
            inner,
            record: Some(Recording {
                metrics: metrics.clone(),
                labels: labels(),
                started: Instant::now(),
                request_bytes: 0,
                response_bytes: 0,
            }),
        };
        let collected = body.collect().await.expect("body");
        assert!(collected.trailers().is_some());
        let mut counted = labels();
        counted.grpc_response_status = "9".into();
        assert_eq!(metrics.requests.get_or_create(&counted).get(), 1);

        // Dropped before its trailers: counted as the HTTP status maps.
        let body = GrpcTrailers {
            inner: Empty::new().map_err(|never| match never {}).boxed(),
            record: Some(Recording {
                metrics: metrics.clone(),
                labels: labels(),
                started: Instant::now(),
                request_bytes: 0,
                response_bytes: 0,
            }),
        };
        drop(body);
        counted.grpc_response_status = "2".into();
        assert_eq!(metrics.requests.get_or_create(&counted).get(), 1);
    }

    #[test]
    fn traceparent_is_started_once_and_kept() {
        let mut headers = HeaderMap::new();
        ensure_traceparent(&mut headers);
        let started = headers["traceparent"].to_str().unwrap().to_owned();
        let parts: Vec<&str> = started.split('-').collect();
        assert_eq!(parts.len(), 4, "{started}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        assert_ne!(parts[1], "0".repeat(32), "an all-zero trace id is invalid");
        ensure_traceparent(&mut headers);
        assert_eq!(
            headers["traceparent"],
            started.as_str(),
            "an existing trace is kept"
        );
    }
    #[test]
    fn local_replies_to_grpc_callers_are_grpc_statuses() {
        let mut denied = local_reply(StatusCode::FORBIDDEN, DENIED_BODY);
        denied
            .headers_mut()
            .insert("x-kept", HeaderValue::from_static("yes"));
        let reply = grpc_local_reply(denied);
        assert_eq!(reply.status(), StatusCode::OK);
        let headers = reply.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(headers[&GRPC_STATUS], "7");
        assert_eq!(headers[&GRPC_MESSAGE], DENIED_BODY);
        assert_eq!(headers["x-kept"], "yes");
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert!(hyper::body::Body::is_end_stream(reply.body()));

        for (status, code) in [
            (503, "14"),
            (504, "14"),
            (404, "12"),
            (400, "13"),
            (418, "2"),
        ] {
            let reply = grpc_local_reply(local_reply(StatusCode::from_u16(status).unwrap(), ""));
            assert_eq!(reply.headers()[&GRPC_STATUS], code, "HTTP {status}");
            assert!(!reply.headers().contains_key(&GRPC_MESSAGE));
        }

        // An upstream's answer is not the waypoint's: it passes as it is.
        let mut upstream = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *upstream.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let passed = grpc_local_reply(upstream);
        assert_eq!(passed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!passed.headers().contains_key(&GRPC_STATUS));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("no route: 100% gone"), "no route: 100%25 gone");
        assert_eq!(grpc_message("caf\u{e9}\n"), "caf%C3%A9%0A");
    }
}
