//! The lab: Kubernetes manifests turned into a cluster of network namespaces
//! on one Linux machine, so every test and demo runs real sockets, real eBPF
//! programs and real TLS.
//!
//! - Each node is a network namespace; nodes are joined by a veth link and
//!   route each other's pod CIDRs.
//! - Each pod replica is a network namespace wired to its node by a veth pair,
//!   and a cgroup v2 below its node's cgroup, running the stand-in app.
//! - Each Service gets a VIP, translated to a backend at `connect()` time by
//!   the lab's cgroup `connect4` load balancer (the lab's kube-proxy).
//!
//! Everything the lab creates is named after the lab (`<lab>-...`), so two
//! labs never collide, and [`down`] finds and removes it all from names alone,
//! even after a crash or a half-finished [`up`].

pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod control;
pub mod deploy;
mod down;
pub mod mesh;
pub mod netns;
pub mod plan;
pub mod probe;
pub mod process;
pub mod state;
mod up;

use std::path::PathBuf;

pub use down::{DownReport, down};
pub use plan::{LabPlan, NodePlan, PodPlan, PortProtocol, ServicePlan};
pub use state::LabState;
pub use up::{UpOptions, up};

/// Lab name used when none is given.
pub const DEFAULT_LAB: &str = "meshlab";

/// Istio's sample manifests: `$MESH_ISTIO_SAMPLES`, or `shared/istio-samples`
/// beside the repository (where CI and the team's machines keep them).
pub fn istio_samples_dir() -> PathBuf {
    std::env::var_os("MESH_ISTIO_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples")
        })
}

/// Directory holding a lab's state file, hosts file and logs.
pub fn run_dir(lab: &str) -> PathBuf {
    PathBuf::from("/run/mesh-lab").join(lab)
}

/// bpffs directory holding a lab's pins.
pub fn pin_dir(lab: &str) -> PathBuf {
    PathBuf::from(mesh_ebpf_loader::bpffs::DEFAULT_ROOT).join(lab)
}

/// What can go wrong building, inspecting or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifests do not describe a lab we can build.
    #[error("invalid lab: {0}")]
    Invalid(String),
    /// Manifests failed to load.
    #[error("manifests: {0}")]
    Config(String),
    /// An `ip` (iproute2) command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments given.
        args: String,
        /// What `ip` printed.
        stderr: String,
    },
    /// A filesystem or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done, with the path or name it applied to.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Loading or configuring the lab's eBPF programs failed.
    #[error("eBPF")]
    Ebpf(#[from] mesh_ebpf_loader::Error),
    /// A pod's app did not come up.
    #[error("pod {pod}: {message} (log: {log})")]
    App {
        /// Pod name.
        pod: String,
        /// What happened.
        message: String,
        /// Where its log is.
        log: String,
    },
    /// There is no lab of that name.
    #[error("no lab named {0} is up (no state at {1})")]
    NotUp(String, String),
}

/// Result type of the lab.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Checks a lab name: lowercase letters and digits, 1 to 12 characters, so
/// every derived name stays unique and within interface-name limits.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 12
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "lab name {name:?} must be 1-12 lowercase letters or digits"
        )))
    }
}
