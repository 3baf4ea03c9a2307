//! `fabric`: the Statefabric command line.
//!
//! Hosts the embedded all-in-one mode (`fabric dev`) and, as the control plane
//! grows, the operator commands that wrap its API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use statefabric_runtime::{BaseConfig, ConfigArgs};

/// `fabric dev` takes the sidecar's admin port, the address probes and
/// dashboards already know from a production pod.
const DEV_ADMIN_PORT: u16 = 7401;

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
    /// Partial: it currently serves only the admin endpoints
    /// (/healthz/live, /healthz/ready, /metrics on 127.0.0.1:7401); the
    /// embedded sidecar and control plane are added by later issues.
    Dev {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dev { config } => {
            statefabric_runtime::main(
                "fabric-dev",
                BaseConfig::with_admin_port(DEV_ADMIN_PORT),
                config.config.as_deref(),
                |ctx| async move {
                    tracing::info!(
                        admin = %ctx.config.admin.listen,
                        "fabric dev running; Ctrl-C to stop"
                    );
                    ctx.shutdown.requested().await;
                    Ok(())
                },
            )
            .await
        }
    }
}
