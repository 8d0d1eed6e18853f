//! Who is calling: every xDS stream and certificate request carries a bearer
//! token (`authorization: Bearer <token>`), mapped to the caller's node.
//!
//! The lab hands each node agent its own token through a tokens file
//! ([`TokenAuthenticator`]); on Kubernetes the same role is played by
//! service-account tokens checked with TokenReview
//! ([`token_review::TokenReviewer`]). An [`Authenticator`] holds either or
//! both. Either way the CA signs only identities of pods scheduled on the
//! caller's node, and a caller authenticated as a waypoint
//! ([`Caller::only_identity`]) only its own.

pub mod token_review;

use std::{collections::HashMap, path::Path};

use serde::Deserialize;
use tonic::{Status, metadata::MetadataMap};

use token_review::TokenReviewer;

/// How callers are authenticated: static tokens first, then TokenReview.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: Option<TokenAuthenticator>,
    review: Option<TokenReviewer>,
}

impl Authenticator {
    /// From a tokens file, TokenReview, or both.
    pub fn new(tokens: Option<TokenAuthenticator>, review: Option<TokenReviewer>) -> Self {
        Self { tokens, review }
    }

    /// Whether any caller can be authenticated at all.
    pub fn is_configured(&self) -> bool {
        self.tokens.is_some() || self.review.is_some()
    }

    /// The caller a request's metadata identifies: `Unauthenticated` when
    /// no authenticator knows the token, `Unavailable` when the API server
    /// could not be asked.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer(metadata)?;
        if let Some(caller) = self.tokens.as_ref().and_then(|t| t.lookup(token)) {
            return Ok(caller);
        }
        match &self.review {
            Some(review) => review.authenticate(token).await,
            None => Err(Status::unauthenticated("unknown bearer token")),
        }
    }
}

/// The bearer token of a request.
fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization bearer token"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization is not a bearer token"))
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node the caller runs on: the only node whose workloads it may get
    /// certificates for.
    pub node: String,
    /// When set, the only identity (`namespace`, `service account`) the
    /// caller may get a certificate for: a waypoint is its own workload, not
    /// a node agent acting for every pod of its node.
    pub only_identity: Option<(String, String)>,
}

/// The tokens file: `{"tokens": {"<token>": {"node": "<node>"}}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// Token to caller.
    pub tokens: HashMap<String, TokenEntry>,
}

/// What a token stands for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The node agent's node.
    pub node: String,
}

/// Authenticates callers by static bearer tokens.
#[derive(Debug, Default)]
pub struct TokenAuthenticator {
    tokens: HashMap<String, Caller>,
}

/// The tokens file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("tokens file {path}: {message}")]
pub struct TokensError {
    path: String,
    message: String,
}

impl TokenAuthenticator {
    /// Reads a tokens file.
    pub fn from_file(path: &Path) -> Result<Self, TokensError> {
        let err = |message: String| TokensError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: TokensFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if let Some(short) = file.tokens.keys().find(|t| t.len() < 16) {
            return Err(err(format!(
                "token for node {} is shorter than 16 characters",
                file.tokens[short].node
            )));
        }
        Ok(Self::new(file.tokens.into_iter().map(|(t, e)| (t, e.node))))
    }

    /// From `(token, node)` pairs.
    pub fn new(tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|(token, node)| {
                    (
                        token,
                        Caller {
                            node,
                            only_identity: None,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The caller a request's metadata identifies, or `Unauthenticated`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        self.lookup(bearer(metadata)?)
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }

    /// The caller `token` stands for.
    pub fn lookup(&self, token: &str) -> Option<Caller> {
        self.tokens.get(token).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_token_maps_to_its_node_and_others_are_refused() {
        let auth = TokenAuthenticator::new([("t0-0123456789abcdef".into(), "node0".into())]);
        let mut md = MetadataMap::new();
        assert_eq!(
            auth.authenticate(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(
            "authorization",
            "Bearer t0-0123456789abcdef".parse().unwrap(),
        );
        assert_eq!(auth.authenticate(&md).unwrap().node, "node0");
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(auth.authenticate(&md).is_err());
    }
}
