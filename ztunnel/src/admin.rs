//! ztunnel's small HTTP endpoints: metrics (`:15020`), readiness
//! (`:15021/healthz/ready`) and the admin `config_dump` (`localhost:15000`).
//! Each is a function from path to response, served over HTTP/1.1.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
pub use mesh_admin::{not_found, response, serve};

use crate::{discovery::Discovery, identity::CertManager, policy::PolicyStore};

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
        "/config_dump" => mesh_admin::json(&{
            let mut dump = discovery.dump();
            dump["certificates"] = certs.dump();
            dump["policies"] = policy.dump();
            dump
        }),
        _ => not_found(),
    }
}
