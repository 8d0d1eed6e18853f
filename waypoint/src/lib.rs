//! The waypoint: the mesh's L7 proxy. It accepts HBONE tunnels addressed to
//! the services bound to it, serves their bytes as HTTP, and routes each
//! request by the Envoy v3 config (LDS, RDS, CDS, EDS) the control plane
//! computes from VirtualServices, DestinationRules and AuthorizationPolicies,
//! tunnelling on over HBONE to the chosen endpoint.
//!
//! A library so tests and fuzz targets reach the route compiler and matcher;
//! the binary (`main.rs`) wires it up; [`workers`] runs the serving
//! threads.

pub mod access_log;
pub mod client_hello;
pub mod client_san;
pub mod cluster;
pub mod config;
pub mod ingress;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod route;
pub mod upstream;
pub mod workers;
