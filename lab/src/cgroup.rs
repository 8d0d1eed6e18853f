//! The lab's cgroup v2 tree: `<cgroup2 root>/<lab>/<node>/<pod>`.
//!
//! Pods live in their own cgroup because that is how the mesh's cgroup eBPF
//! programs (and a real kubelet's) tell workloads apart.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result, io_err};

/// Finds where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(io_err("reading /proc/self/mounts"))?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .min_by_key(|path| path.as_os_str().len())
        .ok_or_else(|| Error::Invalid("no cgroup2 filesystem is mounted".into()))
}

/// The cgroup of lab `lab`.
pub fn lab_cgroup(lab: &str) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join(lab))
}

/// Creates `path` and its parents.
pub fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(io_err(format!("creating cgroup {}", path.display())))
}

/// Kills every process in `path` and below, waits for them to exit, then
/// removes the whole subtree. A missing cgroup is not an error.
pub fn kill_and_remove(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree atomically.
    write_file(&path.join("cgroup.kill"), "1")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(path)? {
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "processes in {} did not exit after SIGKILL",
                path.display()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
    remove_tree(path)?;
    Ok(true)
}

fn populated(path: &Path) -> Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))
        .map_err(io_err(format!("reading {}/cgroup.events", path.display())))?;
    Ok(events.lines().any(|line| line == "populated 1"))
}

fn remove_tree(path: &Path) -> Result<()> {
    for entry in fs::read_dir(path).map_err(io_err(format!("listing cgroup {}", path.display())))? {
        let entry = entry.map_err(io_err(format!("listing cgroup {}", path.display())))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&entry.path())?;
        }
    }
    // cgroup directories are removed with rmdir even though they hold files.
    fs::remove_dir(path).map_err(io_err(format!("removing cgroup {}", path.display())))
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    file.write_all(value.as_bytes())
        .map_err(|err: io::Error| io_err(format!("writing {}", path.display()))(err))
}
