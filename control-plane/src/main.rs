//! `statefabric-control-plane`: runs sagas and distributes mesh configuration (several replicas, one leader).
//!
//! Today it serves its admin endpoints (probes, metrics) and shuts down
//! gracefully; the saga engine and leader election arrive with the saga issue. See `docs/architecture.md`.

use std::process::ExitCode;

use clap::Parser;
use statefabric_runtime::{BaseConfig, ConfigArgs};

const DEFAULT_ADMIN_PORT: u16 = 7501;

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
        BaseConfig::with_admin_port(DEFAULT_ADMIN_PORT),
        args.config.config.as_deref(),
        |ctx| async move {
            ctx.shutdown.requested().await;
            Ok(())
        },
    )
    .await
}
