//! Compiles `proto/flwr/proto/fleet.proto` with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/flwr/proto/fleet.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
