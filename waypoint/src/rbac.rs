//! Envoy RBAC, compiled: the authorization a filter chain's RBAC filters
//! (HTTP or network) ask for, checked per request or per connection.
//!
//! Filters run in their listed order: a DENY filter denies when any of its
//! policies matches, an ALLOW filter denies when none does. A policy matches
//! when any of its permissions and any of its principals match. Matchers the
//! waypoint cannot evaluate are refused at compile time (the resource is
//! NACKed), never skipped.

use std::net::{IpAddr, SocketAddr};

use http::request::Parts;
use mesh_api::envoy::envoy::{
    config::{
        core::v3::CidrRange,
        rbac::v3::{
            Permission, Principal, Rbac, permission::Rule as Perm, principal::Identifier as Id,
            rbac::Action,
        },
    },
    r#type::matcher::v3::path_matcher,
};

use crate::route::{HeaderMatch, StrMatch};

/// The body Envoy answers a denied request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// A chain's compiled RBAC filters, in order.
#[derive(Debug, Default)]
pub struct Authorizer {
    engines: Vec<Engine>,
}

#[derive(Debug)]
struct Engine {
    deny_on_match: bool,
    /// By name, in name order (Envoy's evaluation order).
    policies: Vec<(String, CompiledPolicy)>,
}

#[derive(Debug)]
struct CompiledPolicy {
    permissions: Vec<Permit>,
    principals: Vec<Who>,
}

#[derive(Debug)]
enum Permit {
    Any,
    And(Vec<Permit>),
    Or(Vec<Permit>),
    Not(Box<Permit>),
    Header(HeaderMatch),
    Path(StrMatch),
    DestinationIp(Cidr),
    DestinationPort(u16),
    DestinationPorts(i64, i64),
    /// Tunnels to the waypoint carry no SNI: matched against "".
    ServerName(StrMatch),
}

#[derive(Debug)]
enum Who {
    Any,
    And(Vec<Who>),
    Or(Vec<Who>),
    Not(Box<Who>),
    Authenticated(Option<StrMatch>),
    SourceIp(Cidr),
    Header(HeaderMatch),
    Path(StrMatch),
}

/// An address range: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cidr {
    ip: IpAddr,
    len: u32,
}

/// What is asking: the caller, the service address and, for HTTP, the
/// request.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The caller's SPIFFE identity (empty for none).
    pub principal: &'a str,
    /// The original client address.
    pub source: IpAddr,
    /// The service address the tunnel was for.
    pub destination: SocketAddr,
    /// The request, on HTTP chains.
    pub request: Option<&'a Parts>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it; the DENY policy that matched, if that was the reason.
    Deny(Option<String>),
}

impl Authorizer {
    /// Adds one RBAC filter's rules (in chain order). `at` prefixes errors.
    pub fn push(&mut self, rules: Option<&Rbac>, at: &str) -> Result<(), String> {
        let Some(rules) = rules else {
            // A filter without rules is a pass-through.
            return Ok(());
        };
        let deny_on_match = match Action::try_from(rules.action) {
            Ok(Action::Allow) => false,
            Ok(Action::Deny) => true,
            Ok(Action::Log) => return Ok(()),
            Err(_) => return Err(format!("{at}.rules.action: unknown {}", rules.action)),
        };
        let mut policies = rules
            .policies
            .iter()
            .map(|(name, policy)| {
                let at = format!("{at}.rules.policies[{name}]");
                if policy.condition.is_some() || policy.checked_condition.is_some() {
                    return Err(format!("{at}: CEL conditions are not supported"));
                }
                let permissions = policy
                    .permissions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| permit(p).map_err(|e| format!("{at}.permissions[{i}]: {e}")))
                    .collect::<Result<_, _>>()?;
                let principals = policy
                    .principals
                    .iter()
                    .enumerate()
                    .map(|(i, p)| who(p).map_err(|e| format!("{at}.principals[{i}]: {e}")))
                    .collect::<Result<_, _>>()?;
                Ok((
                    name.clone(),
                    CompiledPolicy {
                        permissions,
                        principals,
                    },
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        self.engines.push(Engine {
            deny_on_match,
            policies,
        });
        Ok(())
    }

    /// Whether there is anything to check.
    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// `/config_dump`'s view: each filter's action and policy names.
    pub fn summary(&self) -> Vec<serde_json::Value> {
        self.engines
            .iter()
            .map(|e| {
                serde_json::json!({
                    "action": if e.deny_on_match { "DENY" } else { "ALLOW" },
                    "policies": e.policies.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    /// Checks `subject` against every filter in order.
    pub fn check(&self, subject: &Subject<'_>) -> Decision {
        for engine in &self.engines {
            let matched = engine
                .policies
                .iter()
                .find(|(_, p)| p.matches(subject))
                .map(|(name, _)| name);
            match (engine.deny_on_match, matched) {
                (true, Some(name)) => return Decision::Deny(Some(name.clone())),
                (false, None) => return Decision::Deny(None),
                _ => {}
            }
        }
        Decision::Allow
    }
}

impl CompiledPolicy {
    fn matches(&self, s: &Subject<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(s))
            && self.principals.iter().any(|p| p.matches(s))
    }
}

fn permit(p: &Permission) -> Result<Permit, String> {
    let set = |rules: &[Permission]| rules.iter().map(permit).collect::<Result<Vec<_>, _>>();
    Ok(match &p.rule {
        Some(Perm::Any(true)) => Permit::Any,
        Some(Perm::AndRules(s)) => Permit::And(set(&s.rules)?),
        Some(Perm::OrRules(s)) => Permit::Or(set(&s.rules)?),
        Some(Perm::NotRule(inner)) => Permit::Not(Box::new(permit(inner)?)),
        Some(Perm::Header(h)) => Permit::Header(HeaderMatch::compile(h)?),
        Some(Perm::UrlPath(m)) => Permit::Path(path(m)?),
        Some(Perm::DestinationIp(c)) => Permit::DestinationIp(cidr(c)?),
        Some(Perm::DestinationPort(port)) => Permit::DestinationPort(
            u16::try_from(*port).map_err(|_| format!("destination_port {port} out of range"))?,
        ),
        Some(Perm::DestinationPortRange(r)) => {
            Permit::DestinationPorts(i64::from(r.start), i64::from(r.end))
        }
        Some(Perm::RequestedServerName(m)) => Permit::ServerName(StrMatch::compile(m)?),
        Some(Perm::Any(false)) | None => return Err("empty permission".into()),
        Some(other) => return Err(format!("permission {} is not supported", variant(other))),
    })
}

fn who(p: &Principal) -> Result<Who, String> {
    let set = |ids: &[Principal]| ids.iter().map(who).collect::<Result<Vec<_>, _>>();
    #[allow(deprecated)] // `source_ip` is still sent by older control planes
    Ok(match &p.identifier {
        Some(Id::Any(true)) => Who::Any,
        Some(Id::AndIds(s)) => Who::And(set(&s.ids)?),
        Some(Id::OrIds(s)) => Who::Or(set(&s.ids)?),
        Some(Id::NotId(inner)) => Who::Not(Box::new(who(inner)?)),
        Some(Id::Authenticated(a)) => Who::Authenticated(
            a.principal_name
                .as_ref()
                .map(StrMatch::compile)
                .transpose()?,
        ),
        // The waypoint trusts no forwarding header: the remote address is
        // the tunnel's original client, as is the direct one.
        Some(Id::DirectRemoteIp(c) | Id::RemoteIp(c) | Id::SourceIp(c)) => Who::SourceIp(cidr(c)?),
        Some(Id::Header(h)) => Who::Header(HeaderMatch::compile(h)?),
        Some(Id::UrlPath(m)) => Who::Path(path(m)?),
        Some(Id::Any(false)) | None => return Err("empty principal".into()),
        Some(other) => return Err(format!("principal {} is not supported", id_variant(other))),
    })
}

fn path(m: &mesh_api::envoy::envoy::r#type::matcher::v3::PathMatcher) -> Result<StrMatch, String> {
    match &m.rule {
        Some(path_matcher::Rule::Path(s)) => StrMatch::compile(s),
        None => Err("url_path without a rule".into()),
    }
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    Cidr::parse(&c.address_prefix, c.prefix_len.as_ref().map(|l| l.value))
}

impl Cidr {
    /// `address_prefix` with `prefix_len` leading bits (all when `None`).
    pub(crate) fn parse(address_prefix: &str, prefix_len: Option<u32>) -> Result<Self, String> {
        let ip: IpAddr = address_prefix
            .parse()
            .map_err(|_| format!("{address_prefix:?} is not an IP"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = prefix_len.unwrap_or(max);
        if len > max {
            return Err(format!("prefix length {len} is longer than the address"));
        }
        Ok(Cidr { ip, len })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 counts as IPv4).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.ip, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Permit {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Permit::Any => true,
            Permit::And(all) => all.iter().all(|p| p.matches(s)),
            Permit::Or(any) => any.iter().any(|p| p.matches(s)),
            Permit::Not(inner) => !inner.matches(s),
            Permit::Header(h) => s.request.is_some_and(|r| h.matches(r)),
            Permit::Path(m) => s.request.is_some_and(|r| m.matches(r.uri.path())),
            Permit::DestinationIp(c) => c.contains(s.destination.ip()),
            Permit::DestinationPort(port) => s.destination.port() == *port,
            Permit::DestinationPorts(start, end) => {
                (*start..*end).contains(&i64::from(s.destination.port()))
            }
            Permit::ServerName(m) => m.matches(""),
        }
    }
}

impl Who {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Who::Any => true,
            Who::And(all) => all.iter().all(|p| p.matches(s)),
            Who::Or(any) => any.iter().any(|p| p.matches(s)),
            Who::Not(inner) => !inner.matches(s),
            Who::Authenticated(None) => !s.principal.is_empty(),
            Who::Authenticated(Some(m)) => !s.principal.is_empty() && m.matches(s.principal),
            Who::SourceIp(c) => c.contains(s.source),
            Who::Header(h) => s.request.is_some_and(|r| h.matches(r)),
            Who::Path(m) => s.request.is_some_and(|r| m.matches(r.uri.path())),
        }
    }
}

fn variant(rule: &Perm) -> &'static str {
    #[allow(deprecated)]
    match rule {
        Perm::Metadata(_) => "metadata",
        Perm::Matcher(_) => "matcher",
        Perm::UriTemplate(_) => "uri_template",
        Perm::SourcedMetadata(_) => "sourced_metadata",
        _ => "of this kind",
    }
}

fn id_variant(id: &Id) -> &'static str {
    #[allow(deprecated)]
    match id {
        Id::Metadata(_) => "metadata",
        Id::FilterState(_) => "filter_state",
        Id::SourcedMetadata(_) => "sourced_metadata",
        Id::Custom(_) => "custom",
        _ => "of this kind",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::envoy::envoy::{
        config::{
            rbac::v3::{Policy, permission, principal},
            route::v3::{HeaderMatcher, header_matcher},
        },
        r#type::matcher::v3::{PathMatcher, StringMatcher, string_matcher::MatchPattern},
    };

    fn s(p: MatchPattern) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(p),
            ..Default::default()
        }
    }

    fn rbac(action: Action, policies: Vec<(&str, Vec<Permission>, Vec<Principal>)>) -> Rbac {
        Rbac {
            action: action as i32,
            policies: policies
                .into_iter()
                .map(|(name, permissions, principals)| {
                    (
                        name.to_owned(),
                        Policy {
                            permissions,
                            principals,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn request(method: &str, path: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "reviews:9080")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bk/sa/productpage";

    fn subject<'a>(principal: &'a str, request: Option<&'a Parts>) -> Subject<'a> {
        Subject {
            principal,
            source: "10.0.0.5".parse().unwrap(),
            destination: "10.96.0.10:9080".parse().unwrap(),
            request,
        }
    }

    #[test]
    fn deny_then_allow_with_methods_paths_and_principals() {
        let get = Permission {
            rule: Some(Perm::AndRules(permission::Set {
                rules: vec![
                    Permission {
                        rule: Some(Perm::Header(HeaderMatcher {
                            name: ":method".into(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(s(
                                    MatchPattern::Exact("GET".into()),
                                )),
                            ),
                            ..Default::default()
                        })),
                    },
                    Permission {
                        rule: Some(Perm::UrlPath(PathMatcher {
                            rule: Some(path_matcher::Rule::Path(s(MatchPattern::Prefix(
                                "/reviews/".into(),
                            )))),
                        })),
                    },
                ],
            })),
        };
        let productpage = Principal {
            identifier: Some(Id::Authenticated(principal::Authenticated {
                principal_name: Some(s(MatchPattern::Exact(PRODUCTPAGE.into()))),
            })),
        };
        let admin = Permission {
            rule: Some(Perm::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(s(MatchPattern::Prefix(
                    "/reviews/admin".into(),
                )))),
            })),
        };
        let any = Principal {
            identifier: Some(Id::Any(true)),
        };
        let mut authz = Authorizer::default();
        authz
            .push(
                Some(&rbac(
                    Action::Deny,
                    vec![("no-admin", vec![admin], vec![any])],
                )),
                "f0",
            )
            .unwrap();
        authz
            .push(
                Some(&rbac(
                    Action::Allow,
                    vec![("get", vec![get], vec![productpage])],
                )),
                "f1",
            )
            .unwrap();
        let get_reviews = request("GET", "/reviews/1");
        let post_reviews = request("POST", "/reviews/1");
        let get_admin = request("GET", "/reviews/admin");
        assert_eq!(
            authz.check(&subject(PRODUCTPAGE, Some(&get_reviews))),
            Decision::Allow
        );
        assert_eq!(
            authz.check(&subject(PRODUCTPAGE, Some(&post_reviews))),
            Decision::Deny(None)
        );
        assert_eq!(
            authz.check(&subject(
                "spiffe://cluster.local/ns/bk/sa/other",
                Some(&get_reviews)
            )),
            Decision::Deny(None)
        );
        assert_eq!(
            authz.check(&subject(PRODUCTPAGE, Some(&get_admin))),
            Decision::Deny(Some("no-admin".into()))
        );
        // Without a request (a TCP chain) HTTP permissions never match.
        assert_eq!(
            authz.check(&subject(PRODUCTPAGE, None)),
            Decision::Deny(None)
        );
    }

    #[test]
    fn allow_without_policies_denies_and_cidrs_match_by_prefix() {
        let mut authz = Authorizer::default();
        authz.push(Some(&rbac(Action::Allow, vec![])), "f").unwrap();
        assert_eq!(
            authz.check(&subject(PRODUCTPAGE, None)),
            Decision::Deny(None)
        );

        let net = |prefix: &str, len: u32| CidrRange {
            address_prefix: prefix.into(),
            prefix_len: Some(mesh_api::envoy::google::protobuf::UInt32Value { value: len }),
        };
        let c = cidr(&net("10.0.0.0", 8)).unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(
            cidr(&net("0.0.0.0", 0))
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(cidr(&net("10.0.0.0", 33)).is_err());
    }

    #[test]
    fn unsupported_matchers_are_refused_with_their_place() {
        let mut authz = Authorizer::default();
        let metadata = Principal {
            identifier: Some(Id::FilterState(Default::default())),
        };
        let err = authz
            .push(
                Some(&rbac(
                    Action::Allow,
                    vec![(
                        "p",
                        vec![Permission {
                            rule: Some(Perm::Any(true)),
                        }],
                        vec![metadata],
                    )],
                )),
                "http_filters[0]",
            )
            .unwrap_err();
        assert_eq!(
            err,
            "http_filters[0].rules.policies[p].principals[0]: principal filter_state is not supported"
        );
    }
}
