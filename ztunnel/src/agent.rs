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
use mesh_ebpf_common::{INBOUND_PLAINTEXT_PORT, ListenerKind, OUTBOUND_PORT};
use mesh_ebpf_loader::capture::{Capture, PodTarget};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    inpod::PodNetns,
    proxy::{self, PodContext},
};

/// The agent: capture state plus one set of listeners per enrolled pod.
pub struct Agent {
    capture: Arc<Mutex<Capture>>,
    running: BTreeMap<String, RunningPod>,
    /// Whether the last reconcile left a pod it could not enrol.
    retry: bool,
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

impl Agent {
    /// Loads (or adopts) the capture programs for the pods under `pods_cgroup`;
    /// with `ebpf_debug_logs`, their debug records go to ztunnel's log;
    /// connections from `probe_sources` (health probes) are never captured.
    pub fn new(
        pods_cgroup: &Path,
        pin_dir: &Path,
        ebpf_debug_logs: bool,
        probe_sources: &[Ipv4Addr],
    ) -> anyhow::Result<Self> {
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
        Ok(Self {
            capture: Arc::new(Mutex::new(capture)),
            running: BTreeMap::new(),
            retry: false,
        })
    }

    /// Whether a pod failed to enrol and [`reconcile`](Self::reconcile)
    /// should run again even though nothing changed.
    pub fn needs_retry(&self) -> bool {
        self.retry
    }

    /// Brings capture in line with `desired`: enrols new pods, releases those
    /// that left or opted out. A pod that fails is logged and left for the
    /// next call (see [`needs_retry`](Self::needs_retry)); the others are not
    /// affected.
    pub async fn reconcile(&mut self, desired: &NodePods) {
        self.retry = false;
        let wanted: BTreeMap<String, &NodePod> = desired
            .pods
            .iter()
            .filter(|pod| pod.enrolled)
            .map(|pod| (format!("{}/{}", pod.namespace, pod.name), pod))
            .collect();

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

        for (key, pod) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            match self.start(pod).await {
                Ok(running) => {
                    info!(pod = %key, ip = %pod.ip, "enrolled in the mesh");
                    self.running.insert(key, running);
                }
                Err(err) => {
                    self.retry = true;
                    warn!(pod = %key, error = %format!("{err:#}"), "enrolling pod failed; will retry")
                }
            }
        }
    }

    /// Opens the pod's listeners, registers them, then enrols the pod, so
    /// there is no moment where its connections would be refused.
    async fn start(&self, pod: &NodePod) -> anyhow::Result<RunningPod> {
        let netns = PodNetns::open(&pod.netns)
            .with_context(|| format!("opening netns {}", pod.netns.display()))?;
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
        {
            let mut capture = self.lock();
            capture.register_listener(pod.ip, ListenerKind::InboundPlaintext, &inbound)?;
            capture.enroll(&target(pod))?;
        }
        let context = Arc::new(PodContext {
            name: format!("{}/{}", pod.namespace, pod.name),
            ip: pod.ip,
            netns,
        });
        let capture = self.capture.clone();
        let outbound_loop = accept_loop(outbound, context.clone(), move |ctx, stream, peer| {
            tokio::spawn(proxy::outbound(ctx, capture.clone(), stream, peer));
        });
        let inbound_loop = accept_loop(inbound, context, |ctx, stream, peer| {
            tokio::spawn(proxy::inbound(ctx, stream, peer));
        });
        Ok(RunningPod {
            spec: pod.clone(),
            accept_loops: vec![outbound_loop, inbound_loop],
        })
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
                Ok((stream, peer)) => handle(pod.clone(), stream, peer),
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
