//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a bounded
//! time each, with the pinned nightly. A crash fails the command and leaves
//! the input in `fuzz/artifacts/<target>/`.

use std::{path::PathBuf, process::Command};

use clap::Args;

use crate::{build_ebpf, cmd};

/// The targets, in the order they run.
const TARGETS: [&str; 6] = [
    "config_load",
    "hbone_server",
    "xds_resources",
    "ads_requests",
    "waypoint_config",
    "waypoint_http",
];
/// The cargo-fuzz release installed when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Build for a short run: no AddressSanitizer and parallel codegen, a
    /// shorter build and more executions per second, without ASan's checks
    /// (CI uses it; the fuzzed crates have no `unsafe` of their own).
    #[arg(long)]
    fast_build: bool,
    /// Targets to run (default: all).
    targets: Vec<String>,
}

/// Runs each target for `--seconds`.
pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    build_ebpf::ensure_nightly()?;
    ensure_cargo_fuzz()?;
    // ztunnel (a dependency of the xDS target) embeds the eBPF object.
    build_ebpf::run()?;
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        args.targets
    };
    let build_flags: &[&str] = if args.fast_build {
        &["--sanitizer", "none", "--codegen-units", "16"]
    } else {
        &[]
    };
    // One build of every target first: they share all their dependencies,
    // and each `run` below then finds its binary up to date.
    cmd::run(
        Command::new("cargo")
            .current_dir(crate::root())
            .env("PATH", build_ebpf::path_with_cargo_bin())
            .args([
                format!("+{}", build_ebpf::NIGHTLY).as_str(),
                "fuzz",
                "build",
            ])
            .args(build_flags)
            .args(["--fuzz-dir", "fuzz"]),
    )?;
    let samples = crate::lab::samples_dir()?;
    for target in &targets {
        let corpus = crate::root().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut command = Command::new("cargo");
        command
            .current_dir(crate::root())
            .env("PATH", build_ebpf::path_with_cargo_bin())
            .args([format!("+{}", build_ebpf::NIGHTLY).as_str(), "fuzz", "run"])
            .args(build_flags)
            .args(["--fuzz-dir", "fuzz", target.as_str()])
            .arg(&corpus);
        // Inputs that once failed, kept in the repository, run every time.
        let regressions = crate::root().join("fuzz/regressions").join(target);
        if regressions.is_dir() {
            command.arg(regressions);
        }
        // Istio's samples seed the YAML loader with real manifests.
        if target == "config_load" {
            command.arg(seed_dir(&samples)?);
        }
        command.args([
            "--",
            &format!("-max_total_time={}", args.seconds),
            "-rss_limit_mb=4096",
            "-print_funcs=0",
        ]);
        cmd::run(&mut command)?;
    }
    Ok(())
}

/// The samples' YAML files flattened into one directory (libFuzzer does not
/// descend into subdirectories).
fn seed_dir(samples: &std::path::Path) -> anyhow::Result<PathBuf> {
    let seeds = crate::root().join("target/fuzz-seeds/config_load");
    std::fs::create_dir_all(&seeds)?;
    let mut stack = vec![samples.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let name = path
                    .strip_prefix(samples)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('/', "_");
                std::fs::copy(&path, seeds.join(name))?;
            }
        }
    }
    Ok(seeds)
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let mut probe = Command::new("cargo");
    probe
        .args(["fuzz", "--version"])
        .env("PATH", build_ebpf::path_with_cargo_bin());
    if cmd::output(&mut probe).is_ok_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}
