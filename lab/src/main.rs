//! `mesh-lab`: build, inspect and remove network-namespace labs.
//! Usually driven by `cargo xtask lab ...`.

use std::{fmt::Write as _, os::unix::process::CommandExt, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_lab::{
    DEFAULT_LAB, LabState, UpOptions,
    bench::{BenchOptions, Scenario, control},
    mesh::LabelTarget,
};

mod connections;
mod traffic;

/// Command line of `mesh-lab`.
#[derive(Debug, Parser)]
#[command(about = "Network-namespace lab: Kubernetes manifests as nodes and pods on one machine")]
struct Cli {
    /// Lab name: prefix of every namespace, cgroup and pin it creates.
    #[arg(long, global = true, default_value = DEFAULT_LAB, env = "MESH_LAB")]
    name: String,
    #[command(subcommand)]
    command: Command,
}

/// What `label` applies to.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LabelKind {
    /// A namespace.
    Namespace,
    /// A pod.
    Pod,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the lab from manifests, replacing a lab of the same name.
    Up {
        /// Manifest files or directories (Namespaces, Services, Deployments, Pods, ServiceAccounts).
        #[arg(short = 'f', long = "manifest", required = true)]
        manifests: Vec<PathBuf>,
        /// Number of nodes (1 or 2).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// The stand-in app binary (default: `lab-app` next to this binary).
        #[arg(long)]
        app: Option<PathBuf>,
    },
    /// Remove everything the lab created; safe to run on a lab that is not up.
    Down,
    /// Print nodes, pods and services of the lab.
    Status,
    /// Send real traffic through the lab: every pod by IP, every Service by
    /// VIP and name, bookinfo's call graph; print what answered.
    Traffic,
    /// Set or remove a label, kubectl style (`key=value` sets, `key-` removes).
    /// `istio.io/dataplane-mode=ambient` on a namespace enrols its pods;
    /// `istio.io/dataplane-mode=none` on a pod opts it out.
    Label {
        /// `namespace` or `pod`.
        kind: LabelKind,
        /// Namespace name, or pod name / unique prefix.
        object: String,
        /// `key=value` or `key-`.
        label: String,
    },
    /// Apply the Istio and Gateway API resources of a file or directory
    /// (VirtualService, DestinationRule, AuthorizationPolicy, ...), kubectl
    /// style: the control plane picks them up within a second.
    Apply {
        /// Manifest file or directory.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
    },
    /// Remove a file applied with `apply`, by its file name.
    Unapply {
        /// File name, e.g. `virtual-service-reviews-80-20.yaml`.
        file_name: String,
    },
    /// Run `meshctl` on a node (default: the control plane's), pointed at
    /// the lab's control plane, e.g. `meshctl proxy-status` or
    /// `meshctl --node 1 ztunnel-config`.
    Meshctl {
        /// Node index to run on (its ztunnel answers `ztunnel-config`).
        #[arg(long, default_value_t = 0)]
        node: usize,
        /// meshctl's arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print who called whom through the mesh (both identities, mTLS or
    /// plaintext), from the ztunnels' access records.
    Connections,
    /// Run the benchmarks in their own lab (`meshbench`, brought up and
    /// torn down): L4 scenarios, variants interleaved, report to `--out`.
    Bench {
        /// Scenarios: throughput, iperf3, latency, max-rate, connections,
        /// http, open-1k, open-10k, control-plane (default: all).
        scenarios: Vec<String>,
        /// Rounds; every variant runs once per round.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// One round of 0.5 s runs and a tenth-size control plane: proves the
        /// harness works (what CI runs).
        #[arg(long)]
        quick: bool,
        /// Report directory.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Run a command as a pod: in its network namespace and cgroup.
    Exec {
        /// Pod name, `namespace/name`, or a unique prefix.
        pod: String,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            manifests,
            nodes,
            app,
        } => {
            let app_binary = match app {
                Some(app) => app,
                None => sibling_binary("lab-app")?,
            };
            let state = mesh_lab::up(&UpOptions {
                name: cli.name.clone(),
                manifests,
                nodes,
                app_binary,
                ztunnel_binary: sibling_binary("ztunnel")?,
                control_binary: sibling_binary("mesh-control")?,
            })
            .with_context(|| format!("bringing lab {} up", cli.name))?;
            print_status(&state);
        }
        Command::Down => {
            let report = mesh_lab::down(&cli.name)?;
            if report.removed_anything() {
                println!(
                    "lab {}: removed {} network namespace(s){}{}",
                    cli.name,
                    report.namespaces.len(),
                    if report.cgroup {
                        ", its cgroups and processes"
                    } else {
                        ""
                    },
                    if report.pins { ", its eBPF pins" } else { "" },
                );
            } else {
                println!("lab {}: nothing to remove", cli.name);
            }
        }
        Command::Status => print_status(&LabState::load(&cli.name)?),
        Command::Label {
            kind,
            object,
            label,
        } => {
            let mut state = LabState::load(&cli.name)?;
            let target = match kind {
                LabelKind::Namespace => LabelTarget::Namespace(object),
                LabelKind::Pod => LabelTarget::Pod(object),
            };
            match label.split_once('=') {
                Some((key, value)) => state.set_label(&target, key, Some(value))?,
                None => match label.strip_suffix('-') {
                    Some(key) => state.set_label(&target, key, None)?,
                    None => bail!("label {label:?} is neither key=value nor key-"),
                },
            }
            let (kind, object) = match &target {
                LabelTarget::Namespace(name) => ("namespace", name),
                LabelTarget::Pod(name) => ("pod", name),
            };
            println!("{kind}/{object} labeled {label}");
        }
        Command::Traffic => traffic::run(&LabState::load(&cli.name)?)?,
        Command::Connections => {
            connections::run(&LabState::load(&cli.name)?)?;
        }
        Command::Meshctl { node, args } => {
            let state = LabState::load(&cli.name)?;
            if node >= state.plan.nodes.len() {
                bail!("lab {} has no node {node}", cli.name);
            }
            let mut command = state.command_on_node(node, sibling_binary("meshctl")?)?;
            command
                .env(
                    "MESH_CONTROL_STATUS",
                    format!("http://{}", state.control_status_addr()),
                )
                .args(args);
            let err = command.exec();
            bail!("exec meshctl: {err}");
        }
        Command::Apply { path } => {
            LabState::load(&cli.name)?;
            let applied = mesh_lab::cluster::apply(&cli.name, &path)?;
            println!("{}: {applied} resource(s) applied", path.display());
        }
        Command::Unapply { file_name } => {
            if mesh_lab::cluster::unapply(&cli.name, &file_name)? {
                println!("{file_name} removed");
            } else {
                bail!("{file_name} was not applied to lab {}", cli.name);
            }
        }
        Command::Bench {
            scenarios,
            rounds,
            seconds,
            quick,
            out,
        } => {
            let (rounds, seconds) = if quick { (1, 0.5) } else { (rounds, seconds) };
            let control_plane =
                scenarios.is_empty() || scenarios.iter().any(|s| s == "control-plane");
            let scenarios = if scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                scenarios
                    .iter()
                    .filter(|name| *name != "control-plane")
                    .map(|name| {
                        Scenario::parse(name).with_context(|| {
                            let known: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                            format!(
                                "unknown scenario {name:?}; try {}, control-plane",
                                known.join(", ")
                            )
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
            };
            if rounds == 0 || !(0.1..=30.0).contains(&seconds) {
                bail!("--rounds must be at least 1 and --seconds in 0.1..=30");
            }
            let control_plane = if control_plane {
                let size = if quick { control::QUICK } else { control::FULL };
                Some((sibling_binary("mesh-control-bench")?, size))
            } else {
                None
            };
            mesh_lab::bench::run(&BenchOptions {
                up: UpOptions {
                    name: mesh_lab::bench::LAB_NAME.to_owned(),
                    manifests: Vec::new(),
                    nodes: 2,
                    app_binary: sibling_binary("lab-app")?,
                    ztunnel_binary: sibling_binary("ztunnel")?,
                    control_binary: sibling_binary("mesh-control")?,
                },
                scenarios,
                control_plane,
                rounds,
                seconds,
                out_dir: out.clone(),
                reference_ztunnel: reference_ztunnel()?,
            })?;
            println!("report: {}", out.join("report.md").display());
        }
        Command::Exec { pod, command } => {
            let state = LabState::load(&cli.name)?;
            let pod = state.pod(&pod)?;
            let Some((program, args)) = command.split_first() else {
                bail!("no command given");
            };
            // `lab-app` is the lab's own client: run the lab's binary, resolving
            // names with the lab's hosts file as the pod's app does.
            let mut command = if program == "lab-app" {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                state.app_client(pod, &args)?
            } else {
                let mut command = state.command_in_pod(pod, program)?;
                command.args(args);
                command
            };
            let err = command.exec();
            bail!("exec {program}: {err}");
        }
    }
    Ok(())
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it with `cargo build -p {name}` or pass --app",
            path.display()
        );
    }
    Ok(path)
}

/// The reference ztunnel binary named by `MESH_BENCH_REFERENCE_ZTUNNEL`, if
/// set and not empty; it must be an executable file. Relative paths are
/// made absolute, since the binary is started from the pods' namespaces.
fn reference_ztunnel() -> anyhow::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let env = mesh_lab::bench::reference::ENV;
    let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let path =
        std::path::absolute(PathBuf::from(path)).with_context(|| format!("resolving {env}"))?;
    let executable = std::fs::metadata(&path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        bail!("{env}={} is not an executable file", path.display());
    }
    Ok(Some(path))
}

fn print_status(state: &LabState) {
    let mut out = String::new();
    let plan = &state.plan;
    writeln!(
        out,
        "lab {} ({} nodes, {} pods, {} services)",
        plan.name,
        plan.nodes.len(),
        plan.pods.len(),
        plan.services.len()
    )
    .ok();
    writeln!(
        out,
        "\nNODE    NETNS                 IP            POD CIDR"
    )
    .ok();
    for node in &plan.nodes {
        writeln!(
            out,
            "{:<7} {:<21} {:<13} {}/24",
            node.name, node.netns, node.ip, node.pod_cidr
        )
        .ok();
    }
    writeln!(out, "\nNAMESPACE LABELS").ok();
    for (ns, labels) in &plan.namespaces {
        writeln!(out, "{ns}: {}", join_labels(labels)).ok();
    }
    writeln!(
        out,
        "\n{:<22} {:<10} {:<12} {:<6} {:<20} {:<6} LABELS",
        "POD", "NAMESPACE", "IP", "NODE", "SERVICE ACCOUNT", "STATE"
    )
    .ok();
    for pod in &plan.pods {
        let alive = state
            .app_pids
            .get(&pod.qualified_name())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        writeln!(
            out,
            "{:<22} {:<10} {:<12} {:<6} {:<20} {:<6} {}",
            pod.name,
            pod.namespace,
            pod.ip,
            plan.nodes[pod.node].name,
            pod.service_account,
            if alive { "up" } else { "DOWN" },
            join_labels(&pod.labels)
        )
        .ok();
    }
    writeln!(
        out,
        "\n{:<16} {:<10} {:<12} PORTS -> ENDPOINTS",
        "SERVICE", "NAMESPACE", "VIP"
    )
    .ok();
    for svc in &plan.services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| {
                let eps: Vec<String> = p.endpoints.iter().map(ToString::to_string).collect();
                format!("{} -> [{}]", p.port, eps.join(" "))
            })
            .collect();
        writeln!(
            out,
            "{:<16} {:<10} {:<12} {}",
            svc.name,
            svc.namespace,
            svc.vip,
            ports.join("; ")
        )
        .ok();
    }
    write_stdout(&out);
}

/// Writes `text` to stdout; a closed pipe (`status | head`) is not an error.
fn write_stdout(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn join_labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
