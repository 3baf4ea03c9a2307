//! The sidecar's State API under load, against the same operations done
//! in-process on Postgres by the harness (the store library, same SQL), so
//! the sidecar's overhead shows as a difference and a ratio. Also prints the
//! sidecar's resident memory idle and under load, and bytes on the wire for
//! a small change to a large document, delta versus full.
//!
//! Run against the test environment (testenv/up.sh), release build:
//!   cargo build --release -p statefabric-sidecar -p statefabric-bench
//!   target/release/sidecar-bench --seconds 5 --clients 16

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use statefabric_bench::{Sidecar, compare, load, report};
use statefabric_domain::{
    ExpectedVersion, MergeType as StoreMerge, NewEvent, StreamId, VectorClock,
};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::shared_context_client::SharedContextClient;
use statefabric_sdk::{Expected, MergeType, StateClient};
use statefabric_store::context::{ContextChange, ContextStore, ContextWrite};
use statefabric_store::pg::{PgConfig, PgEventStore};
use statefabric_store::{AppendRequest, EventStore, Scope};
use statefabric_tests as env;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let d = Duration::from_secs(args.seconds);
    let n = args.clients;
    let tenant = statefabric_bench::fresh_tenant().await?;

    let cached = Sidecar::start(tenant.as_str(), &[]).await?;
    let uncached = Sidecar::start(
        tenant.as_str(),
        &[("STATEFABRIC_SIDECAR__CACHE_MAX_ENTRIES", "1")],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = cached.rss_mib();

    let direct = Arc::new(
        PgEventStore::connect(PgConfig {
            url: env::pg_app_url(),
            max_connections: 16,
            ..PgConfig::default()
        })
        .await?,
    );
    let scope = Scope::new(tenant.clone(), "bench");
    let channel = tonic::transport::Endpoint::from_shared(cached.grpc.clone())?
        .connect()
        .await?;
    let client = StateClient::from_channel(channel.clone());
    let uncached_client = StateClient::connect(uncached.grpc.clone()).await?;

    // Documents: one hot one, and 2,000 for uncached reads.
    let doc = json!({"plan": ["reproduce", "fix", "verify"], "owner": "planner", "notes": "x".repeat(512)});
    let mut ctx = client.context();
    ctx.put("hot", MergeType::None, &VectorClock::new(), &doc, None)
        .await?;
    for i in 0..2000 {
        ctx.put(
            &format!("doc-{i}"),
            MergeType::None,
            &VectorClock::new(),
            &doc,
            None,
        )
        .await?;
    }

    println!(
        "sidecar State API: {n} concurrent clients, {}s per scenario, Postgres backend\n",
        args.seconds
    );
    let c = ctx.clone();
    let get_cached = load(n, d, move |_, _| {
        let mut c = c.clone();
        async move {
            c.get("hot")
                .await?
                .ok_or_else(|| anyhow::anyhow!("missing"))
                .map(|_| ())
        }
    })
    .await?;
    let loaded_rss = cached.rss_mib();
    let s = direct.clone();
    let t = tenant.clone();
    let get_direct = load(n, d, move |c, i| {
        let (s, t) = (s.clone(), t.clone());
        async move {
            s.get(&t, &format!("doc-{}", (c as u64 * 131 + i) % 2000))
                .await?
                .map(|_| ())
                .ok_or_else(|| anyhow::anyhow!("missing"))
        }
    })
    .await?;
    report(
        "GetContext cached via sidecar",
        get_cached.0,
        "ops",
        Some(&get_cached.1),
    );
    let u = uncached_client.context();
    let get_uncached = load(n, d, move |c, i| {
        let mut u = u.clone();
        async move {
            u.get(&format!("doc-{}", (c as u64 * 131 + i) % 2000))
                .await?
                .map(|_| ())
                .ok_or_else(|| anyhow::anyhow!("missing"))
        }
    })
    .await?;
    compare("GetContext uncached", &get_uncached, &get_direct);

    // Writes: each client its own document, writing against what it wrote last.
    let c = ctx.clone();
    let put_sidecar = load(n, d, move |client, i| {
        let mut c = c.clone();
        async move {
            let id = format!("put-s-{client}");
            let base = match c.get(&id).await? {
                Some(d) => d.vector,
                None => VectorClock::new(),
            };
            let _ = i;
            c.put(&id, MergeType::None, &base, &json!({"n": i}), None)
                .await?;
            Ok(())
        }
    })
    .await?;
    let s = direct.clone();
    let sc = scope.clone();
    let put_direct = load(n, d, move |client, i| {
        let (s, sc) = (s.clone(), sc.clone());
        async move {
            let id = format!("put-d-{client}");
            let base = s
                .get(&sc.tenant, &id)
                .await?
                .map(|d| d.vector)
                .unwrap_or_default();
            s.write(
                &sc,
                ContextWrite {
                    id,
                    merge: StoreMerge::None,
                    base,
                    change: ContextChange::Put(json!({"n": i})),
                    idempotency: None,
                    fence: None,
                    known: None,
                },
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    compare("PutContext (read + write)", &put_sidecar, &put_direct);

    let c = ctx.clone();
    let patch_sidecar = load(n, d, move |client, i| {
        let mut c = c.clone();
        async move {
            let id = format!("put-s-{client}");
            let base = c.get(&id).await?.map(|d| d.vector).unwrap_or_default();
            c.patch(
                &id,
                &base,
                &json!([{"op": "replace", "path": "/n", "value": i}]),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let s = direct.clone();
    let sc = scope.clone();
    let patch_direct = load(n, d, move |client, i| {
        let (s, sc) = (s.clone(), sc.clone());
        async move {
            let id = format!("put-d-{client}");
            let base = s
                .get(&sc.tenant, &id)
                .await?
                .map(|d| d.vector)
                .unwrap_or_default();
            let patch =
                serde_json::from_value(json!([{"op": "replace", "path": "/n", "value": i}]))?;
            s.write(
                &sc,
                ContextWrite {
                    id,
                    merge: StoreMerge::None,
                    base,
                    change: ContextChange::Patch(patch),
                    idempotency: None,
                    fence: None,
                    known: None,
                },
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    compare("PatchContext (read + patch)", &patch_sidecar, &patch_direct);

    let cl = client.clone();
    let append_sidecar = load(n, d, move |client, i| {
        let mut cl = cl.clone();
        async move {
            cl.append(
                &format!("s-{client}-{i}"),
                "task",
                Expected::NoStream,
                vec![statefabric_sdk::NewEvent::json(
                    "Happened",
                    &json!({"i": i}),
                )?],
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let s = direct.clone();
    let sc = scope.clone();
    let append_direct = load(n, d, move |client, i| {
        let (s, sc) = (s.clone(), sc.clone());
        async move {
            let req = AppendRequest::new(
                StreamId::new(format!("d-{client}-{i}"))?,
                "task",
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Happened", json!({"i": i}))],
            );
            EventStore::append(s.as_ref(), &sc, req).await?;
            Ok(())
        }
    })
    .await?;
    compare("AppendEvents (1 event)", &append_sidecar, &append_direct);

    // Bytes on the wire for a one-field change to a large document.
    let large: serde_json::Map<String, serde_json::Value> = (0..5000)
        .map(|i| {
            (
                format!("src/file_{i}.rs"),
                json!({"owner": "coder", "lines": i, "status": "clean"}),
            )
        })
        .collect();
    let w = ctx
        .put(
            "large",
            MergeType::None,
            &VectorClock::new(),
            &json!({"files": large}),
            None,
        )
        .await?;
    ctx.patch(
        "large",
        &w.vector,
        &json!([{"op": "replace", "path": "/files/src~1file_7.rs/status", "value": "dirty"}]),
    )
    .await?;
    let mut raw = SharedContextClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let full = raw
        .get_context(pb::GetContextRequest {
            document_id: "large".into(),
            known_revision: 0,
        })
        .await?
        .into_inner();
    let delta = raw
        .get_context(pb::GetContextRequest {
            document_id: "large".into(),
            known_revision: w.revision,
        })
        .await?
        .into_inner();
    use prost::Message;
    println!(
        "\nGetContext of a {} KiB document after a one-field change: full {} B, delta {} B ({:.0}x smaller)",
        full.encoded_len() / 1024,
        full.encoded_len(),
        delta.encoded_len(),
        full.encoded_len() as f64 / delta.encoded_len().max(1) as f64
    );
    println!(
        "sidecar resident memory: idle {idle_rss:.1} MiB, after cached-read load {loaded_rss:.1} MiB, now {:.1} MiB",
        cached.rss_mib()
    );
    for sidecar in [uncached, cached] {
        sidecar.stop().await?;
    }
    statefabric_bench::drop_tenant(&tenant).await?;
    Ok(())
}
