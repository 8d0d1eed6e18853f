//! Config from directories of Kubernetes YAML, watched.
//!
//! The directories are scanned for changes (paths, sizes, modification
//! times) every [`POLL_INTERVAL`]. Polling rather than inotify is deliberate:
//! it sees atomic renames and Kubernetes ConfigMap symlink swaps alike, and
//! costs a few `stat` calls per scan. A change is reloaded after
//! [`SETTLE`] so an editor's several writes become one version.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_config::{Loaded, load_dir};

use super::SETTLE;

/// How often the directories are scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A set of config directories.
#[derive(Clone, Debug)]
pub struct DirSource {
    dirs: Vec<PathBuf>,
}

/// What a scan saw: every YAML file with its size and modification time.
pub type Fingerprint = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

impl DirSource {
    /// Watches `dirs` (loaded in order).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self { dirs }
    }

    /// The directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Loads every directory.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded::default();
        for dir in &self.dirs {
            loaded.merge(load_dir(dir));
        }
        loaded
    }

    /// A cheap summary that changes whenever a YAML file does.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut seen = Fingerprint::new();
        for dir in &self.dirs {
            scan(dir, &mut seen);
        }
        seen
    }

    /// Waits until the directories change from `last`, then until they have
    /// been quiet for [`SETTLE`]; returns the new fingerprint.
    pub async fn changed(&self, last: &Fingerprint) -> Fingerprint {
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let mut now = self.fingerprint();
            if &now == last {
                continue;
            }
            loop {
                tokio::time::sleep(SETTLE).await;
                let settled = self.fingerprint();
                if settled == now {
                    return now;
                }
                now = settled;
            }
        }
    }
}

fn scan(dir: &Path, seen: &mut Fingerprint) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        seen.insert(dir.to_owned(), (u64::MAX, None));
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Follows symlinks, as the loader does.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            scan(&path, seen);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            seen.insert(path, (meta.len(), meta.modified().ok()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_is_seen_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let source = DirSource::new(vec![dir.path().to_owned()]);
        let before = source.fingerprint();
        let path = dir.path().join("ns.yaml");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(
                path,
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
            )
            .unwrap();
        });
        let after = tokio::time::timeout(Duration::from_secs(5), source.changed(&before))
            .await
            .expect("change seen");
        writer.await.unwrap();
        assert_ne!(before, after);
        assert_eq!(source.load().manifests.namespaces.len(), 1);
    }
}
