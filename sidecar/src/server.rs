//! Assembles the sidecar: storage, the gRPC server (State API, health,
//! reflection), readiness and background jobs, and their shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_proto::state::v1::events_server::EventsServer;
use statefabric_runtime::ServiceContext;
use statefabric_store::pg::{self, PgEventStore};
use statefabric_store::sqlite::SqliteEventStore;
use statefabric_store::{EventStore, run_idempotency_janitor};
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{Backend, SidecarConfig};
use crate::events::{EventsService, SubscriptionSettings};

/// How often readiness re-checks storage.
const READINESS_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often expired idempotency keys are purged.
const JANITOR_INTERVAL: Duration = Duration::from_secs(600);

/// Opens the configured event store, applying migrations where this process
/// is allowed to.
pub async fn open_store(
    ctx: &ServiceContext<SidecarConfig>,
) -> anyhow::Result<Arc<dyn EventStore>> {
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
            Ok(Arc::new(store))
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
            Ok(Arc::new(store))
        }
    }
}

/// Runs the sidecar until shutdown is requested.
pub async fn serve(ctx: ServiceContext<SidecarConfig>) -> anyhow::Result<()> {
    // Registered before the (possibly slow) start-up, so the process reports
    // not ready until storage answers and the API is listening.
    let storage_ready = ctx.readiness.check("storage");
    let api_ready = ctx.readiness.check("state_api");
    let store = open_store(&ctx).await?;
    let config = &ctx.config;

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
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventsServer<EventsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(statefabric_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let listener = tokio::net::TcpListener::bind(config.sidecar.listen)
        .await
        .with_context(|| format!("binding sidecar.listen {}", config.sidecar.listen))?;
    tracing::info!(listen = %config.sidecar.listen, tenant = %config.sidecar.tenant, "State API listening");
    // Bound: connections queue in the backlog until the server accepts them.
    api_ready.set(true);
    let max = config.sidecar.max_request_bytes;
    let stop = ctx.shutdown.token();
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            EventsServer::new(events)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            stop.cancelled().await;
            health
                .set_not_serving::<EventsServer<EventsService>>()
                .await;
        })
        .await
        .context("gRPC server failed")?;
    Ok(())
}
