//! Compiles `proto/lab.proto` (the gRPC test service) with protox, so
//! builds need no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/lab.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(["lab.proto"], ["proto"])?)?;
    Ok(())
}
