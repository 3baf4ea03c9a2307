//! Assembles the sidecar, in order: open storage ([`open_storage`]) → the
//! building blocks (`backends`) → the background jobs (`jobs`) → the
//! services (`services::build`) → what the mesh configuration changes and
//! the egress listener → the State API server (`services::serve`) → the
//! work of a clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_runtime::ServiceContext;
use statefabric_saga_store::TaskQueue;
use statefabric_saga_store::pg::PgTaskQueue;
use statefabric_saga_store::sqlite::SqliteSagaStore;
use statefabric_store::EventStore;
use statefabric_store::context::ContextStore;
use statefabric_store::pg::PgEventStore;
use statefabric_store::sqlite::SqliteEventStore;

use crate::cache::ContextCache;

use crate::backends;
use crate::config::{Backend, SidecarConfig, TaskTransport};
use crate::{jobs, services};
#[cfg(feature = "kafka")]
use statefabric_saga_kafka::KafkaTaskQueue;
#[cfg(feature = "kafka")]
use statefabric_schema::{AvroCodec, RegistryClient};

/// The storage ports the sidecar serves from, on one backend.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The event store.
    pub events: Arc<dyn EventStore>,
    /// The shared-context store.
    pub context: Arc<dyn ContextStore>,
    /// Where to LISTEN for other sidecars' context changes (Postgres only;
    /// the embedded store has no other writers).
    pub notifications: Option<String>,
    /// Saga tasks for this tenant's agents.
    pub tasks: Arc<dyn TaskQueue>,
    /// The embedded saga store behind `tasks` (SQLite only), for an engine
    /// in the same process (`fabric dev`): it must be this very store, whose
    /// in-process signals connect the engine and the task API.
    pub sagas: Option<SqliteSagaStore>,
    /// Recorded upstream responses of the egress path.
    pub replays: Arc<dyn statefabric_store::replay::ReplayStore>,
    /// The audit log of lock and session mutations.
    pub audit: Arc<dyn statefabric_store::audit::AuditLog>,
}

/// Opens the configured storage, applying migrations where this process is
/// allowed to.
pub async fn open_storage(ctx: &ServiceContext<SidecarConfig>) -> anyhow::Result<Storage> {
    let config = &ctx.config;
    let tenant = config.tenant()?;
    match config.storage.backend {
        Backend::Sqlite => {
            let store = SqliteEventStore::open(config.storage.sqlite.clone())
                .await
                .with_context(|| format!("opening {}", config.storage.sqlite.path.display()))?;
            // Embedded mode is single-node and single-operator: the configured
            // tenant is registered on first start.
            store.create_tenant(&tenant, "").await?;
            let sagas = SqliteSagaStore::new(store.writer_pool().clone(), store.reader().clone());
            // One process owns the file: claims from before a restart are
            // held by workers that are gone, so their tasks are offered again.
            let released = sagas.release(&tenant, None).await?;
            if released > 0 {
                tracing::info!(released, "offered tasks claimed before the restart again");
            }
            Ok(Storage {
                events: Arc::new(store.clone()),
                replays: Arc::new(store.clone()),
                audit: Arc::new(store.clone()),
                context: Arc::new(store),
                notifications: None,
                tasks: Arc::new(sagas.clone()),
                sagas: Some(sagas),
            })
        }
        Backend::Postgres => {
            if let Some(owner) = &config.storage.postgres_migrate_url {
                statefabric_db::pg::migrate(owner)
                    .await
                    .context("applying Postgres migrations")?;
                statefabric_db::pg::create_tenant(owner, &tenant, "").await?;
            }
            // A sidecar acts for its one tenant: its connections start so.
            let store = PgEventStore::connect_for(config.storage.postgres.clone(), &tenant)
                .await
                .context("connecting to Postgres")?;
            ctx.register_metrics(|registry| store.register_metrics(registry));
            let tasks = PgTaskQueue::connect(
                &config.storage.postgres.url,
                tenant.as_str(),
                config.sidecar.task_connections,
            )
            .await
            .context("connecting the task queue to Postgres")?;
            ctx.shutdown.spawn(tasks.listen(ctx.shutdown.token()));
            let tasks: Arc<dyn TaskQueue> = match config.tasks.transport {
                TaskTransport::Tables => Arc::new(tasks),
                #[cfg(not(feature = "kafka"))]
                TaskTransport::Kafka => {
                    anyhow::bail!(
                        "tasks.transport = kafka, but this sidecar was built without Kafka (feature `kafka`)"
                    )
                }
                #[cfg(feature = "kafka")]
                TaskTransport::Kafka => {
                    let t = &config.tasks;
                    let registry = Arc::new(RegistryClient::new(&t.registry_url, t.timeout));
                    Arc::new(KafkaTaskQueue::new(
                        Arc::new(tasks),
                        &statefabric_kafka::brokers::Brokers::new(
                            &t.kafka_bootstrap,
                            config.kafka.clone(),
                        ),
                        Arc::new(AvroCodec::new(registry)),
                        t.buffer,
                        t.timeout,
                        ctx.shutdown.token(),
                    )?)
                }
            };
            Ok(Storage {
                events: Arc::new(store.clone()),
                replays: Arc::new(store.clone()),
                audit: Arc::new(store.clone()),
                context: Arc::new(store),
                notifications: Some(config.storage.postgres.url.clone()),
                tasks,
                sagas: None,
            })
        }
    }
}

/// Runs the sidecar until shutdown is requested.
pub async fn serve(ctx: ServiceContext<SidecarConfig>) -> anyhow::Result<()> {
    // Not ready while storage opens (migrations can take a while); the
    // check is set once the API listens.
    let _opening = ctx.readiness.check("state_api");
    let storage = open_storage(&ctx).await?;
    serve_with(ctx, storage).await
}

/// Runs the sidecar over storage opened by the caller (the embedded
/// all-in-one shares its saga store with the control plane this way).
pub async fn serve_with(
    ctx: ServiceContext<SidecarConfig>,
    storage: Storage,
) -> anyhow::Result<()> {
    // Registered before the (possibly slow) start-up.
    let checks = jobs::Checks::register(&ctx);
    let config = &ctx.config;
    // The ids, parsed once (validated when the config was loaded).
    let ids = services::Ids {
        tenant: config.tenant()?,
        identity: config.identity()?,
    };
    // Storage is open; then the building blocks, the background jobs, the
    // services, what the mesh configuration changes, and the server.
    let backends = backends::open(&ctx).await?;
    backends::count_live_sessions(&ctx, backends.sessions.clone());
    let cache = Arc::new(ContextCache::new(
        config.sidecar.cache_max_entries,
        config.sidecar.cache_max_bytes,
        config.sidecar.cache_max_age,
    ));
    ctx.register_metrics(|registry| cache.register_metrics(registry));
    let shared = jobs::Shared {
        cache,
        changes: tokio::sync::broadcast::channel(1024).0,
        retention: config.updates.retention(),
    };
    let api_ready = checks.api.clone();
    jobs::start(&ctx, &storage, &backends, &shared, &ids.tenant, checks);
    let services = services::build(&ctx, &storage, &backends, &shared, &ids);
    let egress = start_egress(&ctx, storage.replays.clone()).await?;
    if config.mesh.enabled || !config.mesh.files.is_empty() {
        crate::mesh::start(
            &ctx,
            crate::mesh::Hot {
                sessions: services.session_policies.clone(),
                cache: shared.cache.clone(),
                locks: services.lock_limits.clone(),
                log_filter: ctx.log_filter.clone(),
                redis: backends.redis.clone(),
                link: Arc::new(arc_swap::ArcSwap::from_pointee(
                    crate::mesh::LinkSettings::configured(&config.mesh),
                )),
                egress,
            },
        )?;
    }
    services::serve(&ctx, &services, api_ready).await?;
    // Let go of held locks now rather than make others wait out the leases,
    // and offer unanswered tasks to other workers.
    services.locks.release_all().await;
    services.tasks.release_unanswered().await;
    // The audit entries still queued, those of the releases included.
    services.audit.flush(Duration::from_secs(5)).await;
    Ok(())
}

/// Binds the egress listener and serves it until shutdown; the routes come
/// from the mesh configuration (none until it arrives). `None` when
/// `egress.enabled` is off.
async fn start_egress(
    ctx: &ServiceContext<SidecarConfig>,
    replays: Arc<dyn statefabric_store::replay::ReplayStore>,
) -> anyhow::Result<Option<(Arc<crate::egress::Egress>, crate::egress::routes::Defaults)>> {
    let config = &ctx.config.egress;
    if !config.enabled {
        return Ok(None);
    }
    let tls = crate::egress::tls_config(config.ca_file.as_deref())?;
    let metrics = crate::egress::EgressMetrics::default();
    ctx.register_metrics(|registry| metrics.register(registry));
    let egress = Arc::new(crate::egress::Egress::new(
        tls,
        config.max_retry_body_bytes,
        metrics,
        Some(crate::egress::Replay {
            store: replays,
            tenant: ctx.config.tenant()?,
            ttl: config.replay_ttl,
            max_body: config.max_replay_body_bytes,
        }),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding egress.listen {}", config.listen))?;
    tracing::info!(listen = %config.listen, "egress listening");
    let stop = ctx.shutdown.token();
    let serving = egress.clone();
    ctx.shutdown.spawn(async move {
        if let Err(err) = crate::egress::serve(listener, serving, stop).await {
            tracing::error!(error = %err, "egress listener failed");
        }
    });
    let defaults = crate::egress::routes::Defaults {
        connect: config.connect_timeout,
        total: config.total_timeout,
        idle: config.idle_timeout,
    };
    Ok(Some((egress, defaults)))
}
