//! The control plane in the lab: one `mesh-control` process on the first
//! node (host network, as istiod would run), in its own cgroup so it is never
//! captured, watching the lab's cluster directory. Each node agent gets its
//! own bearer token, so the CA can tell nodes apart.

use std::{
    fs,
    io::Read,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{Error, LabState, Result, io_err, process, run_dir};

/// Plaintext gRPC port of the control plane (xDS and CA, Istio's plaintext
/// xDS port); the lab's proxies use [`GRPC_TLS_PORT`].
pub const GRPC_PORT: u16 = 15010;
/// TLS gRPC port of the control plane (Istio's 15012), which the lab's
/// ztunnels and waypoints dial, verifying it with the CA's root.
pub const GRPC_TLS_PORT: u16 = 15012;
/// Monitoring port.
pub const STATUS_PORT: u16 = 15014;

impl LabState {
    /// The node the control plane runs on.
    pub fn control_node(&self) -> usize {
        0
    }

    /// The control plane's gRPC address, as node agents dial it.
    pub fn control_grpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.control_ip().into(), GRPC_PORT)
    }

    /// The control plane's TLS gRPC address, as node agents and waypoints
    /// dial it.
    pub fn control_grpc_tls_addr(&self) -> SocketAddr {
        SocketAddr::new(self.control_ip().into(), GRPC_TLS_PORT)
    }

    /// The `--xds-address` of the lab's proxies.
    pub fn control_xds_url(&self) -> String {
        format!("https://{}", self.control_grpc_tls_addr())
    }

    /// The mesh root the proxies verify the control plane with.
    pub fn control_root_cert(&self) -> std::path::PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    /// The control plane's monitoring address.
    pub fn control_status_addr(&self) -> SocketAddr {
        SocketAddr::new(self.control_ip().into(), STATUS_PORT)
    }

    fn control_ip(&self) -> Ipv4Addr {
        self.plan.nodes[self.control_node()].ip
    }

    /// The control plane's cgroup (outside every node's pods).
    pub fn control_cgroup(&self) -> PathBuf {
        self.cgroup.join("control")
    }

    /// Where the control plane logs.
    pub fn control_log(&self) -> PathBuf {
        run_dir(&self.plan.name).join("logs").join("control.log")
    }

    /// The bearer token file of node `node`'s agent.
    pub fn node_token_file(&self, node: usize) -> PathBuf {
        run_dir(&self.plan.name).join(format!("{}.token", self.plan.nodes[node].name))
    }

    fn tokens_file(&self) -> PathBuf {
        run_dir(&self.plan.name).join("control-tokens.json")
    }

    fn ca_dir(&self) -> PathBuf {
        run_dir(&self.plan.name).join("ca")
    }

    /// Issues every node a fresh random token and writes the control plane's
    /// tokens file.
    pub(crate) fn write_tokens(&self) -> Result<()> {
        let mut tokens = serde_json::Map::new();
        for node in 0..self.plan.nodes.len() {
            let token = random_token()?;
            write_secret(&self.node_token_file(node), token.as_bytes())?;
            tokens.insert(token, json!({ "node": self.plan.nodes[node].name }));
        }
        let text = serde_json::to_string_pretty(&json!({ "tokens": tokens }))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        write_secret(&self.tokens_file(), text.as_bytes())
    }

    /// Starts the control plane and waits until it serves gRPC.
    pub fn start_control(&mut self) -> Result<u32> {
        let cgroup = self.control_cgroup();
        fs::create_dir_all(&cgroup).map_err(io_err(format!("creating {}", cgroup.display())))?;
        let log_path = self.control_log();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let mut command = std::process::Command::new(&self.control_binary);
        process::enter(
            &mut command,
            &self.plan.nodes[self.control_node()].netns,
            &cgroup,
        )?;
        process::detach(&mut command);
        command
            .arg("--config-dir")
            .arg(self.cluster_dir())
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .arg("--tokens-file")
            .arg(self.tokens_file())
            .arg("--grpc-addr")
            .arg(self.control_grpc_addr().to_string())
            .arg("--grpc-tls-addr")
            .arg(self.control_grpc_tls_addr().to_string())
            .arg("--tls-ip-san")
            .arg(self.control_ip().to_string())
            .arg("--status-addr")
            .arg(self.control_status_addr().to_string())
            .env(
                "MESH_LOG",
                std::env::var("MESH_CONTROL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("duplicating log fd"))?)
            .stderr(log);
        let pid = command
            .spawn()
            .map_err(io_err("starting the control plane"))?
            .id();
        self.control_pid = Some(pid);
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
            let listening = crate::up::listening_ports(&table);
            if listening.contains(&GRPC_PORT) && listening.contains(&GRPC_TLS_PORT) {
                return Ok(pid);
            }
            if Instant::now() > deadline || !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(6).collect();
                return Err(Error::App {
                    pod: "control plane".into(),
                    message: format!(
                        "did not start serving:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ),
                    log: log_path.display().to_string(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_secret(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io_err(format!("writing {}", path.display())))
}
