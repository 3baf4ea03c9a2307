//! `statefabric-sidecar`: the process injected beside every agent.

use std::process::ExitCode;

use clap::Parser;
use statefabric_runtime::ConfigArgs;
use statefabric_sidecar::SidecarConfig;

/// The Statefabric sidecar: an agent's event-sourced state over localhost gRPC.
#[derive(Debug, Parser)]
#[command(name = "statefabric-sidecar", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    statefabric_runtime::main(
        "statefabric-sidecar",
        SidecarConfig::defaults(),
        args.config.config.as_deref(),
        statefabric_sidecar::serve,
    )
    .await
}
