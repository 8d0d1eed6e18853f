//! Istio's HTTP metrics, reported by the waypoint (`reporter="waypoint"`).

use mesh_hbone::Identity;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Labels of one request, as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// Caller's namespace (from its identity).
    pub source_workload_namespace: String,
    /// Caller's SPIFFE identity.
    pub source_principal: String,
    /// Destination service host.
    pub destination_service: String,
    /// Endpoint's workload (uid) or `unknown`.
    pub destination_workload: String,
    /// Endpoint's identity or `unknown`.
    pub destination_principal: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// Status sent to the caller.
    pub response_code: u16,
    /// Envoy response flags (`-`, or e.g. `UF,URX`).
    pub response_flags: ResponseFlags,
    /// Always `mutual_tls`: callers arrive over HBONE.
    pub connection_security_policy: &'static str,
    /// A gRPC call's status code (from its trailers, or its trailers-only
    /// head), empty for other requests.
    pub grpc_response_status: String,
}

/// Envoy's response flags of one request: a set, written as Envoy writes
/// it (its short names, comma-separated in Envoy's fixed order; `-` when
/// empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// No flag.
    pub const NONE: Self = Self(0);
    /// `UH`: no healthy upstream.
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1 << 0);
    /// `UT`: upstream request timeout (route or per-try).
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 1);
    /// `UF`: upstream connection failure.
    pub const CONNECTION_FAILURE: Self = Self(1 << 2);
    /// `UC`: upstream connection termination (closed or reset before a
    /// response).
    pub const CONNECTION_TERMINATION: Self = Self(1 << 3);
    /// `UO`: upstream overflow (circuit breaker, retry budget).
    pub const OVERFLOW: Self = Self(1 << 4);
    /// `NR`: no route.
    pub const NO_ROUTE: Self = Self(1 << 5);
    /// `DI`: delay injected.
    pub const DELAY_INJECTED: Self = Self(1 << 6);
    /// `FI`: fault (abort) injected.
    pub const FAULT_INJECTED: Self = Self(1 << 7);
    /// `URX`: the retry policy's attempts were used up.
    pub const RETRY_LIMIT_EXCEEDED: Self = Self(1 << 8);
    /// `NC`: no cluster.
    pub const NO_CLUSTER: Self = Self(1 << 9);
    /// `DPE`: downstream protocol error.
    pub const DOWNSTREAM_PROTOCOL_ERROR: Self = Self(1 << 10);

    /// Names in the order Envoy writes them.
    const NAMES: [(Self, &'static str); 11] = [
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_TIMEOUT, "UT"),
        (Self::CONNECTION_FAILURE, "UF"),
        (Self::CONNECTION_TERMINATION, "UC"),
        (Self::OVERFLOW, "UO"),
        (Self::NO_ROUTE, "NR"),
        (Self::DELAY_INJECTED, "DI"),
        (Self::FAULT_INJECTED, "FI"),
        (Self::RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::NO_CLUSTER, "NC"),
        (Self::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
    ];

    /// Adds `other`'s flags.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        write!(encoder, "{self}")
    }
}

/// The label of a per-cluster counter, as Istio exports Envoy's cluster
/// stats.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// `outbound|<port>|<subset>|<host>`.
    pub cluster_name: String,
}

/// The waypoint's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// `envoy_cluster_upstream_rq_retry_overflow`: retries refused by the
    /// cluster's retry limit (exposed with the `_total` suffix of counters).
    pub retry_overflow: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_rq_retry`: retries sent.
    pub retries: Family<ClusterLabels, Counter>,
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram>,
    /// `istio_request_bytes`.
    pub request_bytes: Family<RequestLabels, Histogram>,
    /// `istio_response_bytes`.
    pub response_bytes: Family<RequestLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let ms = || {
            Histogram::new([
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ])
        };
        let bytes = || {
            Histogram::new([
                1.0,
                10.0,
                100.0,
                1000.0,
                10_000.0,
                100_000.0,
                1_000_000.0,
                10_000_000.0,
            ])
        };
        Self {
            retry_overflow: Family::default(),
            retries: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(ms),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
        }
    }
}

/// The four request metrics of one label set, looked up once: counting
/// through them takes no map lookup.
#[derive(Clone, Debug)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    /// Counts one request that took `duration_ms`, with bodies of these
    /// sizes.
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// A request's labels, borrowed from its connection, route and endpoint:
/// what [`HandleCache`] compares, so a request whose labels repeat the last
/// ones builds no label strings.
#[derive(Clone, Copy, Debug)]
pub struct LabelsRef<'a> {
    /// [`RequestLabels::reporter`].
    pub reporter: &'static str,
    /// [`RequestLabels::source_workload_namespace`].
    pub source_workload_namespace: &'a str,
    /// [`RequestLabels::source_principal`].
    pub source_principal: &'a str,
    /// [`RequestLabels::destination_service`].
    pub destination_service: &'a str,
    /// [`RequestLabels::destination_workload`].
    pub destination_workload: &'a str,
    /// The endpoint's identity; `None` is labelled `unknown`.
    pub destination_principal: Option<&'a Identity>,
    /// [`RequestLabels::request_protocol`].
    pub request_protocol: &'static str,
    /// [`RequestLabels::response_code`].
    pub response_code: u16,
    /// [`RequestLabels::response_flags`].
    pub response_flags: ResponseFlags,
    /// [`RequestLabels::connection_security_policy`].
    pub connection_security_policy: &'static str,
}

impl LabelsRef<'_> {
    /// The owned label set (`grpc_response_status` empty).
    pub fn to_labels(&self) -> RequestLabels {
        RequestLabels {
            reporter: self.reporter,
            source_workload_namespace: self.source_workload_namespace.to_owned(),
            source_principal: self.source_principal.to_owned(),
            destination_service: self.destination_service.to_owned(),
            destination_workload: self.destination_workload.to_owned(),
            destination_principal: self
                .destination_principal
                .map_or_else(|| "unknown".to_owned(), ToString::to_string),
            request_protocol: self.request_protocol,
            response_code: self.response_code,
            response_flags: self.response_flags,
            connection_security_policy: self.connection_security_policy,
            grpc_response_status: String::new(),
        }
    }

    /// Whether `labels` is this label set.
    fn is(&self, labels: &RequestLabels) -> bool {
        self.reporter == labels.reporter
            && self.response_code == labels.response_code
            && self.response_flags == labels.response_flags
            && self.request_protocol == labels.request_protocol
            && self.connection_security_policy == labels.connection_security_policy
            && labels.grpc_response_status.is_empty()
            && self.destination_service == labels.destination_service
            && self.destination_workload == labels.destination_workload
            && match self.destination_principal {
                Some(identity) => displays_as(identity, &labels.destination_principal),
                None => labels.destination_principal == "unknown",
            }
            && self.source_principal == labels.source_principal
            && self.source_workload_namespace == labels.source_workload_namespace
    }
}

/// Whether `value` displays as `text`, compared as it is written, without
/// building the string.
fn displays_as(value: &impl std::fmt::Display, text: &str) -> bool {
    struct Compare<'a>(Option<&'a str>);
    impl std::fmt::Write for Compare<'_> {
        fn write_str(&mut self, piece: &str) -> std::fmt::Result {
            self.0 = self.0.and_then(|rest| rest.strip_prefix(piece));
            Ok(())
        }
    }
    let mut compare = Compare(Some(text));
    std::fmt::write(&mut compare, format_args!("{value}")).is_ok() && compare.0 == Some("")
}

/// The last label set one connection counted with, and its handles: a
/// connection's requests mostly repeat it, so they skip building the
/// labels and the four lookups.
#[derive(Debug, Default)]
pub struct HandleCache(std::sync::Mutex<Option<(RequestLabels, RequestHandles)>>);

impl HandleCache {
    /// The handles of `labels`, from the cache when they match the last
    /// ones.
    pub fn get(&self, metrics: &Metrics, labels: &LabelsRef<'_>) -> RequestHandles {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((cached, handles)) if labels.is(cached) => handles.clone(),
            _ => {
                let labels = labels.to_labels();
                let handles = metrics.handles(&labels);
                *last = Some((labels, handles.clone()));
                handles
            }
        }
    }
}

impl Metrics {
    /// The handles of the request metrics with `labels` (creating the
    /// series).
    pub fn handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// A registry holding them: Istio's request metrics prefixed `istio_`,
    /// the cluster counters `envoy_cluster_`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        let envoy = registry.sub_registry_with_prefix("envoy_cluster");
        envoy.register(
            "upstream_rq_retry_overflow",
            "Retries refused by the cluster's retry limit",
            self.retry_overflow.clone(),
        );
        envoy.register("upstream_rq_retry", "Retries sent", self.retries.clone());
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests handled", self.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration",
            self.duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_written_in_envoys_order() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        let mut flags = ResponseFlags::RETRY_LIMIT_EXCEEDED;
        flags.insert(ResponseFlags::CONNECTION_FAILURE);
        assert_eq!(flags.to_string(), "UF,URX");
        let mut flags = ResponseFlags::OVERFLOW;
        flags.insert(ResponseFlags::UPSTREAM_TIMEOUT);
        flags.insert(ResponseFlags::DELAY_INJECTED);
        assert_eq!(flags.to_string(), "UT,UO,DI");
    }

    #[test]
    fn cached_handles_follow_every_label() {
        let metrics = Metrics::default();
        let cache = HandleCache::default();
        let identity = Identity::new("cluster.local", "default", "reviews");
        let base = LabelsRef {
            reporter: "waypoint",
            source_workload_namespace: "default",
            source_principal: "spiffe://cluster.local/ns/default/sa/productpage",
            destination_service: "reviews.default.svc.cluster.local",
            destination_workload: "reviews-v1",
            destination_principal: Some(&identity),
            request_protocol: "http",
            response_code: 200,
            response_flags: ResponseFlags::NONE,
            connection_security_policy: "mutual_tls",
        };
        let other = Identity::new("cluster.local", "default", "ratings");
        let variants = [
            LabelsRef {
                response_code: 503,
                ..base
            },
            LabelsRef {
                response_flags: ResponseFlags::NO_ROUTE,
                ..base
            },
            LabelsRef {
                destination_workload: "reviews-v2",
                ..base
            },
            LabelsRef {
                destination_principal: Some(&other),
                ..base
            },
            LabelsRef {
                destination_principal: None,
                ..base
            },
            LabelsRef {
                source_principal: "spiffe://cluster.local/ns/default/sa/sleep",
                ..base
            },
        ];
        cache.get(&metrics, &base).record(1.0, 0, 0);
        cache.get(&metrics, &base).record(1.0, 0, 0);
        for variant in &variants {
            cache.get(&metrics, variant).record(1.0, 0, 0);
        }
        assert_eq!(metrics.requests.get_or_create(&base.to_labels()).get(), 2);
        for variant in &variants {
            let labels = variant.to_labels();
            assert_eq!(
                metrics.requests.get_or_create(&labels).get(),
                1,
                "{labels:?}"
            );
        }
        assert!(displays_as(
            &identity,
            "spiffe://cluster.local/ns/default/sa/reviews"
        ));
        assert!(!displays_as(
            &identity,
            "spiffe://cluster.local/ns/default/sa/review"
        ));
        assert!(!displays_as(
            &identity,
            "spiffe://cluster.local/ns/default/sa/reviewss"
        ));
    }
}
