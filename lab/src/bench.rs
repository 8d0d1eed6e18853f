//! The benchmark harness behind `cargo xtask bench`: L4 scenarios in the lab,
//! every variant interleaved in the same run, medians and ratios to the
//! direct path, written as Markdown, JSON and SVG.
//!
//! Topology (one lab, two nodes, nothing relabelled between runs):
//! - `direct`: `bench-plain/client` (node0) → `bench-plain/server` (node1),
//!   a namespace outside the mesh;
//! - `mesh-cross-node`: `bench-mesh/client` (node0) → `bench-mesh/server`
//!   (node1), captured and carried over HBONE by both ztunnels;
//! - `mesh-same-node`: `bench-mesh/client` → `bench-mesh/server-local`
//!   (node0), through node0's ztunnel alone.
//!
//! Every load is `lab-app load` against the pod's TCP echo port, bounded in
//! time; CPU is the ztunnels' user+system time over the run, read from
//! `/proc`, and peak RSS their high-water mark.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{Error, LabState, PodPlan, Result, UpOptions, io_err, plan::ECHO_PORT};

/// The lab the benchmarks build (and tear down).
pub const LAB_NAME: &str = "meshbench";

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench-plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-plain, labels: {app: client}}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-plain, labels: {app: server}}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-mesh, labels: {app: client}}
spec: {serviceAccountName: client, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-mesh, labels: {app: server}}
spec: {serviceAccountName: server, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-local, namespace: bench-mesh, labels: {app: server-local}}
spec: {serviceAccountName: server, containers: [{name: app}]}
"#;

/// A path the load takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No mesh: plain TCP across the node link.
    Direct,
    /// Through both nodes' ztunnels, over HBONE.
    MeshCrossNode,
    /// Through one node's ztunnel.
    MeshSameNode,
}

impl Variant {
    const ALL: [Variant; 3] = [Self::Direct, Self::MeshCrossNode, Self::MeshSameNode];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::MeshCrossNode => "mesh L4 cross-node",
            Self::MeshSameNode => "mesh L4 same-node",
        }
    }

    /// `(namespace/client, namespace/server)`.
    fn pods(self) -> (&'static str, &'static str) {
        match self {
            Self::Direct => ("bench-plain/client", "bench-plain/server"),
            Self::MeshCrossNode => ("bench-mesh/client", "bench-mesh/server"),
            Self::MeshSameNode => ("bench-mesh/client", "bench-mesh/server-local"),
        }
    }
}

/// A load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One bulk stream: echoed bytes per second.
    Throughput,
    /// 1 KiB request/response at a fixed 1,000/s on one connection: latency.
    Latency,
    /// 1 KiB request/response as fast as possible on one connection.
    MaxRate,
    /// New connections per second, one 1 KiB exchange each.
    Connections,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 4] = [
        Self::Throughput,
        Self::Latency,
        Self::MaxRate,
        Self::Connections,
    ];

    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Latency => "latency",
            Self::MaxRate => "max-rate",
            Self::Connections => "connections",
        }
    }

    /// Parses a command-line name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    fn load_args(self) -> &'static [&'static str] {
        match self {
            Self::Throughput => &["--mode", "stream"],
            Self::Latency => &["--mode", "rr", "--rate", "1000"],
            Self::MaxRate => &["--mode", "rr"],
            Self::Connections => &["--mode", "connect"],
        }
    }
}

/// How to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Binaries, as for `up`.
    pub up: UpOptions,
    /// Scenarios (empty: all).
    pub scenarios: Vec<Scenario>,
    /// Rounds of A B C ... interleaving.
    pub rounds: usize,
    /// Seconds per run.
    pub seconds: f64,
    /// Where the report goes.
    pub out_dir: PathBuf,
}

/// What `lab-app load` printed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Operations.
    pub ops: u64,
    /// Bytes echoed.
    pub bytes: u64,
    /// Seconds.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_second: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Median latency (µs).
    pub p50_us: u64,
    /// p90 (µs).
    pub p90_us: u64,
    /// p99 (µs).
    pub p99_us: u64,
    /// p99.9 (µs).
    pub p999_us: u64,
}

/// One run: a scenario on a variant in a round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// Round number.
    pub round: usize,
    /// Scenario.
    pub scenario: Scenario,
    /// Variant.
    pub variant: Variant,
    /// What the load measured.
    pub load: LoadReport,
    /// ztunnel CPU (user+system seconds, all nodes) during the run.
    pub ztunnel_cpu_seconds: f64,
}

/// Everything a bench run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// Every run, in order.
    pub runs: Vec<Run>,
    /// Peak RSS of each ztunnel (KiB), by node.
    pub ztunnel_peak_rss_kib: BTreeMap<String, u64>,
    /// Rounds and seconds per run.
    pub rounds: usize,
    /// Seconds per run.
    pub seconds: f64,
}

/// Brings the bench lab up, runs everything, writes the report, tears the
/// lab down (also on failure).
pub fn run(options: &BenchOptions) -> Result<BenchReport> {
    std::fs::create_dir_all(&options.out_dir)
        .map_err(io_err(format!("creating {}", options.out_dir.display())))?;
    let manifest = options.out_dir.join("bench-pods.yaml");
    std::fs::write(&manifest, MANIFEST)
        .map_err(io_err(format!("writing {}", manifest.display())))?;
    let mut up = options.up.clone();
    up.name = LAB_NAME.to_owned();
    up.manifests = vec![manifest];
    up.nodes = 2;
    let state = crate::up(&up)?;
    let result = measure(&state, options);
    let _ = crate::down(LAB_NAME);
    let report = result?;
    write_report(&report, &options.out_dir)?;
    Ok(report)
}

fn measure(state: &LabState, options: &BenchOptions) -> Result<BenchReport> {
    state.wait_for_certificates(Duration::from_secs(10))?;
    let pod = |qualified: &str| -> Result<PodPlan> {
        state
            .plan
            .pods
            .iter()
            .find(|p| p.qualified_name() == qualified)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("bench pod {qualified} missing")))
    };
    let scenarios = if options.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        options.scenarios.clone()
    };
    let seconds = format!("{}", options.seconds);
    let mut runs = Vec::new();
    for round in 0..options.rounds {
        for &scenario in &scenarios {
            for variant in Variant::ALL {
                let (client, server) = variant.pods();
                let (client, server) = (pod(client)?, pod(server)?);
                let target = format!("{}:{ECHO_PORT}", server.ip);
                let mut args = vec!["load", target.as_str(), "--seconds", seconds.as_str()];
                args.extend_from_slice(scenario.load_args());
                let cpu_before = ztunnel_cpu(state);
                let output = state
                    .app_client(&client, &args)?
                    .output()
                    .map_err(io_err(format!("running lab-app load in {}", client.name)))?;
                let cpu = ztunnel_cpu(state) - cpu_before;
                if !output.status.success() {
                    return Err(Error::Invalid(format!(
                        "{} on {}: {}",
                        scenario.name(),
                        variant.name(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    )));
                }
                let load: LoadReport = serde_json::from_slice(&output.stdout)
                    .map_err(|e| Error::Invalid(format!("lab-app load printed no report: {e}")))?;
                eprintln!(
                    "round {round} {:<12} {:<20} {:>12.0} ops/s {:>10.1} MiB/s p50 {:>6} µs p99 {:>6} µs",
                    scenario.name(),
                    variant.name(),
                    load.ops_per_second,
                    load.bytes_per_second / (1024.0 * 1024.0),
                    load.p50_us,
                    load.p99_us
                );
                runs.push(Run {
                    round,
                    scenario,
                    variant,
                    load,
                    ztunnel_cpu_seconds: cpu,
                });
            }
        }
    }
    let ztunnel_peak_rss_kib = state
        .ztunnel_pids
        .iter()
        .map(|(node, pid)| (node.clone(), peak_rss_kib(*pid)))
        .collect();
    Ok(BenchReport {
        runs,
        ztunnel_peak_rss_kib,
        rounds: options.rounds,
        seconds: options.seconds,
    })
}

/// User+system seconds of every ztunnel so far.
fn ztunnel_cpu(state: &LabState) -> f64 {
    // The kernel reports in clock ticks; Linux's USER_HZ is 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    state
        .ztunnel_pids
        .values()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the `(comm)`, which may contain spaces.
            let rest = stat.rsplit_once(") ")?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SECOND)
        })
        .sum()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The median of each scenario × variant, with what the table shows.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    value: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    cpu_per_unit: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn summarize(report: &BenchReport) -> BTreeMap<(Scenario, Variant), Summary> {
    let mut groups: BTreeMap<(Scenario, Variant), Vec<&Run>> = BTreeMap::new();
    for run in &report.runs {
        groups
            .entry((run.scenario, run.variant))
            .or_default()
            .push(run);
    }
    groups
        .into_iter()
        .map(|(key, runs)| {
            let value = |r: &Run| match key.0 {
                Scenario::Throughput => r.load.bytes_per_second,
                _ => r.load.ops_per_second,
            };
            // CPU per GiB echoed, or per 1,000 operations.
            let cpu_per_unit = |r: &Run| match key.0 {
                Scenario::Throughput => {
                    r.ztunnel_cpu_seconds / (r.load.bytes.max(1) as f64 / (1u64 << 30) as f64)
                }
                _ => r.ztunnel_cpu_seconds / (r.load.ops.max(1) as f64 / 1000.0),
            };
            let summary = Summary {
                value: median(runs.iter().map(|r| value(r)).collect()),
                p50_us: median(runs.iter().map(|r| r.load.p50_us as f64).collect()) as u64,
                p99_us: median(runs.iter().map(|r| r.load.p99_us as f64).collect()) as u64,
                p999_us: median(runs.iter().map(|r| r.load.p999_us as f64).collect()) as u64,
                cpu_per_unit: median(runs.iter().map(|r| cpu_per_unit(r)).collect()),
            };
            (key, summary)
        })
        .collect()
}

/// Writes `report.md`, `results.json` and one SVG bar chart per scenario.
pub fn write_report(report: &BenchReport, dir: &Path) -> Result<()> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    };
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Invalid(e.to_string()))?;
    write("results.json", &json)?;
    let summary = summarize(report);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmark report\n\n{} round(s) of {} s per run, variants interleaved in each round; medians over rounds. \
         Ratios are to the direct path (higher is better for rates, lower for latency). \
         ztunnel CPU is user+system over all nodes, per GiB echoed (throughput) or per 1,000 operations.\n",
        report.rounds, report.seconds
    );
    let _ = writeln!(
        md,
        "| scenario | variant | rate | ratio | p50 µs | p99 µs | p99.9 µs | p99 ratio | ztunnel CPU s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for scenario in Scenario::ALL {
        let Some(direct) = summary.get(&(scenario, Variant::Direct)) else {
            continue;
        };
        for variant in Variant::ALL {
            let Some(s) = summary.get(&(scenario, variant)) else {
                continue;
            };
            let rate = match scenario {
                Scenario::Throughput => format!("{:.0} MiB/s", s.value / (1024.0 * 1024.0)),
                Scenario::Connections => format!("{:.0} conn/s", s.value),
                _ => format!("{:.0} req/s", s.value),
            };
            let latency = |v: u64| {
                if scenario == Scenario::Throughput {
                    "-".to_owned()
                } else {
                    v.to_string()
                }
            };
            let p99_ratio = if scenario == Scenario::Throughput || direct.p99_us == 0 {
                "-".to_owned()
            } else {
                format!("{:.2}x", s.p99_us as f64 / direct.p99_us as f64)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {rate} | {:.2}x | {} | {} | {} | {p99_ratio} | {:.3} |",
                scenario.name(),
                variant.name(),
                s.value / direct.value.max(f64::MIN_POSITIVE),
                latency(s.p50_us),
                latency(s.p99_us),
                latency(s.p999_us),
                s.cpu_per_unit,
            );
        }
        write(
            &format!("{}.svg", scenario.name()),
            &bar_chart(scenario, &summary),
        )?;
    }
    let _ = writeln!(md, "\nPeak RSS of the ztunnels:\n");
    for (node, kib) in &report.ztunnel_peak_rss_kib {
        let _ = writeln!(md, "- {node}: {:.1} MiB", *kib as f64 / 1024.0);
    }
    let _ = writeln!(
        md,
        "\nCharts: {}. Raw runs: `results.json`.",
        Scenario::ALL
            .iter()
            .filter(|s| summary.contains_key(&(**s, Variant::Direct)))
            .map(|s| format!("`{}.svg`", s.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    write("report.md", &md)
}

/// A horizontal bar per variant, scaled to the largest.
fn bar_chart(scenario: Scenario, summary: &BTreeMap<(Scenario, Variant), Summary>) -> String {
    let bars: Vec<(Variant, f64)> = Variant::ALL
        .into_iter()
        .filter_map(|v| summary.get(&(scenario, v)).map(|s| (v, s.value)))
        .collect();
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::MIN_POSITIVE, f64::max);
    let unit = match scenario {
        Scenario::Throughput => "MiB/s",
        Scenario::Connections => "conn/s",
        _ => "req/s",
    };
    let scale = |v: f64| {
        if scenario == Scenario::Throughput {
            v / (1024.0 * 1024.0)
        } else {
            v
        }
    };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{}" font-family="sans-serif" font-size="13">
<text x="10" y="20" font-weight="bold">{} ({unit}, median)</text>
"#,
        40 + bars.len() * 30,
        scenario.name()
    );
    for (i, (variant, value)) in bars.iter().enumerate() {
        let y = 35 + i * 30;
        let width = (value / max * 380.0).max(1.0);
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{}">{}</text><rect x="170" y="{y}" width="{width:.1}" height="20" fill="#4a7bd0"/><text x="{:.1}" y="{}">{:.0}</text>"##,
            y + 15,
            variant.name(),
            175.0 + width,
            y + 15,
            scale(*value)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, variant: Variant, ops: f64, p99: u64) -> Run {
        Run {
            round,
            scenario: Scenario::MaxRate,
            variant,
            load: LoadReport {
                ops: ops as u64,
                ops_per_second: ops,
                p99_us: p99,
                ..Default::default()
            },
            ztunnel_cpu_seconds: 1.0,
        }
    }

    #[test]
    fn medians_and_ratios_reach_the_report() {
        let report = BenchReport {
            runs: vec![
                run(0, Variant::Direct, 1000.0, 100),
                run(0, Variant::MeshCrossNode, 400.0, 300),
                run(1, Variant::Direct, 3000.0, 100),
                run(1, Variant::MeshCrossNode, 600.0, 500),
                run(2, Variant::Direct, 2000.0, 100),
                run(2, Variant::MeshCrossNode, 500.0, 400),
            ],
            ztunnel_peak_rss_kib: BTreeMap::from([("node0".to_owned(), 10240)]),
            rounds: 3,
            seconds: 1.0,
        };
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_report(&report, &dir).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(
            md.contains("| max-rate | mesh L4 cross-node | 500 req/s | 0.25x | 0 | 400 | 0 | 4.00x | 2.000 |"),
            "{md}"
        );
        assert!(md.contains("- node0: 10.0 MiB"), "{md}");
        let svg = std::fs::read_to_string(dir.join("max-rate.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("mesh L4 cross-node"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
