//! Prometheus metrics on `:15020` (`/metrics` and `/stats/prometheus`, as
//! Istio serves them). Kernel counters are read from the pinned eBPF maps at
//! scrape time, so they survive ztunnel restarts and cost nothing between
//! scrapes. Connection metrics carry Istio's names and labels
//! (`istio_tcp_*`), so existing dashboards work unchanged.

use std::sync::{Arc, Mutex};

use mesh_ebpf_loader::capture::Capture;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
    },
    registry::Registry,
};
use ztunnel::discovery::WorkloadLabels;

/// Istio's labels of the `istio_tcp_*` metrics. The workload values are
/// shared with the workload store, so a connection holds a few reference
/// counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    /// `source` (the client's ztunnel) or `destination` (the server's).
    pub reporter: &'static str,
    /// Client workload (`source_workload`, `_namespace`, `_canonical_*`).
    pub source: Arc<WorkloadLabels>,
    /// Client SPIFFE identity, as authenticated (`unknown` without mTLS).
    pub source_principal: Arc<str>,
    /// Server workload (`destination_workload`, `destination_principal`, ...).
    pub destination: Arc<WorkloadLabels>,
    /// Service host name the client addressed, when it addressed one.
    pub destination_service: Arc<str>,
    /// Always `tcp` here.
    pub request_protocol: &'static str,
    /// `-`, or why the connection failed (e.g. `UF` upstream failure, `DENY`).
    pub response_flags: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (source, destination) = (&*self.source, &*self.destination);
        for (key, value) in [
            ("reporter", self.reporter),
            ("source_workload", &source.workload),
            ("source_workload_namespace", &source.namespace),
            ("source_principal", &self.source_principal),
            ("source_canonical_service", &source.canonical_service),
            ("source_canonical_revision", &source.canonical_revision),
            ("destination_workload", &destination.workload),
            ("destination_workload_namespace", &destination.namespace),
            ("destination_principal", &destination.principal),
            (
                "destination_canonical_service",
                &destination.canonical_service,
            ),
            (
                "destination_canonical_revision",
                &destination.canonical_revision,
            ),
            ("destination_service", &self.destination_service),
            ("request_protocol", self.request_protocol),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ] {
            (key, value).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Istio's TCP connection metrics.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (bytes from the client).
    pub received_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (bytes to the client).
    pub sent_bytes: Family<TcpLabels, Counter>,
}
use tracing::warn;

/// The eBPF counters: capture as `ztunnel_ebpf_connections_total{program,outcome}`,
/// the same-node fast path as `ztunnel_fast_path_messages_total{outcome}` and
/// `ztunnel_fast_path_spliced_bytes_total`.
#[derive(Debug)]
struct CaptureCollector {
    capture: Arc<Mutex<Capture>>,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (stats, fast_path) = {
            let capture = self
                .capture
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (capture.stats(), capture.fast_path_stats())
        };
        let (stats, fast_path) = match (stats, fast_path) {
            (Ok(stats), Ok(fast_path)) => (stats, fast_path),
            (Err(err), _) | (_, Err(err)) => {
                warn!(error = %err, "reading eBPF counters failed");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "ztunnel_ebpf_connections",
            "TCP connections seen by the capture programs, by program and outcome",
            None,
            MetricType::Counter,
        )?;
        for (program, outcome, value) in [
            ("capture_connect4", "captured", stats.outbound_captured),
            ("capture_connect4", "bypassed", stats.outbound_bypassed),
            ("capture_sk_lookup", "captured", stats.inbound_captured),
            ("capture_sk_lookup", "refused", stats.inbound_refused),
            ("capture_sk_lookup", "probe", stats.inbound_probe),
            ("capture", "error", stats.errors),
        ] {
            let labels = [("program", program), ("outcome", outcome)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ztunnel_fast_path_messages",
            "Messages of same-node HBONE sockets: spliced into the peer's receive queue, or passed to TCP",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [("spliced", fast_path.spliced), ("passed", fast_path.passed)] {
            ConstCounter::new(value).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        ConstCounter::new(fast_path.spliced_bytes).encode(encoder.encode_descriptor(
            "ztunnel_fast_path_spliced_bytes",
            "Bytes spliced between same-node HBONE sockets, skipping the TCP/IP stack",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

/// Builds the registry every scrape encodes.
pub fn registry(capture: Arc<Mutex<Capture>>, tcp: &TcpMetrics) -> Arc<Registry> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CaptureCollector { capture }));
    let istio = registry.sub_registry_with_prefix("istio");
    istio.register(
        "tcp_connections_opened",
        "TCP connections opened",
        tcp.opened.clone(),
    );
    istio.register(
        "tcp_connections_closed",
        "TCP connections closed",
        tcp.closed.clone(),
    );
    istio.register(
        "tcp_received_bytes",
        "Bytes received from clients",
        tcp.received_bytes.clone(),
    );
    istio.register(
        "tcp_sent_bytes",
        "Bytes sent to clients",
        tcp.sent_bytes.clone(),
    );
    Arc::new(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_labels_encode_istios_names_in_order() {
        let known = Arc::new(WorkloadLabels {
            workload: Arc::from("details-v1"),
            namespace: Arc::from("default"),
            principal: Arc::from("spiffe://cluster.local/ns/default/sa/details"),
            canonical_service: Arc::from("details"),
            canonical_revision: Arc::from("v1"),
        });
        let labels = TcpLabels {
            reporter: "destination",
            source: WorkloadLabels::unknown(),
            source_principal: Arc::from("spiffe://cluster.local/ns/default/sa/pp"),
            destination: known,
            destination_service: Arc::from("details.default.svc.cluster.local"),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        };
        let metrics = TcpMetrics::default();
        metrics.opened.get_or_create(&labels).inc();
        // Equal values, whatever the allocation, are one series.
        let mut again = labels.clone();
        again.destination_service = Arc::from("details.default.svc.cluster.local");
        metrics.opened.get_or_create(&again).inc();
        let mut registry = Registry::default();
        registry.register("tcp_connections_opened", "opened", metrics.opened);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let expected = concat!(
            "tcp_connections_opened_total{reporter=\"destination\",",
            "source_workload=\"unknown\",source_workload_namespace=\"unknown\",",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/pp\",",
            "source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",",
            "destination_workload=\"details-v1\",destination_workload_namespace=\"default\",",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/details\",",
            "destination_canonical_service=\"details\",destination_canonical_revision=\"v1\",",
            "destination_service=\"details.default.svc.cluster.local\",request_protocol=\"tcp\",",
            "response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 2\n"
        );
        assert!(text.contains(expected), "{text}");
    }
}
