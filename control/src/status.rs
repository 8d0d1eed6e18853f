//! The monitoring endpoint (port 15014): what each proxy has ACKed or NACKed,
//! which config was rejected and why, and Prometheus metrics.
//!
//! - `GET /debug/syncz`: JSON, one entry per connected proxy.
//! - `GET /debug/config_errors`: JSON, the current config version and every
//!   rejected resource with file and field.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /ready`: 200 once the first config version is served.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{metrics::Metrics, xds::ProxyRegistry};

/// The config version being served and what was rejected on the way.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigStatus {
    /// Config version (increments with every change).
    pub version: u64,
    /// Each rejected resource or document, as a one-line message naming
    /// file, resource and field.
    pub errors: Vec<String>,
    /// Warnings (e.g. unknown fields); the resources were still accepted.
    pub warnings: Vec<String>,
    /// How long reading and parsing the sources took.
    pub load_ms: u64,
    /// How long translating into xDS resources took.
    pub translate_ms: u64,
}

/// Shared state the endpoint reports.
#[derive(Clone)]
pub struct StatusState {
    /// Config status.
    pub config: Arc<ArcSwap<ConfigStatus>>,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: StatusState) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "status endpoint accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            if let Err(err) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %err, "status connection ended with an error");
            }
        });
    }
}

/// Binds `addr` and serves in the background.
pub async fn spawn(addr: SocketAddr, state: StatusState) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, state));
    Ok(local)
}

fn respond(state: &StatusState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned());
    }
    match req.uri().path() {
        "/debug/syncz" => json(&state.registry.statuses()),
        "/debug/config_errors" => json(&*state.config.load_full()),
        "/metrics" | "/stats/prometheus" => text(StatusCode::OK, state.metrics.encode()),
        "/ready" => {
            if state.config.load().version > 0 {
                text(StatusCode::OK, "ready\n".to_owned())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no config yet\n".to_owned(),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /debug/syncz, /debug/config_errors, /metrics, /ready\n".to_owned(),
        ),
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
