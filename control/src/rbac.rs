//! L7 authorization for waypoints: `AuthorizationPolicy` resources that
//! target a waypoint become Envoy RBAC filters in that waypoint's filter
//! chains, enforced per request (403 `RBAC: access denied`).
//!
//! Which policies a chain (one service port at one waypoint) gets follows
//! Istio's ambient mode:
//! - `targetRefs` naming the waypoint's `Gateway` (group
//!   `gateway.networking.k8s.io`) in its namespace: all its traffic;
//! - `targetRefs` naming a `Service` (core group) in the policy's namespace:
//!   that service's traffic at the waypoint it is bound to;
//! - `targetRefs` naming the `GatewayClass` `istio-waypoint` from the root
//!   namespace: every waypoint.
//!
//! Policies with a `selector`, or with neither, are ztunnel's (L4, see
//! [`crate::authz`]).
//!
//! Each policy rule becomes one Envoy policy named
//! `ns[<ns>]-policy[<name>]-rule[<i>]`: its `to` operations and destination
//! conditions are the permission, its `from` sources and source conditions
//! the principal. DENY filters come before the ALLOW filter; CUSTOM (no
//! external authorizer is configured) fails closed as DENY; AUDIT is not
//! enforced. TCP chains get the network RBAC filter: an ALLOW rule that needs
//! HTTP attributes is dropped (allows less) and a DENY rule ignores them
//! (denies more), as Istio does. There is no `RequestAuthentication` (JWT)
//! support, so requests carry no request principal: rules that require one
//! never match and `notRequestPrincipals` always does.
//!
//! The RBAC `policies` field is a protobuf map, which prost encodes in hash
//! order; [`stable_encoding`] writes one map entry per message and
//! concatenates them (protobuf merges repeated messages), so an unchanged
//! policy set always encodes to the same bytes and never triggers a push.

use std::collections::BTreeMap;

use mesh_api::envoy::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{
            Permission, Policy, Principal, Rbac,
            permission::{self, Rule as Perm},
            principal::{self, Authenticated, Identifier as Id},
            rbac,
        },
        route::v3::{HeaderMatcher, header_matcher},
    },
    extensions::filters::{
        http::rbac::v3::Rbac as HttpRbac, network::rbac::v3::Rbac as NetworkRbac,
    },
    r#type::matcher::v3::{PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher},
};
use mesh_api::envoy::google::protobuf::{Any, UInt32Value};
use mesh_config::{
    Manifests,
    istio::{
        AuthorizationPolicy,
        security::{AuthorizationAction, Condition, Operation, Rule, Source},
    },
};
use prost::{Message, Name};

use crate::waypoint::{ServiceRef, WAYPOINT_CLASS, WaypointRef};

/// The HTTP RBAC filter's name.
pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
/// The network RBAC filter's name.
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";

const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// What a policy's `targetRef(s)` entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Gateway(String),
    Service(String),
    GatewayClass(String),
}

/// A policy bound to waypoints by its targets.
#[derive(Debug)]
struct Targeted<'a> {
    policy: &'a AuthorizationPolicy,
    namespace: &'a str,
    name: &'a str,
    targets: Vec<Target>,
}

/// The waypoint-bound AuthorizationPolicies of a config.
#[derive(Debug)]
pub struct WaypointPolicies<'a> {
    policies: Vec<Targeted<'a>>,
    root_namespace: &'a str,
}

/// How a chain's traffic is seen: per request, or per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// HTTP: the RBAC HTTP filter, every attribute available.
    Http,
    /// Opaque TCP: the RBAC network filter, no request attributes.
    Tcp,
}

/// One RBAC filter of a chain: its action and named policies, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct RbacFilter {
    /// ALLOW or DENY.
    pub action: rbac::Action,
    /// Policies by name (sorted).
    pub policies: BTreeMap<String, Policy>,
}

impl<'a> WaypointPolicies<'a> {
    /// Collects the policies of `manifests` that target waypoints; targets
    /// a waypoint cannot honour are reported in `warnings`.
    pub fn new(
        manifests: &'a Manifests,
        root_namespace: &'a str,
        warnings: &mut Vec<String>,
    ) -> Self {
        let mut policies = Vec::new();
        for policy in &manifests.authorization_policies {
            let spec = &policy.spec;
            if spec.target_ref.is_none() && spec.target_refs.is_empty() {
                continue;
            }
            let namespace = policy
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(mesh_config::DEFAULT_NAMESPACE);
            let name = policy.metadata.name.as_deref().unwrap_or_default();
            let refs = spec.target_ref.iter().chain(&spec.target_refs);
            let mut targets = Vec::new();
            for (i, value) in refs.enumerate() {
                match target(value) {
                    Ok(t) => targets.push(t),
                    Err(reason) => warnings.push(format!(
                        "AuthorizationPolicy {namespace}/{name}: targetRefs[{i}]: {reason}; not enforced there"
                    )),
                }
            }
            policies.push(Targeted {
                policy,
                namespace,
                name,
                targets,
            });
        }
        Self {
            policies,
            root_namespace,
        }
    }

    /// The RBAC filters, DENY before ALLOW, of `service`'s chain at
    /// `waypoint`; empty when no policy applies.
    pub fn filters(
        &self,
        waypoint: &WaypointRef,
        service: &ServiceRef,
        layer: Layer,
        warnings: &mut Vec<String>,
    ) -> Vec<RbacFilter> {
        let mut deny = BTreeMap::new();
        let mut allow = BTreeMap::new();
        let mut any_allow = false;
        for targeted in self
            .policies
            .iter()
            .filter(|t| self.applies(t, waypoint, service))
        {
            let spec = &targeted.policy.spec;
            let key = format!("{}/{}", targeted.namespace, targeted.name);
            let (into, action) = match spec.action.unwrap_or(AuthorizationAction::Allow) {
                AuthorizationAction::Allow => {
                    any_allow = true;
                    (&mut allow, rbac::Action::Allow)
                }
                AuthorizationAction::Deny => (&mut deny, rbac::Action::Deny),
                AuthorizationAction::Custom => {
                    warnings.push(format!(
                        "AuthorizationPolicy {key}: CUSTOM needs an external authorizer, which is not supported; the requests it selects are denied"
                    ));
                    (&mut deny, rbac::Action::Deny)
                }
                AuthorizationAction::Audit => {
                    warnings.push(format!(
                        "AuthorizationPolicy {key}: AUDIT is not enforced by the waypoint"
                    ));
                    continue;
                }
            };
            for (i, rule) in spec.rules.iter().enumerate() {
                let name = format!(
                    "ns[{}]-policy[{}]-rule[{i}]",
                    targeted.namespace, targeted.name
                );
                let translated = translate(rule, layer, action);
                if !translated.unsupported.is_empty() {
                    let fields = translated.unsupported.join(", ");
                    warnings.push(match (layer, translated.policy.is_some()) {
                        (Layer::Tcp, false) => format!(
                            "AuthorizationPolicy {key}: rules[{i}] needs HTTP attributes ({fields}) that TCP port traffic of {} lacks; the rule is dropped there (allows less)",
                            service.hostname
                        ),
                        (Layer::Tcp, true) => format!(
                            "AuthorizationPolicy {key}: rules[{i}]: HTTP attributes ({fields}) are ignored for TCP port traffic of {} (denies more)",
                            service.hostname
                        ),
                        (Layer::Http, _) => format!(
                            "AuthorizationPolicy {key}: rules[{i}]: {fields} not supported; the rule allows less or denies more"
                        ),
                    });
                }
                if let Some(policy) = translated.policy {
                    into.insert(name, policy);
                }
            }
        }
        let mut filters = Vec::new();
        if !deny.is_empty() {
            filters.push(RbacFilter {
                action: rbac::Action::Deny,
                policies: deny,
            });
        }
        // An ALLOW policy, even one without rules, makes everything it
        // does not match denied.
        if any_allow {
            filters.push(RbacFilter {
                action: rbac::Action::Allow,
                policies: allow,
            });
        }
        filters
    }

    fn applies(&self, t: &Targeted<'_>, waypoint: &WaypointRef, service: &ServiceRef) -> bool {
        t.targets.iter().any(|target| match target {
            Target::Gateway(name) => t.namespace == waypoint.namespace && *name == waypoint.name,
            Target::Service(name) => t.namespace == service.namespace && *name == service.name,
            Target::GatewayClass(name) => {
                t.namespace == self.root_namespace && name == WAYPOINT_CLASS
            }
        })
    }
}

/// Parses one `targetRef(s)` entry.
fn target(value: &serde_json::Value) -> Result<Target, String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let name = field("name").to_owned();
    if name.is_empty() {
        return Err("name is required".into());
    }
    match (field("group"), field("kind")) {
        (GATEWAY_API_GROUP, "Gateway") => Ok(Target::Gateway(name)),
        (GATEWAY_API_GROUP, "GatewayClass") => Ok(Target::GatewayClass(name)),
        ("" | "core", "Service") => Ok(Target::Service(name)),
        (group, kind) => Err(format!(
            "{kind} (group `{group}`) is not a waypoint target (Gateway, GatewayClass, Service)"
        )),
    }
}

/// One translated rule.
struct Translated {
    /// None: the rule can never match here and is dropped.
    policy: Option<Policy>,
    /// Fields left out.
    unsupported: Vec<String>,
}

/// Builds one rule's policy: all its parts must match.
fn translate(rule: &Rule, layer: Layer, action: rbac::Action) -> Translated {
    let mut ctx = Ctx {
        layer,
        unsupported: Vec::new(),
    };
    let mut permissions = Vec::new();
    let mut principals = Vec::new();
    if !rule.to.is_empty() {
        let ops: Vec<Permission> = rule
            .to
            .iter()
            .map(|to| ctx.operation(&to.operation))
            .collect();
        permissions.push(or_perm(ops));
    }
    if !rule.from.is_empty() {
        let sources: Vec<Principal> = rule.from.iter().map(|f| ctx.source(&f.source)).collect();
        principals.push(or_ids(sources));
    }
    for condition in &rule.when {
        ctx.condition(condition, &mut permissions, &mut principals);
    }
    let needs_http = !ctx.unsupported.is_empty();
    let policy = (action == rbac::Action::Deny || !needs_http).then(|| Policy {
        permissions: vec![and_perm(permissions)],
        principals: vec![and_ids(principals)],
        ..Default::default()
    });
    Translated {
        policy,
        unsupported: ctx.unsupported,
    }
}

/// Translation state: the layer, and what it had to leave out (which makes
/// the part "any" — the caller drops ALLOW rules that lost something).
struct Ctx {
    layer: Layer,
    unsupported: Vec<String>,
}

impl Ctx {
    /// `Some` when HTTP attributes are available; otherwise records `field`.
    fn http<T>(&mut self, field: &str, values: &[String], build: impl FnOnce() -> T) -> Option<T> {
        if values.is_empty() {
            return None;
        }
        if self.layer == Layer::Tcp {
            self.unsupported.push(field.to_owned());
            return None;
        }
        Some(build())
    }

    fn operation(&mut self, op: &Operation) -> Permission {
        let mut all = Vec::new();
        let hosts = |list: &[String]| {
            or_perm(
                list.iter()
                    .map(|h| header_perm(":authority", host_matcher(h)))
                    .collect(),
            )
        };
        let methods = |list: &[String]| {
            or_perm(
                list.iter()
                    .map(|m| header_perm(":method", exact(m)))
                    .collect(),
            )
        };
        let paths = |list: &[String]| or_perm(list.iter().map(|p| path_perm(p)).collect());
        all.extend(self.http("hosts", &op.hosts, || hosts(&op.hosts)));
        all.extend(self.http("notHosts", &op.not_hosts, || not_perm(hosts(&op.not_hosts))));
        all.extend(self.http("methods", &op.methods, || methods(&op.methods)));
        all.extend(self.http("notMethods", &op.not_methods, || {
            not_perm(methods(&op.not_methods))
        }));
        all.extend(self.http("paths", &op.paths, || paths(&op.paths)));
        all.extend(self.http("notPaths", &op.not_paths, || not_perm(paths(&op.not_paths))));
        let ports = |list: &[String]| {
            or_perm(
                list.iter()
                    .filter_map(|p| p.parse().ok())
                    .map(|p| perm(Perm::DestinationPort(p)))
                    .collect(),
            )
        };
        if !op.ports.is_empty() {
            all.push(ports(&op.ports));
        }
        if !op.not_ports.is_empty() {
            all.push(not_perm(ports(&op.not_ports)));
        }
        and_perm(all)
    }

    fn source(&mut self, s: &Source) -> Principal {
        let mut all = Vec::new();
        let principals = |list: &[String]| {
            or_ids(
                list.iter()
                    .map(|p| authenticated(principal_matcher(p)))
                    .collect(),
            )
        };
        let namespaces = |list: &[String]| {
            or_ids(
                list.iter()
                    .map(|n| authenticated(namespace_matcher(n)))
                    .collect(),
            )
        };
        let direct = |list: &[String]| {
            or_ids(
                list.iter()
                    .filter_map(|c| cidr(c))
                    .map(|c| id(Id::DirectRemoteIp(c)))
                    .collect(),
            )
        };
        let remote = |list: &[String]| {
            or_ids(
                list.iter()
                    .filter_map(|c| cidr(c))
                    .map(|c| id(Id::RemoteIp(c)))
                    .collect(),
            )
        };
        for (list, build, negate) in [
            (
                &s.principals,
                &principals as &dyn Fn(&[String]) -> Principal,
                false,
            ),
            (&s.not_principals, &principals, true),
            (&s.namespaces, &namespaces, false),
            (&s.not_namespaces, &namespaces, true),
            (&s.ip_blocks, &direct, false),
            (&s.not_ip_blocks, &direct, true),
            (&s.remote_ip_blocks, &remote, false),
            (&s.not_remote_ip_blocks, &remote, true),
        ] {
            if !list.is_empty() {
                let p = build(list);
                all.push(if negate { not_id(p) } else { p });
            }
        }
        // No JWT authentication: there is never a request principal.
        if let Some(p) = self.http("requestPrincipals", &s.request_principals, never_id) {
            all.push(p);
        }
        self.http("notRequestPrincipals", &s.not_request_principals, || ());
        and_ids(all)
    }

    fn condition(
        &mut self,
        c: &Condition,
        permissions: &mut Vec<Permission>,
        principals: &mut Vec<Principal>,
    ) {
        let key = c.key.as_str();
        let both = |build: &dyn Fn(&str) -> Option<Principal>| {
            let mut parts = Vec::new();
            if !c.values.is_empty() {
                parts.push(or_ids(c.values.iter().filter_map(|v| build(v)).collect()));
            }
            if !c.not_values.is_empty() {
                parts.push(not_id(or_ids(
                    c.not_values.iter().filter_map(|v| build(v)).collect(),
                )));
            }
            and_ids(parts)
        };
        let both_perm = |build: &dyn Fn(&str) -> Option<Permission>| {
            let mut parts = Vec::new();
            if !c.values.is_empty() {
                parts.push(or_perm(c.values.iter().filter_map(|v| build(v)).collect()));
            }
            if !c.not_values.is_empty() {
                parts.push(not_perm(or_perm(
                    c.not_values.iter().filter_map(|v| build(v)).collect(),
                )));
            }
            and_perm(parts)
        };
        let all_values: Vec<String> = c.values.iter().chain(&c.not_values).cloned().collect();
        match key {
            "source.ip" => principals.push(both(&|v| cidr(v).map(|c| id(Id::DirectRemoteIp(c))))),
            "remote.ip" => principals.push(both(&|v| cidr(v).map(|c| id(Id::RemoteIp(c))))),
            "source.namespace" => {
                principals.push(both(&|v| Some(authenticated(namespace_matcher(v)))));
            }
            "source.principal" => {
                principals.push(both(&|v| Some(authenticated(principal_matcher(v)))));
            }
            "destination.ip" => {
                permissions.push(both_perm(&|v| {
                    cidr(v).map(|c| perm(Perm::DestinationIp(c)))
                }));
            }
            "destination.port" => permissions.push(both_perm(&|v| {
                v.parse().ok().map(|p| perm(Perm::DestinationPort(p)))
            })),
            "connection.sni" => permissions.push(both_perm(&|v| {
                Some(perm(Perm::RequestedServerName(string_pattern(v, false))))
            })),
            _ => {
                if let Some(header) = key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    if let Some(p) = self.http(key, &all_values, || {
                        both(&|v| {
                            Some(id(Id::Header(header_matcher(
                                header,
                                string_pattern(v, false),
                            ))))
                        })
                    }) {
                        principals.push(p);
                    }
                } else if key.starts_with("request.auth.") {
                    // No JWT: a required claim is never present, an
                    // excluded one never either.
                    if let Some(p) = self.http(key, &c.values, never_id) {
                        principals.push(p);
                    }
                } else {
                    self.unsupported.push(format!("when key {key}"));
                }
            }
        }
    }
}

/// An RBAC filter's `typed_config` for `layer`, encoded stably (see the
/// module docs).
pub fn typed_config(filter: &RbacFilter, layer: Layer, stat_prefix: &str) -> Any {
    let wrap = |policies: std::collections::HashMap<String, Policy>| {
        let rules = Some(Rbac {
            action: filter.action as i32,
            policies,
            ..Default::default()
        });
        match layer {
            Layer::Http => HttpRbac {
                rules,
                ..Default::default()
            }
            .encode_to_vec(),
            Layer::Tcp => NetworkRbac {
                rules,
                stat_prefix: stat_prefix.to_owned(),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    };
    let value = stable_encoding(&filter.policies, wrap);
    Any {
        type_url: match layer {
            Layer::Http => HttpRbac::type_url(),
            Layer::Tcp => NetworkRbac::type_url(),
        },
        value,
    }
}

/// One message per map entry, concatenated in key order: decoders merge
/// them into one map, and the bytes do not depend on hash order.
fn stable_encoding(
    policies: &BTreeMap<String, Policy>,
    wrap: impl Fn(std::collections::HashMap<String, Policy>) -> Vec<u8>,
) -> Vec<u8> {
    if policies.is_empty() {
        return wrap(Default::default());
    }
    policies
        .iter()
        .flat_map(|(name, policy)| wrap([(name.clone(), policy.clone())].into()))
        .collect()
}

fn perm(rule: Perm) -> Permission {
    Permission { rule: Some(rule) }
}

fn id(identifier: Id) -> Principal {
    Principal {
        identifier: Some(identifier),
    }
}

fn and_perm(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => perm(Perm::Any(true)),
        1 => rules.remove(0),
        _ => perm(Perm::AndRules(permission::Set { rules })),
    }
}

fn or_perm(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        1 => rules.remove(0),
        // An empty OR matches nothing.
        _ => perm(Perm::OrRules(permission::Set { rules })),
    }
}

fn not_perm(rule: Permission) -> Permission {
    perm(Perm::NotRule(Box::new(rule)))
}

fn and_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => id(Id::Any(true)),
        1 => ids.remove(0),
        _ => id(Id::AndIds(principal::Set { ids })),
    }
}

fn or_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.remove(0),
        _ => id(Id::OrIds(principal::Set { ids })),
    }
}

fn not_id(p: Principal) -> Principal {
    id(Id::NotId(Box::new(p)))
}

/// A principal nothing matches.
fn never_id() -> Principal {
    not_id(id(Id::Any(true)))
}

fn authenticated(name: StringMatcher) -> Principal {
    id(Id::Authenticated(Authenticated {
        principal_name: Some(name),
    }))
}

fn header_perm(name: &str, value: StringMatcher) -> Permission {
    perm(Perm::Header(header_matcher(name, value)))
}

fn header_matcher(name: &str, value: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(value)),
        ..Default::default()
    }
}

fn path_perm(pattern: &str) -> Permission {
    let matcher = if pattern.contains("{*}") || pattern.contains("{**}") {
        // Istio's path templates: `{*}` one segment, `{**}` any rest.
        let regex = regex::escape(pattern)
            .replace(r"\{\*\*\}", ".*")
            .replace(r"\{\*\}", "[^/]+");
        regex_matcher(&regex)
    } else {
        string_pattern(pattern, false)
    };
    perm(Perm::UrlPath(PathMatcher {
        rule: Some(path_matcher::Rule::Path(matcher)),
    }))
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_owned())),
        ..Default::default()
    }
}

fn regex_matcher(regex: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: regex.to_owned(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Istio's string patterns: `*` any non-empty value, `*x` a suffix, `x*` a
/// prefix, otherwise exact.
fn string_pattern(value: &str, ignore_case: bool) -> StringMatcher {
    use string_matcher::MatchPattern;
    let pattern = if value == "*" {
        MatchPattern::SafeRegex(RegexMatcher {
            regex: ".+".to_owned(),
            ..Default::default()
        })
    } else if let Some(suffix) = value.strip_prefix('*') {
        MatchPattern::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        MatchPattern::Prefix(prefix.to_owned())
    } else {
        MatchPattern::Exact(value.to_owned())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

/// A peer identity pattern (`<td>/ns/<ns>/sa/<sa>`, Istio wildcards)
/// against the SPIFFE URI.
fn principal_matcher(pattern: &str) -> StringMatcher {
    if pattern == "*" {
        return string_pattern("spiffe://*", false);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return string_pattern(&format!("*{suffix}"), false);
    }
    string_pattern(&format!("spiffe://{pattern}"), false)
}

/// A namespace pattern against the SPIFFE URI's `ns` segment.
fn namespace_matcher(pattern: &str) -> StringMatcher {
    let segment = if pattern == "*" {
        "[^/]+".to_owned()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        format!("[^/]*{}", regex::escape(suffix))
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        format!("{}[^/]*", regex::escape(prefix))
    } else {
        regex::escape(pattern)
    };
    regex_matcher(&format!("spiffe://[^/]+/ns/{segment}/sa/[^/]+"))
}

/// A host pattern against `:authority`, case-insensitive, with or without
/// a port.
fn host_matcher(pattern: &str) -> StringMatcher {
    let host = if pattern == "*" {
        ".+".to_owned()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        format!(".*{}", regex::escape(suffix))
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        format!("{}.*", regex::escape(prefix))
    } else {
        regex::escape(pattern)
    };
    let port = if pattern.contains(':') {
        ""
    } else {
        "(:[0-9]+)?"
    };
    regex_matcher(&format!("(?i){host}{port}"))
}

/// `10.0.0.0/8` or a bare address.
fn cidr(value: &str) -> Option<CidrRange> {
    let (addr, len) = value.split_once('/').unwrap_or((value, ""));
    let ip: std::net::IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = if len.is_empty() {
        max
    } else {
        len.parse().ok().filter(|l| *l <= max)?
    };
    Some(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: length }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waypoint::Protocol;

    fn setup(yaml: &str) -> (Manifests, WaypointRef, ServiceRef) {
        let loaded = mesh_config::load_str("t.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let waypoint = WaypointRef {
            namespace: "bk".into(),
            name: "waypoint".into(),
            hostname: "waypoint.bk.svc.cluster.local".into(),
        };
        let service = ServiceRef {
            namespace: "bk".into(),
            name: "reviews".into(),
            hostname: "reviews.bk.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![(9080, Protocol::Http1)],
            labels: Default::default(),
        };
        (loaded.manifests, waypoint, service)
    }

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: bk}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bk/sa/productpage"]}}]
    to: [{operation: {methods: [GET], paths: ["/reviews/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: bk}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other, namespace: bk}
spec:
  targetRefs: [{kind: Service, group: "", name: ratings}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector, namespace: bk}
spec:
  selector: {matchLabels: {app: reviews}}
"#;

    #[test]
    fn targeted_policies_become_deny_then_allow_filters() {
        let (manifests, waypoint, service) = setup(POLICIES);
        let mut warnings = Vec::new();
        let policies = WaypointPolicies::new(&manifests, "istio-system", &mut warnings);
        let filters = policies.filters(&waypoint, &service, Layer::Http, &mut warnings);
        assert!(warnings.is_empty(), "{warnings:?}");
        let actions: Vec<_> = filters.iter().map(|f| f.action).collect();
        assert_eq!(actions, [rbac::Action::Deny, rbac::Action::Allow]);
        assert_eq!(
            filters[0].policies.keys().collect::<Vec<_>>(),
            ["ns[bk]-policy[no-admin]-rule[0]"]
        );
        assert_eq!(
            filters[1].policies.keys().collect::<Vec<_>>(),
            ["ns[bk]-policy[get-only]-rule[0]"]
        );
        let allow = &filters[1].policies["ns[bk]-policy[get-only]-rule[0]"];
        let Some(Id::Authenticated(a)) = &allow.principals[0].identifier else {
            panic!("{allow:?}");
        };
        assert_eq!(
            a.principal_name.as_ref().unwrap().match_pattern,
            Some(string_matcher::MatchPattern::Exact(
                "spiffe://cluster.local/ns/bk/sa/productpage".into()
            ))
        );
    }

    #[test]
    fn tcp_chains_drop_http_allow_rules_and_widen_deny_rules() {
        let (manifests, waypoint, service) = setup(POLICIES);
        let mut warnings = Vec::new();
        let policies = WaypointPolicies::new(&manifests, "istio-system", &mut warnings);
        let filters = policies.filters(&waypoint, &service, Layer::Tcp, &mut warnings);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        // DENY kept with its HTTP parts ignored: it denies everything.
        let deny = &filters[0].policies["ns[bk]-policy[no-admin]-rule[0]"];
        assert_eq!(deny.permissions[0].rule, Some(Perm::Any(true)));
        // ALLOW stays (the policy exists) but has no rule left: deny all.
        assert_eq!(filters[1].action, rbac::Action::Allow);
        assert!(filters[1].policies.is_empty());
    }

    #[test]
    fn stable_encoding_is_independent_of_hash_order_and_decodes_whole() {
        let policy = |port| Policy {
            permissions: vec![perm(Perm::DestinationPort(port))],
            principals: vec![id(Id::Any(true))],
            ..Default::default()
        };
        let filter = RbacFilter {
            action: rbac::Action::Deny,
            policies: (0..20).map(|i| (format!("p{i}"), policy(i))).collect(),
        };
        let first = typed_config(&filter, Layer::Http, "s");
        for _ in 0..5 {
            assert_eq!(typed_config(&filter, Layer::Http, "s"), first);
        }
        let decoded = HttpRbac::decode(first.value.as_slice()).unwrap();
        let rules = decoded.rules.unwrap();
        assert_eq!(rules.action, rbac::Action::Deny as i32);
        assert_eq!(rules.policies.len(), 20);
        assert_eq!(rules.policies["p7"], policy(7));
    }

    #[test]
    fn patterns_follow_istio() {
        use string_matcher::MatchPattern as P;
        assert_eq!(
            principal_matcher("*").match_pattern,
            Some(P::Prefix("spiffe://".into()))
        );
        assert_eq!(
            principal_matcher("*/sa/admin").match_pattern,
            Some(P::Suffix("/sa/admin".into()))
        );
        let Some(P::SafeRegex(r)) = namespace_matcher("bk").match_pattern else {
            panic!()
        };
        assert_eq!(r.regex, "spiffe://[^/]+/ns/bk/sa/[^/]+");
        let Some(P::SafeRegex(r)) = host_matcher("*.example.com").match_pattern else {
            panic!()
        };
        assert_eq!(r.regex, r"(?i).*\.example\.com(:[0-9]+)?");
        let Some(Perm::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })) = path_perm("/api/{*}/items/{**}").rule
        else {
            panic!()
        };
        assert_eq!(
            m.match_pattern,
            Some(P::SafeRegex(RegexMatcher {
                regex: "/api/[^/]+/items/.*".into(),
                ..Default::default()
            }))
        );
    }
}
