//! `cargo xtask render-deploy`: renders the Helm chart in `deploy/chart` with
//! its `values.yaml` into `deploy/rendered/mesh.yaml`, the documented
//! equivalent of `helm template` (`kubectl apply -f` installs it).
//!
//! The renderer is `mesh-lab`'s `deploy` module, compiled in by path so that
//! xtask links nothing new and the test in `tests/tests/deploy.rs` renders
//! with the very same code.

use anyhow::{Context as _, bail};
use clap::Args;

use crate::deploy;

/// Arguments of `cargo xtask render-deploy`.
#[derive(Debug, Args)]
pub struct RenderDeployArgs {
    /// Do not write: fail when the checked-in rendered file is out of date.
    #[arg(long)]
    check: bool,
}

/// Renders the chart, then writes (or with `--check`, compares) the files:
/// the manifest and, apart, the Helm hooks.
pub fn run(args: RenderDeployArgs) -> anyhow::Result<()> {
    let root = crate::root();
    let files = [
        (
            deploy::RENDERED_PATH,
            deploy::render_workspace(&root).context("rendering deploy/chart")?,
        ),
        (
            deploy::HOOKS_PATH,
            deploy::render_workspace_hooks(&root).context("rendering deploy/chart's hooks")?,
        ),
    ];
    for (relative, rendered) in files {
        let path = root.join(relative);
        if args.check {
            let current = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if current != rendered {
                bail!("{relative} is out of date: run `cargo xtask render-deploy`");
            }
            eprintln!("{relative} is up to date");
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, rendered).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "rendered {} (release namespace {}) into {relative}",
            deploy::CHART_DIR,
            deploy::RELEASE_NAMESPACE,
        );
    }
    Ok(())
}
