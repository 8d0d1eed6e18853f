//! Making sure a bpffs is mounted where pins go.

use std::{fs, io, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{FsType, statfs},
};

use crate::{Error, Result};

/// Where bpffs is mounted on every Linux node, and where pins live.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs at `root` unless one is already mounted there.
///
/// Some machines do not mount it at boot; pinning on a plain directory fails
/// with `EPERM`, so callers ensure the mount before pinning anything.
pub fn ensure_mounted(root: &Path) -> Result<()> {
    if is_bpffs(root)? {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|source| io_err("creating", root, source))?;
    mount(
        Some("bpf"),
        root,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| io_err("mounting bpffs at", root, errno.into()))
}

/// Whether `path` is the root of a mounted bpffs.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    match statfs(path) {
        Ok(stat) => Ok(stat.filesystem_type() == FsType(libc::BPF_FS_MAGIC as _)),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(errno) => Err(io_err("statfs", path, errno.into())),
    }
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
