//! Compiles `proto/flwr/proto/transport.proto` with protox (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/flwr/proto/transport.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        // Tensors as `bytes::Bytes`: one encoded model is shared, not copied,
        // by the messages to every client.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
