//! Kubernetes service-account tokens, checked with the API server's
//! `authentication.k8s.io/v1` TokenReview.
//!
//! A token is accepted when the API server says it is authenticated (for
//! the configured audiences), it belongs to one of the allowed service
//! accounts (the node agents', the waypoints'), and its pod's node is
//! known: from the token itself (`authentication.kubernetes.io/node-name`
//! in the review's `user.extra`, which bound tokens carry since Kubernetes
//! 1.30), else from the pod the token is bound to
//! (`authentication.kubernetes.io/pod-name`), read from the API. Answers
//! are cached for a short while, keyed by a SHA-256 of the token, so a
//! proxy's reconnects and certificate requests do not each cost a review.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tonic::Status;

use super::Caller;

/// What TokenReview needs from RBAC: (apiGroup, resource, verbs). `get`
/// on pods is for tokens that do not carry their node.
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("authentication.k8s.io", "tokenreviews", &["create"]),
    ("", "pods", &["get"]),
];

/// `user.extra` key naming the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// `user.extra` key naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key with that pod's uid.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How rejections are cached (shorter than acceptances: a token that just
/// became valid should not wait long).
const REJECTION_TTL: Duration = Duration::from_secs(5);
/// Most answers kept; past this, expired ones are dropped, then all.
const CACHE_LIMIT: usize = 10_000;

/// Which tokens are accepted, and how long answers are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenReviewOptions {
    /// Service accounts of node agents, as `<namespace>/<name>`; either
    /// part may be `*`. Their callers may get certificates for every
    /// identity running on their node.
    pub service_accounts: Vec<String>,
    /// Service accounts of waypoints (same syntax, e.g. `*/*`). Their
    /// callers may get a certificate only for their own service account
    /// ([`Caller::only_identity`]), and only when a pod on the token's node
    /// runs as it.
    pub waypoint_service_accounts: Vec<String>,
    /// Audiences the token must be valid for (empty: the API server's
    /// default audience).
    pub audiences: Vec<String>,
    /// How long an accepted token is trusted without a new review.
    pub cache_ttl: Duration,
}

impl Default for TokenReviewOptions {
    fn default() -> Self {
        Self {
            service_accounts: vec!["istio-system/ztunnel".into()],
            waypoint_service_accounts: Vec::new(),
            audiences: vec!["istio-ca".into()],
            cache_ttl: Duration::from_secs(60),
        }
    }
}

/// Authenticates bearer tokens with TokenReview.
pub struct TokenReviewer {
    client: Client,
    options: TokenReviewOptions,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Cached {
    until: Instant,
    answer: Result<Caller, String>,
}

impl TokenReviewer {
    /// Reviews tokens through `client`.
    pub fn new(client: Client, options: TokenReviewOptions) -> Self {
        Self {
            client,
            options,
            cache: Mutex::default(),
        }
    }

    /// The caller `token` stands for: `Unauthenticated` when the API server
    /// or the allowed list says no, `Unavailable` when the API server could
    /// not be asked.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = Instant::now();
        if let Some(cached) = self.lock().get(&key).filter(|c| c.until > now).cloned() {
            return cached.answer.map_err(Status::unauthenticated);
        }
        let answer = self.review(token).await?;
        if let Err(reason) = &answer {
            tracing::info!(%reason, "bearer token refused");
        }
        let ttl = if answer.is_ok() {
            self.options.cache_ttl
        } else {
            REJECTION_TTL
        };
        let mut cache = self.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                until: now + ttl,
                answer: answer.clone(),
            },
        );
        answer.map_err(Status::unauthenticated)
    }

    /// Asks the API server; `Ok(Err(reason))` is a definitive no.
    async fn review(&self, token: &str) -> Result<Result<Caller, String>, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.options.audiences.is_empty())
                    .then(|| self.options.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "TokenReview failed");
                Status::unavailable(format!("could not review the token: {err}"))
            })?;
        let status = reviewed.status.unwrap_or_default();
        let (namespace, account, node_agent) = match self.service_account(&status) {
            Ok(sa) => sa,
            Err(reason) => return Ok(Err(reason)),
        };
        let only_identity = (!node_agent).then(|| (namespace.clone(), account.clone()));
        let caller = |node: String| Caller {
            node,
            only_identity: only_identity.clone(),
        };
        let extra = |key: &str| {
            status
                .user
                .as_ref()
                .and_then(|u| u.extra.as_ref())
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .cloned()
        };
        if let Some(node) = extra(NODE_NAME_EXTRA) {
            return Ok(Ok(caller(node)));
        }
        let Some(pod_name) = extra(POD_NAME_EXTRA) else {
            return Ok(Err(format!(
                "the token of {namespace}/{account} is not bound to a pod, so its node is unknown"
            )));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = match pods.get_opt(&pod_name).await {
            Ok(Some(pod)) => pod,
            Ok(None) => {
                return Ok(Err(format!(
                    "pod {namespace}/{pod_name} of the token does not exist"
                )));
            }
            Err(err) => {
                return Err(Status::unavailable(format!(
                    "could not read pod {namespace}/{pod_name}: {err}"
                )));
            }
        };
        if let Some(uid) = extra(POD_UID_EXTRA)
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Ok(Err(format!(
                "pod {namespace}/{pod_name} is not the pod the token was issued to"
            )));
        }
        match pod.spec.and_then(|s| s.node_name) {
            Some(node) => Ok(Ok(caller(node))),
            None => Ok(Err(format!(
                "pod {namespace}/{pod_name} is not scheduled on a node"
            ))),
        }
    }

    /// The token's service account, if it is authenticated and allowed, and
    /// whether it is a node agent's (rather than a waypoint's).
    fn service_account(
        &self,
        status: &TokenReviewStatus,
    ) -> Result<(String, String, bool), String> {
        if status.authenticated != Some(true) {
            return Err(format!(
                "token not authenticated: {}",
                status.error.as_deref().unwrap_or("no reason given")
            ));
        }
        let username = status
            .user
            .as_ref()
            .and_then(|u| u.username.as_deref())
            .unwrap_or_default();
        let Some((namespace, account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(format!("{username:?} is not a service account"));
        };
        let matches = |patterns: &[String]| {
            patterns.iter().any(|pattern| {
                let (ns, name) = pattern.split_once('/').unwrap_or(("", pattern));
                (ns == "*" || ns == namespace) && (name == "*" || name == account)
            })
        };
        let node_agent = matches(&self.options.service_accounts);
        if !node_agent && !matches(&self.options.waypoint_service_accounts) {
            let allowed: Vec<&str> = self
                .options
                .service_accounts
                .iter()
                .chain(&self.options.waypoint_service_accounts)
                .map(String::as_str)
                .collect();
            return Err(format!(
                "service account {namespace}/{account} may not connect (allowed: {})",
                allowed.join(", ")
            ));
        }
        Ok((namespace.to_owned(), account.to_owned(), node_agent))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
