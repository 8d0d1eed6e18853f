//! Istio's HTTP metrics, reported by the waypoint (`reporter="waypoint"`).

use prometheus_client::{
    encoding::EncodeLabelSet,
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
    /// Envoy response flags (`-`, `NR`, `UH`, `UF`, `UO`, `UT`, `UC`, `FI`, `DI`).
    pub response_flags: &'static str,
    /// Always `mutual_tls`: callers arrive over HBONE.
    pub connection_security_policy: &'static str,
}

/// The waypoint's metrics.
#[derive(Clone)]
pub struct Metrics {
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
            requests: Family::default(),
            duration: Family::new_with_constructor(ms),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
        }
    }
}

impl Metrics {
    /// A registry holding them, prefixed `istio_`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("istio");
        registry.register("requests", "Requests handled", self.requests.clone());
        registry.register(
            "request_duration_milliseconds",
            "Request duration",
            self.duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        registry
    }
}
