//! Opens the building blocks that run either in-process (embedded) or on
//! Redis — locks, sessions, change announcements and update streams — as
//! configured, plus the Redis metrics they share.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use statefabric_lock::LockService;
use statefabric_lock::memory::MemoryLocks;
use statefabric_lock::redis::RedisLocks;
use statefabric_redis::Redis;
use statefabric_redis::monitor::MemoryGauges;
use statefabric_runtime::ServiceContext;
use statefabric_session::SessionStore;
use statefabric_session::memory::MemorySessions;
use statefabric_session::redis::RedisSessions;
use statefabric_updates::memory::{MemoryNotifier, MemoryUpdateLog};
use statefabric_updates::redis::{RedisNotifier, RedisUpdateLog};
use statefabric_updates::{Notifier, UpdateLog};

use crate::config::{RedisBackend, SidecarConfig};

/// How often each Redis node's memory is read.
const MEMORY_POLL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub(crate) struct Backends {
    pub locks: Arc<dyn LockService>,
    pub sessions: Arc<dyn SessionStore>,
    pub notifier: Arc<dyn Notifier>,
    pub log: Arc<dyn UpdateLog>,
    /// Set when any block uses Redis.
    pub redis: Option<Redis>,
}

pub(crate) async fn open(ctx: &ServiceContext<SidecarConfig>) -> anyhow::Result<Backends> {
    let config = &ctx.config;
    let redis = if config.uses_redis() {
        let redis = Redis::connect(&config.redis)
            .await
            .context("opening Redis (redis.urls)")?;
        ctx.register_metrics(|registry| redis.register_metrics(registry));
        let gauges = MemoryGauges::default();
        ctx.register_metrics(|registry| gauges.register(registry));
        ctx.shutdown
            .spawn(gauges.run(config.redis.url_list(), MEMORY_POLL, ctx.shutdown.token()));
        Some(redis)
    } else {
        None
    };
    let on_redis = |backend: RedisBackend| match (backend, &redis) {
        (RedisBackend::Redis, Some(redis)) => Some(redis.clone()),
        _ => None,
    };
    let locks: Arc<dyn LockService> = match on_redis(config.locks.backend) {
        Some(redis) => Arc::new(RedisLocks::new(redis.conn())),
        None => Arc::new(MemoryLocks::default()),
    };
    let max_value = config.sessions.max_value_bytes;
    let sessions: Arc<dyn SessionStore> = match on_redis(config.sessions.backend) {
        Some(redis) => Arc::new(RedisSessions::new(redis.conn()).with_max_value(max_value)),
        None => Arc::new(MemorySessions::default().with_max_value(max_value)),
    };
    let (notifier, log): (Arc<dyn Notifier>, Arc<dyn UpdateLog>) =
        match on_redis(config.updates.backend) {
            Some(redis) => (
                Arc::new(RedisNotifier::new(redis.clone())),
                Arc::new(
                    RedisUpdateLog::connect(&redis)
                        .await
                        .context("opening the update stream connection")?,
                ),
            ),
            None => (
                Arc::new(MemoryNotifier::default()),
                Arc::new(MemoryUpdateLog::default()),
            ),
        };
    Ok(Backends {
        locks,
        sessions,
        notifier,
        log,
        redis,
    })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// Exports `sessions_live{namespace}` for this sidecar's tenant, refreshed
/// every `sessions.metrics_interval`.
pub(crate) fn count_live_sessions(
    ctx: &ServiceContext<SidecarConfig>,
    sessions: Arc<dyn SessionStore>,
) {
    let gauge = Family::<NamespaceLabel, Gauge>::default();
    ctx.register_metrics(|registry| {
        registry.register(
            "sessions_live",
            "Sessions of this sidecar's tenant that have not expired, per namespace",
            gauge.clone(),
        );
    });
    let Ok(tenant) = ctx.config.tenant() else {
        return;
    };
    let namespaces: Vec<String> = ctx.config.sessions.namespaces.keys().cloned().collect();
    let interval = ctx.config.sessions.metrics_interval;
    let shutdown = ctx.shutdown.clone();
    ctx.shutdown.spawn(async move {
        loop {
            for namespace in &namespaces {
                match sessions.live(&tenant, namespace).await {
                    Ok(n) => {
                        gauge
                            .get_or_create(&NamespaceLabel {
                                namespace: namespace.clone(),
                            })
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    Err(err) => tracing::debug!(%namespace, error = %err, "cannot count sessions"),
                }
            }
            tokio::select! {
                () = shutdown.requested() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    });
}
