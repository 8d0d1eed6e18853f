//! Network namespaces, veth links, addresses and routes, through iproute2.

use std::{path::Path, process::Command};

use crate::{Error, Result};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Runs `ip` with `args`; a non-zero exit becomes [`Error::Ip`] with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(crate::io_err("running ip (is iproute2 installed?)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Sets sysctls (`key=value`) inside `netns`; `/proc/sys/net` is per namespace.
pub fn sysctl_in(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    ip(&args)
}

/// Creates `name` with its loopback up.
pub fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Deletes `name`; its interfaces (and the veth peers) go with it.
pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "del", name])
}

/// Names of the existing namespaces that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(crate::io_err(format!("listing {NETNS_DIR}"))(err)),
    };
    let mut names: Vec<String> = dir
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}
