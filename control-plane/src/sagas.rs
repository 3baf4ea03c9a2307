//! Wires the saga engine into a process: opens its store, loads the
//! definitions, runs the engine on the leader and serves the operator API.
//! The embedded `fabric dev` calls [`run`] too, with the store it shares
//! with its sidecar.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use statefabric_leader::Leadership;
use statefabric_proto::control::v1::sagas_server::SagasServer;
use statefabric_runtime::ServiceContext;
use statefabric_saga::{Definition, builtin};
use statefabric_saga_engine::{Engine, EngineSettings};
use statefabric_saga_store::SagaStore;
use statefabric_saga_store::pg::PgSagaStore;
use statefabric_saga_store::sqlite::SqliteSagaStore;
use statefabric_store::sqlite::SqliteConfig;

use crate::config::{ApiConfig, LeaderConfig, SagaBackend, SagaTransport, SagasConfig};

/// Opens the configured saga store.
pub async fn open_store<C>(
    ctx: &ServiceContext<C>,
    config: &SagasConfig,
    leader: &LeaderConfig,
) -> anyhow::Result<Arc<dyn SagaStore>> {
    Ok(match config.backend(leader.backend) {
        SagaBackend::Postgres => {
            let url = if config.postgres_url.is_empty() {
                &leader.postgres_url
            } else {
                &config.postgres_url
            };
            let store = PgSagaStore::connect(url, config.connections)
                .await
                .context("connecting the saga store to Postgres")?;
            ctx.shutdown.spawn(store.listen(ctx.shutdown.token()));
            ctx.register_metrics(|registry| {
                statefabric_db::pg::register_pool_metrics(registry, "sagas", store.pool().clone());
            });
            Arc::new(store)
        }
        SagaBackend::Sqlite => {
            let defaults = SqliteConfig::default();
            let pools = statefabric_db::sqlite::open(
                &config.sqlite_path,
                defaults.read_connections,
                defaults.query_timeout,
            )
            .await
            .with_context(|| format!("opening {}", config.sqlite_path.display()))?;
            Arc::new(SqliteSagaStore::new(pools.writer, pools.reader))
        }
    })
}

/// Reads a definition file (YAML, or JSON by its `.json` extension).
pub fn read_definition(path: &Path) -> anyhow::Result<Definition> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading saga definition {}", path.display()))?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        Definition::from_json(&text)
    } else {
        Definition::from_yaml(&text)
    };
    parsed.with_context(|| format!("saga definition {}", path.display()))
}

/// Starts the engine (it works while `leadership` says leader) and the
/// operator API; both stop with the process.
pub async fn run<C>(
    ctx: &ServiceContext<C>,
    store: Arc<dyn SagaStore>,
    leadership: Leadership,
    config: &SagasConfig,
    api: &ApiConfig,
    lease: &str,
) -> anyhow::Result<Arc<Engine>> {
    let mut definitions = Vec::new();
    if config.builtin {
        definitions.push(builtin::plan_code_critique());
    }
    for path in &config.definitions {
        definitions.push(read_definition(path)?);
    }
    let settings = EngineSettings {
        outbox: config.transport == SagaTransport::Kafka,
        lease: lease.to_owned(),
        batch: config.batch,
        commit_batch: config.commit_batch,
        concurrency: config.concurrency,
        tick: config.tick,
        stalled_every: config.stalled_every,
    };
    let engine = Arc::new(
        Engine::new(store, leadership, settings, definitions)
            .await
            .context("starting the saga engine")?,
    );
    ctx.register_metrics(|registry| engine.metrics().register(registry));
    ctx.shutdown.spawn(engine.clone().run(ctx.shutdown.token()));
    let listener = tokio::net::TcpListener::bind(api.listen)
        .await
        .with_context(|| format!("binding api.listen {}", api.listen))?;
    tracing::info!(listen = %api.listen, grpc = %api.grpc_listen, "operator API (REST, gRPC) and saga page listening (/ui)");
    let router = crate::api::router(engine.clone(), api);
    let grpc = tokio::net::TcpListener::bind(api.grpc_listen)
        .await
        .with_context(|| format!("binding api.grpc_listen {}", api.grpc_listen))?;
    let service =
        crate::grpc::SagasService::new(crate::operator::Operator::new(engine.clone(), api));
    let stop = ctx.shutdown.token();
    ctx.shutdown.spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(SagasServer::new(service))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                async move { stop.cancelled().await },
            )
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "operator gRPC API failed");
        }
    });
    let stop = ctx.shutdown.token();
    ctx.shutdown.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "operator API failed");
        }
    });
    Ok(engine)
}
