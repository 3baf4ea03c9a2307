//! Shared pieces of the benchmarks: latency recording and reporting, a
//! sidecar (or `fabric dev`) started for a run, CPU and memory of a
//! process, a closed-loop load driver, and Dapr as a peer ([`dapr`]).
//!
//! Benchmarks live here, not in tests: they print numbers for
//! `docs/benchmarks.md` and never assert on timing.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use statefabric_tests as env;
use tokio::process::{Child, Command};

pub mod dapr;

/// Latencies in microseconds, 1 µs to 60 s at 3 significant figures.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid"))
    }
}

impl Latencies {
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// p50 / p95 / p99 in milliseconds.
    pub fn percentiles_ms(&self) -> (f64, f64, f64) {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        (ms(0.50), ms(0.95), ms(0.99))
    }
}

/// One result line: a scenario, its throughput and latency percentiles.
pub fn report(scenario: &str, items_per_sec: f64, unit: &str, latencies: Option<&Latencies>) {
    match latencies {
        Some(l) => {
            let (p50, p95, p99) = l.percentiles_ms();
            println!(
                "{scenario:<44} {items_per_sec:>12.0} {unit}/s   p50 {p50:>7.2} ms   p95 {p95:>7.2} ms   p99 {p99:>7.2} ms"
            );
        }
        None => println!("{scenario:<44} {items_per_sec:>12.0} {unit}/s"),
    }
}

/// Waits (at most 30 s) until the process whose admin endpoints are on
/// `admin_port` reports ready.
pub async fn wait_ready(what: &str, admin_port: u16) -> anyhow::Result<()> {
    let ready = format!("http://127.0.0.1:{admin_port}/healthz/ready");
    env::eventually(&format!("{what} ready"), Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { Ok((env::http("GET", &ready, None, None).await?.status == 200).then_some(())) }
    })
    .await
}

/// The binary `name` of ours a benchmark starts: from the directory
/// `STATEFABRIC_BENCH_BINARIES` names (the peer benchmarks' scripts point it
/// at the `dist` profile's, what ships), else built with `--release` beside
/// the running benchmark.
pub fn release_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let binary = match std::env::var_os("STATEFABRIC_BENCH_BINARIES") {
        Some(dir) => std::path::PathBuf::from(dir).join(name),
        None => std::env::current_exe()?.with_file_name(name),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} missing: build it first (--release, or --profile dist for STATEFABRIC_BENCH_BINARIES)",
        binary.display()
    );
    Ok(binary)
}

/// A release-built sidecar on the shared test Postgres, started for a run.
#[derive(Debug)]
pub struct Sidecar {
    pub child: Child,
    pub grpc: String,
    pub admin: String,
}

impl Sidecar {
    /// Starts one beside this binary (build both with --release) for
    /// `tenant`, with `extra` environment, and waits until it is ready.
    pub async fn start(tenant: &str, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let binary = release_binary("statefabric-sidecar")?;
        let (grpc, admin) = (env::free_port(), env::free_port());
        let mut command = Command::new(binary);
        command
            .env("STATEFABRIC_SIDECAR__LISTEN", format!("127.0.0.1:{grpc}"))
            .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("STATEFABRIC_SIDECAR__TENANT", tenant)
            .env("STATEFABRIC_SIDECAR__IDENTITY", "bench")
            .env("STATEFABRIC_STORAGE__BACKEND", "postgres")
            .env("STATEFABRIC_STORAGE__POSTGRES__URL", env::pg_app_url())
            .env(
                "STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL",
                env::pg_admin_url(),
            )
            .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
            .kill_on_drop(true);
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn()?;
        wait_ready("sidecar", admin).await?;
        Ok(Self {
            child,
            grpc: format!("http://127.0.0.1:{grpc}"),
            admin: format!("http://127.0.0.1:{admin}"),
        })
    }

    /// Resident memory, MiB.
    pub fn rss_mib(&self) -> f64 {
        self.child.id().map_or(0.0, |pid| rss_kib(pid) / 1024.0)
    }

    /// Kills the sidecar and waits until it is gone (dropping it only sends
    /// the signal), so nothing it does races what the caller does next.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// Nanoseconds the process (all its threads) has run on a CPU, from the
/// kernel's own count (`/proc/<pid>/task/*/schedstat`): nothing samples it.
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// A release binary of ours (`fabric` or `statefabric-sidecar`) on a SQLite
/// file of its own, for one run.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub grpc: String,
    _data: tempfile::TempDir,
}

impl Process {
    /// Starts `binary` with `args` for tenant `idle` (override it in
    /// `extra`, which is applied last) and waits until it is ready.
    pub async fn start(
        binary: &str,
        args: &[&str],
        extra: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let exe = release_binary(binary)?;
        let data = tempfile::tempdir()?;
        let db = data.path().join("events.db");
        let (grpc, admin) = (env::free_port(), env::free_port());
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("STATEFABRIC_SIDECAR__LISTEN", format!("127.0.0.1:{grpc}"))
            .env("STATEFABRIC_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            // The operator API (fabric dev) is not used here: any free port.
            .env("STATEFABRIC_API__LISTEN", "127.0.0.1:0")
            .env("STATEFABRIC_API__GRPC_LISTEN", "127.0.0.1:0")
            .env("STATEFABRIC_STORAGE__SQLITE__PATH", &db)
            .env("STATEFABRIC_SAGAS__SQLITE_PATH", &db)
            .env("STATEFABRIC_SIDECAR__TENANT", "idle")
            .env("STATEFABRIC_TELEMETRY__LOG_LEVEL", "warn")
            .kill_on_drop(true);
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn()?;
        wait_ready(binary, admin).await?;
        Ok(Self {
            child,
            grpc: format!("http://127.0.0.1:{grpc}"),
            _data: data,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// A process's resident memory in KiB (`VmRSS` in `/proc`; 0 if gone).
pub fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Runs `op(client index, iteration)` from `clients` tasks for `duration`;
/// returns operations per second and their latencies.
pub async fn load<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(f64, Latencies)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let (all, seconds) = load_timed(clients, duration, move |c, i| {
        let op = op.clone();
        async move {
            let t = Instant::now();
            op(c, i).await?;
            Ok(t.elapsed())
        }
    })
    .await?;
    Ok((all.count() as f64 / seconds, all))
}

/// [`load`] where `op` returns the time to record (so it can leave out
/// untimed preparation); returns the latencies and the seconds it ran.
pub async fn load_timed<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(Latencies, f64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Duration>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut i = 0;
                while Instant::now() < deadline {
                    latencies.record(op(c, i).await?);
                    i += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Latencies::default();
    for task in tasks {
        all.merge(&task.await??);
    }
    Ok((all, start.elapsed().as_secs_f64()))
}

/// Prints both lines and the sidecar's overhead over the direct baseline.
pub fn compare(label: &str, sidecar: &(f64, Latencies), direct: &(f64, Latencies)) {
    report(
        &format!("{label} via sidecar"),
        sidecar.0,
        "ops",
        Some(&sidecar.1),
    );
    report(&format!("{label} direct"), direct.0, "ops", Some(&direct.1));
    let (s50, _, s99) = sidecar.1.percentiles_ms();
    let (d50, _, d99) = direct.1.percentiles_ms();
    println!(
        "{:<44} p50 +{:.2} ms   p99 +{:.2} ms   throughput {:.0}%",
        "  sidecar overhead",
        s50 - d50,
        s99 - d99,
        100.0 * sidecar.0 / direct.0
    );
}

/// A migrated schema and a tenant of its own for one benchmark run.
pub async fn fresh_tenant() -> anyhow::Result<statefabric_domain::TenantId> {
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let tenant =
        statefabric_domain::TenantId::new(format!("bench-{}", uuid::Uuid::new_v4().simple()))?;
    statefabric_db::pg::create_tenant(&env::pg_admin_url(), &tenant, "bench").await?;
    Ok(tenant)
}

/// Deletes everything a benchmark wrote for `tenant` — its rows in every
/// table with a `tenant_id` column, found in the catalog so a new table is
/// not missed — and then the tenant, as the schema's owner: the shared test
/// database otherwise grows by every run, and later runs are slower than
/// earlier ones for that alone. Foreign keys either cascade (saga children)
/// or point at `tenants`, which goes last.
pub async fn drop_tenant(tenant: &statefabric_domain::TenantId) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.table_name::text FROM information_schema.columns c \
           JOIN information_schema.tables t USING (table_schema, table_name) \
          WHERE c.table_schema = 'public' AND c.column_name = 'tenant_id' \
            AND t.table_type = 'BASE TABLE' AND c.table_name <> 'tenants'",
    )
    .fetch_all(&pool)
    .await?;
    let mut tx = pool.begin().await?;
    for table in tables.iter().map(String::as_str).chain(["tenants"]) {
        // Names from the catalog, quoted: no input reaches the statement.
        let statement = format!(
            "DELETE FROM \"{}\" WHERE tenant_id = $1",
            table.replace('"', "\"\"")
        );
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
