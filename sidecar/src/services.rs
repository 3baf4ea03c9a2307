//! The State API's services, built from storage, the building blocks and
//! what the background jobs share, and served as one gRPC server whose
//! request path is assembled in [`serve`].

use anyhow::Context;
use statefabric_domain::{AgentId, TenantId};
use statefabric_proto::state::v1::events_server::EventsServer;
use statefabric_proto::state::v1::locks_server::LocksServer;
use statefabric_proto::state::v1::sessions_server::SessionsServer;
use statefabric_proto::state::v1::shared_context_server::SharedContextServer;
use statefabric_proto::state::v1::tasks_server::TasksServer;
use statefabric_runtime::ServiceContext;
use statefabric_runtime::admin::ReadinessCheck;

use crate::audit::Auditor;
use crate::backends::Backends;
use crate::config::SidecarConfig;
use crate::context::ContextService;
use crate::events::{EventsService, SubscriptionSettings};
use crate::follow::Publisher;
use crate::jobs::Shared;
use crate::locks::{LockLimits, LocksService};
use crate::server::Storage;
use crate::sessions::{SessionPolicies, SessionsService};
use crate::tasks::TasksService;

/// Every State API service, and the hot settings the mesh configuration
/// changes under them.
pub(crate) struct Services {
    pub events: EventsService,
    pub context: ContextService,
    pub locks: LocksService,
    pub sessions: SessionsService,
    pub tasks: TasksService,
    pub audit: Auditor,
    pub lock_limits: LockLimits,
    pub session_policies: SessionPolicies,
}

/// The ids the services act under (parsed once).
pub(crate) struct Ids {
    pub tenant: TenantId,
    pub identity: AgentId,
}

pub(crate) fn build(
    ctx: &ServiceContext<SidecarConfig>,
    storage: &Storage,
    backends: &Backends,
    shared: &Shared,
    ids: &Ids,
) -> Services {
    let config = &ctx.config;
    let Ids { tenant, identity } = ids;
    let events = EventsService::new(
        storage.events.clone(),
        tenant.clone(),
        identity.clone(),
        SubscriptionSettings {
            buffer: config.sidecar.subscription_buffer,
            lag_timeout: config.sidecar.subscriber_lag_timeout,
        },
        ctx.shutdown.clone(),
    );
    let context = ContextService::new(
        storage.context.clone(),
        tenant.clone(),
        identity.to_string(),
        shared.cache.clone(),
        shared.changes.clone(),
        Publisher {
            notifier: backends.notifier.clone(),
            log: backends.log.clone(),
            tenant: tenant.clone(),
            identity: config.sidecar.identity.clone(),
            retention: shared.retention,
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
    let audit = Auditor::start(
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
    let sessions = SessionsService::new(
        backends.sessions.clone(),
        tenant.clone(),
        config.sidecar.identity.clone(),
        session_policies.clone(),
        backends.notifier.clone(),
        audit.clone(),
    );
    let tasks = TasksService::new(
        storage.tasks.clone(),
        tenant.clone(),
        config.sidecar.identity.clone(),
        ctx.shutdown.token(),
    );
    Services {
        events,
        context,
        locks,
        sessions,
        tasks,
        audit,
        lock_limits,
        session_policies,
    }
}

/// Serves the State API (with gRPC health and reflection) until shutdown.
pub(crate) async fn serve(
    ctx: &ServiceContext<SidecarConfig>,
    services: &Services,
    api_ready: ReadinessCheck,
) -> anyhow::Result<()> {
    let config = &ctx.config;
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
            EventsServer::new(services.events.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(LocksServer::new(services.locks.clone()))
        .add_service(SessionsServer::new(services.sessions.clone()).max_decoding_message_size(max))
        .add_service(TasksServer::new(services.tasks.clone()).max_decoding_message_size(max))
        .add_service(
            SharedContextServer::new(services.context.clone())
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
        .context("gRPC server failed")
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
