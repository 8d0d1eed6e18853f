//! L4 policy for ztunnels: `security.istio.io` AuthorizationPolicy and
//! PeerAuthentication translated into Istio's `istio.security.Authorization`.
//!
//! Translation follows Istio's ambient control plane:
//! - A policy is named `namespace/name`. Without a selector it is scoped to
//!   its namespace, or global in the root namespace; with a selector it is
//!   `WORKLOAD_SELECTOR`-scoped and every selected workload lists it in its
//!   `authorization_policies` (root-namespace selectors select in every
//!   namespace).
//! - Each rule becomes clauses that must all hold: one clause of the
//!   `from` sources (any matches), one of the `to` operations, one per
//!   `when` condition.
//! - Fields ztunnel cannot see at L4 (methods, paths, hosts, request
//!   principals, request headers): an ALLOW rule that needs them is dropped
//!   (allows less); a DENY rule is kept without them (denies more). Policies
//!   bound to a waypoint with `targetRef(s)` are the waypoint's, not
//!   ztunnel's; AUDIT and CUSTOM are not enforced at L4. Each such case is
//!   reported as a warning.
//! - PeerAuthentication: each workload's effective mode (workload selector,
//!   then namespace, then root namespace; default PERMISSIVE; port-level
//!   overrides) becomes, where anything is STRICT, a DENY policy
//!   `namespace/converted_peer_authentication_<name>` refusing connections
//!   without a peer identity (plaintext) on the strict ports.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use mesh_api::security::{
    self as sec, Action, Authorization, Clause, Match, Scope, StringMatch, string_match,
};
use mesh_config::{
    Manifests,
    istio::{
        AuthorizationPolicy, PeerAuthentication, WorkloadSelector,
        security::{AuthorizationAction, MtlsMode, Rule},
    },
};

/// The translated policies and which workloads they select.
#[derive(Debug, Default)]
pub struct Policies {
    /// xDS resources by name (`namespace/name`).
    pub authorizations: BTreeMap<String, Authorization>,
    selectors: Vec<Selecting>,
    peer_auth: Vec<PeerAuthView>,
    root_namespace: String,
}

/// A label-selecting policy.
#[derive(Debug)]
struct Selecting {
    key: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Debug)]
struct PeerAuthView {
    namespace: String,
    name: String,
    selector: Option<BTreeMap<String, String>>,
    mode: Option<MtlsMode>,
    ports: BTreeMap<u32, Option<MtlsMode>>,
}

impl Policies {
    /// Translates the policies of `manifests`; what cannot be enforced at
    /// L4 is appended to `warnings`.
    pub fn build(manifests: &Manifests, root_namespace: &str, warnings: &mut Vec<String>) -> Self {
        let mut policies = Policies {
            root_namespace: root_namespace.to_owned(),
            ..Default::default()
        };
        for policy in &manifests.authorization_policies {
            policies.add_authorization(policy, warnings);
        }
        policies.peer_auth = manifests
            .peer_authentications
            .iter()
            .map(PeerAuthView::new)
            .collect();
        policies
    }

    /// Names of the `WORKLOAD_SELECTOR` policies that select a workload of
    /// `namespace` with `labels`, including its converted PeerAuthentication;
    /// adds that converted policy to the set when first needed.
    pub fn for_workload(
        &mut self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let mut names: Vec<String> = self
            .selectors
            .iter()
            .filter(|s| {
                (s.namespace == namespace || s.namespace == self.root_namespace)
                    && selects(&s.labels, labels)
            })
            .map(|s| s.key.clone())
            .collect();
        if let Some((key, policy)) = self.peer_authentication_for(namespace, labels) {
            self.authorizations.entry(key.clone()).or_insert(policy);
            names.push(key);
        }
        names
    }

    fn add_authorization(&mut self, policy: &AuthorizationPolicy, warnings: &mut Vec<String>) {
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        let name = policy.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let spec = &policy.spec;
        let mut warn =
            |message: String| warnings.push(format!("AuthorizationPolicy {key}: {message}"));
        if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            // Enforced by the waypoint it targets.
            return;
        }
        let action = match spec.action.unwrap_or(AuthorizationAction::Allow) {
            AuthorizationAction::Allow => Action::Allow,
            AuthorizationAction::Deny => Action::Deny,
            other => {
                warn(format!("action {other:?} is not enforced by ztunnel"));
                return;
            }
        };
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            let (translated, l7) = translate_rule(rule);
            if !l7.is_empty() {
                let fields = l7.into_iter().collect::<Vec<_>>().join(", ");
                if action == Action::Allow {
                    warn(format!(
                        "rules[{i}] needs L7 attributes ({fields}); ztunnel drops it (allows less) — bind the service to a waypoint"
                    ));
                    continue;
                }
                warn(format!(
                    "rules[{i}]: L7 attributes ({fields}) are ignored by ztunnel, so it denies more — bind the service to a waypoint"
                ));
            }
            rules.push(translated);
        }
        let scope = match &spec.selector {
            Some(selector) => {
                self.selectors.push(Selecting {
                    key: key.clone(),
                    namespace: namespace.clone(),
                    labels: selector_labels(selector),
                });
                Scope::WorkloadSelector
            }
            None if namespace == self.root_namespace => Scope::Global,
            None => Scope::Namespace,
        };
        self.authorizations.insert(
            key,
            Authorization {
                name,
                namespace,
                scope: scope as i32,
                action: action as i32,
                rules,
                ..Default::default()
            },
        );
    }

    /// The converted DENY policy of the PeerAuthentication in force for a
    /// workload, when it makes any port STRICT.
    fn peer_authentication_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<(String, Authorization)> {
        let workload = self.peer_auth.iter().find(|pa| {
            pa.namespace == namespace && pa.selector.as_ref().is_some_and(|s| selects(s, labels))
        });
        let namespace_wide = self
            .peer_auth
            .iter()
            .find(|pa| pa.namespace == namespace && pa.selector.is_none());
        let mesh_wide = self
            .peer_auth
            .iter()
            .find(|pa| pa.namespace == self.root_namespace && pa.selector.is_none());
        let chain = [workload, namespace_wide, mesh_wide];
        let mode = chain
            .iter()
            .flatten()
            .find_map(|pa| pa.mode.filter(|m| *m != MtlsMode::Unset))
            .unwrap_or(MtlsMode::Permissive);
        let owner = chain.iter().flatten().next()?;
        let strict = mode == MtlsMode::Strict;
        // Ports whose mode differs from the workload's.
        let mut exceptions = BTreeSet::new();
        if let Some(pa) = workload {
            for (port, port_mode) in &pa.ports {
                let port_mode = port_mode.filter(|m| *m != MtlsMode::Unset).unwrap_or(mode);
                if (port_mode == MtlsMode::Strict) != strict {
                    exceptions.insert(*port);
                }
            }
        }
        if !strict && exceptions.is_empty() {
            return None;
        }
        let mut deny_plaintext = Match {
            not_principals: vec![presence()],
            ..Default::default()
        };
        if strict {
            deny_plaintext.not_destination_ports = exceptions.into_iter().collect();
        } else {
            deny_plaintext.destination_ports = exceptions.into_iter().collect();
        }
        let name = format!("converted_peer_authentication_{}", owner.name);
        let key = format!("{}/{name}", owner.namespace);
        // Keyed by the owner and, for workload-level ones, distinct per
        // owner already; namespace- and mesh-level conversions are shared.
        let key = if owner.selector.is_some() || owner.namespace == namespace {
            key
        } else {
            format!("{namespace}/{name}")
        };
        Some((
            key,
            Authorization {
                name,
                namespace: namespace.to_owned(),
                scope: Scope::WorkloadSelector as i32,
                action: Action::Deny as i32,
                rules: vec![sec::Rule {
                    clauses: vec![Clause {
                        matches: vec![deny_plaintext],
                    }],
                }],
                ..Default::default()
            },
        ))
    }
}

impl PeerAuthView {
    fn new(pa: &PeerAuthentication) -> Self {
        Self {
            namespace: pa.metadata.namespace.clone().unwrap_or_default(),
            name: pa.metadata.name.clone().unwrap_or_default(),
            selector: pa.spec.selector.as_ref().map(selector_labels),
            mode: pa.spec.mtls.as_ref().and_then(|m| m.mode),
            ports: pa
                .spec
                .port_level_mtls
                .iter()
                .map(|(port, mtls)| (*port, mtls.mode))
                .collect(),
        }
    }
}

fn selector_labels(selector: &WorkloadSelector) -> BTreeMap<String, String> {
    selector.match_labels.clone()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Translates one rule; returns it with the L7 fields it had to leave out.
fn translate_rule(rule: &Rule) -> (sec::Rule, BTreeSet<&'static str>) {
    let mut l7 = BTreeSet::new();
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let matches = rule
            .from
            .iter()
            .map(|from| {
                let s = &from.source;
                if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                    l7.insert("requestPrincipals");
                }
                Match {
                    principals: s.principals.iter().map(|p| pattern(p)).collect(),
                    not_principals: s.not_principals.iter().map(|p| pattern(p)).collect(),
                    namespaces: s.namespaces.iter().map(|p| pattern(p)).collect(),
                    not_namespaces: s.not_namespaces.iter().map(|p| pattern(p)).collect(),
                    source_ips: s
                        .ip_blocks
                        .iter()
                        .chain(&s.remote_ip_blocks)
                        .filter_map(|c| cidr(c))
                        .collect(),
                    not_source_ips: s
                        .not_ip_blocks
                        .iter()
                        .chain(&s.not_remote_ip_blocks)
                        .filter_map(|c| cidr(c))
                        .collect(),
                    ..Default::default()
                }
            })
            .collect();
        clauses.push(Clause { matches });
    }
    if !rule.to.is_empty() {
        let matches = rule
            .to
            .iter()
            .map(|to| {
                let op = &to.operation;
                for (field, list) in [
                    ("hosts", &op.hosts),
                    ("notHosts", &op.not_hosts),
                    ("methods", &op.methods),
                    ("notMethods", &op.not_methods),
                    ("paths", &op.paths),
                    ("notPaths", &op.not_paths),
                ] {
                    if !list.is_empty() {
                        l7.insert(field);
                    }
                }
                Match {
                    destination_ports: op.ports.iter().filter_map(|p| p.parse().ok()).collect(),
                    not_destination_ports: op
                        .not_ports
                        .iter()
                        .filter_map(|p| p.parse().ok())
                        .collect(),
                    ..Default::default()
                }
            })
            .collect();
        clauses.push(Clause { matches });
    }
    for condition in &rule.when {
        let values = |list: &[String]| list.to_vec();
        let (positive, negative) = (values(&condition.values), values(&condition.not_values));
        let m = match condition.key.as_str() {
            "source.ip" | "remote.ip" => Match {
                source_ips: positive.iter().filter_map(|c| cidr(c)).collect(),
                not_source_ips: negative.iter().filter_map(|c| cidr(c)).collect(),
                ..Default::default()
            },
            "source.namespace" => Match {
                namespaces: positive.iter().map(|p| pattern(p)).collect(),
                not_namespaces: negative.iter().map(|p| pattern(p)).collect(),
                ..Default::default()
            },
            "source.principal" => Match {
                principals: positive.iter().map(|p| pattern(p)).collect(),
                not_principals: negative.iter().map(|p| pattern(p)).collect(),
                ..Default::default()
            },
            "destination.ip" => Match {
                destination_ips: positive.iter().filter_map(|c| cidr(c)).collect(),
                not_destination_ips: negative.iter().filter_map(|c| cidr(c)).collect(),
                ..Default::default()
            },
            "destination.port" => Match {
                destination_ports: positive.iter().filter_map(|p| p.parse().ok()).collect(),
                not_destination_ports: negative.iter().filter_map(|p| p.parse().ok()).collect(),
                ..Default::default()
            },
            _ => {
                l7.insert("when (request attributes)");
                continue;
            }
        };
        clauses.push(Clause { matches: vec![m] });
    }
    (sec::Rule { clauses }, l7)
}

/// Istio's string patterns: `*` is presence, `*x` a suffix, `x*` a prefix.
fn pattern(value: &str) -> StringMatch {
    let match_type = if value == "*" {
        string_match::MatchType::Presence(())
    } else if let Some(suffix) = value.strip_prefix('*') {
        string_match::MatchType::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        string_match::MatchType::Prefix(prefix.to_owned())
    } else {
        string_match::MatchType::Exact(value.to_owned())
    };
    StringMatch {
        match_type: Some(match_type),
    }
}

fn presence() -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Presence(())),
    }
}

/// `10.0.0.0/8` or a bare address (a full-length prefix).
fn cidr(value: &str) -> Option<sec::Address> {
    let (addr, len) = value.split_once('/').unwrap_or((value, ""));
    let ip: IpAddr = addr.parse().ok()?;
    let (bytes, max) = match ip {
        IpAddr::V4(v4) => (v4.octets().to_vec(), 32),
        IpAddr::V6(v6) => (v6.octets().to_vec(), 128),
    };
    let length = if len.is_empty() {
        max
    } else {
        len.parse().ok().filter(|l| *l <= max)?
    };
    Some(sec::Address {
        address: bytes,
        length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str) -> (Policies, Vec<String>) {
        let loaded = mesh_config::load_str("p.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut warnings = Vec::new();
        let policies = Policies::build(&loaded.manifests, "istio-system", &mut warnings);
        (policies, warnings)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn allow_policy_with_selector_principals_and_ports() {
        let (mut policies, warnings) = build(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ratings, namespace: bk}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: ['cluster.local/ns/bk/sa/bookinfo-reviews'], namespaces: ['bk*']}}]\n    to: [{operation: {ports: ['9080']}}]\n",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let policy = &policies.authorizations["bk/ratings"];
        assert_eq!(policy.scope, Scope::WorkloadSelector as i32);
        assert_eq!(policy.rules[0].clauses.len(), 2);
        let from = &policy.rules[0].clauses[0].matches[0];
        assert_eq!(
            from.principals[0].match_type,
            Some(string_match::MatchType::Exact(
                "cluster.local/ns/bk/sa/bookinfo-reviews".into()
            ))
        );
        assert_eq!(
            from.namespaces[0].match_type,
            Some(string_match::MatchType::Prefix("bk".into()))
        );
        assert_eq!(
            policy.rules[0].clauses[1].matches[0].destination_ports,
            [9080]
        );
        assert_eq!(
            policies.for_workload("bk", &labels(&[("app", "ratings")])),
            ["bk/ratings"]
        );
        assert!(
            policies
                .for_workload("bk", &labels(&[("app", "other")]))
                .is_empty()
        );
        assert!(
            policies
                .for_workload("other", &labels(&[("app", "ratings")]))
                .is_empty()
        );
    }

    #[test]
    fn scopes_follow_selector_and_root_namespace() {
        let (policies, _) = build(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: istio-system}\nspec: {action: DENY, rules: [{}]}\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: bk}\nspec: {}\n",
        );
        assert_eq!(
            policies.authorizations["istio-system/deny-all"].scope,
            Scope::Global as i32
        );
        let nothing = &policies.authorizations["bk/allow-nothing"];
        assert_eq!(nothing.scope, Scope::Namespace as i32);
        assert_eq!(nothing.action, Action::Allow as i32);
        assert!(nothing.rules.is_empty());
    }

    #[test]
    fn l7_fields_drop_allow_rules_and_widen_deny_rules() {
        let (policies, warnings) = build(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: n}\nspec:\n  rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [x]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: n}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin], ports: ['80']}}]}]\n",
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("AuthorizationPolicy n/a: rules[0] needs L7 attributes (methods)")
        );
        assert_eq!(policies.authorizations["n/a"].rules.len(), 1);
        let deny = &policies.authorizations["n/d"];
        assert_eq!(deny.rules[0].clauses[0].matches[0].destination_ports, [80]);
    }

    #[test]
    fn waypoint_targeted_and_custom_policies_are_not_for_ztunnel() {
        let (policies, warnings) = build(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: w, namespace: n}\nspec:\n  targetRefs: [{kind: Service, group: '', name: reviews}]\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c, namespace: n}\nspec: {action: CUSTOM, provider: {name: ext}, rules: [{}]}\n",
        );
        assert!(policies.authorizations.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn peer_authentication_strict_denies_plaintext_with_port_exceptions() {
        let (mut policies, _) = build(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: legacy, namespace: bk}\nspec: {selector: {matchLabels: {app: legacy}}, mtls: {mode: UNSET}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: open, namespace: open}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        );
        let names = policies.for_workload("bk", &labels(&[("app", "web")]));
        assert_eq!(names, ["bk/converted_peer_authentication_default"]);
        let strict = &policies.authorizations[&names[0]];
        let m = &strict.rules[0].clauses[0].matches[0];
        assert_eq!(strict.action, Action::Deny as i32);
        assert_eq!(m.not_principals, [presence()]);
        assert!(m.not_destination_ports.is_empty());

        let legacy = policies.for_workload("bk", &labels(&[("app", "legacy")]));
        assert_eq!(legacy, ["bk/converted_peer_authentication_legacy"]);
        let m = &policies.authorizations[&legacy[0]].rules[0].clauses[0].matches[0];
        assert_eq!(m.not_destination_ports, [8080]);

        assert!(policies.for_workload("open", &labels(&[])).is_empty());
    }
}
