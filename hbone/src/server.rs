//! HBONE server: accepts mTLS HTTP/2 connections and turns every `CONNECT`
//! stream into a byte tunnel to an upstream chosen by a [`Handler`].

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::cert::CertStore;
use crate::error::Error;
use crate::identity::Identity;
use crate::io::H2Stream;
use crate::tls;

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Timeout for the TLS handshake and the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_concurrent_streams: u32,
    /// HTTP/2 initial stream window.
    pub stream_window: u32,
    /// HTTP/2 initial connection window.
    pub connection_window: u32,
    /// HTTP/2 max frame size we accept.
    pub max_frame_size: u32,
    /// Bytes buffered per stream for sending.
    pub max_send_buffer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer: 1024 * 1024,
        }
    }
}

/// One inbound tunnel request, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRequest {
    /// The client's SPIFFE identity (from its verified certificate).
    pub peer_identity: Identity,
    /// The client's socket address (the TCP peer of the HBONE connection).
    pub peer_addr: SocketAddr,
    /// The requested destination (`:authority`).
    pub authority: SocketAddr,
    /// The original source from `forwarded: for=…` (port 0 if absent).
    pub forwarded_for: Option<SocketAddr>,
    /// The service hostname from `forwarded: …;host=…`.
    pub host: Option<String>,
    /// The `baggage` header.
    pub baggage: Option<String>,
    /// The `traceparent` header.
    pub traceparent: Option<String>,
    /// Id of the HBONE connection carrying the stream (unique per server).
    pub connection_id: u64,
    /// The client's verified leaf certificate, shared by every stream of
    /// the connection.
    pub peer_certificate: Option<Arc<CertificateDer<'static>>>,
}

/// Why a handler refused a tunnel; mapped to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 400: malformed request or destination not allowed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: denied by policy.
    #[error("denied: {0}")]
    Denied(String),
    /// 503: the upstream could not be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Refusal::Unavailable(e.to_string())
    }
}

/// Outcome of one completed tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes received from the HBONE client (sent upstream).
    pub bytes_from_client: u64,
    /// Bytes sent to the HBONE client (received from upstream).
    pub bytes_to_client: u64,
    /// Time from the 200 response until both directions finished.
    pub duration: Duration,
    /// The error that ended the tunnel, if it did not end cleanly.
    pub error: Option<String>,
}

/// Serves an accepted tunnel's stream itself; see [`Accepted::Serve`].
pub type ServeStream = Box<dyn FnOnce(H2Stream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// How an accepted tunnel is carried on.
pub enum Accepted<U> {
    /// Its bytes are relayed to and from this upstream.
    Relay(U),
    /// Its stream is handed to this function, whose future serves it in the
    /// tunnel's task (an in-process server, e.g. HTTP, with no relay and no
    /// copy in between). [`Handler::on_complete`] is not called for it.
    Serve(ServeStream),
}

impl<U> std::fmt::Debug for Accepted<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accepted::Relay(_) => "Accepted::Relay",
            Accepted::Serve(_) => "Accepted::Serve",
        })
    }
}

/// Decides where each inbound tunnel goes.
pub trait Handler: Send + Sync + 'static {
    /// The upstream byte stream (typically a `TcpStream`).
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Connects the tunnel to its upstream, or refuses it.
    fn connect(
        &self,
        req: InboundRequest,
    ) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send;

    /// Accepts the tunnel, or refuses it: what the server calls. The
    /// default relays to [`Handler::connect`]'s upstream; a handler that
    /// serves tunnels in process returns [`Accepted::Serve`] instead.
    fn accept(
        &self,
        req: InboundRequest,
    ) -> impl Future<Output = Result<Accepted<Self::Upstream>, Refusal>> + Send {
        let connect = self.connect(req);
        async move { connect.await.map(Accepted::Relay) }
    }

    /// Called once a relayed tunnel finished (after the 200 response).
    fn on_complete(&self, req: &InboundRequest, stats: &StreamStats) {
        let _ = (req, stats);
    }

    /// Called when a stream was answered with a non-200 status.
    fn on_refused(&self, req: Option<&InboundRequest>, status: StatusCode) {
        let _ = (req, status);
    }
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
#[derive(Debug, Clone)]
pub struct FnHandler<F>(F);

/// Makes a [`Handler`] from `async |InboundRequest| -> Result<Upstream, Refusal>`.
pub fn handler_fn<F, Fut, U>(f: F) -> FnHandler<F>
where
    F: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    FnHandler(f)
}

impl<F, Fut, U> Handler for FnHandler<F>
where
    F: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Upstream = U;

    fn connect(&self, req: InboundRequest) -> impl Future<Output = Result<U, Refusal>> + Send {
        (self.0)(req)
    }
}

struct Peer {
    identity: Identity,
    addr: SocketAddr,
    cert: Option<Arc<CertificateDer<'static>>>,
    conn_id: u64,
}

struct Inner<H> {
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    config: ServerConfig,
    next_conn: AtomicU64,
}

/// An HBONE server for one local identity. Cloning is cheap.
pub struct Server<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for Server<H> {
    fn clone(&self) -> Self {
        Server {
            inner: self.inner.clone(),
        }
    }
}

impl<H> std::fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Parses a `forwarded` header value: `for="ip:port"` / `for="[v6]:port"` /
/// `for=ip` plus an optional `host=…` parameter. Returns `(for, host)`.
pub fn parse_forwarded(v: &str) -> (Option<SocketAddr>, Option<String>) {
    let mut for_addr = None;
    let mut host = None;
    // Only the first forwarded-element (before any comma) is considered.
    let first = v.split(',').next().unwrap_or("");
    for pair in first.split(';') {
        let Some((k, val)) = pair.trim().split_once('=') else {
            continue;
        };
        let val = val.trim().trim_matches('"');
        if k.trim().eq_ignore_ascii_case("for") {
            for_addr = val.parse::<SocketAddr>().ok().or_else(|| {
                val.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 0))
            });
        } else if k.trim().eq_ignore_ascii_case("host") && !val.is_empty() {
            host = Some(val.to_string());
        }
    }
    (for_addr, host)
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

fn respond_status(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("valid response");
    if let Err(e) = respond.send_response(resp, true) {
        tracing::debug!(error = %e, "failed to send response");
    }
}

impl<H: Handler> Server<H> {
    /// A server presenting `identity`'s certificate from `store` (looked up
    /// per handshake, so rotation applies to new connections).
    pub fn new(store: CertStore, identity: Identity, handler: H) -> Result<Self, Error> {
        Self::with_config(store, identity, handler, ServerConfig::default())
    }

    /// Like [`Server::new`] with explicit tunables.
    pub fn with_config(
        store: CertStore,
        identity: Identity,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, Error> {
        let tls = tls::server_config(store, identity)?;
        Ok(Self::from_tls_config(tls, handler, config))
    }

    /// A server using a prebuilt rustls configuration (must require client
    /// certificates for peer identities to be available).
    pub fn from_tls_config(
        tls: Arc<rustls::ServerConfig>,
        handler: H,
        config: ServerConfig,
    ) -> Self {
        Server {
            inner: Arc::new(Inner {
                tls,
                handler,
                config,
                next_conn: AtomicU64::new(1),
            }),
        }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// Accepts connections forever, serving each on its own task.
    pub async fn serve(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _ = this.serve_connection(tcp, peer).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves one already-accepted TCP connection until it closes. Errors
    /// are logged (at debug) and returned; they only affect this connection.
    pub async fn serve_connection(
        &self,
        tcp: TcpStream,
        peer_addr: SocketAddr,
    ) -> Result<(), Error> {
        let _ = tcp.set_nodelay(true);
        self.serve_io(tcp, peer_addr).await
    }

    /// Serves one connection over any byte stream.
    pub async fn serve_io<IO>(&self, io: IO, peer_addr: SocketAddr) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn_id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("hbone_conn", conn_id, peer = %peer_addr);
        let res = self
            .serve_inner(io, peer_addr, conn_id)
            .instrument(span.clone())
            .await;
        if let Err(e) = &res {
            let _g = span.enter();
            tracing::debug!(error = %e, "HBONE connection failed");
        }
        res
    }

    async fn serve_inner<IO>(
        &self,
        io: IO,
        peer_addr: SocketAddr,
        conn_id: u64,
    ) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.config;
        let (tls, peer_identity) = tokio::time::timeout(
            cfg.handshake_timeout,
            tls::accept(self.inner.tls.clone(), io),
        )
        .await
        .map_err(|_| Error::Timeout("tls handshake"))??;
        tracing::debug!(peer_identity = %peer_identity, "TLS established");
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::new(c.clone().into_owned()));
        let peer = Peer {
            identity: peer_identity,
            addr: peer_addr,
            cert: peer_cert,
            conn_id,
        };
        self.serve_h2(tls, peer).await
    }

    /// The HTTP/2 part of a connection whose peer TLS authenticated.
    async fn serve_h2<IO>(&self, io: IO, peer: Peer) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.config;
        let mut conn = tokio::time::timeout(
            cfg.handshake_timeout,
            h2::server::Builder::new()
                .initial_window_size(cfg.stream_window)
                .initial_connection_window_size(cfg.connection_window)
                .max_frame_size(cfg.max_frame_size)
                .max_concurrent_streams(cfg.max_concurrent_streams)
                .max_send_buffer_size(cfg.max_send_buffer)
                .handshake::<_, Bytes>(io),
        )
        .await
        .map_err(|_| Error::Timeout("http2 preface"))??;

        while let Some(next) = conn.accept().await {
            let (req, respond) = next?;
            let this = self.clone();
            let peer = Peer {
                identity: peer.identity.clone(),
                addr: peer.addr,
                cert: peer.cert.clone(),
                conn_id: peer.conn_id,
            };
            tokio::spawn(
                async move { this.handle_stream(req, respond, peer).await }.in_current_span(),
            );
        }
        Ok(())
    }

    /// Fuzzing entry point: serves HTTP/2 on `io` as if TLS had
    /// authenticated `peer_identity`. Never built into the mesh's binaries.
    #[cfg(feature = "fuzzing")]
    pub async fn serve_h2_for_fuzzing<IO>(
        &self,
        io: IO,
        peer_identity: Identity,
        peer_addr: SocketAddr,
    ) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = Peer {
            identity: peer_identity,
            addr: peer_addr,
            cert: None,
            conn_id: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
        };
        self.serve_h2(io, peer).await
    }

    async fn handle_stream(
        &self,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer: Peer,
    ) {
        let handler = &self.inner.handler;
        if req.method() != Method::CONNECT {
            tracing::debug!(method = %req.method(), "rejecting non-CONNECT request");
            respond_status(&mut respond, StatusCode::BAD_REQUEST);
            handler.on_refused(None, StatusCode::BAD_REQUEST);
            return;
        }
        let authority = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(authority) = authority else {
            tracing::debug!(uri = %req.uri(), "rejecting CONNECT with bad authority");
            respond_status(&mut respond, StatusCode::BAD_REQUEST);
            handler.on_refused(None, StatusCode::BAD_REQUEST);
            return;
        };
        let headers = req.headers();
        let (forwarded_for, host) = headers
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .map(parse_forwarded)
            .unwrap_or((None, None));
        let inbound = InboundRequest {
            peer_identity: peer.identity,
            peer_addr: peer.addr,
            authority,
            forwarded_for,
            host,
            baggage: header_str(headers, "baggage"),
            traceparent: header_str(headers, "traceparent"),
            connection_id: peer.conn_id,
            peer_certificate: peer.cert,
        };
        // Boxed: the connect future is dropped once it resolves, so a
        // long-lived tunnel's task holds only the relay's state.
        let accepted = match Box::pin(handler.accept(inbound.clone())).await {
            Ok(accepted) => accepted,
            Err(refusal) => {
                tracing::debug!(%authority, %refusal, "tunnel refused");
                respond_status(&mut respond, refusal.status());
                handler.on_refused(Some(&inbound), refusal.status());
                return;
            }
        };
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("valid response");
        let send = match respond.send_response(resp, false) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "client went away before 200");
                return;
            }
        };
        let start = Instant::now();
        let mut stream = H2Stream::new(send, req.into_body());
        let mut upstream = match accepted {
            Accepted::Relay(upstream) => upstream,
            Accepted::Serve(serve) => return serve(stream).await,
        };
        let res = crate::io::relay(&mut stream, &mut upstream).await;
        let stats = StreamStats {
            bytes_from_client: stream.bytes_read(),
            bytes_to_client: stream.bytes_written(),
            duration: start.elapsed(),
            error: res.err().map(|e| e.to_string()),
        };
        tracing::debug!(
            %authority,
            from_client = stats.bytes_from_client,
            to_client = stats.bytes_to_client,
            duration_ms = stats.duration.as_millis() as u64,
            error = stats.error.as_deref(),
            "tunnel finished"
        );
        handler.on_complete(&inbound, &stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded() {
        assert_eq!(
            parse_forwarded("for=\"10.0.0.1:1234\""),
            (Some("10.0.0.1:1234".parse().unwrap()), None)
        );
        assert_eq!(
            parse_forwarded("for=\"[::1]:80\";host=svc.ns.svc.cluster.local"),
            (
                Some("[::1]:80".parse().unwrap()),
                Some("svc.ns.svc.cluster.local".into())
            )
        );
        assert_eq!(
            parse_forwarded("for=10.0.0.1"),
            (Some("10.0.0.1:0".parse().unwrap()), None)
        );
        assert_eq!(parse_forwarded("garbage"), (None, None));
    }
}
