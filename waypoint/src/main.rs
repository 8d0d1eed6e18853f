//! The mesh's L7 proxy: applies VirtualService / DestinationRule routing and
//! L7 policy for services bound to a waypoint, and serves as ingress gateway.
//!
//! Not implemented yet (tracked in the waypoint issue); the binary refuses to
//! start rather than pretend to proxy.

fn main() -> std::process::ExitCode {
    eprintln!("waypoint: the L7 proxy is not implemented yet; see docs/architecture.md");
    std::process::ExitCode::FAILURE
}
