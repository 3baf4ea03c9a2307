//! Mesh configuration for the sidecars (`[mesh]`): every replica watches
//! the `statefabric.io` resources ([`catalog`]) and serves each subscribed
//! sidecar its effective configuration ([`distribution`]) and publishes
//! who they are and how they took it ([`directory`]), with the Secrets
//! their Upstreams name read in ([`secrets`]); the leader writes the
//! resources' status from every replica's subscribers ([`status`]).
//!
//! With the saga engine on, the leader also registers SagaDefinitions
//! ([`sagas`]).

pub mod catalog;
pub mod directory;
pub mod distribution;
pub mod sagas;
pub mod secrets;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use statefabric_leader::{Leadership, Role};
use statefabric_mesh::Catalog;
use statefabric_proto::control::v1::config_distribution_server::ConfigDistributionServer;
use statefabric_runtime::ServiceContext;
use statefabric_saga_engine::engine::Engine;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ControlPlaneConfig;

/// What the periodic pass works with.
struct Reconcile {
    client: kube::Client,
    catalog: watch::Receiver<Option<Arc<Catalog>>>,
    sidecars: distribution::Sidecars,
    directory: directory::Directory,
    engine: Option<Arc<Engine>>,
    leadership: Leadership,
    interval: Duration,
}

/// Once per `interval`: every replica publishes its subscribers; the
/// leader then registers SagaDefinitions in the engine and writes every
/// resource's status.
async fn reconcile(
    Reconcile {
        client,
        mut catalog,
        sidecars,
        directory,
        engine,
        leadership,
        interval,
    }: Reconcile,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(err) = directory.publish(sidecars.records()).await {
            tracing::warn!(error = %format!("{err:#}"), "publishing this replica's sidecars");
        }
        if !matches!(leadership.role(), Role::Leader { .. }) {
            continue;
        }
        let Some(current) = catalog.borrow_and_update().clone() else {
            continue;
        };
        if let Some(engine) = &engine {
            sagas::register_all(&client, &current, engine).await;
        }
        match directory.all(interval).await {
            Ok(all) => status::write(&client, &current, &all).await,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "reading every replica's sidecars");
            }
        }
    }
}

/// Starts watching, serving and status writing; returns once listening.
pub async fn start(
    ctx: &ServiceContext<ControlPlaneConfig>,
    leadership: Leadership,
    directory: directory::Directory,
    engine: Option<Arc<Engine>>,
) -> anyhow::Result<()> {
    let mesh = &ctx.config.mesh;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API for [mesh] (in-cluster or KUBECONFIG)")?;
    let catalog = secrets::with_secrets(
        client.clone(),
        catalog::watch(&client, ctx.shutdown.token()),
        mesh.secret_refresh,
        ctx.shutdown.token(),
    );
    let sidecars = distribution::Sidecars::default();
    let service = distribution::Distribution::new(
        catalog.clone(),
        sidecars.clone(),
        client.clone(),
        mesh.audience.clone(),
        ctx.shutdown.token(),
    );
    ctx.shutdown.spawn(reconcile(
        Reconcile {
            client,
            catalog,
            sidecars,
            directory,
            engine,
            leadership,
            interval: mesh.status_interval,
        },
        ctx.shutdown.token(),
    ));
    let mut server = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&mesh.tls_cert, &mesh.tls_key) {
        let cert = std::fs::read(cert)
            .with_context(|| format!("reading mesh.tls_cert {}", cert.display()))?;
        let key = std::fs::read(key)
            .with_context(|| format!("reading mesh.tls_key {}", key.display()))?;
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .context("mesh TLS configuration")?;
    }
    let listener = tokio::net::TcpListener::bind(mesh.listen)
        .await
        .with_context(|| format!("binding mesh.listen {}", mesh.listen))?;
    tracing::info!(listen = %mesh.listen, tls = mesh.tls_cert.is_some(), "mesh configuration service listening");
    let stop = ctx.shutdown.token();
    let router = server.add_service(ConfigDistributionServer::new(service));
    ctx.shutdown.spawn(async move {
        let served = router
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { stop.cancelled().await },
            )
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "mesh configuration service failed");
        }
    });
    Ok(())
}
