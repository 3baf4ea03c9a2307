//! Mesh configuration from the control plane (`[mesh]`): the sidecar
//! subscribes to `statefabric.control.v1.ConfigDistribution` with its
//! pod's ServiceAccount token, applies what can change without a restart,
//! and answers each snapshot with an ACK, or a NACK naming why it refused.
//!
//! What is hot and what is not is [`apply`]'s. What the sidecar does not
//! apply is named in its ACK, so the resources' status shows it.
//! The last applied configuration is kept in `state_file` (written
//! atomically: a temporary file renamed over it), and applied at start
//! before any control plane answers, so an outage of the control plane
//! never takes an agent's configuration away. Reconnects back off with
//! jitter; resubscribing names the running version, so an unchanged
//! configuration is not sent again.
//!
//! Without a control plane (`fabric dev`), `[mesh] files` names YAML files
//! holding the same documents one would `kubectl apply`; the sidecar
//! computes its configuration from them at start, as the control plane
//! would (namespace `[mesh] namespace`, default `default`).

mod apply;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use statefabric_mesh::EffectiveConfig;
use statefabric_proto::control::v1::config_distribution_client::ConfigDistributionClient;
use statefabric_proto::control::v1::subscribe_request::Kind;
use statefabric_proto::control::v1::{Ack, Hello, Nack, SubscribeRequest};
use statefabric_runtime::ServiceContext;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) use apply::breaker_config;
pub(crate) use apply::{Hot, LinkSettings};

use crate::config::{MeshClientConfig, SidecarConfig};
use apply::Applier;

/// A configuration as kept in the local copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Applied {
    version: String,
    config: EffectiveConfig,
}

/// The version running now and what of it was not applied.
#[derive(Debug, Clone, Default)]
struct Running {
    version: String,
    not_applied: Vec<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    connected: Gauge,
    snapshots: Family<OutcomeLabels, Counter>,
}

/// Applies the local copy, if any, then keeps subscribed until shutdown.
pub(crate) fn start(ctx: &ServiceContext<SidecarConfig>, hot: Hot) -> anyhow::Result<()> {
    let config = ctx.config.mesh.clone();
    let applier = Arc::new(Applier::new(hot, &ctx.config.telemetry.log_level));
    let metrics = Metrics::default();
    ctx.register_metrics(|registry| {
        registry.register(
            "mesh_config_connected",
            "1 while subscribed to the control plane's configuration",
            metrics.connected.clone(),
        );
        registry.register(
            "mesh_config_snapshots",
            "Configurations received, by outcome (applied, refused)",
            metrics.snapshots.clone(),
        );
    });
    if !config.files.is_empty() {
        let namespace = if config.namespace.is_empty() {
            "default"
        } else {
            &config.namespace
        };
        let catalog = statefabric_mesh::local::load_files(&config.files, namespace)?;
        let identity = statefabric_mesh::Identity {
            namespace: namespace.to_owned(),
            pod: config.pod.clone(),
            agent_type: Some(config.agent_type.clone()).filter(|a| !a.is_empty()),
            labels: BTreeMap::new(),
            config: Some(config.config_name.clone()).filter(|c| !c.is_empty()),
        };
        for problem in statefabric_mesh::validate::problems(&catalog) {
            tracing::warn!(
                kind = problem.kind,
                name = %problem.name,
                field = %problem.field,
                message = %problem.message,
                "mesh resource left out"
            );
        }
        let effective = statefabric_mesh::effective(&catalog, &identity)?;
        let not_applied = applier
            .apply(&effective)
            .map_err(|reason| anyhow::anyhow!("mesh.files: {reason}"))?;
        for setting in not_applied {
            tracing::warn!(%setting, "mesh setting not applied");
        }
        tracing::info!(version = %effective.version(), "applied the mesh configuration from local files");
        return Ok(());
    }
    let mut running = None;
    match read_local(&config.state_file) {
        Ok(Some(local)) => match applier.apply(&local.config) {
            Ok(not_applied) => {
                tracing::info!(version = %local.version, "applied the local copy of the mesh configuration");
                running = Some(Running {
                    version: local.version,
                    not_applied,
                });
            }
            Err(reason) => {
                tracing::warn!(%reason, "the local copy of the mesh configuration is not applicable")
            }
        },
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the local copy of the mesh configuration")
        }
    }
    ctx.shutdown.spawn(keep_subscribed(
        config,
        applier,
        metrics,
        running,
        ctx.shutdown.token(),
    ));
    Ok(())
}

async fn keep_subscribed(
    config: MeshClientConfig,
    applier: Arc<Applier>,
    metrics: Metrics,
    mut running: Option<Running>,
    stop: CancellationToken,
) {
    let mut backoff = applier.link().reconnect_min;
    loop {
        // Shutdown must not wait for a connect or a TokenReview in flight.
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = subscribe(&config, &applier, &metrics, &mut running, &stop) => result,
        };
        metrics.connected.set(0);
        // Read at every turn: a policy may have changed them meanwhile.
        let link = applier.link();
        match result {
            Ok(true) => backoff = link.reconnect_min,
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "mesh configuration stream lost; keeping the last configuration")
            }
        }
        if stop.is_cancelled() {
            return;
        }
        // Full jitter: replicas of a fleet do not reconnect in step.
        let wait = backoff.mul_f64(fastrand::f64());
        backoff = (backoff * 2).clamp(link.reconnect_min, link.reconnect_max);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One subscription; `Ok(true)` if it got as far as a stream.
async fn subscribe(
    config: &MeshClientConfig,
    applier: &Applier,
    metrics: &Metrics,
    running: &mut Option<Running>,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(config.control_plane.clone())?
        .connect_timeout(applier.link().connect_timeout)
        .tcp_nodelay(true);
    let ca = match (&config.ca_file, &config.ca_pem) {
        (Some(file), _) => Some(
            std::fs::read(file)
                .with_context(|| format!("reading mesh.ca_file {}", file.display()))?,
        ),
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
    };
    if let Some(ca) = ca {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )?;
    }
    let channel = endpoint
        .connect()
        .await
        .context("connecting to the control plane")?;
    // Read at every connect: projected tokens are rotated by the kubelet.
    let token = std::fs::read_to_string(&config.token_file)
        .with_context(|| format!("reading mesh.token_file {}", config.token_file.display()))?;
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        namespace: config.namespace.clone(),
        pod: config.pod.clone(),
        agent_type: config.agent_type.clone(),
        labels: Default::default(),
        config_name: config.config_name.clone(),
        token: token.trim().to_owned(),
        current_version: running
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default(),
        not_applied: running
            .as_ref()
            .map(|r| r.not_applied.clone())
            .unwrap_or_default(),
    };
    tx.send(SubscribeRequest {
        kind: Some(Kind::Hello(hello)),
    })
    .await?;
    let mut snapshots = ConfigDistributionClient::new(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("subscribing")?
        .into_inner();
    metrics.connected.set(1);
    tracing::info!(control_plane = %config.control_plane, "subscribed to the mesh configuration");
    loop {
        let snapshot = tokio::select! {
            () = stop.cancelled() => return Ok(true),
            next = snapshots.message() => match next.context("the configuration stream")? {
                Some(snapshot) => snapshot,
                None => return Ok(true),
            },
        };
        let outcome = serde_json::from_str::<EffectiveConfig>(&snapshot.config_json)
            .map_err(|e| format!("undecodable configuration: {e}"))
            .and_then(|decoded| applier.apply(&decoded).map(|notes| (decoded, notes)));
        let answer = match outcome {
            Ok((decoded, not_applied)) => {
                let applied = Applied {
                    version: snapshot.version.clone(),
                    config: decoded,
                };
                if let Err(err) = write_local(&config.state_file, &applied) {
                    tracing::warn!(error = %err, "cannot keep a local copy of the mesh configuration");
                }
                tracing::info!(version = %snapshot.version, "applied the mesh configuration");
                for setting in &not_applied {
                    tracing::warn!(%setting, "mesh setting not applied");
                }
                metrics
                    .snapshots
                    .get_or_create(&OutcomeLabels { outcome: "applied" })
                    .inc();
                *running = Some(Running {
                    version: snapshot.version.clone(),
                    not_applied: not_applied.clone(),
                });
                Kind::Ack(Ack {
                    version: snapshot.version,
                    not_applied,
                })
            }
            Err(reason) => {
                tracing::warn!(version = %snapshot.version, %reason, "refused the mesh configuration; keeping the last one");
                metrics
                    .snapshots
                    .get_or_create(&OutcomeLabels { outcome: "refused" })
                    .inc();
                Kind::Nack(Nack {
                    version: snapshot.version,
                    reason,
                })
            }
        };
        tx.send(SubscribeRequest { kind: Some(answer) }).await?;
    }
}

fn read_local(path: &Path) -> anyhow::Result<Option<Applied>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Written beside the target and renamed over it: a crash leaves the old
/// copy or the new one, never half of one. Readable by the sidecar's user
/// only: it holds the Secret values the Upstreams name.
fn write_local(path: &Path, applied: &Applied) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut partial = PathBuf::from(path);
    partial.as_mut_os_string().push(".partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(&serde_json::to_vec(applied)?)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_copy_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("sf-mesh-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("mesh.json");
        assert!(read_local(&path).expect("absent").is_none());
        let applied = Applied {
            version: "v1".into(),
            config: EffectiveConfig::default(),
        };
        write_local(&path, &applied).expect("write");
        assert_eq!(
            read_local(&path)
                .expect("read")
                .map(|a| a.version)
                .as_deref(),
            Some("v1")
        );
        assert!(!dir.join("mesh.json.partial").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the copy holds Secret values: owner only");
        std::fs::remove_dir_all(dir).expect("clean");
    }
}
