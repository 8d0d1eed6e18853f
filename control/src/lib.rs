//! The mesh's control plane: reads Kubernetes and Istio config, serves it to
//! the data plane over delta ADS, and signs workload certificates.
//!
//! Data flow: [`source`] (directories or the Kubernetes API, watched) → [`mesh_config`] (typed,
//! validated) → [`model`] (workloads and services) → [`xds::Snapshot`] (one
//! immutable version) → every connected proxy's [`xds`] stream, which sends
//! only what changed. [`ca_service`] signs certificates for identities that
//! run on the caller's node; [`status`] reports sync state and rejected
//! config on 15014.

pub mod alloc;
pub mod auth;
pub mod authz;
pub mod ca;
pub mod ca_secret;
pub mod ca_service;
pub mod grpc_route;
pub mod http_route;
pub mod ingress;
pub mod kube_gateway;
pub mod l4_route;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod rbac;
pub mod reference_grant;
pub mod root_cert;
pub mod route_status;
pub mod source;
pub mod status;
pub mod tls;
pub mod waypoint;
pub mod waypoint_deploy;
pub mod xds;

mod server;

pub use server::{ControlPlane, Options, Ports, SourceOptions, TokenReviewSetup};
