//! Event store throughput and latency on the real Postgres, against this
//! machine's raw Postgres ceiling for the same row shape, in one run.
//!
//! Scenarios: appends with 1, 8 and 64 concurrent writers, one event per
//! append and batches; catch-up speed of the commit-ordered feed; and the
//! baseline: plain multi-row INSERTs of the same columns into a table with no
//! trigger, no RLS, no audit and no stream row, from the same harness.
//!
//! Run against the test environment (testenv/up.sh):
//!   cargo run --release -p statefabric-bench --bin event-store-bench -- --seconds 5

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use statefabric_bench::{Latencies, drop_tenant, report};
use statefabric_domain::{Checkpoint, ExpectedVersion, NewEvent, StreamId, TenantId};
use statefabric_store::pg::{PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests as env;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Events per append in the batched scenarios.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent writer counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    writers: Vec<usize>,
}

fn event(i: usize) -> NewEvent {
    NewEvent::new(
        "TaskProgressed",
        json!({"task": "t-42", "step": i, "status": "running", "note": "agent made progress on the plan"}),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let duration = Duration::from_secs(args.seconds);
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let max_writers = args.writers.iter().copied().max().unwrap_or(1);
    let store = PgEventStore::connect(PgConfig {
        url: env::pg_app_url(),
        max_connections: u32::try_from(max_writers).unwrap_or(64).max(4),
        ..PgConfig::default()
    })
    .await?;
    let store: Arc<dyn EventStore> = Arc::new(store);

    println!(
        "event store on Postgres: {}s per scenario, batch = {} events",
        args.seconds, args.batch
    );
    println!("(outbox trigger, RLS, audit row, stream row and optimistic concurrency all on)\n");
    let mut store_rates = Vec::new();
    for &writers in &args.writers {
        for batch in [1, args.batch] {
            let tenant = new_tenant().await?;
            let (rate, latencies) =
                appends(store.clone(), &tenant, writers, batch, duration).await?;
            let label = format!("append  {writers:>2} writers x {batch:>3} events/append");
            report(&label, rate, "events", Some(&latencies));
            store_rates.push(((writers, batch), rate));
            drop_tenant(&tenant).await?;
        }
    }

    println!();
    let tenant = new_tenant().await?;
    let total = seed(store.clone(), &tenant, 50_000, args.batch).await?;
    let start = Instant::now();
    let (count, _) =
        statefabric_store::replay(store.as_ref(), &tenant, Checkpoint::START, 0u64, |n, _| {
            *n += 1
        })
        .await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(count == total, "feed caught up {count} of {total}");
    report(
        &format!("feed catch-up over {total} events"),
        count as f64 / elapsed.as_secs_f64(),
        "events",
        None,
    );
    drop_tenant(&tenant).await?;

    println!("\nbaseline: raw multi-row INSERT, same columns, no trigger/RLS/audit\n");
    let admin = PgPoolOptions::new()
        .max_connections(u32::try_from(max_writers).unwrap_or(64).max(4))
        .connect(&env::pg_admin_url())
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_events (LIKE event_store INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES)",
    )
    .execute(&admin)
    .await?;
    for &writers in &args.writers {
        for batch in [1, args.batch] {
            sqlx::query("TRUNCATE bench_raw_events")
                .execute(&admin)
                .await?;
            let (rate, latencies) = raw_inserts(&admin, writers, batch, duration).await?;
            let label = format!("raw     {writers:>2} writers x {batch:>3} rows/insert");
            report(&label, rate, "rows", Some(&latencies));
            if let Some((_, store_rate)) = store_rates.iter().find(|(k, _)| *k == (writers, batch))
            {
                println!(
                    "{:<44} {:>11.0}%",
                    "  store / raw",
                    100.0 * store_rate / rate
                );
            }
        }
    }
    sqlx::query("DROP TABLE bench_raw_events")
        .execute(&admin)
        .await?;
    Ok(())
}

async fn new_tenant() -> anyhow::Result<TenantId> {
    let tenant = TenantId::new(format!("bench-{}", uuid::Uuid::new_v4().simple()))?;
    statefabric_db::pg::create_tenant(&env::pg_admin_url(), &tenant, "bench").await?;
    Ok(tenant)
}

/// Each writer appends to its own stream with an exact expected version, as
/// an aggregate would; returns events/s and per-append latency.
async fn appends(
    store: Arc<dyn EventStore>,
    tenant: &TenantId,
    writers: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Latencies)> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let scope = Scope::new(tenant.clone(), "bench");
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("writer-{w}"))?;
            let mut latencies = Latencies::default();
            let mut version = 0u64;
            let mut events = 0u64;
            while Instant::now() < deadline {
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let request = AppendRequest::new(
                    stream.clone(),
                    "task",
                    expected,
                    (0..batch).map(event).collect(),
                );
                let t = Instant::now();
                let outcome = store.append(&scope, request).await?;
                latencies.record(t.elapsed());
                version = outcome.result.last_version;
                events += batch as u64;
            }
            anyhow::Ok((events, latencies))
        }));
    }
    let mut total = 0;
    let mut latencies = Latencies::default();
    for task in tasks {
        let (events, l) = task.await??;
        total += events;
        latencies.merge(&l);
    }
    Ok((total as f64 / start.elapsed().as_secs_f64(), latencies))
}

async fn seed(
    store: Arc<dyn EventStore>,
    tenant: &TenantId,
    total: u64,
    batch: usize,
) -> anyhow::Result<u64> {
    let scope = Scope::new(tenant.clone(), "bench");
    let stream = StreamId::new("seed")?;
    let mut written = 0;
    while written < total {
        let request = AppendRequest::new(
            stream.clone(),
            "task",
            ExpectedVersion::Any,
            (0..batch).map(event).collect(),
        );
        store.append(&scope, request).await?;
        written += batch as u64;
    }
    Ok(written)
}

/// The ceiling: the same row shape inserted with plain multi-row INSERTs.
async fn raw_inserts(
    pool: &sqlx::PgPool,
    writers: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Latencies)> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            let mut rows = 0u64;
            let mut version = 0i64;
            let stream = format!("writer-{w}");
            while Instant::now() < deadline {
                let mut builder = sqlx::QueryBuilder::new(
                    "INSERT INTO bench_raw_events (event_id, tenant_id, stream_id, stream_type, event_type, \
                     event_schema_version, data, metadata, stream_version) ",
                );
                builder.push_values(0..batch, |mut b, i| {
                    let e = event(i);
                    version += 1;
                    b.push_bind(e.id)
                        .push_bind("bench")
                        .push_bind(stream.clone())
                        .push_bind("task")
                        .push_bind(e.event_type)
                        .push_bind(1i32)
                        .push_bind(e.data)
                        .push_bind(json!({}))
                        .push_bind(version);
                });
                let t = Instant::now();
                builder.build().execute(&pool).await?;
                latencies.record(t.elapsed());
                rows += batch as u64;
            }
            anyhow::Ok((rows, latencies))
        }));
    }
    let mut total = 0;
    let mut latencies = Latencies::default();
    for task in tasks {
        let (rows, l) = task.await??;
        total += rows;
        latencies.merge(&l);
    }
    Ok((total as f64 / start.elapsed().as_secs_f64(), latencies))
}
