//! Assembles the sidecar: storage, the gRPC server (State API, health,
//! reflection), readiness and background jobs, and their shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_proto::state::v1::events_server::EventsServer;
use statefabric_proto::state::v1::locks_server::LocksServer;
use statefabric_proto::state::v1::sessions_server::SessionsServer;
use statefabric_proto::state::v1::shared_context_server::SharedContextServer;
use statefabric_proto::state::v1::tasks_server::TasksServer;
use statefabric_runtime::ServiceContext;
use statefabric_saga_engine::TaskQueue;
use statefabric_saga_engine::store::pg::PgTaskQueue;
use statefabric_saga_engine::store::sqlite::SqliteSagaStore;
use statefabric_store::context::ContextStore;
use statefabric_store::pg::{self, PgEventStore};
use statefabric_store::sqlite::SqliteEventStore;
use statefabric_store::{EventStore, run_idempotency_janitor};

use crate::cache::ContextCache;
use statefabric_updates::Retention;

use crate::backends;
use crate::config::{Backend, RedisBackend, SidecarConfig, TaskTransport};
use crate::context::ContextService;
use crate::events::{EventsService, SubscriptionSettings};
use crate::follow::{self, Publisher, StreamFollow};
use crate::locks::{LockLimits, LocksService};
use crate::sessions::{SessionPolicies, SessionsService};
use crate::tasks::TasksService;
#[cfg(feature = "kafka")]
use statefabric_kafka::saga_transport::KafkaTaskQueue;
#[cfg(feature = "kafka")]
use statefabric_schema::{AvroCodec, RegistryClient};

/// How often readiness re-checks storage.
const READINESS_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often expired idempotency keys are purged.
const JANITOR_INTERVAL: Duration = Duration::from_secs(600);

/// The storage ports the sidecar serves from, on one backend.
#[derive(Debug, Clone)]
pub struct Storage {
    pub events: Arc<dyn EventStore>,
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
            let released = sagas.release(tenant.as_str(), None).await?;
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
                pg::migrate(owner)
                    .await
                    .context("applying Postgres migrations")?;
                pg::create_tenant(owner, &tenant, "").await?;
            }
            let store = PgEventStore::connect(config.storage.postgres.clone())
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
    // Registered before the (possibly slow) start-up, so the process reports
    // not ready until storage answers and the API is listening.
    let storage_ready = ctx.readiness.check("storage");
    let api_ready = ctx.readiness.check("state_api");
    let redis_updates = ctx.config.updates.backend == RedisBackend::Redis;
    // Only meaningful when other sidecars' changes arrive from outside.
    let changes_ready = (redis_updates || ctx.config.storage.backend == Backend::Postgres)
        .then(|| ctx.readiness.check("context_changes"));
    let redis_ready = ctx
        .config
        .uses_redis()
        .then(|| ctx.readiness.check("redis"));
    let backends = backends::open(&ctx).await?;
    backends::count_live_sessions(&ctx, backends.sessions.clone());
    let store = storage.events.clone();
    let config = &ctx.config;
    // The ids, parsed once (validated when the config was loaded).
    let tenant = config.tenant()?;
    let identity = config.identity()?;
    let cache = Arc::new(ContextCache::new(
        config.sidecar.cache_max_entries,
        config.sidecar.cache_max_bytes,
        config.sidecar.cache_max_age,
    ));
    ctx.register_metrics(|registry| cache.register_metrics(registry));
    let (changes, _) = tokio::sync::broadcast::channel(1024);
    let retention = Retention {
        max_len: config.updates.max_len,
        max_age: config.updates.max_age,
    };
    match (redis_updates, storage.notifications.clone(), changes_ready) {
        (true, _, Some(ready)) => {
            ctx.shutdown.spawn(follow::follow_announcements(
                backends.notifier.clone(),
                tenant.clone(),
                config.sidecar.identity.clone(),
                cache.clone(),
                ready,
                ctx.shutdown.clone(),
            ));
        }
        (false, Some(url), Some(ready)) => {
            ctx.shutdown.spawn(follow::follow_postgres(
                url,
                config.sidecar.tenant.clone(),
                cache.clone(),
                changes.clone(),
                ready,
                ctx.shutdown.clone(),
            ));
        }
        _ => {}
    }
    ctx.shutdown.spawn(follow::follow_update_stream(
        StreamFollow {
            log: backends.log.clone(),
            cache: cache.clone(),
            tenant: tenant.clone(),
            identity: config.sidecar.identity.clone(),
            retention,
            claim_after: config.updates.claim_after,
        },
        changes.clone(),
        ctx.shutdown.clone(),
    ));

    ctx.shutdown.spawn({
        let store = store.clone();
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
        store.clone(),
        JANITOR_INTERVAL,
        ctx.shutdown.token().cancelled_owned(),
    ));

    let events = EventsService::new(
        store,
        tenant.clone(),
        identity.clone(),
        SubscriptionSettings {
            buffer: config.sidecar.subscription_buffer,
            lag_timeout: config.sidecar.subscriber_lag_timeout,
        },
        ctx.shutdown.clone(),
    );
    let mesh_cache = cache.clone();
    let context = ContextService::new(
        storage.context,
        tenant.clone(),
        identity.to_string(),
        cache,
        changes,
        Publisher {
            notifier: backends.notifier.clone(),
            log: backends.log.clone(),
            tenant: tenant.clone(),
            identity: config.sidecar.identity.clone(),
            retention,
        },
        ctx.shutdown.clone(),
    );
    let audit_dropped = prometheus_client::metrics::counter::Counter::default();
    {
        let dropped = audit_dropped.clone();
        ctx.register_metrics(|registry| {
            registry.register(
                "audit_dropped",
                "Audit entries of lock and session mutations dropped because the queue to the database was full",
                dropped,
            );
        });
    }
    let audit = crate::audit::Auditor::start(
        storage.audit.clone(),
        tenant.clone(),
        identity.to_string(),
        audit_dropped,
    );
    let lock_limits = LockLimits::default();
    let locks = LocksService::new(
        backends.locks.clone(),
        tenant.clone(),
        identity.to_string(),
        lock_limits.clone(),
        audit.clone(),
    );
    let session_policies = SessionPolicies::new(config.sessions.namespaces.clone());
    let egress = start_egress(&ctx, storage.replays.clone()).await?;
    if config.mesh.enabled || !config.mesh.files.is_empty() {
        crate::mesh::start(
            &ctx,
            crate::mesh::Hot {
                sessions: session_policies.clone(),
                cache: mesh_cache,
                locks: lock_limits,
                log_filter: ctx.log_filter.clone(),
                redis: backends.redis.clone(),
                link: Arc::new(arc_swap::ArcSwap::from_pointee(
                    crate::mesh::LinkSettings::configured(&config.mesh),
                )),
                egress,
            },
        )?;
    }
    let sessions = SessionsService::new(
        backends.sessions.clone(),
        tenant.clone(),
        config.sidecar.identity.clone(),
        session_policies,
        backends.notifier.clone(),
        audit.clone(),
    );
    let tasks = TasksService::new(
        storage.tasks.clone(),
        config.sidecar.tenant.clone(),
        config.sidecar.identity.clone(),
        ctx.shutdown.token(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, true).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(statefabric_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(statefabric_proto::CONTROL_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let listener = tokio::net::TcpListener::bind(config.sidecar.listen)
        .await
        .with_context(|| format!("binding sidecar.listen {}", config.sidecar.listen))?;
    tracing::info!(listen = %config.sidecar.listen, tenant = %config.sidecar.tenant, "State API listening");
    // Bound: connections queue in the backlog until the server accepts them.
    // (TCP_NODELAY below: small gRPC frames must not wait for Nagle.)
    api_ready.set(true);
    let max = config.sidecar.max_request_bytes;
    let stop = ctx.shutdown.token();
    let rpc_metrics = crate::rpc_metrics::RpcMetrics::default();
    ctx.register_metrics(|registry| rpc_metrics.register(registry));
    // The State API's request path, outermost first.
    tonic::transport::Server::builder()
        // A span per call, a child of the caller's trace context.
        .trace_fn(crate::call::span)
        .layer(
            tower::ServiceBuilder::new()
                // Counted with the status the caller sees, refusals below included.
                .layer(crate::rpc_metrics::RpcMetricsLayer(rpc_metrics))
                // A request over sidecar.max_request_bytes is RESOURCE_EXHAUSTED.
                .map_response(crate::status::oversize_is_resource_exhausted)
                // Overload and a passed deadline become statuses here.
                .map_result(crate::status::from_stack)
                // Over sidecar.max_concurrent_calls: refused at once, not queued.
                .load_shed()
                .concurrency_limit(config.sidecar.max_concurrent_calls)
                // The caller's deadline, capped: its work stops when the caller gave up.
                .layer(crate::call::DeadlineLayer(config.sidecar.max_call_duration))
                // The idempotency key and trace context, read once for the services.
                .layer(crate::call::CallMetaLayer),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            EventsServer::new(events)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(LocksServer::new(locks.clone()))
        .add_service(SessionsServer::new(sessions).max_decoding_message_size(max))
        .add_service(TasksServer::new(tasks.clone()).max_decoding_message_size(max))
        .add_service(
            SharedContextServer::new(context)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                stop.cancelled().await;
                set_health(&health, false).await;
            },
        )
        .await
        .context("gRPC server failed")?;
    // Let go of held locks now rather than make others wait out the leases,
    // and offer unanswered tasks to other workers.
    locks.release_all().await;
    tasks.release_unanswered().await;
    // The audit entries still queued, those of the releases included.
    audit.flush(Duration::from_secs(5)).await;
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

/// Every State API service's gRPC health, and the server's as a whole
/// (the empty name): serving, or not (at shutdown, so callers move on
/// while calls in flight finish).
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in [
        "",
        "statefabric.state.v1.Events",
        "statefabric.state.v1.SharedContext",
        "statefabric.state.v1.Locks",
        "statefabric.state.v1.Sessions",
        "statefabric.state.v1.Tasks",
    ] {
        health.set_service_status(service, status).await;
    }
}
