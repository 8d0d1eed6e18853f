//! ztunnel: the mesh's per-node agent.
//!
//! It embeds the mesh's BPF object (built by `cargo xtask build-ebpf`) and will
//! own the capture programs and the HBONE tunnel; today it can prove that the
//! kernel accepts every program of that object.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Command line of the node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load every eBPF program of the embedded object into the kernel (without
    /// attaching it) and report which ones the verifier accepted.
    EbpfCheck,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::EbpfCheck => {
            let verified = mesh_ebpf_loader::verify::verify_all()
                .context("loading the embedded eBPF object")?;
            for program in &verified {
                println!("ok {} ({})", program.name, program.kind);
            }
            println!("{} program(s) accepted by the kernel", verified.len());
        }
    }
    Ok(())
}
