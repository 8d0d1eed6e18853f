//! Gateway API ReferenceGrants: the consent a namespace gives to references
//! into it from other namespaces.
//!
//! Every Gateway API reference across namespaces needs one (attaching a
//! route to another namespace's Gateway is the exception, governed by the
//! listener's `allowedRoutes`): a route's `backendRefs` and mirrors to a
//! Service elsewhere, a Gateway's `certificateRefs` to a Secret elsewhere.
//! A grant lives in the namespace referred *to*, names the kinds and
//! namespaces trusted to refer (`from`) and the kinds (and optionally the
//! names) they may refer to (`to`). A reference within one namespace needs
//! none. The model is rebuilt from the whole config on every change, so
//! deleting a grant revokes what it allowed at the next push.

use mesh_config::{Manifests, istio::ReferenceGrant, namespace};

/// The group of core kinds (`Service`, `Secret`) as references name it.
pub const CORE_GROUP: &str = "";

/// The referring side of a reference: every resource of one kind in one
/// namespace.
#[derive(Clone, Copy, Debug)]
pub struct Referrer<'a> {
    /// API group, such as `gateway.networking.k8s.io`.
    pub group: &'a str,
    /// Kind, such as `HTTPRoute`.
    pub kind: &'a str,
    /// Namespace of the referring resource.
    pub namespace: &'a str,
}

/// The referred-to side: one named resource.
#[derive(Clone, Copy, Debug)]
pub struct Referent<'a> {
    /// API group (`""` for the core group).
    pub group: &'a str,
    /// Kind, such as `Service`.
    pub kind: &'a str,
    /// Namespace of the referred-to resource.
    pub namespace: &'a str,
    /// Name of the referred-to resource.
    pub name: &'a str,
}

/// The ReferenceGrants of one configuration.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceGrants<'a> {
    grants: &'a [ReferenceGrant],
}

impl<'a> ReferenceGrants<'a> {
    /// The grants of `manifests`.
    pub fn of(manifests: &'a Manifests) -> Self {
        Self {
            grants: &manifests.reference_grants,
        }
    }

    /// Whether `from` may refer to `to`: they are in one namespace, or a
    /// grant in `to`'s namespace trusts `from`'s kind and namespace with
    /// `to`'s kind (and name, when the grant names one).
    pub fn permits(&self, from: Referrer<'_>, to: Referent<'_>) -> bool {
        from.namespace == to.namespace
            || self.grants.iter().any(|grant| {
                namespace(&grant.metadata) == to.namespace
                    && grant.spec.from.iter().any(|f| {
                        f.group.as_deref().unwrap_or_default() == from.group
                            && f.kind == from.kind
                            && f.namespace == from.namespace
                    })
                    && grant.spec.to.iter().any(|t| {
                        t.group.as_deref().unwrap_or_default() == to.group
                            && t.kind == to.kind
                            && t.name.as_deref().is_none_or(|n| n == to.name)
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(yaml: &str) -> Manifests {
        let loaded = mesh_config::load_str("grants.yaml", yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.manifests
    }

    const ROUTE_IN_SHOP: Referrer<'static> = Referrer {
        group: mesh_config::istio::GATEWAY_API_GROUP,
        kind: "HTTPRoute",
        namespace: "shop",
    };

    fn service(namespace: &'static str, name: &'static str) -> Referent<'static> {
        Referent {
            group: CORE_GROUP,
            kind: "Service",
            namespace,
            name,
        }
    }

    #[test]
    fn references_within_a_namespace_need_no_grant() {
        let manifests = Manifests::default();
        let grants = ReferenceGrants::of(&manifests);
        assert!(grants.permits(ROUTE_IN_SHOP, service("shop", "reviews")));
        assert!(!grants.permits(ROUTE_IN_SHOP, service("backends", "reviews")));
    }

    #[test]
    fn a_grant_trusts_its_from_kind_and_namespace_with_its_to_kind_and_name() {
        let manifests = grants(
            r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: routes-from-shop, namespace: backends}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: reviews}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: any-service, namespace: shared}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#,
        );
        let grants = ReferenceGrants::of(&manifests);
        assert!(grants.permits(ROUTE_IN_SHOP, service("backends", "reviews")));
        // Only the named Service.
        assert!(!grants.permits(ROUTE_IN_SHOP, service("backends", "ratings")));
        // A grant without a name covers the whole kind.
        assert!(grants.permits(ROUTE_IN_SHOP, service("shared", "anything")));
        // Another referrer namespace, another referrer kind, another
        // referent kind: not trusted.
        let web = Referrer {
            namespace: "web",
            ..ROUTE_IN_SHOP
        };
        assert!(!grants.permits(web, service("backends", "reviews")));
        let grpc = Referrer {
            kind: "GRPCRoute",
            ..ROUTE_IN_SHOP
        };
        assert!(!grants.permits(grpc, service("backends", "reviews")));
        let secret = Referent {
            kind: "Secret",
            ..service("shared", "cert")
        };
        assert!(!grants.permits(ROUTE_IN_SHOP, secret));
        // A grant counts only in the namespace it lives in.
        assert!(!grants.permits(ROUTE_IN_SHOP, service("elsewhere", "reviews")));
    }
}
