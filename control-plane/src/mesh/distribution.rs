//! The `ConfigDistribution` gRPC service: a sidecar says who it is, proves
//! it with its pod's ServiceAccount token, and receives its effective
//! configuration whenever that changes; it answers each with an ACK or a
//! NACK, which the [`Sidecars`] registry keeps for the resources' status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use statefabric_mesh::Catalog;
use statefabric_mesh::effective::{EffectiveConfig, Identity, effective};
use statefabric_proto::control::v1::config_distribution_server::ConfigDistribution;
use statefabric_proto::control::v1::subscribe_request::Kind;
use statefabric_proto::control::v1::{ConfigSnapshot, Hello, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::directory::{Refusal, SidecarRecord};

/// The annotation with which a pod names its FabricConfig.
pub const CONFIG_ANNOTATION: &str = "statefabric.io/config";
/// The annotation (or label) naming a pod's agent type.
pub const AGENT_TYPE_KEY: &str = "statefabric.io/agent-type";
/// The extra a bound ServiceAccount token carries for its pod.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// What one subscribed sidecar was sent and answered.
#[derive(Debug, Clone)]
pub struct SidecarState {
    pub identity: Identity,
    pub config: EffectiveConfig,
    /// The version it acknowledged last.
    pub applied: Option<String>,
    /// Its last refusal: version and reason.
    pub refused: Option<(String, String)>,
    /// What it did not apply of the version it acknowledged.
    pub not_applied: Vec<String>,
}

impl SidecarState {
    /// As published for the leader's status writes.
    pub fn record(&self) -> SidecarRecord {
        let config = &self.config;
        let resources = config
            .fabric_config
            .iter()
            .map(|c| format!("FabricConfig/{}", c.name))
            .chain(
                config
                    .policies
                    .iter()
                    .map(|p| format!("ResiliencyPolicy/{}", p.name)),
            )
            .chain(
                config
                    .upstreams
                    .iter()
                    .map(|u| format!("Upstream/{}", u.name)),
            )
            .collect();
        SidecarRecord {
            namespace: self.identity.namespace.clone(),
            pod: self.identity.pod.clone(),
            resources,
            sent: config.version(),
            applied: self.applied.clone(),
            refused: self.refused.as_ref().map(|(version, reason)| Refusal {
                version: version.clone(),
                reason: reason.clone(),
            }),
            not_applied: self.not_applied.clone(),
        }
    }
}

/// The sidecars subscribed to this replica, by (namespace, pod).
#[derive(Debug, Clone, Default)]
pub struct Sidecars {
    inner: Arc<Mutex<BTreeMap<(String, String), SidecarState>>>,
}

impl Sidecars {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<(String, String), SidecarState>) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Every subscriber, as published for the status.
    pub fn records(&self) -> Vec<SidecarRecord> {
        self.with(|all| all.values().map(SidecarState::record).collect())
    }

    fn key(identity: &Identity) -> (String, String) {
        (identity.namespace.clone(), identity.pod.clone())
    }

    /// `already_applied`: the sidecar runs this version (it said so in its
    /// Hello), with these settings not applied.
    fn sent(
        &self,
        identity: &Identity,
        config: &EffectiveConfig,
        already_applied: Option<Vec<String>>,
    ) {
        self.with(|all| {
            let state = all
                .entry(Self::key(identity))
                .or_insert_with(|| SidecarState {
                    identity: identity.clone(),
                    config: config.clone(),
                    applied: None,
                    refused: None,
                    not_applied: Vec::new(),
                });
            state.config = config.clone();
            if let Some(not_applied) = already_applied {
                state.applied = Some(config.version());
                state.not_applied = not_applied;
            }
        });
    }

    fn answered(&self, identity: &Identity, kind: Kind) {
        self.with(|all| {
            if let Some(state) = all.get_mut(&Self::key(identity)) {
                match kind {
                    Kind::Ack(ack) => {
                        state.applied = Some(ack.version);
                        state.refused = None;
                        state.not_applied = ack.not_applied;
                    }
                    Kind::Nack(nack) => state.refused = Some((nack.version, nack.reason)),
                    Kind::Hello(_) => {}
                }
            }
        });
    }

    fn gone(&self, identity: &Identity) {
        self.with(|all| all.remove(&Self::key(identity)));
    }
}

/// TokenReviews (and pod reads) in flight at once. A fleet resubscribing
/// after a control-plane restart would otherwise open a connection to the
/// API server per sidecar at the same moment.
const IDENTIFY_CONCURRENCY: usize = 8;

/// The service; clones share the catalog, the registry and the client.
#[derive(Clone)]
pub struct Distribution {
    catalog: watch::Receiver<Option<Arc<Catalog>>>,
    sidecars: Sidecars,
    client: Client,
    audience: String,
    identifying: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field("audience", &self.audience)
            .finish()
    }
}

impl Distribution {
    pub fn new(
        catalog: watch::Receiver<Option<Arc<Catalog>>>,
        sidecars: Sidecars,
        client: Client,
        audience: String,
        stop: CancellationToken,
    ) -> Self {
        Self {
            catalog,
            sidecars,
            client,
            audience,
            identifying: Arc::new(tokio::sync::Semaphore::new(IDENTIFY_CONCURRENCY)),
            stop,
        }
    }

    /// Who the Hello's token says the sidecar is, and its pod's labels and
    /// annotations as the API server has them (not as the sidecar claims).
    async fn identify(&self, hello: &Hello) -> Result<Identity, Status> {
        if hello.namespace.is_empty() || hello.pod.is_empty() {
            return Err(Status::invalid_argument("Hello needs namespace and pod"));
        }
        if hello.token.is_empty() {
            return Err(Status::unauthenticated(
                "Hello carries no ServiceAccount token",
            ));
        }
        let _permit = self
            .identifying
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: hello.token.clone(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the token was not accepted: {}",
                status.error.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split(':').next())
            .ok_or_else(|| {
                Status::permission_denied(format!("{username} is not a ServiceAccount"))
            })?;
        if namespace != hello.namespace {
            return Err(Status::permission_denied(format!(
                "the token belongs to namespace {namespace}, not {}",
                hello.namespace
            )));
        }
        let pod_name = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(POD_NAME_EXTRA))
            .and_then(|names| names.first())
            .ok_or_else(|| Status::permission_denied("the token is not bound to a pod"))?;
        if pod_name != &hello.pod {
            return Err(Status::permission_denied(format!(
                "the token belongs to pod {pod_name}, not {}",
                hello.pod
            )));
        }
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(pod_name)
            .await
            .map_err(|e| Status::permission_denied(format!("pod {namespace}/{pod_name}: {e}")))?;
        let labels = pod.metadata.labels.unwrap_or_default();
        let annotations = pod.metadata.annotations.unwrap_or_default();
        Ok(Identity {
            namespace: namespace.to_owned(),
            pod: pod_name.clone(),
            agent_type: annotations
                .get(AGENT_TYPE_KEY)
                .or_else(|| labels.get(AGENT_TYPE_KEY))
                .cloned(),
            config: annotations.get(CONFIG_ANNOTATION).cloned(),
            labels,
        })
    }
}

fn snapshot(config: &EffectiveConfig) -> Result<ConfigSnapshot, Status> {
    Ok(ConfigSnapshot {
        version: config.version(),
        config_json: serde_json::to_string(config)
            .map_err(|e| Status::internal(format!("encoding the configuration: {e}")))?,
    })
}

#[tonic::async_trait]
impl ConfigDistribution for Distribution {
    type SubscribeStream = ReceiverStream<Result<ConfigSnapshot, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(SubscribeRequest {
                kind: Some(Kind::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        let identity = self.identify(&hello).await?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let current = Some(hello.current_version).filter(|v| !v.is_empty());
        let not_applied = hello.not_applied;
        tokio::spawn(async move {
            this.serve_one(identity.clone(), current, not_applied, inbound, tx)
                .await;
            this.sidecars.gone(&identity);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Distribution {
    /// Sends the sidecar its configuration whenever it changes, and records
    /// its answers, until either side ends the stream.
    async fn serve_one(
        &self,
        identity: Identity,
        mut last_sent: Option<String>,
        mut not_applied: Vec<String>,
        mut inbound: Streaming<SubscribeRequest>,
        tx: mpsc::Sender<Result<ConfigSnapshot, Status>>,
    ) {
        let mut catalog = self.catalog.clone();
        let mut first = true;
        loop {
            let current = catalog.borrow_and_update().clone();
            if let Some(current) = current {
                match effective(&current, &identity) {
                    Ok(config) => {
                        let version = config.version();
                        let unchanged = last_sent.as_ref() == Some(&version);
                        // A resubscribing sidecar that runs this version
                        // already gets nothing: no flap.
                        let resumed =
                            (first && unchanged).then(|| std::mem::take(&mut not_applied));
                        self.sidecars.sent(&identity, &config, resumed);
                        if !unchanged {
                            let Ok(message) = snapshot(&config) else {
                                return;
                            };
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                            last_sent = Some(version);
                        }
                        first = false;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(Status::not_found(err.to_string()))).await;
                        return;
                    }
                }
            }
            // Until the catalog changes, only answers arrive: record them
            // without computing the configuration again.
            loop {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tx.closed() => return,
                    changed = catalog.changed() => match changed {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    message = inbound.message() => match message {
                        Ok(Some(SubscribeRequest { kind: Some(kind) })) => {
                            if let Kind::Nack(nack) = &kind {
                                tracing::warn!(
                                    namespace = %identity.namespace,
                                    pod = %identity.pod,
                                    version = %nack.version,
                                    reason = %nack.reason,
                                    "a sidecar refused its configuration"
                                );
                            }
                            self.sidecars.answered(&identity, kind);
                        }
                        Ok(Some(SubscribeRequest { kind: None })) => {}
                        Ok(None) | Err(_) => return,
                    },
                }
            }
        }
    }
}
