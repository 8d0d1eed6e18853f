//! Istio's validation rules for the resources [`crate::load`] parsed.
//!
//! [`validate`] checks every resource and returns one [`ValidationError`]
//! per broken field, naming file, resource and field path; [`partition`]
//! then drops exactly the invalid resources so the rest stays in force.
//! Cross-resource rules (a subset no DestinationRule defines, a host two
//! VirtualServices route) are checked against the whole configuration.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    Manifests, ResourceId,
    istio::{
        Crd, KubeGatewaySpec,
        gateway_api::{
            BackendObjectRef, GrpcRouteSpec, HttpBackendRef, HttpRouteFilter, HttpRouteSpec,
            L4RouteRule, ParentRef, PathMatchType, PathModifierType, ReferenceGrantSpec,
            ValueMatchType,
        },
        networking::{
            Destination, DestinationRuleSpec, GatewaySpec, HttpMatchRequest, HttpRoute,
            LoadBalancer, Resolution, ServerTlsMode, ServiceEntrySpec, StringMatch, TrafficPolicy,
            VirtualServiceSpec, grpc_status_code,
        },
        security::{AuthorizationAction, AuthorizationPolicySpec, PeerAuthenticationSpec},
    },
};

/// Cluster DNS suffix that short host names are expanded with.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// One rule a resource breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {resource}: field `{path}`: {message}")]
pub struct ValidationError {
    /// File the resource came from (`<unknown>` when not recorded).
    pub source_name: String,
    /// The resource that breaks the rule.
    pub resource: ResourceId,
    /// Dotted path of the field, e.g. `spec.http[0].route[1].weight`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Checks every Istio and Gateway API resource of `manifests`.
pub fn validate(manifests: &Manifests) -> Vec<ValidationError> {
    let mut check = Checker::new(manifests);
    let subsets = defined_subsets(manifests);
    let mut routed_hosts: BTreeMap<(String, String), ResourceId> = BTreeMap::new();
    for vs in &manifests.virtual_services {
        let mut at = check.at(vs);
        virtual_service(&mut at, &vs.spec, namespace_of(vs), &subsets);
        // Two VirtualServices routing the same host for the same gateway
        // conflict; the later one (in file order) is rejected.
        let gateways = if vs.spec.gateways.is_empty() {
            vec!["mesh".to_owned()]
        } else {
            vs.spec.gateways.clone()
        };
        for (i, host) in vs.spec.hosts.iter().enumerate() {
            let fqdn = fqdn(host, namespace_of(vs));
            for gateway in &gateways {
                let key = (gateway.clone(), fqdn.clone());
                match routed_hosts.get(&key) {
                    Some(first) if *first != at.id => at.error(
                        format!("spec.hosts[{i}]"),
                        format!(
                            "host `{host}` on gateway `{gateway}` is already routed by {first}"
                        ),
                    ),
                    _ => {
                        routed_hosts.insert(key, at.id.clone());
                    }
                }
            }
        }
        check.finish(at);
    }
    let mut rule_hosts: BTreeMap<(String, String), ResourceId> = BTreeMap::new();
    for dr in &manifests.destination_rules {
        let mut at = check.at(dr);
        destination_rule(&mut at, &dr.spec);
        if dr.spec.workload_selector.is_none() && !dr.spec.host.is_empty() {
            let key = (
                namespace_of(dr).to_owned(),
                fqdn(&dr.spec.host, namespace_of(dr)),
            );
            match rule_hosts.get(&key) {
                Some(first) if *first != at.id => at.error(
                    "spec.host",
                    format!(
                        "host `{}` already has DestinationRule {first} in this namespace",
                        dr.spec.host
                    ),
                ),
                _ => {
                    rule_hosts.insert(key, at.id.clone());
                }
            }
        }
        check.finish(at);
    }
    for gw in &manifests.istio_gateways {
        let mut at = check.at(gw);
        istio_gateway(&mut at, &gw.spec);
        check.finish(at);
    }
    for se in &manifests.service_entries {
        let mut at = check.at(se);
        service_entry(&mut at, &se.spec);
        check.finish(at);
    }
    for policy in &manifests.authorization_policies {
        let mut at = check.at(policy);
        authorization_policy(&mut at, &policy.spec);
        check.finish(at);
    }
    for pa in &manifests.peer_authentications {
        let mut at = check.at(pa);
        peer_authentication(&mut at, &pa.spec);
        check.finish(at);
    }
    for gw in &manifests.kube_gateways {
        let mut at = check.at(gw);
        kube_gateway(&mut at, &gw.spec);
        check.finish(at);
    }
    for route in &manifests.http_routes {
        let mut at = check.at(route);
        http_route_api(&mut at, &route.spec);
        check.finish(at);
    }
    for route in &manifests.grpc_routes {
        let mut at = check.at(route);
        grpc_route_api(&mut at, &route.spec);
        check.finish(at);
    }
    for route in &manifests.tcp_routes {
        let mut at = check.at(route);
        l4_route_api(&mut at, &route.spec.parent_refs, &[], &route.spec.rules);
        check.finish(at);
    }
    for route in &manifests.tls_routes {
        let mut at = check.at(route);
        l4_route_api(
            &mut at,
            &route.spec.parent_refs,
            &route.spec.hostnames,
            &route.spec.rules,
        );
        check.finish(at);
    }
    for grant in &manifests.reference_grants {
        let mut at = check.at(grant);
        reference_grant(&mut at, &grant.spec);
        check.finish(at);
    }
    check.errors
}

/// Splits `manifests` into the resources that pass [`validate`] and the
/// errors of those that do not; an invalid resource is dropped alone.
///
/// Dropping a resource can invalidate others (a VirtualService naming a
/// subset of a DestinationRule that was just rejected), so validation runs
/// again until nothing more is dropped: what is returned always validates.
pub fn partition(mut manifests: Manifests) -> (Manifests, Vec<ValidationError>) {
    let mut errors: Vec<ValidationError> = Vec::new();
    loop {
        let found = validate(&manifests);
        if found.is_empty() {
            return (manifests, errors);
        }
        let invalid: BTreeSet<ResourceId> = found.iter().map(|e| e.resource.clone()).collect();
        fn keep<S>(list: &mut Vec<Crd<S>>, invalid: &BTreeSet<ResourceId>) {
            list.retain(|r| !invalid.contains(&r.id()));
        }
        keep(&mut manifests.virtual_services, &invalid);
        keep(&mut manifests.destination_rules, &invalid);
        keep(&mut manifests.istio_gateways, &invalid);
        keep(&mut manifests.service_entries, &invalid);
        keep(&mut manifests.authorization_policies, &invalid);
        keep(&mut manifests.peer_authentications, &invalid);
        keep(&mut manifests.kube_gateways, &invalid);
        keep(&mut manifests.http_routes, &invalid);
        keep(&mut manifests.grpc_routes, &invalid);
        keep(&mut manifests.reference_grants, &invalid);
        keep(&mut manifests.tcp_routes, &invalid);
        keep(&mut manifests.tls_routes, &invalid);
        errors.extend(found);
    }
}

/// Expands a short host name (`reviews`) to its cluster FQDN in `namespace`;
/// names with a dot and wildcards are returned unchanged, as Istio does.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.{CLUSTER_DOMAIN}")
    }
}

fn namespace_of<S>(resource: &Crd<S>) -> &str {
    resource
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(crate::DEFAULT_NAMESPACE)
}

impl<S> Crd<S> {
    /// The resource's identity (kind, namespace, name).
    pub fn id(&self) -> ResourceId {
        ResourceId {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            namespace: namespace_of(self).to_owned(),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Subset names per host FQDN, from every DestinationRule.
fn defined_subsets(manifests: &Manifests) -> BTreeMap<String, BTreeSet<&str>> {
    let mut subsets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for dr in &manifests.destination_rules {
        let host = fqdn(&dr.spec.host, namespace_of(dr));
        subsets
            .entry(host)
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    subsets
}

/// Accumulates errors; [`At`] is the view for one resource.
struct Checker<'a> {
    sources: &'a BTreeMap<ResourceId, String>,
    errors: Vec<ValidationError>,
}

struct At {
    id: ResourceId,
    source_name: String,
    errors: Vec<ValidationError>,
}

impl<'a> Checker<'a> {
    fn new(manifests: &'a Manifests) -> Self {
        Self {
            sources: &manifests.sources,
            errors: Vec::new(),
        }
    }

    fn at<S>(&self, resource: &Crd<S>) -> At {
        let id = resource.id();
        let source_name = self
            .sources
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "<unknown>".to_owned());
        At {
            id,
            source_name,
            errors: Vec::new(),
        }
    }

    fn finish(&mut self, at: At) {
        self.errors.extend(at.errors);
    }
}

impl At {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            source_name: self.source_name.clone(),
            resource: self.id.clone(),
            path: path.into(),
            message: message.into(),
        });
    }

    fn port(&mut self, path: impl Into<String>, port: u32) {
        if !(1..=65535).contains(&port) {
            self.error(path, format!("port {port} is not in 1-65535"));
        }
    }

    fn percent(&mut self, path: impl Into<String>, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.error(path, format!("percentage {value} is not in 0-100"));
        }
    }

    fn non_negative(&mut self, path: impl Into<String>, value: Option<i64>) {
        if let Some(value) = value.filter(|v| *v < 0) {
            self.error(path, format!("{value} is negative"));
        }
    }

    fn string_match(&mut self, path: &str, m: &StringMatch) {
        let set = [&m.exact, &m.prefix, &m.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            self.error(path, "only one of exact, prefix and regex may be set");
        }
        if let Some(re) = &m.regex
            && let Err(err) = regex::Regex::new(re)
        {
            self.error(
                format!("{path}.regex"),
                format!("regex `{re}` does not compile: {}", first_line(&err)),
            );
        }
    }

    fn host(&mut self, path: &str, host: &str) {
        if let Err(why) = check_host(host) {
            self.error(path, format!("host `{host}` {why}"));
        }
    }

    fn cidr(&mut self, path: &str, value: &str) {
        let (addr, prefix) = value.split_once('/').unwrap_or((value, ""));
        let Ok(ip) = addr.parse::<IpAddr>() else {
            self.error(path, format!("`{value}` is not an IP address or CIDR"));
            return;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if !prefix.is_empty() && !prefix.parse::<u8>().is_ok_and(|p| p <= max) {
            self.error(path, format!("`{value}` has an invalid prefix length"));
        }
    }
}

fn first_line(err: &impl std::fmt::Display) -> String {
    err.to_string()
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// A DNS name, optionally with a leading `*.` wildcard, or `*` alone.
/// (A `namespace/host` form is allowed in Gateway server hosts only.)
fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("is empty");
    }
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.len() > 253 {
        return Err("is longer than 253 characters");
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err("is not a valid DNS name (wildcards only as a leading `*.`)");
        }
    }
    Ok(())
}

fn virtual_service(
    at: &mut At,
    spec: &VirtualServiceSpec,
    namespace: &str,
    subsets: &BTreeMap<String, BTreeSet<&str>>,
) {
    if spec.hosts.is_empty() {
        at.error("spec.hosts", "at least one host is required");
    }
    let mut seen = BTreeSet::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        at.host(&format!("spec.hosts[{i}]"), host);
        if !seen.insert(fqdn(host, namespace)) {
            at.error(
                format!("spec.hosts[{i}]"),
                format!("duplicate host `{host}`"),
            );
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        at.error(
            "spec",
            "at least one of http, tcp or tls routes is required",
        );
    }
    let destination = |at: &mut At, path: &str, d: &Destination| {
        if d.host.is_empty() {
            at.error(format!("{path}.host"), "destination host is required");
            return;
        }
        at.host(&format!("{path}.host"), &d.host);
        if let Some(port) = d.port.as_ref().and_then(|p| p.number) {
            at.port(format!("{path}.port.number"), port);
        }
        if let Some(subset) = &d.subset {
            let host = fqdn(&d.host, namespace);
            if !subsets
                .get(&host)
                .is_some_and(|s| s.contains(subset.as_str()))
            {
                at.error(
                    format!("{path}.subset"),
                    format!(
                        "subset `{subset}` of host `{}` is not defined by any DestinationRule",
                        d.host
                    ),
                );
            }
        }
    };
    for (i, route) in spec.http.iter().enumerate() {
        http_route(at, &format!("spec.http[{i}]"), route, &destination);
    }
    for (kind, routes) in [
        ("tcp", spec.tcp.iter().map(|r| &r.route).collect::<Vec<_>>()),
        ("tls", spec.tls.iter().map(|r| &r.route).collect()),
    ] {
        for (i, route) in routes.into_iter().enumerate() {
            let path = format!("spec.{kind}[{i}]");
            if route.is_empty() {
                at.error(
                    format!("{path}.route"),
                    "at least one destination is required",
                );
            }
            for (j, dest) in route.iter().enumerate() {
                destination(
                    at,
                    &format!("{path}.route[{j}].destination"),
                    &dest.destination,
                );
            }
            weights(at, &path, route.iter().map(|d| d.weight));
        }
    }
    for (i, tls) in spec.tls.iter().enumerate() {
        for (j, m) in tls.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                at.error(
                    format!("spec.tls[{i}].match[{j}].sniHosts"),
                    "TLS routes must match at least one SNI host",
                );
            }
        }
    }
}

fn http_route(
    at: &mut At,
    path: &str,
    route: &HttpRoute,
    destination: &dyn Fn(&mut At, &str, &Destination),
) {
    for (j, m) in route.matches.iter().enumerate() {
        http_match(at, &format!("{path}.match[{j}]"), m);
    }
    match (&route.redirect, route.route.is_empty()) {
        (Some(_), false) => at.error(
            format!("{path}.redirect"),
            "a route may not have both redirect and route",
        ),
        (None, true) => at.error(
            format!("{path}.route"),
            "at least one destination (or a redirect) is required",
        ),
        _ => {}
    }
    if let Some(code) = route.redirect.as_ref().and_then(|r| r.redirect_code)
        && !(300..=399).contains(&code)
    {
        at.error(
            format!("{path}.redirect.redirectCode"),
            format!("{code} is not a 3xx status"),
        );
    }
    if route.redirect.is_some() && route.rewrite.is_some() {
        at.error(
            format!("{path}.rewrite"),
            "a route may not have both redirect and rewrite",
        );
    }
    if let Some(rewrite) = &route.rewrite {
        if rewrite.uri.is_some() && rewrite.uri_regex_rewrite.is_some() {
            at.error(
                format!("{path}.rewrite"),
                "only one of uri and uriRegexRewrite may be set",
            );
        }
        if let Some(re) = &rewrite.uri_regex_rewrite
            && let Err(err) = regex::Regex::new(&re.pattern)
        {
            at.error(
                format!("{path}.rewrite.uriRegexRewrite.match"),
                format!(
                    "regex `{}` does not compile: {}",
                    re.pattern,
                    first_line(&err)
                ),
            );
        }
    }
    for (j, dest) in route.route.iter().enumerate() {
        destination(
            at,
            &format!("{path}.route[{j}].destination"),
            &dest.destination,
        );
    }
    weights(at, path, route.route.iter().map(|d| d.weight));
    if let Some(mirror) = &route.mirror {
        destination(at, &format!("{path}.mirror"), mirror);
    }
    if let Some(p) = &route.mirror_percentage {
        at.percent(format!("{path}.mirrorPercentage.value"), p.value);
    }
    for (j, mirror) in route.mirrors.iter().enumerate() {
        destination(
            at,
            &format!("{path}.mirrors[{j}].destination"),
            &mirror.destination,
        );
        if let Some(p) = &mirror.percentage {
            at.percent(format!("{path}.mirrors[{j}].percentage.value"), p.value);
        }
    }
    if let Some(retries) = &route.retries {
        at.non_negative(format!("{path}.retries.attempts"), retries.attempts);
        if retries.per_try_timeout.is_some_and(|t| t.0.is_zero()) {
            at.error(
                format!("{path}.retries.perTryTimeout"),
                "per-try timeout must be positive",
            );
        }
    }
    if let Some(fault) = &route.fault {
        if fault.delay.is_none() && fault.abort.is_none() {
            at.error(format!("{path}.fault"), "a fault needs a delay or an abort");
        }
        if let Some(delay) = &fault.delay {
            if delay.fixed_delay.is_none() {
                at.error(
                    format!("{path}.fault.delay.fixedDelay"),
                    "a delay needs a fixedDelay",
                );
            }
            if let Some(p) = &delay.percentage {
                at.percent(format!("{path}.fault.delay.percentage.value"), p.value);
            }
            if let Some(p) = delay.percent {
                at.percent(format!("{path}.fault.delay.percent"), p as f64);
            }
        }
        if let Some(abort) = &fault.abort {
            match (abort.http_status, &abort.grpc_status) {
                (Some(code), _) if !(200..=599).contains(&code) => at.error(
                    format!("{path}.fault.abort.httpStatus"),
                    format!("{code} is not an HTTP status in 200-599"),
                ),
                (None, None) => at.error(
                    format!("{path}.fault.abort"),
                    "an abort needs httpStatus or grpcStatus",
                ),
                (None, Some(name)) if grpc_status_code(name).is_none() => at.error(
                    format!("{path}.fault.abort.grpcStatus"),
                    format!("{name:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                ),
                (Some(_), Some(_)) => at.error(
                    format!("{path}.fault.abort"),
                    "an abort has either httpStatus or grpcStatus, not both",
                ),
                _ => {}
            }
            if let Some(p) = &abort.percentage {
                at.percent(format!("{path}.fault.abort.percentage.value"), p.value);
            }
        }
    }
    for (part, headers) in [
        (
            "request",
            route.headers.as_ref().and_then(|h| h.request.as_ref()),
        ),
        (
            "response",
            route.headers.as_ref().and_then(|h| h.response.as_ref()),
        ),
    ] {
        let Some(ops) = headers else { continue };
        for name in ops.set.keys().chain(ops.add.keys()).chain(&ops.remove) {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                at.error(
                    format!("{path}.headers.{part}"),
                    format!("`{name}` is not a valid header name"),
                );
            }
        }
    }
}

fn http_match(at: &mut At, path: &str, m: &HttpMatchRequest) {
    for (field, value) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(value) = value {
            at.string_match(&format!("{path}.{field}"), value);
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
        ("queryParams", &m.query_params),
    ] {
        for (name, value) in map {
            let field_path = format!("{path}.{field}.{name}");
            if field != "queryParams" && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                at.error(&field_path, format!("`{name}` is not a valid header name"));
            }
            at.string_match(&field_path, value);
        }
    }
    if let Some(port) = m.port {
        at.port(format!("{path}.port"), port);
    }
}

/// Weights: none negative; when any is given, they sum to 100.
fn weights(at: &mut At, path: &str, weights: impl Iterator<Item = Option<i64>> + Clone) {
    let count = weights.clone().count();
    let mut sum = 0;
    let mut any = false;
    for (j, w) in weights.enumerate() {
        if let Some(w) = w {
            any |= w != 0 || count > 1;
            if w < 0 {
                at.error(format!("{path}.route[{j}].weight"), "weight is negative");
            }
            sum += w;
        }
    }
    if (any || count > 1) && sum != 100 && !(count == 1 && sum == 0) {
        at.error(
            format!("{path}.route"),
            format!("destination weights sum to {sum}, not 100"),
        );
    }
}

fn destination_rule(at: &mut At, spec: &DestinationRuleSpec) {
    if spec.host.is_empty() {
        at.error("spec.host", "host is required");
    } else {
        at.host("spec.host", &spec.host);
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(at, "spec.trafficPolicy", policy);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            at.error(format!("{path}.name"), "subset name is required");
        } else if !names.insert(subset.name.as_str()) {
            at.error(
                format!("{path}.name"),
                format!("duplicate subset `{}`", subset.name),
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(at, &format!("{path}.trafficPolicy"), policy);
        }
    }
}

fn traffic_policy(at: &mut At, path: &str, policy: &TrafficPolicy) {
    if let Some(lb) = &policy.load_balancer {
        load_balancer(at, &format!("{path}.loadBalancer"), lb);
    }
    if let Some(pool) = &policy.connection_pool {
        connection_pool(at, &format!("{path}.connectionPool"), pool);
    }
    if let Some(od) = &policy.outlier_detection {
        outlier(at, &format!("{path}.outlierDetection"), od);
    }
    let mut ports = BTreeSet::new();
    for (i, port_policy) in policy.port_level_settings.iter().enumerate() {
        let p = format!("{path}.portLevelSettings[{i}]");
        match port_policy.port.as_ref().and_then(|p| p.number) {
            None => at.error(format!("{p}.port.number"), "port number is required"),
            Some(n) => {
                at.port(format!("{p}.port.number"), n);
                if !ports.insert(n) {
                    at.error(format!("{p}.port.number"), format!("duplicate port {n}"));
                }
            }
        }
        if let Some(lb) = &port_policy.load_balancer {
            load_balancer(at, &format!("{p}.loadBalancer"), lb);
        }
        if let Some(pool) = &port_policy.connection_pool {
            connection_pool(at, &format!("{p}.connectionPool"), pool);
        }
        if let Some(od) = &port_policy.outlier_detection {
            outlier(at, &format!("{p}.outlierDetection"), od);
        }
    }
}

fn load_balancer(at: &mut At, path: &str, lb: &LoadBalancer) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        at.error(path, "only one of simple and consistentHash may be set");
    }
    if let Some(hash) = &lb.consistent_hash {
        let keys = [
            hash.http_header_name.is_some(),
            hash.http_cookie.is_some(),
            hash.use_source_ip == Some(true),
            hash.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if keys != 1 {
            at.error(
                format!("{path}.consistentHash"),
                "exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName is required",
            );
        }
        if let Some(cookie) = &hash.http_cookie
            && cookie.name.is_empty()
        {
            at.error(
                format!("{path}.consistentHash.httpCookie.name"),
                "cookie name is required",
            );
        }
    }
}

fn connection_pool(at: &mut At, path: &str, pool: &crate::istio::networking::ConnectionPool) {
    if let Some(tcp) = &pool.tcp {
        at.non_negative(format!("{path}.tcp.maxConnections"), tcp.max_connections);
    }
    if let Some(http) = &pool.http {
        for (field, value) in [
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ] {
            at.non_negative(format!("{path}.http.{field}"), value);
        }
    }
}

fn outlier(at: &mut At, path: &str, od: &crate::istio::networking::OutlierDetection) {
    for (field, value) in [
        ("consecutiveErrors", od.consecutive_errors),
        ("consecutive5xxErrors", od.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
    ] {
        at.non_negative(format!("{path}.{field}"), value);
    }
    for (field, value) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(v) = value {
            at.percent(format!("{path}.{field}"), v as f64);
        }
    }
}

const SERVER_PROTOCOLS: [&str; 7] = ["HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "TCP", "TLS"];

fn istio_gateway(at: &mut At, spec: &GatewaySpec) {
    if spec.servers.is_empty() {
        at.error("spec.servers", "at least one server is required");
    }
    let mut names = BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let path = format!("spec.servers[{i}]");
        let Some(port) = &server.port else {
            at.error(format!("{path}.port"), "port is required");
            continue;
        };
        at.port(format!("{path}.port.number"), port.number);
        let protocol = port
            .protocol
            .as_deref()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if !SERVER_PROTOCOLS.contains(&protocol.as_str()) {
            at.error(
                format!("{path}.port.protocol"),
                format!(
                    "protocol `{}` is not one of {}",
                    port.protocol.as_deref().unwrap_or_default(),
                    SERVER_PROTOCOLS.join(", ")
                ),
            );
        }
        if let Some(name) = &port.name
            && !names.insert(name.as_str())
        {
            at.error(
                format!("{path}.port.name"),
                format!("duplicate port name `{name}`"),
            );
        }
        if server.hosts.is_empty() {
            at.error(format!("{path}.hosts"), "at least one host is required");
        }
        for (j, host) in server.hosts.iter().enumerate() {
            // `namespace/host`, where namespace may be `.` or `*`.
            let name = host.split_once('/').map_or(host.as_str(), |(_, h)| h);
            at.host(&format!("{path}.hosts[{j}]"), name);
        }
        let tls_needed = matches!(protocol.as_str(), "HTTPS" | "TLS");
        match &server.tls {
            None if tls_needed => at.error(
                format!("{path}.tls"),
                format!("a {protocol} server needs tls settings"),
            ),
            Some(tls) => {
                let terminates = matches!(
                    tls.mode,
                    Some(
                        ServerTlsMode::Simple
                            | ServerTlsMode::Mutual
                            | ServerTlsMode::OptionalMutual
                    )
                );
                let has_files = tls.server_certificate.is_some() && tls.private_key.is_some();
                if terminates && tls.credential_name.is_none() && !has_files {
                    at.error(
                        format!("{path}.tls"),
                        "SIMPLE and MUTUAL need credentialName or serverCertificate and privateKey",
                    );
                }
                if tls.https_redirect != Some(true) && tls.mode.is_none() && tls_needed {
                    at.error(format!("{path}.tls.mode"), "tls mode is required");
                }
            }
            None => {}
        }
    }
}

fn service_entry(at: &mut At, spec: &ServiceEntrySpec) {
    if spec.hosts.is_empty() {
        at.error("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        at.host(&format!("spec.hosts[{i}]"), host);
    }
    for (i, address) in spec.addresses.iter().enumerate() {
        at.cidr(&format!("spec.addresses[{i}]"), address);
    }
    let mut names = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        at.port(format!("spec.ports[{i}].number"), port.number);
        if let Some(name) = &port.name
            && !names.insert(name.as_str())
        {
            at.error(
                format!("spec.ports[{i}].name"),
                format!("duplicate port name `{name}`"),
            );
        }
    }
    let resolution = spec.resolution.unwrap_or(Resolution::None);
    if resolution == Resolution::Static
        && spec.endpoints.is_empty()
        && spec.workload_selector.is_none()
    {
        at.error(
            "spec.endpoints",
            "STATIC resolution needs endpoints or a workloadSelector",
        );
    }
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        at.error(
            "spec.workloadSelector",
            "only one of endpoints and workloadSelector may be set",
        );
    }
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}].address");
        if resolution == Resolution::Static
            && endpoint.address.parse::<IpAddr>().is_err()
            && !endpoint.address.starts_with("unix://")
        {
            at.error(
                path,
                format!(
                    "STATIC endpoints need an IP address, not `{}`",
                    endpoint.address
                ),
            );
        } else if endpoint.address.is_empty() && resolution != Resolution::Static {
            at.error(path, "address is required");
        }
        for (name, port) in &endpoint.ports {
            at.port(format!("spec.endpoints[{i}].ports.{name}"), *port);
        }
    }
}

fn authorization_policy(at: &mut At, spec: &AuthorizationPolicySpec) {
    let action = spec.action.unwrap_or(AuthorizationAction::Allow);
    match (action, &spec.provider) {
        (AuthorizationAction::Custom, None) => {
            at.error("spec.provider", "action CUSTOM needs a provider");
        }
        (AuthorizationAction::Custom, Some(_)) | (_, None) => {}
        (_, Some(_)) => at.error(
            "spec.provider",
            "a provider is only allowed with action CUSTOM",
        ),
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        at.error(
            "spec.selector",
            "only one of selector and targetRef(s) may be set",
        );
    }
    let refs = spec
        .target_ref
        .iter()
        .map(|r| ("spec.targetRef".to_owned(), r));
    let refs = refs.chain(
        spec.target_refs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
    );
    for (path, target) in refs {
        for field in ["kind", "name"] {
            if target
                .get(field)
                .and_then(|v| v.as_str())
                .is_none_or(str::is_empty)
            {
                at.error(format!("{path}.{field}"), format!("{field} is required"));
            }
        }
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let p = format!("{path}.from[{j}].source");
            for (field, list) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for (k, value) in list.iter().enumerate() {
                    at.cidr(&format!("{p}.{field}[{k}]"), value);
                }
            }
            for (field, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
            ] {
                for (k, value) in list.iter().enumerate() {
                    if value.is_empty() {
                        at.error(format!("{p}.{field}[{k}]"), "value is empty");
                    }
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let op = &to.operation;
            let p = format!("{path}.to[{j}].operation");
            for (field, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (k, value) in list.iter().enumerate() {
                    match value.parse::<u32>() {
                        Ok(port) => at.port(format!("{p}.{field}[{k}]"), port),
                        Err(_) => at.error(
                            format!("{p}.{field}[{k}]"),
                            format!("`{value}` is not a port number"),
                        ),
                    }
                }
            }
        }
        for (j, condition) in rule.when.iter().enumerate() {
            let p = format!("{path}.when[{j}]");
            if condition.key.is_empty() {
                at.error(format!("{p}.key"), "key is required");
            } else if !known_condition_key(&condition.key) {
                at.error(
                    format!("{p}.key"),
                    format!("unknown key `{}`", condition.key),
                );
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                at.error(p, "values or notValues is required");
            }
        }
    }
}

/// The attributes Istio accepts in an AuthorizationPolicy `when` condition.
fn known_condition_key(key: &str) -> bool {
    const EXACT: [&str; 10] = [
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|name| !name.is_empty())
    };
    EXACT.contains(&key)
        || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
        || key.starts_with("experimental.envoy.filters.")
}

fn peer_authentication(at: &mut At, spec: &PeerAuthenticationSpec) {
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        at.error(
            "spec.portLevelMtls",
            "port-level mTLS needs a workload selector",
        );
    }
    for port in spec.port_level_mtls.keys() {
        at.port(format!("spec.portLevelMtls.{port}"), *port);
    }
}

fn kube_gateway(at: &mut At, spec: &KubeGatewaySpec) {
    if spec.gateway_class_name.is_empty() {
        at.error("spec.gatewayClassName", "gatewayClassName is required");
    }
    let mut names = BTreeSet::new();
    for (i, listener) in spec.listeners.iter().enumerate() {
        let path = format!("spec.listeners[{i}]");
        at.port(format!("{path}.port"), listener.port);
        if !names.insert(listener.name.as_str()) {
            at.error(
                format!("{path}.name"),
                format!("duplicate listener name `{}`", listener.name),
            );
        }
        if listener.protocol.is_empty() {
            at.error(format!("{path}.protocol"), "protocol is required");
        }
        if let Some(hostname) = &listener.hostname {
            if hostname == "*" || hostname.contains('/') {
                at.error(
                    format!("{path}.hostname"),
                    format!("hostname `{hostname}` is not a DNS name or `*.`-prefixed wildcard"),
                );
            } else {
                at.host(&format!("{path}.hostname"), hostname);
            }
        }
        let tls = listener.tls.as_ref();
        let passthrough = tls.and_then(|t| t.mode.as_deref()) == Some("Passthrough");
        if let Some(mode) = tls.and_then(|t| t.mode.as_deref())
            && !matches!(mode, "Terminate" | "Passthrough")
        {
            at.error(
                format!("{path}.tls.mode"),
                format!("mode `{mode}` is not Terminate or Passthrough"),
            );
        }
        let terminates = match listener.protocol.as_str() {
            "HTTPS" => true,
            "TLS" => !passthrough,
            _ => false,
        };
        if terminates && tls.is_none_or(|t| t.certificate_refs.is_empty()) {
            at.error(
                format!("{path}.tls.certificateRefs"),
                format!(
                    "a {} listener that terminates TLS needs a certificateRef",
                    listener.protocol
                ),
            );
        }
        let valid = listener.protocol_kinds();
        for (k, kind) in listener.allowed_kinds().iter().enumerate() {
            if !valid.iter().any(|v| kind.is(v)) {
                at.error(
                    format!("{path}.allowedRoutes.kinds[{k}]"),
                    format!(
                        "{}{} routes cannot attach to a {} listener (it takes {})",
                        kind.group
                            .as_deref()
                            .map(|g| format!("{g}/"))
                            .unwrap_or_default(),
                        kind.kind,
                        listener.protocol,
                        if valid.is_empty() {
                            "none".to_owned()
                        } else {
                            valid.join(", ")
                        }
                    ),
                );
            }
        }
        if let Some(namespaces) = listener
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref())
        {
            match namespaces.from.as_deref() {
                None | Some("Same" | "All") => {}
                Some("Selector") if namespaces.selector.is_some() => {}
                Some("Selector") => at.error(
                    format!("{path}.allowedRoutes.namespaces.selector"),
                    "from: Selector needs a selector",
                ),
                Some(other) => at.error(
                    format!("{path}.allowedRoutes.namespaces.from"),
                    format!("`{other}` is not Same, All or Selector"),
                ),
            }
        }
    }
}

/// A route's `parentRefs`: at least one, each named, ports in range.
fn parent_refs(at: &mut At, parents: &[ParentRef]) {
    if parents.is_empty() {
        at.error("spec.parentRefs", "a route needs at least one parentRef");
    }
    for (i, parent) in parents.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            at.error(format!("{path}.name"), "name is required");
        }
        if let Some(port) = parent.port {
            at.port(format!("{path}.port"), port);
        }
    }
}

/// Gateway API TCPRoute and TLSRoute rules: parents as for every route,
/// exactly one rule (a connection has nothing to match on), backends as
/// for HTTPRoute, and for TLSRoute host names that are DNS names or `*.`
/// wildcards.
fn l4_route_api(at: &mut At, parents: &[ParentRef], hostnames: &[String], rules: &[L4RouteRule]) {
    parent_refs(at, parents);
    for (h, host) in hostnames.iter().enumerate() {
        at.host(&format!("spec.hostnames[{h}]"), host);
    }
    if rules.len() != 1 {
        at.error(
            "spec.rules",
            format!(
                "exactly one rule is supported ({} given): a connection has nothing to match on",
                rules.len()
            ),
        );
    }
    for (r, rule) in rules.iter().enumerate() {
        let path = format!("spec.rules[{r}]");
        if rule.backend_refs.is_empty() {
            at.error(
                format!("{path}.backendRefs"),
                "a rule needs at least one backend",
            );
        }
        backends_of(
            at,
            &path,
            rule.backend_refs.iter().map(|b| (&b.backend, b.weight)),
        );
    }
}

/// Gateway API ReferenceGrant rules: at least one `from` and one `to`;
/// each names its group (`""` for the core group) and kind, and each
/// `from` a namespace.
fn reference_grant(at: &mut At, spec: &ReferenceGrantSpec) {
    for (list, empty) in [("from", spec.from.is_empty()), ("to", spec.to.is_empty())] {
        if empty {
            at.error(
                format!("spec.{list}"),
                format!("a ReferenceGrant needs at least one `{list}` entry"),
            );
        }
    }
    let mut named = |path: String, group: &Option<String>, kind: &str| {
        if group.is_none() {
            at.error(
                format!("{path}.group"),
                "group is required (\"\" for the core group)",
            );
        }
        if kind.is_empty() {
            at.error(format!("{path}.kind"), "kind is required");
        }
    };
    for (i, from) in spec.from.iter().enumerate() {
        named(format!("spec.from[{i}]"), &from.group, &from.kind);
    }
    for (i, to) in spec.to.iter().enumerate() {
        named(format!("spec.to[{i}]"), &to.group, &to.kind);
    }
    for (i, from) in spec.from.iter().enumerate() {
        if from.namespace.is_empty() {
            at.error(format!("spec.from[{i}].namespace"), "namespace is required");
        }
    }
}

/// Gateway API GRPCRoute rules (the Gateway API's own validation): a
/// method match names a service or a method; exact names hold no `/`;
/// patterns compile; header matches are named.
fn grpc_route_api(at: &mut At, spec: &GrpcRouteSpec) {
    parent_refs(at, &spec.parent_refs);
    for (r, rule) in spec.rules.iter().enumerate() {
        backend_refs(at, &format!("spec.rules[{r}]"), &rule.backend_refs);
        for (f, filter) in rule.filters.iter().enumerate() {
            if !matches!(
                filter.type_.as_str(),
                "RequestHeaderModifier" | "ResponseHeaderModifier" | "RequestMirror"
            ) {
                at.error(
                    format!("spec.rules[{r}].filters[{f}].type"),
                    format!(
                        "filter `{}` is not supported in a GRPCRoute (RequestHeaderModifier, ResponseHeaderModifier and RequestMirror are)",
                        filter.type_
                    ),
                );
            }
        }
        for (m, matched) in rule.matches.iter().enumerate() {
            let path = format!("spec.rules[{r}].matches[{m}]");
            if let Some(method) = &matched.method {
                let path = format!("{path}.method");
                if method.service.is_none() && method.method.is_none() {
                    at.error(&path, "a method match needs a service or a method");
                }
                let regex = method.type_ == Some(ValueMatchType::RegularExpression);
                for (field, value) in [("service", &method.service), ("method", &method.method)] {
                    let Some(value) = value else { continue };
                    if regex {
                        if let Err(err) = regex::Regex::new(value) {
                            at.error(
                                format!("{path}.{field}"),
                                format!("regex `{value}` does not compile: {}", first_line(&err)),
                            );
                        }
                    } else if value.is_empty() || value.contains('/') {
                        at.error(
                            format!("{path}.{field}"),
                            format!("`{value}` is not a gRPC {field} name (empty, or holds `/`)"),
                        );
                    }
                }
            }
            for (h, header) in matched.headers.iter().enumerate() {
                let path = format!("{path}.headers[{h}]");
                if header.name.is_empty() {
                    at.error(format!("{path}.name"), "name is required");
                }
                if header.type_ == Some(ValueMatchType::RegularExpression)
                    && let Err(err) = regex::Regex::new(&header.value)
                {
                    at.error(
                        format!("{path}.value"),
                        format!(
                            "regex `{}` does not compile: {}",
                            header.value,
                            first_line(&err)
                        ),
                    );
                }
            }
        }
    }
}

/// Gateway API HTTPRoute rules (the Gateway API's own validation).
fn http_route_api(at: &mut At, spec: &HttpRouteSpec) {
    parent_refs(at, &spec.parent_refs);
    let regex = |at: &mut At, path: String, re: &str| {
        if let Err(err) = regex::Regex::new(re) {
            at.error(
                path,
                format!("regex `{re}` does not compile: {}", first_line(&err)),
            );
        }
    };
    for (r, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{r}]");
        if let Some(timeouts) = &rule.timeouts
            && let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && !request.0.is_zero()
            && backend.0 > request.0
        {
            at.error(
                format!("{path}.timeouts.backendRequest"),
                format!(
                    "backendRequest {:?} is longer than request {:?}",
                    backend.0, request.0
                ),
            );
        }
        let mut prefix_matches = true;
        for (m, matched) in rule.matches.iter().enumerate() {
            let path = format!("{path}.matches[{m}]");
            if let Some(p) = &matched.path {
                let value = p.value.as_deref().unwrap_or("/");
                match p.type_.unwrap_or(PathMatchType::PathPrefix) {
                    PathMatchType::RegularExpression => {
                        prefix_matches = false;
                        regex(at, format!("{path}.path.value"), value);
                    }
                    kind => {
                        prefix_matches &= kind == PathMatchType::PathPrefix;
                        if !value.starts_with('/') {
                            at.error(
                                format!("{path}.path.value"),
                                format!("path `{value}` must start with /"),
                            );
                        }
                    }
                }
            }
            for (field, list) in [
                ("headers", &matched.headers),
                ("queryParams", &matched.query_params),
            ] {
                for (h, value) in list.iter().enumerate() {
                    let path = format!("{path}.{field}[{h}]");
                    if value.name.is_empty() {
                        at.error(format!("{path}.name"), "name is required");
                    }
                    if value.type_ == Some(ValueMatchType::RegularExpression) {
                        regex(at, format!("{path}.value"), &value.value);
                    }
                }
            }
        }
        let mut all_filters: Vec<(String, &HttpRouteFilter)> = rule
            .filters
            .iter()
            .enumerate()
            .map(|(f, filter)| (format!("{path}.filters[{f}]"), filter))
            .collect();
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            for (f, filter) in backend.filters.iter().enumerate() {
                all_filters.push((format!("{path}.backendRefs[{b}].filters[{f}]"), filter));
            }
        }
        for (path, filter) in all_filters {
            let present = match filter.type_.as_str() {
                "RequestHeaderModifier" => filter.request_header_modifier.is_some(),
                "ResponseHeaderModifier" => filter.response_header_modifier.is_some(),
                "RequestRedirect" => filter.request_redirect.is_some(),
                "URLRewrite" => filter.url_rewrite.is_some(),
                "RequestMirror" => filter.request_mirror.is_some(),
                other => {
                    at.error(
                        format!("{path}.type"),
                        format!("filter type `{other}` is not supported"),
                    );
                    continue;
                }
            };
            if !present {
                at.error(
                    path.clone(),
                    format!("a {} filter needs its settings", filter.type_),
                );
            }
            let paths = [
                filter
                    .request_redirect
                    .as_ref()
                    .and_then(|r| r.path.as_ref()),
                filter.url_rewrite.as_ref().and_then(|r| r.path.as_ref()),
            ];
            for modifier in paths.into_iter().flatten() {
                let (value, field) = match modifier.type_ {
                    PathModifierType::ReplaceFullPath => {
                        (&modifier.replace_full_path, "replaceFullPath")
                    }
                    PathModifierType::ReplacePrefixMatch => {
                        (&modifier.replace_prefix_match, "replacePrefixMatch")
                    }
                };
                if value.is_none() {
                    at.error(
                        format!("{path}.path.{field}"),
                        format!("{field} is required"),
                    );
                }
                if modifier.type_ == PathModifierType::ReplacePrefixMatch && !prefix_matches {
                    at.error(
                        format!("{path}.path"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                    );
                }
            }
            if let Some(code) = filter.request_redirect.as_ref().and_then(|r| r.status_code)
                && !matches!(code, 301 | 302 | 303 | 307 | 308)
            {
                at.error(
                    format!("{path}.requestRedirect.statusCode"),
                    format!("{code} is not a redirect status"),
                );
            }
        }
        backend_refs(at, &path, &rule.backend_refs);
    }
}

/// A route rule's backends: Services with a port and a non-negative weight.
fn backend_refs(at: &mut At, rule_path: &str, backends: &[HttpBackendRef]) {
    backends_of(
        at,
        rule_path,
        backends.iter().map(|b| (&b.backend, b.weight)),
    );
}

/// Each backend (with its weight) is a Service with a port and a
/// non-negative weight.
fn backends_of<'a>(
    at: &mut At,
    rule_path: &str,
    backends: impl Iterator<Item = (&'a BackendObjectRef, Option<i64>)>,
) {
    for (b, (backend, weight)) in backends.enumerate() {
        let path = format!("{rule_path}.backendRefs[{b}]");
        at.non_negative(format!("{path}.weight"), weight);
        if backend.kind.as_deref().is_some_and(|k| k != "Service") {
            at.error(
                format!("{path}.kind"),
                "only Service backends are supported",
            );
        }
        match backend.port {
            None => at.error(format!("{path}.port"), "a Service backend needs a port"),
            Some(port) => at.port(format!("{path}.port"), port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load_str;

    fn errors(yaml: &str) -> Vec<String> {
        let loaded = load_str("t.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        validate(&loaded.manifests)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: bk}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n";

    #[test]
    fn weights_must_sum_to_100() {
        let errs = errors(&format!(
            "{DR}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: bk}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: 80}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: 30}}\n"
        ));
        assert_eq!(
            errs,
            [
                "t.yaml: VirtualService bk/r: field `spec.http[0].route`: destination weights sum to 110, not 100"
            ]
        );
    }

    #[test]
    fn undefined_subsets_are_named_with_their_host() {
        let errs = errors(&format!(
            "{DR}apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: r, namespace: bk}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews.bk.svc.cluster.local, subset: v3}}}}]\n"
        ));
        assert_eq!(
            errs,
            [
                "t.yaml: VirtualService bk/r: field `spec.http[0].route[0].destination.subset`: subset `v3` of host `reviews.bk.svc.cluster.local` is not defined by any DestinationRule"
            ]
        );
    }

    #[test]
    fn short_and_long_names_resolve_to_the_same_subsets() {
        let errs = errors(&format!(
            "{DR}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: bk}}\nspec:\n  hosts: [reviews.bk.svc.cluster.local]\n  http:\n  - route: [{{destination: {{host: reviews.bk.svc.cluster.local, subset: v2}}}}]\n"
        ));
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn regexes_must_compile() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n  - match: [{uri: {regex: '/api/(v1'}}, {headers: {end-user: {regex: '[a-'}}}]\n    route: [{destination: {host: a}}]\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains(
                "field `spec.http[0].match[0].uri.regex`: regex `/api/(v1` does not compile"
            ),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("field `spec.http[0].match[1].headers.end-user.regex`"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn duplicate_hosts_within_and_across_virtual_services() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: n}\nspec:\n  hosts: [web, web.n.svc.cluster.local]\n  http: [{route: [{destination: {host: web}}]}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: n}\nspec:\n  hosts: [web]\n  http: [{route: [{destination: {host: web}}]}]\n",
        );
        assert_eq!(
            errs,
            [
                "t.yaml: VirtualService n/a: field `spec.hosts[1]`: duplicate host `web.n.svc.cluster.local`",
                "t.yaml: VirtualService n/b: field `spec.hosts[0]`: host `web` on gateway `mesh` is already routed by VirtualService n/a"
            ]
        );
    }

    #[test]
    fn fault_values_are_bounded() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n  - fault: {abort: {httpStatus: 700, percentage: {value: 150}}, delay: {percentage: {value: 10}}}\n    route: [{destination: {host: a}}]\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("`spec.http[0].fault.delay.fixedDelay`"))
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("`spec.http[0].fault.abort.httpStatus`: 700 is not"))
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("`spec.http[0].fault.abort.percentage.value`: percentage 150"))
        );
    }

    /// `errs` holds one error containing each of `expect`, and no other.
    fn assert_exactly(errs: &[String], expect: &[&str]) {
        for e in expect {
            assert!(
                errs.iter().any(|got| got.contains(e)),
                "no {e:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    }

    #[test]
    fn tcp_and_tls_routes_take_one_rule_of_service_backends() {
        let errs = errors(
            r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: ok, namespace: shop}
spec:
  parentRefs: [{name: gw, sectionName: tcp}]
  rules: [{backendRefs: [{name: db, port: 5432, weight: 2}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: bad, namespace: shop}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: db}]}, {backendRefs: []}]
---
apiVersion: gateway.networking.k8s.io/v1alpha3
kind: TLSRoute
metadata: {name: tls, namespace: shop}
spec:
  parentRefs: [{name: gw}]
  hostnames: [pass.example.com, "bad host"]
  rules: [{backendRefs: [{name: backend, port: 443}]}]
"#,
        );
        assert_exactly(
            &errs,
            &[
                "TCPRoute shop/bad: field `spec.rules`: exactly one rule is supported (2 given)",
                "TCPRoute shop/bad: field `spec.rules[0].backendRefs[0].port`: a Service backend needs a port",
                "TCPRoute shop/bad: field `spec.rules[1].backendRefs`: a rule needs at least one backend",
                "TLSRoute shop/tls: field `spec.hostnames[1]`: host `bad host`",
            ],
        );
    }

    #[test]
    fn reference_grants_name_group_kind_and_namespace() {
        let errs = errors(
            r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: ok, namespace: backends}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}, {group: "", kind: Service, name: reviews}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: bad, namespace: backends}
spec:
  from: [{kind: HTTPRoute, namespace: shop}, {group: gateway.networking.k8s.io, kind: ""}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: no-from, namespace: backends}
spec:
  to: [{group: "", kind: Secret, name: cert}]
"#,
        );
        assert_exactly(
            &errs,
            &[
                "ReferenceGrant backends/bad: field `spec.to`: a ReferenceGrant needs at least one `to` entry",
                "ReferenceGrant backends/bad: field `spec.from[0].group`: group is required (\"\" for the core group)",
                "ReferenceGrant backends/bad: field `spec.from[1].kind`: kind is required",
                "ReferenceGrant backends/bad: field `spec.from[1].namespace`: namespace is required",
                "ReferenceGrant backends/no-from: field `spec.from`: a ReferenceGrant needs at least one `from` entry",
            ],
        );
    }

    #[test]
    fn http_routes_follow_the_gateway_api_rules() {
        let errs = errors(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  rules:
  - matches: [{path: {type: RegularExpression, value: "("}}, {path: {value: nope}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}
    - {type: RequestRedirect, requestRedirect: {statusCode: 200}}
    - {type: ExtensionRef}
    backendRefs: [{name: a}, {name: b, port: 80, weight: -1}]
"#,
        );
        let expect = [
            "`spec.parentRefs`: a route needs at least one parentRef",
            "`spec.rules[0].matches[0].path.value`: regex `(` does not compile",
            "`spec.rules[0].matches[1].path.value`: path `nope` must start with /",
            "`spec.rules[0].filters[0].path`: ReplacePrefixMatch needs every match",
            "`spec.rules[0].filters[1].requestRedirect.statusCode`: 200 is not a redirect status",
            "`spec.rules[0].filters[2].type`: filter type `ExtensionRef` is not supported",
            "`spec.rules[0].backendRefs[0].port`: a Service backend needs a port",
            "`spec.rules[0].backendRefs[1].weight`: -1 is negative",
        ];
        assert_exactly(&errs, &expect);
    }

    #[test]
    fn grpc_routes_follow_the_gateway_api_rules() {
        let errs = errors(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - matches:
    - method: {}
    - method: {service: a/b}
    - method: {type: RegularExpression, method: "("}
    - headers: [{name: "", value: x}]
    filters:
    - {type: URLRewrite}
    backendRefs: [{name: echo}]
"#,
        );
        let expect = [
            "`spec.rules[0].matches[0].method`: a method match needs a service or a method",
            "`spec.rules[0].matches[1].method.service`: `a/b` is not a gRPC service name",
            "`spec.rules[0].matches[2].method.method`: regex `(` does not compile",
            "`spec.rules[0].matches[3].headers[0].name`: name is required",
            "`spec.rules[0].filters[0].type`: filter `URLRewrite` is not supported in a GRPCRoute",
            "`spec.rules[0].backendRefs[0].port`: a Service backend needs a port",
        ];
        assert_exactly(&errs, &expect);
    }

    #[test]
    fn grpc_aborts_name_a_grpc_status() {
        let vs = |abort: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: g}}\nspec:\n  hosts: [a]\n  http:\n  - fault: {{abort: {abort}}}\n    route: [{{destination: {{host: a}}}}]\n"
            )
        };
        assert_eq!(
            errors(&vs("{grpcStatus: UNAVAILABLE}")),
            Vec::<String>::new()
        );
        let errs = errors(&vs("{grpcStatus: UNAVAIL}"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains(
                "`spec.http[0].fault.abort.grpcStatus`: \"UNAVAIL\" is not a gRPC status"
            ),
            "{errs:?}"
        );
        let errs = errors(&vs("{grpcStatus: UNAVAILABLE, httpStatus: 503}"));
        assert!(
            errs.len() == 1 && errs[0].contains("either httpStatus or grpcStatus"),
            "{errs:?}"
        );
        assert_eq!(grpc_status_code("UNAUTHENTICATED"), Some(16));
    }

    #[test]
    fn destination_rule_rules() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: d\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}\n    portLevelSettings: [{port: {number: 70000}}]\n  subsets: [{name: v1}, {name: v1}]\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("`spec.trafficPolicy.loadBalancer.consistentHash`: exactly one"));
        assert!(
            errs[1].contains("`spec.trafficPolicy.portLevelSettings[0].port.number`: port 70000")
        );
        assert!(errs[2].contains("`spec.subsets[1].name`: duplicate subset `v1`"));
    }

    #[test]
    fn gateway_rules() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: ['*']\n  - port: {number: 80, name: http, protocol: HTTPX}\n    hosts: []\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("`spec.servers[0].tls`: a HTTPS server needs tls"));
        assert!(errs[1].contains("`spec.servers[1].port.protocol`: protocol `HTTPX`"));
        assert!(errs[2].contains("`spec.servers[1].hosts`: at least one host"));
    }

    #[test]
    fn security_rules() {
        let errs = errors(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  action: CUSTOM\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33, nope]}}], to: [{operation: {ports: ['http']}}]}]\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: a}\nspec: {mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}\n",
        );
        assert_eq!(
            errs,
            [
                "t.yaml: AuthorizationPolicy a/p: field `spec.provider`: action CUSTOM needs a provider",
                "t.yaml: AuthorizationPolicy a/p: field `spec.rules[0].from[0].source.ipBlocks[0]`: `10.0.0.0/33` has an invalid prefix length",
                "t.yaml: AuthorizationPolicy a/p: field `spec.rules[0].from[0].source.ipBlocks[1]`: `nope` is not an IP address or CIDR",
                "t.yaml: AuthorizationPolicy a/p: field `spec.rules[0].to[0].operation.ports[0]`: `http` is not a port number",
                "t.yaml: PeerAuthentication a/pa: field `spec.portLevelMtls`: port-level mTLS needs a workload selector",
            ]
        );
    }

    #[test]
    fn condition_keys_and_target_refs_are_checked() {
        let errs = errors(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  targetRefs: [{kind: Service, group: ''}]\n  rules: [{when: [{key: 'request.headers[x-user]', values: [a]}, {key: 'request.header[x]', values: [a]}, {key: 'request.auth.claims[groups]', values: [g]}]}]\n",
        );
        assert_eq!(
            errs,
            [
                "t.yaml: AuthorizationPolicy a/p: field `spec.targetRefs[0].name`: name is required",
                "t.yaml: AuthorizationPolicy a/p: field `spec.rules[0].when[1].key`: unknown key `request.header[x]`",
            ]
        );
    }

    #[test]
    fn service_entry_rules() {
        let errs = errors(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 0, name: p}, {number: 443, name: p}]\n  resolution: STATIC\n  endpoints: [{address: api.example.com}]\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn partition_also_drops_what_depended_on_a_dropped_resource() {
        // Found by the config_load fuzz target: the rule's second subset has
        // no name, so the rule goes, and with it the subsets the route uses.
        let loaded = load_str(
            "f.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: echo, subsets: [{name: v1}, {nqme: v2}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo}\nspec: {hosts: [echo], tcp: [{route: [{destination: {host: echo, subset: v1}}]}]}\n",
        );
        let (valid, errors) = partition(loaded.manifests);
        assert!(valid.virtual_services.is_empty() && valid.destination_rules.is_empty());
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "subset name is required",
                "subset `v1` of host `echo` is not defined by any DestinationRule"
            ]
        );
        assert!(validate(&valid).is_empty());
    }

    #[test]
    fn partition_drops_only_invalid_resources() {
        let loaded = load_str(
            "p.yaml",
            &format!(
                "{DR}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: bk}}\nspec: {{hosts: [ratings], http: [{{route: [{{destination: {{host: ratings, subset: nope}}}}]}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: good, namespace: bk}}\nspec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: reviews, subset: v1}}}}]}}]}}\n"
            ),
        );
        let (valid, errors) = partition(loaded.manifests);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].resource.name, "bad");
        let names: Vec<_> = valid
            .virtual_services
            .iter()
            .map(|v| v.metadata.name.as_deref().unwrap())
            .collect();
        assert_eq!(names, ["good"]);
        assert_eq!(valid.destination_rules.len(), 1);
    }

    #[test]
    fn gateway_api_listeners_are_checked() {
        let errs = errors(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: bk}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: a, port: 80, protocol: HTTP, hostname: \"*\"}\n  - {name: a, port: 443, protocol: HTTPS}\n  - {name: c, port: 8443, protocol: TLS, tls: {mode: Proxy}}\n  - {name: d, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}}}\n  - {name: e, port: 8081, protocol: HTTP, allowedRoutes: {namespaces: {from: Everywhere}}}\n  - {name: f, port: 8082, protocol: HTTP, allowedRoutes: {kinds: [{kind: HTTPRoute}, {group: gateway.networking.k8s.io, kind: GRPCRoute}, {kind: TCPRoute}, {group: example.com, kind: HTTPRoute}]}}\n",
        );
        let at = "t.yaml: Gateway bk/gw: field";
        assert_eq!(
            errs,
            [
                format!(
                    "{at} `spec.listeners[0].hostname`: hostname `*` is not a DNS name or `*.`-prefixed wildcard"
                ),
                format!("{at} `spec.listeners[1].name`: duplicate listener name `a`"),
                format!(
                    "{at} `spec.listeners[1].tls.certificateRefs`: a HTTPS listener that terminates TLS needs a certificateRef"
                ),
                format!(
                    "{at} `spec.listeners[2].tls.mode`: mode `Proxy` is not Terminate or Passthrough"
                ),
                format!(
                    "{at} `spec.listeners[2].tls.certificateRefs`: a TLS listener that terminates TLS needs a certificateRef"
                ),
                format!(
                    "{at} `spec.listeners[3].allowedRoutes.namespaces.selector`: from: Selector needs a selector"
                ),
                format!(
                    "{at} `spec.listeners[4].allowedRoutes.namespaces.from`: `Everywhere` is not Same, All or Selector"
                ),
                format!(
                    "{at} `spec.listeners[5].allowedRoutes.kinds[2]`: TCPRoute routes cannot attach to a HTTP listener (it takes HTTPRoute, GRPCRoute)"
                ),
                format!(
                    "{at} `spec.listeners[5].allowedRoutes.kinds[3]`: example.com/HTTPRoute routes cannot attach to a HTTP listener (it takes HTTPRoute, GRPCRoute)"
                ),
            ]
        );
    }
}
