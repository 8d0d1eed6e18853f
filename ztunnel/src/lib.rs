//! The parts of ztunnel that turn untrusted xDS bytes into state: the
//! workload store and the L4 policy engine. A library so fuzz targets and
//! benchmarks reach them; the agent binary (`main.rs`) uses them too.

pub mod discovery;
pub mod policy;
