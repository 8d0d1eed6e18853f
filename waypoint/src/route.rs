//! Route tables compiled from Envoy `RouteConfiguration`s: matchers with
//! their regexes built once, actions with header names parsed once, so a
//! request costs comparisons, not parsing.
//!
//! Anything the waypoint cannot honour (an unknown path specifier, a filter
//! config it does not run, a regex that does not compile) fails compilation
//! with the route and field named, and the update is NACKed.

use std::{net::IpAddr, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method, request::Parts};
use mesh_api::envoy::{
    envoy::{
        config::{
            core::v3::{HeaderValueOption, header_value_option::HeaderAppendAction},
            route::v3::{
                CorsPolicy, HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration,
                header_matcher::HeaderMatchSpecifier, query_parameter_matcher, redirect_action,
                route, route_action, route_match, virtual_host::TlsRequirementType,
            },
        },
        extensions::filters::http::fault::v3::{HttpFault, fault_abort},
        r#type::{
            matcher::v3::{
                FilterStateMatcher, StringMatcher, filter_state_matcher,
                string_matcher::MatchPattern,
            },
            v3::{FractionalPercent, fractional_percent::DenominatorType},
        },
    },
    google::protobuf::Duration as ProtoDuration,
};
use mesh_api::filter_state::{
    PEER_PRINCIPAL as PEER_PRINCIPAL_KEY, SOURCE_ADDRESS as SOURCE_ADDRESS_KEY,
};
use prost::Message;
use regex::Regex;

/// The fault filter's name, as routes key its per-route config.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Who sent a request, for routes that match on the downstream
/// (`filter_state`): VirtualService `sourceNamespace` and `sourceLabels`.
#[derive(Clone, Copy, Debug)]
pub struct Downstream<'a> {
    /// The caller's SPIFFE identity (empty without one).
    pub principal: &'a str,
    /// The original client's address.
    pub address: IpAddr,
}

/// One route configuration: virtual hosts chosen by the request's
/// authority, each with its routes in order (the first match wins). A
/// waypoint's configurations hold one host matching `*`; an ingress
/// gateway's hold one per VirtualService host.
#[derive(Debug)]
pub struct RouteTable {
    /// The route configuration's name.
    pub name: String,
    hosts: Vec<CompiledHost>,
}

#[derive(Debug)]
struct CompiledHost {
    domains: Vec<Domain>,
    routes: Vec<CompiledRoute>,
    /// `require_tls`: plaintext requests are redirected to `https://`.
    require_tls: bool,
}

/// An Envoy virtual host domain.
#[derive(Debug)]
enum Domain {
    Any,
    Exact(String),
    /// `*.example.com` (the suffix keeps its dot).
    Suffix(String),
    /// `example.*`.
    Prefix(String),
}

impl Domain {
    fn parse(domain: &str) -> Result<Self, String> {
        let d = domain.to_ascii_lowercase();
        Ok(if d == "*" {
            Domain::Any
        } else if let Some(suffix) = d.strip_prefix('*') {
            Domain::Suffix(suffix.to_owned())
        } else if let Some(prefix) = d.strip_suffix('*') {
            Domain::Prefix(prefix.to_owned())
        } else if d.contains('*') || d.is_empty() {
            return Err(format!("domain {domain:?}: wildcards only at either end"));
        } else {
            Domain::Exact(d)
        })
    }

    /// Envoy's precedence: exact, then the longest suffix, then the longest
    /// prefix, then `*`; `None` when it does not match.
    fn rank(&self, host: &str) -> Option<(u8, usize)> {
        match self {
            Domain::Exact(d) => (d == host).then_some((3, d.len())),
            Domain::Suffix(s) => {
                (host.len() > s.len() && host.ends_with(s.as_str())).then_some((2, s.len()))
            }
            Domain::Prefix(p) => {
                (host.len() > p.len() && host.starts_with(p.as_str())).then_some((1, p.len()))
            }
            Domain::Any => Some((0, 0)),
        }
    }
}

impl RouteTable {
    /// Compiles `config`.
    pub fn compile(config: &RouteConfiguration) -> Result<Self, String> {
        let mut hosts = Vec::new();
        for (h, host) in config.virtual_hosts.iter().enumerate() {
            let domains = host
                .domains
                .iter()
                .map(|d| Domain::parse(d).map_err(|e| format!("virtual_hosts[{h}]: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            if domains.is_empty() {
                return Err(format!("virtual_hosts[{h}]: no domains"));
            }
            let mut routes = Vec::new();
            for (i, route) in host.routes.iter().enumerate() {
                routes.push(CompiledRoute::compile(route).map_err(|e| {
                    format!("virtual_hosts[{h}].routes[{i}] ({}): {e}", route.name)
                })?);
            }
            let require_tls = host.require_tls != TlsRequirementType::None as i32;
            hosts.push(CompiledHost {
                domains,
                routes,
                require_tls,
            });
        }
        Ok(Self {
            name: config.name.clone(),
            hosts,
        })
    }

    /// The first route matching the request, in the virtual host its
    /// authority (without port, case-insensitive) selects. Routes that
    /// match on the downstream never match here; see [`Self::find_from`].
    pub fn find(&self, request: &Parts) -> Option<&CompiledRoute> {
        self.find_route(request, None)
    }

    /// [`Self::find`] for a request from `downstream`.
    pub fn find_from(
        &self,
        request: &Parts,
        downstream: &Downstream<'_>,
    ) -> Option<&CompiledRoute> {
        self.find_route(request, Some(downstream))
    }

    fn find_route(
        &self,
        request: &Parts,
        downstream: Option<&Downstream<'_>>,
    ) -> Option<&CompiledRoute> {
        let host = self.host_for(request)?;
        host.routes
            .iter()
            .find(|r| r.matcher.matches(request, downstream))
    }

    /// Whether the virtual host of the request requires TLS (Istio's
    /// `httpsRedirect`): a plaintext request gets a redirect instead.
    pub fn requires_tls(&self, request: &Parts) -> bool {
        self.host_for(request).is_some_and(|h| h.require_tls)
    }

    fn host_for(&self, request: &Parts) -> Option<&CompiledHost> {
        if let [only] = self.hosts.as_slice()
            && matches!(only.domains.as_slice(), [Domain::Any])
        {
            return Some(only);
        }
        let authority = authority(request).unwrap_or("");
        let name = match authority.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => authority,
        };
        let name = name.to_ascii_lowercase();
        self.hosts
            .iter()
            .filter_map(|h| {
                h.domains
                    .iter()
                    .filter_map(|d| d.rank(&name))
                    .max()
                    .map(|r| (r, h))
            })
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, h)| h)
    }

    /// How many routes it holds.
    pub fn len(&self) -> usize {
        self.hosts.iter().map(|h| h.routes.len()).sum()
    }

    /// Whether it holds no route.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Route names, for `/config_dump`.
    pub fn route_names(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .flat_map(|h| &h.routes)
            .map(|r| r.name.as_str())
            .collect()
    }
}

/// One route.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Its name (Istio's `<ns>/<vs>.http[i]` or the route's `name`).
    pub name: String,
    matcher: Matcher,
    /// What to do with a matching request.
    pub action: Action,
    /// Request header edits of the route.
    pub request_headers: HeaderEdits,
    /// Response header edits of the route.
    pub response_headers: HeaderEdits,
    /// Fault injection.
    pub fault: Option<Fault>,
}

impl CompiledRoute {
    /// The path prefix the route matched on, if it matches by prefix: the
    /// part `prefix_rewrite` replaces.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.matcher.path {
            PathMatch::Prefix(p) => Some(p),
            _ => None,
        }
    }

    fn compile(route: &Route) -> Result<Self, String> {
        let matcher = Matcher::compile(route.r#match.as_ref().ok_or("match: missing")?)?;
        let action = match &route.action {
            Some(route::Action::Route(action)) => {
                Action::Forward(Box::new(Forward::compile(action)?))
            }
            Some(route::Action::Redirect(redirect)) => Action::Redirect(Redirect {
                host: non_empty(&redirect.host_redirect),
                port: (redirect.port_redirect != 0).then_some(redirect.port_redirect as u16),
                scheme: match &redirect.scheme_rewrite_specifier {
                    Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => {
                        Some(s.clone())
                    }
                    Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                        Some("https".to_owned())
                    }
                    _ => None,
                },
                path: match &redirect.path_rewrite_specifier {
                    Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
                    None => None,
                    Some(_) => return Err("redirect: only path_redirect is supported".into()),
                },
                status: match redirect_action::RedirectResponseCode::try_from(
                    redirect.response_code,
                ) {
                    Ok(redirect_action::RedirectResponseCode::Found) => 302,
                    Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
                    Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
                    Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
                    _ => 301,
                },
            }),
            Some(route::Action::DirectResponse(direct)) => Action::Direct {
                status: u16::try_from(direct.status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| {
                        format!(
                            "direct_response.status {} is not an HTTP status",
                            direct.status
                        )
                    })?,
            },
            Some(_) => {
                return Err(
                    "action: only route, redirect and direct_response are supported".into(),
                );
            }
            None => return Err("action: missing".into()),
        };
        let mut fault = None;
        for (name, config) in &route.typed_per_filter_config {
            if name != FAULT_FILTER {
                return Err(format!(
                    "typed_per_filter_config: filter {name} is not supported"
                ));
            }
            let decoded = HttpFault::decode(config.value.as_slice())
                .map_err(|e| format!("typed_per_filter_config[{name}]: {e}"))?;
            fault = Some(Fault::compile(&decoded)?);
        }
        Ok(Self {
            name: route.name.clone(),
            matcher,
            action,
            request_headers: HeaderEdits::compile(
                &route.request_headers_to_add,
                &route.request_headers_to_remove,
            )
            .map_err(|e| format!("request headers: {e}"))?,
            response_headers: HeaderEdits::compile(
                &route.response_headers_to_add,
                &route.response_headers_to_remove,
            )
            .map_err(|e| format!("response headers: {e}"))?,
            fault,
        })
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A request matcher.
#[derive(Debug)]
struct Matcher {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<(String, Option<StrMatch>)>,
    downstream: Vec<DownstreamMatch>,
}

/// A `filter_state` match on who sent the request.
#[derive(Debug)]
enum DownstreamMatch {
    /// [`PEER_PRINCIPAL_KEY`] against a string matcher.
    Principal(StrMatch),
    /// [`SOURCE_ADDRESS_KEY`] in (or, inverted, outside) these ranges.
    Address {
        ranges: Vec<crate::rbac::Cidr>,
        invert: bool,
    },
}

impl DownstreamMatch {
    fn compile(m: &FilterStateMatcher) -> Result<Self, String> {
        use filter_state_matcher::Matcher as M;
        match (m.key.as_str(), &m.matcher) {
            (PEER_PRINCIPAL_KEY, Some(M::StringMatch(s))) => {
                Ok(Self::Principal(StrMatch::compile(s)?))
            }
            (SOURCE_ADDRESS_KEY, Some(M::AddressMatch(a))) => Ok(Self::Address {
                ranges: a
                    .ranges
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        crate::rbac::Cidr::parse(
                            &r.address_prefix,
                            r.prefix_len.as_ref().map(|l| l.value),
                        )
                        .map_err(|e| format!("address_match.ranges[{i}]: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
                invert: a.invert_match,
            }),
            (PEER_PRINCIPAL_KEY, _) => Err(format!("key {PEER_PRINCIPAL_KEY} needs string_match")),
            (SOURCE_ADDRESS_KEY, _) => Err(format!("key {SOURCE_ADDRESS_KEY} needs address_match")),
            (key, _) => Err(format!(
                "key {key:?}: only {PEER_PRINCIPAL_KEY} and {SOURCE_ADDRESS_KEY} are supported"
            )),
        }
    }

    fn matches(&self, downstream: &Downstream<'_>) -> bool {
        match self {
            Self::Principal(pattern) => {
                !downstream.principal.is_empty() && pattern.matches(downstream.principal)
            }
            Self::Address { ranges, invert } => {
                ranges.iter().any(|r| r.contains(downstream.address)) != *invert
            }
        }
    }
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

/// A header matcher (Envoy's `HeaderMatcher`, pseudo-headers included).
#[derive(Debug)]
pub struct HeaderMatch {
    name: String,
    pattern: Option<StrMatch>,
    invert: bool,
}

/// A string matcher.
#[derive(Debug)]
pub enum StrMatch {
    /// Equal.
    Exact(String, bool),
    /// Starts with.
    Prefix(String, bool),
    /// Ends with.
    Suffix(String, bool),
    /// Contains.
    Contains(String, bool),
    /// Matches the whole value.
    Regex(Regex),
}

impl StrMatch {
    /// Compiles an Envoy string matcher.
    pub fn compile(m: &StringMatcher) -> Result<Self, String> {
        let ic = m.ignore_case;
        let fold = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        Ok(match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => StrMatch::Exact(fold(s), ic),
            Some(MatchPattern::Prefix(s)) => StrMatch::Prefix(fold(s), ic),
            Some(MatchPattern::Suffix(s)) => StrMatch::Suffix(fold(s), ic),
            Some(MatchPattern::Contains(s)) => StrMatch::Contains(fold(s), ic),
            Some(MatchPattern::SafeRegex(r)) => StrMatch::Regex(full_regex(&r.regex)?),
            _ => return Err("string matcher: unsupported pattern".into()),
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let folded = |ic: bool| -> std::borrow::Cow<'_, str> {
            if ic {
                value.to_ascii_lowercase().into()
            } else {
                value.into()
            }
        };
        match self {
            StrMatch::Exact(s, ic) => *folded(*ic) == **s,
            StrMatch::Prefix(s, ic) => folded(*ic).starts_with(s.as_str()),
            StrMatch::Suffix(s, ic) => folded(*ic).ends_with(s.as_str()),
            StrMatch::Contains(s, ic) => folded(*ic).contains(s.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// Envoy's safe_regex matches the whole string.
fn full_regex(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("regex {pattern:?}: {e}"))
}

impl Matcher {
    fn compile(m: &mesh_api::envoy::envoy::config::route::v3::RouteMatch) -> Result<Self, String> {
        let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
        let fold = |s: &str| {
            if case_sensitive {
                s.to_owned()
            } else {
                s.to_ascii_lowercase()
            }
        };
        let path = match &m.path_specifier {
            Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
            Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
            Some(route_match::PathSpecifier::SafeRegex(r)) => {
                let pattern = if case_sensitive {
                    r.regex.clone()
                } else {
                    format!("(?i){}", r.regex)
                };
                PathMatch::Regex(
                    full_regex(&pattern).map_err(|e| format!("match.safe_regex: {e}"))?,
                )
            }
            Some(_) => return Err("match: only prefix, path and safe_regex are supported".into()),
            None => return Err("match: no path specifier".into()),
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatch::compile(h).map_err(|e| format!("match.headers[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        let query = m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let pattern = match &q.query_parameter_match_specifier {
                    Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)) => {
                        Some(
                            StrMatch::compile(s)
                                .map_err(|e| format!("match.query_parameters[{i}]: {e}"))?,
                        )
                    }
                    _ => None,
                };
                Ok((q.name.clone(), pattern))
            })
            .collect::<Result<_, String>>()?;
        let downstream = m
            .filter_state
            .iter()
            .enumerate()
            .map(|(i, f)| {
                DownstreamMatch::compile(f).map_err(|e| format!("match.filter_state[{i}]: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path,
            case_sensitive,
            headers,
            query,
            downstream,
        })
    }

    fn matches(&self, request: &Parts, downstream: Option<&Downstream<'_>>) -> bool {
        if !self.downstream.is_empty() {
            // Without a downstream there is no filter state: no match.
            let Some(downstream) = downstream else {
                return false;
            };
            if !self.downstream.iter().all(|m| m.matches(downstream)) {
                return false;
            }
        }
        let path = request.uri.path();
        let path_ok = match &self.path {
            PathMatch::Prefix(p) if self.case_sensitive => path.starts_with(p.as_str()),
            PathMatch::Prefix(p) => path.to_ascii_lowercase().starts_with(p.as_str()),
            PathMatch::Exact(p) if self.case_sensitive => path == p,
            PathMatch::Exact(p) => path.eq_ignore_ascii_case(p),
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(request))
            && self.query.iter().all(|(name, pattern)| {
                let value = request.uri.query().and_then(|q| query_value(q, name));
                match (value, pattern) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(p)) => p.matches(&v),
                }
            })
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

impl HeaderMatch {
    /// Compiles an Envoy header matcher.
    pub fn compile(h: &HeaderMatcher) -> Result<Self, String> {
        let pattern = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(s)) => Some(StrMatch::compile(s)?),
            Some(HeaderMatchSpecifier::PresentMatch(true)) | None => None,
            Some(_) => return Err(format!("header {}: unsupported match", h.name)),
        };
        Ok(Self {
            name: h.name.to_ascii_lowercase(),
            pattern,
            invert: h.invert_match,
        })
    }

    /// Whether `request` matches.
    pub fn matches(&self, request: &Parts) -> bool {
        let value: Option<std::borrow::Cow<'_, str>> = match self.name.as_str() {
            ":method" => Some(request.method.as_str().into()),
            ":path" => request.uri.path_and_query().map(|p| p.as_str().into()),
            ":authority" => authority(request).map(Into::into),
            ":scheme" => Some(request.uri.scheme_str().unwrap_or("http").into()),
            name => request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(Into::into),
        };
        let hit = match (&value, &self.pattern) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(p)) => p.matches(v),
        };
        hit != self.invert
    }
}

/// The request's authority: `:authority` (HTTP/2) or `Host`.
pub fn authority(request: &Parts) -> Option<&str> {
    request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers.get(http::header::HOST)?.to_str().ok())
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Forward to a cluster.
    Forward(Box<Forward>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a status.
    Direct {
        /// The status.
        status: u16,
    },
}

/// A redirect.
#[derive(Debug)]
pub struct Redirect {
    /// New authority.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New scheme.
    pub scheme: Option<String>,
    /// New path.
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// Forwarding to one of weighted clusters.
#[derive(Debug)]
pub struct Forward {
    /// `(cluster, weight, request edits, response edits)`.
    pub clusters: Vec<WeightedTarget>,
    total_weight: u32,
    /// Overall timeout (none: no limit).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<Retry>,
    /// Replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// Regex path rewrite.
    pub regex_rewrite: Option<(Regex, String)>,
    /// New authority.
    pub host_rewrite: Option<HeaderValue>,
    /// `(cluster, parts per million)` copies of each request.
    pub mirrors: Vec<(String, u32)>,
    /// CORS.
    pub cors: Option<Cors>,
    /// What a consistent-hash load balancer hashes, in order.
    pub hash_policy: Vec<HashKey>,
}

/// One part of a request's hash key (Envoy's route `hash_policy`).
#[derive(Debug)]
pub enum HashKey {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value; with a `ttl`, a missing cookie is generated and
    /// set on the response so the client sticks from then on.
    Cookie {
        /// Cookie name.
        name: String,
        /// Lifetime of a generated cookie.
        ttl: Option<Duration>,
        /// `Path` of a generated cookie.
        path: String,
    },
    /// The original client's IP.
    SourceIp,
    /// A query parameter's value.
    Query(String),
}

/// A request's hash: the value (none: no key applied, pick at random) and a
/// cookie to set on the response.
#[derive(Debug, Default)]
pub struct RequestHash {
    /// The hash.
    pub value: Option<u64>,
    /// `Set-Cookie` for a generated cookie.
    pub set_cookie: Option<HeaderValue>,
}

/// One weighted destination.
#[derive(Debug)]
pub struct WeightedTarget {
    /// Cluster name.
    pub cluster: String,
    /// Weight.
    pub weight: u32,
    /// Its request header edits.
    pub request_headers: HeaderEdits,
    /// Its response header edits.
    pub response_headers: HeaderEdits,
}

impl Forward {
    fn compile(action: &RouteAction) -> Result<Self, String> {
        let clusters = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(name)) => vec![WeightedTarget {
                cluster: name.clone(),
                weight: 1,
                request_headers: HeaderEdits::default(),
                response_headers: HeaderEdits::default(),
            }],
            Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) => weighted
                .clusters
                .iter()
                .map(|c| {
                    Ok(WeightedTarget {
                        cluster: c.name.clone(),
                        weight: c.weight.as_ref().map_or(0, |w| w.value),
                        request_headers: HeaderEdits::compile(
                            &c.request_headers_to_add,
                            &c.request_headers_to_remove,
                        )?,
                        response_headers: HeaderEdits::compile(
                            &c.response_headers_to_add,
                            &c.response_headers_to_remove,
                        )?,
                    })
                })
                .collect::<Result<_, String>>()?,
            _ => return Err("route: only cluster and weighted_clusters are supported".into()),
        };
        let total_weight = clusters.iter().map(|c| c.weight).sum();
        if total_weight == 0 {
            return Err("route.weighted_clusters: weights sum to 0".into());
        }
        let regex_rewrite = match &action.regex_rewrite {
            Some(r) => Some((
                regex::Regex::new(&r.pattern.as_ref().ok_or("regex_rewrite: no pattern")?.regex)
                    .map_err(|e| format!("regex_rewrite: {e}"))?,
                envoy_substitution(&r.substitution),
            )),
            None => None,
        };
        let host_rewrite = match &action.host_rewrite_specifier {
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(
                HeaderValue::from_str(h)
                    .map_err(|_| format!("host_rewrite_literal {h:?}: not a header value"))?,
            ),
            None => None,
            Some(_) => return Err("route: only host_rewrite_literal is supported".into()),
        };
        #[allow(deprecated)]
        let cors = action.cors.as_ref().map(Cors::compile).transpose()?;
        Ok(Self {
            clusters,
            total_weight,
            timeout: action
                .timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            retry: action.retry_policy.as_ref().map(Retry::compile),
            prefix_rewrite: non_empty(&action.prefix_rewrite),
            regex_rewrite,
            host_rewrite,
            mirrors: action
                .request_mirror_policies
                .iter()
                .map(|m| {
                    let ppm = m
                        .runtime_fraction
                        .as_ref()
                        .and_then(|f| f.default_value.as_ref())
                        .map_or(1_000_000, parts_per_million);
                    (m.cluster.clone(), ppm)
                })
                .collect(),
            cors,
            hash_policy: action
                .hash_policy
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    HashKey::compile(h).map_err(|e| format!("route.hash_policy[{i}]: {e}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// The request's hash key from the route's hash policy; `generate`
    /// makes a value for a missing cookie that has a ttl.
    pub fn request_hash(
        &self,
        request: &Parts,
        source: std::net::IpAddr,
        generate: impl FnOnce() -> u64,
    ) -> RequestHash {
        use std::hash::{Hash, Hasher};
        let mut out = RequestHash::default();
        let mut generate = Some(generate);
        let mut combine = |part: &dyn Fn(&mut std::hash::DefaultHasher)| {
            // Fixed keys: every waypoint replica hashes a request alike.
            let mut hasher = std::hash::DefaultHasher::new();
            part(&mut hasher);
            let h = hasher.finish();
            out.value = Some(out.value.map_or(h, |prev| prev.rotate_left(1) ^ h));
        };
        for key in &self.hash_policy {
            match key {
                HashKey::Header(name) => {
                    let values: Vec<&[u8]> = request
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| v.as_bytes())
                        .collect();
                    if !values.is_empty() {
                        combine(&|h| values.hash(h));
                    }
                }
                HashKey::Cookie { name, ttl, path } => {
                    if let Some(value) = cookie(&request.headers, name) {
                        combine(&|h| value.hash(h));
                    } else if let (Some(ttl), Some(generate)) = (ttl, generate.take()) {
                        let value = format!("{:016x}", generate());
                        combine(&|h| value.as_str().hash(h));
                        let path = if path.is_empty() {
                            String::new()
                        } else {
                            format!("; Path={path}")
                        };
                        out.set_cookie = HeaderValue::from_str(&format!(
                            "{name}=\"{value}\"; Max-Age={}{path}; HttpOnly",
                            ttl.as_secs()
                        ))
                        .ok();
                    }
                }
                HashKey::SourceIp => combine(&|h| source.hash(h)),
                HashKey::Query(name) => {
                    if let Some(value) = request.uri.query().and_then(|q| query_value(q, name)) {
                        combine(&|h| value.hash(h));
                    }
                }
            }
        }
        out
    }

    /// Picks a destination by weight; `roll` is uniform in `0..u32::MAX`.
    pub fn pick(&self, roll: u32) -> &WeightedTarget {
        let mut point = roll % self.total_weight;
        for target in &self.clusters {
            if point < target.weight {
                return target;
            }
            point -= target.weight;
        }
        &self.clusters[self.clusters.len() - 1]
    }
}

impl HashKey {
    fn compile(policy: &route_action::HashPolicy) -> Result<Self, String> {
        use route_action::hash_policy::PolicySpecifier;
        Ok(match &policy.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                if h.regex_rewrite.is_some() {
                    return Err("header.regex_rewrite is not supported".into());
                }
                HashKey::Header(
                    HeaderName::from_bytes(h.header_name.as_bytes())
                        .map_err(|_| format!("header {:?}: not a header name", h.header_name))?,
                )
            }
            Some(PolicySpecifier::Cookie(c)) => {
                if c.name.is_empty()
                    || !c
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
                {
                    return Err(format!("cookie {:?}: not a cookie name", c.name));
                }
                if !c.attributes.is_empty() {
                    return Err("cookie.attributes are not supported".into());
                }
                HashKey::Cookie {
                    name: c.name.clone(),
                    ttl: c.ttl.as_ref().map(duration),
                    path: c.path.clone(),
                }
            }
            Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashKey::SourceIp,
            Some(PolicySpecifier::QueryParameter(q)) => HashKey::Query(q.name.clone()),
            _ => {
                return Err(
                    "only header, cookie, source IP and query parameter hashing are supported"
                        .into(),
                );
            }
        })
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// Retry policy.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first try.
    pub attempts: u32,
    /// Time limit of each try.
    pub per_try_timeout: Option<Duration>,
    /// `5xx`: any 5xx, and no answer at all (connection failure, reset,
    /// per-try timeout).
    pub on_5xx: bool,
    /// `gateway-error`: 502, 503, 504, and no answer at all.
    pub on_gateway_error: bool,
    /// `connect-failure`: the connection could not be opened.
    pub on_connect_failure: bool,
    /// `refused-stream`: an HTTP/2 upstream refused the stream.
    pub on_refused_stream: bool,
    /// `reset`: the upstream closed or reset before answering, or did not
    /// answer within the per-try timeout.
    pub on_reset: bool,
    /// On `retriable_status_codes`.
    pub status_codes: Vec<u16>,
    /// `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`: gRPC status codes of a response's headers
    /// (a trailers-only answer) that are retried.
    pub grpc_statuses: Vec<u32>,
}

/// How an attempt failed without an upstream response, as retry policies
/// distinguish it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The connection could not be opened (`UF`).
    ConnectFailure,
    /// The connection or stream closed or was reset before a response (`UC`).
    Reset,
    /// An HTTP/2 upstream refused the stream (`REFUSED_STREAM`).
    RefusedStream,
    /// No response within the per-try timeout (`UT`).
    PerTryTimeout,
    /// Not sent at all: no healthy endpoint or circuit breaker open.
    NotSent,
}

impl Retry {
    fn compile(policy: &RetryPolicy) -> Self {
        let on: Vec<&str> = policy.retry_on.split(',').map(str::trim).collect();
        let has = |k: &str| on.contains(&k);
        let grpc_statuses = [
            ("cancelled", 1),
            ("deadline-exceeded", 4),
            ("resource-exhausted", 8),
            ("internal", 13),
            ("unavailable", 14),
        ]
        .into_iter()
        .filter(|(name, _)| has(name))
        .map(|(_, code)| code)
        .collect();
        Self {
            attempts: policy.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: policy
                .per_try_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            on_5xx: has("5xx"),
            on_gateway_error: has("gateway-error"),
            on_connect_failure: has("connect-failure"),
            on_refused_stream: has("refused-stream"),
            on_reset: has("reset"),
            status_codes: if has("retriable-status-codes") {
                policy
                    .retriable_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect()
            } else {
                Vec::new()
            },
            grpc_statuses,
        }
    }

    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.status_codes.contains(&status)
    }

    /// Whether a response whose headers carry `grpc-status: code` is retried.
    pub fn retries_grpc_status(&self, code: u32) -> bool {
        self.grpc_statuses.contains(&code)
    }

    /// Whether an attempt that failed this way is retried.
    pub fn retries_failure(&self, failure: AttemptFailure) -> bool {
        let no_answer = self.on_5xx || self.on_gateway_error;
        match failure {
            AttemptFailure::ConnectFailure => no_answer || self.on_reset || self.on_connect_failure,
            AttemptFailure::RefusedStream => no_answer || self.on_reset || self.on_refused_stream,
            AttemptFailure::Reset | AttemptFailure::PerTryTimeout => no_answer || self.on_reset,
            AttemptFailure::NotSent => false,
        }
    }
}

/// An Envoy `regex_rewrite` substitution (capture groups as `\1`, every
/// other character literal) in the `regex` crate's syntax (`${1}`, `$$`).
fn envoy_substitution(substitution: &str) -> String {
    let mut out = String::with_capacity(substitution.len() + 8);
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    out.push(d);
                }
                out.push('}');
            }
            c => out.push(c),
        }
    }
    out
}

/// Fault injection of a route.
#[derive(Debug, Clone)]
pub struct Fault {
    /// `(delay, parts per million)`.
    pub delay: Option<(Duration, u32)>,
    /// `(answer, parts per million)`.
    pub abort: Option<(Abort, u32)>,
}

/// What an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status, in a trailers-only gRPC response.
    Grpc(u32),
}

impl Fault {
    fn compile(fault: &HttpFault) -> Result<Self, String> {
        use mesh_api::envoy::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
        let delay = match &fault.delay {
            None => None,
            Some(d) => match &d.fault_delay_secifier {
                Some(FaultDelaySecifier::FixedDelay(fixed)) => Some((
                    duration(fixed),
                    d.percentage.as_ref().map_or(1_000_000, parts_per_million),
                )),
                _ => return Err("fault.delay: only fixed_delay is supported".into()),
            },
        };
        let abort = match &fault.abort {
            None => None,
            Some(a) => {
                let answer = match &a.error_type {
                    Some(fault_abort::ErrorType::HttpStatus(status)) => Abort::Http(
                        u16::try_from(*status)
                            .ok()
                            .filter(|s| (200..600).contains(s))
                            .ok_or_else(|| {
                                format!("fault.abort.http_status {status} is not an HTTP status")
                            })?,
                    ),
                    Some(fault_abort::ErrorType::GrpcStatus(code)) if *code <= 16 => {
                        Abort::Grpc(*code)
                    }
                    Some(fault_abort::ErrorType::GrpcStatus(code)) => {
                        return Err(format!(
                            "fault.abort.grpc_status {code} is not a gRPC status"
                        ));
                    }
                    _ => {
                        return Err(
                            "fault.abort: only http_status and grpc_status are supported".into(),
                        );
                    }
                };
                Some((
                    answer,
                    a.percentage.as_ref().map_or(1_000_000, parts_per_million),
                ))
            }
        };
        Ok(Self { delay, abort })
    }
}

/// CORS policy.
#[derive(Debug)]
pub struct Cors {
    /// Allowed origins.
    pub origins: Vec<StrMatch>,
    /// `access-control-allow-methods`.
    pub methods: Option<HeaderValue>,
    /// `access-control-allow-headers`.
    pub headers: Option<HeaderValue>,
    /// `access-control-expose-headers`.
    pub expose: Option<HeaderValue>,
    /// `access-control-max-age`.
    pub max_age: Option<HeaderValue>,
    /// `access-control-allow-credentials: true`.
    pub credentials: bool,
}

impl Cors {
    fn compile(policy: &CorsPolicy) -> Result<Self, String> {
        let value = |s: &str, field: &str| -> Result<Option<HeaderValue>, String> {
            if s.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(s)
                .map(Some)
                .map_err(|_| format!("cors.{field}: {s:?} is not a header value"))
        };
        Ok(Self {
            origins: policy
                .allow_origin_string_match
                .iter()
                .map(StrMatch::compile)
                .collect::<Result<_, _>>()?,
            methods: value(&policy.allow_methods, "allow_methods")?,
            headers: value(&policy.allow_headers, "allow_headers")?,
            expose: value(&policy.expose_headers, "expose_headers")?,
            max_age: value(&policy.max_age, "max_age")?,
            credentials: policy.allow_credentials.as_ref().is_some_and(|b| b.value),
        })
    }

    /// Whether `origin` may call.
    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }

    /// Whether `request` is a CORS preflight.
    pub fn is_preflight(request: &Parts) -> bool {
        request.method == Method::OPTIONS
            && request.headers.contains_key(http::header::ORIGIN)
            && request
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
    }
}

/// Header additions and removals.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    add: Vec<(HeaderName, HeaderValue, bool)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    fn compile(add: &[HeaderValueOption], remove: &[String]) -> Result<Self, String> {
        let add = add
            .iter()
            .map(|option| {
                let header = option
                    .header
                    .as_ref()
                    .ok_or("header_value_option without header")?;
                let name = HeaderName::from_bytes(header.key.as_bytes())
                    .map_err(|_| format!("{:?} is not a header name", header.key))?;
                let value = HeaderValue::from_str(&header.value)
                    .map_err(|_| format!("header {}: value is not a header value", header.key))?;
                let append = option.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32;
                Ok((name, value, append))
            })
            .collect::<Result<_, String>>()?;
        let remove = remove
            .iter()
            .map(|r| {
                HeaderName::from_bytes(r.as_bytes())
                    .map_err(|_| format!("{r:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { add, remove })
    }

    /// Applies the edits: removals, then additions.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, append) in &self.add {
            if *append {
                headers.append(name.clone(), value.clone());
            } else {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// A protobuf duration.
pub fn duration(d: &ProtoDuration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A fraction as parts per million.
pub fn parts_per_million(f: &FractionalPercent) -> u32 {
    let scale = match DenominatorType::try_from(f.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        _ => 1,
    };
    f.numerator.saturating_mul(scale).min(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::envoy::envoy::config::route::v3::{RouteMatch, VirtualHost};

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn table(routes: Vec<Route>) -> Result<RouteTable, String> {
        RouteTable::compile(&RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![VirtualHost {
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn to(cluster: &str, r#match: RouteMatch) -> Route {
        Route {
            name: cluster.into(),
            r#match: Some(r#match),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn retry_conditions_follow_envoys_retry_on() {
        let policy = |on: &str| {
            Retry::compile(&RetryPolicy {
                retry_on: on.into(),
                retriable_status_codes: vec![503],
                ..Default::default()
            })
        };
        use AttemptFailure::*;
        // Istio's default: connection failures, refused streams, 503 and
        // gRPC UNAVAILABLE / CANCELLED; not resets or timeouts.
        let istio =
            policy("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes");
        assert!(istio.retries_failure(ConnectFailure));
        assert!(istio.retries_failure(RefusedStream));
        assert!(!istio.retries_failure(Reset));
        assert!(!istio.retries_failure(PerTryTimeout));
        assert!(!istio.retries_failure(NotSent));
        assert!(istio.retries_status(503) && !istio.retries_status(502));
        assert!(istio.retries_grpc_status(14) && istio.retries_grpc_status(1));
        assert!(!istio.retries_grpc_status(13));
        // `reset` covers every answerless attempt but a circuit breaker's.
        let reset = policy("reset");
        for failure in [ConnectFailure, RefusedStream, Reset, PerTryTimeout] {
            assert!(reset.retries_failure(failure), "{failure:?}");
        }
        assert!(!reset.retries_failure(NotSent) && !reset.retries_status(503));
        // `gateway-error`: 502-504 and answerless attempts.
        let gateway = policy("gateway-error");
        assert!(gateway.retries_failure(PerTryTimeout) && gateway.retries_status(504));
        assert!(!gateway.retries_status(500));
        assert!(policy("5xx").retries_status(500));
        assert!(!policy("connect-failure").retries_failure(Reset));
    }

    #[test]
    fn first_match_wins_with_headers_and_prefixes() {
        let jason = RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            headers: vec![HeaderMatcher {
                name: "end-user".into(),
                header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(MatchPattern::Exact("jason".into())),
                    ignore_case: false,
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        let all = RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        };
        let t = table(vec![to("v2", jason), to("v1", all)]).unwrap();
        let hit = |r: &Parts| t.find(r).map(|r| r.name.clone());
        assert_eq!(
            hit(&request("GET", "/x", &[("end-user", "jason")])).as_deref(),
            Some("v2")
        );
        assert_eq!(
            hit(&request("GET", "/x", &[("end-user", "json")])).as_deref(),
            Some("v1")
        );
        assert_eq!(hit(&request("GET", "/x", &[])).as_deref(), Some("v1"));
    }

    #[test]
    fn filter_state_matches_the_downstream_and_unknown_keys_are_refused() {
        use mesh_api::envoy::{
            envoy::r#type::matcher::v3::{AddressMatcher, RegexMatcher},
            xds::core::v3::CidrRange,
        };
        let by_state = |matcher| RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            filter_state: vec![FilterStateMatcher {
                key: match &matcher {
                    filter_state_matcher::Matcher::StringMatch(_) => PEER_PRINCIPAL_KEY.into(),
                    filter_state_matcher::Matcher::AddressMatch(_) => SOURCE_ADDRESS_KEY.into(),
                },
                matcher: Some(matcher),
            }],
            ..Default::default()
        };
        let from_test_ns = by_state(filter_state_matcher::Matcher::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                regex: "spiffe://[^/]+/ns/test/sa/[^/]+".into(),
                ..Default::default()
            })),
            ignore_case: false,
        }));
        let from_pods = by_state(filter_state_matcher::Matcher::AddressMatch(
            AddressMatcher {
                ranges: vec![CidrRange {
                    address_prefix: "10.0.1.7".into(),
                    prefix_len: Some(mesh_api::envoy::google::protobuf::UInt32Value { value: 32 }),
                }],
                invert_match: false,
            },
        ));
        let all = RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        };
        let t = table(vec![
            to("ns", from_test_ns),
            to("pods", from_pods),
            to("all", all),
        ])
        .unwrap();
        let hit = |principal: &str, ip: &str| {
            let downstream = Downstream {
                principal,
                address: ip.parse().unwrap(),
            };
            t.find_from(&request("GET", "/", &[]), &downstream)
                .map(|r| r.name.clone())
        };
        let test_sa = "spiffe://cluster.local/ns/test/sa/client";
        assert_eq!(hit(test_sa, "10.0.9.9").as_deref(), Some("ns"));
        let other_sa = "spiffe://cluster.local/ns/prod/sa/client";
        assert_eq!(hit(other_sa, "10.0.1.7").as_deref(), Some("pods"));
        assert_eq!(hit(other_sa, "10.0.1.8").as_deref(), Some("all"));
        // No identity (plaintext at a gateway) never matches a principal.
        assert_eq!(hit("", "10.0.9.9").as_deref(), Some("all"));
        // Without a downstream, downstream routes are skipped.
        assert_eq!(
            t.find(&request("GET", "/", &[])).map(|r| r.name.as_str()),
            Some("all")
        );

        let mut unknown = to("x", RouteMatch::default());
        unknown.r#match = Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            filter_state: vec![FilterStateMatcher {
                key: "envoy.something".into(),
                matcher: None,
            }],
            ..Default::default()
        });
        let err = table(vec![unknown]).unwrap_err();
        assert!(
            err.contains("routes[0] (x)") && err.contains("match.filter_state[0]"),
            "{err}"
        );
    }

    #[test]
    fn regex_is_anchored_and_bad_regex_is_named() {
        let m = |re: &str| RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(
                mesh_api::envoy::envoy::r#type::matcher::v3::RegexMatcher {
                    regex: re.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let t = table(vec![to("a", m("/api/v[0-9]+"))]).unwrap();
        assert!(t.find(&request("GET", "/api/v2", &[])).is_some());
        assert!(t.find(&request("GET", "/api/v2/x", &[])).is_none());
        let err = table(vec![to("a", m("(unclosed"))]).unwrap_err();
        assert!(
            err.contains("routes[0] (a)") && err.contains("regex"),
            "{err}"
        );
    }

    #[test]
    fn weights_split_by_roll() {
        let f = Forward {
            clusters: ["a", "b"]
                .iter()
                .zip([80, 20])
                .map(|(c, w)| WeightedTarget {
                    cluster: (*c).into(),
                    weight: w,
                    request_headers: HeaderEdits::default(),
                    response_headers: HeaderEdits::default(),
                })
                .collect(),
            total_weight: 100,
            timeout: None,
            retry: None,
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite: None,
            mirrors: Vec::new(),
            cors: None,
            hash_policy: Vec::new(),
        };
        let b = (0..100u32).filter(|r| f.pick(*r).cluster == "b").count();
        assert_eq!(b, 20);
    }

    #[test]
    fn query_and_inverted_header_matches() {
        let m = RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            headers: vec![HeaderMatcher {
                name: "x-debug".into(),
                invert_match: true,
                header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
                ..Default::default()
            }],
            query_parameters: vec![
                mesh_api::envoy::envoy::config::route::v3::QueryParameterMatcher {
                    name: "v".into(),
                    query_parameter_match_specifier: Some(
                        query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            StringMatcher {
                                match_pattern: Some(MatchPattern::Exact("a b".into())),
                                ignore_case: false,
                            },
                        ),
                    ),
                },
            ],
            ..Default::default()
        };
        let t = table(vec![to("q", m)]).unwrap();
        assert!(t.find(&request("GET", "/?v=a%20b", &[])).is_some());
        assert!(t.find(&request("GET", "/?v=a+b", &[])).is_some());
        assert!(t.find(&request("GET", "/?v=ab", &[])).is_none());
        assert!(
            t.find(&request("GET", "/?v=a%20b", &[("x-debug", "1")]))
                .is_none()
        );
    }

    #[test]
    fn hash_keys_read_headers_cookies_and_queries_and_generate_cookies() {
        use route_action::hash_policy::{Cookie, Header, PolicySpecifier, QueryParameter};
        let forward = |specifier: PolicySpecifier| {
            Forward::compile(&RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("c".into())),
                hash_policy: vec![route_action::HashPolicy {
                    policy_specifier: Some(specifier),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap()
        };
        let source = "10.0.0.1".parse().unwrap();
        let never = || -> u64 { panic!("nothing to generate") };

        let by_user = forward(PolicySpecifier::Header(Header {
            header_name: "x-user".into(),
            ..Default::default()
        }));
        let alice =
            by_user.request_hash(&request("GET", "/", &[("x-user", "alice")]), source, never);
        let again =
            by_user.request_hash(&request("GET", "/x", &[("x-user", "alice")]), source, never);
        let bob = by_user.request_hash(&request("GET", "/", &[("x-user", "bob")]), source, never);
        assert!(alice.value.is_some());
        assert_eq!(alice.value, again.value);
        assert_ne!(alice.value, bob.value);
        assert_eq!(
            by_user
                .request_hash(&request("GET", "/", &[]), source, never)
                .value,
            None
        );

        let by_query = forward(PolicySpecifier::QueryParameter(QueryParameter {
            name: "u".into(),
        }));
        assert_eq!(
            by_query
                .request_hash(&request("GET", "/?a=1&u=alice", &[]), source, never)
                .value,
            by_query
                .request_hash(&request("GET", "/?u=alice", &[]), source, never)
                .value
        );

        let by_cookie = forward(PolicySpecifier::Cookie(Cookie {
            name: "sticky".into(),
            ttl: Some(ProtoDuration {
                seconds: 60,
                nanos: 0,
            }),
            path: "/".into(),
            ..Default::default()
        }));
        let fresh = by_cookie.request_hash(&request("GET", "/", &[]), source, || 0xabc);
        assert_eq!(
            fresh.set_cookie.unwrap(),
            "sticky=\"0000000000000abc\"; Max-Age=60; Path=/; HttpOnly"
        );
        let returning = by_cookie.request_hash(
            &request(
                "GET",
                "/",
                &[("cookie", "a=b; sticky=\"0000000000000abc\"")],
            ),
            source,
            never,
        );
        assert_eq!(
            returning.value, fresh.value,
            "the client sticks with its cookie"
        );
        assert!(returning.set_cookie.is_none());

        let bad = Forward::compile(&RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("c".into())),
            hash_policy: vec![route_action::HashPolicy {
                policy_specifier: Some(PolicySpecifier::Cookie(Cookie {
                    name: "a b".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            bad,
            "route.hash_policy[0]: cookie \"a b\": not a cookie name"
        );
    }

    #[test]
    fn regex_rewrites_read_envoy_capture_groups() {
        let rewrite = |pattern: &str, substitution: &str, path: &str| {
            regex::Regex::new(pattern)
                .unwrap()
                .replace_all(path, envoy_substitution(substitution).as_str())
                .into_owned()
        };
        assert_eq!(
            rewrite(
                "^/service/([^/]+)(/.*)$",
                "\\2/instance/\\1",
                "/service/foo/v1/api"
            ),
            "/v1/api/instance/foo"
        );
        assert_eq!(rewrite("^/a", "/$b", "/a/x"), "/$b/x");
        assert_eq!(rewrite("^/a", "/b\\", "/a"), "/b\\");
    }

    #[test]
    fn virtual_hosts_are_chosen_by_authority_with_envoy_precedence() {
        let host = |name: &str, domains: &[&str]| VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            routes: vec![to(
                name,
                RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let table = RouteTable::compile(&RouteConfiguration {
            name: "http.8080".into(),
            virtual_hosts: vec![
                host("any", &["*"]),
                host("suffix", &["*.example.com"]),
                host("exact", &["api.example.com"]),
                host("prefix", &["api.*"]),
            ],
            ..Default::default()
        })
        .unwrap();
        let chosen = |authority: &str| {
            let Action::Forward(f) = &table
                .find(&request("GET", "/", &[("host", authority)]))
                .unwrap()
                .action
            else {
                panic!()
            };
            f.clusters[0].cluster.clone()
        };
        assert_eq!(chosen("API.example.com:8080"), "exact");
        assert_eq!(chosen("www.example.com"), "suffix");
        assert_eq!(chosen("api.internal"), "prefix");
        assert_eq!(chosen("10.0.0.1:8080"), "any");
        assert!(
            RouteTable::compile(&RouteConfiguration {
                virtual_hosts: vec![host("bad", &["a*b"])],
                ..Default::default()
            })
            .unwrap_err()
            .contains("wildcards only at either end")
        );
    }
}
