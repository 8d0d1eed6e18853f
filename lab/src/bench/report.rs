//! The bench report: medians over rounds, ratios to each scenario's
//! baseline, as `report.md`, `results.json` and SVG charts (rate bars,
//! latency percentile curves, proxy memory bars).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use super::{BenchReport, Run, Scenario, Variant};
use crate::{Error, Result, io_err};

/// The median of each scenario × variant, with what the table shows.
#[derive(Clone, Debug)]
struct Summary {
    value: f64,
    /// p50, p90, p99, p99.9 (µs).
    percentiles: [u64; 4],
    cpu_per_unit: f64,
    rss_kib: u64,
}

const PERCENTILE_NAMES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

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
            let of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let value = |r: &Run| {
                if key.0.is_bulk() {
                    r.load.bytes_per_second
                } else {
                    r.load.ops_per_second
                }
            };
            // CPU per GiB echoed, or per 1,000 operations.
            let cpu_per_unit = |r: &Run| {
                if key.0.is_bulk() {
                    r.proxy_cpu_seconds() / (r.load.bytes.max(1) as f64 / (1u64 << 30) as f64)
                } else {
                    r.proxy_cpu_seconds() / (r.load.ops.max(1) as f64 / 1000.0)
                }
            };
            let summary = Summary {
                value: of(&value),
                percentiles: [
                    of(&|r| r.load.p50_us as f64) as u64,
                    of(&|r| r.load.p90_us as f64) as u64,
                    of(&|r| r.load.p99_us as f64) as u64,
                    of(&|r| r.load.p999_us as f64) as u64,
                ],
                cpu_per_unit: of(&cpu_per_unit),
                rss_kib: of(&|r| r.proxy_peak_rss_kib() as f64) as u64,
            };
            (key, summary)
        })
        .collect()
}

fn rate(scenario: Scenario, value: f64) -> String {
    let (unit, scale) = scenario.unit();
    format!("{:.0} {unit}", value * scale)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Writes `report.md`, `results.json` and the charts.
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
         Ratios are to the first variant of each scenario, the direct path (higher is better for rates, lower for latency). \
         Proxy CPU is the user+system time of the proxies on the variant's path, per GiB echoed (throughput) or per \
         1,000 operations; proxy RSS is their peak resident memory during the run, summed. \
         `open-*` rates are connection setups per second; the connections are then held for the run's seconds.\n",
        report.rounds, report.seconds
    );
    let _ = writeln!(
        md,
        "| scenario | variant | rate | ratio | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 ratio | proxy CPU s | proxy RSS MiB |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut charts = Vec::new();
    for scenario in Scenario::ALL {
        let Some(baseline) = summary.get(&(scenario, scenario.variants()[0])) else {
            continue;
        };
        let rows: Vec<(Variant, &Summary)> = scenario
            .variants()
            .iter()
            .filter_map(|v| summary.get(&(scenario, *v)).map(|s| (*v, s)))
            .collect();
        let has_latency = !scenario.is_bulk();
        for (variant, s) in &rows {
            let latency = |v: u64| {
                if has_latency {
                    v.to_string()
                } else {
                    "-".to_owned()
                }
            };
            let p99_ratio = if !has_latency || baseline.percentiles[2] == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{:.2}x",
                    s.percentiles[2] as f64 / baseline.percentiles[2] as f64
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2}x | {} | {} | {} | {} | {p99_ratio} | {} | {} |",
                scenario.name(),
                variant.name(),
                rate(scenario, s.value),
                s.value / baseline.value.max(f64::MIN_POSITIVE),
                latency(s.percentiles[0]),
                latency(s.percentiles[1]),
                latency(s.percentiles[2]),
                latency(s.percentiles[3]),
                if variant.proxies().is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.3}", s.cpu_per_unit)
                },
                if variant.proxies().is_empty() {
                    "-".to_owned()
                } else {
                    mib(s.rss_kib)
                },
            );
        }
        let (unit, scale) = scenario.unit();
        let bars: Vec<(&str, f64)> = rows
            .iter()
            .map(|(v, s)| (v.name(), s.value * scale))
            .collect();
        let name = format!("{}.svg", scenario.name());
        write(
            &name,
            &bar_chart(&format!("{} ({unit}, median)", scenario.name()), &bars),
        )?;
        charts.push(name);
        if has_latency {
            let curves: Vec<(&str, [u64; 4])> = rows
                .iter()
                .map(|(v, s)| (v.name(), s.percentiles))
                .collect();
            let name = format!("{}-latency.svg", scenario.name());
            write(
                &name,
                &percentile_chart(
                    &format!("{} latency (µs, median)", scenario.name()),
                    &curves,
                ),
            )?;
            charts.push(name);
        }
        if scenario.held_connections().is_some() {
            let bars: Vec<(&str, f64)> = rows
                .iter()
                .filter(|(v, _)| !v.proxies().is_empty())
                .map(|(v, s)| (v.name(), s.rss_kib as f64 / 1024.0))
                .collect();
            let name = format!("{}-rss.svg", scenario.name());
            write(
                &name,
                &bar_chart(
                    &format!("{}: proxies' peak RSS (MiB)", scenario.name()),
                    &bars,
                ),
            )?;
            charts.push(name);
        }
    }
    let _ = writeln!(
        md,
        "\n| proxy | idle RSS MiB | peak RSS MiB |\n| --- | ---: | ---: |"
    );
    for (name, idle) in &report.idle_rss_kib {
        let peak = report.peak_rss_kib.get(name).copied().unwrap_or(0);
        let _ = writeln!(md, "| {name} | {} | {} |", mib(*idle), mib(peak));
    }
    if let Some(reference) = &report.reference {
        let _ = writeln!(
            md,
            "\nReference ztunnel: `{}` ({}), one instance in dedicated mode in each of `{}` and `{}`; \
             its server-side instance accepted {} connections over HBONE with mutual TLS during the measured runs.",
            reference.binary.display(),
            reference.version,
            super::reference::CLIENT,
            super::reference::SERVER,
            reference.mutual_tls_connections,
        );
    }
    if !report.skipped.is_empty() {
        let _ = writeln!(md, "\nNot run on this machine:\n");
        for skipped in &report.skipped {
            let _ = writeln!(md, "- {skipped}");
        }
    }
    if let Some(cp) = &report.control_plane {
        let full = cp.size == super::control::FULL;
        let verdict = |value: u64, target: u64| match (full, value <= target) {
            (false, _) => "(targets apply at full size)".to_owned(),
            (true, true) => format!("(target under {target}: met)"),
            (true, false) => format!("(target under {target}: missed)"),
        };
        let _ = writeln!(
            md,
            "\n## Control plane\n\n{} services, {} endpoints, {} VirtualServices pushed to {} simulated \
             proxies over delta ADS (`mesh-control-bench`).\n\n\
             | measure | value |\n| --- | ---: |\n\
             | load (read, validate) | {} ms |\n\
             | translate | {} ms |\n\
             | push to every proxy | {} ms |\n\
             | translate + push | {} ms {} |\n\
             | CPU during the push | {} ms |\n\
             | peak RSS | {} MiB {} |",
            cp.size.services,
            cp.size.pods,
            cp.size.virtual_services,
            cp.size.proxies,
            cp.load_ms,
            cp.translate_ms,
            cp.full_push_ms,
            cp.translate_and_push_ms,
            verdict(cp.translate_and_push_ms, super::control::TARGET_PUSH_MS),
            cp.push_cpu_ms,
            cp.peak_rss_mib,
            verdict(cp.peak_rss_mib, super::control::TARGET_RSS_MIB),
        );
    }
    let _ = writeln!(
        md,
        "\nCharts: {}. Raw runs: `results.json`.",
        charts
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    write("report.md", &md)
}

/// A horizontal bar per entry, scaled to the largest.
fn bar_chart(title: &str, bars: &[(&str, f64)]) -> String {
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::MIN_POSITIVE, f64::max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{}" font-family="sans-serif" font-size="13">
<text x="10" y="20" font-weight="bold">{title}</text>
"#,
        40 + bars.len() * 30,
    );
    for (i, (name, value)) in bars.iter().enumerate() {
        let y = 35 + i * 30;
        let width = (value / max * 380.0).max(1.0);
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{}">{name}</text><rect x="170" y="{y}" width="{width:.1}" height="20" fill="#4a7bd0"/><text x="{:.1}" y="{}">{value:.1}</text>"##,
            y + 15,
            175.0 + width,
            y + 15,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Latency at p50, p90, p99 and p99.9, one line per variant, on a
/// logarithmic scale.
fn percentile_chart(title: &str, curves: &[(&str, [u64; 4])]) -> String {
    const COLOURS: [&str; 5] = ["#4a7bd0", "#d0704a", "#4aa05a", "#9a4ad0", "#808080"];
    const LEFT: f64 = 70.0;
    const TOP: f64 = 40.0;
    const WIDTH: f64 = 420.0;
    const HEIGHT: f64 = 220.0;
    let values = curves.iter().flat_map(|(_, p)| p.iter().copied());
    let max = values.clone().max().unwrap_or(1).max(2) as f64;
    let min = values.min().unwrap_or(1).max(1) as f64;
    let (lo, hi) = (
        min.log10().floor(),
        max.log10().ceil().max(min.log10().floor() + 1.0),
    );
    let y = |v: u64| TOP + HEIGHT - ((v.max(1) as f64).log10() - lo) / (hi - lo) * HEIGHT;
    let x = |i: usize| LEFT + i as f64 * WIDTH / 3.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{}" font-family="sans-serif" font-size="13">
<text x="10" y="20" font-weight="bold">{title}</text>
"#,
        TOP + HEIGHT + 40.0
    );
    let mut decade = lo;
    while decade <= hi {
        let v = 10f64.powf(decade) as u64;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="10" y="{:.1}">{v}</text>"##,
            LEFT + WIDTH,
            y(v) + 4.0,
            y = y(v),
        );
        decade += 1.0;
    }
    for (i, name) in PERCENTILE_NAMES.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{name}</text>"#,
            x(i),
            TOP + HEIGHT + 20.0
        );
    }
    for (n, (name, percentiles)) in curves.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let points: Vec<String> = percentiles
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{colour}">{name}</text>"#,
            points.join(" "),
            LEFT + WIDTH + 15.0,
            TOP + 15.0 + n as f64 * 18.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::{super::LoadReport, *};
    use crate::bench::procs::Cost;

    fn run(round: usize, variant: Variant, ops: f64, p99: u64) -> Run {
        Run {
            round,
            scenario: Scenario::MaxRate,
            variant,
            load: LoadReport {
                ops: ops as u64,
                ops_per_second: ops,
                p50_us: p99 / 2,
                p90_us: p99 - 10,
                p99_us: p99,
                p999_us: p99 * 2,
                ..Default::default()
            },
            proxies: variant
                .proxies()
                .iter()
                .map(|p| {
                    let cost = Cost {
                        cpu_seconds: 0.5,
                        peak_rss_kib: 5120,
                    };
                    ((*p).to_owned(), cost)
                })
                .collect(),
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
            idle_rss_kib: BTreeMap::from([("ztunnel node0".to_owned(), 10240)]),
            peak_rss_kib: BTreeMap::from([("ztunnel node0".to_owned(), 20480)]),
            rounds: 3,
            seconds: 1.0,
            control_plane: None,
            skipped: Vec::new(),
            reference: None,
        };
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_report(&report, &dir).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        // Two ztunnels at 0.5 s each over 500 ops: 2 s per 1,000.
        assert!(
            md.contains(
                "| max-rate | mesh L4 cross-node | 500 req/s | 0.25x | 200 | 390 | 400 | 800 | 4.00x | 2.000 | 10.0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| max-rate | direct | 2000 req/s | 1.00x |"),
            "{md}"
        );
        assert!(md.contains("| ztunnel node0 | 10.0 | 20.0 |"), "{md}");
        let svg = std::fs::read_to_string(dir.join("max-rate.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("mesh L4 cross-node"));
        let curves = std::fs::read_to_string(dir.join("max-rate-latency.svg")).unwrap();
        assert_eq!(curves.matches("<polyline").count(), 2, "{curves}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
