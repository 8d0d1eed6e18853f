//! Connections to endpoints: HBONE (mTLS, the endpoint's SPIFFE identity
//! checked) for mesh workloads, plain TCP for the rest, pooled per endpoint
//! by hyper's client (HTTP/1.1 keep-alive, or one multiplexed HTTP/2
//! connection).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use std::collections::HashMap;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{
    Uri,
    body::Incoming,
    client::conn::http2::{self, SendRequest},
};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use mesh_hbone::{ConnectRequest, Identity, Pool, Tunnel};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::config::Store;

/// Request bodies sent upstream.
pub type Body = BoxBody<Bytes, BoxError>;
/// Errors of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A byte stream to an endpoint.
pub enum Upstream {
    /// Through an HBONE tunnel.
    Hbone(Box<Tunnel>),
    /// Plain TCP.
    Tcp(TcpStream),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_flush(cx),
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream as hyper's client wants it.
pub struct Conn(TokioIo<Upstream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Opens connections to endpoints named by `http://<ip>:<port>` URIs.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

/// What a connection is opened with.
pub struct ConnectorInner {
    /// HBONE connections (shared by all tunnels to one endpoint).
    pub pool: Pool,
    /// The waypoint's own identity.
    pub local: Identity,
    /// The waypoint's address, announced as the tunnels' source.
    pub local_addr: SocketAddr,
    /// Where endpoint identities are looked up.
    pub store: Arc<Store>,
    /// TCP and tunnel setup limit.
    pub connect_timeout: Duration,
}

impl Connector {
    /// A connector over `inner`.
    pub fn new(inner: ConnectorInner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Opens a byte stream to `addr`: HBONE if the mesh knows its identity.
    pub async fn open(&self, addr: SocketAddr) -> io::Result<Upstream> {
        let inner = &self.inner;
        let identity = inner.store.load().identities.get(&addr).cloned().flatten();
        let connect = async {
            match identity {
                Some(expected) => inner
                    .pool
                    .connect(ConnectRequest {
                        local: inner.local.clone(),
                        peer_addr: SocketAddr::new(addr.ip(), mesh_hbone::HBONE_PORT),
                        expected: vec![expected],
                        authority: addr,
                        forwarded_for: inner.local_addr,
                        host: None,
                        baggage: None,
                        traceparent: None,
                    })
                    .await
                    .map(|t| Upstream::Hbone(Box::new(t)))
                    .map_err(io::Error::other),
                None => {
                    let stream = TcpStream::connect(addr).await?;
                    let _ = stream.set_nodelay(true);
                    Ok(Upstream::Tcp(stream))
                }
            }
        };
        tokio::time::timeout(inner.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))?
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "endpoint URI without an address",
                    )
                })?;
            Ok(Conn(TokioIo::new(this.open(addr).await?)))
        })
    }
}

/// Why a request to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made.
    #[error("connecting")]
    Connect(#[source] io::Error),
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2")]
    Http2(#[source] hyper::Error),
    /// The HTTP/1.1 client failed.
    #[error(transparent)]
    Http1(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// Whether it failed before a connection was established.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http2(_) => false,
            SendError::Http1(err) => err.is_connect(),
        }
    }

    /// Whether an HTTP/2 upstream refused the stream (`REFUSED_STREAM`):
    /// the request was not processed, so it is safe to retry.
    pub fn is_refused_stream(&self) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = source {
            if let Some(h2) = err.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = err.source();
        }
        false
    }
}

/// HTTP/2 connections, one per endpoint, each multiplexing every request to
/// it. hyper's pooled client takes `:authority` from the URI it pools by;
/// this pool is keyed by endpoint instead, so requests keep the service's
/// authority (`reviews:9080`, not the pod's address), as gRPC expects.
#[derive(Clone)]
pub struct Http2Pool {
    connector: Connector,
    senders: Arc<std::sync::Mutex<HashMap<SocketAddr, SendRequest<Body>>>>,
}

impl Http2Pool {
    /// A pool opening connections with `connector`.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            senders: Default::default(),
        }
    }

    /// Sends `request` (its URI carrying the authority to present) to
    /// endpoint `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.sender(addr).await?;
        sender.ready().await.map_err(SendError::Http2)?;
        sender.send_request(request).await.map_err(SendError::Http2)
    }

    async fn sender(&self, addr: SocketAddr) -> Result<SendRequest<Body>, SendError> {
        if let Some(sender) = self.lock().get(&addr).filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let io = self
            .connector
            .open(addr)
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Http2)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%addr, error = %err, "HTTP/2 upstream connection ended");
            }
        });
        let live = self.connector.inner.store.load();
        let mut senders = self.lock();
        // Forget closed connections and endpoints that left the config.
        senders.retain(|a, s| !s.is_closed() && live.identities.contains_key(a));
        senders.insert(addr, sender.clone());
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SendRequest<Body>>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The upstream clients.
#[derive(Clone)]
pub struct Clients {
    /// HTTP/1.1 with keep-alive, pooled per endpoint.
    pub http1: Client<Connector, Body>,
    /// HTTP/2, one multiplexed connection per endpoint.
    pub http2: Http2Pool,
}

impl Clients {
    /// Clients over `connector`.
    pub fn new(connector: Connector) -> Self {
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(connector.clone());
        Self {
            http1,
            http2: Http2Pool::new(connector),
        }
    }

    /// Sends `request` to endpoint `addr` over `protocol`. HTTP/1.1
    /// requests carry the endpoint in their URI (the pool key) and the
    /// authority in `Host`; HTTP/2 ones carry the authority in their URI.
    pub async fn send(
        &self,
        protocol: crate::cluster::UpstreamProtocol,
        addr: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        match protocol {
            crate::cluster::UpstreamProtocol::Http1 => Ok(self.http1.request(request).await?),
            crate::cluster::UpstreamProtocol::Http2 => self.http2.send(addr, request).await,
        }
    }
}
