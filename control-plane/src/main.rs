//! The control plane's binary; the process is assembled in the library.

use std::process::ExitCode;

use clap::Parser;
use statefabric_control_plane::{ControlPlaneConfig, serve};
use statefabric_runtime::ConfigArgs;

/// The Statefabric control plane: sagas and mesh configuration.
#[derive(Debug, Parser)]
#[command(name = "statefabric-control-plane", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    statefabric_runtime::main(
        "statefabric-control-plane",
        ControlPlaneConfig::defaults(),
        args.config.config.as_deref(),
        serve,
    )
    .await
}
