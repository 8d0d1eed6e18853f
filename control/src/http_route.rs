//! Gateway API HTTPRoutes attached to Services (the GAMMA pattern Istio's
//! ambient mode uses for waypoints), as the VirtualServices they are
//! equivalent to: one per parent Service, holding the rules of every route
//! attached to it in Gateway API precedence, so the waypoint routes them with
//! the same code as Istio's own API.
//!
//! - A `parentRef` of kind `Service` (core group) attaches a route to that
//!   Service (`port`: that port only).
//! - A `parentRef` of kind `Gateway` attaches it to the listeners of an
//!   ingress Gateway ([`crate::kube_gateway`]): one VirtualService per
//!   Gateway and host name, bound to the listeners' Istio Gateways, each
//!   route matching only on the listeners its own route attached to.
//! - Each match becomes one route: `Exact` and `RegularExpression` paths as
//!   they are; `PathPrefix` by whole segments (`/a` matches `/a` and `/a/b`,
//!   not `/ab`); headers, query parameters and method as exact or regex
//!   matches. Across routes and rules, matches are ordered as the Gateway
//!   API orders them: exact path, then the longest prefix, then method, then
//!   the most header and query matches; ties keep route name and rule order.
//! - Filters: header modifiers become header edits, `RequestRedirect` a
//!   redirect, `URLRewrite` a rewrite (prefix replacement by whole segments),
//!   `RequestMirror` a mirror; backend filters edit headers per backend.
//!   `timeouts.request` is the route timeout, `timeouts.backendRequest`
//!   each attempt's (`retries.perTryTimeout`, the retries Istio's default).
//! - `backendRefs` become weighted destinations (weight default 1); a rule
//!   with neither backends nor a redirect answers 500, as the Gateway API
//!   requires. A backend (or mirror) in another namespace needs a
//!   ReferenceGrant there ([`crate::reference_grant`]); without one it is
//!   refused and reported, and its share of the requests is answered 500.
//!
//! A VirtualService for the same host takes precedence; the routes are then
//! reported and not applied.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_config::{
    Manifests,
    istio::{
        GATEWAY_API_GROUP, KubeHttpRoute, VirtualService,
        gateway_api::{
            BackendObjectRef, HeaderModifier, HttpRouteMatch, HttpRouteRule, ParentRef,
            PathMatchType, PathModifier, PathModifierType, ValueMatchType,
        },
        networking::{
            Destination, FaultAbort, HeaderOperations, Headers, HttpFault, HttpMatchRequest,
            HttpMirrorPolicy, HttpRedirect, HttpRetry, HttpRewrite, HttpRoute,
            HttpRouteDestination, Percent, PortSelector, RegexRewrite, StringMatch,
            VirtualServiceSpec,
        },
    },
    namespace,
    validate::fqdn,
};

use crate::{
    reference_grant::{CORE_GROUP, ReferenceGrants, Referent, Referrer},
    route_status::{Condition, ParentStatus, RouteStatus},
};

/// The VirtualServices equivalent to `manifests`' HTTPRoutes, one per
/// parent Service, named after it; `warnings` gets what cannot be applied,
/// `statuses` what each route's parents got.
pub fn virtual_services(
    manifests: &Manifests,
    warnings: &mut Vec<String>,
    statuses: &mut Vec<RouteStatus>,
) -> Vec<VirtualService> {
    let grants = ReferenceGrants::of(manifests);
    // Parent Service host -> (route namespace, its matches with their rule).
    let mut by_parent: BTreeMap<(String, String), Vec<Candidate<'_>>> = BTreeMap::new();
    // Gateway namespace and host -> (listener gateways, candidates).
    let mut by_gateway: BTreeMap<(String, String), (BTreeSet<String>, Vec<Candidate<'_>>)> =
        BTreeMap::new();
    let mut sorted: Vec<&KubeHttpRoute> = manifests.http_routes.iter().collect();
    sorted.sort_by_key(|r| (namespace(&r.metadata), r.metadata.name.clone()));
    for route in sorted {
        let route_ns = namespace(&route.metadata);
        // GRPCRoutes arrive as HTTPRoutes of kind `GRPCRoute`.
        let kind = if route.kind.is_empty() {
            "HTTPRoute"
        } else {
            route.kind.as_str()
        };
        let route_id = format!(
            "{kind} {route_ns}/{}",
            route.metadata.name.as_deref().unwrap_or_default()
        );
        let resolved_refs = resolved_refs(grants, kind, route_ns, route);
        let mut parents = Vec::new();
        let mut parent_status = |parent: &ParentRef, accepted: Condition| {
            parents.push(ParentStatus {
                parent_ref: parent.clone(),
                accepted,
                resolved_refs: resolved_refs.clone(),
            });
        };
        for (p, parent) in route.spec.parent_refs.iter().enumerate() {
            if parent.is_gateway() {
                let attached = match crate::kube_gateway::attachments(
                    manifests,
                    parent,
                    kind,
                    route_ns,
                    &route.spec.hostnames,
                ) {
                    Ok(attached) => attached,
                    Err(why) => {
                        warnings.push(format!(
                            "{route_id}: spec.parentRefs[{p}] is not applied: {why}"
                        ));
                        if let Some(reason) = why.reason {
                            parent_status(parent, Condition::fails(reason, why.message));
                        }
                        continue;
                    }
                };
                parent_status(parent, Condition::holds("Accepted", "attached"));
                // Host -> the listeners (their Istio Gateways) serving it.
                let mut hosts: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
                for a in attached {
                    hosts
                        .entry((a.gateway_ns, a.host))
                        .or_default()
                        .push(a.gateway);
                }
                for (key, gateways) in hosts {
                    let (all, candidates) = by_gateway.entry(key).or_default();
                    all.extend(gateways.iter().cloned());
                    candidates.extend(Candidate::of_rules(
                        route, kind, &route_id, route_ns, None, &gateways,
                    ));
                }
                continue;
            }
            if !parent.is_service() {
                warnings.push(format!(
                    "{route_id}: spec.parentRefs[{p}] ({} {}) is not applied: only Service and Gateway parents are routed here",
                    parent.kind.as_deref().unwrap_or("Gateway"),
                    parent.name
                ));
                continue;
            }
            let service_ns = parent.namespace.as_deref().unwrap_or(route_ns);
            let exists = manifests.services.iter().any(|s| {
                s.metadata.name.as_deref() == Some(parent.name.as_str())
                    && namespace(&s.metadata) == service_ns
            });
            if !exists {
                let message = format!(
                    "names Service {service_ns}/{}, which does not exist",
                    parent.name
                );
                warnings.push(format!("{route_id}: spec.parentRefs[{p}] {message}"));
                parent_status(parent, Condition::fails("NoMatchingParent", message));
                continue;
            }
            parent_status(parent, Condition::holds("Accepted", "attached"));
            let host = fqdn(&parent.name, service_ns);
            by_parent
                .entry((service_ns.to_owned(), host.clone()))
                .or_default()
                .extend(Candidate::of_rules(
                    route,
                    kind,
                    &route_id,
                    route_ns,
                    parent.port,
                    &[],
                ));
        }
        if !parents.is_empty() {
            statuses.push(RouteStatus {
                kind: kind.to_owned(),
                api_version: route.api_version.clone(),
                namespace: route_ns.to_owned(),
                name: route.metadata.name.clone().unwrap_or_default(),
                generation: route.metadata.generation,
                previous: route.status.clone(),
                parents,
            });
        }
    }
    let mut out = gateway_virtual_services(by_gateway, grants, warnings);
    for ((service_ns, host), mut candidates) in by_parent {
        let routed_by_vs = manifests.virtual_services.iter().find(|vs| {
            let vs_ns = namespace(&vs.metadata);
            vs.spec.hosts.iter().any(|h| fqdn(h, vs_ns) == host)
        });
        if let Some(vs) = routed_by_vs {
            warnings.push(format!(
                "HTTPRoutes attached to {host} are not applied: VirtualService {}/{} routes that host",
                namespace(&vs.metadata),
                vs.metadata.name.as_deref().unwrap_or_default()
            ));
            continue;
        }
        // Stable: ties keep route name, rule and match order.
        candidates.sort_by_key(|c| std::cmp::Reverse(c.precedence()));
        let http = candidates
            .iter()
            .filter_map(|c| c.http_route(&host, grants, warnings))
            .collect();
        let name = host.split('.').next().unwrap_or(&host).to_owned();
        out.push(VirtualService {
            api_version: "gateway.networking.k8s.io/v1".to_owned(),
            kind: "HTTPRoute".to_owned(),
            metadata: ObjectMeta {
                name: Some(format!("{name}-httproutes")),
                namespace: Some(service_ns),
                ..Default::default()
            },
            spec: VirtualServiceSpec {
                hosts: vec![host],
                http,
                ..Default::default()
            },
            status: None,
        });
    }
    out
}

/// The VirtualServices of routes attached to ingress Gateways: one per
/// Gateway namespace and host, bound to the listeners' Istio Gateways.
fn gateway_virtual_services(
    by_gateway: BTreeMap<(String, String), (BTreeSet<String>, Vec<Candidate<'_>>)>,
    grants: ReferenceGrants<'_>,
    warnings: &mut Vec<String>,
) -> Vec<VirtualService> {
    let mut out = Vec::new();
    for ((gateway_ns, host), (gateways, mut candidates)) in by_gateway {
        candidates.sort_by_key(|c| std::cmp::Reverse(c.precedence()));
        let http = candidates
            .iter()
            .filter_map(|c| c.http_route(&host, grants, warnings))
            .collect();
        out.push(VirtualService {
            api_version: "gateway.networking.k8s.io/v1".to_owned(),
            kind: "HTTPRoute".to_owned(),
            metadata: ObjectMeta {
                name: Some(format!(
                    "gateway-{}-httproutes",
                    host.replace('*', "wildcard")
                )),
                namespace: Some(gateway_ns),
                ..Default::default()
            },
            spec: VirtualServiceSpec {
                hosts: vec![host],
                gateways: gateways.into_iter().collect(),
                http,
                ..Default::default()
            },
            status: None,
        });
    }
    out
}

/// One match of one rule, for one parent.
struct Candidate<'a> {
    /// `HTTPRoute` or `GRPCRoute`.
    kind: &'a str,
    route_ns: &'a str,
    rule: &'a HttpRouteRule,
    rule_name: String,
    matched: Option<&'a HttpRouteMatch>,
    port: Option<u32>,
    /// For a Gateway parent: the listeners' Istio Gateways it matches on.
    gateways: Vec<String>,
}

impl<'a> Candidate<'a> {
    /// One candidate per match of every rule of `route` (a rule without
    /// matches matches everything).
    fn of_rules(
        route: &'a KubeHttpRoute,
        kind: &'a str,
        route_id: &str,
        route_ns: &'a str,
        port: Option<u32>,
        gateways: &[String],
    ) -> Vec<Self> {
        let mut out = Vec::new();
        for (r, rule) in route.spec.rules.iter().enumerate() {
            let rule_name = format!("{route_id} rule {r}");
            let matches: Vec<Option<&HttpRouteMatch>> = if rule.matches.is_empty() {
                vec![None]
            } else {
                rule.matches.iter().map(Some).collect()
            };
            for matched in matches {
                out.push(Candidate {
                    kind,
                    route_ns,
                    rule,
                    rule_name: rule_name.clone(),
                    matched,
                    port,
                    gateways: gateways.to_vec(),
                });
            }
        }
        out
    }

    /// Gateway API precedence: exact path, longest prefix, method, header
    /// count, query count (greater first).
    fn precedence(&self) -> (bool, usize, bool, usize, usize) {
        let Some(m) = self.matched else {
            return (false, 1, false, 0, 0);
        };
        let (exact, length) = match &m.path {
            None => (false, 1),
            Some(p) => {
                let length = p.value.as_deref().unwrap_or("/").len();
                match p.type_.unwrap_or(PathMatchType::PathPrefix) {
                    PathMatchType::Exact => (true, length),
                    PathMatchType::PathPrefix => (false, length),
                    PathMatchType::RegularExpression => (false, 0),
                }
            }
        };
        (
            exact,
            length,
            m.method.is_some(),
            m.headers.len(),
            m.query_params.len(),
        )
    }

    /// The VirtualService route for this match, or `None` (reported) when
    /// it asks for what cannot be done here.
    fn http_route(
        &self,
        host: &str,
        grants: ReferenceGrants<'_>,
        warnings: &mut Vec<String>,
    ) -> Option<HttpRoute> {
        let rule = self.rule;
        let mut route = HttpRoute {
            name: Some(self.rule_name.clone()),
            matches: vec![self.match_request()],
            timeout: rule.timeouts.as_ref().and_then(|t| t.request),
            // Each attempt to a backend is bounded by `backendRequest`; the
            // retries themselves are the mesh's default (as when unset).
            retries: rule
                .timeouts
                .as_ref()
                .and_then(|t| t.backend_request)
                .map(|per_try| HttpRetry {
                    per_try_timeout: Some(per_try),
                    ..Default::default()
                }),
            ..Default::default()
        };
        let mut request = HeaderOperations::default();
        let mut response = HeaderOperations::default();
        for filter in &rule.filters {
            match filter.type_.as_str() {
                "RequestHeaderModifier" => {
                    edit(&mut request, filter.request_header_modifier.as_ref());
                }
                "ResponseHeaderModifier" => {
                    edit(&mut response, filter.response_header_modifier.as_ref());
                }
                "RequestRedirect" => {
                    let redirect = filter.request_redirect.as_ref()?;
                    let uri = match &redirect.path {
                        None => None,
                        Some(p) if p.type_ == PathModifierType::ReplaceFullPath => {
                            p.replace_full_path.clone()
                        }
                        Some(_) => {
                            warnings.push(format!(
                                "{}: a RequestRedirect with ReplacePrefixMatch is not supported yet; the rule is skipped",
                                self.rule_name
                            ));
                            return None;
                        }
                    };
                    route.redirect = Some(HttpRedirect {
                        uri,
                        authority: redirect.hostname.clone(),
                        port: redirect.port,
                        scheme: redirect.scheme.clone(),
                        redirect_code: Some(redirect.status_code.unwrap_or(302)),
                    });
                }
                "URLRewrite" => {
                    let rewrite = filter.url_rewrite.as_ref()?;
                    route.rewrite = Some(HttpRewrite {
                        authority: rewrite.hostname.clone(),
                        uri_regex_rewrite: rewrite
                            .path
                            .as_ref()
                            .and_then(|p| self.path_rewrite(p.type_, p)),
                        ..Default::default()
                    });
                }
                "RequestMirror" => {
                    let mirror = filter.request_mirror.as_ref()?;
                    if let Err(why) = self.permitted(grants, &mirror.backend_ref) {
                        warnings.push(format!(
                            "{}: the RequestMirror filter is not applied: {why}",
                            self.rule_name
                        ));
                        continue;
                    }
                    route.mirrors.push(HttpMirrorPolicy {
                        destination: self.destination(
                            &mirror.backend_ref.name,
                            mirror.backend_ref.namespace.as_deref(),
                            mirror.backend_ref.port,
                        ),
                        percentage: Some(Percent {
                            value: f64::from(mirror.percent.unwrap_or(100)),
                        }),
                    });
                }
                _ => {}
            }
        }
        route.headers = headers(request, response);
        if route.redirect.is_none() {
            // Backends in another namespace without a ReferenceGrant are
            // refused; their share of the requests gets the Gateway API's
            // 500 below.
            let mut refused_weight = 0;
            let permitted: Vec<_> = rule
                .backend_refs
                .iter()
                .enumerate()
                .filter(|(b, backend)| match self.permitted(grants, &backend.backend) {
                    Ok(()) => true,
                    Err(why) => {
                        let weight = backend.weight.unwrap_or(1);
                        refused_weight += weight;
                        warnings.push(format!(
                            "{}: backendRefs[{b}] is refused, its share of requests (weight {weight}) is answered 500: {why}",
                            self.rule_name
                        ));
                        false
                    }
                })
                .map(|(_, backend)| backend)
                .collect();
            route.route = permitted
                .into_iter()
                .map(|backend| {
                    let mut request = HeaderOperations::default();
                    let mut response = HeaderOperations::default();
                    for filter in &backend.filters {
                        match filter.type_.as_str() {
                            "RequestHeaderModifier" => {
                                edit(&mut request, filter.request_header_modifier.as_ref())
                            }
                            "ResponseHeaderModifier" => {
                                edit(&mut response, filter.response_header_modifier.as_ref())
                            }
                            other => warnings.push(format!(
                                "{}: backend filter {other} is not supported; it is ignored",
                                self.rule_name
                            )),
                        }
                    }
                    HttpRouteDestination {
                        destination: self.destination(
                            &backend.backend.name,
                            backend.backend.namespace.as_deref(),
                            backend.backend.port,
                        ),
                        weight: Some(backend.weight.unwrap_or(1)),
                        headers: headers(request, response),
                    }
                })
                .collect();
            let total: i64 = route.route.iter().filter_map(|d| d.weight).sum();
            if total > 0 && refused_weight > 0 {
                // Checked before a destination is picked, so the permitted
                // backends keep their shares of the whole.
                let share = refused_weight as f64 / (total + refused_weight) as f64;
                route.fault = Some(HttpFault {
                    abort: Some(FaultAbort {
                        http_status: Some(500),
                        percentage: Some(Percent {
                            value: share * 100.0,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            if route.route.is_empty() || total == 0 {
                // No backend to send to: the Gateway API's 500, answered
                // by an abort before the (never used) parent destination.
                route.route.clear();
                route.fault = Some(HttpFault {
                    abort: Some(FaultAbort {
                        http_status: Some(500),
                        percentage: Some(Percent { value: 100.0 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                route.route.push(HttpRouteDestination {
                    destination: Destination {
                        host: host.to_owned(),
                        ..Default::default()
                    },
                    weight: Some(1),
                    headers: None,
                });
            }
        }
        Some(route)
    }

    /// The VirtualService match of this candidate.
    fn match_request(&self) -> HttpMatchRequest {
        let mut out = HttpMatchRequest {
            port: self.port,
            gateways: self.gateways.clone(),
            ..Default::default()
        };
        let Some(m) = self.matched else {
            out.uri = Some(prefix("/"));
            return out;
        };
        out.uri = Some(match &m.path {
            None => prefix("/"),
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
                match p.type_.unwrap_or(PathMatchType::PathPrefix) {
                    PathMatchType::Exact => StringMatch {
                        exact: Some(value),
                        ..Default::default()
                    },
                    PathMatchType::RegularExpression => StringMatch {
                        regex: Some(value),
                        ..Default::default()
                    },
                    PathMatchType::PathPrefix => segment_prefix(&value),
                }
            }
        });
        let value = |kind: Option<ValueMatchType>, value: &str| match kind {
            Some(ValueMatchType::RegularExpression) => StringMatch {
                regex: Some(value.to_owned()),
                ..Default::default()
            },
            _ => StringMatch {
                exact: Some(value.to_owned()),
                ..Default::default()
            },
        };
        for h in &m.headers {
            out.headers
                .insert(h.name.to_ascii_lowercase(), value(h.type_, &h.value));
        }
        for q in &m.query_params {
            out.query_params
                .insert(q.name.clone(), value(q.type_, &q.value));
        }
        out.method = m.method.as_ref().map(|method| StringMatch {
            exact: Some(method.clone()),
            ..Default::default()
        });
        out
    }

    /// A path rewrite as a regex substitution: the whole path, or the part
    /// this candidate's `PathPrefix` matched (by whole segments).
    fn path_rewrite(
        &self,
        kind: PathModifierType,
        modifier: &PathModifier,
    ) -> Option<RegexRewrite> {
        match kind {
            PathModifierType::ReplaceFullPath => Some(RegexRewrite {
                pattern: "^.*$".to_owned(),
                rewrite: modifier.replace_full_path.clone()?,
            }),
            PathModifierType::ReplacePrefixMatch => {
                let matched = self
                    .matched
                    .and_then(|m| m.path.as_ref())
                    .and_then(|p| p.value.as_deref())
                    .unwrap_or("/");
                let matched = matched.trim_end_matches('/');
                let replacement = modifier.replace_prefix_match.as_deref()?;
                let replacement = replacement.trim_end_matches('/');
                Some(if replacement.is_empty() {
                    // `/a/b` with prefix `/a` replaced by `/` is `/b`.
                    RegexRewrite {
                        pattern: format!("^{}/?", regex::escape(matched)),
                        rewrite: "/".to_owned(),
                    }
                } else {
                    RegexRewrite {
                        pattern: format!("^{}", regex::escape(matched)),
                        rewrite: replacement.to_owned(),
                    }
                })
            }
        }
    }

    /// Whether this route may send to `backend`: in its own namespace, or
    /// in one whose ReferenceGrant trusts this route's kind and namespace;
    /// `Err` says which grant is missing.
    fn permitted(
        &self,
        grants: ReferenceGrants<'_>,
        backend: &BackendObjectRef,
    ) -> Result<(), String> {
        backend_permitted(grants, self.kind, self.route_ns, backend)
    }

    fn destination(&self, name: &str, namespace: Option<&str>, port: Option<u32>) -> Destination {
        Destination {
            host: fqdn(name, namespace.unwrap_or(self.route_ns)),
            subset: None,
            port: port.map(|number| PortSelector {
                number: Some(number),
            }),
        }
    }
}

/// Whether a route of `kind` in `route_ns` may send to `backend`: in its
/// own namespace, or in one whose ReferenceGrant trusts that kind and
/// namespace; `Err` says which grant is missing.
pub(crate) fn backend_permitted(
    grants: ReferenceGrants<'_>,
    kind: &str,
    route_ns: &str,
    backend: &BackendObjectRef,
) -> Result<(), String> {
    let Some(backend_ns) = backend.namespace.as_deref() else {
        return Ok(());
    };
    let from = Referrer {
        group: GATEWAY_API_GROUP,
        kind,
        namespace: route_ns,
    };
    let to = Referent {
        group: CORE_GROUP,
        kind: "Service",
        namespace: backend_ns,
        name: &backend.name,
    };
    if grants.permits(from, to) {
        return Ok(());
    }
    Err(format!(
        "Service {backend_ns}/{} is in another namespace and no ReferenceGrant in {backend_ns} lets {kind}s from {route_ns} refer to it",
        backend.name
    ))
}

/// The route's `ResolvedRefs` condition: every backend and mirror it names
/// may be referred to (`RefNotPermitted` names those that may not).
fn resolved_refs(
    grants: ReferenceGrants<'_>,
    kind: &str,
    route_ns: &str,
    route: &KubeHttpRoute,
) -> Condition {
    let refused: Vec<String> = route
        .spec
        .rules
        .iter()
        .flat_map(|rule| {
            let mirrors = rule
                .filters
                .iter()
                .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref));
            rule.backend_refs.iter().map(|b| &b.backend).chain(mirrors)
        })
        .filter_map(|backend| backend_permitted(grants, kind, route_ns, backend).err())
        .collect();
    if refused.is_empty() {
        Condition::holds("ResolvedRefs", "all references resolved")
    } else {
        Condition::fails("RefNotPermitted", refused.join("; "))
    }
}

fn prefix(value: &str) -> StringMatch {
    StringMatch {
        prefix: Some(value.to_owned()),
        ..Default::default()
    }
}

/// A Gateway API `PathPrefix`: whole segments, so `/a` matches `/a`, `/a/`
/// and `/a/b` but not `/ab`.
fn segment_prefix(value: &str) -> StringMatch {
    let trimmed = value.trim_end_matches('/');
    if trimmed.is_empty() {
        return prefix("/");
    }
    StringMatch {
        regex: Some(format!("{}(/.*)?", regex::escape(trimmed))),
        ..Default::default()
    }
}

fn edit(ops: &mut HeaderOperations, modifier: Option<&HeaderModifier>) {
    let Some(modifier) = modifier else { return };
    for nv in &modifier.set {
        ops.set
            .insert(nv.name.to_ascii_lowercase(), nv.value.clone());
    }
    for nv in &modifier.add {
        ops.add
            .insert(nv.name.to_ascii_lowercase(), nv.value.clone());
    }
    ops.remove
        .extend(modifier.remove.iter().map(|n| n.to_ascii_lowercase()));
}

fn headers(request: HeaderOperations, response: HeaderOperations) -> Option<Headers> {
    let empty =
        |ops: &HeaderOperations| ops.set.is_empty() && ops.add.is_empty() && ops.remove.is_empty();
    if empty(&request) && empty(&response) {
        return None;
    }
    Some(Headers {
        request: (!empty(&request)).then_some(request),
        response: (!empty(&response)).then_some(response),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(extra: &str) -> (Vec<VirtualService>, Vec<String>) {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}\n---\n{extra}"
        );
        let loaded = mesh_config::load_str("t.yaml", &text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut warnings = Vec::new();
        let mut statuses = Vec::new();
        (
            virtual_services(&loaded.manifests, &mut warnings, &mut statuses),
            warnings,
        )
    }

    #[test]
    fn backend_request_timeout_bounds_each_attempt() {
        let route = |timeouts: &str| {
            format!(
                r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: t, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, group: "", name: reviews, port: 9080}}]
  rules:
  - timeouts: {timeouts}
    backendRefs: [{{name: reviews, port: 9080}}]
"#
            )
        };
        let (vs, warnings) = translate(&route("{request: 10s, backendRequest: 2s}"));
        assert!(warnings.is_empty(), "{warnings:?}");
        let http = &vs[0].spec.http[0];
        assert_eq!(http.timeout.map(|d| d.0.as_secs()), Some(10));
        let retries = http.retries.as_ref().expect("retries");
        assert_eq!(retries.per_try_timeout.map(|d| d.0.as_secs()), Some(2));
        assert_eq!(retries.attempts, None, "the default number of retries");

        let longer = mesh_config::load_str("t.yaml", &route("{request: 1s, backendRequest: 2s}"));
        assert!(longer.errors.is_empty(), "{:?}", longer.errors);
        let errors = format!("{:?}", mesh_config::validate::validate(&longer.manifests));
        assert!(
            errors.contains("spec.rules[0].timeouts.backendRequest")
                && errors.contains("longer than request"),
            "{errors}"
        );
    }

    #[test]
    fn rules_become_one_virtual_service_in_gateway_api_precedence() {
        let (vs, warnings) = translate(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /a/b}, method: GET}, {path: {type: Exact, value: /x}}]
    backendRefs: [{name: reviews, port: 9080, weight: 3}, {name: other, namespace: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: shop}
spec:
  parentRefs: [{kind: Gateway, name: ingress}, {kind: Service, name: reviews}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: web}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#,
        );
        assert_eq!(vs.len(), 1, "one per parent Service");
        let spec = &vs[0].spec;
        assert_eq!(spec.hosts, ["reviews.shop.svc.cluster.local"]);
        let uris: Vec<String> = spec
            .http
            .iter()
            .map(|r| {
                let m = r.matches[0].uri.as_ref().unwrap();
                format!("{:?}{:?}{:?}", m.exact, m.prefix, m.regex)
            })
            .collect();
        assert_eq!(
            uris,
            [
                r#"Some("/x")NoneNone"#,         // exact first
                r#"NoneNoneSome("/a/b(/.*)?")"#, // then the longest prefix
                r#"NoneNoneSome("/a(/.*)?")"#,   // by whole segments
                r#"NoneSome("/")None"#,          // route `a`: no match
            ],
            "{:#?}",
            spec.http
        );
        let x = &spec.http[0];
        assert_eq!(x.matches[0].port, Some(9080));
        assert_eq!(
            x.route
                .iter()
                .map(|d| (d.destination.host.as_str(), d.weight))
                .collect::<Vec<_>>(),
            [
                ("reviews.shop.svc.cluster.local", Some(3)),
                ("other.web.svc.cluster.local", Some(1))
            ]
        );
        let redirect = spec.http[3].redirect.as_ref().expect("redirect");
        assert_eq!(
            (redirect.scheme.as_deref(), redirect.redirect_code),
            (Some("https"), Some(302))
        );
        assert!(
            warnings.iter().any(|w| w
                .contains("HTTPRoute shop/a: spec.parentRefs[0] is not applied: names Gateway shop/ingress, which does not exist")),
            "{warnings:?}"
        );
    }

    #[test]
    fn backends_in_another_namespace_need_a_reference_grant() {
        let routes = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /split}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, namespace: web, port: 80}}}]
    backendRefs: [{name: reviews, port: 9080, weight: 3}, {name: other, namespace: web, port: 80}]
  - backendRefs: [{name: other, namespace: web, port: 80}]
---
"#;
        // A grant in `web` to HTTPRoutes of `kind` from `shop`, for the
        // Service `name` (every Service when `None`).
        let grant = |kind: &str, name: Option<&str>| {
            let name = name.map(|n| format!(", name: {n}")).unwrap_or_default();
            format!(
                "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: web}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: shop}}]\n  to: [{{group: \"\", kind: Service{name}}}]\n"
            )
        };
        let abort = |route: &HttpRoute| {
            route
                .fault
                .as_ref()
                .and_then(|f| f.abort.as_ref())
                .map(|a| (a.http_status, a.percentage.as_ref().map(|p| p.value)))
        };
        let hosts = |route: &HttpRoute| {
            route
                .route
                .iter()
                .map(|d| (d.destination.host.clone(), d.weight))
                .collect::<Vec<_>>()
        };
        let reviews = ("reviews.shop.svc.cluster.local".to_owned(), Some(3));
        // No grant, or one for another kind or another Service: refused.
        for extra in [
            "",
            &grant("GRPCRoute", Some("other")),
            &grant("HTTPRoute", Some("shadow")),
        ] {
            let (vs, warnings) = translate(&format!("{routes}{extra}"));
            let warnings = warnings.join("\n");
            assert!(
                warnings.contains("HTTPRoute shop/r rule 0: backendRefs[1] is refused, its share of requests (weight 1) is answered 500: Service web/other is in another namespace and no ReferenceGrant in web lets HTTPRoutes from shop refer to it"),
                "{warnings}"
            );
            let split = &vs[0].spec.http[0];
            // The refused quarter is answered 500; reviews keeps its 3/4.
            assert_eq!(hosts(split), std::slice::from_ref(&reviews));
            assert_eq!(abort(split), Some((Some(500), Some(25.0))));
            // The rule with only a refused backend answers 500 always.
            assert_eq!(abort(&vs[0].spec.http[1]), Some((Some(500), Some(100.0))));
        }
        let loaded = mesh_config::load_str("t.yaml", routes);
        let mut statuses = Vec::new();
        virtual_services(&loaded.manifests, &mut Vec::new(), &mut statuses);
        let resolved = &statuses[0].parents[0].resolved_refs;
        assert_eq!((resolved.ok, resolved.reason), (false, "RefNotPermitted"));
        assert!(
            resolved.message.contains("Service web/other")
                && resolved.message.contains("Service web/shadow"),
            "{resolved:?}"
        );
        let (_, warnings) = translate(routes);
        assert!(
            warnings.iter().any(|w| w.contains("HTTPRoute shop/r rule 0: the RequestMirror filter is not applied: Service web/shadow is in another namespace")),
            "{warnings:?}"
        );
        // Granted: both backends, no abort; the mirror needs its own grant.
        let (vs, warnings) = translate(&format!("{routes}{}", grant("HTTPRoute", Some("other"))));
        let split = &vs[0].spec.http[0];
        assert_eq!(
            hosts(split),
            [reviews, ("other.web.svc.cluster.local".to_owned(), Some(1))]
        );
        assert_eq!(abort(split), None);
        assert!(split.mirrors.is_empty());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let (vs, warnings) = translate(&format!("{routes}{}", grant("HTTPRoute", None)));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(vs[0].spec.http[0].mirrors.len(), 1);
    }

    #[test]
    fn a_rule_without_backends_answers_500_and_prefix_rewrites_keep_segments() {
        let (vs, _) = translate(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - matches: [{path: {value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: Exact, value: /none}}]
"#,
        );
        let http = &vs[0].spec.http;
        let none = http
            .iter()
            .find(|r| r.matches[0].uri.as_ref().unwrap().exact.as_deref() == Some("/none"))
            .unwrap();
        let abort = none.fault.as_ref().and_then(|f| f.abort.as_ref()).unwrap();
        assert_eq!(abort.http_status, Some(500));
        let old = http
            .iter()
            .find(|r| r.rewrite.is_some())
            .and_then(|r| r.rewrite.as_ref()?.uri_regex_rewrite.as_ref())
            .unwrap();
        let re = regex::Regex::new(&old.pattern).unwrap();
        assert_eq!(re.replace_all("/old/page", old.rewrite.as_str()), "/page");
        assert_eq!(re.replace_all("/old", old.rewrite.as_str()), "/");
    }

    #[test]
    fn a_virtual_service_for_the_host_wins_and_missing_parents_are_reported() {
        let (vs, warnings) = translate(
            r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews}, {kind: Service, name: gone}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
"#,
        );
        assert!(vs.is_empty());
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("VirtualService shop/reviews routes that host")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("names Service shop/gone, which does not exist")),
            "{warnings:?}"
        );
    }
}
