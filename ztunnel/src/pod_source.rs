//! Where the agent learns its node's pods: the JSON file the lab writes
//! (`--node-pods`, polled), or the Kubernetes API (`--kubernetes`). Either
//! way the result is a [`NodePods`] for [`Agent::reconcile`](crate::agent::Agent::reconcile).

use std::{path::PathBuf, time::Duration};

use mesh_config::node::NodePods;
use ztunnel::kube_pods::KubePods;

/// How often the node pods file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// A source of the node's pods.
pub enum PodSource {
    /// A JSON file, polled for changes of its modification time.
    File {
        /// The file.
        path: PathBuf,
        /// Its modification time when last read.
        last_seen: Option<std::time::SystemTime>,
        /// The poll timer.
        ticker: tokio::time::Interval,
    },
    /// Watches on the API.
    Kubernetes(KubePods),
}

impl PodSource {
    /// Polls `path`.
    pub fn file(path: PathBuf) -> Self {
        Self::File {
            path,
            last_seen: None,
            ticker: tokio::time::interval(WATCH_INTERVAL),
        }
    }

    /// Waits for the next set of pods that differs from the last one.
    /// Cancel-safe.
    pub async fn next(&mut self) -> NodePods {
        match self {
            Self::File {
                path,
                last_seen,
                ticker,
            } => loop {
                ticker.tick().await;
                let modified = std::fs::metadata(&*path).and_then(|m| m.modified()).ok();
                if modified.is_none() || modified == *last_seen {
                    continue;
                }
                *last_seen = modified;
                // A malformed file keeps the last good set in force.
                if let Some(pods) = crate::agent::read_node_pods(path) {
                    return pods;
                }
            },
            Self::Kubernetes(pods) => pods.changed().await,
        }
    }
}
