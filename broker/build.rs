//! Generates the SPIRE Delegated Identity API client from the vendored protos (broker/proto/),
//! with protox (a protobuf compiler written in Rust) so the build needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/spire/api/agent/delegatedidentity/v1/delegatedidentity.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
