//! Locks, sessions and cached reads through the sidecar on the real Redis
//! Cluster, against the same work done with a raw Redis client in the same
//! run (so the sidecar's and our scripts' cost shows as a difference and a
//! ratio), plus how fast a write on one sidecar evicts the stale copy from
//! another sidecar's cache.
//!
//! Run against the test environment (testenv/up.sh), release build:
//!   cargo build --release -p statefabric-sidecar -p statefabric-bench
//!   target/release/redis-bench --seconds 5 --clients 16

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use redis::AsyncCommands;
use serde_json::json;
use statefabric_bench::{Latencies, Sidecar, compare, load, report};
use statefabric_lock::LockService;
use statefabric_lock::redis::RedisLocks;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::locks_client::LocksClient;
use statefabric_sdk::{MergeType, StateClient, VectorClock};
use statefabric_tests as env;
use statefabric_tests::process;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Writes timed for the cross-sidecar invalidation latency.
    #[arg(long, default_value_t = 300)]
    invalidations: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = Duration::from_secs(args.seconds);
    let n = args.clients;
    let tenant = statefabric_bench::fresh_tenant().await?;
    let vars = process::redis_vars(true);
    let mut extra = process::borrowed(&vars);
    let a = Sidecar::start(tenant.as_str(), &extra).await?;
    extra.push(("STATEFABRIC_SIDECAR__IDENTITY", "bench-b"));
    let b = Sidecar::start(tenant.as_str(), &extra).await?;
    let channel = tonic::transport::Endpoint::from_shared(a.grpc.clone())?
        .connect()
        .await?;
    let client = StateClient::from_channel(channel.clone());
    let raw = redis::cluster::ClusterClient::new(env::redis_cluster_urls())?
        .get_async_connection()
        .await?;
    println!(
        "{n} clients, {}s per scenario, Redis Cluster (3 primaries + 3 replicas), release build\n",
        args.seconds
    );

    // Locks: acquire + release (two calls) of a per-client lock.
    let locks = LocksClient::new(channel.clone());
    let lock_sidecar = load(n, d, move |c, _| {
        let mut locks = locks.clone();
        async move {
            let name = format!("bench-lock-{c}");
            let granted = locks
                .acquire(pb::AcquireRequest {
                    name: name.clone(),
                    ttl_ms: 10_000,
                    wait_ms: 0,
                })
                .await?
                .into_inner();
            let lease = granted
                .lease
                .filter(|_| granted.acquired)
                .ok_or_else(|| anyhow::anyhow!("own lock refused"))?;
            locks
                .release(pb::ReleaseRequest {
                    name,
                    token: lease.token,
                })
                .await?;
            Ok(())
        }
    })
    .await?;
    let conn = raw.clone();
    let lock_raw = load(n, d, move |c, _| {
        let mut conn = conn.clone();
        async move {
            let key = format!("{{raw-lock-{c}}}");
            let ok: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg("bench")
                .arg("NX")
                .arg("PX")
                .arg(10_000)
                .query_async(&mut conn)
                .await?;
            anyhow::ensure!(ok.is_some(), "raw lock refused");
            let _: i64 = conn.del(&key).await?;
            Ok(())
        }
    })
    .await?;
    compare("lock acquire+release (2 calls)", &lock_sidecar, &lock_raw);
    let adapter = Arc::new(RedisLocks::new(env::redis_cluster().await.conn()));
    let lock_adapter = load(n, d, {
        let tenant = tenant.clone();
        move |c, _| {
            let (adapter, tenant) = (adapter.clone(), tenant.clone());
            async move {
                let lease = adapter
                    .acquire(
                        &tenant,
                        &format!("in-process-{c}"),
                        "bench",
                        Duration::from_secs(10),
                        Duration::ZERO,
                    )
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("own lock refused"))?;
                adapter.release(&lease).await?;
                Ok(())
            }
        }
    })
    .await?;
    report(
        "lock acquire+release in-process (our scripts)",
        lock_adapter.0,
        "ops",
        Some(&lock_adapter.1),
    );

    // Sessions: put and get (sliding, so a get also extends).
    let value = "x".repeat(512);
    let sessions = client.sessions();
    let v = value.clone();
    let put_sidecar = load(n, d, move |c, i| {
        let (mut sessions, v) = (sessions.clone(), v.clone());
        async move {
            sessions
                .put("conversation", &format!("s-{c}-{}", i % 100), v, None)
                .await?;
            Ok(())
        }
    })
    .await?;
    let (conn, v) = (raw.clone(), value.clone());
    let put_raw = load(n, d, move |c, i| {
        let (mut conn, v) = (conn.clone(), v.clone());
        async move {
            let _: () = conn
                .pset_ex(format!("raw-s-{c}-{}", i % 100), v, 1_800_000)
                .await?;
            Ok(())
        }
    })
    .await?;
    compare("session put", &put_sidecar, &put_raw);
    let sessions = client.sessions();
    let get_sidecar = load(n, d, move |c, i| {
        let mut sessions = sessions.clone();
        async move {
            sessions
                .get("conversation", &format!("s-{c}-{}", i % 100))
                .await?
                .ok_or_else(|| anyhow::anyhow!("session missing"))?;
            Ok(())
        }
    })
    .await?;
    let conn = raw.clone();
    let get_raw = load(n, d, move |c, i| {
        let mut conn = conn.clone();
        async move {
            let v: Option<Vec<u8>> = conn.get(format!("raw-s-{c}-{}", i % 100)).await?;
            anyhow::ensure!(v.is_some(), "raw session missing");
            Ok(())
        }
    })
    .await?;
    compare("session get (sliding)", &get_sidecar, &get_raw);

    // Cached context reads against a raw GET of a value of the same size.
    let doc = json!({"plan": ["reproduce", "fix", "verify"], "notes": value});
    let mut ctx = client.context();
    let mut written = ctx
        .put("hot", MergeType::None, &VectorClock::new(), &doc, None)
        .await?;
    let ctx_load = client.context();
    let cached = load(n, d, move |_, _| {
        let mut ctx = ctx_load.clone();
        async move {
            ctx.get("hot")
                .await?
                .ok_or_else(|| anyhow::anyhow!("missing"))?;
            Ok(())
        }
    })
    .await?;
    let mut conn = raw.clone();
    let _: () = conn.set("raw-hot", doc.to_string()).await?;
    let cached_raw = load(n, d, move |_, _| {
        let mut conn = conn.clone();
        async move {
            let v: Option<Vec<u8>> = conn.get("raw-hot").await?;
            anyhow::ensure!(v.is_some(), "missing");
            Ok(())
        }
    })
    .await?;
    compare("context get (cached) vs raw GET", &cached, &cached_raw);

    // Invalidation: write on a, then read on b until b serves the new
    // revision. b has the old revision cached before every write.
    let mut on_b = StateClient::connect(b.grpc.clone()).await?.context();
    let (mut invalidation, mut after_write) = (Latencies::default(), Latencies::default());
    for i in 0..args.invalidations {
        let before = on_b
            .get("hot")
            .await?
            .ok_or_else(|| anyhow::anyhow!("missing on b"))?;
        anyhow::ensure!(
            before.revision == written.revision,
            "b behind before the write"
        );
        let started = Instant::now();
        written = ctx
            .put(
                "hot",
                MergeType::None,
                &written.vector,
                &json!({"i": i}),
                None,
            )
            .await?;
        let returned = Instant::now();
        loop {
            let seen = on_b.get("hot").await?.map_or(0, |d| d.revision);
            if seen >= written.revision {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(5),
                "b never saw revision {}",
                written.revision
            );
        }
        invalidation.record(started.elapsed());
        after_write.record(returned.elapsed());
    }
    report(
        "write on a -> b serves it (incl. the write)",
        args.invalidations as f64,
        "samples",
        Some(&invalidation),
    );
    report(
        "  of which after a's write returned",
        args.invalidations as f64,
        "samples",
        Some(&after_write),
    );
    println!(
        "\nsidecar a RSS {:.1} MiB, b {:.1} MiB",
        a.rss_mib(),
        b.rss_mib()
    );
    for sidecar in [a, b] {
        sidecar.stop().await?;
    }
    statefabric_bench::drop_tenant(&tenant).await?;
    Ok(())
}
