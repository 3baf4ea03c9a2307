//! `statefabric-control-plane`: runs sagas and distributes mesh configuration
//! (several replicas, one leader).
//!
//! Owns the process: leader election (a lease in Postgres with a fencing
//! epoch, or alone in the embedded mode), the saga engine on the leader
//! ([`sagas`], from `statefabric-saga-engine`), the operator API and the
//! saga page ([`api`], [`ui`]), the outbox relay on the leader when
//! `[relay] enabled`, consumer-lag monitoring, and the admin endpoints. It
//! does not own how sagas move (`statefabric-saga`) or persist
//! (`statefabric-saga-engine`). See `docs/architecture.md`.

pub mod api;
pub mod config;
pub mod grpc;
pub mod operator;
pub mod sagas;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_kafka::lag::{LagMonitor, topics};
use statefabric_kafka::relay::{Relay, RelaySettings};
use statefabric_kafka::saga_transport::ReplyConsumer;
use statefabric_leader::pg::PgElector;
use statefabric_leader::{Elector, LeaseSettings, Solo};
use statefabric_runtime::ServiceContext;
use statefabric_schema::{AvroCodec, RegistryClient};

pub use crate::config::ControlPlaneConfig;
use crate::config::LeaderBackend;

fn identity(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "control-plane".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// Runs the control plane until shutdown is requested.
pub async fn serve(ctx: ServiceContext<ControlPlaneConfig>) -> anyhow::Result<()> {
    let leader = &ctx.config.leader;
    let backend_ready = ctx.readiness.check("leader_election");
    let mut pool = None;
    let elector: Arc<dyn Elector> = match leader.backend {
        LeaderBackend::Solo => Arc::new(Solo),
        LeaderBackend::Postgres => {
            if let Some(owner) = &leader.postgres_migrate_url {
                statefabric_store::pg::migrate(owner)
                    .await
                    .context("applying Postgres migrations")?;
            }
            let connected = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(leader.renew_every)
                .connect(&leader.postgres_url)
                .await
                .context("connecting to Postgres (leader.postgres_url)")?;
            let id = identity(&leader.identity);
            tracing::info!(identity = %id, lease = %leader.name, "electing");
            pool = Some(connected.clone());
            Arc::new(PgElector::new(connected, &leader.name, &id))
        }
    };
    backend_ready.set(true);
    let settings = LeaseSettings {
        ttl: leader.ttl,
        renew_every: leader.renew_every,
    };
    let mut kept = None;
    ctx.register_metrics(|registry| {
        kept = Some(statefabric_leader::keep(
            elector,
            settings,
            Some(registry),
            ctx.shutdown.token(),
        ));
    });
    let (leadership, task) = kept.context("leader election did not start")?;
    if ctx.config.sagas.enabled {
        let store = sagas::open_store(&ctx, &ctx.config.sagas, leader).await?;
        sagas::run(
            &ctx,
            store.clone(),
            leadership.clone(),
            &ctx.config.sagas,
            &ctx.config.api,
            &leader.name,
        )
        .await?;
        if ctx.config.sagas.transport == config::SagaTransport::Kafka {
            let relay = &ctx.config.relay;
            let registry = Arc::new(RegistryClient::new(&relay.registry_url, relay.timeout));
            let replies = ReplyConsumer {
                bootstrap: relay.kafka_bootstrap.clone(),
                codec: Arc::new(AvroCodec::new(registry)),
                store,
                topics: relay.topics,
                timeout: relay.timeout,
            };
            ctx.shutdown
                .spawn(replies.run(leadership.clone(), ctx.shutdown.token()));
        }
    }
    let relay = &ctx.config.relay;
    if relay.enabled {
        let pool = pool.context("the relay needs the Postgres leader backend")?;
        let registry = Arc::new(RegistryClient::new(&relay.registry_url, relay.timeout));
        let relay = Relay::new(
            RelaySettings {
                bootstrap: relay.kafka_bootstrap.clone(),
                transactional_id: relay.transactional_id.clone(),
                lease: leader.name.clone(),
                batch: relay.batch,
                idle_poll: relay.idle_poll,
                kafka_timeout: relay.timeout,
                topics: relay.topics,
            },
            pool,
            Arc::new(AvroCodec::new(registry)),
        );
        ctx.register_metrics(|registry| relay.register_metrics(registry));
        ctx.shutdown
            .spawn(relay.run(leadership.clone(), ctx.shutdown.token()));
    }
    let lag = &ctx.config.lag;
    if !lag.groups.is_empty() {
        let monitor = LagMonitor::new(
            &lag.kafka_bootstrap,
            lag.groups
                .iter()
                .map(|(group, list)| (group.clone(), topics(list)))
                .collect(),
            Duration::from_secs(10),
        );
        ctx.register_metrics(|registry| monitor.register_metrics(registry));
        ctx.shutdown
            .spawn(monitor.run(lag.interval, ctx.shutdown.token()));
    }
    ctx.shutdown.requested().await;
    // The task releases the lease when the token is cancelled.
    task.await.context("leader election task failed")?;
    Ok(())
}
