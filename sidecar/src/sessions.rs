//! The `Sessions` gRPC service: session state with the TTL policy of each
//! configured namespace, for the sidecar's own tenant. Sessions are read
//! through to their store on every call (never cached here), so there is
//! nothing to invalidate; writes are still announced, for watchers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use statefabric_domain::TenantId;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::sessions_server::Sessions;
use statefabric_session::{Policy, SessionKey, SessionStore};
use statefabric_updates::{Change, ChangeKind, Notifier};
use tonic::{Request, Response, Status};

use serde_json::json;

use crate::audit::Auditor;
use crate::locks::outcome;
use crate::status::from_session;

#[derive(Debug, Clone)]
pub(crate) struct SessionsService {
    store: Arc<dyn SessionStore>,
    tenant: TenantId,
    identity: String,
    namespaces: SessionPolicies,
    notifier: Arc<dyn Notifier>,
    audit: Auditor,
}

/// The session namespaces agents may use: those of the sidecar's own
/// configuration, and over them those of its FabricConfig, replaced
/// whole without a restart (calls in flight keep the map they read).
#[derive(Debug, Clone)]
pub(crate) struct SessionPolicies {
    configured: Arc<BTreeMap<String, Policy>>,
    current: Arc<ArcSwap<BTreeMap<String, Policy>>>,
}

impl SessionPolicies {
    pub(crate) fn new(configured: BTreeMap<String, Policy>) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(configured.clone())),
            configured: Arc::new(configured),
        }
    }

    /// The configured namespaces with `mesh`'s on top (a name in both takes
    /// the mesh's policy).
    pub(crate) fn set_mesh(&self, mesh: BTreeMap<String, Policy>) {
        let mut merged = (*self.configured).clone();
        merged.extend(mesh);
        self.current.store(Arc::new(merged));
    }

    fn load(&self) -> Arc<BTreeMap<String, Policy>> {
        self.current.load_full()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SessionsService {
    pub(crate) fn new(
        store: Arc<dyn SessionStore>,
        tenant: TenantId,
        identity: String,
        namespaces: SessionPolicies,
        notifier: Arc<dyn Notifier>,
        audit: Auditor,
    ) -> Self {
        Self {
            store,
            tenant,
            identity,
            namespaces,
            notifier,
            audit,
        }
    }

    /// The policy of a configured namespace.
    fn policy(&self, namespace: &str) -> Result<Policy, Status> {
        let namespaces = self.namespaces.load();
        namespaces.get(namespace).copied().ok_or_else(|| {
            let known: Vec<&str> = namespaces.keys().map(String::as_str).collect();
            Status::invalid_argument(format!(
                "namespace `{namespace}` is not configured (configured: {})",
                known.join(", ")
            ))
        })
    }

    fn resolve(&self, namespace: String, id: String) -> Result<(SessionKey, Policy), Status> {
        let policy = self.policy(&namespace)?;
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
        let put = self.store.put(&key, &raw.value, ttl, policy.expiry).await;
        self.audit.record(
            "session.put",
            &format!("{}/{}", key.namespace, key.id),
            outcome(
                &put,
                json!({"ttl_ms": millis(ttl), "bytes": raw.value.len()}),
            ),
        );
        let left = put.map_err(from_session)?;
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

    async fn get_sessions(
        &self,
        request: Request<pb::GetSessionsRequest>,
    ) -> Result<Response<pb::GetSessionsResponse>, Status> {
        let raw = request.into_inner();
        let policy = self.policy(&raw.namespace)?;
        let read = self
            .store
            .get_many(
                &self.tenant,
                &raw.namespace,
                &raw.ids,
                policy.ttl,
                policy.expiry,
            )
            .await
            .map_err(from_session)?;
        let mut response = pb::GetSessionsResponse::default();
        for (id, session) in raw.ids.into_iter().zip(read) {
            match session {
                Some(session) => response.sessions.push(pb::SessionEntry {
                    id,
                    value: session.value,
                    expires_in_ms: millis(session.expires_in),
                }),
                None => response.missing.push(id),
            }
        }
        Ok(Response::new(response))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let raw = request.into_inner();
        let (key, _) = self.resolve(raw.namespace, raw.id)?;
        let deleted = self.store.delete(&key).await;
        let mut details = outcome(&deleted, json!({}));
        if let Ok(existed) = &deleted {
            details["existed"] = json!(existed);
        }
        self.audit.record(
            "session.delete",
            &format!("{}/{}", key.namespace, key.id),
            details,
        );
        let existed = deleted.map_err(from_session)?;
        if existed {
            self.announce(&key);
        }
        Ok(Response::new(pb::DeleteSessionResponse { existed }))
    }
}
