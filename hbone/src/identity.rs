//! SPIFFE workload identities as used by Istio.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const SCHEME: &str = "spiffe://";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// The Kubernetes namespace.
    pub namespace: String,
    /// The Kubernetes service account.
    pub service_account: String,
}

impl Identity {
    /// Builds an identity from its three parts.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Returns the SPIFFE URI (same as `to_string()`).
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a string is not a valid Istio SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    NotSpiffe(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadPath(String),
    /// One of the segments is empty or contains invalid characters.
    #[error("identity {0:?} has an empty or invalid segment")]
    BadSegment(String),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'~' | b'%')
        })
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() != 5 || parts[1] != "ns" || parts[3] != "sa" {
            return Err(IdentityError::BadPath(s.to_string()));
        }
        let (td, ns, sa) = (parts[0], parts[2], parts[4]);
        if ![td, ns, sa].iter().all(|p| valid_segment(p)) {
            return Err(IdentityError::BadSegment(s.to_string()));
        }
        Ok(Identity::new(td, ns, sa))
    }
}

/// Returns every URI SAN of a DER certificate that parses as an [`Identity`].
///
/// Returns an empty vector if the certificate cannot be parsed or carries no
/// SPIFFE URI SAN.
pub fn identities_from_der(der: &[u8]) -> Vec<Identity> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.parse::<Identity>().ok(),
            _ => None,
        })
        .collect()
}

/// Returns the first SPIFFE identity of a DER certificate, if any.
pub fn identity_from_der(der: &[u8]) -> Option<Identity> {
    identities_from_der(der).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let s = "spiffe://cluster.local/ns/default/sa/a";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "a"));
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            "http://x/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::NotSpiffe(_))
        ));
        assert!(matches!(
            "spiffe://x/ns/a".parse::<Identity>(),
            Err(IdentityError::BadPath(_))
        ));
        assert!(matches!(
            "spiffe://x/ns/a/sa/b/c".parse::<Identity>(),
            Err(IdentityError::BadPath(_))
        ));
        assert!(matches!(
            "spiffe://x/ns//sa/b".parse::<Identity>(),
            Err(IdentityError::BadSegment(_))
        ));
        assert!(matches!(
            "spiffe:///ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::BadSegment(_))
        ));
    }
}
