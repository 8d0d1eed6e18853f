//! The mesh CA shared by every control plane replica through a Secret in
//! the control plane's namespace (`--ca-secret`, the chart's
//! `istio-ca-secret`, keys `ca-cert.pem` and `ca-key.pem` as istiod's):
//! replicas must sign with one root, or a proxy that verified one replica's
//! serving certificate, or a peer's workload certificate, would reject
//! another's.
//!
//! [`sync`] runs before the CA is loaded from `--ca-dir`: a Secret that
//! exists is written into the directory; otherwise the directory's root
//! (created when absent) is stored as the Secret with `create`, and of two
//! replicas starting together the one whose create lost (409) takes the
//! winner's root instead.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};

use crate::ca::{CaError, CertificateAuthority};

/// Key of the root certificate (PEM) in the Secret.
pub const CERT_KEY: &str = "ca-cert.pem";
/// Key of the root's private key (PEM) in the Secret.
pub const KEY_KEY: &str = "ca-key.pem";
/// Name of the root certificate in `--ca-dir`.
const CERT_FILE: &str = "root-cert.pem";
/// Name of the root key in `--ca-dir`.
const KEY_FILE: &str = "root-key.pem";
/// What sharing the CA needs from RBAC, in the control plane's own
/// namespace (a Role): (apiGroup, resource, verbs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[("", "secrets", &["get", "create"])];

/// Why the CA could not be shared.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The API server refused a read or create of the Secret.
    #[error("{action} Secret {namespace}/{name}: {source}")]
    Api {
        /// `reading` or `creating`.
        action: &'static str,
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// What the API server said.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Secret lacks a key, or it is not UTF-8 PEM.
    #[error("Secret {namespace}/{name}: data.{key} is missing or not PEM text")]
    BadSecret {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// The key at fault.
        key: &'static str,
    },
    /// Reading or writing the CA directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The directory's root could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Makes `dir` hold the root of Secret `namespace`/`name`, creating the
/// Secret from `dir`'s root (made for `trust_domain` when absent) if there
/// is none yet; returns whether this replica created it.
pub async fn sync(
    client: Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
) -> Result<bool, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let failed = |action: &'static str| {
        move |source| CaSecretError::Api {
            action,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        }
    };
    if let Some(secret) = api.get_opt(name).await.map_err(failed("reading"))? {
        write_dir(&secret, namespace, name, dir)?;
        return Ok(false);
    }
    CertificateAuthority::load_or_create(dir, trust_domain)?;
    let read = |file: &str| {
        let path = dir.join(file);
        fs::read(&path).map_err(|source| CaSecretError::Io { path, source })
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "mesh-control".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_owned(), ByteString(read(CERT_FILE)?)),
            (KEY_KEY.to_owned(), ByteString(read(KEY_FILE)?)),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "stored the mesh CA for every replica");
            Ok(true)
        }
        // Another replica stored its root first: take that one.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(name).await.map_err(failed("reading"))?;
            write_dir(&secret, namespace, name, dir)?;
            Ok(false)
        }
        Err(error) => Err(failed("creating")(error)),
    }
}

/// Writes the Secret's root into `dir` (the key readable by its owner only).
fn write_dir(
    secret: &Secret,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<(), CaSecretError> {
    let value = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .filter(|v| std::str::from_utf8(&v.0).is_ok_and(|t| t.contains("-----BEGIN")))
            .map(|v| v.0.clone())
            .ok_or_else(|| CaSecretError::BadSecret {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
            })
    };
    let (cert, key) = (value(CERT_KEY)?, value(KEY_KEY)?);
    let io = |path: PathBuf| move |source| CaSecretError::Io { path, source };
    fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
    let key_path = dir.join(KEY_FILE);
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut file| file.write_all(&key))
        .map_err(io(key_path.clone()))?;
    let cert_path = dir.join(CERT_FILE);
    fs::write(&cert_path, cert).map_err(io(cert_path.clone()))?;
    Ok(())
}
