//! The small HTTP endpoints every mesh proxy serves (metrics, readiness,
//! `config_dump`): each is a function from path to response, served over
//! HTTP/1.1; and the process setup every proxy binary shares ([`process`]).

pub mod process;

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Binds `addr` and answers GETs with `respond(path)` until the task ends.
pub async fn serve(
    addr: SocketAddr,
    respond: impl Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%addr, error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let respond = respond.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let response = if request.method() == Method::GET {
                        respond(request.uri().path())
                    } else {
                        self::response(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "GET only\n".into(),
                        )
                    };
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, error = %err, "endpoint connection ended");
                }
            });
        }
    });
    Ok(())
}

/// A response with a body.
pub fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// 404.
pub fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// A JSON response of `value` (pretty-printed: it is read by people).
pub fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => response(StatusCode::OK, "application/json", body),
        Err(err) => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{err}\n"),
        ),
    }
}

/// The metrics endpoint (`/metrics`, `/stats/prometheus`) of `registry`.
pub fn metrics(
    registry: Arc<prometheus_client::registry::Registry>,
) -> impl Fn(&str) -> Response<Full<Bytes>> {
    move |path| match path {
        "/metrics" | "/stats/prometheus" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
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
        _ => not_found(),
    }
}
