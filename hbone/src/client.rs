//! Pooled HBONE client.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::cert::{CertStore, WorkloadCert};
use crate::error::Error;
use crate::identity::Identity;
use crate::io::H2Stream;
use crate::tls;

/// Tunables of a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Timeout for TCP connect + TLS handshake + HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// Timeout waiting for the CONNECT response.
    pub response_timeout: Duration,
    /// Upper bound of concurrent streams per connection (the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS also applies).
    pub max_streams_per_connection: usize,
    /// HTTP/2 initial stream window.
    pub stream_window: u32,
    /// HTTP/2 initial connection window.
    pub connection_window: u32,
    /// HTTP/2 max frame size we accept.
    pub max_frame_size: u32,
    /// Bytes buffered per stream for sending.
    pub max_send_buffer: usize,
    /// Connections without streams for this long are closed (lazily, on
    /// the next [`Pool::connect`] or [`Pool::evict_idle`]).
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            max_streams_per_connection: 100,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer: 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What to open a tunnel to.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Our identity; its certificate (from the pool's store) is presented.
    pub local: Identity,
    /// The HBONE endpoint, usually `<pod ip>:15008`.
    pub peer_addr: SocketAddr,
    /// Identities the server may present (any one suffices).
    pub expected: Vec<Identity>,
    /// The final destination, sent as the `:authority`.
    pub authority: SocketAddr,
    /// The original client address, sent as `forwarded: for="…"`.
    pub forwarded_for: SocketAddr,
    /// Optional service hostname, appended as `;host=…`.
    pub host: Option<String>,
    /// `baggage` header to pass through.
    pub baggage: Option<String>,
    /// `traceparent` header to pass through.
    pub traceparent: Option<String>,
}

/// Counters of a [`Pool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// TCP/TLS/HTTP2 connections dialed successfully.
    pub connections_opened: u64,
    /// Connection dials (TCP, TLS or HTTP/2 handshake) that failed.
    pub connections_failed: u64,
    /// Streams placed on an already-open connection.
    pub connections_reused: u64,
    /// Tunnels established (status 200).
    pub tunnels_opened: u64,
    /// Tunnels refused by the peer with a non-200 status.
    pub tunnels_refused: u64,
    /// Connections currently in the pool.
    pub open_connections: usize,
    /// Streams currently open.
    pub active_streams: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    local: Identity,
    expected: Vec<Identity>,
    peer: SocketAddr,
}

struct Conn {
    id: u64,
    /// Our certificate when the connection was dialed; once the store holds
    /// a different one the connection takes no new streams.
    local_cert: Arc<WorkloadCert>,
    peer_cert: Option<CertificateDer<'static>>,
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Option<Instant>>,
}

impl Conn {
    fn try_acquire(&self, limit: usize) -> bool {
        let limit = limit.min(self.send.current_max_send_streams()).max(1);
        let mut cur = self.active.load(Ordering::Acquire);
        loop {
            if cur >= limit {
                return false;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return true;
                }
                Err(v) => cur = v,
            }
        }
    }

    fn release(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    fn idle_for(&self, d: Duration) -> bool {
        self.active.load(Ordering::Acquire) == 0
            && self
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() >= d)
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

/// Opens the TCP connection under an HBONE connection. The default dials
/// from the current network namespace; ztunnel dials from inside the client
/// pod's, so the pod's own address is the source.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `peer`.
    fn dial(
        &self,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>>;
}

/// Dials from the current network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(
        &self,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(TcpStream::connect(peer))
    }
}

struct Inner {
    store: CertStore,
    config: PoolConfig,
    dialer: Arc<dyn Dialer>,
    slots: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
    opened: AtomicU64,
    failed: AtomicU64,
    reused: AtomicU64,
    tunnels: AtomicU64,
    refused: AtomicU64,
    active_streams: AtomicUsize,
}

/// A pool of HBONE connections. One HTTP/2 connection per key (local
/// identity, expected identities, peer address) carries many tunnels; a new
/// connection is opened when the existing ones are closed or full.
///
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

struct StreamGuard {
    conn: Arc<Conn>,
    inner: Arc<Inner>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.release();
        self.inner.active_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open HBONE tunnel: a byte stream to the destination.
///
/// `shutdown()` half-closes (END_STREAM); reads return EOF once the peer
/// half-closed. Dropping an unfinished tunnel resets the stream.
pub struct Tunnel {
    stream: H2Stream,
    conn_id: u64,
    _guard: StreamGuard,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("conn_id", &self.conn_id)
            .field("stream", &self.stream)
            .finish()
    }
}

impl Tunnel {
    /// Id of the pooled connection carrying this tunnel (unique per pool).
    pub fn connection_id(&self) -> u64 {
        self.conn_id
    }

    /// Payload bytes received so far.
    pub fn bytes_read(&self) -> u64 {
        self.stream.bytes_read()
    }

    /// Payload bytes sent so far.
    pub fn bytes_written(&self) -> u64 {
        self.stream.bytes_written()
    }

    /// Relays this tunnel to `io` until both directions finished; returns
    /// the bytes sent to `io` and the bytes received from it. See
    /// [`relay`](crate::relay).
    pub async fn relay<IO>(&mut self, io: &mut IO) -> io::Result<(u64, u64)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        crate::io::relay(&mut self.stream, io).await
    }

    /// Resets the stream (RST_STREAM), signalling an abortive close.
    pub fn reset(&mut self) {
        self.stream.reset();
    }

    /// The server's leaf certificate on the carrying connection.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self._guard.conn.peer_cert.as_ref()
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Formats the `forwarded` header value: `for="<ip:port>"[;host=<host>]`.
pub fn forwarded_header(forwarded_for: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("for=\"{forwarded_for}\";host={h}"),
        None => format!("for=\"{forwarded_for}\""),
    }
}

/// In TLS 1.3 the server's verdict on our certificate arrives after our
/// handshake finished, i.e. during the HTTP/2 handshake; report it as TLS.
fn tls_or_h2(e: h2::Error) -> Error {
    // tokio-rustls reports TLS failures as `InvalidData`; h2 keeps only the
    // kind and message of I/O errors, so the kind is what survives.
    let is_tls = e.get_io().is_some_and(|io| {
        io.kind() == io::ErrorKind::InvalidData
            || io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
    });
    if is_tls {
        Error::Tls(e.into_io().expect("checked is_io"))
    } else {
        Error::H2(e)
    }
}

impl Pool {
    /// A pool presenting certificates from `store`.
    pub fn new(store: CertStore, config: PoolConfig) -> Self {
        Self::with_dialer(store, config, Arc::new(DirectDialer))
    }

    /// A pool whose TCP connections are opened by `dialer`.
    pub fn with_dialer(store: CertStore, config: PoolConfig, dialer: Arc<dyn Dialer>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                dialer,
                store,
                config,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                opened: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                reused: AtomicU64::new(0),
                tunnels: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                active_streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The certificate store used by this pool.
    pub fn cert_store(&self) -> &CertStore {
        &self.inner.store
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let open = {
            let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .values()
                .map(|s| {
                    s.try_lock()
                        .map(|v| {
                            v.iter()
                                .filter(|c| !c.closed.load(Ordering::Acquire))
                                .count()
                        })
                        .unwrap_or(0)
                })
                .sum()
        };
        PoolStats {
            connections_opened: self.inner.opened.load(Ordering::Relaxed),
            connections_failed: self.inner.failed.load(Ordering::Relaxed),
            connections_reused: self.inner.reused.load(Ordering::Relaxed),
            tunnels_opened: self.inner.tunnels.load(Ordering::Relaxed),
            tunnels_refused: self.inner.refused.load(Ordering::Relaxed),
            open_connections: open,
            active_streams: self.inner.active_streams.load(Ordering::Relaxed),
        }
    }

    /// Closes (gracefully) connections that have been idle longer than the
    /// configured idle timeout.
    pub async fn evict_idle(&self) {
        let slots: Vec<Slot> = {
            let map = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        for s in slots {
            let mut v = s.lock().await;
            let t = self.inner.config.idle_timeout;
            v.retain(|c| !c.closed.load(Ordering::Acquire) && !c.idle_for(t));
        }
        let mut map = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.try_lock().map(|v| !v.is_empty()).unwrap_or(true));
    }

    /// Opens a tunnel, reusing a pooled connection when possible.
    pub async fn connect(&self, req: ConnectRequest) -> Result<Tunnel, Error> {
        let mut expected = req.expected.clone();
        expected.sort();
        expected.dedup();
        let key = Key {
            local: req.local.clone(),
            expected,
            peer: req.peer_addr,
        };
        let mut retried = false;
        loop {
            let (conn, reused) = self.acquire(&key).await?;
            self.inner.active_streams.fetch_add(1, Ordering::AcqRel);
            let guard = StreamGuard {
                conn: conn.clone(),
                inner: self.inner.clone(),
            };
            match self.open_stream(&conn, &req).await {
                Ok(stream) => {
                    self.inner.tunnels.fetch_add(1, Ordering::Relaxed);
                    return Ok(Tunnel {
                        stream,
                        conn_id: conn.id,
                        _guard: guard,
                    });
                }
                // A pooled connection may have died (GOAWAY, reset) without
                // us noticing yet: retire it and retry once on a fresh one.
                Err(Error::H2(e)) if reused && !retried => {
                    tracing::debug!(conn_id = conn.id, error = %e, "pooled connection failed; retrying");
                    if e.is_go_away() || e.is_io() || e.reason().is_none() {
                        conn.closed.store(true, Ordering::Release);
                    }
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Finds a pooled connection with a free stream slot for `key` or dials
    /// a new one. Returns the connection and whether it was reused.
    async fn acquire(&self, key: &Key) -> Result<(Arc<Conn>, bool), Error> {
        let slot = {
            let mut map = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        // Holding the per-key lock while dialing makes concurrent callers
        // wait for (and then share) the new connection.
        let mut list = slot.lock().await;
        let idle = self.inner.config.idle_timeout;
        let current = self.inner.store.get(&key.local);
        list.retain(|c| {
            !c.closed.load(Ordering::Acquire)
                && !c.idle_for(idle)
                && current
                    .as_ref()
                    .is_some_and(|cur| Arc::ptr_eq(cur, &c.local_cert))
        });
        let limit = self.inner.config.max_streams_per_connection;
        if let Some(c) = list.iter().find(|c| c.try_acquire(limit)) {
            self.inner.reused.fetch_add(1, Ordering::Relaxed);
            return Ok((c.clone(), true));
        }
        let c = match self.dial(key).await {
            Ok(c) => c,
            Err(e) => {
                self.inner.failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        c.active.store(1, Ordering::Release);
        list.push(c.clone());
        Ok((c, false))
    }

    async fn open_stream(&self, conn: &Conn, req: &ConnectRequest) -> Result<H2Stream, Error> {
        let uri = Uri::builder()
            .authority(req.authority.to_string())
            .build()
            .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut b = Request::builder().method(Method::CONNECT).uri(uri).header(
            "forwarded",
            forwarded_header(req.forwarded_for, req.host.as_deref()),
        );
        if let Some(v) = &req.baggage {
            b = b.header("baggage", v);
        }
        if let Some(v) = &req.traceparent {
            b = b.header("traceparent", v);
        }
        let request = b
            .body(())
            .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut send = conn.send.clone().ready().await.map_err(tls_or_h2)?;
        let (resp, stream) = send.send_request(request, false).map_err(tls_or_h2)?;
        let resp = tokio::time::timeout(self.inner.config.response_timeout, resp)
            .await
            .map_err(|_| Error::Timeout("CONNECT response"))?
            .map_err(tls_or_h2)?;
        if resp.status() != StatusCode::OK {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Status(resp.status()));
        }
        Ok(H2Stream::new(stream, resp.into_body()))
    }

    async fn dial(&self, key: &Key) -> Result<Arc<Conn>, Error> {
        let cfg = &self.inner.config;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("hbone_client_conn", conn_id = id, peer = %key.peer);
        let store = self.inner.store.clone();
        let local_cert = store
            .get(&key.local)
            .ok_or_else(|| Error::NoCertificate(key.local.clone()))?;
        let fut = async {
            let tls_cfg = tls::client_config(store, key.local.clone(), key.expected.clone())?;
            let tcp = self.inner.dialer.dial(key.peer).await?;
            tcp.set_nodelay(true)?;
            let tls = tls::connect(tls_cfg, tcp, key.peer).await?;
            let peer_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let (send, connection) = h2::client::Builder::new()
                .enable_push(false)
                .initial_window_size(cfg.stream_window)
                .initial_connection_window_size(cfg.connection_window)
                .max_frame_size(cfg.max_frame_size)
                .max_send_buffer_size(cfg.max_send_buffer)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(tls_or_h2)?;
            Ok::<_, Error>((send, connection, peer_cert))
        };
        let (send, connection, peer_cert) = tokio::time::timeout(cfg.connect_timeout, fut)
            .instrument(span.clone())
            .await
            .map_err(|_| Error::Timeout("connect"))??;
        let closed = Arc::new(AtomicBool::new(false));
        let closed2 = closed.clone();
        tokio::spawn(
            async move {
                match connection.await {
                    Ok(()) => tracing::debug!("connection closed"),
                    Err(e) => tracing::debug!(error = %e, "connection ended with error"),
                }
                closed2.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        tracing::debug!(conn_id = id, peer = %key.peer, "opened HBONE connection");
        Ok(Arc::new(Conn {
            id,
            local_cert,
            peer_cert,
            send,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(None),
        }))
    }
}
