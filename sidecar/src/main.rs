//! `statefabric-sidecar`: the process injected beside every agent.
//!
//! Today it serves its admin endpoints (probes, metrics) and shuts down
//! gracefully; the localhost State API arrives with the sidecar issue. See `docs/architecture.md`.

use std::process::ExitCode;

use clap::Parser;
use statefabric_runtime::{BaseConfig, ConfigArgs};

const DEFAULT_ADMIN_PORT: u16 = 7401;

/// The Statefabric sidecar: an agent's state, locks and context over localhost gRPC.
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
        BaseConfig::with_admin_port(DEFAULT_ADMIN_PORT),
        args.config.config.as_deref(),
        |ctx| async move {
            ctx.shutdown.requested().await;
            Ok(())
        },
    )
    .await
}
