//! Tearing a lab down, from names alone, so it also works after a crash.

use std::fs;

use crate::{Result, cgroup, io_err, netns, pin_dir, run_dir};

/// What [`down`] removed.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Network namespaces deleted.
    pub namespaces: Vec<String>,
    /// Whether the lab's cgroup tree (and every process in it) was removed.
    pub cgroup: bool,
    /// Whether the lab's bpffs pins (detaching its programs) were removed.
    pub pins: bool,
    /// Whether the run directory (state, hosts, logs) was removed.
    pub run_dir: bool,
}

impl DownReport {
    /// Whether there was anything to remove.
    pub fn removed_anything(&self) -> bool {
        !self.namespaces.is_empty() || self.cgroup || self.pins || self.run_dir
    }
}

/// Removes every process, cgroup, namespace (with its veths and routes), pin
/// and file of lab `lab`. Removing a lab that is not there is not an error.
pub fn down(lab: &str) -> Result<DownReport> {
    crate::validate_name(lab)?;
    // The state, if any, names the app processes; read it before it goes.
    let pids: Vec<u32> = crate::LabState::load(lab)
        .map(|state| {
            state
                .app_pids
                .into_values()
                .chain(state.ztunnel_pids.into_values())
                .chain(state.control_pid)
                .collect()
        })
        .unwrap_or_default();
    let mut report = DownReport {
        cgroup: cgroup::kill_and_remove(&cgroup::lab_cgroup(lab)?)?,
        ..DownReport::default()
    };
    reap(&pids);
    for name in netns::list_with_prefix(&format!("{lab}-"))? {
        netns::delete(&name)?;
        report.namespaces.push(name);
    }
    for (dir, flag) in [
        (pin_dir(lab), &mut report.pins),
        (run_dir(lab), &mut report.run_dir),
    ] {
        if dir.exists() {
            // Unlinking a pinned link detaches its program once nothing else holds it.
            fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
            *flag = true;
        }
    }
    Ok(report)
}

/// Collects the exit status of killed apps this process started itself (a
/// test that called [`crate::up`]), so they do not linger as zombies. Apps
/// started by another process are reaped by init; `ECHILD` is expected then.
fn reap(pids: &[u32]) {
    use nix::{
        sys::wait::{WaitPidFlag, waitpid},
        unistd::Pid,
    };
    for &pid in pids {
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}
