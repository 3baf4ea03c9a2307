//! The State API beside Dapr's, on the same machine, in one run, driven by
//! the same client: for each backend — SQLite (`fabric dev` against daprd's
//! `state.sqlite`), Postgres (our sidecar against `state.postgresql` v2 on
//! the test Postgres) and Redis (our Sessions against `state.redis`) — the
//! same workloads at 1 and 16 clients, the two sides alternating cell by
//! cell (the first side flips every cell), with 600-byte JSON values:
//!
//! - read: `GetContext` (`GetSession`) / `GetState` of one key;
//! - read, our cache bypassed: 2,000 keys in turn through a sidecar whose
//!   cache holds one entry (SQLite and Postgres; Dapr has no cache);
//! - last-write-wins write: `PutContext` on an LWW register (`PutSession`) /
//!   `SaveState` without an ETag, a key per client;
//! - optimistic write, read + conditional write: `GetContext` then
//!   `PutContext` with the vector read / `GetState` then `SaveState` with
//!   the ETag read (SQLite and Postgres: sessions have no versions);
//! - delete: the timed `DeleteContext` (`DeleteSession`) / `DeleteState` of
//!   a key written just before, untimed;
//! - bulk read of 100 keys: `GetContexts` (`GetSessions`) / `GetBulkState`.
//!
//! Also per backend: resident memory idle and after the load, CPU time per
//! request (the process's own count over each cell), and idle CPU over
//! `--idle-seconds` with both processes idle side by side.
//!
//! Run (after `testenv/up.sh`):
//!   bench/dapr/run.sh            # builds daprd once, then this
//!
//! It is a command, not part of the test suite, and prints numbers only.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use statefabric_bench::dapr::{Component, DaprState, Daprd};
use statefabric_bench::{Latencies, Process, cpu_ns, load_timed, rss_kib};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::sessions_client::SessionsClient;
use statefabric_proto::state::v1::shared_context_client::SharedContextClient;
use statefabric_tests as env;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// The daprd binary (bench/dapr/build-daprd.sh prints its path).
    #[arg(long)]
    daprd: std::path::PathBuf,
    /// Seconds per cell.
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Times every cell is measured (results merged).
    #[arg(long, default_value_t = 2)]
    sets: usize,
    /// Seconds both processes are watched while idle.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Backends to compare: sqlite, postgres, redis.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,redis")]
    backends: Vec<String>,
    /// Workloads to run: read, uncached, write, occ, delete, bulk.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "read,uncached,write,occ,delete,bulk"
    )]
    workloads: Vec<String>,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
}

const UNCACHED_KEYS: usize = 2_000;
const BULK_KEYS: usize = 100;

/// A 600-byte JSON document whose content changes with `i`.
fn value(i: u64) -> Vec<u8> {
    let pad = "x".repeat(560);
    format!(r#"{{"step":{i:>10},"pad":"{pad}","ok":true}}"#).into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Read,
    ReadUncached,
    Write,
    Occ,
    Delete,
    Bulk,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Self::Read,
        Self::ReadUncached,
        Self::Write,
        Self::Occ,
        Self::Delete,
        Self::Bulk,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadUncached => "uncached",
            Self::Write => "write",
            Self::Occ => "occ",
            Self::Delete => "delete",
            Self::Bulk => "bulk",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadUncached => "read, our cache bypassed",
            Self::Write => "last-write-wins write",
            Self::Occ => "read + conditional write",
            Self::Delete => "delete",
            Self::Bulk => "bulk read, 100 keys",
        }
    }
}

/// One side's client for one backend.
#[derive(Debug, Clone)]
enum Client {
    Context(SharedContextClient<Channel>),
    Sessions(SessionsClient<Channel>),
    Dapr(DaprState),
}

fn doc_id(key: &str) -> String {
    key.replace('/', "-")
}

impl Client {
    async fn read(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Self::Context(api) => {
                api.get_context(pb::GetContextRequest {
                    document_id: doc_id(key),
                    ..Default::default()
                })
                .await?;
            }
            Self::Sessions(api) => {
                api.get_session(pb::GetSessionRequest {
                    namespace: "task".into(),
                    id: key.into(),
                })
                .await?;
            }
            Self::Dapr(api) => {
                let got = api.get(key).await?;
                anyhow::ensure!(!got.data.is_empty(), "daprd: {key} is missing");
            }
        }
        Ok(())
    }

    async fn write(&mut self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Self::Context(api) => {
                api.put_context(pb::PutContextRequest {
                    document_id: doc_id(key),
                    merge_type: pb::MergeType::LwwRegister as i32,
                    content_json: value,
                    ..Default::default()
                })
                .await?;
            }
            Self::Sessions(api) => {
                api.put_session(pb::PutSessionRequest {
                    namespace: "task".into(),
                    id: key.into(),
                    value,
                    ttl_ms: None,
                })
                .await?;
            }
            Self::Dapr(api) => api.save(key, &value, None).await?,
        }
        Ok(())
    }

    /// Read, then write only if nothing changed since; false where the
    /// backend has no versions.
    async fn occ(&mut self, key: &str, value: Vec<u8>) -> anyhow::Result<bool> {
        match self {
            Self::Context(api) => {
                let id = doc_id(key);
                let current = api
                    .get_context(pb::GetContextRequest {
                        document_id: id.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                api.put_context(pb::PutContextRequest {
                    document_id: id,
                    base: current.vector,
                    content_json: value,
                    ..Default::default()
                })
                .await?;
                Ok(true)
            }
            Self::Sessions(_) => Ok(false),
            Self::Dapr(api) => {
                let current = api.get(key).await?;
                api.save(key, &value, Some(&current.etag)).await?;
                Ok(true)
            }
        }
    }

    async fn delete(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Self::Context(api) => {
                api.delete_context(pb::DeleteContextRequest {
                    document_id: doc_id(key),
                    ..Default::default()
                })
                .await?;
            }
            Self::Sessions(api) => {
                api.delete_session(pb::DeleteSessionRequest {
                    namespace: "task".into(),
                    id: key.into(),
                })
                .await?;
            }
            Self::Dapr(api) => api.delete(key).await?,
        }
        Ok(())
    }

    async fn bulk(&mut self, keys: &[String]) -> anyhow::Result<()> {
        match self {
            Self::Dapr(api) => {
                let got = api.get_bulk(keys).await?;
                anyhow::ensure!(got.items.len() == keys.len(), "daprd: bulk read short");
            }
            Self::Context(api) => {
                let got = api
                    .get_contexts(pb::GetContextsRequest {
                        document_ids: keys.iter().map(|k| doc_id(k)).collect(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(got.documents.len() == keys.len(), "bulk read short");
            }
            Self::Sessions(api) => {
                let got = api
                    .get_sessions(pb::GetSessionsRequest {
                        namespace: "task".into(),
                        ids: keys.to_vec(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(got.sessions.len() == keys.len(), "bulk read short");
            }
        }
        Ok(())
    }
}

/// A process under test and its client(s).
struct Side {
    name: &'static str,
    pid: u32,
    client: Client,
    /// A second process of ours whose cache holds one entry, for the
    /// cache-bypassed reads (Dapr: the same process, it has no cache).
    uncached: Option<(u32, Client)>,
}

#[derive(Default)]
struct Cell {
    latencies: Latencies,
    seconds: f64,
    cpu_ns: u64,
}

type Results = BTreeMap<(Workload, usize, &'static str), Cell>;

async fn timed<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed())
}

/// One cell: `workload` at `clients` against `side`, into `results`.
async fn cell(
    side: &Side,
    workload: Workload,
    clients: usize,
    duration: Duration,
    results: &mut Results,
) -> anyhow::Result<()> {
    let (pid, client) = match (workload, &side.uncached) {
        (Workload::ReadUncached, Some((pid, client))) => (*pid, client.clone()),
        (Workload::ReadUncached, None) => return Ok(()),
        _ => (side.pid, side.client.clone()),
    };
    if workload == Workload::Occ && matches!(client, Client::Sessions(_)) {
        return Ok(());
    }
    let bulk_keys: Arc<Vec<String>> = Arc::new((0..BULK_KEYS).map(|k| format!("k/{k}")).collect());
    let cpu_before = cpu_ns(pid)?;
    let (latencies, seconds) = load_timed(clients, duration, move |c, i| {
        let mut client = client.clone();
        let bulk_keys = bulk_keys.clone();
        async move {
            match workload {
                Workload::Read => timed(client.read("hot")).await,
                Workload::ReadUncached => {
                    let key = format!("k/{}", (i as usize * clients + c) % UNCACHED_KEYS);
                    timed(client.read(&key)).await
                }
                Workload::Write => timed(client.write(&format!("w/{c}"), value(i))).await,
                Workload::Occ => {
                    let key = format!("o/{c}");
                    let t = Instant::now();
                    client.occ(&key, value(i)).await?;
                    Ok(t.elapsed())
                }
                Workload::Delete => {
                    let key = format!("d/{c}");
                    client.write(&key, value(i)).await?;
                    timed(client.delete(&key)).await
                }
                Workload::Bulk => timed(client.bulk(&bulk_keys)).await,
            }
        }
    })
    .await?;
    let cpu = cpu_ns(pid)?.saturating_sub(cpu_before);
    let entry = results.entry((workload, clients, side.name)).or_default();
    entry.latencies.merge(&latencies);
    entry.seconds += seconds;
    entry.cpu_ns += cpu;
    Ok(())
}

/// Writes what the reads expect: the hot key, the 2,000 keys (also the
/// bulk read's first 100), and a first version of every OCC key.
async fn seed(client: &Client, clients: usize) -> anyhow::Result<()> {
    let mut client = client.clone();
    client.write("hot", value(0)).await?;
    for k in 0..UNCACHED_KEYS {
        client.write(&format!("k/{k}"), value(k as u64)).await?;
    }
    if let Client::Context(api) = &mut client {
        for c in 0..clients {
            // OCC keys are plain documents (merge type none): the vector read
            // must be the current one.
            api.put_context(pb::PutContextRequest {
                document_id: doc_id(&format!("o/{c}")),
                content_json: value(0),
                ..Default::default()
            })
            .await?;
        }
    } else {
        for c in 0..clients {
            client.write(&format!("o/{c}"), value(0)).await?;
        }
    }
    Ok(())
}

async fn context_client(endpoint: &str) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
    Ok(Client::Context(SharedContextClient::new(channel)))
}

/// Our process for `backend`, and the one-entry-cache one where it applies.
async fn ours(
    backend: &str,
    tenant: &str,
) -> anyhow::Result<(Process, Client, Option<(Process, Client)>)> {
    let tenant_env = ("STATEFABRIC_SIDECAR__TENANT", tenant.to_owned());
    let one_entry = ("STATEFABRIC_SIDECAR__CACHE_MAX_ENTRIES", "1".to_owned());
    let postgres = vec![
        tenant_env.clone(),
        ("STATEFABRIC_STORAGE__BACKEND", "postgres".to_owned()),
        ("STATEFABRIC_STORAGE__POSTGRES__URL", env::pg_app_url()),
        (
            "STATEFABRIC_STORAGE__POSTGRES_MIGRATE_URL",
            env::pg_admin_url(),
        ),
    ];
    Ok(match backend {
        "sqlite" => {
            let main =
                Process::start("fabric", &["dev"], std::slice::from_ref(&tenant_env)).await?;
            let client = context_client(&main.grpc).await?;
            let cold = Process::start("fabric", &["dev"], &[tenant_env, one_entry]).await?;
            let cold_client = context_client(&cold.grpc).await?;
            (main, client, Some((cold, cold_client)))
        }
        "postgres" => {
            let main = Process::start("statefabric-sidecar", &[], &postgres).await?;
            let client = context_client(&main.grpc).await?;
            let mut cold_env = postgres.clone();
            cold_env.push(one_entry);
            let cold = Process::start("statefabric-sidecar", &[], &cold_env).await?;
            let cold_client = context_client(&cold.grpc).await?;
            (main, client, Some((cold, cold_client)))
        }
        "redis" => {
            let main = Process::start(
                "statefabric-sidecar",
                &[],
                &[
                    tenant_env,
                    ("STATEFABRIC_REDIS__MODE", "standalone".to_owned()),
                    ("STATEFABRIC_REDIS__URLS", env::redis_url()),
                    ("STATEFABRIC_SESSIONS__BACKEND", "redis".to_owned()),
                ],
            )
            .await?;
            let channel = Channel::from_shared(main.grpc.clone())?.connect().await?;
            (main, Client::Sessions(SessionsClient::new(channel)), None)
        }
        other => anyhow::bail!("unknown backend {other}: sqlite, postgres or redis"),
    })
}

fn component(backend: &str, dir: &std::path::Path) -> anyhow::Result<Component> {
    Ok(match backend {
        "sqlite" => Component::Sqlite {
            file: dir.join("dapr.db"),
        },
        "postgres" => Component::Postgres {
            url: env::pg_admin_url(),
            table_prefix: "dapr_bench_".into(),
        },
        "redis" => Component::Redis {
            host: env::redis_url().trim_start_matches("redis://").to_owned(),
        },
        other => anyhow::bail!("unknown backend {other}"),
    })
}

/// CPU both processes use while idle, side by side, as % of one core.
async fn idle_cpu(pids: [u32; 2], seconds: u64) -> anyhow::Result<[f64; 2]> {
    let before = [cpu_ns(pids[0])?, cpu_ns(pids[1])?];
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let share = |i: usize| -> anyhow::Result<f64> {
        Ok((cpu_ns(pids[i])? - before[i]) as f64 / (seconds as f64 * 1e9) * 100.0)
    };
    Ok([share(0)?, share(1)?])
}

fn mib(pid: u32) -> f64 {
    rss_kib(pid) / 1024.0
}

async fn run_backend(args: &Args, backend: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tenant = match backend {
        "postgres" => statefabric_bench::fresh_tenant().await?.to_string(),
        _ => format!("peer-{}", uuid::Uuid::new_v4().simple()),
    };
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let (ours_process, ours_client, cold) = ours(backend, &tenant).await?;
    let daprd = Daprd::start(&args.daprd, &component(backend, dir.path())?).await?;
    let dapr_client = Client::Dapr(DaprState::new(daprd.channel.clone()));

    // Idle: both just started and settled, nothing asked of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = [mib(ours_process.pid()), mib(daprd.pid())];
    let idle = idle_cpu([ours_process.pid(), daprd.pid()], args.idle_seconds).await?;

    seed(&ours_client, max_clients).await?;
    // On SQLite the one-entry-cache process has a file of its own; on
    // Postgres it reads the same tenant's rows.
    if let (Some((_, cold_client)), "sqlite") = (&cold, backend) {
        seed(cold_client, max_clients).await?;
    }
    seed(&dapr_client, max_clients).await?;
    let sides = [
        Side {
            name: "ours",
            pid: ours_process.pid(),
            client: ours_client,
            uncached: cold.as_ref().map(|(p, c)| (p.pid(), c.clone())),
        },
        Side {
            name: "dapr",
            pid: daprd.pid(),
            client: dapr_client.clone(),
            uncached: cold.as_ref().map(|_| (daprd.pid(), dapr_client.clone())),
        },
    ];

    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| args.workloads.iter().any(|n| n == w.name()))
        .collect();
    let duration = Duration::from_secs(args.seconds);
    let mut results = Results::new();
    let mut flip = false;
    for _ in 0..args.sets {
        for workload in workloads.iter().copied() {
            for &clients in &args.clients {
                let order = if flip { [1, 0] } else { [0, 1] };
                flip = !flip;
                for i in order {
                    cell(&sides[i], workload, clients, duration, &mut results).await?;
                }
            }
        }
    }
    let loaded_rss = [mib(ours_process.pid()), mib(daprd.pid())];

    println!("\n### {backend}\n");
    println!(
        "| operation | clients | ours ops/s | ours p50 / p99 (ms) | Dapr ops/s | Dapr p50 / p99 (ms) | ours / Dapr p50, p99 | CPU per op ours / Dapr (µs) |"
    );
    println!("|---|---:|---:|---|---:|---|---|---|");
    for workload in Workload::ALL {
        for &clients in &args.clients {
            let (Some(o), Some(d)) = (
                results.get(&(workload, clients, "ours")),
                results.get(&(workload, clients, "dapr")),
            ) else {
                continue;
            };
            let rate = |c: &Cell| c.latencies.count() as f64 / c.seconds;
            let cpu = |c: &Cell| c.cpu_ns as f64 / 1e3 / c.latencies.count().max(1) as f64;
            let (o50, _, o99) = o.latencies.percentiles_ms();
            let (d50, _, d99) = d.latencies.percentiles_ms();
            println!(
                "| {} | {clients} | {:.0} | {o50:.2} / {o99:.2} | {:.0} | {d50:.2} / {d99:.2} | {:.2} / {:.2} | {:.0} / {:.0} |",
                workload.label(),
                rate(o),
                rate(d),
                o50 / d50,
                o99 / d99,
                cpu(o),
                cpu(d),
            );
        }
    }
    println!(
        "\nRSS idle: ours {:.1} MiB, Dapr {:.1} MiB; after the load: ours {:.1} MiB, Dapr {:.1} MiB",
        idle_rss[0], idle_rss[1], loaded_rss[0], loaded_rss[1]
    );
    println!(
        "Idle CPU over {} s: ours {:.3} % of a core, Dapr {:.3} %",
        args.idle_seconds, idle[0], idle[1]
    );
    drop(daprd);
    drop(cold);
    drop(ours_process);
    if backend == "postgres" {
        statefabric_bench::drop_tenant(&statefabric_domain::TenantId::new(tenant)?).await?;
        let pool = sqlx::PgPool::connect(&env::pg_admin_url()).await?;
        // Dapr's rows from this run (its table lives on between runs).
        sqlx::query("DELETE FROM dapr_bench_state")
            .execute(&pool)
            .await
            .ok();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "Statefabric vs daprd ({}), {} s per cell, {} set(s), clients {:?}",
        args.daprd.display(),
        args.seconds,
        args.sets,
        args.clients
    );
    for backend in &args.backends {
        run_backend(&args, backend).await?;
    }
    Ok(())
}
