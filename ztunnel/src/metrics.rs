//! Prometheus metrics on `:15020` (`/metrics` and `/stats/prometheus`, as
//! Istio serves them). Kernel counters are read from the pinned eBPF maps at
//! scrape time, so they survive ztunnel restarts and cost nothing between
//! scrapes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_ebpf_loader::capture::Capture;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// The eBPF capture counters, as `ztunnel_ebpf_connections_total{program,outcome}`.
#[derive(Debug)]
struct CaptureCollector {
    capture: Arc<Mutex<Capture>>,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = match self.capture.lock() {
            Ok(capture) => capture.stats(),
            Err(poisoned) => poisoned.into_inner().stats(),
        };
        let stats = match stats {
            Ok(stats) => stats,
            Err(err) => {
                warn!(error = %err, "reading eBPF capture counters failed");
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
        Ok(())
    }
}

/// Builds the registry every scrape encodes.
pub fn registry(capture: Arc<Mutex<Capture>>) -> Arc<Registry> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CaptureCollector { capture }));
    Arc::new(registry)
}

/// Serves `registry` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "metrics accept failed");
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&registry, &request)) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, error = %err, "metrics connection ended");
                }
            });
        }
    });
    Ok(())
}

fn respond(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let response = |status, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match request.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
