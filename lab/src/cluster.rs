//! The lab's API server: a directory of Kubernetes YAML the control plane
//! watches, holding what a real cluster's API server would report.
//!
//! - `namespaces.yaml`, `pods.yaml`: rewritten whenever labels change or a pod
//!   goes (pods carry `spec.nodeName`, `status.podIP` and readiness, as the
//!   kubelet reports them).
//! - `services.yaml`: the manifests' Services with the `clusterIP` the lab
//!   assigned.
//! - `config/`: the Istio and Gateway API resources of the manifests, and
//!   whatever `lab apply` adds.
//!
//! Files are written to a temporary name and renamed, so the control plane
//! never reads half a file.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, Namespace, Pod, PodCondition, PodSpec, PodStatus, Service,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use serde::{Deserialize, Serialize};

use crate::{Error, LabState, Result, io_err, run_dir};

/// API groups whose resources go to the control plane as config.
const CONFIG_GROUPS: [&str; 3] = [
    "networking.istio.io/",
    "security.istio.io/",
    "gateway.networking.k8s.io/",
];

impl LabState {
    /// The directory the control plane watches.
    pub fn cluster_dir(&self) -> PathBuf {
        cluster_dir(&self.plan.name)
    }

    /// Rewrites `namespaces.yaml` and `pods.yaml` from the current state.
    pub fn write_cluster_state(&self) -> Result<()> {
        let dir = self.cluster_dir();
        let namespaces: Vec<Namespace> = self
            .plan
            .namespaces
            .iter()
            .map(|(name, labels)| Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(labels.clone()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
        write_documents(&dir.join("namespaces.yaml"), &namespaces)?;
        let pods: Vec<Pod> = self
            .plan
            .pods
            .iter()
            .map(|pod| self.pod_object(pod))
            .collect();
        write_documents(&dir.join("pods.yaml"), &pods)
    }

    fn pod_object(&self, pod: &crate::PodPlan) -> Pod {
        // Lab pods are named `<deployment>-<n>`: the owner is the deployment.
        let owner = pod
            .name
            .rsplit_once('-')
            .map(|(deployment, _)| OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: deployment.to_owned(),
                uid: format!("lab-{}-{deployment}", pod.namespace),
                controller: Some(true),
                ..Default::default()
            });
        Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                labels: Some(pod.labels.clone()),
                owner_references: owner.map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.plan.nodes[pod.node].name.clone()),
                service_account_name: Some(pod.service_account.clone()),
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(
                        pod.ports
                            .iter()
                            .map(|(port, _)| ContainerPort {
                                container_port: i32::from(*port),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(pod.ip.to_string()),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }
}

/// The cluster directory of lab `lab`.
pub fn cluster_dir(lab: &str) -> PathBuf {
    run_dir(lab).join("cluster")
}

/// Writes the manifests' Services with their assigned VIPs, and their config
/// resources, into a fresh cluster directory.
pub(crate) fn write_initial(
    state: &LabState,
    services: &[Service],
    manifest_paths: &[PathBuf],
) -> Result<()> {
    let dir = state.cluster_dir();
    fs::create_dir_all(dir.join("config"))
        .map_err(io_err(format!("creating {}", dir.display())))?;
    let vips: BTreeMap<(&str, &str), String> = state
        .plan
        .services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s.vip.to_string()))
        .collect();
    let services: Vec<Service> = services
        .iter()
        .cloned()
        .map(|mut svc| {
            let key = (
                svc.metadata.namespace.as_deref().unwrap_or_default(),
                svc.metadata.name.as_deref().unwrap_or_default(),
            );
            if let (Some(vip), Some(spec)) = (vips.get(&key), svc.spec.as_mut()) {
                spec.cluster_ip = Some(vip.clone());
                spec.cluster_ips = Some(vec![vip.clone()]);
            }
            svc
        })
        .collect();
    write_documents(&dir.join("services.yaml"), &services)?;
    for path in manifest_paths {
        apply(&state.plan.name, path)?;
    }
    state.write_cluster_state()
}

/// Copies the config resources (Istio, Gateway API, Secrets) of the manifest file or
/// directory `path` into lab `lab`'s cluster, as `kubectl apply` would.
/// Returns how many resources were applied.
pub fn apply(lab: &str, path: &Path) -> Result<usize> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(format!("reading {}", path.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", path.display())))?;
            files.push(entry.path());
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut applied = 0;
    for file in files {
        if !matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text =
            fs::read_to_string(&file).map_err(io_err(format!("reading {}", file.display())))?;
        let mut documents = Vec::new();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
            let api_version = value.get("apiVersion").and_then(|v| v.as_str());
            let kind = value.get("kind").and_then(|v| v.as_str());
            // Istio and Gateway API resources, and Secrets (gateway
            // certificates), which the lab does not deploy but serves.
            let is_config = api_version
                .is_some_and(|v| CONFIG_GROUPS.iter().any(|g| v.starts_with(g)))
                || (api_version == Some("v1") && kind == Some("Secret"));
            if is_config {
                documents.push(value);
            }
        }
        if documents.is_empty() {
            continue;
        }
        applied += documents.len();
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        write_documents(&cluster_dir(lab).join("config").join(name), &documents)?;
    }
    Ok(applied)
}

/// Removes a file applied with [`apply`] (by its file name).
pub fn unapply(lab: &str, file_name: &str) -> Result<bool> {
    let path = cluster_dir(lab).join("config").join(file_name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(io_err(format!("removing {}", path.display()))(err)),
    }
}

fn write_documents<T: Serialize>(path: &Path, documents: &[T]) -> Result<()> {
    let mut text = String::new();
    for document in documents {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(document).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    let tmp = path.with_extension("yaml.tmp");
    fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", tmp.display())))
}
