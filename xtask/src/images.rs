//! `cargo xtask images`: builds the binaries (release by default), assembles
//! the build context `deploy/Dockerfile` expects under
//! `target/images/context`, and builds one image per binary with podman or
//! docker, tagged `<global.hub>/<image>:<appVersion>` as the chart names
//! them. Each image is then started once with `--version` to prove it runs.
//!
//! `--base scratch` builds without any base image (no registry needed): the
//! shared libraries `ldd` lists for the binaries, and the dynamic loader,
//! are copied into the context's `rootfs/`. `--sandbox` is for podman in a
//! locked-down machine (like the project's own): vfs storage, cgroupfs,
//! chroot isolation for builds, and when the runtime cannot start a
//! container the check runs the binary by `chroot` into the mounted image.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{cmd, deploy::Values};

/// One image: Dockerfile target and binary name, cargo package, and the
/// `values.yaml` key of its image name.
struct Image {
    binary: &'static str,
    package: &'static str,
    values_key: &'static str,
}

/// Every image of `deploy/Dockerfile`.
const IMAGES: &[Image] = &[
    Image {
        binary: "mesh-control",
        package: "mesh-control",
        values_key: "control.image",
    },
    Image {
        binary: "ztunnel",
        package: "ztunnel",
        values_key: "ztunnel.image",
    },
    Image {
        binary: "waypoint",
        package: "waypoint",
        values_key: "waypoint.image",
    },
    Image {
        binary: "meshctl",
        package: "meshctl",
        values_key: "meshctl.image",
    },
];

/// Arguments of `cargo xtask images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Base image of every target: a distribution image, or `scratch` (the
    /// binaries' shared libraries are copied in instead; works offline).
    #[arg(long, default_value = "debian:bookworm-slim")]
    base: String,
    /// Container tool: `podman` or `docker` (default: podman when on PATH,
    /// else docker when its daemon answers).
    #[arg(long)]
    runtime: Option<String>,
    /// Cargo profile of the binaries (`release`, or `dev` for a quick check).
    #[arg(long, default_value = "release")]
    profile: String,
    /// Build only these images (repeatable): mesh-control, ztunnel, waypoint, meshctl.
    #[arg(long = "image")]
    images: Vec<String>,
    /// Podman in a locked-down sandbox: vfs storage, cgroupfs, chroot
    /// isolation, and the run check by chroot when containers cannot start.
    #[arg(long)]
    sandbox: bool,
}

/// Builds the binaries, the context, the images, and checks each one runs.
pub fn run(args: ImagesArgs) -> anyhow::Result<()> {
    let root = crate::root();
    let selected: Vec<&Image> = IMAGES
        .iter()
        .filter(|i| args.images.is_empty() || args.images.iter().any(|n| n == i.binary))
        .collect();
    if let Some(unknown) = args
        .images
        .iter()
        .find(|n| !IMAGES.iter().any(|i| i.binary == n.as_str()))
    {
        bail!("--image {unknown}: not one of mesh-control, ztunnel, waypoint, meshctl");
    }
    let tags = tags(&root)?;

    let mut build = cmd::cargo();
    build.args(["build", "--profile", &args.profile]);
    for image in &selected {
        build.args(["-p", image.package, "--bin", image.binary]);
    }
    cmd::run(&mut build)?;
    let profile_dir = if args.profile == "dev" {
        "debug"
    } else {
        &args.profile
    };
    let binaries = root.join("target").join(profile_dir);

    let context = root.join("target/images/context");
    if context.exists() {
        std::fs::remove_dir_all(&context)
            .with_context(|| format!("removing {}", context.display()))?;
    }
    let (bin_dir, rootfs) = (context.join("bin"), context.join("rootfs"));
    for dir in [&bin_dir, &rootfs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for image in &selected {
        let from = binaries.join(image.binary);
        copy(&from, &bin_dir.join(image.binary))?;
        if args.base == "scratch" {
            for library in shared_libraries(&from)? {
                let inside = library.strip_prefix("/").unwrap_or(&library);
                copy(&library, &rootfs.join(inside))?;
            }
        }
    }
    eprintln!("build context: {}", context.display());

    let Some(runtime) = args.runtime.clone().or_else(detect_runtime) else {
        eprintln!(
            "no container runtime (podman on PATH, or docker with a daemon): images not built; \
             the context above builds them with `docker build -f deploy/Dockerfile --target <image> <context>`"
        );
        return Ok(());
    };
    let global: Vec<&str> = if args.sandbox {
        vec!["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"]
    } else {
        Vec::new()
    };
    let dockerfile = root.join("deploy/Dockerfile");
    for image in &selected {
        let tag = &tags[image.values_key];
        let mut build = Command::new(&runtime);
        build.args(&global).arg("build");
        if args.sandbox {
            build.args(["--isolation", "chroot"]);
        }
        build
            .arg("-f")
            .arg(&dockerfile)
            .args(["--target", image.binary])
            .arg("--build-arg")
            .arg(format!("BASE={}", args.base))
            .args(["-t", tag])
            .arg(&context);
        cmd::run(&mut build)?;
        let version = check_runs(&runtime, &global, args.sandbox, tag, image.binary)?;
        eprintln!("{tag}: runs ({})", version.trim());
    }
    Ok(())
}

/// `values.yaml` key → `<hub>/<name>:<appVersion>`.
fn tags(root: &Path) -> anyhow::Result<std::collections::BTreeMap<&'static str, String>> {
    let read = |file: &str| {
        let path = root.join("deploy/chart").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Values::parse(&path, &text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let values = read("values.yaml")?;
    let chart = read("Chart.yaml")?;
    let version = chart
        .get("appVersion")
        .context("deploy/chart/Chart.yaml: no appVersion")?;
    let hub = values
        .get("global.hub")
        .context("deploy/chart/values.yaml: no global.hub")?;
    IMAGES
        .iter()
        .map(|image| {
            let name = values
                .get(image.values_key)
                .with_context(|| format!("deploy/chart/values.yaml: no {}", image.values_key))?;
            Ok((image.values_key, format!("{hub}/{name}:{version}")))
        })
        .collect()
}

/// The shared libraries (and loader) `ldd` lists for `binary`; none for a
/// static one.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (--base scratch copies the libraries it lists)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`; vdso has no path.
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` to `to` (following symlinks), creating `to`'s directory.
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// podman when on PATH, else docker when its daemon answers.
fn detect_runtime() -> Option<String> {
    let answers = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers("podman", "--version") {
        Some("podman".into())
    } else if answers("docker", "info") {
        Some("docker".into())
    } else {
        None
    }
}

/// Runs `<binary> --version` in the image `tag` and returns what it
/// printed; in a sandbox whose runtime cannot start containers, by chroot
/// into the mounted image instead (the image's files alone, as a container
/// would see them).
fn check_runs(
    runtime: &str,
    global: &[&str],
    sandbox: bool,
    tag: &str,
    binary: &str,
) -> anyhow::Result<String> {
    let mut run = Command::new(runtime);
    run.args(global).args(["run", "--rm", tag, "--version"]);
    let started = cmd::output(&mut run);
    let error = match started {
        Ok(version) if version.contains(binary) => return Ok(version),
        Ok(other) => bail!("{tag}: `--version` printed {other:?}, not {binary}'s version"),
        Err(error) if sandbox => error,
        Err(error) => return Err(error),
    };
    eprintln!("{tag}: the runtime cannot start it here ({error:#}); checking by chroot");
    let mount = cmd::output(
        Command::new(runtime)
            .args(global)
            .args(["image", "mount", tag]),
    )?;
    let mount = mount.trim().to_owned();
    let version = cmd::output(
        Command::new("chroot")
            .arg(&mount)
            .arg(format!("/usr/local/bin/{binary}"))
            .arg("--version"),
    );
    let unmounted = cmd::output(
        Command::new(runtime)
            .args(global)
            .args(["image", "unmount", tag]),
    );
    let version = version.with_context(|| format!("{tag}: running {binary} in the image"))?;
    unmounted?;
    if !version.contains(binary) {
        bail!("{tag}: `--version` printed {version:?}, not {binary}'s version");
    }
    Ok(version)
}
