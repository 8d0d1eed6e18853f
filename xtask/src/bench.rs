//! `cargo xtask bench`: builds the mesh in release mode and runs the
//! benchmark harness (`mesh-lab bench`) in its own lab; the report lands in
//! `target/bench/` (`report.md`, `results.json`, one SVG per scenario).

use std::process::Command;

use clap::Args;

use crate::{build_ebpf, cmd};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// One short round, to prove the harness works (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Scenarios: throughput, latency, max-rate, connections (default: all).
    scenarios: Vec<String>,
}

/// Builds release binaries and runs the harness.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
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
        command.args(["--rounds", "1", "--seconds", "0.5"]);
    }
    command.args(&args.scenarios);
    cmd::run(&mut command)
}
