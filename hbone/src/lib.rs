//! HBONE: HTTP/2 `CONNECT` tunnels over mutual TLS with SPIFFE identities.
//!
//! This crate implements both ends of Istio's HBONE protocol (as spoken by
//! ztunnel on port 15008):
//!
//! * [`identity`]: SPIFFE identities (`spiffe://<td>/ns/<ns>/sa/<sa>`).
//! * [`cert`]: workload certificates and a rotating [`cert::CertStore`].
//! * [`tls`]: rustls configurations (TLS 1.3, ALPN `h2`, SPIFFE checks).
//! * [`client`]: a pooled HBONE client producing [`client::Tunnel`]s.
//! * [`server`]: an HBONE server dispatching streams to a [`server::Handler`].

pub mod cert;
pub mod client;
mod error;
pub mod identity;
mod io;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use cert::{CertStore, WorkloadCert};
pub use client::{ConnectRequest, Dialer, DirectDialer, Pool, PoolConfig, PoolStats, Tunnel};
pub use error::Error;
pub use identity::Identity;
pub use io::{H2Stream, relay};
pub use server::{
    Accepted, Handler, InboundRequest, Refusal, ServeStream, Server, ServerConfig, StreamStats,
    handler_fn,
};

/// The well-known HBONE port.
pub const HBONE_PORT: u16 = 15008;
