//! Generates the gRPC code. Uses the protoc binary vendored by
//! `protoc-bin-vendored`, so a build needs nothing but the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let config = || -> Result<prost_build::Config, Box<dyn std::error::Error>> {
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        // Ordered maps encode deterministically, which request fingerprints
        // (idempotency keys) rely on.
        config.btree_map(["."]);
        Ok(config)
    };
    let state = [
        "statefabric/state/v1/events.proto",
        "statefabric/state/v1/context.proto",
        "statefabric/state/v1/locks.proto",
        "statefabric/state/v1/sessions.proto",
        "statefabric/state/v1/tasks.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("statefabric_descriptor.bin"))
        .compile_with_config(config()?, &state, &["."])?;
    // Long-lived streams to many sidecars: small per-RPC buffers (see
    // `src/codec.rs`).
    let control = [
        "statefabric/control/v1/sagas.proto",
        "statefabric/control/v1/config.proto",
    ];
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .file_descriptor_set_path(out.join("statefabric_control_descriptor.bin"))
        .compile_with_config(config()?, &control, &["."])?;
    Ok(())
}
