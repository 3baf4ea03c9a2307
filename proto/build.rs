//! Generates the gRPC code. Uses the protoc binary vendored by
//! `protoc-bin-vendored`, so a build needs nothing but the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Ordered maps encode deterministically, which request fingerprints
    // (idempotency keys) rely on.
    config.btree_map(["."]);
    let protos = [
        "statefabric/state/v1/events.proto",
        "statefabric/state/v1/context.proto",
        "statefabric/state/v1/locks.proto",
        "statefabric/state/v1/sessions.proto",
        "statefabric/state/v1/tasks.proto",
        "statefabric/control/v1/sagas.proto",
        "statefabric/control/v1/config.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("statefabric_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
