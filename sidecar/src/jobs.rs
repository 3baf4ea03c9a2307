//! The sidecar's background jobs, started in one place: the context
//! cache's followers (other sidecars' changes, by Redis announcements or
//! Postgres notifications, and the update stream), the readiness probe of
//! storage and Redis, and the idempotency-key janitor. Each stops with the
//! process.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_runtime::ServiceContext;
use statefabric_runtime::admin::ReadinessCheck;
use statefabric_store::run_idempotency_janitor;
use statefabric_updates::Retention;

use crate::backends::Backends;
use crate::cache::ContextCache;
use crate::config::{Backend, RedisBackend, SidecarConfig};
use crate::follow::{self, ChangeFeed, StreamFollow};
use crate::server::Storage;

/// How often storage (and Redis) is pinged for readiness.
const READINESS_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often expired idempotency keys are deleted.
const JANITOR_INTERVAL: Duration = Duration::from_secs(600);

/// The readiness checks the start-up registers before anything slow, so
/// the process reports not ready until storage answers and the API
/// listens.
pub(crate) struct Checks {
    pub storage: ReadinessCheck,
    pub api: ReadinessCheck,
    /// Only when other sidecars' changes arrive from outside.
    pub changes: Option<ReadinessCheck>,
    pub redis: Option<ReadinessCheck>,
}

impl Checks {
    pub(crate) fn register(ctx: &ServiceContext<SidecarConfig>) -> Self {
        let config = &ctx.config;
        let outside = config.updates.backend == RedisBackend::Redis
            || config.storage.backend == Backend::Postgres;
        Self {
            storage: ctx.readiness.check("storage"),
            api: ctx.readiness.check("state_api"),
            changes: outside.then(|| ctx.readiness.check("context_changes")),
            redis: config.uses_redis().then(|| ctx.readiness.check("redis")),
        }
    }
}

/// What the jobs share with the services: the context cache and the feed
/// of this tenant's document changes.
pub(crate) struct Shared {
    pub cache: Arc<ContextCache>,
    pub changes: ChangeFeed,
    pub retention: Retention,
}

/// Starts every background job.
pub(crate) fn start(
    ctx: &ServiceContext<SidecarConfig>,
    storage: &Storage,
    backends: &Backends,
    shared: &Shared,
    tenant: &TenantId,
    checks: Checks,
) {
    let config = &ctx.config;
    let Checks {
        storage: storage_ready,
        changes: changes_ready,
        redis: redis_ready,
        ..
    } = checks;
    let redis_updates = config.updates.backend == RedisBackend::Redis;
    match (redis_updates, storage.notifications.clone(), changes_ready) {
        (true, _, Some(ready)) => {
            ctx.shutdown.spawn(follow::follow_announcements(
                backends.notifier.clone(),
                tenant.clone(),
                config.sidecar.identity.clone(),
                shared.cache.clone(),
                ready,
                ctx.shutdown.clone(),
            ));
        }
        (false, Some(url), Some(ready)) => {
            ctx.shutdown.spawn(follow::follow_postgres(
                url,
                config.sidecar.tenant.clone(),
                shared.cache.clone(),
                shared.changes.clone(),
                ready,
                ctx.shutdown.clone(),
            ));
        }
        _ => {}
    }
    ctx.shutdown.spawn(follow::follow_update_stream(
        StreamFollow {
            log: backends.log.clone(),
            cache: shared.cache.clone(),
            tenant: tenant.clone(),
            identity: config.sidecar.identity.clone(),
            retention: shared.retention,
            claim_after: config.updates.claim_after,
        },
        shared.changes.clone(),
        ctx.shutdown.clone(),
    ));
    ctx.shutdown.spawn({
        let store = storage.events.clone();
        let redis = backends.redis.clone();
        let shutdown = ctx.shutdown.clone();
        async move {
            loop {
                let ok = store.ping().await.is_ok();
                storage_ready.set(ok);
                if let (Some(redis), Some(ready)) = (&redis, &redis_ready) {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut redis.conn()).await;
                    ready.set(pong.is_ok());
                }
                tokio::select! {
                    () = shutdown.requested() => return,
                    () = tokio::time::sleep(READINESS_PROBE_INTERVAL) => {}
                }
            }
        }
    });
    ctx.shutdown.spawn(run_idempotency_janitor(
        storage.events.clone(),
        JANITOR_INTERVAL,
        ctx.shutdown.token().cancelled_owned(),
    ));
}
