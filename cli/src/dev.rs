//! `fabric dev`: the control plane and a sidecar in one process, on the
//! embedded backends — SQLite for events, context, sagas and idempotency
//! (one file in the data directory, so a restart keeps everything), and
//! in-process locks, sessions, change announcements and the saga bus (the
//! saga store wakes the engine and the agents' task streams directly).
//!
//! It serves the production APIs on the production default ports: the
//! sidecar's State API (gRPC, 127.0.0.1:7400), the operator API and saga
//! page (127.0.0.1:7502), and admin endpoints (127.0.0.1:7401). Limits:
//! one node, no Kafka, no Redis; moving to production backends is
//! configuration (see docs/embedded.md).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use statefabric_control_plane::config::{ApiConfig, SagasConfig};
use statefabric_leader::{LeaseSettings, Solo};
use statefabric_runtime::{
    AdminConfig, Issues, ServiceConfig, ServiceContext, ShutdownConfig, TelemetryConfig,
};
use statefabric_sidecar::SidecarConfig;
use statefabric_sidecar::config::{
    Backend, EgressConfig, MeshClientConfig, SessionsConfig, SidecarSection, StorageConfig,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct DevConfig {
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    pub sidecar: SidecarSection,
    /// SQLite only (`storage.sqlite.path` is the data file).
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub sessions: SessionsConfig,
    pub api: ApiConfig,
    /// The saga engine (its store is the sidecar's SQLite file).
    #[serde(default)]
    pub sagas: SagasConfig,
    /// Mesh resources from local YAML files (`files`), as on a cluster.
    #[serde(default)]
    pub mesh: MeshClientConfig,
    /// The egress listener (off unless enabled; its Upstreams come from
    /// `mesh.files`).
    #[serde(default)]
    pub egress: EgressConfig,
}

impl DevConfig {
    pub(crate) fn defaults() -> Self {
        let sidecar = SidecarConfig::defaults();
        Self {
            admin: sidecar.admin,
            telemetry: sidecar.telemetry,
            shutdown: sidecar.shutdown,
            sidecar: sidecar.sidecar,
            storage: sidecar.storage,
            sessions: sidecar.sessions,
            // On loopback only, for the developer at this machine.
            api: ApiConfig {
                allow_anonymous: true,
                ..ApiConfig::default()
            },
            sagas: SagasConfig::default(),
            mesh: MeshClientConfig::default(),
            egress: EgressConfig::default(),
        }
    }

    /// The sidecar's part, with every other block in-process.
    pub(crate) fn sidecar_config(&self) -> SidecarConfig {
        SidecarConfig {
            admin: self.admin.clone(),
            telemetry: self.telemetry.clone(),
            shutdown: self.shutdown.clone(),
            sidecar: self.sidecar.clone(),
            storage: self.storage.clone(),
            sessions: self.sessions.clone(),
            mesh: self.mesh.clone(),
            egress: self.egress.clone(),
            ..SidecarConfig::defaults()
        }
    }
}

impl ServiceConfig for DevConfig {
    const SECTIONS: &'static [&'static str] = &[
        "admin",
        "telemetry",
        "shutdown",
        "sidecar",
        "storage",
        "sessions",
        "api",
        "sagas",
        "mesh",
        "egress",
    ];

    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }

    fn validate(&self, issues: &mut Issues) {
        self.sidecar_config().validate(issues);
        if self.storage.backend != Backend::Sqlite {
            issues.push(
                "storage.backend",
                "fabric dev is the embedded mode: sqlite only (run the sidecar and control plane for postgres)",
            );
        }
        if self.mesh.enabled {
            issues.push(
                "mesh.enabled",
                "fabric dev has no control plane to subscribe to: use mesh.files",
            );
        }
        self.sagas.check(issues);
        self.api.check(issues);
    }
}

/// Runs the embedded fabric until shutdown; with `demo`, also the demo
/// agents and sample sagas.
pub(crate) async fn serve(ctx: ServiceContext<DevConfig>, demo: bool) -> anyhow::Result<()> {
    // Not ready until the State API listens (set by the sidecar).
    let _opening = ctx.readiness.check("state_api");
    let sidecar_ctx = ServiceContext {
        config: ctx.config.sidecar_config(),
        log_filter: ctx.log_filter.clone(),
        readiness: ctx.readiness.clone(),
        shutdown: ctx.shutdown.clone(),
        metrics: ctx.metrics.clone(),
    };
    let storage = statefabric_sidecar::open_storage(&sidecar_ctx).await?;
    let sagas = storage
        .sagas
        .clone()
        .context("fabric dev runs on the embedded store")?;
    let mut kept = None;
    ctx.register_metrics(|registry| {
        kept = Some(statefabric_leader::keep(
            Arc::new(Solo),
            LeaseSettings {
                ttl: Duration::from_secs(10),
                renew_every: Duration::from_secs(2),
            },
            Some(registry),
            ctx.shutdown.token(),
        ));
    });
    let (leadership, _lease) = kept.context("leader election did not start")?;
    let engine = statefabric_control_plane::sagas::run(
        &ctx,
        Arc::new(sagas),
        leadership,
        &ctx.config.sagas,
        &ctx.config.api,
        "fabric-dev",
    )
    .await?;
    let api = format!("http://{}", ctx.config.api.listen);
    let grpc = format!("http://{}", ctx.config.sidecar.listen);
    tracing::info!(
        state_api = %grpc,
        operator_api = %api,
        saga_page = %format!("{api}/ui"),
        admin = %ctx.config.admin.listen,
        data = %sidecar_ctx.config.storage.sqlite.path.display(),
        "fabric dev running; Ctrl-C to stop"
    );
    if demo {
        ctx.shutdown.spawn(crate::demo::run(
            grpc,
            engine,
            format!("{api}/ui"),
            sidecar_ctx.config.sidecar.tenant.clone(),
            ctx.shutdown.token(),
        ));
    }
    statefabric_sidecar::serve_with(sidecar_ctx, storage).await
}
