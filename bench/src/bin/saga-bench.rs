//! Planner → Coder → Critic sagas end to end: a release-built control plane
//! and sidecars on the real Postgres (or `fabric dev` on its embedded
//! SQLite), test agents that answer at once through the SDK, and N sagas
//! started together (N in flight). Reports throughput (sagas/s), completion
//! latency from the start request to DONE (p50/p95/p99), the per-step round
//! trip (completion / 3 steps: dispatch, claim, answer, next transition),
//! and a raw-Postgres floor in the same run: the same four transactions per
//! saga (create, three transitions) written directly, as one row each.
//!
//! Run against the test environment (testenv/up.sh), release build:
//!   cargo build --release -p statefabric-sidecar -p statefabric-control-plane \
//!     -p statefabric-cli -p statefabric-bench
//!   target/release/saga-bench --sagas 1000 --sagas 10000

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use sqlx::Row;
use statefabric_bench::{Latencies, Sidecar, fresh_tenant, report};
use statefabric_sdk::StateClient;
use statefabric_tests as env;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Sagas per run, all in flight at once (repeat for several runs).
    #[arg(long, default_values_t = [1000, 10000])]
    sagas: Vec<usize>,
    /// Sidecars the agents connect through (Postgres mode).
    #[arg(long, default_value_t = 2)]
    sidecars: usize,
    /// Also run on `fabric dev` (embedded SQLite).
    #[arg(long)]
    embedded: bool,
}

fn beside(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let binary = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        binary.is_file(),
        "{} missing: build it with --release",
        binary.display()
    );
    Ok(binary)
}

async fn wait_ready(admin: u16) -> anyhow::Result<()> {
    let ready = format!("http://127.0.0.1:{admin}/healthz/ready");
    env::eventually("ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { Ok((env::http("GET", &ready, None, None).await?.status == 200).then_some(())) }
    })
    .await
}

/// A release control plane leading on Postgres, with its saga engine.
async fn control_plane() -> anyhow::Result<Child> {
    let (admin, api, grpc) = (env::free_port(), env::free_port(), env::free_port());
    let child = Command::new(beside("statefabric-control-plane")?)
        .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("STATEFABRIC_API__LISTEN", format!("127.0.0.1:{api}"))
        .env("STATEFABRIC_API__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env("STATEFABRIC_LEADER__BACKEND", "postgres")
        .env("STATEFABRIC_LEADER__POSTGRES_URL", env::pg_control_url())
        .env(
            "STATEFABRIC_LEADER__NAME",
            format!("bench-{}", uuid::Uuid::new_v4().simple()),
        )
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("STATEFABRIC_SAGAS__")))
        .kill_on_drop(true)
        .spawn()?;
    wait_ready(admin).await?;
    Ok(child)
}

/// Agents answering at once: the critic approves.
fn agents(client: &StateClient, stop: &CancellationToken) {
    env::agents::approving(client, 1000, Duration::ZERO, stop, |_| {});
}

/// Starts `n` sagas through `clients` (round robin), 64 requests at a time;
/// returns when each start was asked.
async fn start_all(
    clients: &[StateClient],
    prefix: &str,
    n: usize,
) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
    let results: Vec<anyhow::Result<(String, DateTime<Utc>)>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut tasks = clients[i % clients.len()].tasks();
            let id = format!("{prefix}-{i}");
            async move {
                let at = Utc::now();
                tasks
                    .start_saga("plan-code-critique", Some(&id), &json!({"task": i}))
                    .await?;
                Ok((id, at))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

struct Outcome {
    per_sec: f64,
    latencies: Latencies,
}

/// Waits until every saga of `prefix` is DONE (polling `done`, a cheap
/// count, so that watching costs the database little), then reads when each
/// ended.
async fn finished(
    done: impl Fn() -> futures::future::BoxFuture<'static, anyhow::Result<usize>>,
    ended: impl Fn()
        -> futures::future::BoxFuture<'static, anyhow::Result<Vec<(String, DateTime<Utc>)>>>,
    started: &HashMap<String, DateTime<Utc>>,
) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = done().await?;
        if n >= started.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} of {} done after 10 min",
            started.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = ended().await?;
    let first = started.values().min().copied().unwrap_or_else(Utc::now);
    let last = rows.iter().map(|(_, t)| *t).max().unwrap_or(first);
    let mut latencies = Latencies::default();
    for (id, at) in &rows {
        if let Some(s) = started.get(id) {
            latencies.record((*at - *s).to_std().unwrap_or_default());
        }
    }
    let span = (last - first)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-3);
    Ok(Outcome {
        per_sec: rows.len() as f64 / span,
        latencies,
    })
}

fn print(label: &str, n: usize, o: &Outcome) {
    report(
        &format!("{label}: {n} sagas in flight"),
        o.per_sec,
        "sagas",
        Some(&o.latencies),
    );
    let (p50, p95, p99) = o.latencies.percentiles_ms();
    println!(
        "  per-step round trip (completion / 3): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        p50 / 3.0,
        p95 / 3.0,
        p99 / 3.0
    );
}

async fn on_postgres(args: &Args, n: usize) -> anyhow::Result<()> {
    let tenant = fresh_tenant().await?;
    let mut control = control_plane().await?;
    let mut sidecars = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..args.sidecars {
        let sidecar = Sidecar::start(
            tenant.as_str(),
            &[("STATEFABRIC_SIDECAR__TASK_CONNECTIONS", "8")],
        )
        .await?;
        clients.push(StateClient::connect(sidecar.grpc.clone()).await?);
        sidecars.push(sidecar);
    }
    let stop = CancellationToken::new();
    for client in &clients {
        agents(client, &stop);
    }
    let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
    let started = start_all(&clients, tenant.as_str(), n).await?;
    let (count_pool, query_pool) = (pool.clone(), pool.clone());
    let t = tenant.to_string();
    let count_tenant = t.clone();
    let outcome = finished(
        move || {
            let pool = count_pool.clone();
            let t = count_tenant.clone();
            Box::pin(async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM saga_instances WHERE tenant_id = $1 AND status = 'DONE'",
                )
                .bind(&t)
                .fetch_one(&pool)
                .await?;
                Ok(usize::try_from(n).unwrap_or_default())
            })
        },
        move || {
            let pool = query_pool.clone();
            let t = t.clone();
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT saga_id, ended_at FROM saga_instances WHERE tenant_id = $1 AND status = 'DONE'",
                )
                .bind(&t)
                .fetch_all(&pool)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("saga_id")?, r.try_get("ended_at")?)))
                    .collect()
            })
        },
        &started,
    )
    .await?;
    stop.cancel();
    print("Postgres (control plane + sidecars)", n, &outcome);
    let floor = raw_postgres(&pool, n).await?;
    println!(
        "  raw Postgres floor (4 one-row transactions per saga, 32 connections): {floor:.0} sagas/s; engine at {:.1}% of it",
        100.0 * outcome.per_sec / floor
    );
    // The engine and the sidecars stop before their tenant's rows go.
    control.kill().await?;
    for sidecar in sidecars {
        sidecar.stop().await?;
    }
    statefabric_bench::drop_tenant(&tenant).await?;
    Ok(())
}

/// The same durable writes per saga, with no engine: insert a row, update
/// it three times, each in its own transaction.
async fn raw_postgres(pool: &sqlx::PgPool, n: usize) -> anyhow::Result<f64> {
    let table = format!("bench_floor_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, step int, state jsonb)"
    )))
    .execute(pool)
    .await?;
    let floor = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .connect(&env::pg_admin_url())
        .await?;
    let began = Instant::now();
    let table = Arc::new(table);
    futures::stream::iter(0..n)
        .map(|i| {
            let pool = floor.clone();
            let table = table.clone();
            async move {
                let id = format!("s{i}");
                sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES ($1, 0, '{{}}')")))
                    .bind(&id)
                    .execute(&pool)
                    .await?;
                for step in 1..=3 {
                    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {table} SET step = $2, state = jsonb_build_object('step', $2) WHERE id = $1")))
                        .bind(&id)
                        .bind(step)
                        .execute(&pool)
                        .await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let per_sec = n as f64 / began.elapsed().as_secs_f64();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(pool)
        .await?;
    Ok(per_sec)
}

async fn embedded(n: usize) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let (admin, grpc, api, api_grpc) = (
        env::free_port(),
        env::free_port(),
        env::free_port(),
        env::free_port(),
    );
    let db = data.path().join("events.db");
    let _fabric = Command::new(beside("fabric")?)
        .arg("dev")
        .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("STATEFABRIC_SIDECAR__LISTEN", format!("127.0.0.1:{grpc}"))
        .env("STATEFABRIC_API__LISTEN", format!("127.0.0.1:{api}"))
        .env(
            "STATEFABRIC_API__GRPC_LISTEN",
            format!("127.0.0.1:{api_grpc}"),
        )
        .env("STATEFABRIC_STORAGE__SQLITE__PATH", &db)
        .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()?;
    wait_ready(admin).await?;
    let client = StateClient::connect(format!("http://127.0.0.1:{grpc}")).await?;
    let stop = CancellationToken::new();
    agents(&client, &stop);
    let started = start_all(std::slice::from_ref(&client), "embedded", n).await?;
    let reader = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&db)
                .read_only(true),
        )
        .await?;
    let counter = reader.clone();
    let outcome = finished(
        move || {
            let pool = counter.clone();
            Box::pin(async move {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE status = 'DONE'")
                        .fetch_one(&pool)
                        .await?;
                Ok(usize::try_from(n).unwrap_or_default())
            })
        },
        move || {
            let pool = reader.clone();
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT saga_id, ended_at FROM saga_instances WHERE status = 'DONE'",
                )
                .fetch_all(&pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let ms: i64 = r.try_get("ended_at")?;
                        Ok((
                            r.try_get("saga_id")?,
                            DateTime::from_timestamp_millis(ms).unwrap_or_default(),
                        ))
                    })
                    .collect()
            })
        },
        &started,
    )
    .await?;
    stop.cancel();
    print("embedded (fabric dev, SQLite)", n, &outcome);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for &n in &args.sagas {
        on_postgres(&args, n).await?;
        if args.embedded {
            embedded(n).await?;
        }
    }
    Ok(())
}
