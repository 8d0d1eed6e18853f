//! `cargo xtask test`: every check CI runs, in the order that fails fastest.

use std::process::Command;

use clap::Args;

use crate::{build_ebpf, cmd};

/// Arguments of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The eBPF and fuzz crates are outside the workspace; check them too.
    let mut outside = Command::new("rustfmt");
    outside
        .args(["--edition", "2024", "--check"])
        .arg(crate::root().join("ebpf/src/main.rs"))
        .current_dir(crate::root());
    for entry in std::fs::read_dir(crate::root().join("fuzz/fuzz_targets"))? {
        outside.arg(entry?.path());
    }
    cmd::run(&mut outside)?;
    build_ebpf::run()?;
    cmd::run(cmd::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The lab tests run the workspace's binaries (mesh-lab, lab-app, ztunnel).
    cmd::run(cmd::cargo().args(["build", "--workspace"]))?;
    let samples = crate::lab::samples_dir()?;
    cmd::run(
        cmd::cargo()
            .args(["test", "--workspace"])
            .args(&args.cargo_test_args)
            .env("MESH_ISTIO_SAMPLES", samples),
    )
}
