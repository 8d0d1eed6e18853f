//! Gateway API GRPCRoutes as the HTTPRoutes they are equivalent to: a gRPC
//! call is an HTTP/2 POST to `/<service>/<method>`, so each method match
//! becomes a path match and the rest (parents, hostnames, header matches,
//! header-modifier and mirror filters, weighted backends) carries over
//! unchanged, to be routed by [`crate::http_route`] like any HTTPRoute.
//!
//! - `Exact` (the default): service and method give the exact path
//!   `/<service>/<method>`; a service alone every method of it (the path
//!   prefix `/<service>`, by whole segments); a method alone that method of
//!   any service.
//! - `RegularExpression`: `/<service pattern>/<method pattern>`, a missing
//!   one matching any name.
//! - Rules order as the equivalent HTTPRoute rules do: exact methods before
//!   whole services, before patterns.

use mesh_config::{
    Manifests,
    istio::{
        KubeGrpcRoute, KubeHttpRoute,
        gateway_api::{
            GrpcMethodMatch, GrpcRouteMatch, HttpPathMatch, HttpRouteMatch, HttpRouteRule,
            HttpRouteSpec, PathMatchType, ValueMatchType,
        },
    },
};

/// A gRPC service or method name in a pattern: any one path segment.
const ANY_NAME: &str = "[^/]+";

/// The HTTPRoute equivalent to each of `manifests`' GRPCRoutes (its `kind`
/// stays `GRPCRoute`, so reports name the route as written).
pub fn http_routes(manifests: &Manifests) -> impl Iterator<Item = KubeHttpRoute> + '_ {
    manifests.grpc_routes.iter().map(http_route)
}

fn http_route(route: &KubeGrpcRoute) -> KubeHttpRoute {
    KubeHttpRoute {
        api_version: route.api_version.clone(),
        kind: "GRPCRoute".to_owned(),
        metadata: route.metadata.clone(),
        spec: HttpRouteSpec {
            parent_refs: route.spec.parent_refs.clone(),
            hostnames: route.spec.hostnames.clone(),
            rules: route
                .spec
                .rules
                .iter()
                .map(|rule| HttpRouteRule {
                    name: rule.name.clone(),
                    matches: rule.matches.iter().map(http_match).collect(),
                    filters: rule.filters.clone(),
                    backend_refs: rule.backend_refs.clone(),
                    timeouts: None,
                })
                .collect(),
        },
        status: route.status.clone(),
    }
}

fn http_match(matched: &GrpcRouteMatch) -> HttpRouteMatch {
    HttpRouteMatch {
        path: matched.method.as_ref().map(path),
        headers: matched.headers.clone(),
        query_params: Vec::new(),
        method: None,
    }
}

/// The request path condition of a method match.
fn path(method: &GrpcMethodMatch) -> HttpPathMatch {
    let (type_, value) = match method.type_.unwrap_or(ValueMatchType::Exact) {
        ValueMatchType::RegularExpression => (
            PathMatchType::RegularExpression,
            format!(
                "/(?:{})/(?:{})",
                method.service.as_deref().unwrap_or(ANY_NAME),
                method.method.as_deref().unwrap_or(ANY_NAME)
            ),
        ),
        ValueMatchType::Exact => match (&method.service, &method.method) {
            (Some(service), Some(name)) => (PathMatchType::Exact, format!("/{service}/{name}")),
            (Some(service), None) => (PathMatchType::PathPrefix, format!("/{service}")),
            (None, name) => (
                PathMatchType::RegularExpression,
                format!(
                    "/{ANY_NAME}/{}",
                    name.as_deref()
                        .map_or_else(|| ANY_NAME.to_owned(), regex::escape)
                ),
            ),
        },
    };
    HttpPathMatch {
        type_: Some(type_),
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(yaml: &str) -> KubeHttpRoute {
        let loaded = mesh_config::load_str("t.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let errors = mesh_config::validate::validate(&loaded.manifests);
        assert!(errors.is_empty(), "{errors:?}");
        http_routes(&loaded.manifests).next().expect("one route")
    }

    #[test]
    fn method_matches_become_paths() {
        let route = translate(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 9090}]\n  rules:\n  - matches:\n    - method: {service: lab.v1.Lab, method: Unary}\n      headers: [{name: x-variant, value: b}]\n    - method: {service: lab.v1.Lab}\n    - method: {method: Count}\n    - method: {type: RegularExpression, service: \"lab\\\\.v[0-9]+\\\\.Lab\", method: \"C.*\"}\n    - method: {type: RegularExpression, method: \"Un.*\"}\n    backendRefs: [{name: echo, port: 9090}]\n    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-routed-by, value: g}]}}]\n",
        );
        assert_eq!(route.kind, "GRPCRoute");
        let rule = &route.spec.rules[0];
        let paths: Vec<(PathMatchType, &str)> = rule
            .matches
            .iter()
            .map(|m| {
                let p = m.path.as_ref().unwrap();
                (p.type_.unwrap(), p.value.as_deref().unwrap())
            })
            .collect();
        assert_eq!(
            paths,
            [
                (PathMatchType::Exact, "/lab.v1.Lab/Unary"),
                (PathMatchType::PathPrefix, "/lab.v1.Lab"),
                (PathMatchType::RegularExpression, "/[^/]+/Count"),
                (
                    PathMatchType::RegularExpression,
                    "/(?:lab\\.v[0-9]+\\.Lab)/(?:C.*)"
                ),
                (PathMatchType::RegularExpression, "/(?:[^/]+)/(?:Un.*)"),
            ]
        );
        assert_eq!(rule.matches[0].headers[0].name, "x-variant");
        assert_eq!(rule.backend_refs[0].backend.name, "echo");
        assert_eq!(rule.filters[0].type_, "ResponseHeaderModifier");
        // Every pattern compiles anchored, as the waypoint compiles it.
        for (kind, value) in paths {
            if kind == PathMatchType::RegularExpression {
                let re = regex::Regex::new(&format!("^(?:{value})$")).unwrap();
                assert!(
                    re.is_match("/lab.v1.Lab/Count") || re.is_match("/lab.v1.Lab/Unary"),
                    "{value}"
                );
                assert!(!re.is_match("/lab.v1.Other/Chat"), "{value}");
            }
        }
    }
}
