//! Thread-per-core serving, nginx's model: one single-threaded tokio
//! runtime per worker thread, each with its own `SO_REUSEPORT` listener on
//! every serving port (HBONE and each ingress Gateway port) and its own
//! upstream connection pools (hyper's HTTP/1.1 pool, the HTTP/2 pool and the
//! HBONE pool). The kernel spreads new connections over the workers'
//! listeners, and a request never leaves the thread that accepted its
//! connection: the downstream connection's task and the pooled upstream
//! connection's task run on the same thread, so handing a request to the
//! upstream and its response back costs no cross-thread wake-up.
//!
//! What stays shared between the workers: the config [`Store`] (behind
//! arc-swap; every worker follows its changes, so an ingress port added or
//! removed by LDS is bound or closed on every worker), the [`Metrics`], and
//! the certificates ([`CertStore`]). The xDS client, the certificate
//! manager and the admin, metrics and readiness servers run elsewhere (the
//! binary runs them on the main thread's runtime).

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use mesh_hbone::{CertStore, Identity, Pool, PoolConfig, Server};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;
use tracing::{Instrument, error, info_span};

use crate::{
    access_log::AccessLog,
    config::Store,
    metrics::Metrics,
    proxy::{Tunnels, Waypoint, run_ingress},
    upstream::{Clients, Connector, ConnectorInner},
};

/// Backlog of every listening socket (tokio's `TcpListener::bind` default).
const BACKLOG: i32 = 1024;

/// What every worker serves with; each builds its own [`Waypoint`] (and so
/// its own upstream pools) from it.
#[derive(Clone)]
pub struct Shared {
    /// The config, shared by all workers.
    pub store: Arc<Store>,
    /// Istio's request metrics, shared by all workers.
    pub metrics: Metrics,
    /// The request access log, shared by all workers.
    pub access_log: AccessLog,
    /// The waypoint's certificates (for its HBONE server and client).
    pub certs: CertStore,
    /// The waypoint's own identity.
    pub identity: Identity,
    /// The waypoint's address, announced as its tunnels' source.
    pub local_addr: SocketAddr,
    /// TCP and tunnel setup limit of upstream connections.
    pub connect_timeout: Duration,
}

impl Shared {
    /// A [`Waypoint`] with pools of its own, for one worker.
    pub fn waypoint(&self) -> Arc<Waypoint> {
        let connector = Connector::new(ConnectorInner {
            pool: Pool::new(self.certs.clone(), PoolConfig::default()),
            local: self.identity.clone(),
            local_addr: self.local_addr,
            store: self.store.clone(),
            connect_timeout: self.connect_timeout,
        });
        Arc::new(Waypoint {
            store: self.store.clone(),
            clients: Clients::new(connector.clone()),
            connector,
            metrics: self.metrics.clone(),
            access_log: self.access_log.clone(),
        })
    }
}

/// The running workers.
pub struct Workers {
    accepted: Vec<Arc<AtomicU64>>,
    stopped: mpsc::UnboundedReceiver<usize>,
}

impl Workers {
    /// Starts `count` workers (at least one). With `hbone`, each serves
    /// HBONE on that address through a listener of its own; all of those
    /// are bound before any worker starts, so a bind error is returned here
    /// (and the process refuses to start, as with one listener). Every
    /// worker binds the ingress ports of the config as they come and go.
    pub fn start(count: usize, shared: Shared, hbone: Option<SocketAddr>) -> io::Result<Self> {
        let count = count.max(1);
        let mut hbone_listeners = Vec::with_capacity(count);
        if let Some(mut addr) = hbone {
            for _ in 0..count {
                let listener = bind_reuseport(addr)?;
                // Port 0: the others join the port the first one got.
                addr = listener.local_addr()?;
                hbone_listeners.push(Some(listener));
            }
        } else {
            hbone_listeners.resize_with(count, || None);
        }
        let ids = Arc::new(AtomicU64::new(1));
        let (stopped_tx, stopped) = mpsc::unbounded_channel();
        let mut accepted = Vec::with_capacity(count);
        for (index, hbone) in hbone_listeners.into_iter().enumerate() {
            let counter = Arc::new(AtomicU64::new(0));
            accepted.push(counter.clone());
            let shared = shared.clone();
            let ids = ids.clone();
            let stopped = Stopped(index, stopped_tx.clone());
            thread::Builder::new()
                .name(format!("waypoint-worker-{index}"))
                .spawn(move || {
                    let _stopped = stopped;
                    if let Err(err) = run_worker(index, shared, hbone, ids, counter) {
                        error!(worker = index, error = %err, "worker failed");
                    }
                })?;
        }
        Ok(Self { accepted, stopped })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// Ingress connections each worker has accepted so far, by worker.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until a worker stopped (they serve forever, so: failed or
    /// panicked) and returns its index.
    pub async fn stopped(&mut self) -> usize {
        // Every worker holds a sender until it stops; `None` cannot happen
        // while `self` is alive, but reads as "all stopped".
        self.stopped.recv().await.unwrap_or(0)
    }
}

/// Reports a worker's end when dropped (also when its thread panics).
struct Stopped(usize, mpsc::UnboundedSender<usize>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// One worker's thread: its runtime, its HBONE server and its ingress
/// listeners, all on this thread.
fn run_worker(
    index: usize,
    shared: Shared,
    hbone: Option<std::net::TcpListener>,
    ids: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(
        async move {
            let waypoint = shared.waypoint();
            tokio::spawn(run_ingress(waypoint.clone(), ids, accepted).in_current_span());
            match hbone {
                Some(listener) => {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let server = Server::new(
                        shared.certs.clone(),
                        shared.identity.clone(),
                        Tunnels(waypoint),
                    )?;
                    server.serve(listener).await?;
                }
                None => std::future::pending::<()>().await,
            }
            Ok(())
        }
        .instrument(info_span!("worker", worker = index)),
    )
}

/// A listening socket on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`, so
/// each worker can hold one on the same port and the kernel balances new
/// connections between them. Non-blocking, for tokio.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Instant,
    };

    use super::*;
    use crate::{
        config::{Chain, Config},
        ingress::{IngressChain, IngressListener},
    };

    /// A config with one plain-HTTP ingress port (its route table unknown,
    /// so every request is answered 404 by the gateway itself), or none.
    fn config(port: Option<u16>) -> Config {
        let mut config = Config::default();
        if let Some(port) = port {
            let chain = IngressChain {
                server_names: Vec::new(),
                tls: None,
                chain: Chain::Http {
                    name: "test".to_owned(),
                    route_config: "missing".to_owned(),
                    authz: Default::default(),
                },
            };
            let listener = IngressListener {
                chains: vec![chain],
            };
            config.ingress.insert(port, Arc::new(listener));
        }
        config
    }

    /// One request on a connection of its own: the status line, or why not.
    fn get(port: u16) -> io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.lines().next().unwrap_or_default().to_owned())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    #[test]
    fn ingress_ports_from_lds_open_and_close_on_every_worker() {
        let store = Arc::new(Store::default());
        let shared = Shared {
            store: store.clone(),
            metrics: Metrics::default(),
            access_log: AccessLog::off(),
            certs: CertStore::new(),
            identity: Identity::new("cluster.local", "test", "gateway"),
            local_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            connect_timeout: Duration::from_secs(1),
        };
        let workers = Workers::start(3, shared, None).expect("workers");
        assert_eq!(workers.len(), 3);
        let port = free_port();
        store.publish(config(Some(port)));

        // Served by every worker: the kernel spreads connections over the
        // workers' listeners, and every one of them is answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut answered = 0;
        while workers.accepted().contains(&0) {
            assert!(
                Instant::now() < deadline,
                "not every worker accepted: {:?} after {answered} requests",
                workers.accepted()
            );
            match get(port) {
                Ok(status) => {
                    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
                    answered += 1;
                }
                // Before the first worker bound the port.
                Err(err) if answered == 0 => {
                    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
                    thread::sleep(Duration::from_millis(20));
                }
                Err(err) => panic!("request {answered} failed: {err}"),
            }
        }
        for i in 0..50 {
            let status = get(port).unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert!(status.starts_with("HTTP/1.1 404"), "{status}");
        }

        // Removed by LDS: closed on every worker (while any one of them
        // still listened, the kernel would hand it every connection).
        store.publish(config(None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while (0..20).any(|_| TcpStream::connect(("127.0.0.1", port)).is_ok()) {
            assert!(Instant::now() < deadline, "port {port} still open");
            thread::sleep(Duration::from_millis(20));
        }
    }
}
