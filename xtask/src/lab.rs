//! `cargo xtask lab up|down|status|exec`: builds what the lab runs, then hands
//! over to the `mesh-lab` binary.

use std::{path::PathBuf, process::Command};

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::{build_ebpf, cmd};

/// Arguments of `cargo xtask lab`.
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Lab name: prefix of every namespace, cgroup and pin it creates.
    #[arg(long, default_value = "meshlab")]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build the lab (default manifests: Istio's bookinfo sample).
    Up {
        /// Manifest files or directories.
        #[arg(short = 'f', long = "manifest")]
        manifests: Vec<PathBuf>,
        /// Number of nodes (1 or 2).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Remove everything of the lab.
    Down,
    /// Print nodes, pods and services.
    Status,
    /// Set (`key=value`) or remove (`key-`) a label on a namespace or pod,
    /// e.g. `label namespace default istio.io/dataplane-mode=ambient`.
    Label {
        /// `namespace` or `pod`.
        kind: String,
        /// Namespace name, or pod name / unique prefix.
        object: String,
        /// `key=value` or `key-`.
        label: String,
    },
    /// Apply the Istio resources of a file or directory, kubectl style.
    Apply {
        /// Manifest file or directory.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
    },
    /// Remove a file applied with `apply`, by its file name.
    Unapply {
        /// File name.
        file_name: String,
    },
    /// Run meshctl on a node, pointed at the lab's control plane
    /// (e.g. `meshctl proxy-status`).
    Meshctl {
        /// Node index.
        #[arg(long, default_value_t = 0)]
        node: usize,
        /// meshctl's arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Who called whom through the mesh (mTLS or plaintext, both identities).
    Connections,
    /// Run a command in a pod's network namespace and cgroup.
    Exec {
        /// Pod name or unique prefix.
        pod: String,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

pub fn run(args: LabArgs) -> anyhow::Result<()> {
    let mut lab = match &args.command {
        LabCommand::Up { .. } | LabCommand::Exec { .. } => build()?,
        LabCommand::Down
        | LabCommand::Status
        | LabCommand::Connections
        | LabCommand::Label { .. }
        | LabCommand::Apply { .. }
        | LabCommand::Unapply { .. } => built_or_build()?,
        LabCommand::Meshctl { .. } => build()?,
    };
    lab.args(["--name", &args.name]);
    match args.command {
        LabCommand::Up {
            mut manifests,
            nodes,
        } => {
            if manifests.is_empty() {
                manifests.push(bookinfo()?);
            }
            lab.arg("up").args(["--nodes", &nodes.to_string()]);
            for manifest in manifests {
                lab.arg("-f").arg(manifest);
            }
        }
        LabCommand::Down => {
            lab.arg("down");
        }
        LabCommand::Status => {
            lab.arg("status");
        }
        LabCommand::Connections => {
            lab.arg("connections");
        }
        LabCommand::Label {
            kind,
            object,
            label,
        } => {
            lab.args(["label", &kind, &object, &label]);
        }
        LabCommand::Apply { path } => {
            lab.arg("apply").arg("-f").arg(path);
        }
        LabCommand::Unapply { file_name } => {
            lab.args(["unapply", &file_name]);
        }
        LabCommand::Meshctl { node, args } => {
            lab.args(["meshctl", "--node", &node.to_string(), "--"])
                .args(args);
        }
        LabCommand::Exec { pod, command } => {
            lab.arg("exec").arg(pod).arg("--").args(command);
        }
    }
    cmd::run(&mut lab)
}

/// The packages whose binaries the lab runs (`meshctl` only on request).
pub const LAB_PACKAGES: [&str; 5] = ["mesh-lab", "lab-app", "ztunnel", "mesh-control", "waypoint"];

/// `cargo build` of `packages`, plus `extra` arguments (e.g. `--release`).
pub fn build_packages(packages: &[&str], extra: &[&str]) -> anyhow::Result<()> {
    let mut command = cmd::cargo();
    command.args(["build", "--quiet"]).args(extra);
    for package in packages {
        command.args(["-p", package]);
    }
    cmd::run(&mut command)
}

/// Builds the eBPF object and every binary the lab runs; returns a `mesh-lab` command.
pub fn build() -> anyhow::Result<Command> {
    build_ebpf::run()?;
    let mut packages = LAB_PACKAGES.to_vec();
    packages.push("meshctl");
    build_packages(&packages, &[])?;
    Ok(mesh_lab())
}

/// `down` and `status` must work even when nothing can be built (say, after
/// a toolchain change), so they use an existing binary when there is one.
fn built_or_build() -> anyhow::Result<Command> {
    if binary("mesh-lab").is_file() {
        Ok(mesh_lab())
    } else {
        build()
    }
}

fn mesh_lab() -> Command {
    Command::new(binary("mesh-lab"))
}

fn binary(name: &str) -> PathBuf {
    crate::root().join("target/debug").join(name)
}

/// Istio's samples: `$MESH_ISTIO_SAMPLES`, or `../shared/istio-samples` beside the repo.
pub fn samples_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("MESH_ISTIO_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("../shared/istio-samples"));
    if !dir.is_dir() {
        bail!(
            "Istio samples not found at {}; set MESH_ISTIO_SAMPLES to a copy of istio/samples",
            dir.display()
        );
    }
    Ok(dir)
}

/// The bookinfo platform manifest.
pub fn bookinfo() -> anyhow::Result<PathBuf> {
    Ok(samples_dir()?.join("bookinfo/platform/bookinfo.yaml"))
}
