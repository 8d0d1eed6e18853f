//! Where a Kubernetes pod lives on this host: its cgroup v2 directory (the
//! kubelet's layout) and its network namespace.
//!
//! - **cgroup.** The kubelet puts each pod under `kubepods`, by QoS class.
//!   With the systemd cgroup driver:
//!   `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//!   (the uid's `-` written `_`), Guaranteed pods directly as
//!   `kubepods.slice/kubepods-pod<uid>.slice`; with the cgroupfs driver
//!   `kubepods/<qos>/pod<uid>` and `kubepods/pod<uid>`. Both are tried.
//! - **network namespace.** `/proc/<pid>/ns/net` of a process listed in a
//!   container's `cgroup.procs` below the pod's cgroup (every container of
//!   a pod shares its namespace). When the runtime pinned that namespace in
//!   the netns directory (containerd and CRI-O: `/var/run/netns/cni-…`),
//!   the pinned path is used instead: it stays valid for the pod's whole
//!   life, whichever process comes and goes.
//!
//! Roots are configurable so tests can lay out a fake tree.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The host directories discovery reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoots {
    /// The cgroup v2 mount (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The host's `/proc` (mounted into the container, e.g. `/host/proc`).
    pub proc_root: PathBuf,
    /// Where runtimes pin pod network namespaces (`/var/run/netns`).
    pub netns_dir: PathBuf,
}

/// A pod's place on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPaths {
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Its network namespace.
    pub netns: PathBuf,
}

/// Why a pod's place could not be found (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No cgroup directory in any known layout.
    #[error("no cgroup for pod {uid} (tried {tried})")]
    NoCgroup {
        /// The pod's uid.
        uid: String,
        /// The directories tried, comma-separated.
        tried: String,
    },
    /// The cgroup has no process whose namespace can be read.
    #[error("no process with a readable network namespace under {}", .cgroup.display())]
    NoProcess {
        /// The pod's cgroup.
        cgroup: PathBuf,
    },
}

/// The kubelet's QoS classes as cgroup path components; `None` for
/// Guaranteed (directly under `kubepods`).
const QOS_CLASSES: [Option<&str>; 3] = [None, Some("burstable"), Some("besteffort")];

impl HostRoots {
    /// The cgroup directories a pod with `uid` and `status.qosClass` may
    /// have, most likely first (every class when `qos` is unknown).
    pub fn cgroup_candidates(&self, uid: &str, qos: Option<&str>) -> Vec<PathBuf> {
        let classes: Vec<Option<&str>> = match qos {
            Some("Guaranteed") => vec![None],
            Some("Burstable") => vec![Some("burstable")],
            Some("BestEffort") => vec![Some("besteffort")],
            _ => QOS_CLASSES.to_vec(),
        };
        let systemd_uid = uid.replace('-', "_");
        let mut candidates = Vec::new();
        for class in &classes {
            candidates.push(match class {
                None => self
                    .cgroup_root
                    .join(format!("kubepods.slice/kubepods-pod{systemd_uid}.slice")),
                Some(q) => self.cgroup_root.join(format!(
                    "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{systemd_uid}.slice"
                )),
            });
        }
        for class in &classes {
            candidates.push(match class {
                None => self.cgroup_root.join(format!("kubepods/pod{uid}")),
                Some(q) => self.cgroup_root.join(format!("kubepods/{q}/pod{uid}")),
            });
        }
        candidates
    }

    /// Finds the pod's cgroup and network namespace.
    pub fn find(&self, uid: &str, qos: Option<&str>) -> Result<PodPaths, HostError> {
        let candidates = self.cgroup_candidates(uid, qos);
        let cgroup = candidates
            .iter()
            .find(|dir| dir.is_dir())
            .cloned()
            .ok_or_else(|| HostError::NoCgroup {
                uid: uid.to_owned(),
                tried: candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let netns = self.netns_of(&cgroup).ok_or_else(|| HostError::NoProcess {
            cgroup: cgroup.clone(),
        })?;
        Ok(PodPaths { cgroup, netns })
    }

    /// The namespace of the first process found in a container cgroup
    /// below `cgroup` (containers in name order, then the pod's own).
    fn netns_of(&self, cgroup: &Path) -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(cgroup)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        dirs.push(cgroup.to_owned());
        dirs.iter().find_map(|dir| {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
            procs.lines().find_map(|line| {
                let pid: u32 = line.trim().parse().ok()?;
                let netns = self.proc_root.join(pid.to_string()).join("ns/net");
                let meta = std::fs::metadata(&netns).ok()?;
                Some(self.pinned(meta.dev(), meta.ino()).unwrap_or(netns))
            })
        })
    }

    /// The pinned path of the namespace with device `dev` and inode `ino`.
    fn pinned(&self, dev: u64, ino: u64) -> Option<PathBuf> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.netns_dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        entries
            .into_iter()
            .find(|path| std::fs::metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
    }
}

/// Finds pods' places, keeping each answer while it stays valid (so a pod's
/// netns path does not change because another of its processes was picked)
/// and reporting each distinct problem of a pod once.
#[derive(Debug)]
pub struct PodLocator {
    roots: HostRoots,
    /// uid → where it was found.
    found: BTreeMap<String, PodPaths>,
    /// Pod key → the last problem logged.
    problems: BTreeMap<String, HostError>,
}

impl PodLocator {
    /// Discovery under `roots`.
    pub fn new(roots: HostRoots) -> Self {
        Self {
            roots,
            found: BTreeMap::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Where pod `key` (`<namespace>/<name>`, for logs) with `uid` lives, or
    /// `None` (logged once per distinct problem) to try again later.
    pub fn locate(&mut self, key: &str, uid: &str, qos: Option<&str>) -> Option<PodPaths> {
        if let Some(paths) = self.found.get(uid)
            && paths.cgroup.is_dir()
            && paths.netns.exists()
        {
            return Some(paths.clone());
        }
        match self.roots.find(uid, qos) {
            Ok(paths) => {
                if self.problems.remove(key).is_some() {
                    tracing::info!(pod = %key, netns = %paths.netns.display(), cgroup = %paths.cgroup.display(), "pod found on the host");
                }
                self.found.insert(uid.to_owned(), paths.clone());
                Some(paths)
            }
            Err(problem) => {
                if self.problems.get(key) != Some(&problem) {
                    tracing::info!(pod = %key, %problem, "pod not on the host yet; will retry");
                    self.problems.insert(key.to_owned(), problem);
                }
                None
            }
        }
    }

    /// Forgets pods other than `keys` and `uids` (they left the node).
    pub fn retain(&mut self, keys: &[String], uids: &[String]) {
        self.problems.retain(|k, _| keys.contains(k));
        self.found.retain(|u, _| uids.contains(u));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> HostRoots {
        HostRoots {
            cgroup_root: dir.join("cgroup"),
            proc_root: dir.join("proc"),
            netns_dir: dir.join("netns"),
        }
    }

    fn process(dir: &Path, cgroup: &str, pid: u32) {
        let container = dir
            .join("cgroup")
            .join(cgroup)
            .join("cri-containerd-1.scope");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(container.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        let ns = dir.join(format!("proc/{pid}/ns"));
        std::fs::create_dir_all(&ns).unwrap();
        std::fs::write(ns.join("net"), "").unwrap();
    }

    #[test]
    fn systemd_and_cgroupfs_layouts_by_qos_class() {
        let dir = tempfile::tempdir().unwrap();
        let r = roots(dir.path());
        let uid = "0a1b-2c";
        process(
            dir.path(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b_2c.slice",
            10,
        );
        let found = r.find(uid, Some("Burstable")).unwrap();
        assert_eq!(found.netns, dir.path().join("proc/10/ns/net"));
        assert!(
            found
                .cgroup
                .ends_with("kubepods-burstable-pod0a1b_2c.slice")
        );

        process(dir.path(), "kubepods/pod9-9", 11);
        let found = r.find("9-9", Some("Guaranteed")).unwrap();
        assert_eq!(found.cgroup, dir.path().join("cgroup/kubepods/pod9-9"));
        // Unknown QoS: every class is tried.
        process(
            dir.path(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7.slice",
            12,
        );
        assert!(r.find("7", None).is_ok());
        assert!(matches!(
            r.find("8", Some("BestEffort")),
            Err(HostError::NoCgroup { .. })
        ));
    }

    #[test]
    fn an_empty_cgroup_is_not_found_yet_and_a_pinned_netns_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let r = roots(dir.path());
        let pod = dir.path().join("cgroup/kubepods/besteffort/podu");
        std::fs::create_dir_all(pod.join("ctr")).unwrap();
        std::fs::write(pod.join("ctr/cgroup.procs"), "").unwrap();
        assert!(matches!(
            r.find("u", Some("BestEffort")),
            Err(HostError::NoProcess { .. })
        ));
        process(dir.path(), "kubepods/besteffort/podu", 20);
        std::fs::create_dir_all(dir.path().join("netns")).unwrap();
        std::fs::hard_link(
            dir.path().join("proc/20/ns/net"),
            dir.path().join("netns/cni-1234"),
        )
        .unwrap();
        assert_eq!(
            r.find("u", Some("BestEffort")).unwrap().netns,
            dir.path().join("netns/cni-1234")
        );
    }

    #[test]
    fn the_locator_keeps_an_answer_while_it_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut locator = PodLocator::new(roots(dir.path()));
        assert_eq!(locator.locate("a/p", "u", None), None);
        process(dir.path(), "kubepods/podu", 30);
        let first = locator.locate("a/p", "u", None).unwrap();
        // Another process listed first now: the answer stays.
        process(dir.path(), "kubepods/podu", 31);
        assert_eq!(locator.locate("a/p", "u", None).unwrap(), first);
        // The process went away: found again.
        std::fs::remove_dir_all(dir.path().join("proc/30")).unwrap();
        assert_eq!(
            locator.locate("a/p", "u", None).unwrap().netns,
            dir.path().join("proc/31/ns/net")
        );
    }
}
