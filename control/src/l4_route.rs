//! Gateway API TCPRoutes and TLSRoutes at an ingress Gateway (class
//! `istio`), as the Istio VirtualServices that route the same connections:
//! a TCPRoute attached to a `TCP` listener becomes a `tcp` route, a
//! TLSRoute attached to a `TLS` listener in `Passthrough` mode a `tls`
//! route matching its SNI host names (the route's `hostnames` within the
//! listener's `hostname`), both bound to the listeners' Istio Gateways
//! ([`crate::kube_gateway`]), so [`crate::ingress`] serves them as it
//! serves Istio's TCP and PASSTHROUGH servers.
//!
//! - One VirtualService per route and listener,
//!   `<route>-<kind>-<listener's Istio Gateway>` in the Gateway's
//!   namespace, its one rule's `backendRefs` as weighted destinations
//!   (weight default 1).
//! - A backend in another namespace needs a ReferenceGrant there
//!   ([`crate::reference_grant`]); without one it is left out and reported
//!   (a connection cannot be answered with an error status), and a rule
//!   with no backend left is not served.
//! - Only Gateway parents are served; a Service parent (a TCPRoute for the
//!   mesh) is reported.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_config::{
    Manifests,
    istio::{
        VirtualService,
        gateway_api::{L4RouteRule, ParentRef},
        networking::{
            Destination, PortSelector, RouteDestination, TcpRoute, TlsMatch, TlsRoute,
            VirtualServiceSpec,
        },
    },
    namespace,
    validate::fqdn,
};

use crate::{
    http_route::backend_permitted,
    reference_grant::ReferenceGrants,
    route_status::{Condition, ParentStatus, RouteStatus},
};

/// One TCPRoute or TLSRoute, as both are read.
struct L4Route<'a> {
    kind: &'static str,
    api_version: &'a str,
    metadata: &'a ObjectMeta,
    status: Option<&'a serde_json::Value>,
    parent_refs: &'a [ParentRef],
    hostnames: &'a [String],
    rules: &'a [L4RouteRule],
}

/// The VirtualServices of `manifests`' TCPRoutes and TLSRoutes; `warnings`
/// gets what cannot be served, `statuses` what each route's parents got.
pub fn virtual_services(
    manifests: &Manifests,
    warnings: &mut Vec<String>,
    statuses: &mut Vec<RouteStatus>,
) -> Vec<VirtualService> {
    let tcp = manifests.tcp_routes.iter().map(|r| L4Route {
        kind: "TCPRoute",
        api_version: &r.api_version,
        metadata: &r.metadata,
        status: r.status.as_ref(),
        parent_refs: &r.spec.parent_refs,
        hostnames: &[],
        rules: &r.spec.rules,
    });
    let tls = manifests.tls_routes.iter().map(|r| L4Route {
        kind: "TLSRoute",
        api_version: &r.api_version,
        metadata: &r.metadata,
        status: r.status.as_ref(),
        parent_refs: &r.spec.parent_refs,
        hostnames: &r.spec.hostnames,
        rules: &r.spec.rules,
    });
    let grants = ReferenceGrants::of(manifests);
    let mut out = Vec::new();
    for route in tcp.chain(tls) {
        out.extend(translate(manifests, grants, &route, warnings, statuses));
    }
    out
}

fn translate(
    manifests: &Manifests,
    grants: ReferenceGrants<'_>,
    route: &L4Route<'_>,
    warnings: &mut Vec<String>,
    statuses: &mut Vec<RouteStatus>,
) -> Vec<VirtualService> {
    let route_ns = namespace(route.metadata);
    let name = route.metadata.name.as_deref().unwrap_or_default();
    let route_id = format!("{} {route_ns}/{name}", route.kind);
    // Validation keeps exactly one rule.
    let Some(rule) = route.rules.first() else {
        return Vec::new();
    };
    let mut refused = Vec::new();
    let mut destinations = Vec::new();
    for (b, backend) in rule.backend_refs.iter().enumerate() {
        match backend_permitted(grants, route.kind, route_ns, &backend.backend) {
            Ok(()) => destinations.push(RouteDestination {
                destination: Destination {
                    host: fqdn(
                        &backend.backend.name,
                        backend.backend.namespace.as_deref().unwrap_or(route_ns),
                    ),
                    subset: None,
                    port: backend.backend.port.map(|number| PortSelector {
                        number: Some(number),
                    }),
                },
                weight: Some(backend.weight.unwrap_or(1)),
            }),
            Err(why) => {
                warnings.push(format!(
                    "{route_id}: spec.rules[0].backendRefs[{b}] is refused: {why}"
                ));
                refused.push(why);
            }
        }
    }
    let resolved_refs = if refused.is_empty() {
        Condition::holds("ResolvedRefs", "all references resolved")
    } else {
        Condition::fails("RefNotPermitted", refused.join("; "))
    };
    // (Gateway namespace, listener's Istio Gateway) -> host names: each
    // listener has its own (a TLS listener's SNI names are within its
    // hostname).
    let mut by_listener: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut parents = Vec::new();
    for (p, parent) in route.parent_refs.iter().enumerate() {
        if !parent.is_gateway() {
            warnings.push(format!(
                "{route_id}: spec.parentRefs[{p}] ({} {}) is not applied: only Gateway parents are served for {}s",
                parent.kind.as_deref().unwrap_or("Gateway"),
                parent.name,
                route.kind
            ));
            continue;
        }
        let accepted = match crate::kube_gateway::attachments(
            manifests,
            parent,
            route.kind,
            route_ns,
            route.hostnames,
        ) {
            Ok(attached) => {
                for a in attached {
                    by_listener
                        .entry((a.gateway_ns, a.gateway))
                        .or_default()
                        .insert(a.host);
                }
                Condition::holds("Accepted", "attached")
            }
            Err(why) => {
                warnings.push(format!(
                    "{route_id}: spec.parentRefs[{p}] is not applied: {why}"
                ));
                match why.reason {
                    Some(reason) => Condition::fails(reason, why.message),
                    None => continue,
                }
            }
        };
        parents.push(ParentStatus {
            parent_ref: parent.clone(),
            accepted,
            resolved_refs: resolved_refs.clone(),
        });
    }
    if !parents.is_empty() {
        statuses.push(RouteStatus {
            kind: route.kind.to_owned(),
            api_version: route.api_version.to_owned(),
            namespace: route_ns.to_owned(),
            name: name.to_owned(),
            generation: route.metadata.generation,
            previous: route.status.cloned(),
            parents,
        });
    }
    if destinations.is_empty() {
        if !by_listener.is_empty() {
            warnings.push(format!(
                "{route_id}: no backend may be used; its connections are not served"
            ));
        }
        return Vec::new();
    }
    by_listener
        .into_iter()
        .map(|((gateway_ns, gateway), hosts)| {
            let hosts: Vec<String> = hosts.into_iter().collect();
            let listener = gateway.rsplit('/').next().unwrap_or_default().to_owned();
            let mut spec = VirtualServiceSpec {
                hosts: hosts.clone(),
                gateways: vec![gateway],
                ..Default::default()
            };
            if route.kind == "TLSRoute" {
                spec.tls = vec![TlsRoute {
                    matches: vec![TlsMatch {
                        sni_hosts: hosts,
                        ..Default::default()
                    }],
                    route: destinations.clone(),
                }];
            } else {
                spec.tcp = vec![TcpRoute {
                    matches: Vec::new(),
                    route: destinations.clone(),
                }];
            }
            VirtualService {
                api_version: route.api_version.to_owned(),
                kind: route.kind.to_owned(),
                metadata: ObjectMeta {
                    name: Some(format!(
                        "{name}-{}-{listener}",
                        route.kind.to_ascii_lowercase()
                    )),
                    namespace: Some(gateway_ns),
                    ..Default::default()
                },
                spec,
                status: None,
            }
        })
        .collect()
}
