//! Compiles the protos in `proto/` with protox (pure Rust, so builds need no
//! `protoc`) and generates prost messages and tonic services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let istio = ["workload.proto", "authorization.proto", "ca.proto"];
    for proto in istio.iter().chain(&["ads.proto"]) {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(istio, ["proto"])?)?;

    // The ADS server with pre-encoded delta responses (see ads.proto).
    let discovery = "::envoy_types::pb::envoy::service::discovery::v3";
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".envoy.service.discovery.v3.DiscoveryRequest",
            format!("{discovery}::DiscoveryRequest"),
        )
        .extern_path(
            ".envoy.service.discovery.v3.DiscoveryResponse",
            format!("{discovery}::DiscoveryResponse"),
        )
        .extern_path(
            ".envoy.service.discovery.v3.DeltaDiscoveryRequest",
            format!("{discovery}::DeltaDiscoveryRequest"),
        )
        .extern_path(
            ".envoy.service.discovery.v3.DeltaDiscoveryResponse",
            "crate::encoded::EncodedDeltaResponse",
        )
        .compile_fds(protox::compile(["ads.proto"], ["proto"])?)?;
    Ok(())
}
