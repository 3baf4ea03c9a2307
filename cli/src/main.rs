//! `fabric`: the Statefabric command line.
//!
//! Hosts the embedded all-in-one mode (`fabric dev`) and, as the control plane
//! grows, the operator commands that wrap its API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use statefabric_runtime::ConfigArgs;
use statefabric_sidecar::SidecarConfig;

/// Statefabric: event-sourced state, locks, context and sagas for agent fleets.
#[derive(Debug, Parser)]
#[command(name = "fabric", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded all-in-one fabric in this process (no servers needed).
    ///
    /// Serves the sidecar's State API (gRPC on 127.0.0.1:7400) on the
    /// embedded SQLite store (./statefabric-data), with admin endpoints on
    /// 127.0.0.1:7401. Partial: the embedded control plane and the
    /// Planner/Coder/Critic demo are added by later issues.
    Dev {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dev { config } => {
            // Same defaults and ports as a production sidecar, so an agent
            // runs unchanged against either.
            statefabric_runtime::main(
                "fabric-dev",
                SidecarConfig::defaults(),
                config.config.as_deref(),
                |ctx| async move {
                    tracing::info!(
                        state_api = %ctx.config.sidecar.listen,
                        admin = %ctx.config.admin.listen,
                        data = %ctx.config.storage.sqlite.path.display(),
                        "fabric dev running; Ctrl-C to stop"
                    );
                    statefabric_sidecar::serve(ctx).await
                },
            )
            .await
        }
    }
}
