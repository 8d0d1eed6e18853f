//! Prometheus metrics of the control plane, named after istiod's where a
//! counterpart exists.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Label set of per-type xDS metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Short resource type, e.g. `Address`.
    pub r#type: String,
}

/// All control-plane metrics.
pub struct Metrics {
    registry: Registry,
    /// Responses sent, by type (`pilot_xds_pushes`).
    pub xds_pushes: Family<TypeLabels, Counter>,
    /// NACKs received, by type (`pilot_total_xds_rejects`).
    pub xds_rejects: Family<TypeLabels, Counter>,
    /// Connected xDS streams (`pilot_xds`).
    pub xds_connections: Gauge,
    /// Certificates signed.
    pub csr_signed: Counter,
    /// Certificate requests refused.
    pub csr_refused: Counter,
    /// Config versions computed.
    pub config_versions: Counter,
    /// Resources currently rejected by validation.
    pub config_errors: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics {
            xds_pushes: Family::default(),
            xds_rejects: Family::default(),
            xds_connections: Gauge::default(),
            csr_signed: Counter::default(),
            csr_refused: Counter::default(),
            config_versions: Counter::default(),
            config_errors: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "pilot_xds_pushes",
            "xDS responses sent, by resource type",
            metrics.xds_pushes.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses a proxy rejected (NACK), by resource type",
            metrics.xds_rejects.clone(),
        );
        registry.register(
            "pilot_xds",
            "Connected xDS streams",
            metrics.xds_connections.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance",
            "Workload certificates signed",
            metrics.csr_signed.clone(),
        );
        registry.register(
            "citadel_server_csr_refused",
            "Certificate requests refused",
            metrics.csr_refused.clone(),
        );
        registry.register(
            "pilot_config_versions",
            "Config versions computed from the sources",
            metrics.config_versions.clone(),
        );
        registry.register(
            "galley_validation_failed_resources",
            "Resources currently rejected by validation",
            metrics.config_errors.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Labels for a type URL: its last path element.
    pub fn type_labels(type_url: &str) -> TypeLabels {
        TypeLabels {
            r#type: type_url
                .rsplit(['.', '/'])
                .next()
                .unwrap_or(type_url)
                .to_owned(),
        }
    }
}
