//! The pods of one node as the node agent needs them: where each pod's
//! network namespace and cgroup are, and whether it is enrolled in the mesh.
//!
//! This is the interface between whatever knows the node's pods (the lab's
//! file, or ztunnel's own Kubernetes watch on `spec.nodeName`) and
//! ztunnel's reconcile loop, playing the part Istio's CNI agent plays for
//! its ztunnel.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Namespace (or pod) label that opts into the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Value of [`DATAPLANE_MODE_LABEL`] that enrols a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Value of [`DATAPLANE_MODE_LABEL`] that opts a pod out.
pub const DATAPLANE_MODE_NONE: &str = "none";

/// One node's pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePods {
    /// Node name.
    pub node: String,
    /// Pods scheduled on the node.
    pub pods: Vec<NodePod>,
}

/// One pod on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Path of its network namespace.
    pub netns: PathBuf,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Service account.
    pub service_account: String,
    /// Whether its traffic goes through the mesh.
    pub enrolled: bool,
}

/// Whether a pod is in the mesh, by Istio's rules: its namespace is labelled
/// `istio.io/dataplane-mode=ambient` and the pod is not labelled
/// `istio.io/dataplane-mode=none`.
pub fn is_enrolled(
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> bool {
    let namespace_ambient = namespace_labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
        == Some(DATAPLANE_MODE_AMBIENT);
    let pod_opted_out =
        pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_NONE);
    namespace_ambient && !pod_opted_out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn enrolment_follows_namespace_label_and_pod_opt_out() {
        let ambient = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert!(is_enrolled(&ambient, &labels(&[("app", "x")])));
        assert!(!is_enrolled(
            &ambient,
            &labels(&[(DATAPLANE_MODE_LABEL, "none")])
        ));
        assert!(!is_enrolled(&labels(&[]), &labels(&[])));
        assert!(!is_enrolled(
            &labels(&[(DATAPLANE_MODE_LABEL, "sidecar")]),
            &labels(&[])
        ));
    }
}
