//! `statefabric-injector`: the mutating admission webhook that adds the
//! sidecar to annotated pods (see the library's docs).

use std::process::ExitCode;

use clap::Parser;
use statefabric_injector::InjectorConfig;
use statefabric_runtime::ConfigArgs;

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
        InjectorConfig::default(),
        args.config.config.as_deref(),
        statefabric_injector::serve,
    )
    .await
}
