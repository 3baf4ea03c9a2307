//! CPU an idle process burns: `fabric dev` (the embedded control plane,
//! saga engine and sidecar), the same with three agents' task streams open
//! and waiting, and a lone sidecar on SQLite and on Postgres + Redis.
//! Each is measured over `--seconds` after it settled, from the kernel's
//! count of time on CPU (`/proc/<pid>/schedstat`), so nothing samples it.
//!
//! The aim (issue #25): under 0.1 % of a core; an idle daprd measured 0.
//!
//!   cargo build --release -p statefabric-cli -p statefabric-sidecar -p statefabric-bench
//!   target/release/idle-bench --seconds 60

use std::time::Duration;

use clap::Parser;
use statefabric_bench::{Process, cpu_ns, rss_kib};
use statefabric_tests as env;

#[derive(Parser)]
struct Args {
    /// Seconds each process is watched while idle.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

async fn watch(label: &str, process: &Process, seconds: u64) -> anyhow::Result<()> {
    let pid = process
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("{label} exited"))?;
    // Start-up work (migrations, first passes, connection pools) settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = cpu_ns(pid)?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let used_ms = (cpu_ns(pid)? - before) as f64 / 1e6;
    let share = used_ms / (seconds as f64 * 1000.0) * 100.0;
    println!(
        "| {label} | {used_ms:.0} ms in {seconds} s | {share:.3} % | {:.1} MiB |",
        rss_kib(pid) / 1024.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("| idle process | CPU used | of one core | RSS |");
    println!("|---|---:|---:|---:|");

    // The baseline, in the same run: the embedded engine woken every
    // second, as it was before it slept until something is due (its
    // stalled count every second brings a pass with it).
    let polling = Process::start(
        "fabric",
        &["dev"],
        &[("STATEFABRIC_SAGAS__STALLED_EVERY", "1s".to_owned())],
    )
    .await?;
    watch(
        "`fabric dev`, engine woken every second (before)",
        &polling,
        args.seconds,
    )
    .await?;
    drop(polling);

    let dev = Process::start("fabric", &["dev"], &[]).await?;
    watch("`fabric dev`", &dev, args.seconds).await?;
    // Agents connected and waiting: three task streams open.
    let client = statefabric_sdk::StateClient::connect(dev.grpc.clone()).await?;
    let mut streams = Vec::new();
    for agent in ["planner", "coder", "critic"] {
        streams.push(client.tasks().stream(agent, 4).await?);
    }
    watch("`fabric dev`, 3 task streams waiting", &dev, args.seconds).await?;
    drop(streams);
    drop(dev);

    let sqlite = Process::start("statefabric-sidecar", &[], &[]).await?;
    watch("sidecar on SQLite", &sqlite, args.seconds).await?;
    drop(sqlite);

    let tenant = format!("idle-{}", uuid::Uuid::new_v4().simple());
    let postgres = Process::start(
        "statefabric-sidecar",
        &[],
        &[
            ("STATEFABRIC_SIDECAR__TENANT", tenant),
            ("STATEFABRIC_STORAGE__BACKEND", "postgres".to_owned()),
            ("STATEFABRIC_STORAGE__POSTGRES__URL", env::pg_app_url()),
            (
                "STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL",
                env::pg_admin_url(),
            ),
            ("STATEFABRIC_REDIS__MODE", "standalone".to_owned()),
            ("STATEFABRIC_REDIS__URLS", env::redis_url()),
            ("STATEFABRIC_LOCKS__BACKEND", "redis".to_owned()),
            ("STATEFABRIC_SESSIONS__BACKEND", "redis".to_owned()),
            ("STATEFABRIC_UPDATES__BACKEND", "redis".to_owned()),
        ],
    )
    .await?;
    watch("sidecar on Postgres + Redis", &postgres, args.seconds).await?;
    Ok(())
}
