//! The slim pod the config keeps: only what the model, the CA and the lab
//! read of a `v1/Pod`.
//!
//! A cluster has far more pods than anything else, and a k8s-openapi `Pod`
//! with its spec and status costs kilobytes even when almost every field is
//! empty. The loader still parses each document into the full k8s-openapi
//! type (so unknown-field warnings and field errors are Kubernetes'), then
//! keeps this instead and drops the full object at once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as k8s;

/// A `v1/Pod`, reduced to the fields the mesh reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// `metadata`.
    pub metadata: PodMeta,
    /// `spec`, when given.
    pub spec: Option<PodSpec>,
    /// `status`, when given.
    pub status: Option<PodStatus>,
}

/// What is kept of a pod's `metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.namespace` (the loader defaults it).
    pub namespace: Option<String>,
    /// `metadata.labels` (empty when none).
    pub labels: BTreeMap<String, String>,
    /// `metadata.ownerReferences` (empty when none).
    pub owner_references: Vec<OwnerReference>,
}

/// What is kept of one `metadata.ownerReferences` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerReference {
    /// `kind`, e.g. `ReplicaSet`.
    pub kind: String,
    /// `name`.
    pub name: String,
    /// `controller`.
    pub controller: Option<bool>,
}

/// What is kept of a pod's `spec` (also of a Deployment's pod template).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSpec {
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `spec.serviceAccountName`.
    pub service_account_name: Option<String>,
    /// `spec.hostNetwork`.
    pub host_network: Option<bool>,
    /// `spec.containers[*].ports`, flattened in container order.
    pub ports: Vec<ContainerPort>,
}

/// One `spec.containers[*].ports` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerPort {
    /// `name`.
    pub name: Option<String>,
    /// `containerPort`.
    pub container_port: i32,
}

/// What is kept of a pod's `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodStatus {
    /// `status.podIP`.
    pub pod_ip: Option<String>,
    /// `status.phase`, e.g. `Running`.
    pub phase: Option<String>,
    /// Whether `status.conditions` has `Ready` with status `True`.
    pub ready: bool,
}

impl Pod {
    /// `metadata.namespace`, or [`DEFAULT_NAMESPACE`](crate::DEFAULT_NAMESPACE).
    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(crate::DEFAULT_NAMESPACE)
    }
}

impl From<k8s::Pod> for Pod {
    fn from(pod: k8s::Pod) -> Self {
        let meta = pod.metadata;
        Pod {
            metadata: PodMeta {
                name: meta.name,
                namespace: meta.namespace,
                labels: meta.labels.unwrap_or_default(),
                owner_references: meta
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .map(|o| OwnerReference {
                        kind: o.kind,
                        name: o.name,
                        controller: o.controller,
                    })
                    .collect(),
            },
            spec: pod.spec.map(PodSpec::from),
            status: pod.status.map(|status| PodStatus {
                ready: status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
                pod_ip: status.pod_ip,
                phase: status.phase,
            }),
        }
    }
}

impl From<k8s::PodSpec> for PodSpec {
    fn from(spec: k8s::PodSpec) -> Self {
        PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            ports: spec
                .containers
                .into_iter()
                .flat_map(|c| c.ports.unwrap_or_default())
                .map(|p| ContainerPort {
                    name: p.name,
                    container_port: p.container_port,
                })
                .collect(),
        }
    }
}

impl From<&k8s::PodSpec> for PodSpec {
    fn from(spec: &k8s::PodSpec) -> Self {
        PodSpec {
            node_name: spec.node_name.clone(),
            service_account_name: spec.service_account_name.clone(),
            host_network: spec.host_network,
            ports: spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| ContainerPort {
                    name: p.name.clone(),
                    container_port: p.container_port,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_what_the_mesh_reads() {
        let loaded = crate::load_str(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-7d-x\n  labels: {app: web}\n  annotations: {a: b}\n  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d, uid: u, controller: true}]\nspec:\n  nodeName: node1\n  serviceAccountName: web\n  containers:\n  - {name: a, image: x, ports: [{name: http, containerPort: 8080}]}\n  - {name: b, ports: [{containerPort: 9090}]}\nstatus:\n  podIP: 10.0.0.1\n  phase: Running\n  conditions: [{type: Initialized, status: \"True\"}, {type: Ready, status: \"True\"}]\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let pod = &loaded.manifests.pods[0];
        assert_eq!(pod.namespace(), "default");
        assert_eq!(pod.metadata.labels["app"], "web");
        assert_eq!(pod.metadata.owner_references[0].name, "web-7d");
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("node1"));
        let ports: Vec<_> = spec
            .ports
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("http"), 8080), (None, 9090)]);
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert!(status.ready);
    }

    #[test]
    fn unknown_pod_fields_still_warn_and_bad_ones_still_fail() {
        let loaded = crate::load_str(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeNam: n, containers: []}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {containers: [{name: c, ports: [{containerPort: http}]}]}\n",
        );
        assert_eq!(loaded.manifests.pods.len(), 1);
        // The path is named as in errors: no marker for the `Option` that
        // k8s-openapi wraps `spec` in.
        let warning = &loaded.warnings[0].message;
        assert!(
            warning.contains("unknown field `spec.nodeNam` ignored"),
            "{warning}"
        );
        let err = loaded.errors[0].to_string();
        assert!(
            err.starts_with(
                "p.yaml: document 2 (Pod default/b): field `spec.containers[0].ports[0].containerPort`"
            ),
            "{err}"
        );
    }
}
