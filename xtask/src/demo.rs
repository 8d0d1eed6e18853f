//! `cargo xtask demo`: the main job, end to end: bookinfo in the lab with
//! real traffic, and a summary of what answered.

use clap::Args;

use crate::{cmd, lab};

/// Arguments of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Lab name.
    #[arg(long, default_value = "meshlab")]
    name: String,
    /// Tear the lab down at the end instead of leaving it up to explore.
    #[arg(long)]
    down: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let build = || -> anyhow::Result<std::process::Command> {
        let mut command = lab::build()?;
        command.args(["--name", &args.name]);
        Ok(command)
    };
    cmd::run(build()?.arg("up").arg("-f").arg(lab::bookinfo()?))?;
    eprintln!("\n== the control plane and the ztunnels it feeds ==");
    cmd::run(build()?.args(["meshctl", "--", "proxy-status"]))?;
    eprintln!("\n== bookinfo without the mesh ==");
    cmd::run(build()?.arg("traffic"))?;
    eprintln!("\n== enrolling namespace default (istio.io/dataplane-mode=ambient) ==");
    cmd::run(build()?.args([
        "label",
        "namespace",
        "default",
        "istio.io/dataplane-mode=ambient",
    ]))?;
    // ztunnel checks its node's pods every 200 ms; the control plane pushes
    // the change within a second.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    eprintln!("\n== what node1's ztunnel knows now (from the control plane) ==");
    cmd::run(build()?.args(["meshctl", "--node", "1", "--", "ztunnel-config"]))?;
    let traffic = cmd::run(build()?.arg("traffic"));
    eprintln!(
        "\n== the calls above, as the destination ztunnels recorded them (mTLS, both identities) =="
    );
    cmd::run(build()?.arg("connections"))?;
    if args.down {
        cmd::run(build()?.arg("down"))?;
    } else {
        eprintln!(
            "\nThe lab is still up: `cargo xtask lab status`, `cargo xtask lab exec productpage -- lab-app get http://reviews:9080/`, `cargo xtask lab down`."
        );
    }
    traffic
}
