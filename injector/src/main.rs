//! `statefabric-injector`: the mutating admission webhook that adds the sidecar to annotated pods.
//!
//! Today it serves its admin endpoints (probes, metrics) and shuts down
//! gracefully; the webhook itself is planned, with no issue filed yet (see
//! `docs/architecture.md`).

use std::process::ExitCode;

use clap::Parser;
use statefabric_runtime::{BaseConfig, ConfigArgs};

const DEFAULT_ADMIN_PORT: u16 = 7601;

/// The Statefabric sidecar injector (Kubernetes mutating admission webhook).
#[derive(Debug, Parser)]
#[command(name = "statefabric-injector", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    statefabric_runtime::main(
        "statefabric-injector",
        BaseConfig::with_admin_port(DEFAULT_ADMIN_PORT),
        args.config.config.as_deref(),
        |ctx| async move {
            ctx.shutdown.requested().await;
            Ok(())
        },
    )
    .await
}
