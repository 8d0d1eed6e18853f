//! `meshctl`: look at the mesh the way `istioctl` looks at Istio.
//!
//! - `analyze PATH...`: load Kubernetes and Istio YAML as the control plane
//!   would and report every problem with file, resource and field; exit 1 if
//!   any.
//! - `proxy-status`: every proxy connected to the control plane, per
//!   resource type: synced, stale (sent but not yet ACKed) or NACKed (with
//!   the proxy's reason).
//! - `config-errors`: what the running control plane rejected.
//! - `ztunnel-config`: the workloads, services, policies and certificates a
//!   ztunnel holds (its admin `/config_dump`).
//! - `install` / `uninstall`: apply the rendered chart to the cluster, or
//!   remove capture from every node and then the chart's objects
//!   ([`install`]).

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

mod http_get;
mod install;

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect the mesh: analyze config, proxy status, ztunnel state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load YAML files or directories as the control plane would and report
    /// every problem; exits 1 when there is any.
    Analyze {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Sync status of every proxy connected to the control plane.
    ProxyStatus {
        /// The control plane's monitoring address.
        #[arg(
            long,
            default_value = "http://127.0.0.1:15014",
            env = "MESH_CONTROL_STATUS"
        )]
        control: String,
    },
    /// Config the running control plane rejected.
    ConfigErrors {
        /// The control plane's monitoring address.
        #[arg(
            long,
            default_value = "http://127.0.0.1:15014",
            env = "MESH_CONTROL_STATUS"
        )]
        control: String,
    },
    /// What a ztunnel holds: workloads, services, policies, certificates.
    ZtunnelConfig {
        /// The ztunnel's admin address.
        #[arg(long, default_value = "http://127.0.0.1:15000")]
        admin: String,
    },
    /// Server-side apply the rendered chart to the cluster kubectl would
    /// use (`$KUBECONFIG`, `~/.kube/config` or in-cluster).
    Install {
        /// Manifest to apply instead of the `deploy/rendered/mesh.yaml`
        /// built into meshctl (e.g. `helm template` output).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Remove the mesh: delete the ztunnel DaemonSet, run `ztunnel
    /// uninstall` on every node (a cleanup DaemonSet) so enrolled pods'
    /// traffic flows directly again, then delete every object of the
    /// manifest.
    Uninstall {
        /// Manifest that was installed, instead of the built-in one.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// Longest wait for each step (ztunnel pods gone, every node
        /// cleaned), in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
        /// Only remove capture from every node (delete DaemonSet ztunnel as
        /// it runs in `--namespace`, clean every node), leaving the other
        /// objects: what the chart's Helm pre-delete hook runs in-cluster.
        #[arg(long, conflicts_with = "file")]
        nodes_only: bool,
        /// Namespace of the ztunnel DaemonSet, with `--nodes-only`.
        #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
        namespace: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("meshctl: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Analyze { paths } => Ok(analyze(&paths)),
        Command::ProxyStatus { control } => {
            let syncz = http_get::json(&format!("{control}/debug/syncz")).await?;
            print!("{}", proxy_status(&syncz)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::ConfigErrors { control } => {
            let status = http_get::json(&format!("{control}/debug/config_errors")).await?;
            let errors = status["errors"].as_array().cloned().unwrap_or_default();
            println!(
                "config version {}: {} error(s)",
                status["version"],
                errors.len()
            );
            for error in &errors {
                println!("  {}", error.as_str().unwrap_or_default());
            }
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::ZtunnelConfig { admin } => {
            let dump = http_get::json(&format!("{admin}/config_dump")).await?;
            print!("{}", ztunnel_config(&dump));
            Ok(ExitCode::SUCCESS)
        }
        Command::Install { file } => {
            let documents = manifest(file.as_deref())?;
            install::install(&kube_client().await?, &documents).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall {
            file,
            timeout_seconds,
            nodes_only,
            namespace,
        } => {
            let documents = manifest(file.as_deref())?;
            let waits = install::Waits {
                timeout: std::time::Duration::from_secs(timeout_seconds),
                poll: std::time::Duration::from_secs(1),
            };
            let client = kube_client().await?;
            if nodes_only {
                install::uninstall_nodes(&client, &namespace, &documents, waits).await?;
            } else {
                install::uninstall(&client, &documents, waits).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The manifest at `file`, or the built-in render of the chart.
fn manifest(file: Option<&std::path::Path>) -> anyhow::Result<Vec<install::Document>> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            install::parse_manifest(&text).with_context(|| format!("parsing {}", path.display()))
        }
        None => install::parse_manifest(install::RENDERED)
            .context("parsing the built-in deploy/rendered/mesh.yaml"),
    }
}

/// A client of the cluster kubectl would use.
async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("finding the Kubernetes API (kubeconfig or in-cluster)")
}

fn analyze(paths: &[PathBuf]) -> ExitCode {
    let (report, clean) = analyze_report(paths);
    print!("{report}");
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Loads every path as one configuration (so references across files
/// resolve), validates it with the control plane's rules, and reports
/// errors and warnings; `true` when there is no error.
fn analyze_report(paths: &[PathBuf]) -> (String, bool) {
    let mut manifests = mesh_config::Manifests::default();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for path in paths {
        let loaded = if path.is_dir() {
            mesh_config::load_dir(path)
        } else {
            mesh_config::load_file(path)
        };
        manifests.extend(loaded.manifests);
        errors.extend(loaded.errors.iter().map(ToString::to_string));
        warnings.extend(loaded.warnings.iter().map(ToString::to_string));
    }
    errors.extend(
        mesh_config::validate::validate(&manifests)
            .iter()
            .map(ToString::to_string),
    );
    let mut out = String::new();
    for error in &errors {
        let _ = writeln!(out, "Error: {error}");
    }
    for warning in &warnings {
        let _ = writeln!(out, "Warning: {warning}");
    }
    let resources = manifests.len();
    if errors.is_empty() {
        let _ = writeln!(
            out,
            "✔ No validation issues found ({resources} resource(s) analyzed, {} warning(s)).",
            warnings.len()
        );
    } else {
        let _ = writeln!(
            out,
            "{} error(s), {} warning(s) in {resources} loaded resource(s).",
            errors.len(),
            warnings.len()
        );
    }
    (out, errors.is_empty())
}

/// Short type names for the table's columns.
const TYPES: [(&str, &str); 2] = [
    ("type.googleapis.com/istio.workload.Address", "ADDRESS"),
    (
        "type.googleapis.com/istio.security.Authorization",
        "AUTHORIZATION",
    ),
];

fn proxy_status(syncz: &Value) -> anyhow::Result<String> {
    let Some(proxies) = syncz.as_array() else {
        bail!("unexpected /debug/syncz answer: {syncz}");
    };
    let mut out = String::new();
    let _ = write!(out, "{:<28} {:<12}", "NAME", "NODE");
    for (_, short) in TYPES {
        let _ = write!(out, " {short:<28}");
    }
    out.push('\n');
    for proxy in proxies {
        let _ = write!(
            out,
            "{:<28} {:<12}",
            proxy["proxy"].as_str().unwrap_or("?"),
            proxy["node"].as_str().unwrap_or("?")
        );
        for (url, _) in TYPES {
            let _ = write!(out, " {:<28}", sync_state(&proxy["types"][url]));
        }
        out.push('\n');
    }
    Ok(out)
}

/// `SYNCED (v3)`, `STALE (sent v4, acked v3)`, `NACK v4: reason`, or `-`.
fn sync_state(status: &Value) -> String {
    if status.is_null() {
        return "-".to_owned();
    }
    let sent = status["sent_version"].as_u64().unwrap_or(0);
    let acked = status["acked_version"].as_u64();
    if let Some(nack) = status["last_nack"].as_array()
        && nack.first().and_then(Value::as_u64) == Some(sent)
    {
        return format!(
            "NACK v{sent}: {}",
            nack.get(1).and_then(Value::as_str).unwrap_or("")
        );
    }
    match acked {
        Some(acked) if acked == sent => format!("SYNCED (v{sent})"),
        Some(acked) => format!("STALE (sent v{sent}, acked v{acked})"),
        None => format!("STALE (sent v{sent})"),
    }
}

fn ztunnel_config(dump: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let list = |key: &str| dump[key].as_array().unwrap_or(&empty).clone();
    let _ = writeln!(out, "WORKLOADS");
    let _ = writeln!(
        out,
        "{:<36} {:<16} {:<10} {:<8} IDENTITY",
        "NAME", "IP", "NODE", "PROTOCOL"
    );
    for w in list("workloads") {
        let _ = writeln!(
            out,
            "{:<36} {:<16} {:<10} {:<8} spiffe://{}/ns/{}/sa/{}",
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap_or(""),
                w["name"].as_str().unwrap_or("")
            ),
            w["ips"][0].as_str().unwrap_or("-"),
            w["node"].as_str().unwrap_or("-"),
            if w["hbone"] == true { "HBONE" } else { "TCP" },
            w["trust_domain"].as_str().unwrap_or(""),
            w["namespace"].as_str().unwrap_or(""),
            w["service_account"].as_str().unwrap_or(""),
        );
    }
    let _ = writeln!(out, "\nSERVICES");
    let _ = writeln!(out, "{:<48} VIPS", "HOST");
    for s in list("services") {
        let vips: Vec<&str> = s["vips"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "{:<48} {}",
            s["hostname"].as_str().unwrap_or(""),
            vips.join(",")
        );
    }
    let _ = writeln!(out, "\nPOLICIES");
    for p in list("policies") {
        let _ = writeln!(
            out,
            "{} {} ({} scope, {} rule(s))",
            p["action"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["scope"].as_str().unwrap_or(""),
            p["rules"]
        );
    }
    let _ = writeln!(out, "\nCERTIFICATES");
    for c in list("certificates") {
        let _ = writeln!(
            out,
            "{:<56} {:<8} {}",
            c["identity"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            c["expires_in_seconds"]
                .as_u64()
                .map(|s| format!("expires in {}h{:02}m", s / 3600, s % 3600 / 60))
                .unwrap_or_else(|| c["error"].as_str().unwrap_or("").to_owned())
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_states() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(
            sync_state(&v(
                r#"{"sent_version":3,"acked_version":3,"last_nack":null}"#
            )),
            "SYNCED (v3)"
        );
        assert_eq!(
            sync_state(&v(
                r#"{"sent_version":4,"acked_version":3,"last_nack":null}"#
            )),
            "STALE (sent v4, acked v3)"
        );
        assert_eq!(
            sync_state(&v(
                r#"{"sent_version":4,"acked_version":3,"last_nack":[4,"bad CIDR"]}"#
            )),
            "NACK v4: bad CIDR"
        );
        assert_eq!(sync_state(&Value::Null), "-");
    }

    #[test]
    fn proxy_status_table() {
        let syncz: Value = serde_json::from_str(
            r#"[{"proxy":"ztunnel~node0","node":"node0","types":{"type.googleapis.com/istio.workload.Address":{"sent_version":2,"acked_version":2}}}]"#,
        )
        .unwrap();
        let table = proxy_status(&syncz).unwrap();
        assert!(
            table.lines().nth(1).unwrap().starts_with("ztunnel~node0"),
            "{table}"
        );
        assert!(table.contains("SYNCED (v2)"));
    }

    #[test]
    fn analyze_reports_problems_with_file_and_field() {
        let dir = std::env::temp_dir().join(format!("meshctl-analyze-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ok.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        assert_eq!(analyze(std::slice::from_ref(&dir)), ExitCode::SUCCESS);
        std::fs::write(
            dir.join("bad.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: x}]}\n",
        )
        .unwrap();
        let (report, clean) = analyze_report(std::slice::from_ref(&dir));
        assert!(!clean);
        assert!(
            report.contains("bad.yaml: document 1 (Service default/s): field `spec.ports[0].port`"),
            "{report}"
        );
        std::fs::write(
            dir.join("bad.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [r], http: [{route: [{destination: {host: r, subset: v9}}]}], tcpp: []}\n",
        )
        .unwrap();
        let (report, clean) = analyze_report(std::slice::from_ref(&dir));
        assert!(!clean);
        assert!(report.contains("VirtualService default/r: field `spec.http[0].route[0].destination.subset`: subset `v9` of host `r` is not defined by any DestinationRule"), "{report}");
        assert!(
            report.contains("Warning: ") && report.contains("unknown field `spec.tcpp` ignored"),
            "{report}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
