//! `cargo xtask`: the project's commands, so a newcomer needs only cargo.
//!
//! xtask never links the eBPF object itself (it builds it), so lab commands
//! run the `mesh-lab` binary after building it.

mod bench;
mod build_ebpf;
mod cmd;
mod demo;
/// The chart renderer and values parser, `mesh-lab`'s `deploy` module
/// compiled in by path (xtask links nothing new).
#[path = "../../lab/src/deploy.rs"]
mod deploy;
mod fuzz;
mod images;
mod lab;
mod render_deploy;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(about = "Build, run and test the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the eBPF programs (provisioning the pinned nightly and bpf-linker if missing).
    BuildEbpf,
    /// Manage a network-namespace lab.
    Lab(lab::LabArgs),
    /// Bring bookinfo up in the lab, send real traffic through it, print a summary.
    Demo(demo::DemoArgs),
    /// Run every check: fmt, clippy, unit tests and the lab end-to-end tests.
    Test(test::TestArgs),
    /// Run the benchmarks (release build, own lab) and write target/bench/report.md.
    Bench(bench::BenchArgs),
    /// Run the cargo-fuzz targets (YAML loader, HBONE server, xDS resources, waypoint HTTP) for a bounded time.
    Fuzz(fuzz::FuzzArgs),
    /// Render the Helm chart in deploy/chart into deploy/rendered/mesh.yaml (no helm needed).
    RenderDeploy(render_deploy::RenderDeployArgs),
    /// Build the release binaries and the container images of deploy/Dockerfile (podman or docker), tagged as the chart names them.
    Images(images::ImagesArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run(),
        Command::Lab(args) => lab::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Test(args) => test::run(args),
        Command::RenderDeploy(args) => render_deploy::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Images(args) => images::run(args),
    }
}

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
