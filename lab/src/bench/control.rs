//! The control plane's scale benchmark in the report: `mesh-control-bench`
//! loads a synthetic cluster into a real control plane and pushes it to
//! simulated proxies over delta ADS; its JSON lands in the report.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result, io_err};

/// The size the issue sets its targets for.
pub const FULL: Size = Size {
    services: 5000,
    pods: 50_000,
    virtual_services: 2000,
    proxies: 100,
};

/// A tenth of it, for `--quick`.
pub const QUICK: Size = Size {
    services: 500,
    pods: 5000,
    virtual_services: 200,
    proxies: 10,
};

/// Time to a full push, at [`FULL`] size.
pub const TARGET_PUSH_MS: u64 = 2000;
/// Peak memory, at [`FULL`] size.
pub const TARGET_RSS_MIB: u64 = 500;

/// How big a cluster to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    /// Services.
    pub services: usize,
    /// Pods (endpoints), spread over the services.
    pub pods: usize,
    /// VirtualServices.
    pub virtual_services: usize,
    /// Simulated proxies.
    pub proxies: usize,
}

/// What `mesh-control-bench` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlPlaneResult {
    /// The cluster simulated.
    pub size: Size,
    /// Reading and validating the config files (ms).
    pub load_ms: u64,
    /// Translating it into xDS resources (ms).
    pub translate_ms: u64,
    /// From the proxies' connect until every one held every resource (ms).
    pub full_push_ms: u64,
    /// Translation plus push (ms): the number the target is for.
    pub translate_and_push_ms: u64,
    /// The control plane's CPU during the push (ms).
    pub push_cpu_ms: u64,
    /// The control plane's peak resident memory (MiB).
    pub peak_rss_mib: u64,
}

/// Runs `binary` (`mesh-control-bench`) at `size`.
pub fn run(binary: &Path, size: Size) -> Result<ControlPlaneResult> {
    let output = std::process::Command::new(binary)
        .args(["--services", &size.services.to_string()])
        .args(["--pods", &size.pods.to_string()])
        .args(["--virtual-services", &size.virtual_services.to_string()])
        .args(["--proxies", &size.proxies.to_string()])
        .output()
        .map_err(io_err(format!("running {}", binary.display())))?;
    if !output.status.success() {
        return Err(Error::Invalid(format!(
            "{} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Invalid(format!("{} printed no JSON report: {e}", binary.display())))?;
    let field = |name: &str| {
        json[name].as_u64().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: report has no {name}: {json}",
                binary.display()
            ))
        })
    };
    Ok(ControlPlaneResult {
        size,
        load_ms: field("load_ms")?,
        translate_ms: field("translate_ms")?,
        full_push_ms: field("full_push_ms")?,
        translate_and_push_ms: field("translate_and_push_ms")?,
        push_cpu_ms: field("control_plane_push_cpu_ms")?,
        peak_rss_mib: field("control_plane_peak_rss_mib")?,
    })
}
