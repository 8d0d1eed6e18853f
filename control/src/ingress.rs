//! Ingress gateways: Istio `Gateway` resources (networking.istio.io) and the
//! VirtualServices bound to them, as Envoy listeners and routes for the
//! gateway deployments they select.
//!
//! - A Gateway selects gateway pods by `selector` (in any namespace, Istio's
//!   default). Each selected pod's owning Deployment, `<namespace>/<name>`,
//!   is the scope of the resources built for it: the gateway proxy announces
//!   the same key in its node metadata, as a waypoint does.
//! - Each server port becomes a Listener `gateway~<ns>~<deployment>~<port>`
//!   bound on `0.0.0.0:<port>` with an HTTP connection manager whose routes
//!   (RDS `http.<port>~<ns>~<deployment>`) hold one virtual host per
//!   VirtualService host, Host-matched, with that VirtualService's `http`
//!   routes (matches restricted to the gateway by their `gateways`).
//! - A VirtualService is bound when its `gateways` names the Gateway
//!   (`<name>` in its own namespace, or `<namespace>/<name>`); its hosts
//!   must be allowed by a server's `hosts` (`*`, `*.suffix`, exact, with an
//!   optional `<namespace>/` restricting which namespaces may bind).
//! - Destinations use the mesh's clusters (`outbound|<port>|<subset>|<host>`),
//!   so DestinationRules apply at the gateway too.
//!
//! - HTTPS servers with `tls.mode: SIMPLE` terminate TLS at the gateway:
//!   each gets its own filter chain, matched by SNI on the server's hosts
//!   (a `*` host makes it the port's default chain), with its certificate
//!   from the Secret `credentialName` in the gateway's namespace
//!   (`tls.crt`/`tls.key`, or `cert`/`key`) inlined in the listener, or from
//!   the `serverCertificate`/`privateKey` files on the gateway. Its routes
//!   (`https.<port>.<i>~<ns>~<deployment>`) hold only that server's hosts.
//!
//! - `tls.mode: MUTUAL` requires a client certificate issued by the
//!   server's client CA, `OPTIONAL_MUTUAL` checks one when presented (the
//!   CA from the Secret's `ca.crt`, a Secret `<credentialName>-cacert`, or
//!   the `caCertificates` file).
//! - An HTTP server with `tls.httpsRedirect` marks its virtual hosts
//!   `require_tls: ALL`: plaintext requests get a 301 to `https://`.
//!
//! - TCP servers (and MONGO, REDIS, MYSQL) get one plain filter chain with a
//!   TCP proxy to the weighted destinations of the first VirtualService
//!   `tcp` route bound to the Gateway whose match allows the port; TLS
//!   servers (SIMPLE, MUTUAL) terminate TLS, then do the same.
//!
//! - TLS servers with `tls.mode: PASSTHROUGH` get a filter chain per bound
//!   VirtualService `tls` route, matched by its `sniHosts` and relaying the
//!   encrypted bytes, unterminated, to its destinations.
//!
//!   With `subjectAltNames`, the client certificate must also carry one of
//!   those names as a SAN.
//!
//! `AUTO_PASSTHROUGH` and `ISTIO_MUTUAL` are reported as not supported yet.
//! Gateway API ingress Gateways reach this module as the Istio Gateways
//! [`crate::kube_gateway`] translates them into.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mesh_api::envoy::{
    envoy::{
        config::{
            core::v3::{DataSource, TransportSocket, data_source, transport_socket},
            listener::v3::{Filter, FilterChain, FilterChainMatch, Listener},
            route::v3::{RouteConfiguration, VirtualHost, virtual_host::TlsRequirementType},
        },
        extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
            SubjectAltNameMatcher, TlsCertificate, common_tls_context::ValidationContextType,
            subject_alt_name_matcher,
        },
        r#type::matcher::v3::{StringMatcher, string_matcher},
    },
    google::protobuf::{Any, BoolValue},
};
use mesh_config::{
    Manifests,
    istio::{GATEWAY_API_GROUP, IstioGateway, networking as net},
};
use prost::{Message, Name};

use crate::reference_grant::{CORE_GROUP, ReferenceGrants, Referent, Referrer};
use crate::waypoint::{
    DestinationRules, ServiceRef, add_hash_policies, hcm_filter, host_matches, socket_address,
    tcp_route_filter, vs_routes,
};

/// A gateway deployment's key: `<namespace>/<deployment>`.
type GatewayKey = String;

/// Listener name of `port` on gateway deployment `key`.
pub fn listener_name(key: &str, port: u32) -> String {
    format!("gateway~{}~{port}", key.replace('/', "~"))
}

/// Route configuration name of `port` on gateway deployment `key`.
pub fn route_name(key: &str, port: u32) -> String {
    format!("http.{port}~{}", key.replace('/', "~"))
}

/// Route configuration name of HTTPS server `index` of `port` on gateway
/// deployment `key`.
pub fn https_route_name(key: &str, port: u32, index: usize) -> String {
    format!("https.{port}.{index}~{}", key.replace('/', "~"))
}

/// The TLS transport socket's name.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// One server of one Gateway, as served by a deployment.
struct BoundServer<'a> {
    gateway: &'a IstioGateway,
    server: &'a net::Server,
}

/// Builds the listeners and route configurations of every gateway
/// deployment selected by a Gateway, each scoped to its deployment key.
pub fn build(
    manifests: &Manifests,
    services: &[ServiceRef],
    listeners: &mut BTreeMap<String, (String, Listener)>,
    routes: &mut BTreeMap<String, (String, RouteConfiguration)>,
    warnings: &mut Vec<String>,
) {
    let by_host: HashMap<&str, &ServiceRef> =
        services.iter().map(|s| (s.hostname.as_str(), s)).collect();
    let rules = DestinationRules::new(&manifests.destination_rules);

    // Deployment key -> port -> the servers it serves there.
    let mut served: BTreeMap<GatewayKey, BTreeMap<u32, Vec<BoundServer<'_>>>> = BTreeMap::new();
    for gateway in &manifests.istio_gateways {
        let id = gateway_id(gateway);
        if gateway.spec.selector.is_empty() {
            warnings.push(format!(
                "Gateway {id}: no selector; it selects no gateway workload"
            ));
            continue;
        }
        let keys = selected_deployments(manifests, &gateway.spec.selector);
        if keys.is_empty() {
            warnings.push(format!(
                "Gateway {id}: no gateway pod matches its selector {:?}",
                gateway.spec.selector
            ));
        }
        for (i, server) in gateway.spec.servers.iter().enumerate() {
            let Some(port) = &server.port else { continue };
            let protocol = port.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
            let terminated_tls = server.tls.as_ref().is_some_and(|t| {
                matches!(
                    t.mode,
                    None | Some(
                        net::ServerTlsMode::Simple
                            | net::ServerTlsMode::Mutual
                            | net::ServerTlsMode::OptionalMutual
                    )
                )
            });
            let passthrough = server
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == Some(net::ServerTlsMode::Passthrough));
            let served_here = match ServerKind::of(server) {
                Some(ServerKind::Http | ServerKind::Tcp) => true,
                Some(ServerKind::Https) => terminated_tls,
                Some(ServerKind::Tls) => terminated_tls || passthrough,
                None => false,
            };
            if !served_here {
                warnings.push(format!(
                    "Gateway {id}: servers[{i}] ({protocol}{}) is not served by the ingress gateway yet; HTTP, HTTP2, GRPC, TCP, HTTPS or TLS with tls.mode SIMPLE, MUTUAL or OPTIONAL_MUTUAL, and TLS PASSTHROUGH are",
                    server.tls.as_ref().and_then(|t| t.mode).map(|m| format!(", tls.mode {m:?}")).unwrap_or_default()
                ));
                continue;
            }
            for key in &keys {
                served
                    .entry(key.clone())
                    .or_default()
                    .entry(port.number)
                    .or_default()
                    .push(BoundServer { gateway, server });
            }
        }
    }

    for (key, ports) in served {
        for (port, servers) in ports {
            let (terminated, plain): (Vec<_>, Vec<_>) = servers.into_iter().partition(|s| {
                matches!(
                    ServerKind::of(s.server),
                    Some(ServerKind::Https | ServerKind::Tls)
                )
            });
            let (tcp, http): (Vec<_>, Vec<_>) = plain
                .into_iter()
                .partition(|s| ServerKind::of(s.server) == Some(ServerKind::Tcp));
            let mut filter_chains = Vec::new();
            let shared = |kind: &str, others: &[BoundServer<'_>], warnings: &mut Vec<String>| {
                for ignored in others {
                    warnings.push(format!(
                        "Gateway {}: a server on port {port} shares it with a {kind} server; it is not served",
                        gateway_id(ignored.gateway)
                    ));
                }
            };
            if !tcp.is_empty() {
                shared("TCP", &http, warnings);
                shared("TCP", &terminated, warnings);
                match tcp_route(manifests, &tcp, port, warnings) {
                    Some(filter) => filter_chains.push(FilterChain {
                        name: format!("tcp.{port}~{}", key.replace('/', "~")),
                        filters: vec![filter],
                        ..Default::default()
                    }),
                    None => warnings.push(format!(
                        "Gateway {}: the TCP server on port {port} has no VirtualService tcp route bound to it; it is not served",
                        gateway_id(tcp[0].gateway)
                    )),
                }
            } else if !http.is_empty() {
                shared("HTTP", &terminated, warnings);
                let route_config = route_name(&key, port);
                let virtual_hosts =
                    virtual_hosts(manifests, &http, port, &by_host, &rules, warnings);
                insert_routes(routes, &key, &route_config, virtual_hosts);
                filter_chains.push(FilterChain {
                    name: route_config.clone(),
                    filters: vec![hcm_filter(&route_config, &[])],
                    ..Default::default()
                });
            } else {
                let gateway_ns = key.split('/').next().unwrap_or_default();
                for (index, bound) in terminated.iter().enumerate() {
                    let id = gateway_id(bound.gateway);
                    if is_passthrough(bound.server) {
                        let chains = passthrough_chains(manifests, bound, port, warnings);
                        if chains.is_empty() {
                            warnings.push(format!(
                                "Gateway {id}: the PASSTHROUGH server on port {port} has no VirtualService tls route bound to it; it is not served"
                            ));
                        }
                        filter_chains.extend(chains);
                        continue;
                    }
                    let tls = match server_tls(bound.server, manifests, gateway_ns) {
                        // Bytes after a TLS server's handshake are the
                        // app's own: no HTTP ALPN is offered for them.
                        Ok(mut tls) if ServerKind::of(bound.server) == Some(ServerKind::Tls) => {
                            if let Some(common) = tls.common_tls_context.as_mut() {
                                common.alpn_protocols.clear();
                            }
                            tls
                        }
                        Ok(tls) => tls,
                        Err(why) => {
                            warnings.push(format!(
                                "Gateway {id}: the HTTPS server on port {port} is not served: {why}"
                            ));
                            continue;
                        }
                    };
                    let route_config = https_route_name(&key, port, index);
                    let filter = if ServerKind::of(bound.server) == Some(ServerKind::Tls) {
                        // TLS terminated here, then the VirtualService's
                        // `tcp` route, as Istio routes a TLS server.
                        let Some(filter) =
                            tcp_route(manifests, std::slice::from_ref(bound), port, warnings)
                        else {
                            warnings.push(format!(
                                "Gateway {id}: the TLS server on port {port} has no VirtualService tcp route bound to it; it is not served"
                            ));
                            continue;
                        };
                        filter
                    } else {
                        let virtual_hosts = virtual_hosts(
                            manifests,
                            std::slice::from_ref(bound),
                            port,
                            &by_host,
                            &rules,
                            warnings,
                        );
                        insert_routes(routes, &key, &route_config, virtual_hosts);
                        hcm_filter(&route_config, &[])
                    };
                    let server_names: Vec<String> = bound
                        .server
                        .hosts
                        .iter()
                        .map(|h| {
                            h.split_once('/')
                                .map_or(h.as_str(), |(_, host)| host)
                                .to_ascii_lowercase()
                        })
                        .collect();
                    // A `*` host takes every SNI (and none): no SNI match.
                    let server_names = if server_names.iter().any(|h| h == "*") {
                        Vec::new()
                    } else {
                        server_names
                    };
                    filter_chains.push(FilterChain {
                        name: route_config.clone(),
                        filter_chain_match: (!server_names.is_empty()).then(|| FilterChainMatch {
                            server_names,
                            ..Default::default()
                        }),
                        filters: vec![filter],
                        transport_socket: Some(TransportSocket {
                            name: TLS_TRANSPORT_SOCKET.to_owned(),
                            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                                type_url: DownstreamTlsContext::type_url(),
                                value: tls.encode_to_vec(),
                            })),
                        }),
                        ..Default::default()
                    });
                }
            }
            if filter_chains.is_empty() {
                continue;
            }
            let name = listener_name(&key, port);
            listeners.insert(
                name.clone(),
                (
                    key.clone(),
                    Listener {
                        name,
                        address: Some(socket_address("0.0.0.0".parse().expect("literal"), port)),
                        filter_chains,
                        ..Default::default()
                    },
                ),
            );
        }
    }
}

/// What a Gateway server carries, by its port's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    /// HTTP, HTTP2, GRPC: routed by `http` routes.
    Http,
    /// HTTPS: TLS, then `http` routes.
    Https,
    /// TCP and the other opaque protocols: `tcp` routes.
    Tcp,
    /// TLS: terminated here (SIMPLE, MUTUAL), then `tcp` routes.
    Tls,
}

impl ServerKind {
    fn of(server: &net::Server) -> Option<Self> {
        let protocol = server.port.as_ref()?.protocol.as_deref()?;
        Some(match protocol.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "GRPC" => Self::Http,
            "HTTPS" => Self::Https,
            "TCP" | "MONGO" | "REDIS" | "MYSQL" => Self::Tcp,
            "TLS" => Self::Tls,
            _ => return None,
        })
    }
}

/// The TCP proxy of gateway port `port`: the first `tcp` route (in
/// VirtualService order) of a VirtualService bound to one of `servers`'
/// Gateways whose match allows this port and gateway (no match: any),
/// to its weighted destinations.
fn tcp_route(
    manifests: &Manifests,
    servers: &[BoundServer<'_>],
    port: u32,
    warnings: &mut Vec<String>,
) -> Option<Filter> {
    for vs in &manifests.virtual_services {
        let vs_ns = mesh_config::namespace(&vs.metadata);
        let bound: BTreeSet<String> = servers
            .iter()
            .filter(|s| names_gateway(&vs.spec.gateways, vs_ns, s.gateway))
            .map(|s| gateway_id(s.gateway))
            .collect();
        if bound.is_empty() {
            continue;
        }
        let route = vs.spec.tcp.iter().find(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == port)
                        && (m.gateways.is_empty()
                            || m.gateways
                                .iter()
                                .any(|g| bound.contains(&qualified(g, vs_ns))))
                })
        });
        let Some(route) = route else { continue };
        if route
            .matches
            .iter()
            .any(|m| !m.source_labels.is_empty() || !m.destination_subnets.is_empty())
        {
            warnings.push(format!(
                "VirtualService {vs_ns}/{}: tcp sourceLabels/destinationSubnets are not supported at a gateway; matching on port and gateway only",
                vs.metadata.name.as_deref().unwrap_or_default()
            ));
        }
        return Some(tcp_route_filter(
            &format!("gateway.{port}"),
            &route.route,
            vs_ns,
            port,
        ));
    }
    None
}

/// Whether a server passes TLS through unterminated (`tls.mode: PASSTHROUGH`).
fn is_passthrough(server: &net::Server) -> bool {
    server
        .tls
        .as_ref()
        .is_some_and(|t| t.mode == Some(net::ServerTlsMode::Passthrough))
}

/// The filter chains of a PASSTHROUGH server: one per VirtualService `tls`
/// route bound to its Gateway, matched by the route's `sniHosts` (those the
/// server's hosts allow) and relaying the still-encrypted connection to the
/// route's weighted destinations.
fn passthrough_chains(
    manifests: &Manifests,
    bound: &BoundServer<'_>,
    port: u32,
    warnings: &mut Vec<String>,
) -> Vec<FilterChain> {
    let gateway_ns = mesh_config::namespace(&bound.gateway.metadata);
    let id = gateway_id(bound.gateway);
    let mut chains = Vec::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for vs in &manifests.virtual_services {
        let vs_ns = mesh_config::namespace(&vs.metadata);
        let vs_name = vs.metadata.name.as_deref().unwrap_or_default();
        if !names_gateway(&vs.spec.gateways, vs_ns, bound.gateway) {
            continue;
        }
        for (r, route) in vs.spec.tls.iter().enumerate() {
            let sni: BTreeSet<String> = route
                .matches
                .iter()
                .filter(|m| {
                    m.port.is_none_or(|p| p == port)
                        && (m.gateways.is_empty()
                            || m.gateways.iter().any(|g| qualified(g, vs_ns) == id))
                })
                .flat_map(|m| &m.sni_hosts)
                .map(|h| h.to_ascii_lowercase())
                .filter(|h| {
                    let allowed = bound
                        .server
                        .hosts
                        .iter()
                        .any(|pattern| server_allows(pattern, gateway_ns, vs_ns, h));
                    if !allowed {
                        warnings.push(format!(
                            "VirtualService {vs_ns}/{vs_name}: spec.tls[{r}] sniHost {h} is not among the hosts of Gateway {id} on port {port}"
                        ));
                    }
                    allowed && !taken.contains(h)
                })
                .collect();
            if sni.is_empty() {
                continue;
            }
            taken.extend(sni.iter().cloned());
            // `*` takes every SNI: a chain without names.
            let server_names: Vec<String> = if sni.contains("*") {
                Vec::new()
            } else {
                sni.into_iter().collect()
            };
            chains.push(FilterChain {
                name: format!("tls.{port}~{vs_ns}~{vs_name}~{r}"),
                filter_chain_match: (!server_names.is_empty()).then(|| FilterChainMatch {
                    server_names,
                    ..Default::default()
                }),
                filters: vec![tcp_route_filter(
                    &format!("gateway.{port}"),
                    &route.route,
                    vs_ns,
                    port,
                )],
                ..Default::default()
            });
        }
    }
    chains
}

/// Adds route configuration `name`, scoped to gateway deployment `key`.
fn insert_routes(
    routes: &mut BTreeMap<String, (String, RouteConfiguration)>,
    key: &str,
    name: &str,
    virtual_hosts: Vec<VirtualHost>,
) {
    routes.insert(
        name.to_owned(),
        (
            key.to_owned(),
            RouteConfiguration {
                name: name.to_owned(),
                virtual_hosts,
                ..Default::default()
            },
        ),
    );
}

/// The prefix of a `credentialName` that names a Secret of another
/// namespace, `kubernetes-gateway://<namespace>/<name>`, as Istio writes
/// the certificate references of Gateway API listeners.
pub const CROSS_NAMESPACE_CREDENTIAL: &str = "kubernetes-gateway://";

/// The namespace and name of the Secret `credential_name` names for a
/// gateway in `gateway_ns`: that namespace, or with
/// [`CROSS_NAMESPACE_CREDENTIAL`] another one whose ReferenceGrant lets
/// Gateways of `gateway_ns` refer to the Secret.
fn credential<'a>(
    manifests: &Manifests,
    gateway_ns: &'a str,
    credential_name: &'a str,
) -> Result<(&'a str, &'a str), String> {
    let Some(reference) = credential_name.strip_prefix(CROSS_NAMESPACE_CREDENTIAL) else {
        return Ok((gateway_ns, credential_name));
    };
    let (ns, name) = reference
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| {
            format!(
                "credentialName {credential_name} is not {CROSS_NAMESPACE_CREDENTIAL}<namespace>/<name>"
            )
        })?;
    let from = Referrer {
        group: GATEWAY_API_GROUP,
        kind: "Gateway",
        namespace: gateway_ns,
    };
    let to = Referent {
        group: CORE_GROUP,
        kind: "Secret",
        namespace: ns,
        name,
    };
    if !ReferenceGrants::of(manifests).permits(from, to) {
        return Err(format!(
            "Secret {ns}/{name} is in another namespace and no ReferenceGrant in {ns} lets Gateways from {gateway_ns} refer to it"
        ));
    }
    Ok((ns, name))
}

/// A field of Secret `name` in namespace `ns`: the first of `keys` present.
fn secret_field(manifests: &Manifests, ns: &str, name: &str, keys: &[&str]) -> Option<Vec<u8>> {
    let secret = manifests.secrets.iter().find(|s| {
        s.metadata.name.as_deref() == Some(name) && mesh_config::namespace(&s.metadata) == ns
    })?;
    let data = secret.data.as_ref()?;
    keys.iter().find_map(|k| data.get(*k)).map(|b| b.0.clone())
}

/// The TLS context of an HTTPS server: its certificate from the Secret
/// `credentialName` (in the gateway's namespace) or from files; for
/// `MUTUAL` (client certificate required) and `OPTIONAL_MUTUAL` (checked
/// when presented), the client CA from that Secret's `ca.crt`, a Secret
/// `<credentialName>-cacert`, or the `caCertificates` file, as Istio
/// reads them. `Err` says why the server cannot be served.
fn server_tls(
    server: &net::Server,
    manifests: &Manifests,
    gateway_ns: &str,
) -> Result<DownstreamTlsContext, String> {
    let tls = server.tls.as_ref().ok_or("it has no tls settings")?;
    let credential = tls
        .credential_name
        .as_deref()
        .map(|name| credential(manifests, gateway_ns, name))
        .transpose()?;
    let (chain, key) = if let Some((secret_ns, name)) = credential {
        let field = |keys: &[&str]| secret_field(manifests, secret_ns, name, keys);
        let (Some(chain), Some(key)) = (field(&["tls.crt", "cert"]), field(&["tls.key", "key"]))
        else {
            return Err(format!(
                "credentialName {name} names no Secret with tls.crt and tls.key in {secret_ns}"
            ));
        };
        (
            data_source::Specifier::InlineBytes(chain),
            data_source::Specifier::InlineBytes(key),
        )
    } else {
        let (Some(chain), Some(key)) = (&tls.server_certificate, &tls.private_key) else {
            return Err(
                "it needs credentialName, or serverCertificate and privateKey files".to_owned(),
            );
        };
        (
            data_source::Specifier::Filename(chain.clone()),
            data_source::Specifier::Filename(key.clone()),
        )
    };
    let mutual = matches!(
        tls.mode,
        Some(net::ServerTlsMode::Mutual | net::ServerTlsMode::OptionalMutual)
    );
    let validation = if mutual {
        let ca = match credential {
            Some((secret_ns, name)) => {
                let ca = secret_field(manifests, secret_ns, name, &["ca.crt", "cacert"])
                    .or_else(|| {
                        let cacert = format!("{name}-cacert");
                        secret_field(manifests, secret_ns, &cacert, &["ca.crt", "cacert"])
                    })
                    .ok_or_else(|| {
                        format!(
                            "{:?} needs the client CA: ca.crt in Secret {name} or in Secret {name}-cacert in {secret_ns}",
                            tls.mode.expect("mutual")
                        )
                    })?;
                data_source::Specifier::InlineBytes(ca)
            }
            None => {
                data_source::Specifier::Filename(tls.ca_certificates.clone().ok_or_else(|| {
                    format!("{:?} needs caCertificates", tls.mode.expect("mutual"))
                })?)
            }
        };
        Some(ValidationContextType::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(ca),
                    ..Default::default()
                }),
                match_typed_subject_alt_names: san_matchers(&tls.subject_alt_names),
                ..Default::default()
            },
        ))
    } else {
        None
    };
    Ok(DownstreamTlsContext {
        require_client_certificate: (tls.mode == Some(net::ServerTlsMode::Mutual))
            .then_some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: vec![TlsCertificate {
                certificate_chain: Some(DataSource {
                    specifier: Some(chain),
                    ..Default::default()
                }),
                private_key: Some(DataSource {
                    specifier: Some(key),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            alpn_protocols: vec!["h2".to_owned(), "http/1.1".to_owned()],
            validation_context_type: validation,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `tls.subjectAltNames` as Envoy SAN matchers: each name, exactly, as a
/// DNS, URI or email SAN (and an IP SAN when it is an address); a client
/// certificate needs one of them.
fn san_matchers(names: &[String]) -> Vec<SubjectAltNameMatcher> {
    use subject_alt_name_matcher::SanType;
    names
        .iter()
        .flat_map(|name| {
            let ip = name.parse::<std::net::IpAddr>().is_ok();
            [
                SanType::Dns,
                SanType::Uri,
                SanType::Email,
                SanType::IpAddress,
            ]
            .into_iter()
            .filter(move |kind| ip || *kind != SanType::IpAddress)
            .map(move |kind| SubjectAltNameMatcher {
                san_type: kind as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(name.clone())),
                    ignore_case: false,
                }),
                ..Default::default()
            })
        })
        .collect()
}

/// The virtual hosts of one gateway port: one per bound VirtualService
/// host, holding that VirtualService's routes for this gateway.
fn virtual_hosts(
    manifests: &Manifests,
    servers: &[BoundServer<'_>],
    port: u32,
    services: &HashMap<&str, &ServiceRef>,
    rules: &DestinationRules<'_>,
    warnings: &mut Vec<String>,
) -> Vec<VirtualHost> {
    // Domain -> (routes in VirtualService order, whether TLS is required).
    let mut hosts: BTreeMap<String, (Vec<_>, bool)> = BTreeMap::new();
    for vs in &manifests.virtual_services {
        let vs_ns = mesh_config::namespace(&vs.metadata);
        let vs_name = vs.metadata.name.as_deref().unwrap_or_default();
        let bound: Vec<&BoundServer<'_>> = servers
            .iter()
            .filter(|s| names_gateway(&vs.spec.gateways, vs_ns, s.gateway))
            .collect();
        if bound.is_empty() {
            continue;
        }
        let gateway_names: BTreeSet<String> = bound.iter().map(|s| gateway_id(s.gateway)).collect();
        for host in &vs.spec.hosts {
            let allowing: Vec<_> = bound
                .iter()
                .filter(|s| {
                    let gateway_ns = mesh_config::namespace(&s.gateway.metadata);
                    s.server
                        .hosts
                        .iter()
                        .any(|pattern| server_allows(pattern, gateway_ns, vs_ns, host))
                })
                .collect();
            if allowing.is_empty() {
                warnings.push(format!(
                    "VirtualService {vs_ns}/{vs_name}: host {host} is not among the hosts of its gateway's servers on port {port}"
                ));
                continue;
            }
            let (entry, require_tls) = hosts.entry(host.to_ascii_lowercase()).or_default();
            *require_tls |= allowing.iter().any(|s| https_redirect(s.server));
            entry.extend(vs_routes(
                vs,
                port,
                |g| gateway_names.contains(&qualified(g, vs_ns)),
                services,
                None,
                warnings,
            ));
        }
    }
    // A redirecting server redirects its hosts even where no
    // VirtualService routes them.
    for server in servers.iter().filter(|s| https_redirect(s.server)) {
        for pattern in &server.server.hosts {
            let host = pattern.split_once('/').map_or(pattern.as_str(), |(_, h)| h);
            hosts
                .entry(host.to_ascii_lowercase())
                .or_insert_with(|| (Vec::new(), true));
        }
    }
    hosts
        .into_iter()
        .map(|(domain, (mut routes, require_tls))| {
            add_hash_policies(&mut routes, rules, warnings);
            VirtualHost {
                name: format!("{domain}:{port}"),
                domains: vec![domain],
                routes,
                require_tls: if require_tls {
                    TlsRequirementType::All as i32
                } else {
                    TlsRequirementType::None as i32
                },
                ..Default::default()
            }
        })
        .collect()
}

/// Whether a server redirects plaintext HTTP to HTTPS (`tls.httpsRedirect`).
fn https_redirect(server: &net::Server) -> bool {
    server
        .tls
        .as_ref()
        .is_some_and(|t| t.https_redirect == Some(true))
}

/// `<namespace>/<name>` of a Gateway.
fn gateway_id(gateway: &IstioGateway) -> String {
    format!(
        "{}/{}",
        mesh_config::namespace(&gateway.metadata),
        gateway.metadata.name.as_deref().unwrap_or_default()
    )
}

/// `ns/name` for a `gateways` entry written in namespace `namespace`.
fn qualified(reference: &str, namespace: &str) -> String {
    if reference.contains('/') {
        reference.to_owned()
    } else {
        format!("{namespace}/{reference}")
    }
}

/// Whether a VirtualService's `gateways` (in `namespace`) names `gateway`.
fn names_gateway(gateways: &[String], namespace: &str, gateway: &IstioGateway) -> bool {
    let id = gateway_id(gateway);
    gateways.iter().any(|g| qualified(g, namespace) == id)
}

/// Whether server host `pattern` (`[ns/]host`; `.` is the Gateway's own
/// namespace) of a Gateway in `gateway_ns` lets a VirtualService of
/// namespace `vs_ns` serve `host`.
fn server_allows(pattern: &str, gateway_ns: &str, vs_ns: &str, host: &str) -> bool {
    let (ns, host_pattern) = match pattern.split_once('/') {
        Some((ns, h)) => (ns, h),
        None => ("*", pattern),
    };
    let ns_ok = ns == "*" || (ns == "." && vs_ns == gateway_ns) || ns == vs_ns;
    let host = host.to_ascii_lowercase();
    let host_pattern = host_pattern.to_ascii_lowercase();
    ns_ok
        && (host_pattern == "*"
            || host_matches(&host_pattern, &host)
            || (host.starts_with('*') && host_matches(&host, &host_pattern)))
}

/// The one host name both a listener's `hostname` and a route's serve
/// (Gateway API hostname intersection): the more specific of the two when
/// one matches the other, `None` when they share none.
pub fn host_intersection(listener: &str, route: &str) -> Option<String> {
    let (listener, route) = (listener.to_ascii_lowercase(), route.to_ascii_lowercase());
    if host_matches(&listener, &route) {
        Some(route)
    } else if host_matches(&route, &listener) {
        Some(listener)
    } else {
        None
    }
}

/// The gateway proxies (`<namespace>/<gateway>`) whose pods match
/// `selector`: a pod labelled `gateway.networking.k8s.io/gateway-name` is
/// keyed by that Gateway (what the proxy announces), any other by its
/// owning Deployment.
fn selected_deployments(
    manifests: &Manifests,
    selector: &BTreeMap<String, String>,
) -> BTreeSet<GatewayKey> {
    manifests
        .pods
        .iter()
        .filter(|pod| {
            let labels = &pod.metadata.labels;
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|pod| {
            let namespace = pod.namespace();
            let owner = pod
                .metadata
                .labels
                .get(crate::waypoint_deploy::GATEWAY_NAME_LABEL)
                .cloned()
                .or_else(|| {
                    pod.metadata
                        .owner_references
                        .iter()
                        .find(|o| o.kind == "Deployment")
                        .map(|o| o.name.clone())
                })
                .or_else(|| pod.metadata.name.clone())?;
            Some(format!("{namespace}/{owner}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MeshSettings, Model};

    #[test]
    fn bookinfo_gateway_becomes_a_listener_and_host_routes_for_its_deployment() {
        let samples = std::env::var_os("MESH_ISTIO_SAMPLES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples")
            });
        let mut text =
            std::fs::read_to_string(samples.join("bookinfo/platform/bookinfo.yaml")).unwrap();
        text.push_str("\n---\n");
        text.push_str(
            &std::fs::read_to_string(samples.join("bookinfo/networking/bookinfo-gateway.yaml"))
                .unwrap(),
        );
        text.push_str(
            "\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: istio-ingressgateway-0\n  namespace: istio-system\n  labels: {istio: ingressgateway}\n  ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: istio-ingressgateway, uid: u}]\nspec: {containers: [{name: istio-proxy}]}\nstatus: {podIP: 10.244.0.9}\n",
        );
        let loaded = mesh_config::load_str("t.yaml", &text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let model = Model::build(&loaded.manifests, &MeshSettings::default());
        let key = "istio-system/istio-ingressgateway";
        let (scope, listener) = &model.envoy.listeners[&listener_name(key, 8080)];
        assert_eq!(scope, key);
        assert_eq!(listener.filter_chains.len(), 1);
        let (_, routes) = &model.envoy.routes[&route_name(key, 8080)];
        assert_eq!(routes.virtual_hosts.len(), 1);
        assert_eq!(routes.virtual_hosts[0].domains, ["*"]);
        // One route per match: /productpage, /static, /login, /logout, /api/v1/products.
        assert_eq!(routes.virtual_hosts[0].routes.len(), 5);
    }

    #[test]
    fn server_hosts_restrict_hosts_and_namespaces() {
        assert!(server_allows("*", "gw", "bk", "bookinfo.example.com"));
        assert!(server_allows(
            "bk/*.example.com",
            "gw",
            "bk",
            "bookinfo.example.com"
        ));
        assert!(!server_allows(
            "other/*.example.com",
            "gw",
            "bk",
            "bookinfo.example.com"
        ));
        assert!(!server_allows("./*", "gw", "bk", "bookinfo.example.com"));
        assert!(server_allows("./*", "bk", "bk", "bookinfo.example.com"));
        assert!(!server_allows(
            "api.example.com",
            "gw",
            "bk",
            "bookinfo.example.com"
        ));
        assert!(server_allows(
            "api.example.com",
            "gw",
            "bk",
            "*.example.com"
        ));
    }
    #[test]
    fn mutual_servers_need_their_client_ca_and_check_client_sans() {
        let config = |tls: &str, secret_data: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: cred, namespace: istio-system}}\ndata: {{{secret_data}}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: gw-0\n  namespace: istio-system\n  labels: {{istio: ingressgateway}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: gw, uid: u}}]\nspec: {{containers: [{{name: istio-proxy}}]}}\nstatus: {{podIP: 10.244.0.9}}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g, namespace: istio-system}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 8443, name: https, protocol: HTTPS}}\n    hosts: [a.example.com]\n    tls: {tls}\n"
            )
        };
        // base64 of "pem"
        let cert_and_key = "tls.crt: cGVt, tls.key: cGVt";
        let build = |text: String| {
            let loaded = mesh_config::load_str("t.yaml", &text);
            assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
            Model::build(&loaded.manifests, &MeshSettings::default())
        };
        let key = "istio-system/gw";
        let tls_of = |model: &Model| {
            let (_, listener) = &model.envoy.listeners[&listener_name(key, 8443)];
            let socket = listener.filter_chains[0].transport_socket.as_ref().unwrap();
            let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
                panic!("{socket:?}")
            };
            DownstreamTlsContext::decode(any.value.as_slice()).unwrap()
        };

        let model = build(config("{mode: MUTUAL, credentialName: cred}", cert_and_key));
        assert!(
            !model
                .envoy
                .listeners
                .contains_key(&listener_name(key, 8443))
        );
        assert!(
            model
                .warnings
                .iter()
                .any(|w| w.contains("Gateway istio-system/g")
                    && w.contains("needs the client CA: ca.crt in Secret cred")),
            "{:?}",
            model.warnings
        );

        let model = build(config(
            "{mode: MUTUAL, credentialName: cred, subjectAltNames: [spiffe://x, 10.0.0.1]}",
            &format!("{cert_and_key}, ca.crt: cGVt"),
        ));
        let tls = tls_of(&model);
        let Some(ValidationContextType::ValidationContext(validation)) =
            tls.common_tls_context.unwrap().validation_context_type
        else {
            panic!("no validation context")
        };
        let sans: Vec<(i32, String)> = validation
            .match_typed_subject_alt_names
            .iter()
            .map(|m| {
                let Some(string_matcher::MatchPattern::Exact(value)) =
                    m.matcher.as_ref().and_then(|m| m.match_pattern.clone())
                else {
                    panic!("{m:?}")
                };
                (m.san_type, value)
            })
            .collect();
        use subject_alt_name_matcher::SanType;
        let of = |name: &str, kinds: &[SanType]| {
            kinds
                .iter()
                .map(|k| (*k as i32, name.to_owned()))
                .collect::<Vec<_>>()
        };
        let mut expected = of("spiffe://x", &[SanType::Dns, SanType::Uri, SanType::Email]);
        expected.extend(of(
            "10.0.0.1",
            &[
                SanType::Dns,
                SanType::Uri,
                SanType::Email,
                SanType::IpAddress,
            ],
        ));
        assert_eq!(sans, expected);

        let model = build(config(
            "{mode: OPTIONAL_MUTUAL, credentialName: cred}",
            &format!("{cert_and_key}, ca.crt: cGVt"),
        ));
        let tls = tls_of(&model);
        assert_eq!(
            tls.require_client_certificate, None,
            "optional: checked if presented"
        );
        let common = tls.common_tls_context.unwrap();
        let Some(ValidationContextType::ValidationContext(validation)) =
            common.validation_context_type
        else {
            panic!("no validation context")
        };
        assert_eq!(
            validation.trusted_ca.and_then(|d| d.specifier),
            Some(data_source::Specifier::InlineBytes(b"pem".to_vec()))
        );
    }
}
