//! `fabric`: the Statefabric command line.
//!
//! Hosts the embedded all-in-one mode (`fabric dev`) and, as the control plane
//! grows, the operator commands that wrap its API.

use std::process::ExitCode;
use std::time::Duration;

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
    /// Avro schemas in the Schema Registry.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Registers every message schema (safe to run again), each subject set
    /// to BACKWARD compatibility; prints subject and id. Fails, naming the
    /// subject, if a schema is incompatible with what is registered.
    Register {
        /// The registry's Confluent-compatible API root.
        #[arg(long, env = "STATEFABRIC_SCHEMA_REGISTRY_URL")]
        registry: String,
    },
}

async fn register_schemas(registry: &str) -> ExitCode {
    let client = statefabric_schema::RegistryClient::new(registry, Duration::from_secs(10));
    match statefabric_schema::catalog::register_all(&client).await {
        Ok(ids) => {
            for (subject, id) in ids {
                println!("{subject}\t{id}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("fabric schemas register: {err}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Schemas {
            command: SchemasCommand::Register { registry },
        } => register_schemas(&registry).await,
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
