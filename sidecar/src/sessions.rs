//! The `Sessions` gRPC service: session state with the TTL policy of each
//! configured namespace, for the sidecar's own tenant. Sessions are read
//! through to their store on every call (never cached here), so there is
//! nothing to invalidate; writes are still announced, for watchers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::sessions_server::Sessions;
use statefabric_session::{Policy, SessionError, SessionKey, SessionStore};
use statefabric_updates::{Change, ChangeKind, Notifier};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct SessionsService {
    store: Arc<dyn SessionStore>,
    tenant: TenantId,
    identity: String,
    namespaces: Arc<BTreeMap<String, Policy>>,
    notifier: Arc<dyn Notifier>,
}

fn from_session(err: SessionError) -> Status {
    match err {
        SessionError::Invalid { .. } => Status::invalid_argument(err.to_string()),
        SessionError::Unavailable(_) => Status::unavailable(err.to_string()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SessionsService {
    pub fn new(
        store: Arc<dyn SessionStore>,
        tenant: TenantId,
        identity: String,
        namespaces: BTreeMap<String, Policy>,
        notifier: Arc<dyn Notifier>,
    ) -> Self {
        Self {
            store,
            tenant,
            identity,
            namespaces: Arc::new(namespaces),
            notifier,
        }
    }

    fn resolve(&self, namespace: String, id: String) -> Result<(SessionKey, Policy), Status> {
        let policy = *self.namespaces.get(&namespace).ok_or_else(|| {
            let known: Vec<&str> = self.namespaces.keys().map(String::as_str).collect();
            Status::invalid_argument(format!(
                "namespace `{namespace}` is not configured (configured: {})",
                known.join(", ")
            ))
        })?;
        Ok((
            SessionKey {
                tenant: self.tenant.clone(),
                namespace,
                id,
            },
            policy,
        ))
    }

    /// Fire-and-forget: a lost announcement costs a watcher a wake-up, not
    /// correctness (nobody caches sessions).
    fn announce(&self, key: &SessionKey) {
        let notifier = self.notifier.clone();
        let tenant = self.tenant.clone();
        let change = Change {
            kind: ChangeKind::Session,
            key: format!("{}/{}", key.namespace, key.id),
            revision: 0,
            origin: self.identity.clone(),
        };
        tokio::spawn(async move {
            if let Err(err) = notifier.announce(&tenant, &change).await {
                tracing::debug!(error = %err, "session change not announced");
            }
        });
    }
}

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn put_session(
        &self,
        request: Request<pb::PutSessionRequest>,
    ) -> Result<Response<pb::PutSessionResponse>, Status> {
        let raw = request.into_inner();
        let (key, policy) = self.resolve(raw.namespace, raw.id)?;
        let ttl = match raw.ttl_ms {
            None => policy.ttl,
            Some(ms) if ms <= 0 => {
                return Err(Status::invalid_argument(format!(
                    "ttl_ms must be positive, got {ms}"
                )));
            }
            Some(ms) => {
                let ttl = Duration::from_millis(ms.unsigned_abs());
                if ttl > policy.max_ttl() {
                    return Err(Status::invalid_argument(format!(
                        "ttl_ms {ms} is over namespace `{}`'s max of {} ms",
                        key.namespace,
                        millis(policy.max_ttl())
                    )));
                }
                ttl
            }
        };
        let left = self
            .store
            .put(&key, &raw.value, ttl, policy.expiry)
            .await
            .map_err(from_session)?;
        self.announce(&key);
        Ok(Response::new(pb::PutSessionResponse {
            expires_in_ms: millis(left),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let raw = request.into_inner();
        let (key, policy) = self.resolve(raw.namespace, raw.id)?;
        let session = self
            .store
            .get(&key, policy.ttl, policy.expiry)
            .await
            .map_err(from_session)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "session {}/{} does not exist or has expired",
                    key.namespace, key.id
                ))
            })?;
        Ok(Response::new(pb::GetSessionResponse {
            value: session.value,
            expires_in_ms: millis(session.expires_in),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let raw = request.into_inner();
        let (key, _) = self.resolve(raw.namespace, raw.id)?;
        let existed = self.store.delete(&key).await.map_err(from_session)?;
        if existed {
            self.announce(&key);
        }
        Ok(Response::new(pb::DeleteSessionResponse { existed }))
    }
}
