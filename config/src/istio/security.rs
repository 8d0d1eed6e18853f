//! `security.istio.io`: AuthorizationPolicy and PeerAuthentication
//! (API versions v1beta1 and v1).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::WorkloadSelector;

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to; none: the whole namespace (or mesh, in the
    /// root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Gateway/Service targets (waypoints); kept as given.
    #[serde(default)]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway/Service targets (waypoints); kept as given.
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    /// Rules; any matching one makes the policy match. An ALLOW policy
    /// without rules matches nothing (so it denies everything).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// What a match means.
    #[serde(default)]
    pub action: Option<AuthorizationAction>,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<Provider>,
}

/// Policy actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    /// Allow matching requests (the default).
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit matching requests.
    Audit,
    /// Ask an external authorizer.
    Custom,
}

/// A CUSTOM policy's provider.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Provider {
    /// Name from the mesh config.
    #[serde(default)]
    pub name: String,
}

/// One rule: every non-empty part must match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Rule {
    /// Sources; any may match.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations; any may match.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Extra conditions; all must match.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// A `from` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// A `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Who is calling.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`<trust-domain>/ns/<ns>/sa/<sa>`, `*` wildcards).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Excluded peer identities.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals (L7).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Excluded JWT principals (L7).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Excluded peer namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer addresses (IPs or CIDRs).
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Excluded peer addresses.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client addresses (L7, from headers).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Excluded original client addresses.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What is being called.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Hosts (L7).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Excluded hosts (L7).
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports (strings, as in Istio's API).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Excluded destination ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Methods (L7).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Excluded methods (L7).
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths (L7).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Excluded paths (L7).
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// A `when` condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Attribute, e.g. `request.headers[x]`.
    #[serde(default)]
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Excluded values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; none: the namespace (or mesh in the root
    /// namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode.
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per-port modes (needs a selector).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u32, Mtls>,
}

/// An mTLS setting.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Mtls {
    /// The mode.
    #[serde(default)]
    pub mode: Option<MtlsMode>,
}

/// mTLS modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    Unset,
    /// Plaintext only (not honoured by ambient ztunnels).
    Disable,
    /// Plaintext and mTLS.
    Permissive,
    /// mTLS only.
    Strict,
}
