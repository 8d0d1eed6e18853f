//! L4 authorization: Istio's `istio.security.Authorization` policies,
//! learned over xDS, evaluated for every inbound connection.
//!
//! Semantics follow Istio: a connection is denied if any applicable DENY
//! policy matches; otherwise, if any ALLOW policy applies, one of them must
//! match; with no ALLOW policy it is allowed. A policy applies to a workload
//! when it is global (root namespace), scoped to the workload's namespace, or
//! names the workload through the workload's `authorization_policies`.
//! Within a policy: any rule; within a rule: every clause; within a clause:
//! any match; within a match: every non-empty field, and no `not_*` field.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use mesh_api::{
    security::{Action, Address, Authorization, Match, Scope, StringMatch, string_match},
    type_url,
};
use prost::Message;

/// Who is connecting to what.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The peer's SPIFFE identity (`spiffe://td/ns/x/sa/y`), if it
    /// authenticated with mTLS.
    pub source_identity: Option<&'a str>,
    /// The peer's address.
    pub source_ip: IpAddr,
    /// The destination address.
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
}

/// What a decision is based on, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed (no policy, or an ALLOW policy matched).
    Allow,
    /// Denied by this DENY policy (`namespace/name`).
    DeniedBy(String),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::DeniedBy(policy) => write!(f, "denied by DENY policy {policy}"),
            Decision::NotAllowed => f.write_str("denied: no ALLOW policy matched"),
        }
    }
}

/// The destination workload as policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Policies that select it by label (`namespace/name`), from its xDS
    /// workload entry.
    pub selected_by: &'a [String],
}

/// The policies this ztunnel holds.
#[derive(Debug, Default)]
pub struct PolicyStore {
    policies: RwLock<HashMap<String, Arc<Authorization>>>,
    /// The root namespace: policies there without a selector are global.
    root_namespace: String,
}

impl PolicyStore {
    /// An empty store; `root_namespace` is usually `istio-system`.
    pub fn new(root_namespace: &str) -> Self {
        Self {
            policies: RwLock::default(),
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// Decides `connection` to `target`.
    pub fn check(&self, target: Target<'_>, connection: &Connection<'_>) -> Decision {
        let policies = self.policies.read().unwrap_or_else(|e| e.into_inner());
        let applicable: Vec<&Arc<Authorization>> = policies
            .iter()
            .filter(|(key, policy)| self.applies(key, policy, target))
            .map(|(_, policy)| policy)
            .filter(|policy| !policy.dry_run)
            .collect();
        for policy in &applicable {
            if policy.action == Action::Deny as i32 && matches_policy(policy, connection) {
                return Decision::DeniedBy(format!("{}/{}", policy.namespace, policy.name));
            }
        }
        let allows: Vec<_> = applicable
            .iter()
            .filter(|p| p.action == Action::Allow as i32)
            .collect();
        if allows.is_empty() || allows.iter().any(|p| matches_policy(p, connection)) {
            Decision::Allow
        } else {
            Decision::NotAllowed
        }
    }

    fn applies(&self, key: &str, policy: &Authorization, target: Target<'_>) -> bool {
        match Scope::try_from(policy.scope) {
            Ok(Scope::Global) => true,
            Ok(Scope::Namespace) => {
                policy.namespace == target.namespace || policy.namespace == self.root_namespace
            }
            Ok(Scope::WorkloadSelector) => target.selected_by.iter().any(|k| k == key),
            Err(_) => false,
        }
    }

    /// Applies one xDS update of the authorization type.
    pub fn apply(&self, update: mesh_xds::Update) -> Result<(), mesh_xds::Rejected> {
        debug_assert_eq!(update.type_url, type_url::AUTHORIZATION);
        let mut rejected = Vec::new();
        let mut policies = self.policies.write().unwrap_or_else(|e| e.into_inner());
        for name in update.removed {
            policies.remove(&name);
        }
        for resource in update.resources {
            match Authorization::decode(&resource.value[..]) {
                Ok(policy) => match validate(&policy) {
                    Ok(()) => {
                        policies.insert(resource.name, Arc::new(policy));
                    }
                    Err(reason) => rejected.push((resource.name, reason)),
                },
                Err(err) => rejected.push((
                    resource.name,
                    format!("not an istio.security.Authorization: {err}"),
                )),
            }
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(mesh_xds::Rejected(rejected))
        }
    }

    /// Every policy held, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let policies = self.policies.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = policies.keys().collect();
        names.sort();
        serde_json::Value::Array(
            names
                .into_iter()
                .map(|name| {
                    let p = &policies[name];
                    serde_json::json!({
                        "name": name,
                        "action": Action::try_from(p.action).map_or("?", |a| a.as_str_name()),
                        "scope": Scope::try_from(p.scope).map_or("?", |s| s.as_str_name()),
                        "rules": p.rules.len(),
                    })
                })
                .collect(),
        )
    }
}

/// Refuses what this ztunnel could only honour wrongly.
fn validate(policy: &Authorization) -> Result<(), String> {
    Action::try_from(policy.action).map_err(|_| format!("unknown action {}", policy.action))?;
    Scope::try_from(policy.scope).map_err(|_| format!("unknown scope {}", policy.scope))?;
    for rule in &policy.rules {
        for clause in &rule.clauses {
            for m in &clause.matches {
                for address in m
                    .source_ips
                    .iter()
                    .chain(&m.not_source_ips)
                    .chain(&m.destination_ips)
                    .chain(&m.not_destination_ips)
                {
                    let max = match address.address.len() {
                        4 => 32,
                        16 => 128,
                        n => return Err(format!("address of {n} bytes")),
                    };
                    if address.length > max {
                        return Err(format!("prefix length {} > {max}", address.length));
                    }
                }
                if !m.extensions.is_empty() {
                    return Err("match extensions are not supported".into());
                }
            }
        }
    }
    if !policy.extensions.is_empty() {
        return Err("policy extensions are not supported".into());
    }
    Ok(())
}

fn matches_policy(policy: &Authorization, connection: &Connection<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        rule.clauses
            .iter()
            .all(|clause| clause.matches.iter().any(|m| matches_one(m, connection)))
    })
}

fn matches_one(m: &Match, c: &Connection<'_>) -> bool {
    // Principals are compared without the `spiffe://` scheme, as Istio writes them.
    let principal = c
        .source_identity
        .map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
    let namespace = principal.and_then(|p| {
        let mut parts = p.split('/');
        parts.find(|s| *s == "ns").and_then(|_| parts.next())
    });
    let service_account = principal.and_then(|p| p.rsplit_once("/sa/").map(|(_, sa)| sa));

    let strings =
        |list: &[StringMatch], value: Option<&str>| list.iter().any(|s| string_matches(s, value));
    let accounts = |list: &[mesh_api::security::ServiceAccountMatch]| {
        list.iter().any(|a| {
            namespace == Some(a.namespace.as_str())
                && service_account == Some(a.service_account.as_str())
        })
    };
    let ips = |list: &[Address], ip: IpAddr| list.iter().any(|a| cidr_contains(a, ip));
    let ports = |list: &[u32], port: u16| list.contains(&u32::from(port));

    (m.namespaces.is_empty() || strings(&m.namespaces, namespace))
        && !strings(&m.not_namespaces, namespace)
        && (m.principals.is_empty() || strings(&m.principals, principal))
        && !strings(&m.not_principals, principal)
        && (m.service_accounts.is_empty() || accounts(&m.service_accounts))
        && !accounts(&m.not_service_accounts)
        && (m.source_ips.is_empty() || ips(&m.source_ips, c.source_ip))
        && !ips(&m.not_source_ips, c.source_ip)
        && (m.destination_ips.is_empty() || ips(&m.destination_ips, c.destination_ip))
        && !ips(&m.not_destination_ips, c.destination_ip)
        && (m.destination_ports.is_empty() || ports(&m.destination_ports, c.destination_port))
        && !ports(&m.not_destination_ports, c.destination_port)
}

fn string_matches(m: &StringMatch, value: Option<&str>) -> bool {
    match (&m.match_type, value) {
        (Some(string_match::MatchType::Presence(_)), v) => v.is_some_and(|v| !v.is_empty()),
        (_, None) => false,
        (Some(string_match::MatchType::Exact(e)), Some(v)) => v == e,
        (Some(string_match::MatchType::Prefix(p)), Some(v)) => v.starts_with(p.as_str()),
        (Some(string_match::MatchType::Suffix(s)), Some(v)) => v.ends_with(s.as_str()),
        (None, _) => false,
    }
}

fn cidr_contains(cidr: &Address, ip: IpAddr) -> bool {
    fn prefix_match(net: u128, addr: u128, width: u32, length: u32) -> bool {
        let length = length.min(width);
        if length == 0 {
            return true;
        }
        let shift = 128 - length;
        (net >> shift) == (addr >> shift)
    }
    match (cidr.address.as_slice(), ip) {
        (&[a, b, c, d], IpAddr::V4(v4)) => {
            let net = u128::from(u32::from_be_bytes([a, b, c, d])) << 96;
            prefix_match(net, u128::from(u32::from(v4)) << 96, 32, cidr.length)
        }
        (bytes, IpAddr::V6(v6)) if bytes.len() == 16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            prefix_match(
                u128::from_be_bytes(octets),
                u128::from(v6),
                128,
                cidr.length,
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::security::{Clause, Rule, ServiceAccountMatch};

    use super::*;

    fn policy(
        ns: &str,
        name: &str,
        action: Action,
        scope: Scope,
        matches: Vec<Match>,
    ) -> mesh_xds::Resource {
        let p = Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: action as i32,
            rules: if matches.is_empty() {
                vec![]
            } else {
                vec![Rule {
                    clauses: vec![Clause { matches }],
                }]
            },
            ..Default::default()
        };
        mesh_xds::Resource {
            name: format!("{ns}/{name}"),
            value: p.encode_to_vec().into(),
        }
    }

    fn store(resources: Vec<mesh_xds::Resource>) -> PolicyStore {
        let store = PolicyStore::new("istio-system");
        store
            .apply(mesh_xds::Update {
                type_url: type_url::AUTHORIZATION.into(),
                resources,
                removed: vec![],
            })
            .unwrap();
        store
    }

    fn conn(identity: Option<&str>, port: u16) -> Connection<'_> {
        Connection {
            source_identity: identity,
            source_ip: "10.244.0.10".parse().unwrap(),
            destination_ip: "10.244.1.10".parse().unwrap(),
            destination_port: port,
        }
    }

    const TARGET: Target<'static> = Target {
        namespace: "shop",
        selected_by: &[],
    };

    #[test]
    fn no_policy_allows_and_allow_policies_must_match() {
        assert_eq!(
            store(vec![]).check(TARGET, &conn(None, 80)),
            Decision::Allow
        );
        let allow_web = Match {
            service_accounts: vec![ServiceAccountMatch {
                namespace: "shop".into(),
                service_account: "web".into(),
            }],
            destination_ports: vec![80],
            ..Default::default()
        };
        let s = store(vec![policy(
            "shop",
            "only-web",
            Action::Allow,
            Scope::Namespace,
            vec![allow_web],
        )]);
        assert_eq!(
            s.check(
                TARGET,
                &conn(Some("spiffe://cluster.local/ns/shop/sa/web"), 80)
            ),
            Decision::Allow
        );
        assert_eq!(
            s.check(
                TARGET,
                &conn(Some("spiffe://cluster.local/ns/shop/sa/web"), 81)
            ),
            Decision::NotAllowed
        );
        assert_eq!(
            s.check(
                TARGET,
                &conn(Some("spiffe://cluster.local/ns/shop/sa/db"), 80)
            ),
            Decision::NotAllowed
        );
        assert_eq!(s.check(TARGET, &conn(None, 80)), Decision::NotAllowed);
        // Another namespace is not affected.
        let other = Target {
            namespace: "other",
            selected_by: &[],
        };
        assert_eq!(s.check(other, &conn(None, 80)), Decision::Allow);
    }

    #[test]
    fn deny_wins_and_strict_is_a_deny_without_principal() {
        let strict = Match {
            not_principals: vec![StringMatch {
                match_type: Some(string_match::MatchType::Presence(())),
            }],
            ..Default::default()
        };
        let s = store(vec![
            policy(
                "istio-system",
                "strict",
                Action::Deny,
                Scope::Global,
                vec![strict],
            ),
            policy(
                "shop",
                "allow-all",
                Action::Allow,
                Scope::Namespace,
                vec![Match::default()],
            ),
        ]);
        assert_eq!(
            s.check(TARGET, &conn(None, 80)),
            Decision::DeniedBy("istio-system/strict".into())
        );
        assert_eq!(
            s.check(TARGET, &conn(Some("spiffe://cluster.local/ns/a/sa/b"), 80)),
            Decision::Allow
        );
    }

    #[test]
    fn allow_without_rules_denies_everything_and_selectors_need_the_workload() {
        let s = store(vec![policy(
            "shop",
            "nothing",
            Action::Allow,
            Scope::WorkloadSelector,
            vec![],
        )]);
        assert_eq!(
            s.check(TARGET, &conn(None, 80)),
            Decision::Allow,
            "not selected"
        );
        let selected = ["shop/nothing".to_owned()];
        let target = Target {
            namespace: "shop",
            selected_by: &selected,
        };
        assert_eq!(
            s.check(
                target,
                &conn(Some("spiffe://cluster.local/ns/shop/sa/web"), 80)
            ),
            Decision::NotAllowed
        );
    }

    #[test]
    fn ip_blocks_and_principal_prefixes() {
        let m = Match {
            source_ips: vec![Address {
                address: vec![10, 244, 0, 0],
                length: 16,
            }],
            principals: vec![StringMatch {
                match_type: Some(string_match::MatchType::Prefix(
                    "cluster.local/ns/shop/".into(),
                )),
            }],
            ..Default::default()
        };
        let s = store(vec![policy(
            "shop",
            "p",
            Action::Allow,
            Scope::Namespace,
            vec![m],
        )]);
        assert_eq!(
            s.check(
                TARGET,
                &conn(Some("spiffe://cluster.local/ns/shop/sa/x"), 1)
            ),
            Decision::Allow
        );
        let mut c = conn(Some("spiffe://cluster.local/ns/shop/sa/x"), 1);
        c.source_ip = "10.9.0.1".parse().unwrap();
        assert_eq!(s.check(TARGET, &c), Decision::NotAllowed);
    }

    #[test]
    fn garbage_and_unsupported_policies_are_rejected_alone() {
        let store = PolicyStore::new("istio-system");
        let bad = mesh_xds::Resource {
            name: "x/bad".into(),
            value: vec![0xff].into(),
        };
        let mut ext = Authorization {
            name: "ext".into(),
            namespace: "x".into(),
            ..Default::default()
        };
        ext.extensions.push(mesh_api::workload::Extension {
            name: "e".into(),
            config: None,
        });
        let ext = mesh_xds::Resource {
            name: "x/ext".into(),
            value: ext.encode_to_vec().into(),
        };
        let good = policy(
            "x",
            "good",
            Action::Deny,
            Scope::Namespace,
            vec![Match::default()],
        );
        let rejected = store
            .apply(mesh_xds::Update {
                type_url: type_url::AUTHORIZATION.into(),
                resources: vec![bad, ext, good],
                removed: vec![],
            })
            .unwrap_err();
        let names: Vec<&str> = rejected.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x/bad", "x/ext"]);
        assert_eq!(store.dump().as_array().unwrap().len(), 1);
    }
}
