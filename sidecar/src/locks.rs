//! The `Locks` gRPC service. The owner of every lock taken here is this
//! sidecar's identity; the sidecar remembers what it holds so a clean
//! shutdown lets go of it at once instead of leaving others to wait out the
//! lease.

use serde_json::{Value, json};

use crate::audit::Auditor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_lock::{Lease, LockService};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::locks_server::Locks;
use tonic::{Request, Response, Status};

use crate::status::from_lock;

/// Longest lease and longest wait accepted, whatever a FabricConfig says.
pub(crate) const MAX_MILLIS: u32 = 600_000;

/// The longest lease and wait an agent may ask for; clones share them, and
/// a FabricConfig's `locks` changes them while the sidecar runs.
#[derive(Debug, Clone)]
pub(crate) struct LockLimits {
    max_lease_ms: Arc<AtomicU32>,
    max_wait_ms: Arc<AtomicU32>,
}

impl Default for LockLimits {
    fn default() -> Self {
        Self {
            max_lease_ms: Arc::new(AtomicU32::new(MAX_MILLIS)),
            max_wait_ms: Arc::new(AtomicU32::new(MAX_MILLIS)),
        }
    }
}

impl LockLimits {
    /// New bounds, each at most [`MAX_MILLIS`]; `None` restores that.
    pub(crate) fn set(&self, max_lease: Option<Duration>, max_wait: Option<Duration>) {
        let ms = |d: Option<Duration>| {
            d.map_or(MAX_MILLIS, |d| {
                u32::try_from(d.as_millis())
                    .unwrap_or(u32::MAX)
                    .min(MAX_MILLIS)
            })
        };
        self.max_lease_ms.store(ms(max_lease), Ordering::Relaxed);
        self.max_wait_ms.store(ms(max_wait), Ordering::Relaxed);
    }

    pub(crate) fn max_lease_ms(&self) -> u32 {
        self.max_lease_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn max_wait_ms(&self) -> u32 {
        self.max_wait_ms.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LocksService {
    locks: Arc<dyn LockService>,
    tenant: TenantId,
    identity: String,
    held: Arc<Mutex<HashMap<String, Lease>>>,
    limits: LockLimits,
    audit: Auditor,
}

fn millis(field: &str, value: u32, allow_zero: bool, max: u32) -> Result<Duration, Status> {
    if (value == 0 && !allow_zero) || value > max {
        return Err(Status::invalid_argument(format!(
            "{field}: {value} is out of range {}..={max}",
            u32::from(!allow_zero)
        )));
    }
    Ok(Duration::from_millis(u64::from(value)))
}

/// `details` with the call's outcome: `done`, or `failed` and why.
pub(crate) fn outcome<T, E: std::fmt::Display>(result: &Result<T, E>, mut details: Value) -> Value {
    match result {
        Ok(_) => details["outcome"] = json!("done"),
        Err(err) => {
            details["outcome"] = json!("failed");
            details["error"] = json!(err.to_string());
        }
    }
    details
}

fn lease_to_proto(lease: &Lease) -> pb::Lease {
    pb::Lease {
        name: lease.name.clone(),
        token: lease.token,
        ttl_ms: u32::try_from(lease.ttl.as_millis()).unwrap_or(u32::MAX),
    }
}

impl LocksService {
    pub(crate) fn new(
        locks: Arc<dyn LockService>,
        tenant: TenantId,
        identity: String,
        limits: LockLimits,
        audit: Auditor,
    ) -> Self {
        Self {
            locks,
            tenant,
            identity,
            held: Arc::default(),
            limits,
            audit,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(&self, name: String, token: u64, ttl: Duration) -> Lease {
        Lease {
            tenant: self.tenant.clone(),
            name,
            owner: self.identity.clone(),
            token,
            ttl,
        }
    }

    /// Releases every lock this sidecar holds (clean shutdown).
    pub(crate) async fn release_all(&self) {
        let leases: Vec<Lease> = self.held().drain().map(|(_, l)| l).collect();
        for lease in leases {
            let released = self.locks.release(&lease).await;
            self.audit.record(
                "lock.release",
                &lease.name,
                outcome(
                    &released,
                    json!({"token": lease.token, "at_shutdown": true}),
                ),
            );
            match released {
                Ok(()) => tracing::info!(lock = %lease.name, "released at shutdown"),
                Err(err) => {
                    tracing::warn!(lock = %lease.name, error = %err, "not released at shutdown")
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Locks for LocksService {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let raw = request.into_inner();
        let ttl = millis("ttl_ms", raw.ttl_ms, false, self.limits.max_lease_ms())?;
        let wait = millis("wait_ms", raw.wait_ms, true, self.limits.max_wait_ms())?;
        let acquired = self
            .locks
            .acquire(&self.tenant, &raw.name, &self.identity, ttl, wait)
            .await;
        let details = match &acquired {
            Ok(Some(lease)) => {
                json!({"outcome": "acquired", "token": lease.token, "ttl_ms": raw.ttl_ms})
            }
            Ok(None) => json!({"outcome": "held_by_another", "wait_ms": raw.wait_ms}),
            Err(err) => json!({"outcome": "failed", "error": err.to_string()}),
        };
        self.audit.record("lock.acquire", &raw.name, details);
        let lease = acquired.map_err(from_lock)?;
        if let Some(lease) = &lease {
            self.held().insert(lease.name.clone(), lease.clone());
        }
        Ok(Response::new(pb::AcquireResponse {
            acquired: lease.is_some(),
            lease: lease.as_ref().map(lease_to_proto),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let raw = request.into_inner();
        let ttl = millis("ttl_ms", raw.ttl_ms, false, self.limits.max_lease_ms())?;
        let lease = self.lease(raw.name, raw.token, ttl);
        let renewed = self.locks.renew(&lease, ttl).await;
        self.audit.record(
            "lock.renew",
            &lease.name,
            outcome(
                &renewed,
                json!({"token": lease.token, "ttl_ms": raw.ttl_ms}),
            ),
        );
        let renewed = renewed.map_err(|e| {
            self.held().remove(&lease.name);
            from_lock(e)
        })?;
        self.held().insert(renewed.name.clone(), renewed.clone());
        Ok(Response::new(lease_to_proto(&renewed)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let raw = request.into_inner();
        let lease = self.lease(raw.name, raw.token, Duration::ZERO);
        self.held().remove(&lease.name);
        let released = self.locks.release(&lease).await;
        self.audit.record(
            "lock.release",
            &lease.name,
            outcome(&released, json!({"token": lease.token})),
        );
        released.map_err(from_lock)?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let raw = request.into_inner();
        statefabric_lock::check(&raw.name, &self.identity, Duration::from_millis(1))
            .map_err(from_lock)?;
        let holder = self
            .locks
            .inspect(&self.tenant, &raw.name)
            .await
            .map_err(from_lock)?;
        Ok(Response::new(match holder {
            None => pb::InspectResponse::default(),
            Some(h) => pb::InspectResponse {
                held: true,
                owner: h.owner,
                token: h.token,
                expires_in_ms: u32::try_from(h.expires_in.as_millis()).unwrap_or(u32::MAX),
            },
        }))
    }
}
