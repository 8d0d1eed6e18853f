//! Running programs as a pod or node of the lab: inside its network
//! namespace and cgroup, from the first instruction on.

use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
};

use nix::sched::CloneFlags;

use crate::{Result, io_err, netns::NETNS_DIR};

/// Makes `command` start inside network namespace `netns` and cgroup `cgroup`.
///
/// Joining happens between fork and exec, so no socket of the program is ever
/// created outside its pod: cgroup eBPF programs see all of them.
pub fn enter(command: &mut Command, netns: &str, cgroup: &Path) -> Result<()> {
    let ns = File::open(Path::new(NETNS_DIR).join(netns))
        .map_err(io_err(format!("opening netns {netns}")))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(io_err(format!("opening {}", procs_path.display())))?;
    // SAFETY: the closure only makes async-signal-safe system calls (write,
    // setns) on file descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    Ok(())
}

/// Makes `command` a daemon: its own session, so it outlives the caller.
pub fn detach(command: &mut Command) {
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}
