//! `statefabric-sidecar`: the process injected beside every agent.

use std::process::ExitCode;

use clap::Parser;
use statefabric_runtime::{ConfigArgs, EXIT_BAD_CONFIG};
use statefabric_sidecar::SidecarConfig;

/// The Statefabric sidecar: an agent's event-sourced state over localhost gRPC.
#[derive(Debug, Parser)]
#[command(name = "statefabric-sidecar", version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

/// The configuration is read before the runtime exists, because it says how
/// many worker threads to start: a sidecar shares its pod's CPU with the
/// agent, and one thread avoids cross-thread hand-offs on every call (the
/// benchmarks in docs/benchmarks.md show the difference).
fn main() -> ExitCode {
    let args = Args::parse();
    let config = match statefabric_runtime::config::load(
        SidecarConfig::defaults(),
        args.config.config.as_deref(),
    ) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("statefabric-sidecar: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.sidecar.worker_threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("statefabric-sidecar: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(statefabric_runtime::run(
        "statefabric-sidecar",
        config,
        statefabric_sidecar::serve,
    ))
}
