//! The mesh root certificate as ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`), as istiod publishes it: proxies mount it to verify the
//! control plane's TLS port (15012) before they send it their tokens. The
//! control plane applies it in its own namespace (ztunnel's) and in every
//! namespace it deploys a waypoint to.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Name of the ConfigMap (Istio's).
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
/// Key of the PEM root in it.
pub const KEY: &str = "root-cert.pem";
/// Where proxies mount the ConfigMap; the root is `<MOUNT_DIR>/root-cert.pem`.
pub const MOUNT_DIR: &str = "/var/run/secrets/istio";
/// Field manager of the apply.
pub const FIELD_MANAGER: &str = "mesh-control";
/// What publishing needs from RBAC: (apiGroup, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[("", "configmaps", &["get", "create", "patch"])];
/// How long after a failed apply it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The ConfigMap holding `root_pem` in `namespace`.
pub fn config_map(namespace: &str, root_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY.to_owned(), root_pem.to_owned())])),
        ..ConfigMap::default()
    }
}

/// The API server refused the root's ConfigMap.
#[derive(Debug, thiserror::Error)]
#[error("applying ConfigMap {namespace}/{CONFIG_MAP}: {source}")]
pub struct PublishError {
    /// Namespace of the ConfigMap.
    pub namespace: String,
    /// What the API server said.
    #[source]
    pub source: Box<kube::Error>,
}

/// Server-side applies the root's ConfigMap in `namespace`.
pub async fn publish(client: &Client, namespace: &str, root_pem: &str) -> Result<(), PublishError> {
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            CONFIG_MAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map(namespace, root_pem)),
        )
        .await
        .map_err(|source| PublishError {
            namespace: namespace.to_owned(),
            source: Box::new(source),
        })?;
    Ok(())
}

/// [`publish`], retried every few seconds until it succeeds (each distinct
/// error logged once).
pub async fn publish_until_done(client: Client, namespace: String, root_pem: String) {
    let mut last_error = None;
    loop {
        match publish(&client, &namespace, &root_pem).await {
            Ok(()) => {
                tracing::info!(%namespace, config_map = CONFIG_MAP, "mesh root published");
                return;
            }
            Err(error) => {
                let message = format!("{error:#}");
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "publishing the mesh root; retrying");
                    last_error = Some(message);
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
