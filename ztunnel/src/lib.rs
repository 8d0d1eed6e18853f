//! The parts of ztunnel that turn outside input into state: the workload
//! store and the L4 policy engine (xDS), and the node's pods from the
//! Kubernetes API and the host. A library so fuzz targets, benchmarks and
//! integration tests reach them; the agent binary (`main.rs`) uses them too.

pub mod discovery;
pub mod drain;
pub mod kube_pods;
pub mod pod_host;
pub mod policy;
