//! `cargo xtask bench`: builds the mesh in release mode and runs the
//! benchmark harness (`mesh-lab bench`) in its own lab; the report lands in
//! `target/bench/` (`report.md`, `results.json`, one SVG per scenario).
//! `MESH_BENCH_REFERENCE_ZTUNNEL=<path>` adds a reference ztunnel (Istio's)
//! on the cross-node path (see `docs/performance.md`).

use std::{path::Path, process::Command};

use clap::Args;

use crate::{build_ebpf, cmd};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// One short round, to prove the harness works (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Scenarios: throughput, iperf3, latency, max-rate, connections, http,
    /// open-1k, open-10k, control-plane (default: all).
    scenarios: Vec<String>,
}

/// Builds release binaries and runs the harness.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let wants = |name: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == name);
    // The reference tools: nginx for `http`, iperf3 for `iperf3`.
    let mut packages = Vec::new();
    if wants("http") && !Path::new("/usr/sbin/nginx").exists() {
        packages.push("nginx");
    }
    if wants("iperf3") && !Path::new("/usr/bin/iperf3").exists() {
        packages.push("iperf3");
    }
    // The reference ztunnel's redirect (`MESH_BENCH_REFERENCE_ZTUNNEL`).
    if std::env::var_os("MESH_BENCH_REFERENCE_ZTUNNEL").is_some_and(|v| !v.is_empty())
        && !Path::new("/usr/sbin/nft").exists()
    {
        packages.push("nftables");
    }
    install(&packages)?;
    build_ebpf::run()?;
    crate::lab::build_packages(&crate::lab::LAB_PACKAGES, &["--release"])?;
    let root = crate::root();
    let mut command = Command::new(root.join("target/release/mesh-lab"));
    command
        .current_dir(&root)
        .arg("bench")
        .arg("--out")
        .arg(root.join("target/bench"));
    if args.quick {
        command.arg("--quick");
    }
    command.args(&args.scenarios);
    cmd::run(&mut command)
}

/// Installs Debian `packages` without starting their services.
fn install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!(
        "installing the benchmarks' reference tools: {}",
        packages.join(" ")
    );
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Keep invoke-rc.d from starting nginx on the host's port 80.
            .env("RUNLEVEL", "1");
        cmd::run(&mut command)
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}
