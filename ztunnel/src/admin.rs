//! ztunnel's small HTTP endpoints: metrics (`:15020`), readiness
//! (`:15021/healthz/ready`) and the admin `config_dump` (`localhost:15000`).
//! Each is a function from path to response, served over HTTP/1.1.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{discovery::Discovery, identity::CertManager, policy::PolicyStore};

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

/// `/healthz/ready`: 200 once capture is installed and, when a control plane
/// is configured, the first xDS config has arrived.
pub fn readiness(synced: Arc<AtomicBool>) -> impl Fn(&str) -> Response<Full<Bytes>> {
    move |path| match path {
        "/healthz/ready" if synced.load(Ordering::Acquire) => {
            response(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/healthz/ready" => response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the first xDS config\n".into(),
        ),
        _ => not_found(),
    }
}

/// `/config_dump`: the workloads, services and policies this ztunnel holds,
/// and its workload certificates.
pub fn config_dump(
    discovery: Arc<Discovery>,
    policy: Arc<PolicyStore>,
    certs: Arc<CertManager>,
) -> impl Fn(&str) -> Response<Full<Bytes>> {
    move |path| match path {
        "/config_dump" => match serde_json::to_string_pretty(&{
            let mut dump = discovery.dump();
            dump["certificates"] = certs.dump();
            dump["policies"] = policy.dump();
            dump
        }) {
            Ok(body) => response(StatusCode::OK, "application/json", body),
            Err(err) => response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{err}\n"),
            ),
        },
        _ => not_found(),
    }
}
