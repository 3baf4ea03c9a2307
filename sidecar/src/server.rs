//! Assembles the sidecar: storage, the gRPC server (State API, health,
//! reflection), readiness and background jobs, and their shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_lock::LockService;
use statefabric_lock::memory::MemoryLocks;
use statefabric_lock::redis::RedisLocks;
use statefabric_proto::state::v1::events_server::EventsServer;
use statefabric_proto::state::v1::locks_server::LocksServer;
use statefabric_proto::state::v1::shared_context_server::SharedContextServer;
use statefabric_runtime::ServiceContext;
use statefabric_store::context::ContextStore;
use statefabric_store::pg::{self, PgEventStore};
use statefabric_store::sqlite::SqliteEventStore;
use statefabric_store::{EventStore, run_idempotency_janitor};

use crate::cache::ContextCache;
use crate::config::{Backend, LockBackend, SidecarConfig};
use crate::context::{ChangeFeed, ContextService};
use crate::events::{EventsService, SubscriptionSettings};
use crate::locks::LocksService;

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
            Ok(Storage {
                events: Arc::new(store.clone()),
                context: Arc::new(store),
                notifications: None,
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
            Ok(Storage {
                events: Arc::new(store.clone()),
                context: Arc::new(store),
                notifications: Some(config.storage.postgres.url.clone()),
            })
        }
    }
}

/// Follows other sidecars' context changes (Postgres LISTEN): drops stale
/// cache entries and wakes watchers. If the listening connection drops,
/// notifications may have been missed, so the whole cache is dropped.
async fn follow_context_changes(
    url: String,
    tenant: String,
    cache: Arc<ContextCache>,
    changes: ChangeFeed,
    ready: statefabric_runtime::ReadinessCheck,
    shutdown: statefabric_runtime::Shutdown,
) {
    let mut listener = loop {
        let attempt = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen("statefabric_context").await?;
            Ok::<_, sqlx::Error>(listener)
        };
        tokio::select! {
            () = shutdown.requested() => return,
            result = attempt => match result {
                Ok(listener) => {
                    tracing::info!("following context changes");
                    ready.set(true);
                    break listener;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot LISTEN for context changes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    };
    loop {
        let received = tokio::select! {
            () = shutdown.requested() => return,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => {
                tracing::debug!(payload = notification.payload(), "context change notified");
                let mut parts = notification.payload().split(' ');
                if let (Some(t), Some(doc), Some(revision)) =
                    (parts.next(), parts.next(), parts.next())
                    && t == tenant
                    && let Ok(revision) = revision.parse::<u64>()
                {
                    cache.invalidate(doc, Some(revision));
                    let _ = changes.send((doc.to_owned(), revision));
                }
            }
            // The connection dropped (sqlx reconnects on the next call):
            // changes may have been missed, so nothing cached can be trusted.
            Ok(None) => {
                tracing::warn!("lost the context change feed; dropping the cache");
                cache.clear();
            }
            Err(err) => {
                tracing::warn!(error = %err, "context change feed failed; dropping the cache");
                ready.set(false);
                cache.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
                if listener.listen("statefabric_context").await.is_ok() {
                    ready.set(true);
                }
            }
        }
    }
}

/// Runs the sidecar until shutdown is requested.
pub async fn serve(ctx: ServiceContext<SidecarConfig>) -> anyhow::Result<()> {
    // Registered before the (possibly slow) start-up, so the process reports
    // not ready until storage answers and the API is listening.
    let storage_ready = ctx.readiness.check("storage");
    let api_ready = ctx.readiness.check("state_api");
    // Only meaningful with Postgres; registered up front like the others.
    let changes_ready = (ctx.config.storage.backend == Backend::Postgres)
        .then(|| ctx.readiness.check("context_changes"));
    let storage = open_storage(&ctx).await?;
    let store = storage.events.clone();
    let config = &ctx.config;
    let cache = Arc::new(ContextCache::new(
        config.sidecar.cache_max_entries,
        config.sidecar.cache_max_bytes,
    ));
    ctx.register_metrics(|registry| cache.register_metrics(registry));
    let (changes, _) = tokio::sync::broadcast::channel(1024);
    if let (Some(url), Some(ready)) = (storage.notifications.clone(), changes_ready) {
        ctx.shutdown.spawn(follow_context_changes(
            url,
            config.sidecar.tenant.clone(),
            cache.clone(),
            changes.clone(),
            ready,
            ctx.shutdown.clone(),
        ));
    }

    ctx.shutdown.spawn({
        let store = store.clone();
        let shutdown = ctx.shutdown.clone();
        async move {
            loop {
                let ok = store.ping().await.is_ok();
                storage_ready.set(ok);
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
        config.tenant()?,
        config.identity()?,
        SubscriptionSettings {
            buffer: config.sidecar.subscription_buffer,
            lag_timeout: config.sidecar.subscriber_lag_timeout,
        },
        ctx.shutdown.clone(),
    );
    let context = ContextService::new(
        storage.context,
        config.tenant()?,
        config.identity()?.to_string(),
        cache,
        changes,
        ctx.shutdown.clone(),
    );
    let locks = LocksService::new(
        open_locks(config).await?,
        config.tenant()?,
        config.identity()?.to_string(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventsServer<EventsService>>().await;
    health
        .set_serving::<SharedContextServer<ContextService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(statefabric_proto::FILE_DESCRIPTOR_SET)
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
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            oversize_is_resource_exhausted,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            EventsServer::new(events)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(LocksServer::new(locks.clone()))
        .add_service(
            SharedContextServer::new(context)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                stop.cancelled().await;
                health
                    .set_not_serving::<EventsServer<EventsService>>()
                    .await;
            },
        )
        .await
        .context("gRPC server failed")?;
    // Let go of held locks now rather than make others wait out the leases.
    locks.release_all().await;
    Ok(())
}

async fn open_locks(config: &SidecarConfig) -> anyhow::Result<Arc<dyn LockService>> {
    let urls = config.locks.url_list();
    Ok(match config.locks.backend {
        LockBackend::Memory => Arc::new(MemoryLocks::default()),
        LockBackend::Redis => {
            let url = urls.first().context("locks.urls is empty")?;
            let client =
                redis::Client::open(url.as_str()).with_context(|| format!("locks.urls {url}"))?;
            let manager = redis::aio::ConnectionManager::new(client)
                .await
                .with_context(|| format!("connecting to Redis at {url}"))?;
            Arc::new(RedisLocks::new(manager))
        }
        LockBackend::RedisCluster => {
            let client = redis::cluster::ClusterClient::new(urls).context("locks.urls")?;
            let conn = client
                .get_async_connection()
                .await
                .context("connecting to the Redis cluster")?;
            Arc::new(RedisLocks::new(conn))
        }
    })
}

/// tonic's codec rejects a request over `max_request_bytes` with OUT_OF_RANGE;
/// the State API reports every oversize payload as RESOURCE_EXHAUSTED, the
/// code clients already handle for the store's own size limits. Such a
/// rejection is a trailers-only response, so the status is in the headers.
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}
