//! `statefabric-control-plane`: runs sagas and distributes mesh configuration
//! (several replicas, one leader).
//!
//! Owns the process: leader election (a lease in Postgres or a Kubernetes
//! Lease, with a fencing epoch in Postgres, or alone in the embedded mode), the saga engine on the leader
//! ([`sagas`], from `statefabric-saga-engine`), the operator API and the
//! saga page ([`api`], [`ui`]), the outbox relay on the leader when
//! `[relay] enabled`, consumer-lag monitoring, mesh configuration for the
//! sidecars when `[mesh] enabled` ([`mesh`]: watching the `statefabric.io`
//! resources and the Secrets Upstreams name, streaming each sidecar its
//! configuration, writing the resources' status), and the admin endpoints. It
//! does not own how sagas move (`statefabric-saga`) or persist
//! (`statefabric-saga-engine`). See `docs/architecture.md`.
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod grpc;
mod kafka;
pub mod mesh;
pub mod operator;
pub mod sagas;
mod ui;

use std::sync::Arc;

use anyhow::Context;
use statefabric_leader::kube::KubeElector;
use statefabric_leader::pg::PgElector;
use statefabric_leader::{Elector, LeaseSettings, Solo};
use statefabric_runtime::ServiceContext;

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

/// The Lease's namespace: configured, else the pod's own (its
/// ServiceAccount mount), else `default`.
fn lease_namespace(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|n| n.trim().to_owned())
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Runs the control plane until shutdown is requested.
pub async fn serve(ctx: ServiceContext<ControlPlaneConfig>) -> anyhow::Result<()> {
    let leader = &ctx.config.leader;
    let backend_ready = ctx.readiness.check("leader_election");
    let mut pool = None;
    let replica = identity(&leader.identity);
    let elector: Arc<dyn Elector> = match leader.backend {
        LeaderBackend::Solo => Arc::new(Solo),
        LeaderBackend::Postgres | LeaderBackend::Kubernetes => {
            if let Some(owner) = &leader.postgres_migrate_url {
                statefabric_db::pg::migrate(owner)
                    .await
                    .context("applying Postgres migrations")?;
            }
            let mut options = statefabric_db::pg::PoolOptions::new(&leader.postgres_url, 4);
            options.min_connections = 0;
            options.acquire_timeout = leader.ttl / 2;
            let connected = statefabric_db::pg::connect(&options)
                .await
                .context("connecting to Postgres (leader.postgres_url)")?;
            tracing::info!(identity = %replica, lease = %leader.name, "electing");
            ctx.register_metrics(|registry| {
                statefabric_db::pg::register_pool_metrics(registry, "leader", connected.clone());
            });
            pool = Some(connected.clone());
            let fence = PgElector::new(connected, &leader.name, &replica);
            if leader.backend == LeaderBackend::Kubernetes {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
                let namespace = lease_namespace(&leader.kubernetes_namespace);
                tracing::info!(%namespace, "electing on a Kubernetes Lease");
                Arc::new(KubeElector::new(client, &namespace, fence))
            } else {
                Arc::new(fence)
            }
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
    let mut saga_store = None;
    let mut engine = None;
    if ctx.config.sagas.enabled {
        let store = sagas::open_store(&ctx, &ctx.config.sagas, leader).await?;
        engine = Some(
            sagas::run(
                &ctx,
                store.clone(),
                leadership.clone(),
                &ctx.config.sagas,
                &ctx.config.api,
                &leader.name,
            )
            .await?,
        );
        saga_store = Some(store);
    }
    // Subscribers of every replica, for the leader's status writes.
    let directory = match &pool {
        Some(pool) => mesh::directory::Directory::postgres(pool.clone(), &leader.name, &replica),
        None => mesh::directory::Directory::solo(),
    };
    kafka::start(&ctx, pool, &leadership, saga_store)?;
    if ctx.config.mesh.enabled {
        mesh::start(&ctx, leadership.clone(), directory, engine).await?;
    }
    ctx.shutdown.requested().await;
    // The task releases the lease when the token is cancelled.
    task.await.context("leader election task failed")?;
    Ok(())
}
