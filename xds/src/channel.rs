//! Channels to the control plane, plaintext (`http://`, lab and debugging
//! only) or TLS (`https://`, Istio's 15012). Over TLS the server's
//! certificate is verified against the mesh root read from a file, and
//! nothing else: no system roots, no way to skip verification.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where Istio mounts the mesh root (ConfigMap `istio-ca-root-cert`).
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";

/// Why a channel to the control plane could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not a usable URI.
    #[error("control plane address {address}: {}", chain(.source))]
    Address {
        /// Control plane address.
        address: String,
        /// Why it is unusable.
        source: tonic::transport::Error,
    },
    /// An `https://` address was given without a root certificate.
    #[error("control plane address {address} is https but no root certificate file was given")]
    NoRootCert {
        /// Control plane address.
        address: String,
    },
    /// The root certificate file could not be read or holds no
    /// certificate.
    #[error("root certificate {path} (to verify {address}): {message}")]
    RootCert {
        /// Control plane address.
        address: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Connecting failed: unreachable, or (over TLS) the server's
    /// certificate did not verify against the root.
    #[error("connecting to {address}{}: {}", verified_by(.root_cert), chain(.source))]
    Connect {
        /// Control plane address.
        address: String,
        /// The root its certificate was checked against (TLS only).
        root_cert: Option<PathBuf>,
        /// What failed.
        source: tonic::transport::Error,
    },
}

fn verified_by(root_cert: &Option<PathBuf>) -> String {
    root_cert
        .as_ref()
        .map(|path| format!(" (server certificate checked against {})", path.display()))
        .unwrap_or_default()
}

/// An error and its sources, `: `-separated (tonic's own message is only
/// "transport error"; the reason, such as an unknown issuer, is below it).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = source.source();
    }
    out
}

/// Whether `address` asks for TLS.
pub fn is_tls(address: &str) -> bool {
    address.starts_with("https://")
}

/// The root certificate to use for `address` when none was given: Istio's
/// mounted root for `https://`, none for plaintext.
pub fn default_root_cert(address: &str) -> Option<PathBuf> {
    is_tls(address).then(|| PathBuf::from(DEFAULT_ROOT_CERT))
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:15010` or `https://host:15012`.
    pub address: String,
    /// PEM file of the mesh root, required for `https://` (ignored for
    /// plaintext).
    pub root_cert: Option<PathBuf>,
}

impl Target {
    /// An endpoint for this target, with TLS set up for `https://`. The
    /// root file is read each time, so a rotated root is picked up at the
    /// next connect.
    pub fn endpoint(&self) -> Result<Endpoint, ChannelError> {
        let address = &self.address;
        let endpoint =
            Endpoint::from_shared(address.clone()).map_err(|source| ChannelError::Address {
                address: address.clone(),
                source,
            })?;
        if !is_tls(address) {
            return Ok(endpoint);
        }
        let path = self
            .root_cert
            .as_deref()
            .ok_or_else(|| ChannelError::NoRootCert {
                address: address.clone(),
            })?;
        let pem = read_root(address, path)?;
        endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .timeout(Duration::from_secs(5)),
            )
            .map_err(|source| ChannelError::Address {
                address: address.clone(),
                source,
            })
    }

    /// Connects with `configure` applied to the endpoint (timeouts,
    /// keepalives).
    pub async fn connect(
        &self,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, ChannelError> {
        configure(self.endpoint()?)
            .connect()
            .await
            .map_err(|source| ChannelError::Connect {
                address: self.address.clone(),
                root_cert: is_tls(&self.address)
                    .then(|| self.root_cert.clone())
                    .flatten(),
                source,
            })
    }
}

/// Reads the root file and checks it holds at least one certificate
/// (tonic would silently skip what does not parse).
fn read_root(address: &str, path: &Path) -> Result<Vec<u8>, ChannelError> {
    let bad = |message: String| ChannelError::RootCert {
        address: address.to_owned(),
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_readable_root() {
        let target = Target {
            address: "https://10.0.0.1:15012".into(),
            root_cert: None,
        };
        assert!(matches!(
            target.endpoint(),
            Err(ChannelError::NoRootCert { .. })
        ));
        let target = Target {
            address: "https://10.0.0.1:15012".into(),
            root_cert: Some("/nonexistent/root-cert.pem".into()),
        };
        let error = target.endpoint().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/root-cert.pem"), "{error}");
        assert!(error.contains("https://10.0.0.1:15012"), "{error}");
        let plain = Target {
            address: "http://10.0.0.1:15010".into(),
            root_cert: None,
        };
        plain.endpoint().unwrap();
        assert_eq!(
            default_root_cert("https://x:15012"),
            Some(PathBuf::from(DEFAULT_ROOT_CERT))
        );
        assert_eq!(default_root_cert("http://x:15010"), None);
    }
}
