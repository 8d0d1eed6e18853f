//! Wire types shared by the mesh's processes.
//!
//! - [`workload`] and [`security`]: Istio's workload API and L4 authorization,
//!   served to ztunnels over delta ADS. Field numbers are Istio's, so either
//!   side can talk to Istio's own implementation.
//! - [`ca`]: Istio's certificate service (`IstioCertificateService`).
//! - [`envoy`]: the Envoy xDS v3 types (from `envoy-types`), including the
//!   aggregated discovery service both ztunnel and waypoint speak.

#![allow(missing_docs)] // generated code carries the protos' own comments

/// `istio.workload`: workloads and services.
#[allow(clippy::large_enum_variant)]
pub mod workload {
    tonic::include_proto!("istio.workload");
}

/// `istio.security`: L4 authorization policies.
pub mod security {
    tonic::include_proto!("istio.security");
}

/// `istio.v1.auth`: the certificate service.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Envoy's xDS v3 types and services.
pub use envoy_types::pb as envoy;

/// The ADS server trait with pre-encoded delta responses (see
/// [`encoded`]); clients use `envoy`'s own client.
pub mod ads {
    tonic::include_proto!("envoy.service.discovery.v3");
}

pub mod encoded;
pub mod filter_state;

pub mod type_url;
