//! The `ConfigDistribution` gRPC service: a sidecar says who it is, proves
//! it with its pod's ServiceAccount token, and receives its effective
//! configuration whenever that changes; it answers each with an ACK or a
//! NACK, which the [`Sidecars`] registry keeps for the resources' status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
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

/// The resources a configuration includes, as `Kind/name`.
fn resources(config: &EffectiveConfig) -> Vec<String> {
    config
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
        .collect()
}

/// The sidecars subscribed to this replica, by (namespace, pod): what each
/// was sent and answered, kept as the record the status needs (not the
/// configuration itself, of which a thousand sidecars would each hold a
/// copy).
#[derive(Debug, Clone, Default)]
pub struct Sidecars {
    inner: Arc<Mutex<BTreeMap<(String, String), SidecarRecord>>>,
}

impl Sidecars {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<(String, String), SidecarRecord>) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Every subscriber, as published for the status.
    pub fn records(&self) -> Vec<SidecarRecord> {
        self.with(|all| all.values().cloned().collect())
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
        version: &str,
        already_applied: Option<Vec<String>>,
    ) {
        self.with(|all| {
            let record = all
                .entry(Self::key(identity))
                .or_insert_with(|| SidecarRecord {
                    namespace: identity.namespace.clone(),
                    pod: identity.pod.clone(),
                    resources: Vec::new(),
                    sent: String::new(),
                    applied: None,
                    refused: None,
                    not_applied: Vec::new(),
                });
            record.resources = resources(config);
            version.clone_into(&mut record.sent);
            if let Some(not_applied) = already_applied {
                record.applied = Some(version.to_owned());
                record.not_applied = not_applied;
            }
        });
    }

    fn answered(&self, identity: &Identity, kind: Kind) {
        self.with(|all| {
            if let Some(record) = all.get_mut(&Self::key(identity)) {
                match kind {
                    Kind::Ack(ack) => {
                        record.applied = Some(ack.version);
                        record.refused = None;
                        record.not_applied = ack.not_applied;
                    }
                    Kind::Nack(nack) => {
                        record.refused = Some(Refusal {
                            version: nack.version,
                            reason: nack.reason,
                        });
                    }
                    Kind::Hello(_) => {}
                }
            }
        });
    }

    fn gone(&self, identity: &Identity) {
        self.with(|all| all.remove(&Self::key(identity)));
    }
}

/// What the stream to one sidecar carries. The status is boxed: the
/// channel allocates its slots up front, and an unboxed `Status` would
/// make each of them several times larger, per subscriber.
type Outgoing = Result<ConfigSnapshot, Box<Status>>;

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
    /// Serves the configurations of `catalog` to the sidecars that
    /// authenticate with a token for `audience` (checked with a TokenReview
    /// through `client`), until `stop`.
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

fn snapshot(config: &EffectiveConfig, version: &str) -> Result<ConfigSnapshot, Status> {
    Ok(ConfigSnapshot {
        version: version.to_owned(),
        config_json: serde_json::to_string(config)
            .map_err(|e| Status::internal(format!("encoding the configuration: {e}")))?,
    })
}

#[tonic::async_trait]
impl ConfigDistribution for Distribution {
    type SubscribeStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ConfigSnapshot, Status>> + Send>>;

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
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|sent| sent.map_err(|status| *status)),
        )))
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
        tx: mpsc::Sender<Outgoing>,
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
                        self.sidecars.sent(&identity, &config, &version, resumed);
                        if !unchanged {
                            let Ok(message) = snapshot(&config, &version) else {
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
                        let _ = tx
                            .send(Err(Box::new(Status::not_found(err.to_string()))))
                            .await;
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
