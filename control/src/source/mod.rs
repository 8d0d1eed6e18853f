//! Where config comes from: watched directories of YAML ([`DirSource`]) or
//! the Kubernetes API ([`KubeSource`]).
//!
//! Both produce a [`mesh_config::Loaded`] (resources, rejected documents,
//! warnings), so validation, keeping the last good version, the model and
//! the snapshot never know which one is in use.

mod dir;
pub mod kubernetes;

use std::time::Duration;

use mesh_config::Loaded;

pub use dir::{DirSource, Fingerprint, POLL_INTERVAL};
pub use kubernetes::KubeSource;

/// How long a change must be quiet before it is loaded, so a burst of
/// writes (an editor's saves, `kubectl apply` of many objects) becomes one
/// config version.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The config source of a running control plane.
pub enum ConfigSource {
    /// Watched directories.
    Dirs {
        /// The directories.
        source: DirSource,
        /// What the last load saw.
        seen: Fingerprint,
    },
    /// Watches on the Kubernetes API.
    Kubernetes(KubeSource),
}

impl ConfigSource {
    /// Directories, fingerprinted now: a change racing the first load is
    /// then seen as a change, never lost.
    pub fn dirs(source: DirSource) -> Self {
        let seen = source.fingerprint();
        Self::Dirs { source, seen }
    }

    /// Loads the current config.
    pub fn load(&mut self) -> Loaded {
        match self {
            Self::Dirs { source, .. } => source.load(),
            Self::Kubernetes(source) => source.load(),
        }
    }

    /// Waits until the config has changed since the last
    /// [`load`](Self::load) and has been quiet for [`SETTLE`].
    pub async fn changed(&mut self) {
        match self {
            Self::Dirs { source, seen } => *seen = source.changed(seen).await,
            Self::Kubernetes(source) => source.changed().await,
        }
    }
}
