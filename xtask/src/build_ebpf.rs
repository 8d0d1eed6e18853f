//! `cargo xtask build-ebpf`: the eBPF crate, built with a pinned nightly and a
//! bpf-linker linked against that nightly's own LLVM.
//!
//! Provisioning is idempotent: each step checks before it acts, so a second
//! run with nothing changed only asks cargo, which finds everything fresh.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// The eBPF toolchain. Never float it: bpf-linker is built against its LLVM.
pub const NIGHTLY: &str = "nightly-2026-10-30";
/// bpf-linker release known to work with [`NIGHTLY`].
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the object lands (read by `ebpf-loader`'s build script).
pub fn object_path() -> PathBuf {
    crate::root().join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
}

/// Provisions the toolchain if needed and builds the eBPF crate.
pub fn run() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    let root = crate::root();
    let mut build = Command::new("rustup");
    build
        .args(["run", NIGHTLY, "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .current_dir(root.join("ebpf"))
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env("PATH", path_with_cargo_bin());
    clean_toolchain_env(&mut build);
    cmd::run(&mut build)?;
    let object = object_path();
    if !object.is_file() {
        bail!("the build finished but {} is missing", object.display());
    }
    eprintln!("eBPF object: {}", object.display());
    Ok(())
}

/// Installs the pinned nightly (with rust-src) unless it is there.
pub fn ensure_nightly() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]));
    if installed.is_ok_and(|list| list.lines().any(|l| l.starts_with("rust-src"))) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--no-self-update",
    ]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let mut probe = Command::new("bpf-linker");
    probe.arg("--version").env("PATH", path_with_cargo_bin());
    if cmd::output(&mut probe).is_ok_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    let sysroot = PathBuf::from(
        cmd::output(Command::new("rustc").args([
            format!("+{NIGHTLY}").as_str(),
            "--print",
            "sysroot",
        ]))?
        .trim(),
    );
    let version = cmd::output(Command::new("rustc").args([format!("+{NIGHTLY}").as_str(), "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("reading the nightly's LLVM version")?
        .to_owned();
    // bpf-linker links libLLVM.so; the nightly ships it only with a versioned name.
    let lib = sysroot.join("lib");
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .find(|name| name.to_string_lossy().starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&versioned, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .env("LLVM_PREFIX", &sysroot)
        // Outside the workspace so its rust-toolchain.toml does not apply.
        .current_dir(std::env::temp_dir());
    clean_toolchain_env(&mut install);
    cmd::run(&mut install)
}

/// Drops what the outer `cargo xtask` set, so the nested toolchain is chosen
/// only by what we pass.
fn clean_toolchain_env(command: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
}

/// `PATH` with `~/.cargo/bin` in front, where `cargo install` puts tools.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    let mut paths = vec![home.join("bin")];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}
