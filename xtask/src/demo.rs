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
    let waypoint = crate::root().join("tests/manifests/waypoint.yaml");
    let gateway = networking_dir()?.join("bookinfo-gateway.yaml");
    cmd::run(
        build()?
            .arg("up")
            .arg("-f")
            .arg(lab::bookinfo()?)
            .arg("-f")
            .arg(&waypoint)
            .arg("-f")
            .arg(&gateway),
    )?;
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
    eprintln!("\n== through the ingress gateway (bookinfo-gateway): 20 calls to /productpage ==");
    cmd::run(build()?.args([
        "exec",
        "details",
        "--",
        "lab-app",
        "get",
        "http://istio-ingressgateway.istio-system/productpage",
        "--count",
        "20",
        "--tally",
    ]))?;
    l7(&build)?;
    if args.down {
        cmd::run(build()?.arg("down"))?;
    } else {
        eprintln!(
            "\nThe lab is still up: `cargo xtask lab status`, `cargo xtask lab exec productpage -- lab-app get http://reviews:9080/`, `cargo xtask lab down`."
        );
    }
    traffic
}

/// Istio's `bookinfo/networking` samples.
fn networking_dir() -> anyhow::Result<std::path::PathBuf> {
    lab::bookinfo()?
        .parent()
        .and_then(|platform| platform.parent())
        .map(|bookinfo| bookinfo.join("networking"))
        .ok_or_else(|| anyhow::anyhow!("bookinfo samples directory"))
}

/// Binds namespace default to its waypoint and shows VirtualService routing
/// live: bookinfo's 80/20 split, then header-based routing.
fn l7(build: &dyn Fn() -> anyhow::Result<std::process::Command>) -> anyhow::Result<()> {
    let networking = networking_dir()?;
    let tally = |headers: &[&str]| -> anyhow::Result<()> {
        let mut command = build()?;
        command.args([
            "exec",
            "productpage",
            "--",
            "lab-app",
            "get",
            "http://reviews:9080/reviews/0",
            "--count",
            "100",
            "--new-connection",
            "--tally",
        ]);
        for header in headers {
            command.args(["--header", header]);
        }
        cmd::run(&mut command)
    };
    eprintln!("\n== L7: namespace default uses its waypoint (istio.io/use-waypoint=waypoint) ==");
    cmd::run(build()?.args([
        "label",
        "namespace",
        "default",
        "istio.io/use-waypoint=waypoint",
    ]))?;
    cmd::run(
        build()?
            .arg("apply")
            .arg("-f")
            .arg(networking.join("destination-rule-all.yaml")),
    )?;
    cmd::run(
        build()?
            .arg("apply")
            .arg("-f")
            .arg(networking.join("virtual-service-reviews-80-20.yaml")),
    )?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    eprintln!("\n== virtual-service-reviews-80-20: 100 calls to reviews, by version ==");
    tally(&[])?;
    cmd::run(build()?.args(["unapply", "virtual-service-reviews-80-20.yaml"]))?;
    cmd::run(
        build()?
            .arg("apply")
            .arg("-f")
            .arg(networking.join("virtual-service-reviews-test-v2.yaml")),
    )?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    eprintln!("\n== virtual-service-reviews-test-v2: as end-user jason, then as anyone else ==");
    tally(&["end-user:jason"])?;
    tally(&[])
}
