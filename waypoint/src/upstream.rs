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

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
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

/// The two pooled clients.
#[derive(Clone)]
pub struct Clients {
    /// HTTP/1.1 with keep-alive.
    pub http1: Client<Connector, Body>,
    /// HTTP/2.
    pub http2: Client<Connector, Body>,
}

impl Clients {
    /// Clients over `connector`.
    pub fn new(connector: Connector) -> Self {
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        Self { http1, http2 }
    }
}
