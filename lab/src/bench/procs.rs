//! What the proxies cost: user+system CPU and resident memory of each
//! proxy process, read from `/proc`, sampled while a load runs.

use std::{
    collections::BTreeMap,
    process::Child,
    thread,
    time::{Duration, Instant},
};

/// How often resident memory is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The proxy processes of the bench lab, by name (`ztunnel node0`,
/// `waypoint`, `nginx`): each a set of PIDs (nginx's master and workers).
#[derive(Clone, Debug, Default)]
pub struct Proxies(pub BTreeMap<String, Vec<u32>>);

/// One proxy's cost over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cost {
    /// User+system CPU seconds spent during the run.
    pub cpu_seconds: f64,
    /// Highest resident memory seen during the run (KiB), over all its
    /// processes together.
    pub peak_rss_kib: u64,
}

impl Proxies {
    /// Each proxy's resident memory now (KiB).
    pub fn rss_kib(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(name, pids)| (name.clone(), pids.iter().map(|p| rss_kib(*p)).sum()))
            .collect()
    }

    fn cpu_seconds(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(name, pids)| (name.clone(), pids.iter().map(|p| cpu_seconds(*p)).sum()))
            .collect()
    }

    /// Waits for `child` (a load generator) while sampling every proxy;
    /// returns its output and each proxy's cost over the run.
    pub fn measure(
        &self,
        mut child: Child,
    ) -> std::io::Result<(std::process::Output, BTreeMap<String, Cost>)> {
        let before = self.cpu_seconds();
        let mut peak = self.rss_kib();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            let next = Instant::now() + SAMPLE_EVERY;
            for (name, kib) in self.rss_kib() {
                let entry = peak.entry(name).or_default();
                *entry = (*entry).max(kib);
            }
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let output = child.wait_with_output()?;
        let after = self.cpu_seconds();
        let costs = after
            .into_iter()
            .map(|(name, cpu)| {
                let cost = Cost {
                    cpu_seconds: (cpu - before.get(&name).copied().unwrap_or(0.0)).max(0.0),
                    peak_rss_kib: peak.get(&name).copied().unwrap_or(0),
                };
                (name, cost)
            })
            .collect();
        Ok((output, costs))
    }
}

/// User+system seconds process `pid` has used so far (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    // The kernel reports in clock ticks; Linux's USER_HZ is 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the `(comm)`, which may contain spaces.
            let rest = stat.rsplit_once(") ")?.1;
            let mut fields = rest.split_whitespace().skip(11);
            let utime: f64 = fields.next()?.parse().ok()?;
            let stime: f64 = fields.next()?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SECOND)
        })
        .unwrap_or(0.0)
}

/// Resident memory of `pid` now (KiB; 0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Highest resident memory of `pid` since it started (KiB).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// The soft limit on open files of `pid` (`u64::MAX` if unlimited, 0 if it
/// is gone).
pub fn open_file_limit(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            let soft = line
                .trim_start_matches("Max open files")
                .split_whitespace()
                .next()?;
            Some(soft.parse().unwrap_or(u64::MAX))
        })
        .unwrap_or(0)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `pid` and its direct children (nginx's master and its workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(") ")?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        assert!(peak_rss_kib(me) >= rss_kib(me));
        assert!(cpu_seconds(me) >= 0.0);
        assert_eq!(rss_kib(u32::MAX), 0);
        assert!(open_file_limit(me) > 0);
    }

    #[test]
    fn a_run_is_measured_while_it_lasts() {
        let me = std::process::id();
        let proxies = Proxies(BTreeMap::from([("self".to_owned(), vec![me])]));
        let child = std::process::Command::new("sleep")
            .arg("0.2")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (output, costs) = proxies.measure(child).unwrap();
        assert!(output.status.success());
        assert!(costs["self"].peak_rss_kib > 0);
    }

    #[test]
    fn children_are_found() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pids = with_children(std::process::id());
        let mut child = child;
        let found = pids.contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "{pids:?}");
    }
}
