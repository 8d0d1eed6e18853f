//! The node agent's control loop: keeps capture and the in-pod listeners in
//! line with the node's pods, as they are enrolled and released.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use mesh_config::node::{NodePod, NodePods};
use mesh_ebpf_common::{
    FASTPATH_SK_MSG_PROG, FASTPATH_SOCKS_MAP, HBONE_PORT, INBOUND_PLAINTEXT_PORT, ListenerKind,
    OUTBOUND_PORT,
};
use mesh_ebpf_loader::capture::{Capture, PodTarget};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    discovery::Discovery,
    fastpath::SameNode,
    identity::CertManager,
    inpod::PodNetns,
    policy::PolicyStore,
    proxy::{InboundTunnels, PodContext, PodDialer, Proxy},
};

/// How long a pod that failed to enrol waits for the next attempt.
const ENROL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The agent: capture state plus one set of listeners per enrolled pod.
pub struct Agent {
    capture: Arc<Mutex<Capture>>,
    proxy: Arc<Proxy>,
    same_node: Arc<SameNode>,
    certs: Arc<CertManager>,
    trust_domain: String,
    running: BTreeMap<String, RunningPod>,
    /// When to try again the pods the last reconcile could not enrol.
    retry_at: Option<std::time::Instant>,
    /// Why each pod that failed to enrol failed, last time (logged once per
    /// distinct error, not on every retry).
    failing: BTreeMap<String, String>,
}

struct RunningPod {
    spec: NodePod,
    accept_loops: Vec<JoinHandle<()>>,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        // Closing the listeners drops them from the kernel's SOCKHASH too.
        // Connections already accepted run in their own tasks and go on.
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

/// Where capture lives on this node.
#[derive(Debug)]
pub struct CaptureConfig<'a> {
    /// The cgroup all pods of the node live under.
    pub pods_cgroup: &'a Path,
    /// bpffs directory of the node's pins.
    pub pin_dir: &'a Path,
    /// Forward the programs' debug records into ztunnel's log.
    pub ebpf_debug_logs: bool,
    /// Health-probe sources, never captured.
    pub probe_sources: &'a [Ipv4Addr],
    /// Splice same-node HBONE connections in the kernel (sockmap).
    pub same_node_fast_path: bool,
}

/// What the control plane feeds the agent.
pub struct MeshState {
    /// Workloads and services.
    pub discovery: Arc<Discovery>,
    /// L4 policies.
    pub policy: Arc<PolicyStore>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Istio's TCP metrics, recorded per connection.
    pub tcp_metrics: crate::metrics::TcpMetrics,
}

impl Agent {
    /// Loads (or adopts) the capture programs for the pods under
    /// `pods_cgroup`; with `ebpf_debug_logs`, their debug records go to
    /// ztunnel's log; connections from `probe_sources` (health probes) are
    /// never captured.
    pub fn new(config: CaptureConfig<'_>, mesh: MeshState) -> anyhow::Result<Self> {
        let CaptureConfig {
            pods_cgroup,
            pin_dir,
            ebpf_debug_logs,
            probe_sources,
            same_node_fast_path,
        } = config;
        let MeshState {
            discovery,
            policy,
            certs,
            trust_domain,
            tcp_metrics,
        } = mesh;
        let mut capture =
            Capture::install(pods_cgroup, pin_dir, ebpf_debug_logs).with_context(|| {
                format!(
                    "installing capture on {} (pins in {})",
                    pods_cgroup.display(),
                    pin_dir.display()
                )
            })?;
        capture
            .set_probe_sources(probe_sources)
            .context("setting health-probe sources")?;
        if ebpf_debug_logs {
            match capture.take_logger() {
                Some(Ok(logger)) => forward_ebpf_logs(logger)?,
                Some(Err(err)) => warn!(error = %err, "eBPF logs unavailable"),
                None => warn!("the eBPF object has no log buffer"),
            }
        }
        if same_node_fast_path {
            match capture.enable_fast_path() {
                Ok(()) => info!("same-node fast path on"),
                Err(err) => warn!(
                    program = FASTPATH_SK_MSG_PROG,
                    map = FASTPATH_SOCKS_MAP,
                    error = %format!("{:#}", anyhow::Error::new(err)),
                    "same-node fast path unavailable; same-node traffic takes the ordinary path"
                ),
            }
        }
        let capture = Arc::new(Mutex::new(capture));
        Ok(Self {
            same_node: Arc::new(SameNode::new(capture.clone())),
            proxy: Arc::new(Proxy {
                capture: capture.clone(),
                discovery,
                policy,
                metrics: tcp_metrics,
                certs: certs.clone(),
                open: Arc::default(),
            }),
            capture,
            certs,
            trust_domain,
            running: BTreeMap::new(),
            retry_at: None,
            failing: BTreeMap::new(),
        })
    }

    /// Whether a pod failed to enrol and [`reconcile`](Self::reconcile)
    /// should run again even though nothing changed.
    pub fn needs_retry(&self) -> bool {
        self.retry_at
            .is_some_and(|at| std::time::Instant::now() >= at)
    }

    /// Brings capture in line with `desired`: enrols new pods, releases those
    /// that left or opted out. A pod that fails is logged and left for the
    /// next call (see [`needs_retry`](Self::needs_retry)); the others are not
    /// affected.
    pub async fn reconcile(&mut self, desired: &NodePods) {
        self.retry_at = None;
        let wanted: BTreeMap<String, &NodePod> = desired
            .pods
            .iter()
            .filter(|pod| pod.enrolled)
            .map(|pod| (format!("{}/{}", pod.namespace, pod.name), pod))
            .collect();
        self.failing.retain(|key, _| wanted.contains_key(key));

        let leaving: Vec<String> = self
            .running
            .iter()
            .filter(|(key, running)| wanted.get(*key).is_none_or(|pod| **pod != running.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaving {
            if let Some(running) = self.running.remove(&key) {
                match self.lock().release(&target(&running.spec)) {
                    Ok(()) => info!(pod = %key, "released from the mesh"),
                    Err(err) => {
                        warn!(pod = %key, error = %format!("{err:#}"), "releasing pod failed")
                    }
                }
            }
        }

        let ips: Vec<Ipv4Addr> = wanted.values().map(|pod| pod.ip).collect();
        match self.lock().retain(|ip| ips.contains(&ip)) {
            Ok(stale) if !stale.is_empty() => {
                info!(?stale, "released pods that left while the agent was away")
            }
            Ok(_) => {}
            Err(err) => warn!(error = %err, "releasing stale pods failed"),
        }

        // Certificates for the identities that run here now; the others'
        // renewals stop.
        let identities: Vec<String> = wanted.values().map(|pod| self.identity(pod)).collect();
        self.certs.retain(&identities);
        for identity in &identities {
            self.certs.prefetch(identity);
        }

        for (key, pod) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            match self.start(pod).await {
                Ok(running) => {
                    info!(pod = %key, ip = %pod.ip, "enrolled in the mesh");
                    self.failing.remove(&key);
                    self.running.insert(key, running);
                }
                Err(err) => {
                    self.retry_at = Some(std::time::Instant::now() + ENROL_RETRY);
                    let error = format!("{err:#}");
                    if self.failing.get(&key) != Some(&error) {
                        warn!(pod = %key, %error, "enrolling pod failed; will retry every second");
                    } else {
                        debug!(pod = %key, %error, "enrolling pod failed again");
                    }
                    self.failing.insert(key, error);
                }
            }
        }
        self.same_node
            .set_local_pods(self.running.values().map(|running| running.spec.ip));
    }

    /// Opens the pod's listeners, registers them, then enrols the pod, so
    /// there is no moment where its connections would be refused.
    async fn start(&self, pod: &NodePod) -> anyhow::Result<RunningPod> {
        let netns = PodNetns::open(&pod.netns)
            .with_context(|| format!("opening netns {}", pod.netns.display()))?;
        netns
            .prepare_delivery()
            .await
            .context("preparing the pod for transparent delivery")?;
        let outbound = netns
            .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))
            .await
            .context("listening on 127.0.0.1:15001 in the pod")?;
        let inbound = netns
            .listen(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                INBOUND_PLAINTEXT_PORT,
            )))
            .await
            .context("listening on 0.0.0.0:15006 in the pod")?;
        let hbone = netns
            .listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)))
            .await
            .context("listening on 0.0.0.0:15008 in the pod")?;
        let identity: mesh_hbone::Identity = self.identity(pod).parse().with_context(|| {
            format!(
                "service account {:?} is not a valid identity",
                pod.service_account
            )
        })?;
        let context = Arc::new(PodContext {
            name: format!("{}/{}", pod.namespace, pod.name),
            ip: pod.ip,
            pool: mesh_hbone::Pool::with_dialer(
                self.certs.store().clone(),
                mesh_hbone::PoolConfig::default(),
                Arc::new(PodDialer {
                    netns: netns.clone(),
                    same_node: self.same_node.clone(),
                }),
            ),
            identity: identity.clone(),
            netns,
        });
        let server = mesh_hbone::Server::new(
            self.certs.store().clone(),
            identity,
            InboundTunnels {
                proxy: self.proxy.clone(),
                pod: context.clone(),
            },
        )
        .context("building the pod's HBONE server")?;
        {
            let mut capture = self.lock();
            capture.register_listener(pod.ip, ListenerKind::InboundPlaintext, &inbound)?;
            capture.register_listener(pod.ip, ListenerKind::Hbone, &hbone)?;
            capture.enroll(&target(pod))?;
        }
        let proxy = self.proxy.clone();
        let outbound_loop = accept_loop(outbound, context.clone(), move |ctx, stream, peer| {
            let relay = proxy.clone().outbound(ctx, stream, peer);
            debug_assert_small(&relay);
            tokio::spawn(proxy.open.track(relay));
        });
        let proxy = self.proxy.clone();
        let inbound_loop = accept_loop(inbound, context.clone(), move |ctx, stream, peer| {
            let relay = proxy.clone().inbound_plaintext(ctx, stream, peer);
            debug_assert_small(&relay);
            tokio::spawn(proxy.open.track(relay));
        });
        let same_node = self.same_node.clone();
        let hbone_loop = accept_loop(hbone, context, move |_, stream, peer| {
            // Before the handshake: see `fastpath` for why the order matters.
            same_node.offer(&stream);
            let server = server.clone();
            tokio::spawn(async move {
                if let Err(err) = server.serve_connection(stream, peer).await {
                    debug!(%peer, error = %err, "HBONE connection ended with an error");
                }
            });
        });
        Ok(RunningPod {
            spec: pod.clone(),
            accept_loops: vec![outbound_loop, inbound_loop, hbone_loop],
        })
    }

    /// `pod`'s SPIFFE identity.
    fn identity(&self, pod: &NodePod) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, pod.namespace, pod.service_account
        )
    }

    /// Stops accepting on every pod's listeners (enrolment and capture stay
    /// as they are: new connections are refused, never sent around the
    /// mesh), then waits up to `period` for the open relays to close.
    /// Returns how many were still open.
    pub async fn drain(&mut self, period: std::time::Duration) -> usize {
        // Dropping a running pod closes its listeners only.
        self.running.clear();
        let open = self.proxy.open.count();
        if open > 0 {
            info!(
                open,
                period_ms = period.as_millis() as u64,
                "draining open connections"
            );
        }
        self.proxy.open.drained(period).await
    }

    /// The shared capture state (for the metrics collector).
    pub fn capture(&self) -> Arc<Mutex<Capture>> {
        self.capture.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        // A panic while holding the lock leaves the maps as the kernel has
        // them, which is always consistent; keep going.
        self.capture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn accept_loop(
    listener: TcpListener,
    pod: Arc<PodContext>,
    handle: impl Fn(Arc<PodContext>, tokio::net::TcpStream, SocketAddr) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // Replies go out as soon as they are written: the relay
                    // never leaves a partial message for Nagle to hold.
                    let _ = stream.set_nodelay(true);
                    handle(pod.clone(), stream, peer)
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(pod = %pod.name, error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Forwards the programs' aya-log records into ztunnel's log as they come.
fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the logger owns the ring buffer's fd for as long as the AsyncFd
    // holds it, and flushing never closes or replaces that fd.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("watching the eBPF log ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                warn!("eBPF log ring buffer closed");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

fn target(pod: &NodePod) -> PodTarget {
    PodTarget {
        ip: pod.ip,
        cgroup: pod.cgroup.clone(),
        netns: pod.netns.clone(),
    }
}

/// Reads a node pods file; `None` (with a warning) when it is malformed, so
/// the last good one stays in force.
pub fn read_node_pods(path: &PathBuf) -> Option<NodePods> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            warn!(file = %path.display(), error = %err, "reading node pods failed; keeping the last good set");
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(pods) => Some(pods),
        Err(err) => {
            warn!(file = %path.display(), error = %err, "node pods file is malformed; keeping the last good set");
            None
        }
    }
}

/// Most bytes a connection's task may hold inline. A held connection keeps
/// its task for its whole life, so this is most of what an idle tunnelled
/// connection costs (issue 8's target: under 4 KiB in all); today's
/// futures are about 560 bytes, in debug and release builds alike. Checked
/// in debug builds, which the lab tests run, so a change that puts the
/// connection's setup back into its task fails there.
const MAX_CONNECTION_TASK: usize = 1024;

fn debug_assert_small<F>(future: &F) {
    debug_assert!(
        std::mem::size_of_val(future) <= MAX_CONNECTION_TASK,
        "a connection's future is {} bytes, over {MAX_CONNECTION_TASK}: box what it only needs while setting up",
        std::mem::size_of_val(future)
    );
}
